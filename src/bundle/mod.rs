//! The trust bundle: the `istio-ca-root-cert` ConfigMap in every namespace of every cluster,
//! written by the leader only, always from the pinned roots.

pub mod desired;
pub mod reconciler;
pub mod selector;

use std::future::Future;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::leader::Leadership;
use crate::retry::Delays;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    cluster: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    cluster: String,
    op: &'static str,
}

/// Labelled by cluster ID: operators configure those, so they are few.
#[derive(Clone)]
pub struct BundleMetrics {
    reconciles: Family<ReconcileLabels, Counter>,
    writes: Family<WriteLabels, Counter>,
}

impl BundleMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Family::default(),
            writes: Family::default(),
        };
        registry.register(
            "bundle_reconciles",
            "Namespace trust-bundle reconciles by cluster and result (unchanged, written, skipped, stale, error).",
            metrics.reconciles.clone(),
        );
        registry.register(
            "bundle_writes",
            "istio-ca-root-cert ConfigMap writes by cluster and operation (create, update).",
            metrics.writes.clone(),
        );
        metrics
    }

    fn reconciled(&self, cluster: &str, result: &'static str) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                cluster: cluster.to_owned(),
                result,
            })
            .inc();
    }

    fn wrote(&self, cluster: &str, op: &'static str) {
        self.writes
            .get_or_create(&WriteLabels {
                cluster: cluster.to_owned(),
                op,
            })
            .inc();
    }
}

/// Runs `work` while this replica leads: started when leadership is gained, stopped (dropped)
/// when it is lost, restarted with backoff if it fails meanwhile. Never ends by itself unless
/// the election is gone.
pub async fn run_while_leader<F, Fut>(
    mut leadership: watch::Receiver<Leadership>,
    what: &str,
    mut work: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut backoff = Delays::default();
    loop {
        let regained = !leadership.borrow().is_leader;
        if !wait_for_leadership(&mut leadership, true).await {
            anyhow::bail!("leader election stopped");
        }
        if regained {
            backoff.reset();
        }
        // In this task's span: a cluster's reconciler logs with its cluster.
        let mut running = AbortOnDropHandle::new(tokio::spawn(work().in_current_span()));
        tokio::select! {
            still_electing = wait_for_leadership(&mut leadership, false) => {
                if !still_electing {
                    anyhow::bail!("leader election stopped");
                }
                tracing::info!(what, "leadership lost: stopped");
            }
            ended = &mut running => {
                let delay = backoff.next_delay();
                match ended {
                    Ok(Ok(())) => tracing::warn!(what, ?delay, "ended; restarting"),
                    Ok(Err(error)) => tracing::error!(what, error = %format!("{error:#}"), ?delay, "failed; restarting"),
                    Err(error) => tracing::error!(what, %error, ?delay, "panicked; restarting"),
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Waits until this replica leads (`true`) or not (`false`); false if the election is gone.
async fn wait_for_leadership(leadership: &mut watch::Receiver<Leadership>, leading: bool) -> bool {
    leadership
        .wait_for(|l| l.is_leader == leading)
        .await
        .is_ok()
}

//! Kubernetes clients: every call has a deadline, is counted, and goes through the cluster's
//! own client-side rate limit.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use super::api_metrics::ApiMetricsLayer;
use super::deadline::DeadlineLayer;
use super::rate_limit::RateLimitLayer;

/// A hung API server must not hang a CreateCertificate.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Every request but a watch is answered within this (`deadline.rs`).
const REQUEST_DEADLINE: Duration = Duration::from_secs(15);
/// How long the API server keeps a watch open before ending it (and the watcher resumes).
/// Short enough that a dead connection (kube's client sets no TCP keepalive) shows within a
/// minute: kube-runtime's watcher gives up on a watch silent for this plus 5 s.
pub const WATCH_TIMEOUT_SECS: u32 = 55;
/// The socket-level backstop, for a response body that stalls after its headers: beyond a
/// watch's life, so no healthy quiet watch is cut.
const READ_TIMEOUT: Duration = Duration::from_secs(WATCH_TIMEOUT_SECS as u64 + 10);

/// The watcher configuration of every watch: ended by the API server after
/// `WATCH_TIMEOUT_SECS`.
pub fn watch_config() -> kube::runtime::watcher::Config {
    kube::runtime::watcher::Config::default().timeout(WATCH_TIMEOUT_SECS)
}

/// Builds clients for any cluster with the same limits and metrics; each client gets its own
/// rate-limit bucket, since the limit protects that cluster's API server.
#[derive(Clone)]
pub struct ClientFactory {
    metrics: ApiMetricsLayer,
    qps: f64,
    burst: u32,
    rate_limit_waits: Counter<f64, AtomicU64>,
}

impl ClientFactory {
    pub fn new(registry: &mut Registry, qps: f64, burst: u32) -> Self {
        Self {
            metrics: ApiMetricsLayer::register(registry),
            qps,
            burst,
            rate_limit_waits: RateLimitLayer::register_wait_counter(registry),
        }
    }

    /// Two clients of one cluster with a bucket each: one for TokenReviews, one for the rest
    /// (leader election, the bundle, the issuers), so a flood of callers with tokens to review
    /// can never starve the Lease renewals.
    pub fn build_with_review_client(
        &self,
        config: kube::Config,
    ) -> anyhow::Result<(kube::Client, kube::Client)> {
        Ok((self.build(config.clone())?, self.build(config)?))
    }

    pub fn build(&self, mut config: kube::Config) -> anyhow::Result<kube::Client> {
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        config.read_timeout = Some(READ_TIMEOUT);
        config.write_timeout = Some(REQUEST_DEADLINE);
        // The pool's idle time must not count against the read timeout.
        config.reset_reader_on_write = true;
        let limit = RateLimitLayer::new(self.qps, self.burst, self.rate_limit_waits.clone());
        Ok(kube::client::ClientBuilder::try_from(config)?
            .with_layer(&DeadlineLayer::new(REQUEST_DEADLINE))
            .with_layer(&self.metrics)
            .with_layer(&limit)
            .build())
    }
}

/// The local cluster's configuration: `--kubeconfig`, else kube's usual inference
/// (`KUBECONFIG`, `~/.kube/config`, in-cluster).
pub async fn local_config(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Config> {
    match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(kube::Config::from_custom_kubeconfig(
                file,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?)
        }
        None => Ok(kube::Config::infer().await?),
    }
}

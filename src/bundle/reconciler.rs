//! One cluster's trust-bundle reconciler, run while this replica leads: kube-runtime's
//! `Controller` over the selected Namespaces (metadata only, the selector applied by the API
//! server), triggered too by the `istio-ca-root-cert` ConfigMaps (each mapped to its
//! namespace), by a change of the pinned roots and by a periodic resync. Every reconcile
//! compares the cached ConfigMap with the desired one and writes only what differs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{PartialObjectMeta, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio_stream::wrappers::{IntervalStream, WatchStream};

use super::BundleMetrics;
use super::desired::{CONFIG_MAP_NAME, Change, change_for};
use super::selector::Selector;
use crate::pki::chain::RootBundle;

/// Every namespace is looked at again this often, from the caches (no API call when right):
/// the safety net for anything a watch missed.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(600);

/// A failed namespace comes back after 50 ms, doubling per failure up to a minute (client-go's
/// per-item rate limiter), while the others go on.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Namespaces as the controller sees them: metadata only (labels, deletion), a fraction of
/// the whole objects' memory.
type NamespaceMeta = PartialObjectMeta<Namespace>;

#[derive(Clone)]
pub struct Settings {
    pub cluster: String,
    pub selector: Selector,
    pub workers: usize,
    pub metrics: BundleMetrics,
}

/// What the admin API reports of one cluster's bundle.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct BundleCounts {
    /// Both watches have listed; until then nothing is written.
    pub synced: bool,
    /// Namespaces that must hold the bundle (selected, not terminating).
    pub namespaces: usize,
    pub in_sync: usize,
    /// Of those, not in sync yet and not failing: waiting for or in a reconcile.
    pub pending: usize,
    /// Of those, not in sync because their last reconcile failed (retried with backoff).
    pub errors: usize,
}

/// A live view of a running reconciler, for the admin API.
pub struct BundleView {
    live: Mutex<Option<Live>>,
    /// Counts runs whose caches have synced: what a new kubeconfig's run is awaited on.
    syncs: watch::Sender<u64>,
}

impl Default for BundleView {
    fn default() -> Self {
        Self {
            live: Mutex::new(None),
            syncs: watch::Sender::new(0),
        }
    }
}

/// Failure counts by namespace name: the retry delay of each, and the admin API's errors.
type Failures = Arc<Mutex<HashMap<String, u32>>>;

struct Live {
    namespaces: Store<NamespaceMeta>,
    config_maps: Store<ConfigMap>,
    failures: Failures,
    selector: Selector,
    roots: watch::Receiver<Arc<RootBundle>>,
    synced: Arc<AtomicBool>,
}

impl BundleView {
    /// Changes each time a run's caches have synced.
    pub fn syncs(&self) -> watch::Receiver<u64> {
        self.syncs.subscribe()
    }

    /// `None` while no reconciler runs here (not the leader).
    pub fn counts(&self) -> Option<BundleCounts> {
        let live = self.live.lock().ok()?;
        let live = live.as_ref()?;
        let pem = live.roots.borrow().pem().to_owned();
        let failing = live.failures.lock().map(|f| f.clone()).unwrap_or_default();
        let mut counts = BundleCounts {
            synced: live.synced.load(Ordering::Acquire),
            ..Default::default()
        };
        for namespace in live.namespaces.state() {
            if !wants_bundle(&namespace, &live.selector) {
                continue;
            }
            counts.namespaces += 1;
            let name = namespace.name_any();
            let existing = live
                .config_maps
                .get(&ObjectRef::new(CONFIG_MAP_NAME).within(&name));
            if change_for(&name, existing.as_deref(), &pem) == Change::None {
                counts.in_sync += 1;
            } else if failing.contains_key(&name) {
                counts.errors += 1;
            } else {
                counts.pending += 1;
            }
        }
        Some(counts)
    }
}

/// The API server already leaves out unselected namespaces; the local match is the same
/// selector again, so a namespace relabelled between two events is judged by its labels now.
fn wants_bundle(namespace: &NamespaceMeta, selector: &Selector) -> bool {
    // A terminating namespace refuses new objects; its deletionTimestamp is what marks it.
    namespace.metadata.deletion_timestamp.is_none()
        && selector.matches(namespace.metadata.labels.as_ref())
}

/// What each reconcile needs, shared by the controller's tasks.
struct Context {
    client: kube::Client,
    settings: Settings,
    config_maps: Store<ConfigMap>,
    /// Set once the ConfigMap watch has listed. Not `Store::wait_until_ready`: its future
    /// wakes only the last of several waiters (kube-runtime 5's DelayedInit keeps one waker),
    /// and the controller itself waits on the Namespace store.
    config_maps_listed: watch::Receiver<bool>,
    namespaces: Store<NamespaceMeta>,
    roots: watch::Receiver<Arc<RootBundle>>,
    failures: Failures,
}

/// Runs until dropped (leadership lost, cluster removed) or the controller ends.
pub async fn run(
    client: kube::Client,
    settings: Settings,
    roots: watch::Receiver<Arc<RootBundle>>,
    view: Arc<BundleView>,
) -> anyhow::Result<()> {
    let (namespaces, ns_writer) = reflector::store::<NamespaceMeta>();
    let (config_maps, cm_writer) = reflector::store::<ConfigMap>();
    let failures = Failures::default();
    let synced = Arc::new(AtomicBool::new(false));
    if let Ok(mut live) = view.live.lock() {
        *live = Some(Live {
            namespaces: namespaces.clone(),
            config_maps: config_maps.clone(),
            failures: failures.clone(),
            selector: settings.selector.clone(),
            roots: roots.clone(),
            synced: synced.clone(),
        });
    }
    let _clear_view = ClearOnDrop {
        view: view.clone(),
        failures: failures.clone(),
    };
    let cluster = settings.cluster.clone();

    let mut ns_config = crate::cluster::client::watch_config();
    let selector = settings.selector.to_string();
    if !selector.is_empty() {
        ns_config = ns_config.labels(&selector);
    }
    // Backoff between failed re-lists: a missing permission or a dead remote must not become
    // a hot loop that starves the other clusters.
    let (ns_listed_tx, mut ns_listed) = watch::channel(false);
    let (cm_listed_tx, mut cm_listed) = watch::channel(false);
    let ns_events = watcher(Api::<NamespaceMeta>::all(client.clone()), ns_config)
        .default_backoff()
        .reflect(ns_writer)
        .inspect_ok(move |event| mark_listed(event, &ns_listed_tx))
        .applied_objects();
    let cm_events = watcher(
        Api::<ConfigMap>::all(client.clone()),
        crate::cluster::client::watch_config().fields(&format!("metadata.name={CONFIG_MAP_NAME}")),
    )
    .default_backoff()
    // Compared and replaced whole, but nobody needs their field managers.
    .modify(|cm| cm.metadata.managed_fields = None)
    .reflect(cm_writer)
    .inspect_ok(move |event| mark_listed(event, &cm_listed_tx))
    .touched_objects();

    // The stream yields the current roots first: only later changes trigger.
    let roots_changed = WatchStream::from_changes(roots.clone())
        .map(|_| tracing::info!("trust roots changed; updating every namespace"));
    let resync = IntervalStream::new(tokio::time::interval_at(
        tokio::time::Instant::now() + RESYNC_PERIOD,
        RESYNC_PERIOD,
    ))
    .map(|_| ());

    let context = Arc::new(Context {
        client,
        settings: settings.clone(),
        config_maps: config_maps.clone(),
        config_maps_listed: cm_listed.clone(),
        namespaces: namespaces.clone(),
        roots,
        failures,
    });
    let concurrency = u16::try_from(settings.workers.max(1)).unwrap_or(u16::MAX);
    let forgotten = context.failures.clone();
    let reconciles = Controller::for_stream(ns_events, namespaces.clone())
        .watches_stream(cm_events, |cm: ConfigMap| {
            cm.namespace()
                .map(|ns| ObjectRef::<NamespaceMeta>::new(&ns))
        })
        .reconcile_all_on(futures_util::stream::select(roots_changed, resync))
        .with_config(controller::Config::default().concurrency(concurrency))
        // The watches back off by themselves; the controller's own backoff on a watch error
        // would also hold up root changes and the resync, for every namespace.
        .trigger_backoff(NoDelay)
        .run(reconcile, error_policy, context)
        .for_each(|result| {
            match result {
                Err(controller::Error::QueueError(error)) => {
                    tracing::warn!(%error, "trust bundle watch interrupted");
                }
                // Gone from the cache before its turn came (deleted, or no longer selected):
                // its failures are history.
                Err(controller::Error::ObjectNotFound(gone)) => {
                    settings.metrics.reconciled(&cluster, "skipped");
                    if let Ok(mut failures) = forgotten.lock() {
                        failures.remove(&gone.name);
                    }
                }
                Err(controller::Error::RunnerError(error)) => {
                    tracing::error!(%error, "trust bundle controller failed");
                }
                // Reported by `error_policy`, with the retry delay.
                Err(controller::Error::ReconcilerFailed(..)) | Ok(_) => {}
            }
            std::future::ready(())
        });

    // Nothing is written from half-listed caches: the controller holds its reconciles until
    // the Namespace cache is ready, and each reconcile waits for the ConfigMap cache.
    let announce_sync = async {
        let both = tokio::try_join!(
            async { ns_listed.wait_for(|listed| *listed).await.map(drop) },
            async { cm_listed.wait_for(|listed| *listed).await.map(drop) },
        );
        if both.is_ok() {
            synced.store(true, Ordering::Release);
            view.syncs.send_modify(|n| *n += 1);
            tracing::info!(
                namespaces = namespaces.len(),
                "trust bundle caches synced; reconciling every namespace"
            );
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = reconciles => anyhow::bail!("the trust bundle controller of cluster {} ended", settings.cluster),
        () = announce_sync => unreachable!("pending never completes"),
    }
}

/// Never waits (and never gives up).
struct NoDelay;

impl Iterator for NoDelay {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for NoDelay {
    fn reset(&mut self) {}
}

/// A watch's first list is complete (the reflector has applied it: the store is ready).
fn mark_listed<K>(event: &watcher::Event<K>, listed: &watch::Sender<bool>) {
    if matches!(event, watcher::Event::InitDone) {
        listed.send_replace(true);
    }
}

/// Takes this run out of the view when it ends, unless a newer run (a new kubeconfig's) has
/// already put itself there.
struct ClearOnDrop {
    view: Arc<BundleView>,
    failures: Failures,
}

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        if let Ok(mut live) = self.view.live.lock()
            && live
                .as_ref()
                .is_some_and(|l| Arc::ptr_eq(&l.failures, &self.failures))
        {
            *live = None;
        }
    }
}

async fn reconcile(
    namespace: Arc<NamespaceMeta>,
    ctx: Arc<Context>,
) -> Result<Action, kube::Error> {
    let name = namespace.name_any();
    if ctx
        .config_maps_listed
        .clone()
        .wait_for(|listed| *listed)
        .await
        .is_err()
    {
        // The ConfigMap watch is gone: so is this run.
        return Ok(Action::await_change());
    }
    let pem = ctx.roots.borrow().pem().to_owned();
    let outcome = write_if_needed(&ctx, &namespace, &name, &pem).await;
    let result = match &outcome {
        Ok(Outcome::Unchanged) => "unchanged",
        Ok(Outcome::Skipped) => "skipped",
        Ok(Outcome::Written) => "written",
        Ok(Outcome::Stale) => "stale",
        Err(_) => "error",
    };
    ctx.settings
        .metrics
        .reconciled(&ctx.settings.cluster, result);
    if let Ok(mut failures) = ctx.failures.lock() {
        match &outcome {
            Ok(_) => {
                failures.remove(&name);
            }
            Err(_) => *failures.entry(name).or_insert(0) += 1,
        }
    }
    // Nothing to schedule: every change that matters is a watch event, a root change or the
    // resync.
    outcome.map(|_| Action::await_change())
}

/// Called after a failed reconcile (its failure already counted): when to try it again.
fn error_policy(namespace: Arc<NamespaceMeta>, error: &kube::Error, ctx: Arc<Context>) -> Action {
    let name = namespace.name_any();
    let failures = ctx
        .failures
        .lock()
        .ok()
        .and_then(|f| f.get(&name).copied())
        .unwrap_or(1);
    let retry_in = retry_delay(failures);
    tracing::warn!(namespace = %name, %error, ?retry_in, "trust bundle not written");
    Action::requeue(retry_in)
}

fn retry_delay(failures: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(RETRY_MAX)
}

enum Outcome {
    Unchanged,
    Skipped,
    Written,
    /// The cache was behind (the object exists after all, changed, or is gone): its watch
    /// event triggers the namespace again, so this is no failure to back off from.
    Stale,
}

async fn write_if_needed(
    ctx: &Context,
    namespace: &NamespaceMeta,
    name: &str,
    pem: &str,
) -> Result<Outcome, kube::Error> {
    let settings = &ctx.settings;
    // Excluded namespaces keep whatever they have: we never delete a ConfigMap.
    if !wants_bundle(namespace, &settings.selector) {
        return Ok(Outcome::Skipped);
    }
    let existing = ctx
        .config_maps
        .get(&ObjectRef::new(CONFIG_MAP_NAME).within(name));
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), name);
    let (op, result) = match change_for(name, existing.as_deref(), pem) {
        Change::None => return Ok(Outcome::Unchanged),
        Change::Create(cm) => ("create", api.create(&PostParams::default(), &cm).await),
        Change::Replace(cm) => (
            "update",
            api.replace(CONFIG_MAP_NAME, &PostParams::default(), &cm)
                .await,
        ),
    };
    match result {
        Ok(_) => {
            settings.metrics.wrote(&settings.cluster, op);
            tracing::debug!(namespace = %name, op, "trust bundle written");
            Ok(Outcome::Written)
        }
        Err(kube::Error::Api(e)) if e.code == 409 || (e.code == 404 && op == "update") => {
            Ok(Outcome::Stale)
        }
        // The namespace went away or started terminating meanwhile: nothing to do.
        Err(kube::Error::Api(e))
            if (e.code == 403 || e.code == 404)
                && ctx
                    .namespaces
                    .get(&ObjectRef::new(name))
                    .is_none_or(|ns| !wants_bundle(&ns, &settings.selector)) =>
        {
            Ok(Outcome::Skipped)
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_namespace_backs_off_from_50_ms_doubling_to_a_minute() {
        let delays: Vec<_> = (1..=4).map(retry_delay).collect();
        assert_eq!(
            delays,
            [50, 100, 200, 400].map(Duration::from_millis).to_vec()
        );
        assert_eq!(retry_delay(11), Duration::from_millis(51_200));
        assert_eq!(retry_delay(12), RETRY_MAX);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }
}

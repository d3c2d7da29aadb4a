//! One cluster's trust-bundle reconciler, run while this replica leads: a cached Namespace
//! watch and a cached watch of `istio-ca-root-cert` ConfigMaps drive a work queue of namespace
//! names; workers compare each namespace's ConfigMap with the desired one and write only what
//! differs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::PostParams;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde::Serialize;
use tokio::sync::watch;

use super::BundleMetrics;
use super::desired::{CONFIG_MAP_NAME, Change, change_for};
use super::queue::WorkQueue;
use super::selector::Selector;
use crate::pki::chain::RootBundle;

/// Every namespace is looked at again this often, from the caches (no API call when right):
/// the safety net for anything a watch missed.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(600);

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
    /// Namespaces waiting for or in a reconcile.
    pub pending: usize,
    /// Namespaces whose last reconcile failed (retried with backoff).
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

struct Live {
    namespaces: Store<Namespace>,
    config_maps: Store<ConfigMap>,
    queue: Arc<WorkQueue>,
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
        let mut counts = BundleCounts {
            synced: live.synced.load(Ordering::Acquire),
            pending: live.queue.pending(),
            errors: live.queue.failing(),
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
            }
        }
        Some(counts)
    }
}

fn wants_bundle(namespace: &Namespace, selector: &Selector) -> bool {
    let terminating = namespace.metadata.deletion_timestamp.is_some()
        || namespace
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Terminating");
    !terminating && selector.matches(namespace.metadata.labels.as_ref())
}

/// Runs until dropped (leadership lost, cluster removed) or a watch ends for good.
pub async fn run(
    client: kube::Client,
    settings: Settings,
    mut roots: watch::Receiver<Arc<RootBundle>>,
    view: Arc<BundleView>,
) -> anyhow::Result<()> {
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let (config_maps, cm_writer) = reflector::store::<ConfigMap>();
    let queue = Arc::new(WorkQueue::default());
    let synced = Arc::new(AtomicBool::new(false));
    if let Ok(mut live) = view.live.lock() {
        *live = Some(Live {
            namespaces: namespaces.clone(),
            config_maps: config_maps.clone(),
            queue: queue.clone(),
            selector: settings.selector.clone(),
            roots: roots.clone(),
            synced: synced.clone(),
        });
    }
    let _clear_view = ClearOnDrop {
        view: view.clone(),
        queue: queue.clone(),
    };
    let cluster = settings.cluster.clone();

    // Backoff between failed re-lists: a missing permission or a dead remote must not become
    // a hot loop that starves the other clusters.
    let ns_watch = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let ns_events = {
        let queue = queue.clone();
        let cluster = cluster.clone();
        reflector::reflector(ns_writer, ns_watch).for_each(move |event| {
            match event {
                Ok(watcher::Event::Apply(ns) | watcher::Event::InitApply(ns)) => {
                    queue.add(&ns.name_any())
                }
                Ok(watcher::Event::Delete(ns)) => queue.forget(&ns.name_any()),
                Ok(_) => {}
                Err(error) => tracing::warn!(%cluster, %error, "Namespace watch interrupted"),
            }
            std::future::ready(())
        })
    };
    let cm_watch = watcher(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP_NAME}")),
    )
    .default_backoff();
    let cm_events = {
        let queue = queue.clone();
        let cluster = cluster.clone();
        reflector::reflector(cm_writer, cm_watch).for_each(move |event| {
            match event {
                Ok(
                    watcher::Event::Apply(cm)
                    | watcher::Event::InitApply(cm)
                    | watcher::Event::Delete(cm),
                ) => {
                    if let Some(namespace) = cm.namespace() {
                        queue.add(&namespace);
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%cluster, %error, "ConfigMap watch interrupted"),
            }
            std::future::ready(())
        })
    };

    let work = async {
        // Nothing is written from half-listed caches.
        tokio::try_join!(
            namespaces.wait_until_ready(),
            config_maps.wait_until_ready()
        )?;
        synced.store(true, Ordering::Release);
        view.syncs.send_modify(|n| *n += 1);
        tracing::info!(%cluster, namespaces = namespaces.len(), "trust bundle caches synced; reconciling every namespace");
        let enqueue_all = || {
            for namespace in namespaces.state() {
                queue.add(&namespace.name_any());
            }
        };
        enqueue_all();
        roots.mark_unchanged();
        let current_roots = roots.clone();
        let workers = futures_util::future::join_all((0..settings.workers.max(1)).map(|_| {
            worker(
                client.clone(),
                &settings,
                &queue,
                &namespaces,
                &config_maps,
                &current_roots,
            )
        }));
        let triggers = async {
            let mut resync = tokio::time::interval(RESYNC_PERIOD);
            resync.tick().await;
            loop {
                tokio::select! {
                    changed = roots.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        tracing::info!(%cluster, "trust roots changed; updating every namespace");
                        enqueue_all();
                    }
                    _ = resync.tick() => enqueue_all(),
                }
            }
        };
        tokio::select! {
            _ = workers => {}
            _ = triggers => {}
        }
        anyhow::Ok(())
    };
    tokio::select! {
        _ = ns_events => anyhow::bail!("the Namespace watch of cluster {cluster} ended"),
        _ = cm_events => anyhow::bail!("the ConfigMap watch of cluster {cluster} ended"),
        result = work => result,
    }
}

/// Takes this run out of the view when it ends, unless a newer run (a new kubeconfig's) has
/// already put itself there.
struct ClearOnDrop {
    view: Arc<BundleView>,
    queue: Arc<WorkQueue>,
}

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        if let Ok(mut live) = self.view.live.lock()
            && live
                .as_ref()
                .is_some_and(|l| Arc::ptr_eq(&l.queue, &self.queue))
        {
            *live = None;
        }
    }
}

async fn worker(
    client: kube::Client,
    settings: &Settings,
    queue: &Arc<WorkQueue>,
    namespaces: &Store<Namespace>,
    config_maps: &Store<ConfigMap>,
    roots: &watch::Receiver<Arc<RootBundle>>,
) {
    loop {
        let name = queue.next().await;
        let pem = roots.borrow().pem().to_owned();
        let outcome = reconcile(&client, &name, &pem, settings, namespaces, config_maps).await;
        let result = match &outcome {
            Ok(Outcome::Unchanged) => "unchanged",
            Ok(Outcome::Skipped) => "skipped",
            Ok(Outcome::Written) => "written",
            Ok(Outcome::Stale) => "stale",
            Err(_) => "error",
        };
        settings.metrics.reconciled(&settings.cluster, result);
        match outcome {
            Ok(_) => queue.done(&name),
            Err(error) => {
                let retry_in = queue.retry_later(&name);
                tracing::warn!(cluster = %settings.cluster, namespace = %name, %error, ?retry_in, "trust bundle not written");
            }
        }
    }
}

enum Outcome {
    Unchanged,
    Skipped,
    Written,
    /// The cache was behind (the object exists after all, changed, or is gone): its watch
    /// event queues the namespace again, so this is no failure to back off from.
    Stale,
}

async fn reconcile(
    client: &kube::Client,
    name: &str,
    pem: &str,
    settings: &Settings,
    namespaces: &Store<Namespace>,
    config_maps: &Store<ConfigMap>,
) -> Result<Outcome, kube::Error> {
    let Some(namespace) = namespaces.get(&ObjectRef::new(name)) else {
        return Ok(Outcome::Skipped);
    };
    // Excluded namespaces keep whatever they have: we never delete a ConfigMap.
    if !wants_bundle(&namespace, &settings.selector) {
        return Ok(Outcome::Skipped);
    }
    let existing = config_maps.get(&ObjectRef::new(CONFIG_MAP_NAME).within(name));
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), name);
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
            tracing::debug!(cluster = %settings.cluster, namespace = %name, op, "trust bundle written");
            Ok(Outcome::Written)
        }
        Err(kube::Error::Api(e)) if e.code == 409 || (e.code == 404 && op == "update") => {
            Ok(Outcome::Stale)
        }
        // The namespace went away or started terminating meanwhile: nothing to do.
        Err(kube::Error::Api(e))
            if (e.code == 403 || e.code == 404)
                && namespaces
                    .get(&ObjectRef::new(name))
                    .is_none_or(|ns| !wants_bundle(&ns, &settings.selector)) =>
        {
            Ok(Outcome::Skipped)
        }
        Err(error) => Err(error),
    }
}

//! Remote clusters from Secrets labelled `istio/multiCluster: "true"` (istiod's convention):
//! each data key is a cluster ID, its value a kubeconfig. Runs on every replica (all of them
//! review tokens); the bundle work inside each cluster runs only on the leader.
//!
//! An unchanged kubeconfig (same SHA-256) rebuilds nothing. A changed one is built beside the
//! old one and replaces it only once its API server answers and, on the leader, its watches
//! have synced; a broken one is reported and the old one (if any) keeps working. A removed key or Secret stops that cluster. Each cluster
//! runs in its own task, so a slow or broken one never holds up the others.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use super::client::ClientFactory;
use super::{ClusterRegistry, RemoteCluster, kubeconfig};
use crate::bundle::{self, reconciler};
use crate::leader::Leadership;
use crate::pki::chain::RootBundle;
use crate::retry::Delays;
use crate::signer::authn::pod_cache::PodCache;
use crate::signer::authn::signing_keys::SigningKeys;

pub const SECRET_LABEL: &str = "istio/multiCluster=true";
/// How long a new API server may take to answer before it counts as unreachable (and is tried
/// again with backoff).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a changed kubeconfig's watches may take to sync before it takes over anyway.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// What every cluster runs: the leader-only trust-bundle reconciler.
#[derive(Clone)]
pub struct ClusterWork {
    pub leadership: watch::Receiver<Leadership>,
    pub roots: watch::Receiver<Arc<RootBundle>>,
    pub bundle: reconciler::Settings,
}

impl ClusterWork {
    /// The bundle reconciler of one cluster, run while leading; never ends by itself.
    pub async fn run(
        self,
        cluster: String,
        client: kube::Client,
        view: Arc<reconciler::BundleView>,
    ) -> anyhow::Result<()> {
        let mut settings = self.bundle.clone();
        settings.cluster = cluster.clone();
        let roots = self.roots.clone();
        bundle::run_while_leader(self.leadership, "trust bundle reconciler", move || {
            reconciler::run(
                client.clone(),
                settings.clone(),
                roots.clone(),
                view.clone(),
            )
        })
        .await
    }
}

pub struct RemoteSecrets {
    pub namespace: String,
    pub allow_insecure: bool,
    pub registry: ClusterRegistry,
    pub clients: ClientFactory,
    pub work: ClusterWork,
    /// Cache each cluster's pods for the node check (trusted node accounts are configured).
    pub watch_pods: bool,
}

struct Running {
    secret: String,
    hash: [u8; 32],
    _task: AbortOnDropHandle<()>,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

impl RemoteSecrets {
    pub async fn run(self, local: kube::Client) -> anyhow::Result<()> {
        let api: Api<Secret> = Api::namespaced(local, &self.namespace);
        let config = super::client::watch_config().labels(SECRET_LABEL);
        // Backoff between failed re-lists: a missing permission must not become a hot loop.
        let mut events = watcher(api, config).default_backoff().boxed();
        let mut clusters: BTreeMap<String, Running> = BTreeMap::new();
        // The latest version of every Secret, so an ID freed by one can go to another.
        let mut secrets: BTreeMap<String, Secret> = BTreeMap::new();
        let mut listed: Option<BTreeSet<String>> = None;
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => listed = Some(BTreeSet::new()),
                Ok(watcher::Event::InitApply(secret)) => {
                    if let Some(listed) = &mut listed {
                        listed.insert(secret.name_any());
                    }
                    self.apply(&mut clusters, &secret, true);
                    secrets.insert(secret.name_any(), secret);
                }
                Ok(watcher::Event::InitDone) => {
                    // After a re-list: Secrets deleted while the watch was down.
                    if let Some(listed) = listed.take() {
                        let gone: BTreeSet<String> = clusters
                            .values()
                            .map(|r| r.secret.clone())
                            .filter(|s| !listed.contains(s))
                            .collect();
                        for secret in gone {
                            self.remove_secret(&mut clusters, &secret);
                        }
                        secrets.retain(|name, _| listed.contains(name));
                        self.reapply(&mut clusters, &secrets);
                    }
                }
                Ok(watcher::Event::Apply(secret)) => {
                    self.apply(&mut clusters, &secret, true);
                    secrets.insert(secret.name_any(), secret);
                    self.reapply(&mut clusters, &secrets);
                }
                Ok(watcher::Event::Delete(secret)) => {
                    self.remove_secret(&mut clusters, &secret.name_any());
                    secrets.remove(&secret.name_any());
                    self.reapply(&mut clusters, &secrets);
                }
                Err(error) => tracing::warn!(%error, "remote cluster Secret watch interrupted"),
            }
        }
        anyhow::bail!("the remote cluster Secret watch ended")
    }

    /// Starts, restarts or stops the clusters `secret` names. `report` logs the IDs it may not
    /// have (the local one, another Secret's), once per change rather than at every re-apply.
    fn apply(&self, clusters: &mut BTreeMap<String, Running>, secret: &Secret, report: bool) {
        let name = secret.name_any();
        let data = secret.data.clone().unwrap_or_default();
        for (id, kubeconfig) in &data {
            if self.registry.is_local(id) {
                if report {
                    tracing::warn!(secret = %name, cluster = %id, "a remote Secret names the local cluster; ignored");
                }
                continue;
            }
            if let Some(running) = clusters.get(id)
                && running.secret != name
            {
                if report {
                    tracing::error!(secret = %name, cluster = %id, owner = %running.secret, "cluster ID already defined by another Secret; ignored");
                }
                continue;
            }
            let hash = sha256(&kubeconfig.0);
            if clusters.get(id).is_some_and(|r| r.hash == hash) {
                continue;
            }
            let previous = clusters.remove(id).map(|r| r._task);
            tracing::info!(secret = %name, cluster = %id, "remote cluster kubeconfig {}", if previous.is_some() { "changed" } else { "added" });
            let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
            let status = self.registry.remote_status(id);
            let task = tokio::spawn(
                self.run_cluster(
                    id.clone(),
                    generation,
                    status,
                    kubeconfig.0.clone(),
                    previous,
                )
                .instrument(super::cluster_span(id)),
            );
            clusters.insert(
                id.clone(),
                Running {
                    secret: name.clone(),
                    hash,
                    _task: AbortOnDropHandle::new(task),
                },
            );
        }
        let dropped: Vec<String> = clusters
            .iter()
            .filter(|(id, r)| r.secret == name && !data.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in dropped {
            self.remove_cluster(clusters, &id);
        }
    }

    /// Gives IDs freed by a change or a deletion to another Secret that names them. Clusters
    /// already running are unchanged by this, so nothing else is rebuilt.
    fn reapply(
        &self,
        clusters: &mut BTreeMap<String, Running>,
        secrets: &BTreeMap<String, Secret>,
    ) {
        for secret in secrets.values() {
            let claims_free_id = secret.data.as_ref().is_some_and(|data| {
                data.keys()
                    .any(|id| !self.registry.is_local(id) && !clusters.contains_key(id))
            });
            if claims_free_id {
                self.apply(clusters, secret, false);
            }
        }
    }

    fn remove_secret(&self, clusters: &mut BTreeMap<String, Running>, secret: &str) {
        let ids: Vec<String> = clusters
            .iter()
            .filter(|(_, r)| r.secret == secret)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.remove_cluster(clusters, &id);
        }
    }

    fn remove_cluster(&self, clusters: &mut BTreeMap<String, Running>, id: &str) {
        clusters.remove(id);
        self.registry.remove(id);
        tracing::info!(cluster = %id, "remote cluster removed");
    }

    /// One cluster's life: check and build its client, wait until its API server answers,
    /// take over from `previous`, then run its bundle work.
    fn run_cluster(
        &self,
        id: String,
        generation: u64,
        status: Arc<super::ClusterStatus>,
        kubeconfig: Vec<u8>,
        previous: Option<AbortOnDropHandle<()>>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let registry = self.registry.clone();
        let clients = self.clients.clone();
        let allow_insecure = self.allow_insecure;
        let work = self.work.clone();
        let watch_pods = self.watch_pods;
        async move {
            let built = async {
                let config = kubeconfig::parse(&kubeconfig, allow_insecure)?;
                let config = kubeconfig::client_config(config).await?;
                clients
                    .build_with_review_client(config)
                    .map_err(|e| kubeconfig::KubeconfigError::Unusable(format!("{e:#}")))
            };
            let (client, review_client) = match built.await {
                Ok(clients) => clients,
                Err(error) => {
                    tracing::error!(%error, "remote cluster kubeconfig refused");
                    status.set_error(format!("kubeconfig {error}"));
                    // Whatever ran before keeps running until a better kubeconfig comes.
                    let _keep = previous;
                    std::future::pending::<()>().await;
                    return;
                }
            };
            let mut backoff = Delays::default();
            loop {
                match tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()).await {
                    Ok(Ok(_)) => break,
                    Ok(Err(error)) => status.set_error(format!(
                        "API server unreachable: {}",
                        describe_error(&error)
                    )),
                    Err(_) => status.set_error("API server unreachable: timed out"),
                }
                let delay = backoff.next_delay();
                tracing::warn!(retry_in = ?delay, "remote cluster API server not answering");
                tokio::time::sleep(delay).await;
            }
            // The new client's bundle work starts beside the old one's. On the leader, it takes
            // over once its watches have synced (bounded, so a cluster whose watches never
            // sync is still switched to the kubeconfig its Secret now holds).
            let mut syncs = status.bundle.syncs();
            syncs.mark_unchanged();
            let leading = work.leadership.borrow().is_leader;
            let mut bundle_work = AbortOnDropHandle::new(tokio::spawn(
                work.run(id.clone(), client.clone(), status.bundle.clone())
                    .in_current_span(),
            ));
            if previous.is_some()
                && leading
                && tokio::time::timeout(SYNC_TIMEOUT, syncs.changed())
                    .await
                    .is_err()
            {
                tracing::warn!(
                    "the new kubeconfig's watches did not sync in time; switching anyway"
                );
            }
            // Its signing keys, fetched through the review client (authentication's budget,
            // never the Lease's), and kept up to date while this generation runs.
            let signing_keys = SigningKeys::new(review_client.clone(), Some(status.clone()));
            let _keys_task = AbortOnDropHandle::new(tokio::spawn(
                signing_keys.clone().maintain().in_current_span(),
            ));
            registry.register(Arc::new(RemoteCluster {
                id: id.clone(),
                generation,
                client: client.clone(),
                review_client,
                pods: watch_pods.then(|| PodCache::start(client.clone(), &id)),
                signing_keys,
            }));
            // However this task ends (a removal aborts it, even mid-registration), its
            // generation leaves the registry with it.
            let _registered = Deregister {
                registry: registry.clone(),
                id: id.clone(),
                generation,
            };
            status.set_connected();
            drop(previous);
            tracing::info!("remote cluster connected");
            let ended = match (&mut bundle_work).await {
                Ok(Ok(())) => "ended".to_owned(),
                Ok(Err(error)) => format!("{error:#}"),
                Err(error) => error.to_string(),
            };
            tracing::error!(error = %ended, "remote cluster work stopped");
            status.set_error(ended);
        }
    }
}

struct Deregister {
    registry: ClusterRegistry,
    id: String,
    generation: u64,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        self.registry.deregister(&self.id, self.generation);
    }
}

/// An API error for the admin API and logs. Authentication errors are reduced to their kind:
/// with --allow-insecure-kubeconfig an exec plugin's output (maybe a token) is in their text.
fn describe_error(error: &kube::Error) -> String {
    match error {
        kube::Error::Auth(_) => "authentication failed (check the kubeconfig's credentials)".into(),
        kube::Error::Api(status) => format!("{} {}", status.code, status.reason),
        other => other.to_string(),
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

//! The registry of clusters: the local one, and remote ones from kubeconfig Secrets. It serves
//! the TokenReview authenticator (`clusterid` picks the API server that reviews a token) and
//! keeps each cluster's state for the admin API.

pub mod api_metrics;
pub mod client;
pub mod deadline;
pub mod kubeconfig;
pub mod rate_limit;
pub mod remote;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::bundle::reconciler::{BundleCounts, BundleView};
use crate::signer::authn::pod_cache::PodCache;
use crate::signer::authn::signing_keys::SigningKeys;

/// A remote cluster as registered: a new kubeconfig makes a new generation, so nothing cached
/// for the old one (token reviews) is used for the new one.
pub struct RemoteCluster {
    pub id: String,
    pub generation: u64,
    pub client: kube::Client,
    /// For TokenReviews only: its own rate-limit bucket (see `ClientFactory`).
    pub review_client: kube::Client,
    /// For the node check, when trusted node accounts are configured; its watch ends with
    /// this generation.
    pub pods: Option<PodCache>,
    /// Its service-account signing keys, for the local signature check of tokens.
    pub signing_keys: Arc<SigningKeys>,
}

/// Where a caller's credentials are checked.
#[derive(Clone)]
pub enum ClusterTarget {
    Local,
    Remote(Arc<RemoteCluster>),
}

impl std::fmt::Debug for ClusterTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local => f.write_str("Local"),
            Self::Remote(remote) => write!(f, "Remote({}#{})", remote.id, remote.generation),
        }
    }
}

impl PartialEq for ClusterTarget {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Local, Self::Local) => true,
            (Self::Remote(a), Self::Remote(b)) => a.id == b.id && a.generation == b.generation,
            _ => false,
        }
    }
}

impl Eq for ClusterTarget {}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown cluster {0:?}")]
pub struct UnknownCluster(pub String);

/// How a cluster is doing, as the admin API shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    /// Its client is being built or checked.
    Connecting,
    /// Usable for token reviews; no bundle work here (another replica leads).
    Connected,
    /// This replica leads and its bundle caches are listing.
    Syncing,
    /// This replica leads and keeps its bundle in sync.
    Synced,
    /// Its kubeconfig or API server is broken; see `last_error`.
    Error,
}

impl ClusterState {
    pub const ALL: [ClusterState; 5] = [
        Self::Connecting,
        Self::Connected,
        Self::Syncing,
        Self::Synced,
        Self::Error,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Syncing => "syncing",
            Self::Synced => "synced",
            Self::Error => "error",
        }
    }
}

/// One cluster's record for the admin API.
pub struct ClusterStatus {
    pub id: String,
    pub remote: bool,
    /// Set while something is wrong; cleared when it works again.
    last_error: Mutex<Option<String>>,
    connected: std::sync::atomic::AtomicBool,
    pub bundle: Arc<BundleView>,
    token_signature_check: Mutex<Option<String>>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ClusterReport {
    pub id: String,
    pub kind: &'static str,
    pub state: ClusterState,
    pub last_error: Option<String>,
    /// Trust-bundle counts; `null` where this replica does not lead.
    pub bundle: Option<BundleCounts>,
    /// How tokens' signatures are checked: `local` (against the cluster's published keys),
    /// `pending`, or `unavailable: <why>` (TokenReview alone); `null` without TokenReview.
    pub token_signature_check: Option<String>,
}

impl ClusterStatus {
    pub fn new(id: &str, remote: bool) -> Arc<Self> {
        Arc::new(Self {
            id: id.to_owned(),
            remote,
            last_error: Mutex::new(None),
            connected: std::sync::atomic::AtomicBool::new(!remote),
            bundle: Arc::new(BundleView::default()),
            token_signature_check: Mutex::new(None),
        })
    }

    pub fn set_token_signature_check(&self, check: String) {
        if let Ok(mut current) = self.token_signature_check.lock() {
            *current = Some(check);
        }
    }

    pub fn set_error(&self, error: impl Into<String>) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error.into());
        }
    }

    pub fn set_connected(&self) {
        self.connected
            .store(true, std::sync::atomic::Ordering::Release);
        if let Ok(mut last) = self.last_error.lock() {
            *last = None;
        }
    }

    pub fn report(&self) -> ClusterReport {
        let last_error = self.last_error.lock().ok().and_then(|e| e.clone());
        let bundle = self.bundle.counts();
        let connected = self.connected.load(std::sync::atomic::Ordering::Acquire);
        let state = match (&last_error, &bundle, connected) {
            (Some(_), _, _) => ClusterState::Error,
            (None, Some(counts), _) if counts.synced => ClusterState::Synced,
            (None, Some(_), _) => ClusterState::Syncing,
            (None, None, true) => ClusterState::Connected,
            (None, None, false) => ClusterState::Connecting,
        };
        ClusterReport {
            id: self.id.clone(),
            kind: if self.remote { "remote" } else { "local" },
            state,
            last_error,
            bundle,
            token_signature_check: self
                .token_signature_check
                .lock()
                .ok()
                .and_then(|c| c.clone()),
        }
    }
}

struct Inner {
    local_id: String,
    local_aliases: Vec<String>,
    local: Arc<ClusterStatus>,
    remotes: ArcSwap<BTreeMap<String, Arc<RemoteCluster>>>,
    /// Every remote cluster named by a Secret, usable or not.
    statuses: Mutex<BTreeMap<String, Arc<ClusterStatus>>>,
}

#[derive(Clone)]
pub struct ClusterRegistry {
    inner: Arc<Inner>,
}

impl ClusterRegistry {
    pub fn new(local_id: impl Into<String>) -> Self {
        Self::with_aliases(local_id, Vec::new())
    }

    /// The local cluster also answers to `aliases` (in the `clusterid` header only).
    pub fn with_aliases(local_id: impl Into<String>, aliases: Vec<String>) -> Self {
        let local_id = local_id.into();
        Self {
            inner: Arc::new(Inner {
                local: ClusterStatus::new(&local_id, false),
                local_id,
                local_aliases: aliases,
                remotes: ArcSwap::from_pointee(BTreeMap::new()),
                statuses: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    pub fn local_id(&self) -> &str {
        &self.inner.local_id
    }

    /// The local cluster's ID or one of its aliases.
    pub fn is_local(&self, id: &str) -> bool {
        id == self.inner.local_id || self.inner.local_aliases.iter().any(|a| a == id)
    }

    pub fn local_status(&self) -> Arc<ClusterStatus> {
        self.inner.local.clone()
    }

    /// Resolves the `clusterid` request header: empty or the local ID means the local cluster;
    /// a registered remote means its API server; anything else is unknown.
    pub fn resolve(&self, cluster_id: &str) -> Result<ClusterTarget, UnknownCluster> {
        if cluster_id.is_empty() || self.is_local(cluster_id) {
            return Ok(ClusterTarget::Local);
        }
        match self.inner.remotes.load().get(cluster_id) {
            Some(remote) => Ok(ClusterTarget::Remote(remote.clone())),
            None => Err(UnknownCluster(cluster_id.to_owned())),
        }
    }

    /// Makes `remote` the one its ID resolves to (replacing any older generation).
    pub fn register(&self, remote: Arc<RemoteCluster>) {
        self.inner.remotes.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            next.insert(remote.id.clone(), remote.clone());
            next
        });
    }

    /// Undoes `register` of this generation only: a newer one stays.
    pub fn deregister(&self, id: &str, generation: u64) {
        self.inner.remotes.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            if next.get(id).is_some_and(|r| r.generation == generation) {
                next.remove(id);
            }
            next
        });
    }

    /// Forgets `id` entirely: it resolves to nothing and leaves the admin API.
    pub fn remove(&self, id: &str) {
        self.inner.remotes.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            next.remove(id);
            next
        });
        if let Ok(mut statuses) = self.inner.statuses.lock() {
            statuses.remove(id);
        }
    }

    /// The status record of remote `id`, created on first use.
    pub fn remote_status(&self, id: &str) -> Arc<ClusterStatus> {
        match self.inner.statuses.lock() {
            Ok(mut statuses) => statuses
                .entry(id.to_owned())
                .or_insert_with(|| ClusterStatus::new(id, true))
                .clone(),
            Err(_) => ClusterStatus::new(id, true),
        }
    }

    /// Every cluster, local first, for the admin API.
    pub fn reports(&self) -> Vec<ClusterReport> {
        let mut reports = vec![self.inner.local.report()];
        if let Ok(statuses) = self.inner.statuses.lock() {
            reports.extend(statuses.values().map(|s| s.report()));
        }
        reports
    }
}

/// The span of every task that works on one cluster: its log lines carry `cluster=<id>`
/// without each naming it.
pub fn cluster_span(id: &str) -> tracing::Span {
    tracing::info_span!("cluster", cluster = %id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_local_ids_resolve_locally_and_others_are_unknown() {
        let registry = ClusterRegistry::new("Kubernetes");
        assert_eq!(registry.resolve(""), Ok(ClusterTarget::Local));
        assert_eq!(registry.resolve("Kubernetes"), Ok(ClusterTarget::Local));
        assert_eq!(
            registry.resolve("kubernetes"),
            Err(UnknownCluster("kubernetes".into()))
        );
        assert_eq!(
            registry.resolve("remote-1"),
            Err(UnknownCluster("remote-1".into()))
        );
    }

    #[test]
    fn aliases_of_the_local_cluster_resolve_locally() {
        let registry = ClusterRegistry::with_aliases("primary", vec!["Kubernetes".into()]);
        assert_eq!(registry.resolve("Kubernetes"), Ok(ClusterTarget::Local));
        assert_eq!(registry.resolve("primary"), Ok(ClusterTarget::Local));
        assert!(registry.resolve("other").is_err());
        assert!(registry.is_local("Kubernetes") && !registry.is_local("other"));
    }

    #[test]
    fn a_status_reports_error_until_connected_again() {
        let status = ClusterStatus::new("remote-1", true);
        assert_eq!(status.report().state, ClusterState::Connecting);
        status.set_error("broken kubeconfig");
        let report = status.report();
        assert_eq!(report.state, ClusterState::Error);
        assert_eq!(report.last_error.as_deref(), Some("broken kubeconfig"));
        status.set_connected();
        assert_eq!(status.report().state, ClusterState::Connected);
        assert_eq!(status.report().kind, "remote");
    }
}

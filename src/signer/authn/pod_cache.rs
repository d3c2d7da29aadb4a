//! One cluster's pods as the node check (`node.rs`) needs them, from one all-namespace watch,
//! so that a ztunnel restart (every pod of its node asking at once) reads memory, not the API
//! server. Started only when trusted node accounts are configured; the watch stops when the
//! last clone of the cache is dropped (a remote cluster's goes with its registry entry).
//!
//! It keeps a few facts per pod (`PodFacts`), not the Pod: containers, volumes,
//! managedFields and most of the status are nearly all of a pod's bytes, and the check reads
//! none of them. Its own index (live pods by node, namespace and service account) answers "is
//! a live pod of ns/sa on node N" in one hash lookup; kube-runtime's `Store` has no index, so
//! every check would scan every pod of the cluster.
//!
//! Staleness: the cache is as fresh as the watch (milliseconds behind the API server while it
//! runs). Until its first list is complete it answers nothing, and `node.rs` reads the API.
//! After a watch error it answers nothing either until events flow again (or a re-list is
//! complete): a watch refused after the list would otherwise leave a frozen snapshot that
//! still counts pods deleted since. A cache that misses a new pod costs a LIST.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Unknown, or not set yet.
    Other,
}

/// What the node check reads of a pod, from the API or from the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: Option<String>,
    pub service_account: Option<String>,
    pub node: Option<String>,
    pub phase: Phase,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

impl PodFacts {
    pub fn of(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let phase = match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Pending") => Phase::Pending,
            Some("Running") => Phase::Running,
            Some("Succeeded") => Phase::Succeeded,
            Some("Failed") => Phase::Failed,
            _ => Phase::Other,
        };
        Self {
            uid: pod.metadata.uid.clone(),
            service_account: spec.and_then(|s| s.service_account_name.clone()),
            node: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            phase,
            deleting: pod.metadata.deletion_timestamp.is_some(),
        }
    }

    /// Counts as a pod on the node (`node.rs`): Pending or Running, not being deleted. A pod
    /// with no phase yet is not counted: the API server sets Pending on creation.
    pub fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Pending | Phase::Running) && !self.deleting
    }

    /// All its containers have stopped for good.
    pub fn has_terminated(&self) -> bool {
        matches!(self.phase, Phase::Succeeded | Phase::Failed)
    }
}

/// (namespace, name)
type PodKey = (String, String);
/// (node, namespace, service account)
type NodeKey = (String, String, String);

#[derive(Default)]
struct Index {
    /// The first full list has been applied.
    synced: bool,
    /// The watch failed and has delivered nothing since: the cache may be frozen (a watch
    /// refused after the list, e.g. for want of `watch` rights, is retried for ever without a
    /// new list), so it answers nothing until events flow again.
    interrupted: bool,
    pods: HashMap<PodKey, PodFacts>,
    /// Names of the live pods, by where they run and as whom.
    live: HashMap<NodeKey, BTreeSet<String>>,
    /// Pods of a (re-)list in progress; they replace `pods` once it is complete.
    relisting: Option<HashMap<PodKey, PodFacts>>,
}

fn node_key(namespace: &str, facts: &PodFacts) -> Option<NodeKey> {
    match (&facts.node, &facts.service_account) {
        (Some(node), Some(sa)) if facts.is_live() => {
            Some((node.clone(), namespace.to_owned(), sa.clone()))
        }
        _ => None,
    }
}

fn key_of(pod: &Pod) -> Option<PodKey> {
    Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?))
}

impl Index {
    /// The cache answers: listed, and not cut off from its watch.
    fn answers(&self) -> bool {
        self.synced && !self.interrupted
    }

    fn apply(&mut self, event: watcher::Event<Pod>) {
        // Events flow again; a re-list is trusted once it is complete.
        if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
            self.interrupted = false;
        }
        match event {
            watcher::Event::Init => self.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                let Some(key) = key_of(&pod) else { return };
                match &mut self.relisting {
                    Some(listed) => {
                        listed.insert(key, PodFacts::of(&pod));
                    }
                    None => self.upsert(key, PodFacts::of(&pod)),
                }
            }
            watcher::Event::InitDone => {
                if let Some(listed) = self.relisting.take() {
                    self.pods = listed;
                    self.live.clear();
                    for ((namespace, name), facts) in &self.pods {
                        if let Some(node_key) = node_key(namespace, facts) {
                            self.live.entry(node_key).or_default().insert(name.clone());
                        }
                    }
                }
                self.synced = true;
            }
            watcher::Event::Apply(pod) => {
                if let Some(key) = key_of(&pod) {
                    self.upsert(key, PodFacts::of(&pod));
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(key) = key_of(&pod) {
                    self.remove(&key);
                }
            }
        }
    }

    fn upsert(&mut self, key: PodKey, facts: PodFacts) {
        self.remove(&key);
        if let Some(node_key) = node_key(&key.0, &facts) {
            self.live.entry(node_key).or_default().insert(key.1.clone());
        }
        self.pods.insert(key, facts);
    }

    fn remove(&mut self, key: &PodKey) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        if let Some(node_key) = node_key(&key.0, &old)
            && let Some(names) = self.live.get_mut(&node_key)
        {
            names.remove(&key.1);
            if names.is_empty() {
                self.live.remove(&node_key);
            }
        }
    }
}

#[derive(Clone)]
pub struct PodCache {
    index: Arc<RwLock<Index>>,
    /// The watch; aborted when the last clone goes.
    _watch: Option<Arc<AbortOnDropHandle<()>>>,
}

impl PodCache {
    /// Watches every pod of the cluster `client` reaches; `cluster` names it in the logs.
    pub fn start(client: kube::Client, cluster: &str) -> Self {
        let index = Arc::new(RwLock::new(Index::default()));
        let task = tokio::spawn(
            watch(client, index.clone()).instrument(crate::cluster::cluster_span(cluster)),
        );
        Self {
            index,
            _watch: Some(Arc::new(AbortOnDropHandle::new(task))),
        }
    }

    /// The pod `namespace/name`; `None` when unknown or before the first list is complete.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        let index = self.index.read().ok()?;
        if !index.answers() {
            return None;
        }
        index
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// A live pod of `namespace/service_account` is on `node`. False before the first list is
    /// complete.
    pub fn has_live_pod(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        let key = (
            node.to_owned(),
            namespace.to_owned(),
            service_account.to_owned(),
        );
        self.index
            .read()
            .is_ok_and(|index| index.answers() && index.live.contains_key(&key))
    }

    pub fn is_synced(&self) -> bool {
        self.index.read().is_ok_and(|index| index.answers())
    }

    /// A cache fed by hand, without a watch.
    #[cfg(test)]
    pub(crate) fn fed(events: impl IntoIterator<Item = watcher::Event<Pod>>) -> Self {
        let cache = Self {
            index: Arc::default(),
            _watch: None,
        };
        cache.feed(events);
        cache
    }

    #[cfg(test)]
    fn interrupt(&self) {
        self.index.write().unwrap().interrupted = true;
    }

    #[cfg(test)]
    fn feed(&self, events: impl IntoIterator<Item = watcher::Event<Pod>>) {
        let mut index = self.index.write().unwrap();
        for event in events {
            index.apply(event);
        }
    }
}

async fn watch(client: kube::Client, index: Arc<RwLock<Index>>) {
    // Backoff between failed (re-)lists: a missing permission or a dead remote cluster must
    // not become a hot loop.
    let mut events = watcher(
        Api::<Pod>::all(client),
        crate::cluster::client::watch_config(),
    )
    .default_backoff()
    .boxed();
    let mut synced = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                let done = matches!(event, watcher::Event::InitDone);
                let Ok(mut index) = index.write() else {
                    tracing::error!("pod cache lock poisoned; the node check reads the API");
                    return;
                };
                index.apply(event);
                if done && !synced {
                    synced = true;
                    tracing::info!(pods = index.pods.len(), "pod cache synced");
                }
            }
            Err(error) => {
                if let Ok(mut index) = index.write() {
                    index.interrupted = true;
                }
                tracing::warn!(%error, "pod watch interrupted; the node check reads the API until it resumes");
            }
        }
    }
    // Never by kube-runtime's design; if it did, a frozen cache must not answer.
    if let Ok(mut index) = index.write() {
        index.synced = false;
    }
    tracing::error!("the pod watch ended; the node check reads the API");
}

#[cfg(test)]
mod tests {
    use super::*;
    use watcher::Event;

    fn pod(name: &str, sa: &str, node: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
            "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn listed(pods: Vec<Pod>) -> Vec<Event<Pod>> {
        let mut events = vec![Event::Init];
        events.extend(pods.into_iter().map(Event::InitApply));
        events.push(Event::InitDone);
        events
    }

    #[test]
    fn answers_nothing_until_the_first_list_is_complete() {
        let cache = PodCache::fed([
            Event::Init,
            Event::InitApply(pod("a", "web", "n1", "Running")),
        ]);
        assert!(!cache.is_synced());
        assert_eq!(cache.pod("ns", "a"), None);
        assert!(!cache.has_live_pod("n1", "ns", "web"));
        cache.feed([Event::InitDone]);
        assert!(cache.is_synced());
        assert_eq!(cache.pod("ns", "a").unwrap().uid.as_deref(), Some("uid-a"));
        assert!(cache.has_live_pod("n1", "ns", "web"));
    }

    #[test]
    fn answers_nothing_after_a_watch_error_until_events_flow_again() {
        let cache = PodCache::fed(listed(vec![pod("a", "web", "n1", "Running")]));
        assert!(cache.has_live_pod("n1", "ns", "web"));
        // Frozen: a pod deleted meanwhile must not count.
        cache.interrupt();
        assert!(!cache.has_live_pod("n1", "ns", "web"));
        assert_eq!(cache.pod("ns", "a"), None);
        cache.feed([Event::Apply(pod("b", "db", "n1", "Running"))]);
        assert!(cache.has_live_pod("n1", "ns", "web"), "resumed");
        // Interrupted again, then re-listed: only the complete list answers.
        cache.interrupt();
        cache.feed([
            Event::Init,
            Event::InitApply(pod("b", "db", "n1", "Running")),
        ]);
        assert!(!cache.has_live_pod("n1", "ns", "db"), "a half re-list");
        cache.feed([Event::InitDone]);
        assert!(cache.has_live_pod("n1", "ns", "db"));
        assert!(
            !cache.has_live_pod("n1", "ns", "web"),
            "gone from the new list"
        );
    }

    #[test]
    fn indexes_only_live_pods_by_node_namespace_and_account() {
        let cache = PodCache::fed(listed(vec![
            pod("a", "web", "n1", "Running"),
            pod("b", "db", "n1", "Succeeded"),
            pod("c", "api", "n2", "Pending"),
        ]));
        assert!(cache.has_live_pod("n1", "ns", "web"));
        assert!(
            !cache.has_live_pod("n1", "ns", "db"),
            "Succeeded is not live"
        );
        assert!(!cache.has_live_pod("n1", "ns", "api"), "on another node");
        assert!(
            !cache.has_live_pod("n2", "other", "api"),
            "another namespace"
        );
        assert!(cache.has_live_pod("n2", "ns", "api"));
        // The finished pod is still known, for a caller check.
        assert!(cache.pod("ns", "b").unwrap().has_terminated());
    }

    #[test]
    fn follows_updates_and_deletions() {
        let cache = PodCache::fed(listed(vec![
            pod("a", "web", "n1", "Running"),
            pod("b", "web", "n1", "Running"),
        ]));
        cache.feed([Event::Apply(pod("a", "web", "n1", "Failed"))]);
        assert!(cache.has_live_pod("n1", "ns", "web"), "b still runs");
        let mut leaving = pod("b", "web", "n1", "Running");
        leaving.metadata.deletion_timestamp =
            Some(serde_json::from_value("2026-01-01T00:00:00Z".into()).unwrap());
        cache.feed([Event::Apply(leaving.clone())]);
        assert!(!cache.has_live_pod("n1", "ns", "web"), "b is being deleted");
        cache.feed([Event::Delete(leaving)]);
        assert_eq!(cache.pod("ns", "b"), None);
        cache.feed([Event::Apply(pod("b", "web", "n2", "Pending"))]);
        assert!(cache.has_live_pod("n2", "ns", "web"));
        assert!(!cache.has_live_pod("n1", "ns", "web"));
    }

    #[test]
    fn a_relist_replaces_what_it_no_longer_lists_and_keeps_answering_meanwhile() {
        let cache = PodCache::fed(listed(vec![
            pod("gone", "web", "n1", "Running"),
            pod("kept", "db", "n1", "Running"),
        ]));
        cache.feed([
            Event::Init,
            Event::InitApply(pod("kept", "db", "n1", "Running")),
        ]);
        assert!(
            cache.has_live_pod("n1", "ns", "web"),
            "the old state until the list ends"
        );
        cache.feed([Event::InitDone]);
        assert!(!cache.has_live_pod("n1", "ns", "web"));
        assert_eq!(cache.pod("ns", "gone"), None);
        assert!(cache.has_live_pod("n1", "ns", "db"));
    }
}

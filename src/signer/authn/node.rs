//! The node check of impersonation (ztunnel asking for the identities of the pods on its
//! node), as istiod does it: the caller's own pod must exist with the UID and service account
//! its token names, and a live pod of the requested service account must be on that same
//! node. Both lookups read the pod cache of the cluster the caller named (`pod_cache.rs`,
//! when trusted node accounts are configured) and go to its API server only for what the
//! cache has not seen yet: a caller pod it does not know (or knows with another UID) is read
//! with a GET, and a node where it knows no live pod of the account is listed again, since a
//! pod created a moment ago may not have reached the cache.
//!
//! "Live", for the requested service account's pods: Pending or Running, and not being
//! deleted (no `metadata.deletionTimestamp`). A Pending pod already bound to the node is
//! one ztunnel must serve (it fetches the certificate before the containers start); a
//! Succeeded or Failed pod runs nothing any more, and a pod being deleted is on its way out:
//! neither is a reason to hand its identity to the node.
//!
//! DECISION, for the caller's own pod: it must not have terminated (Succeeded or Failed: no
//! container of it runs, so a call bearing its token comes from a leaked token), but it MAY
//! be being deleted: a Terminating ztunnel keeps serving its node's workloads for its whole
//! grace period (a DaemonSet rolling update replaces it while traffic flows), and those
//! workloads may need certificates until the new ztunnel takes over.

use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;

use super::Caller;
use super::pod_cache::{PodCache, PodFacts};
use crate::cluster::ClusterTarget;
use crate::pki::identity::SpiffeId;

/// A lookup that takes longer means the API server is in trouble: answer Unavailable.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeCheckError {
    #[error("{0}")]
    Refused(String),
    #[error("node check unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait NodeAuthorizer: Send + Sync {
    /// Ok when `target` has a live pod on the node where `caller`'s pod runs.
    async fn authorize(
        &self,
        cluster: &ClusterTarget,
        caller: &Caller,
        target: &SpiffeId,
    ) -> Result<(), NodeCheckError>;
}

pub struct KubeNodeAuthorizer {
    local: kube::Client,
    local_pods: Option<PodCache>,
}

impl KubeNodeAuthorizer {
    pub fn new(local: kube::Client) -> Self {
        Self {
            local,
            local_pods: None,
        }
    }

    /// Reads the local cluster's pods from `cache` first.
    pub fn with_pod_cache(mut self, cache: PodCache) -> Self {
        self.local_pods = Some(cache);
        self
    }
}

#[async_trait]
impl NodeAuthorizer for KubeNodeAuthorizer {
    async fn authorize(
        &self,
        cluster: &ClusterTarget,
        caller: &Caller,
        target: &SpiffeId,
    ) -> Result<(), NodeCheckError> {
        let refused = |why: String| Err(NodeCheckError::Refused(why));
        let (Some(account), Some(pod_ref)) = (&caller.service_account, &caller.pod) else {
            return refused("the caller's token is not bound to a pod".into());
        };
        let (client, cache) = match cluster {
            ClusterTarget::Local => (&self.local, self.local_pods.as_ref()),
            ClusterTarget::Remote(remote) => (&remote.client, remote.pods.as_ref()),
        };
        // Another UID in the cache may be a pod recreated under the same name that the cache
        // has not seen yet: the API decides.
        let cached = cache
            .and_then(|c| c.pod(&account.namespace, &pod_ref.name))
            .filter(|pod| pod.uid.as_deref() == Some(pod_ref.uid.as_str()));
        let caller_pod = match cached {
            Some(pod) => pod,
            None => {
                let pods: Api<Pod> = Api::namespaced(client.clone(), &account.namespace);
                match lookup(pods.get_opt(&pod_ref.name)).await? {
                    Some(pod) => PodFacts::of(&pod),
                    None => {
                        return refused(format!(
                            "the caller's pod {} does not exist",
                            pod_ref.name
                        ));
                    }
                }
            }
        };
        if caller_pod.uid.as_deref() != Some(pod_ref.uid.as_str()) {
            return refused(format!("the caller's pod {} has another UID", pod_ref.name));
        }
        if caller_pod.has_terminated() {
            return refused(format!("the caller's pod {} has terminated", pod_ref.name));
        }
        if caller_pod.service_account.as_deref() != Some(account.name.as_str()) {
            return refused(format!(
                "the caller's pod {} runs as another service account",
                pod_ref.name
            ));
        }
        let Some(node) = caller_pod.node else {
            return refused(format!("the caller's pod {} is on no node", pod_ref.name));
        };
        let (namespace, service_account) = (target.namespace(), target.service_account());
        if cache.is_some_and(|c| c.has_live_pod(&node, namespace, service_account)) {
            return Ok(());
        }
        // Pods of the requested namespace on that node, filtered by the API server.
        let on_node: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let listed = lookup(on_node.list(&params)).await?;
        let found =
            listed.items.iter().map(PodFacts::of).any(|pod| {
                pod.service_account.as_deref() == Some(service_account) && pod.is_live()
            });
        if found {
            Ok(())
        } else {
            refused(format!(
                "no pod of {namespace}/{service_account} runs on node {node}"
            ))
        }
    }
}

async fn lookup<T>(
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, NodeCheckError> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(NodeCheckError::Unavailable(format!("pod lookup: {error}"))),
        Err(_) => Err(NodeCheckError::Unavailable("pod lookup timed out".into())),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use kube::runtime::watcher::Event;

    use super::*;
    use crate::signer::authn::{AuthMethod, PodRef, ServiceAccount};

    fn pod(phase: Option<&str>, deleting: bool) -> Pod {
        let mut pod = serde_json::json!({
            "metadata": {"name": "p", "namespace": "n"},
            "spec": {"serviceAccountName": "sa", "nodeName": "node", "containers": []},
        });
        if let Some(phase) = phase {
            pod["status"] = serde_json::json!({"phase": phase});
        }
        if deleting {
            pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        }
        serde_json::from_value(pod).unwrap()
    }

    #[test]
    fn only_pending_or_running_pods_not_being_deleted_are_live() {
        let cases = [
            (Some("Pending"), false, true),
            (Some("Running"), false, true),
            (Some("Succeeded"), false, false),
            (Some("Failed"), false, false),
            (Some("Unknown"), false, false),
            (None, false, false),
            (Some("Pending"), true, false),
            (Some("Running"), true, false),
        ];
        for (phase, deleting, live) in cases {
            assert_eq!(
                PodFacts::of(&pod(phase, deleting)).is_live(),
                live,
                "{phase:?} deleting={deleting}"
            );
        }
    }

    #[test]
    fn a_caller_pod_has_terminated_only_when_succeeded_or_failed() {
        let cases = [
            (Some("Pending"), false, false),
            (Some("Running"), false, false),
            // A Terminating ztunnel still serves for its grace period.
            (Some("Running"), true, false),
            (Some("Unknown"), false, false),
            (None, false, false),
            (Some("Succeeded"), false, true),
            (Some("Failed"), false, true),
            (Some("Failed"), true, true),
        ];
        for (phase, deleting, terminated) in cases {
            assert_eq!(
                PodFacts::of(&pod(phase, deleting)).has_terminated(),
                terminated,
                "{phase:?} deleting={deleting}"
            );
        }
    }

    /// A pod of `sa` on `node`, Running.
    fn running(namespace: &str, name: &str, uid: &str, sa: &str, node: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    /// An API server that answers a GET with `get` (404 when `None`) and a LIST with `list`,
    /// and records every request.
    fn fake_api(get: Option<Pod>, list: Vec<Pod>) -> (kube::Client, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let listing = request
                .uri()
                .query()
                .is_some_and(|q| q.contains("fieldSelector"));
            log.lock()
                .unwrap()
                .push(if listing { "list" } else { "get" }.to_owned());
            let (code, body) = match (&get, listing) {
                (_, true) => (
                    200,
                    serde_json::json!({"apiVersion": "v1", "kind": "PodList",
                        "metadata": {"resourceVersion": "1"}, "items": list}),
                ),
                (Some(pod), false) => (200, serde_json::to_value(pod).unwrap()),
                (None, false) => (
                    404,
                    serde_json::json!({"apiVersion": "v1", "kind": "Status",
                        "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
            };
            let response = http::Response::builder()
                .status(code)
                .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap();
            std::future::ready(Ok::<_, std::convert::Infallible>(response))
        });
        (kube::Client::new(service, "default"), seen)
    }

    fn synced(pods: Vec<Pod>) -> PodCache {
        let mut events = vec![Event::Init];
        events.extend(pods.into_iter().map(Event::InitApply));
        events.push(Event::InitDone);
        PodCache::fed(events)
    }

    fn ztunnel() -> Caller {
        Caller {
            identities: vec!["spiffe://cluster.local/ns/sys/sa/ztunnel".parse().unwrap()],
            service_account: Some(ServiceAccount {
                namespace: "sys".into(),
                name: "ztunnel".into(),
            }),
            pod: Some(PodRef {
                name: "ztunnel-1".into(),
                uid: "uid-z".into(),
            }),
            method: AuthMethod::TokenReview,
        }
    }

    fn web() -> SpiffeId {
        "spiffe://cluster.local/ns/app/sa/web".parse().unwrap()
    }

    async fn check(
        api: (kube::Client, Arc<Mutex<Vec<String>>>),
        cache: PodCache,
    ) -> (Result<(), NodeCheckError>, Vec<String>) {
        let (client, seen) = api;
        let nodes = KubeNodeAuthorizer::new(client).with_pod_cache(cache);
        let result = nodes
            .authorize(&ClusterTarget::Local, &ztunnel(), &web())
            .await;
        let seen = seen.lock().unwrap().clone();
        (result, seen)
    }

    #[tokio::test]
    async fn a_warm_cache_answers_without_reading_the_api() {
        let cache = synced(vec![
            running("sys", "ztunnel-1", "uid-z", "ztunnel", "n1"),
            running("app", "web-1", "uid-w", "web", "n1"),
        ]);
        let (result, seen) = check(fake_api(None, vec![]), cache).await;
        assert_eq!(result, Ok(()));
        assert!(seen.is_empty(), "{seen:?}");
    }

    #[tokio::test]
    async fn a_pod_the_cache_has_not_seen_yet_is_listed_from_the_api() {
        let cache = synced(vec![running("sys", "ztunnel-1", "uid-z", "ztunnel", "n1")]);
        let fresh = running("app", "web-1", "uid-w", "web", "n1");
        let (result, seen) = check(fake_api(None, vec![fresh]), cache).await;
        assert_eq!(result, Ok(()));
        assert_eq!(seen, ["list"]);
    }

    #[tokio::test]
    async fn a_caller_pod_unknown_to_the_cache_or_of_another_uid_is_read_from_the_api() {
        let web = running("app", "web-1", "uid-w", "web", "n1");
        let caller = running("sys", "ztunnel-1", "uid-z", "ztunnel", "n1");
        let recreated = running("sys", "ztunnel-1", "uid-old", "ztunnel", "n1");
        for cache in [synced(vec![web.clone()]), synced(vec![recreated, web])] {
            let (result, seen) = check(fake_api(Some(caller.clone()), vec![]), cache).await;
            assert_eq!(result, Ok(()));
            assert_eq!(seen, ["get"]);
        }
        // Not synced: both are read.
        let unsynced = PodCache::fed([Event::Init]);
        let listed = running("app", "web-1", "uid-w", "web", "n1");
        let (result, seen) = check(fake_api(Some(caller), vec![listed]), unsynced).await;
        assert_eq!(result, Ok(()));
        assert_eq!(seen, ["get", "list"]);
    }

    #[tokio::test]
    async fn the_rules_hold_on_cached_pods_too() {
        let mut finished = running("sys", "ztunnel-1", "uid-z", "ztunnel", "n1");
        finished.status = serde_json::from_value(serde_json::json!({"phase": "Failed"})).unwrap();
        let web = running("app", "web-1", "uid-w", "web", "n1");
        let (result, seen) = check(fake_api(None, vec![]), synced(vec![finished, web])).await;
        assert!(
            matches!(result, Err(NodeCheckError::Refused(_))),
            "{result:?}"
        );
        assert!(
            seen.is_empty(),
            "a cached caller pod is not read again: {seen:?}"
        );

        let caller = running("sys", "ztunnel-1", "uid-z", "ztunnel", "n1");
        let elsewhere = running("app", "web-1", "uid-w", "web", "n2");
        let cache = synced(vec![caller, elsewhere.clone()]);
        let (result, seen) = check(fake_api(None, vec![]), cache).await;
        assert!(
            matches!(result, Err(NodeCheckError::Refused(_))),
            "{result:?}"
        );
        assert_eq!(
            seen,
            ["list"],
            "no live pod on the node in the cache: listed again"
        );
    }
}

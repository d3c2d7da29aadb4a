//! The node check of impersonation (ztunnel asking for the identities of the pods on its
//! node), as istiod does it: the caller's own pod must exist with the UID and service account
//! its token names, and a live pod of the requested service account must be on that same
//! node. Both lookups go to the API server of the cluster the caller named.
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
}

impl KubeNodeAuthorizer {
    pub fn new(local: kube::Client) -> Self {
        Self { local }
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
        let client = match cluster {
            ClusterTarget::Local => self.local.clone(),
            ClusterTarget::Remote(remote) => remote.client.clone(),
        };
        let pods: Api<Pod> = Api::namespaced(client.clone(), &account.namespace);
        let caller_pod = lookup(pods.get_opt(&pod_ref.name)).await?;
        let Some(caller_pod) = caller_pod else {
            return refused(format!("the caller's pod {} does not exist", pod_ref.name));
        };
        if caller_pod.metadata.uid.as_deref() != Some(pod_ref.uid.as_str()) {
            return refused(format!("the caller's pod {} has another UID", pod_ref.name));
        }
        if has_terminated(&caller_pod) {
            return refused(format!("the caller's pod {} has terminated", pod_ref.name));
        }
        let spec = caller_pod.spec.unwrap_or_default();
        if spec.service_account_name.as_deref() != Some(account.name.as_str()) {
            return refused(format!(
                "the caller's pod {} runs as another service account",
                pod_ref.name
            ));
        }
        let Some(node) = spec.node_name.filter(|n| !n.is_empty()) else {
            return refused(format!("the caller's pod {} is on no node", pod_ref.name));
        };
        // Pods of the requested namespace on that node, filtered by the API server.
        let on_node: Api<Pod> = Api::namespaced(client, target.namespace());
        let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let listed = lookup(on_node.list(&params)).await?;
        let found = listed.items.iter().any(|pod| {
            let runs_as = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref());
            runs_as == Some(target.service_account()) && is_live(pod)
        });
        if found {
            Ok(())
        } else {
            refused(format!(
                "no pod of {}/{} runs on node {node}",
                target.namespace(),
                target.service_account()
            ))
        }
    }
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref().and_then(|s| s.phase.as_deref())
}

/// Counts as a pod on the node (module comment): Pending or Running, not being deleted.
/// A pod with no phase yet is not counted: the API server sets Pending on creation.
fn is_live(pod: &Pod) -> bool {
    matches!(phase(pod), Some("Pending" | "Running")) && pod.metadata.deletion_timestamp.is_none()
}

/// All its containers have stopped for good.
fn has_terminated(pod: &Pod) -> bool {
    matches!(phase(pod), Some("Succeeded" | "Failed"))
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
    use super::*;

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
                is_live(&pod(phase, deleting)),
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
                has_terminated(&pod(phase, deleting)),
                terminated,
                "{phase:?} deleting={deleting}"
            );
        }
    }
}

//! The node check of impersonation (ztunnel asking for the identities of the pods on its
//! node), as istiod does it: the caller's own pod must exist with the UID and service account
//! its token names, and a pod of the requested service account, not Failed, must run on that
//! same node. Both lookups go to the API server of the cluster the caller named.

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
            let failed = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Failed");
            runs_as == Some(target.service_account()) && !failed
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

async fn lookup<T>(
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, NodeCheckError> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(NodeCheckError::Unavailable(format!("pod lookup: {error}"))),
        Err(_) => Err(NodeCheckError::Unavailable("pod lookup timed out".into())),
    }
}

//! The registry of clusters whose API servers review tokens. Only the local cluster exists for
//! now; remote clusters from kubeconfig Secrets join it with the multi-cluster bundle work.

pub mod api_metrics;
pub mod client;
pub mod rate_limit;

/// Where a caller's credentials are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterTarget {
    Local,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown cluster {0:?}")]
pub struct UnknownCluster(pub String);

#[derive(Clone, Debug)]
pub struct ClusterRegistry {
    local_id: String,
}

impl ClusterRegistry {
    pub fn new(local_id: impl Into<String>) -> Self {
        Self {
            local_id: local_id.into(),
        }
    }

    pub fn local_id(&self) -> &str {
        &self.local_id
    }

    /// Resolves the `clusterid` request header: empty or the local ID means the local cluster.
    pub fn resolve(&self, cluster_id: &str) -> Result<ClusterTarget, UnknownCluster> {
        if cluster_id.is_empty() || cluster_id == self.local_id {
            Ok(ClusterTarget::Local)
        } else {
            Err(UnknownCluster(cluster_id.to_owned()))
        }
    }
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
}

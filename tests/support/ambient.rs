//! ztunnel's side of impersonation against a real kube-apiserver: what it asks the built-in CA
//! signer of `kube_signer`, and the pod requests that signer makes, from its own
//! `istio_csr_kube_api_requests_total`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use istio_csr_rs::client::Target;
use istio_csr_rs::proto::istio_v1_auth::IstioCertificateRequest;

use super::kube::TestCluster;
pub use super::kube_signer::{Signer, signer};
use super::{eventually, http_get, openmetrics, p256_csr};

/// How long the signer's pod cache may take to sync or to see a change: far more than it
/// needs.
pub const CACHE_WAIT: Duration = Duration::from_secs(30);

/// What ztunnel sends to `target`: a CSR for `identity`, asked for with
/// `ImpersonatedIdentity`.
pub fn impersonation(
    target: &Target,
    token: &str,
    identity: &str,
) -> tonic::Request<IstioCertificateRequest> {
    let (csr, _) = p256_csr(identity);
    target
        .request(
            Some(token),
            IstioCertificateRequest {
                csr,
                validity_duration: 3600,
                metadata: Some(istio_csr_rs::client::metadata(None, Some(identity))),
            },
        )
        .unwrap()
}

/// One impersonation over a connection of its own.
pub async fn impersonate(
    target: &Target,
    token: &str,
    identity: &str,
) -> Result<Vec<String>, tonic::Status> {
    let request = impersonation(target, token, identity);
    let mut client = target.connect().await.unwrap();
    client
        .create_certificate(request)
        .await
        .map(|r| r.into_inner().cert_chain)
}

/// Pod requests the server with admin API `admin` has made so far with `verb` (get, list,
/// watch), any answer, in all its clusters.
pub async fn pod_requests(admin: SocketAddr, verb: &str) -> f64 {
    let (_, body) = http_get(&format!("http://{admin}/metrics")).await;
    openmetrics::parse(&body).sum(
        "istio_csr_kube_api_requests_total",
        &[("resource", "pods"), ("verb", verb)],
    )
}

/// Pod GETs and LISTs so far: what the cache is there to save.
pub async fn pod_reads(admin: SocketAddr) -> (f64, f64) {
    (
        pod_requests(admin, "get").await,
        pod_requests(admin, "list").await,
    )
}

/// Waits until the pod cache answers: an impersonation that reads no pod from the API.
pub async fn until_cache_warm(target: &Target, admin: SocketAddr, token: &str, identity: &str) {
    let warm = eventually(CACHE_WAIT, || async {
        let before = pod_reads(admin).await;
        let signed = impersonate(target, token, identity).await.is_ok();
        signed && pod_reads(admin).await == before
    })
    .await;
    assert!(warm, "the pod cache never answered alone");
}

/// The same, for the local cluster of a `kube_signer::Signer`.
impl Signer {
    pub fn impersonation(
        &self,
        token: &str,
        identity: &str,
    ) -> tonic::Request<IstioCertificateRequest> {
        impersonation(&self.target(), token, identity)
    }

    pub async fn impersonate(
        &self,
        token: &str,
        identity: &str,
    ) -> Result<Vec<String>, tonic::Status> {
        impersonate(&self.target(), token, identity).await
    }

    pub async fn pod_requests(&self, verb: &str) -> f64 {
        pod_requests(self.running.admin_address, verb).await
    }

    pub async fn pod_reads(&self) -> (f64, f64) {
        pod_reads(self.running.admin_address).await
    }

    pub async fn until_cache_warm(&self, token: &str, identity: &str) {
        until_cache_warm(&self.target(), self.running.admin_address, token, identity).await
    }
}

/// A node with a ztunnel pod (account `namespace/ztunnel`) and a signer that trusts it (and
/// has the `extra` flags): the signer and the ztunnel's token.
pub async fn ztunnel_on(
    cluster: &TestCluster,
    namespace: &str,
    node: &str,
    extra: &[&str],
) -> (Signer, String) {
    cluster.namespace(namespace).await;
    cluster.service_account(namespace, "ztunnel").await;
    let pod = cluster.pod(namespace, "ztunnel-1", "ztunnel", node).await;
    let trusted = format!("{namespace}/ztunnel");
    let mut args = vec!["--ca-trusted-node-accounts", &trusted];
    args.extend_from_slice(extra);
    let signer = signer(cluster, &args).await;
    let token = cluster
        .token(namespace, "ztunnel", &["istio-ca"], 3600, Some(&pod))
        .await;
    (signer, token)
}

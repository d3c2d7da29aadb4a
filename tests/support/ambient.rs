//! ztunnel's side of impersonation against a real kube-apiserver: a signer with the built-in
//! CA that reviews tokens and checks nodes there, and the pod requests it makes, from its own
//! `istio_csr_kube_api_requests_total`.
#![allow(dead_code)]

use std::time::Duration;

use clap::Parser;
use istio_csr_rs::app::{self, Hooks, Running};
use istio_csr_rs::client::Target;
use istio_csr_rs::config::{Cli, Command};
use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
use istio_csr_rs::proto::istio_v1_auth::IstioCertificateRequest;

use super::kube::TestCluster;
use super::{
    eventually, http_get, install_crypto_provider, localhost_target, openmetrics, p256_csr,
};

/// How long the signer's pod cache may take to sync or to see a change: far more than it
/// needs.
pub const CACHE_WAIT: Duration = Duration::from_secs(30);

pub struct Signer {
    pub running: Running,
    dir: tempfile::TempDir,
}

/// A signer with the built-in CA that reviews tokens and checks nodes in `cluster`.
pub async fn signer(cluster: &TestCluster, extra: &[&str]) -> Signer {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let root = TestCa::root("ambient root", KeyAlg::EcdsaP256);
    let ca = dir.path().join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    for name in ["ca-cert.pem", "cert-chain.pem", "root-cert.pem"] {
        std::fs::write(ca.join(name), root.cert_pem()).unwrap();
    }
    std::fs::write(ca.join("ca-key.pem"), root.key_pem()).unwrap();
    let ca = ca.to_str().unwrap().to_owned();
    let kubeconfig = cluster.kubeconfig.to_str().unwrap().to_owned();
    let mut argv = vec![
        "istio-csr-rs",
        "serve",
        "--signer",
        "local-ca",
        "--local-ca-dir",
        &ca,
        "--kubeconfig",
        &kubeconfig,
        "--serving-address",
        "127.0.0.1:0",
        "--admin-address",
        "127.0.0.1:0",
        "--serving-certificate-dns-names",
        "localhost",
    ];
    argv.extend_from_slice(extra);
    let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!()
    };
    let running = app::start(*args, Hooks::default()).await.unwrap();
    Signer { running, dir }
}

impl Signer {
    pub fn target(&self) -> Target {
        localhost_target(
            self.running.grpc_address,
            self.dir.path().join("ca/root-cert.pem"),
        )
    }

    /// What ztunnel sends: a CSR for `identity`, asked for with `ImpersonatedIdentity`.
    pub fn impersonation(
        &self,
        token: &str,
        identity: &str,
    ) -> tonic::Request<IstioCertificateRequest> {
        let (csr, _) = p256_csr(identity);
        self.target()
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
        &self,
        token: &str,
        identity: &str,
    ) -> Result<Vec<String>, tonic::Status> {
        let request = self.impersonation(token, identity);
        let mut client = self.target().connect().await.unwrap();
        client
            .create_certificate(request)
            .await
            .map(|r| r.into_inner().cert_chain)
    }

    /// Pod requests the signer has made so far with `verb` (get, list, watch), any answer.
    pub async fn pod_requests(&self, verb: &str) -> f64 {
        let url = format!("http://{}/metrics", self.running.admin_address);
        let (_, body) = http_get(&url).await;
        openmetrics::parse(&body)
            .samples
            .iter()
            .filter(|s| {
                s.name == "istio_csr_kube_api_requests_total"
                    && s.labels.get("resource").is_some_and(|r| r == "pods")
                    && s.labels.get("verb").is_some_and(|v| v == verb)
            })
            .map(|s| s.value)
            .sum()
    }

    /// Pod GETs and LISTs so far: what the cache is there to save.
    pub async fn pod_reads(&self) -> (f64, f64) {
        (
            self.pod_requests("get").await,
            self.pod_requests("list").await,
        )
    }

    /// Waits until the pod cache answers: an impersonation that reads no pod from the API.
    pub async fn until_cache_warm(&self, token: &str, identity: &str) {
        let warm = eventually(CACHE_WAIT, || async {
            let before = self.pod_reads().await;
            let signed = self.impersonate(token, identity).await.is_ok();
            signed && self.pod_reads().await == before
        })
        .await;
        assert!(warm, "the pod cache never answered alone");
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

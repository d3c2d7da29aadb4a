//! A signer with the built-in CA that reviews tokens (and checks nodes) in a test cluster.
#![allow(dead_code)]

use istio_csr_rs::app::{self, Hooks, Running};
use istio_csr_rs::client::Target;

use istio_csr_rs::pki::testing::{KeyAlg, TestCa};

use super::kube::TestCluster;
use super::{install_crypto_provider, localhost_target, request_certificate, serve_args};

pub struct Signer {
    pub running: Running,
    dir: tempfile::TempDir,
}

/// A signer with the built-in CA that reviews tokens and checks nodes in `cluster`, with the
/// `extra` flags.
pub async fn signer(cluster: &TestCluster, extra: &[&str]) -> Signer {
    signer_as(&cluster.kubeconfig, extra).await
}

/// The same, reaching the cluster through `kubeconfig` (e.g. a service account's, to run
/// under its RBAC).
pub async fn signer_as(kubeconfig: &std::path::Path, extra: &[&str]) -> Signer {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let root = TestCa::root("kube test root", KeyAlg::EcdsaP256);
    let ca = dir.path().join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    for name in ["ca-cert.pem", "cert-chain.pem", "root-cert.pem"] {
        std::fs::write(ca.join(name), root.cert_pem()).unwrap();
    }
    std::fs::write(ca.join("ca-key.pem"), root.key_pem()).unwrap();
    let ca = ca.to_str().unwrap().to_owned();
    let kubeconfig = kubeconfig.to_str().unwrap().to_owned();
    let mut flags = vec![
        "--signer",
        "local-ca",
        "--local-ca-dir",
        &ca,
        "--kubeconfig",
        &kubeconfig,
    ];
    flags.extend_from_slice(extra);
    let running = app::start(serve_args(&flags), Hooks::default())
        .await
        .unwrap();
    Signer { running, dir }
}

impl Signer {
    pub fn target(&self) -> Target {
        localhost_target(
            self.running.grpc_address,
            self.dir.path().join("ca/root-cert.pem"),
        )
    }

    /// CreateCertificate for `identity` with `token`, as pilot-agent asks.
    pub async fn create(&self, token: &str, identity: &str) -> Result<Vec<String>, tonic::Status> {
        request_certificate(&self.target(), Some(token), identity).await
    }
}

//! Tier 3: `--signer kube-csr`, the Kubernetes CSR API as the signer, on a real kube-apiserver
//! with a signer stand-in. CertificateSigningRequests are cluster-scoped, so every test's
//! stand-in may answer any test's request: they all sign with the same CAs.

mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::Parser;
use istio_csr_rs::app::{self, Hooks, Running};
use istio_csr_rs::client::Target;
use istio_csr_rs::config::{Cli, Command};
use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
use support::csr_signer::start_csr_signer;
use support::kube::shared;
use support::*;
use tokio_util::task::AbortOnDropHandle;
use tonic::Code;

fn cas() -> &'static (Arc<TestCa>, Arc<TestCa>) {
    static CAS: OnceLock<(Arc<TestCa>, Arc<TestCa>)> = OnceLock::new();
    CAS.get_or_init(|| {
        (
            Arc::new(TestCa::root("kube-csr signer CA", KeyAlg::EcdsaP256)),
            Arc::new(TestCa::root("kube-csr foreign CA", KeyAlg::EcdsaP256)),
        )
    })
}

struct CsrServer {
    running: Running,
    dir: tempfile::TempDir,
    _signer: AbortOnDropHandle<()>,
}

async fn csr_server(namespace: &str, extra: &[&str]) -> CsrServer {
    install_crypto_provider();
    let cluster = shared().await;
    cluster.namespace(namespace).await;
    cluster.service_account(namespace, "web").await;
    let (root, foreign) = cas();
    let signer = start_csr_signer(cluster.client().await, root.clone(), foreign.clone());
    let dir = tempfile::tempdir().unwrap();
    let pinned = dir.path().join("roots.pem");
    std::fs::write(&pinned, root.cert_pem()).unwrap();
    let (pinned, kubeconfig) = (
        pinned.to_str().unwrap().to_owned(),
        cluster.kubeconfig.to_str().unwrap().to_owned(),
    );
    let mut flags = vec![
        "--signer",
        "kube-csr",
        "--root-ca-file",
        &pinned,
        "--kubeconfig",
        &kubeconfig,
        "--leader-election-namespace",
        namespace,
    ];
    if !extra.contains(&"--kube-csr-signer-name") {
        flags.extend(["--kube-csr-signer-name", "example.com/ca"]);
    }
    flags.extend_from_slice(extra);
    let running = app::start(serve_args(&flags), Hooks::default())
        .await
        .unwrap();
    CsrServer {
        running,
        dir,
        _signer: signer,
    }
}

impl CsrServer {
    fn target(&self) -> Target {
        Target {
            timeout: Duration::from_secs(30),
            source_address: None,
            ..localhost_target(self.running.grpc_address, self.dir.path().join("roots.pem"))
        }
    }

    /// CreateCertificate for `namespace/web`, with `CertSigner` metadata when given.
    async fn request(
        &self,
        namespace: &str,
        cert_signer: Option<&str>,
    ) -> Result<Vec<String>, tonic::Status> {
        request_as_web(&self.target(), namespace, cert_signer)
            .await
            .map(|(chain, _)| chain)
    }
}

impl CsrServer {
    /// Every CertificateSigningRequest this server created has been deleted (deletion follows
    /// the answer). Counted by the server itself: other tests' requests come and go meanwhile.
    async fn none_left(&self) -> bool {
        let admin = self.running.admin_address;
        eventually(Duration::from_secs(10), || async {
            let (_, body) = http_get(&format!("http://{admin}/metrics")).await;
            let metrics = openmetrics::parse(&body);
            let count = |verb: &str, code: &str| {
                metrics.value(
                    "istio_csr_kube_api_requests_total",
                    &[
                        ("code", code),
                        ("resource", "certificatesigningrequests"),
                        ("verb", verb),
                    ],
                )
            };
            let created = count("create", "201");
            created > 0.0 && created == count("delete", "200")
        })
        .await
    }
}

#[tokio::test]
async fn issues_through_a_certificate_signing_request_and_deletes_it() {
    let server = csr_server("csr-issue", &[]).await;
    let chain = server.request("csr-issue", None).await.unwrap();
    assert_eq!(
        leaf_identity(&chain).0,
        vec!["spiffe://cluster.local/ns/csr-issue/sa/web"]
    );
    assert_eq!(chain.len(), 2, "leaf, then the pinned root bundle");
    assert!(
        server.none_left().await,
        "CertificateSigningRequests were left behind"
    );
}

/// A signers file naming the stand-in's behaviours as tenant signers `example.com/<name>`,
/// all open to every namespace and trusting the stand-in's CA (`foreign` signs with another).
fn stand_in_signers(dir: &std::path::Path, names: &[&str]) -> String {
    let roots = dir.join("roots.pem");
    let entries: Vec<String> = names
        .iter()
        .map(|name| {
            format!(
                "  - {{name: {name}, namespaces: [\"*\"], rootsFile: {}}}\n",
                roots.display()
            )
        })
        .collect();
    let path = dir.join("signers.yaml");
    std::fs::write(&path, format!("signers:\n{}", entries.concat())).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn cert_signer_metadata_picks_the_signer_and_a_foreign_answer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("roots.pem"), cas().0.cert_pem()).unwrap();
    let signers = stand_in_signers(dir.path(), &["ca", "foreign", "fail"]);
    let server = csr_server(
        "csr-route",
        &[
            "--cert-signer-domain",
            "example.com",
            "--signers-file",
            &signers,
        ],
    )
    .await;
    // CertSigner "ca" -> example.com/ca: signed and trusted.
    server.request("csr-route", Some("ca")).await.unwrap();
    // CertSigner "foreign" -> example.com/foreign: signed by a CA nobody pinned.
    let status = server
        .request("csr-route", Some("foreign"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    // A CertSigner that is not in the table is the caller's mistake.
    for unknown in ["not/one-segment", "other"] {
        let status = server
            .request("csr-route", Some(unknown))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{unknown}");
    }
    // CertSigner "fail" -> the signer marks it Failed: Internal at once, not a timeout.
    let status = server.request("csr-route", Some("fail")).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(server.none_left().await);
}

#[tokio::test]
async fn an_external_denial_is_permission_denied_and_silence_times_out() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("roots.pem"), cas().0.cert_pem()).unwrap();
    let signers = stand_in_signers(dir.path(), &["deny", "slow"]);
    let server = csr_server(
        "csr-deny",
        &[
            "--kube-csr-external-approval",
            // The stand-in approves (as an external approver would) and signs this one.
            "--kube-csr-signer-name",
            "example.com/external",
            "--cert-signer-domain",
            "example.com",
            "--signers-file",
            &signers,
            "--issuance-timeout",
            "2s",
        ],
    )
    .await;
    let status = server.request("csr-deny", Some("deny")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Nobody approves example.com/slow: the wait ends at --issuance-timeout.
    let status = server.request("csr-deny", Some("slow")).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(server.none_left().await);
}

#[tokio::test]
async fn kube_csr_needs_a_signer_name_and_pinned_roots() {
    install_crypto_provider();
    let cluster = shared().await;
    let kubeconfig = cluster.kubeconfig.to_str().unwrap().to_owned();
    for (extra, expected) in [
        (vec![], "--kube-csr-signer-name"),
        (
            vec!["--kube-csr-signer-name", "nodomain"],
            "<domain>/<name>",
        ),
        (
            vec!["--kube-csr-signer-name", "example.com/ca"],
            "--root-ca-file",
        ),
        (
            vec![
                "--kube-csr-signer-name",
                "example.com/ca",
                "--root-ca-file",
                "/nonexistent",
                "--max-client-certificate-duration",
                "5m",
            ],
            "at least 10m",
        ),
    ] {
        let mut argv = vec![
            "istio-csr-rs",
            "serve",
            "--signer",
            "kube-csr",
            "--kubeconfig",
            &kubeconfig,
        ];
        argv.extend(extra);
        let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
            unreachable!()
        };
        let error = match app::start(*args, Hooks::default()).await {
            Ok(_) => panic!("started"),
            Err(e) => format!("{e:#}"),
        };
        assert!(error.contains(expected), "{error}");
    }
}

#[tokio::test]
async fn istiod_tls_comes_through_the_csr_api_too() {
    let ns = "csr-istiod";
    let server = csr_server(
        ns,
        &[
            "--istiod-cert-enabled",
            "--istiod-cert-namespace",
            ns,
            "--multicluster-secret-namespace",
            ns,
        ],
    )
    .await;
    let api: ::kube::Api<k8s_openapi::api::core::v1::Secret> =
        ::kube::Api::namespaced(shared().await.client().await, ns);
    let secret = tokio::time::timeout(
        Duration::from_secs(60),
        ::kube::runtime::wait::await_condition(
            api,
            "istiod-tls",
            ::kube::runtime::wait::conditions::is_created(),
        ),
    )
    .await
    .expect("istiod-tls never written")
    .unwrap()
    .unwrap();
    let data = secret.data.unwrap();
    let chain = istio_csr_rs::pki::pem::parse_certificates(&data["tls.crt"].0).unwrap();
    let roots =
        istio_csr_rs::pki::chain::RootBundle::from_certs(vec![cas().0.cert.clone()]).unwrap();
    istio_csr_rs::pki::chain::verify_path(
        &chain[0],
        &chain[1..],
        &roots,
        rustls_pki_types::UnixTime::now(),
    )
    .expect("signed by the CSR API's signer, verified against the pinned root");
    assert_eq!(data["ca.crt"].0, roots.pem().as_bytes());
    drop(server);
}

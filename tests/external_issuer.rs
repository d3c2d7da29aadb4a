//! What the signer does with an external issuer's answers, through the real gRPC stack: every
//! failure maps to its documented code (README, "Status codes"), and a chain that does not
//! verify against the pinned roots (a hijacked signer) never reaches the client.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use istio_csr_rs::pki::leaf;
use istio_csr_rs::pki::pem;
use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
use istio_csr_rs::signer::issuer::{IssueError, IssueRequest, Issued};
use support::*;
use time::OffsetDateTime;
use tonic::Code;

async fn call(server: &Server) -> Result<Vec<String>, tonic::Status> {
    server.request_default().await
}

#[tokio::test]
async fn maps_issuer_failures_to_their_protocol_codes() {
    let cases = [
        (IssueError::NotReady("no issuer".into()), Code::Unavailable),
        (
            IssueError::unavailable("api server down"),
            Code::Unavailable,
        ),
        (IssueError::Timeout, Code::DeadlineExceeded),
        (IssueError::Denied("policy".into()), Code::PermissionDenied),
        (IssueError::Failed("vault error".into()), Code::Internal),
    ];
    for (error, code) in cases {
        let hooks = ScriptedIssuer::hooks(move |_| Err(error.clone()));
        let server = Server::start_with(&[], hooks, |_| {}).await;
        let status = call(&server).await.unwrap_err();
        assert_eq!(status.code(), code);
        assert!(!status.message().contains("vault") && !status.message().contains("policy"));
    }
}

/// A leaf for the request's key and identities, signed by `ca`.
fn leaf_for(
    request: &IssueRequest<'_>,
    ca: &TestCa,
    uris: &[String],
) -> rustls_pki_types::CertificateDer<'static> {
    let now = OffsetDateTime::now_utc();
    leaf::sign_workload(
        uris,
        &request.csr.public_key,
        (
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        ),
        &ca.issuer(),
    )
    .unwrap()
}

fn load_ca(data_dir: &Path) -> TestCa {
    let cert = std::fs::read(data_dir.join("ca/ca-cert.pem")).unwrap();
    let key = std::fs::read_to_string(data_dir.join("ca/ca-key.pem")).unwrap();
    TestCa {
        cert: pem::parse_certificates(&cert).unwrap().remove(0),
        key: rcgen::KeyPair::from_pem(&key).unwrap(),
        not_after: OffsetDateTime::now_utc() + Duration::from_secs(86_400),
    }
}

/// Starts a standalone server whose CA is pre-created, so the scripted issuer can use it.
async fn with_real_ca(
    answer: impl Fn(&IssueRequest<'_>, &TestCa) -> Result<Issued, IssueError> + Send + Sync + 'static,
) -> Server {
    let root = Arc::new(TestCa::root("pinned root", KeyAlg::EcdsaP256));
    let for_issuer = root.clone();
    let hooks = ScriptedIssuer::hooks(move |request| answer(request, &for_issuer));
    Server::start_with(&[], hooks, |dir| {
        let ca = dir.join("ca");
        std::fs::create_dir_all(&ca).unwrap();
        for name in ["ca-cert.pem", "cert-chain.pem", "root-cert.pem"] {
            std::fs::write(ca.join(name), root.cert_pem()).unwrap();
        }
        std::fs::write(ca.join("ca-key.pem"), root.key_pem()).unwrap();
    })
    .await
}

#[tokio::test]
async fn answers_an_external_chain_that_verifies_in_istio_order() {
    let intermediate = Arc::new(std::sync::OnceLock::<TestCa>::new());
    let server = with_real_ca(move |request, root| {
        let mid =
            intermediate.get_or_init(|| root.intermediate("vault intermediate", KeyAlg::EcdsaP256));
        let leaf = leaf_for(request, mid, &request.names.uris);
        // Vault-style: the root and a duplicate mixed in.
        Ok(Issued::external(vec![
            leaf,
            root.cert.clone(),
            mid.cert.clone(),
            mid.cert.clone(),
        ]))
    })
    .await;
    let chain = call(&server).await.unwrap();
    assert_eq!(chain.len(), 3, "leaf, one intermediate, root bundle");
    let root = load_ca(&server.data_dir);
    assert_eq!(
        pem::parse_certificates(chain[2].as_bytes()).unwrap(),
        vec![root.cert]
    );
}

#[tokio::test]
async fn refuses_a_chain_from_a_rogue_ca_as_internal() {
    let rogue = Arc::new(TestCa::root("rogue", KeyAlg::EcdsaP256));
    let server = with_real_ca(move |request, _| {
        Ok(Issued::external(vec![
            leaf_for(request, &rogue, &request.names.uris),
            rogue.cert.clone(),
        ]))
    })
    .await;
    assert_eq!(call(&server).await.unwrap_err().code(), Code::Internal);
}

#[tokio::test]
async fn refuses_a_trusted_chain_for_another_identity_as_internal() {
    let server = with_real_ca(|request, root| {
        let other = ["spiffe://cluster.local/ns/kube-system/sa/admin".to_owned()];
        Ok(Issued::external(vec![leaf_for(request, root, &other)]))
    })
    .await;
    assert_eq!(call(&server).await.unwrap_err().code(), Code::Internal);
}

#[tokio::test]
async fn refuses_a_trusted_chain_for_another_key_as_internal() {
    let server = with_real_ca(|request, root| {
        let key = KeyAlg::EcdsaP256.generate();
        let now = OffsetDateTime::now_utc();
        let leaf = leaf::sign_workload(
            &request.names.uris,
            &key,
            (now, now + time::Duration::hours(1)),
            &root.issuer(),
        )
        .unwrap();
        Ok(Issued::external(vec![leaf]))
    })
    .await;
    assert_eq!(call(&server).await.unwrap_err().code(), Code::Internal);
}

#[tokio::test]
async fn refuses_a_trusted_chain_that_outlives_the_granted_lifetime_and_counts_it() {
    // The server grants 1 h (--max-client-certificate-duration); the issuer answers 30 days.
    let server = with_real_ca(|request, root| {
        let now = OffsetDateTime::now_utc();
        let leaf = leaf::sign_workload(
            &request.names.uris,
            &request.csr.public_key,
            (now, now + time::Duration::days(30)),
            &root.issuer(),
        )
        .unwrap();
        Ok(Issued::external(vec![leaf]))
    })
    .await;
    assert_eq!(call(&server).await.unwrap_err().code(), Code::Internal);
    let (_, body) = http_get(&server.admin_url("/metrics")).await;
    let refused = openmetrics::parse(&body).value(
        "istio_csr_issued_chains_refused_total",
        &[("reason", "lifetime")],
    );
    assert_eq!(refused, 1.0);
}

#[tokio::test]
async fn accepts_a_chain_within_the_granted_lifetime_and_the_clock_skew() {
    let server = with_real_ca(|request, root| {
        let now = OffsetDateTime::now_utc();
        // An issuer whose clock runs two minutes ahead.
        let leaf = leaf::sign_workload(
            &request.names.uris,
            &request.csr.public_key,
            (
                now,
                now + time::Duration::hours(1) + time::Duration::minutes(2),
            ),
            &root.issuer(),
        )
        .unwrap();
        Ok(Issued::external(vec![leaf]))
    })
    .await;
    assert!(call(&server).await.is_ok());
}

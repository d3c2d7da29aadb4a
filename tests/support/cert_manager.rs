//! A stand-in for cert-manager (whose Go modules are out of reach here): the
//! CertificateRequest CRD and a CA-issuer fixture that answers requests the way cert-manager's
//! CA issuer with its default approver does. Its behaviour is picked by the issuer name:
//! `ca-issuer` signs, `deny-issuer` denies, `fail-issuer` fails, `slow-issuer` never answers,
//! `foreign-issuer` signs with a CA nobody pinned.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use istio_csr_rs::app::Hooks;
use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
use istio_csr_rs::pki::{leaf, pem};
use istio_csr_rs::signer::issuer::cert_manager::CertificateRequest;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use tokio_util::task::AbortOnDropHandle;

use super::install_crypto_provider;
use super::kube::{TestCluster, shared};

pub async fn install_crd(cluster: &TestCluster) {
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "certificaterequests.cert-manager.io"},
        "spec": {
            "group": "cert-manager.io",
            "scope": "Namespaced",
            "names": {
                "kind": "CertificateRequest", "listKind": "CertificateRequestList",
                "plural": "certificaterequests", "singular": "certificaterequest",
                "shortNames": ["cr"]
            },
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}
            }]
        }
    }))
    .unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(cluster.client().await);
    match api.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("installing the CRD: {e}"),
    }
    let established = super::eventually(Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            api.get("certificaterequests.cert-manager.io")
                .await
                .is_ok_and(|crd| {
                    crd.status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        }
    })
    .await;
    assert!(established, "CRD never established");
}

/// The shared cluster with the CRD, `namespace`, and the fixture answering there with a fresh
/// CA (returned) until the handle is dropped.
pub async fn fixture_in(namespace: &str) -> (Arc<TestCa>, AbortOnDropHandle<()>) {
    install_crypto_provider();
    let cluster = shared().await;
    install_crd(cluster).await;
    cluster.namespace(namespace).await;
    let root = Arc::new(TestCa::root("cert-manager CA", KeyAlg::EcdsaP256));
    let foreign = Arc::new(TestCa::root("foreign CA", KeyAlg::EcdsaP256));
    let fixture = start_fixture(cluster.client().await, namespace, root.clone(), foreign);
    (root, fixture)
}

/// Runs the fixture for one namespace until dropped.
pub fn start_fixture(
    client: kube::Client,
    namespace: &str,
    root: Arc<TestCa>,
    foreign: Arc<TestCa>,
) -> AbortOnDropHandle<()> {
    let api: Api<CertificateRequest> = Api::namespaced(client, namespace);
    AbortOnDropHandle::new(tokio::spawn(async move {
        // Requests are answered concurrently, as cert-manager's workers do, so the fixture is
        // never what a latency measurement measures.
        let workers = Arc::new(tokio::sync::Semaphore::new(64));
        let mut answering = tokio::task::JoinSet::new();
        let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            while answering.try_join_next().is_some() {}
            let (Ok(watcher::Event::Apply(cr)) | Ok(watcher::Event::InitApply(cr))) = event else {
                continue;
            };
            if cr
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some()
            {
                continue;
            }
            let Ok(permit) = workers.clone().acquire_owned().await else {
                break;
            };
            let (api, root, foreign) = (api.clone(), root.clone(), foreign.clone());
            answering.spawn(async move {
                answer(&api, &cr, &root, &foreign).await;
                drop(permit);
            });
        }
    }))
}

async fn answer(
    api: &Api<CertificateRequest>,
    cr: &CertificateRequest,
    root: &TestCa,
    foreign: &TestCa,
) {
    let status = match cr.spec.issuer_ref.name.as_str() {
        // Two issuers of one CA: switching between them must not break trust.
        "ca-issuer" | "second-ca-issuer" => signed(cr, root, root),
        "foreign-issuer" => signed(cr, foreign, foreign),
        "deny-issuer" => serde_json::json!({"conditions": [
            {"type": "Denied", "status": "True", "reason": "PolicyDenied", "message": "not allowed"},
            {"type": "Ready", "status": "False", "reason": "Denied", "message": "denied"}
        ]}),
        "fail-issuer" => serde_json::json!({"conditions": [
            {"type": "Approved", "status": "True", "reason": "Approved"},
            {"type": "Ready", "status": "False", "reason": "Failed", "message": "backend error"}
        ]}),
        _ => return,
    };
    let patch = serde_json::json!({"status": status});
    let _ = api
        .patch_status(
            &cr.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await;
}

fn signed(cr: &CertificateRequest, ca: &TestCa, root: &TestCa) -> serde_json::Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let csr_pem = String::from_utf8(b64.decode(&cr.spec.request).unwrap()).unwrap();
    // Like cert-manager's CA issuer: whatever the CSR asks for (workload URIs, serving DNS).
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
    let seconds: i64 = cr
        .spec
        .duration
        .as_deref()
        .and_then(|d| d.strip_suffix('s'))
        .and_then(|d| d.parse().ok())
        .unwrap_or(3600);
    let now = time::OffsetDateTime::now_utc();
    csr.params.not_before = now - time::Duration::minutes(1);
    csr.params.not_after = now + time::Duration::seconds(seconds);
    csr.params.serial_number = Some(leaf::random_serial());
    csr.params.use_authority_key_identifier_extension = true;
    csr.params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = csr.signed_by(&ca.issuer()).unwrap().der().clone();
    serde_json::json!({
        "conditions": [
            {"type": "Approved", "status": "True", "reason": "cert-manager.io"},
            {"type": "Ready", "status": "True", "reason": "Issued", "message": "issued"}
        ],
        "certificate": b64.encode(pem::encode_certificate(&leaf)),
        "ca": b64.encode(root.cert_pem()),
    })
}

/// A whole server: `serve --signer cert-manager`, TokenReview in the same cluster, the pinned
/// root of the fixture's CA, and its serving certificate obtained through cert-manager too.
pub async fn cert_manager_server(
    namespace: &str,
) -> (
    istio_csr_rs::app::Running,
    tempfile::TempDir,
    Arc<TestCa>,
    AbortOnDropHandle<()>,
) {
    cert_manager_server_with(namespace, true, &[]).await
}

pub async fn cert_manager_server_with(
    namespace: &str,
    pin_root: bool,
    extra: &[&str],
) -> (
    istio_csr_rs::app::Running,
    tempfile::TempDir,
    Arc<TestCa>,
    AbortOnDropHandle<()>,
) {
    let (launched, dir, root, fixture) =
        launch_cert_manager_server(namespace, pin_root, extra, Hooks::default()).await;
    let running = launched.serving().await.unwrap().unwrap();
    (running, dir, root, fixture)
}

/// Like `cert_manager_server_with`, but returns as soon as the admin API is up.
pub async fn launch_cert_manager_server(
    namespace: &str,
    pin_root: bool,
    extra: &[&str],
    hooks: Hooks,
) -> (
    istio_csr_rs::app::Launched,
    tempfile::TempDir,
    Arc<TestCa>,
    AbortOnDropHandle<()>,
) {
    let (root, fixture) = fixture_in(namespace).await;
    let dir = tempfile::tempdir().unwrap();
    // The client always trusts the fixture's root; the server pins it only when asked to.
    let pinned = dir.path().join("roots.pem");
    std::fs::write(&pinned, root.cert_pem()).unwrap();
    let launched = launch_replica(
        namespace,
        pin_root.then_some(pinned.as_path()),
        extra,
        hooks,
    )
    .await;
    (launched, dir, root, fixture)
}

/// Another replica against a fixture already running in `namespace` (started by
/// `launch_cert_manager_server`), pinning `pinned` when given.
pub async fn launch_replica(
    namespace: &str,
    pinned: Option<&Path>,
    extra: &[&str],
    hooks: Hooks,
) -> istio_csr_rs::app::Launched {
    let cluster = shared().await;
    let pinned = pinned.map(|p| p.to_str().unwrap().to_owned());
    let kubeconfig = cluster.kubeconfig.to_str().unwrap().to_owned();
    let mut flags = vec![
        "--signer",
        "cert-manager",
        "--kubeconfig",
        &kubeconfig,
        "--certificate-namespace",
        namespace,
        "--issuer-name",
        "ca-issuer",
    ];
    if let Some(pinned) = &pinned {
        flags.extend(["--root-ca-file", pinned.as_str()]);
    }
    flags.extend_from_slice(extra);
    istio_csr_rs::app::launch(super::serve_args(&flags), hooks)
        .await
        .unwrap()
}

/// A client target for a server from `cert_manager_server`, trusting the fixture's root.
pub fn target_for(
    running: &istio_csr_rs::app::Running,
    dir: &tempfile::TempDir,
) -> istio_csr_rs::client::Target {
    super::localhost_target(running.grpc_address, dir.path().join("roots.pem"))
}

/// A stand-in for tenant issuers in `namespace`: each issuer name of `tenants` signs with its
/// own CA (and reports it as `status.ca`); every other name is left alone, so this runs beside
/// `start_fixture` on the same namespace.
pub fn start_tenant_issuers(
    client: kube::Client,
    namespace: &str,
    tenants: Vec<(String, Arc<TestCa>)>,
) -> AbortOnDropHandle<()> {
    let api: Api<CertificateRequest> = Api::namespaced(client, namespace);
    let tenants = Arc::new(tenants);
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let (Ok(watcher::Event::Apply(cr)) | Ok(watcher::Event::InitApply(cr))) = event else {
                continue;
            };
            if cr
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some()
            {
                continue;
            }
            let Some((_, ca)) = tenants
                .iter()
                .find(|(name, _)| *name == cr.spec.issuer_ref.name)
            else {
                continue;
            };
            let patch = serde_json::json!({"status": signed(&cr, ca, ca)});
            let (api, name) = (api.clone(), cr.name_any());
            tokio::spawn(async move {
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            });
        }
    }))
}

//! A Kubernetes CSR signer stand-in: it answers our CertificateSigningRequests by signer name,
//! as a real signer controller would. `example.com/ca` signs approved requests with `root`,
//! `example.com/external` approves (as an external approver would) and then signs,
//! `example.com/foreign` with a CA nobody pinned, `example.com/fail` marks approved ones
//! Failed, `example.com/deny` denies (as an external approver would), `example.com/slow`
//! never answers.
#![allow(dead_code)]

use std::sync::Arc;

use futures_util::StreamExt;
use istio_csr_rs::pki::testing::TestCa;
use istio_csr_rs::pki::{leaf, pem};
use istio_csr_rs::signer::issuer::kube_csr::REQUEST_LABEL_KEY;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use tokio_util::task::AbortOnDropHandle;

pub fn start_csr_signer(
    client: kube::Client,
    root: Arc<TestCa>,
    foreign: Arc<TestCa>,
) -> AbortOnDropHandle<()> {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    AbortOnDropHandle::new(tokio::spawn(async move {
        let config = watcher::Config::default().labels(&format!("{REQUEST_LABEL_KEY}=true"));
        let mut events = watcher(api.clone(), config).boxed();
        while let Some(event) = events.next().await {
            let (Ok(watcher::Event::Apply(csr)) | Ok(watcher::Event::InitApply(csr))) = event
            else {
                continue;
            };
            let (api, root, foreign) = (api.clone(), root.clone(), foreign.clone());
            tokio::spawn(async move { answer(&api, &csr, &root, &foreign).await });
        }
    }))
}

fn has(csr: &CertificateSigningRequest, type_: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

async fn answer(
    api: &Api<CertificateSigningRequest>,
    csr: &CertificateSigningRequest,
    root: &TestCa,
    foreign: &TestCa,
) {
    let name = csr.name_any();
    let signed = csr
        .status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty());
    if signed || has(csr, "Denied") || has(csr, "Failed") {
        return;
    }
    let approved = has(csr, "Approved");
    let status = match (csr.spec.signer_name.as_str(), approved) {
        ("example.com/ca" | "example.com/external", true) => sign(csr, root),
        ("example.com/external", false) => {
            let approval = serde_json::json!({"status": {"conditions": [{
                "type": "Approved", "status": "True", "reason": "PolicyApproved", "message": "ok"
            }]}});
            let _ = api
                .patch_approval(&name, &PatchParams::default(), &Patch::Merge(&approval))
                .await;
            return;
        }
        ("example.com/foreign", true) => sign(csr, foreign),
        ("example.com/fail", true) => {
            // A merge patch replaces the list: the Approved condition must stay in it.
            let mut conditions = serde_json::to_value(
                csr.status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default(),
            )
            .unwrap();
            conditions.as_array_mut().unwrap().push(serde_json::json!({
                "type": "Failed", "status": "True", "reason": "SignerFailed", "message": "backend error"
            }));
            serde_json::json!({"status": {"conditions": conditions}})
        }
        ("example.com/deny", false) => {
            let denial = serde_json::json!({"status": {"conditions": [{
                "type": "Denied", "status": "True", "reason": "PolicyDenied", "message": "not allowed"
            }]}});
            let _ = api
                .patch_approval(&name, &PatchParams::default(), &Patch::Merge(&denial))
                .await;
            return;
        }
        _ => return,
    };
    if let Err(e) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
    {
        eprintln!("csr signer stand-in: status of {name} not written: {e}");
    }
}

fn sign(csr: &CertificateSigningRequest, ca: &TestCa) -> serde_json::Value {
    let csr_pem = String::from_utf8(csr.spec.request.0.clone()).unwrap();
    let mut params = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
    let seconds = i64::from(csr.spec.expiration_seconds.unwrap_or(3600));
    let now = time::OffsetDateTime::now_utc();
    params.params.not_before = now - time::Duration::minutes(1);
    params.params.not_after = now + time::Duration::seconds(seconds);
    params.params.serial_number = Some(leaf::random_serial());
    params.params.use_authority_key_identifier_extension = true;
    params.params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = params.signed_by(&ca.issuer()).unwrap().der().clone();
    let certificate = pem::encode_certificate(&leaf);
    use base64::Engine as _;
    serde_json::json!({"status": {
        "certificate": base64::engine::general_purpose::STANDARD.encode(certificate),
    }})
}

/// A stand-in for tenant signers: each signer name of `tenants` signs approved requests with
/// its own CA; every other name is left alone (other stand-ins may answer it).
pub fn start_tenant_csr_signers(
    client: kube::Client,
    tenants: Vec<(String, Arc<TestCa>)>,
) -> AbortOnDropHandle<()> {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let tenants = Arc::new(tenants);
    AbortOnDropHandle::new(tokio::spawn(async move {
        let config = watcher::Config::default().labels(&format!("{REQUEST_LABEL_KEY}=true"));
        let mut events = watcher(api.clone(), config).boxed();
        while let Some(event) = events.next().await {
            let (Ok(watcher::Event::Apply(csr)) | Ok(watcher::Event::InitApply(csr))) = event
            else {
                continue;
            };
            let signed = csr
                .status
                .as_ref()
                .and_then(|s| s.certificate.as_ref())
                .is_some_and(|c| !c.0.is_empty());
            if signed || !has(&csr, "Approved") {
                continue;
            }
            let Some((_, ca)) = tenants
                .iter()
                .find(|(name, _)| *name == csr.spec.signer_name)
            else {
                continue;
            };
            let status = sign(&csr, ca);
            let (api, name) = (api.clone(), csr.name_any());
            tokio::spawn(async move {
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await;
            });
        }
    }))
}

//! cert-manager as the signer: one CertificateRequest per CSR, answered through ONE shared watch
//! of CertificateRequests in the namespace (waiters register by name; no watch or poll per
//! request, no fixed sleep), deleted after every outcome unless asked to preserve them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use base64::Engine;
use futures_util::StreamExt;
use kube::CustomResource;
use kube::api::{Api, ObjectMeta};
use kube::runtime::{WatchStreamExt, watcher};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use super::requests::{self, InFlight, Waiters};
use super::{IssueError, IssueRequest, Issued, Issuer, SignerRoute};
use crate::pki::pem;

/// The annotation istio-csr puts on its CertificateRequests: the identities asked for.
pub const IDENTITIES_ANNOTATION: &str = "istio.cert-manager.io/identities";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cert-manager.io",
    version = "v1",
    kind = "CertificateRequest",
    namespaced,
    status = "CertificateRequestStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequestSpec {
    /// Base64 of the PEM CSR (a Go []byte).
    pub request: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usages: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_ca: bool,
    pub issuer_ref: IssuerRef,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct IssuerRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequestStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    /// Base64 of the PEM chain, leaf first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Base64 of the PEM CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A signed CertificateRequest's answer, PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedPem {
    /// `status.certificate`: the leaf, maybe with intermediates.
    pub chain_pem: String,
    /// `status.ca`.
    pub ca_pem: String,
}

/// What a CertificateRequest came to.
pub type Outcome = requests::Outcome<IssuedPem>;

/// cert-manager's conditions, read the way its own controllers write them.
pub fn outcome_of(status: Option<&CertificateRequestStatus>) -> Option<Outcome> {
    let status = status?;
    let conditions = status.conditions.as_deref().unwrap_or_default();
    let find = |type_: &str| conditions.iter().find(|c| c.type_ == type_);
    let message = |c: &Condition| c.message.clone().unwrap_or_default();
    if let Some(denied) = find("Denied").filter(|c| c.status == "True") {
        return Some(Outcome::Denied(message(denied)));
    }
    if let Some(invalid) = find("InvalidRequest").filter(|c| c.status == "True") {
        return Some(Outcome::Failed(message(invalid)));
    }
    let ready = find("Ready")?;
    match (ready.status.as_str(), ready.reason.as_deref()) {
        ("True", _) => {
            let decode = |b64: &Option<String>| {
                b64.as_deref()
                    .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .unwrap_or_default()
            };
            Some(Outcome::Issued(IssuedPem {
                chain_pem: decode(&status.certificate),
                ca_pem: decode(&status.ca),
            }))
        }
        ("False", Some("Denied")) => Some(Outcome::Denied(message(ready))),
        ("False", Some("Failed")) => Some(Outcome::Failed(message(ready))),
        _ => None,
    }
}

/// Where and how CertificateRequests are made.
#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    /// The static issuer (flags): the defaults of the runtime ConfigMap's kind and group.
    pub issuer: IssuerRef,
    /// Whether the static issuer signs while no runtime ConfigMap exists (istio-csr's
    /// `--issuer-enabled`).
    pub static_issuer: bool,
    pub additional_annotations: BTreeMap<String, String>,
    pub preserve_requests: bool,
    pub timeout: Duration,
}

pub struct CertManagerIssuer {
    api: Api<CertificateRequest>,
    settings: Settings,
    /// The issuer in force: the static one, or the runtime ConfigMap's (None while it has
    /// none). Read once per request, so a switch never affects requests already waiting.
    issuer_ref: ArcSwapOption<IssuerRef>,
    waiters: Arc<Mutex<Waiters<Outcome>>>,
    synced: watch::Receiver<bool>,
    /// Woken when the watch syncs or the issuer in force changes: what `wait_ready` waits on.
    ready_changed: Arc<Notify>,
    /// The issuer in force, as `Issuer::signed_by` names it.
    signed_by: watch::Sender<String>,
}

/// How `Issuer::signed_by` names an issuerRef (or its absence).
fn describe_issuer(issuer: Option<&IssuerRef>) -> String {
    match issuer {
        Some(i) => format!("cert-manager:{}.{}/{}", i.kind, i.group, i.name),
        None => "cert-manager:none".to_owned(),
    }
}

impl CertManagerIssuer {
    /// The issuer and the task running its shared watch (spawn it as a critical task).
    pub fn new(
        client: kube::Client,
        settings: Settings,
    ) -> (
        Arc<Self>,
        impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        let api: Api<CertificateRequest> = Api::namespaced(client, &settings.namespace);
        let waiters = Arc::new(Mutex::new(Waiters::default()));
        let (synced_tx, synced) = watch::channel(false);
        let ready_changed = Arc::new(Notify::new());
        let (signed_by, _) = watch::channel(describe_issuer(Some(&settings.issuer)));
        let issuer = Arc::new(Self {
            api: api.clone(),
            issuer_ref: ArcSwapOption::from_pointee(settings.issuer.clone()),
            signed_by,
            settings,
            waiters: waiters.clone(),
            synced,
            ready_changed: ready_changed.clone(),
        });
        (issuer, run_watch(api, waiters, synced_tx, ready_changed))
    }

    /// Returns once the watch has synced and an issuer is configured.
    pub async fn wait_ready(&self) {
        loop {
            let changed = self.ready_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if Issuer::ready(self) {
                return;
            }
            changed.await;
        }
    }

    fn request_for(
        &self,
        name: &str,
        csr_pem: &str,
        identities: &str,
        lifetime: Duration,
        issuer_ref: IssuerRef,
        extra_annotations: &BTreeMap<String, String>,
    ) -> CertificateRequest {
        let mut annotations = self.settings.additional_annotations.clone();
        annotations.extend(extra_annotations.clone());
        annotations.insert(IDENTITIES_ANNOTATION.to_owned(), identities.to_owned());
        CertificateRequest {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.settings.namespace.clone()),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: CertificateRequestSpec {
                request: base64::engine::general_purpose::STANDARD.encode(csr_pem),
                duration: Some(format!("{}s", lifetime.as_secs())),
                usages: Some(vec!["client auth".into(), "server auth".into()]),
                is_ca: false,
                issuer_ref,
            },
            status: None,
        }
    }
}

impl CertManagerIssuer {
    /// Follows the runtime issuance ConfigMap (istio-csr's `issuer-name`, `issuer-kind`,
    /// `issuer-group` keys): each change applies to new requests at once. Until the watch
    /// has listed, nothing signs (the ConfigMap may name another issuer). Without the
    /// ConfigMap the static issuer signs, as istio-csr falls back to it (none with
    /// `--issuer-enabled=false`); with an invalid one nothing does: not ready, Unavailable.
    pub fn follow_runtime_config(
        self: Arc<Self>,
        client: kube::Client,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'static {
        use k8s_openapi::api::core::v1::ConfigMap;
        let api: Api<ConfigMap> = Api::namespaced(client, namespace);
        let config =
            crate::cluster::client::watch_config().fields(&format!("metadata.name={name}"));
        let defaults = self.settings.issuer.clone();
        let fallback = self.settings.static_issuer.then(|| defaults.clone());
        self.set_issuer(None);
        async move {
            let mut events = watcher(api, config).default_backoff().boxed();
            let mut listed = false;
            while let Some(event) = events.next().await {
                let next = match event {
                    Ok(watcher::Event::Init) => {
                        listed = false;
                        continue;
                    }
                    Ok(watcher::Event::InitDone) if listed => continue,
                    Ok(watcher::Event::InitDone) => {
                        tracing::info!(
                            "no runtime issuance ConfigMap; using the static issuer, if enabled"
                        );
                        fallback.clone()
                    }
                    Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                        listed = true;
                        match issuer_from_config_map(cm.data.as_ref(), &defaults) {
                            Ok(issuer) => Some(issuer),
                            Err(reason) => {
                                tracing::error!(%reason, "runtime issuance ConfigMap is invalid; no issuer");
                                None
                            }
                        }
                    }
                    Ok(watcher::Event::Delete(_)) => {
                        tracing::info!(
                            "runtime issuance ConfigMap deleted; falling back to the static issuer, if enabled"
                        );
                        fallback.clone()
                    }
                    Err(error) => {
                        tracing::warn!(%error, "runtime issuance ConfigMap watch interrupted");
                        continue;
                    }
                };
                tracing::info!(issuer = ?next, "runtime issuer changed");
                self.set_issuer(next);
            }
            anyhow::bail!("runtime issuance ConfigMap watch ended")
        }
    }
}

impl CertManagerIssuer {
    fn set_issuer(&self, issuer: Option<IssuerRef>) {
        self.signed_by
            .send_replace(describe_issuer(issuer.as_ref()));
        self.issuer_ref.store(issuer.map(Arc::new));
        self.ready_changed.notify_waiters();
    }
}

/// istio-csr's keys; kind and group default to the static flags' values.
pub fn issuer_from_config_map(
    data: Option<&BTreeMap<String, String>>,
    defaults: &IssuerRef,
) -> Result<IssuerRef, String> {
    let get = |key: &str| data.and_then(|d| d.get(key)).map(|v| v.trim().to_owned());
    let name = get("issuer-name")
        .filter(|n| !n.is_empty())
        .ok_or("issuer-name is missing")?;
    Ok(IssuerRef {
        name,
        kind: get("issuer-kind")
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| defaults.kind.clone()),
        group: get("issuer-group")
            .filter(|g| !g.is_empty())
            .unwrap_or_else(|| defaults.group.clone()),
    })
}

/// The shared watch: every CertificateRequest event in the namespace, dispatched to waiters.
async fn run_watch(
    api: Api<CertificateRequest>,
    waiters: Arc<Mutex<Waiters<Outcome>>>,
    synced: watch::Sender<bool>,
    ready_changed: Arc<Notify>,
) -> anyhow::Result<()> {
    requests::dispatch_outcomes(
        api,
        crate::cluster::client::watch_config(),
        waiters,
        |cr: &CertificateRequest| outcome_of(cr.status.as_ref()),
        || {
            synced.send_replace(true);
            ready_changed.notify_waiters();
        },
        "CertificateRequest",
    )
    .await
}

#[async_trait]
impl Issuer for CertManagerIssuer {
    fn label(&self) -> &'static str {
        "cert-manager"
    }

    fn ready(&self) -> bool {
        *self.synced.borrow() && self.issuer_ref.load().is_some()
    }

    fn signed_by(&self) -> watch::Receiver<String> {
        self.signed_by.subscribe()
    }

    async fn issue(&self, request: IssueRequest<'_>) -> Result<Issued, IssueError> {
        let csr_pem = pem::encode("CERTIFICATE REQUEST", &request.csr.der);
        let issued = self
            .submit(
                &csr_pem,
                &request.names.describe(),
                request.lifetime,
                request.annotations,
                request.route,
            )
            .await?;
        let chain = pem::parse_certificates(issued.chain_pem.as_bytes())
            .map_err(|e| IssueError::Failed(format!("status.certificate: {e}")))?;
        // status.ca may hold intermediates the chain left out; verification sorts it out.
        let ca = pem::parse_certificates(issued.ca_pem.as_bytes()).unwrap_or_default();
        Ok(Issued::External { chain, ca })
    }
}

impl CertManagerIssuer {
    /// Creates a CertificateRequest for `csr_pem` and waits for its outcome on the shared
    /// watch.
    async fn submit(
        &self,
        csr_pem: &str,
        identities: &str,
        lifetime: Duration,
        annotations: &BTreeMap<String, String>,
        route: Option<&SignerRoute>,
    ) -> Result<IssuedPem, IssueError> {
        if !*self.synced.borrow() {
            return Err(IssueError::NotReady(
                "CertificateRequest watch not synced".into(),
            ));
        }
        // A tenant signer has an issuer of its own; the runtime ConfigMap names the mesh's.
        let issuer_ref = match route {
            Some(route) => Arc::new(route.issuer_ref.clone().ok_or_else(|| {
                IssueError::InvalidRequest("this tenant signer names no issuerRef".into())
            })?),
            None => self.issuer_ref.load_full().ok_or_else(|| {
                IssueError::NotReady("no issuer configured (runtime ConfigMap)".into())
            })?,
        };
        // Named here rather than by generateName, so the clean-up and the waiter exist
        // before the create is sent.
        let mut request = InFlight::start(
            &self.api,
            &self.waiters,
            self.settings.preserve_requests,
            self.settings.timeout,
            "CertificateRequest",
        )?;
        let object = self.request_for(
            &request.name,
            csr_pem,
            identities,
            lifetime,
            (*issuer_ref).clone(),
            annotations,
        );
        request
            .create(&object)
            .await?
            .map_err(|e| IssueError::unavailable_because("creating a CertificateRequest", e))?;
        request.answer().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(type_: &str, status: &str, reason: Option<&str>) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.map(Into::into),
            message: Some("why".into()),
        }
    }

    fn with(conditions: Vec<Condition>) -> CertificateRequestStatus {
        CertificateRequestStatus {
            conditions: Some(conditions),
            certificate: Some(base64::engine::general_purpose::STANDARD.encode("LEAF")),
            ca: None,
        }
    }

    #[test]
    fn reads_cert_manager_conditions() {
        assert_eq!(outcome_of(None), None);
        assert_eq!(
            outcome_of(Some(&with(vec![cond("Ready", "False", Some("Pending"))]))),
            None
        );
        assert_eq!(
            outcome_of(Some(&with(vec![
                cond("Approved", "True", None),
                cond("Ready", "True", Some("Issued"))
            ]))),
            Some(Outcome::Issued(IssuedPem {
                chain_pem: "LEAF".into(),
                ca_pem: String::new()
            }))
        );
        assert_eq!(
            outcome_of(Some(&with(vec![cond("Denied", "True", Some("Denied"))]))),
            Some(Outcome::Denied("why".into()))
        );
        assert_eq!(
            outcome_of(Some(&with(vec![cond("Ready", "False", Some("Failed"))]))),
            Some(Outcome::Failed("why".into()))
        );
        assert_eq!(
            outcome_of(Some(&with(vec![cond("InvalidRequest", "True", None)]))),
            Some(Outcome::Failed("why".into()))
        );
    }

    #[test]
    fn reads_the_runtime_issuance_config_map_like_istio_csr() {
        let defaults = IssuerRef {
            name: "static".into(),
            kind: "Issuer".into(),
            group: "cert-manager.io".into(),
        };
        let data = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect()
        };
        let full = data(&[
            ("issuer-name", "vault"),
            ("issuer-kind", "ClusterIssuer"),
            ("issuer-group", "example.com"),
        ]);
        assert_eq!(
            issuer_from_config_map(Some(&full), &defaults).unwrap(),
            IssuerRef {
                name: "vault".into(),
                kind: "ClusterIssuer".into(),
                group: "example.com".into()
            }
        );
        let name_only = data(&[("issuer-name", " vault ")]);
        let issuer = issuer_from_config_map(Some(&name_only), &defaults).unwrap();
        assert_eq!(
            (issuer.name.as_str(), issuer.kind.as_str()),
            ("vault", "Issuer")
        );
        assert!(
            issuer_from_config_map(Some(&data(&[("issuer-kind", "Issuer")])), &defaults).is_err()
        );
        assert!(issuer_from_config_map(Some(&data(&[("issuer-name", "")])), &defaults).is_err());
        assert!(issuer_from_config_map(None, &defaults).is_err());
    }
}

//! `--signer kube-csr`: the Kubernetes CSR API as the signer, as istiod does as a registration
//! authority: a `certificates.k8s.io/v1` CertificateSigningRequest per CSR, approved by us
//! (unless an external approver is trusted with that), answered by whatever signer implements
//! its `signerName`, and deleted after every outcome. Unlike istiod we notice Denied and Failed
//! at once instead of waiting out the timeout. The API returns no CA, so the answer is only
//! trusted against the pinned `--root-ca-file`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
};
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

use super::requests::{self, InFlight, Waiters};
use super::{IssueError, IssueRequest, Issued, Issuer, SignerRoute};
use crate::pki::pem;

/// On our CertificateSigningRequests, so the shared watch sees only them.
pub const REQUEST_LABEL_KEY: &str = "istio-csr-rs.io/request";
/// The API refuses `expirationSeconds` below ten minutes.
const MIN_EXPIRATION: Duration = Duration::from_secs(600);

#[derive(Clone, Debug)]
pub struct Settings {
    /// `spec.signerName` of every request, unless a tenant signer's route names another.
    pub signer_name: String,
    /// Approve our own requests (istiod's way). Off: an external approver decides.
    pub approve: bool,
    pub timeout: Duration,
    pub preserve_requests: bool,
}

/// What a CertificateSigningRequest came to; when issued, `status.certificate` (the leaf and
/// maybe intermediates, PEM).
pub type Outcome = requests::Outcome<String>;

/// What a CertificateSigningRequest came to, if anything yet.
pub fn outcome_of(csr: &CertificateSigningRequest) -> Option<Outcome> {
    let status = csr.status.as_ref()?;
    let conditions = status.conditions.as_deref().unwrap_or_default();
    let holds = |type_: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == "True")
            .map(|c| c.message.clone().or(c.reason.clone()).unwrap_or_default())
    };
    if let Some(message) = holds("Denied") {
        return Some(Outcome::Denied(message));
    }
    if let Some(message) = holds("Failed") {
        return Some(Outcome::Failed(message));
    }
    let certificate = status.certificate.as_ref().filter(|c| !c.0.is_empty())?;
    Some(Outcome::Issued(
        String::from_utf8_lossy(&certificate.0).into_owned(),
    ))
}

pub struct KubeCsrIssuer {
    api: Api<CertificateSigningRequest>,
    settings: Settings,
    waiters: Arc<Mutex<Waiters<Outcome>>>,
    synced: watch::Receiver<bool>,
}

impl KubeCsrIssuer {
    /// The issuer and the task running its shared watch (spawn it as a critical task).
    pub fn new(
        client: kube::Client,
        settings: Settings,
    ) -> (
        Arc<Self>,
        impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        let api: Api<CertificateSigningRequest> = Api::all(client);
        let waiters = Arc::new(Mutex::new(Waiters::default()));
        let (synced_tx, synced) = watch::channel(false);
        let issuer = Arc::new(Self {
            api: api.clone(),
            settings,
            waiters: waiters.clone(),
            synced,
        });
        (issuer, run_watch(api, waiters, synced_tx))
    }

    /// The signer for a request: its tenant's, else the default.
    fn signer_for(&self, route: Option<&SignerRoute>) -> Result<String, IssueError> {
        match route {
            Some(route) => route.kube_csr_signer_name.clone().ok_or_else(|| {
                IssueError::InvalidRequest("this tenant signer names no kubeCSRSignerName".into())
            }),
            None => Ok(self.settings.signer_name.clone()),
        }
    }

    /// Creates one request for `csr_pem`, approves it (when configured), waits for its answer
    /// and deletes it: the PEM chain.
    async fn submit(
        &self,
        csr_pem: &str,
        signer_name: &str,
        lifetime: Duration,
    ) -> Result<String, IssueError> {
        if !*self.synced.borrow() {
            return Err(IssueError::NotReady(
                "CertificateSigningRequest watch not synced".into(),
            ));
        }
        let mut in_flight = InFlight::start(
            &self.api,
            &self.waiters,
            self.settings.preserve_requests,
            self.settings.timeout,
            "CertificateSigningRequest",
        )?;
        let request = CertificateSigningRequest {
            metadata: ObjectMeta {
                name: Some(in_flight.name.clone()),
                labels: Some([(REQUEST_LABEL_KEY.to_owned(), "true".to_owned())].into()),
                ..Default::default()
            },
            spec: CertificateSigningRequestSpec {
                request: ByteString(csr_pem.as_bytes().to_vec()),
                signer_name: signer_name.to_owned(),
                usages: Some(
                    [
                        "digital signature",
                        "key encipherment",
                        "server auth",
                        "client auth",
                    ]
                    .map(String::from)
                    .to_vec(),
                ),
                expiration_seconds: Some(
                    i32::try_from(self.granted_lifetime(lifetime).as_secs()).unwrap_or(i32::MAX),
                ),
                ..Default::default()
            },
            status: None,
        };
        in_flight.create(&request).await?.map_err(|e| match e {
            kube::Error::Api(e) if e.code == 422 => {
                IssueError::Failed(format!("CertificateSigningRequest refused: {}", e.message))
            }
            other => IssueError::unavailable_because("creating a CertificateSigningRequest", other),
        })?;
        if self.settings.approve {
            tokio::time::timeout_at(
                in_flight.deadline,
                self.approve(&in_flight.name, signer_name),
            )
            .await
            .map_err(|_| IssueError::unavailable("the API server did not answer the approval"))??;
        }
        in_flight.answer().await
    }
}

impl KubeCsrIssuer {
    /// Adds our Approved condition (read, append, write with the resourceVersion, as `kubectl
    /// certificate approve` does). Already decided by someone else: the watch brings that.
    async fn approve(&self, name: &str, signer_name: &str) -> Result<(), IssueError> {
        for _ in 0..3 {
            let mut current = self.api.get_approval(name).await.map_err(|e| {
                IssueError::unavailable_because("reading the CertificateSigningRequest", e)
            })?;
            let status = current.status.get_or_insert_with(Default::default);
            let conditions = status.conditions.get_or_insert_with(Vec::new);
            if conditions
                .iter()
                .any(|c| c.type_ == "Approved" || c.type_ == "Denied")
            {
                return Ok(());
            }
            conditions.push(CertificateSigningRequestCondition {
                type_: "Approved".into(),
                status: "True".into(),
                reason: Some("IstioCsrRsApproved".into()),
                message: Some(
                    "The caller was authenticated and its identities checked by istio-csr-rs."
                        .into(),
                ),
                ..Default::default()
            });
            match self
                .api
                .replace_subresource("approval", name, &PostParams::default(), &current)
                .await
            {
                Ok(_) => return Ok(()),
                // Changed meanwhile (a denial, a signer): read it again.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                // Our role may not approve for this signer: the caller asked for one we do
                // not serve.
                Err(kube::Error::Api(e)) if e.code == 403 => {
                    return Err(IssueError::Denied(format!(
                        "not allowed to approve requests for signer {signer_name}"
                    )));
                }
                Err(error) => {
                    return Err(IssueError::unavailable_because(
                        "approving the CertificateSigningRequest",
                        error,
                    ));
                }
            }
        }
        Err(IssueError::unavailable(
            "the CertificateSigningRequest kept changing while being approved",
        ))
    }
}

#[async_trait]
impl Issuer for KubeCsrIssuer {
    fn label(&self) -> &'static str {
        "kube-csr"
    }

    fn ready(&self) -> bool {
        *self.synced.borrow()
    }

    fn granted_lifetime(&self, requested: Duration) -> Duration {
        requested.max(MIN_EXPIRATION)
    }

    async fn issue(&self, request: IssueRequest<'_>) -> Result<Issued, IssueError> {
        let signer = self.signer_for(request.route)?;
        let csr_pem = pem::encode("CERTIFICATE REQUEST", &request.csr.der);
        let chain = self.submit(&csr_pem, &signer, request.lifetime).await?;
        let certs = pem::parse_certificates(chain.as_bytes())
            .map_err(|e| IssueError::Failed(format!("status.certificate: {e}")))?;
        Ok(Issued::external(certs))
    }
}

/// The shared watch over our own requests (by label), dispatched to waiters.
async fn run_watch(
    api: Api<CertificateSigningRequest>,
    waiters: Arc<Mutex<Waiters<Outcome>>>,
    synced: watch::Sender<bool>,
) -> anyhow::Result<()> {
    requests::dispatch_outcomes(
        api,
        crate::cluster::client::watch_config().labels(&format!("{REQUEST_LABEL_KEY}=true")),
        waiters,
        outcome_of,
        || {
            synced.send_replace(true);
        },
        "CertificateSigningRequest",
    )
    .await
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::certificates::v1::{
        CertificateSigningRequestCondition, CertificateSigningRequestStatus,
    };

    use super::*;

    fn with(conditions: &[(&str, &str)], certificate: &[u8]) -> CertificateSigningRequest {
        CertificateSigningRequest {
            status: Some(CertificateSigningRequestStatus {
                conditions: Some(
                    conditions
                        .iter()
                        .map(|(t, s)| CertificateSigningRequestCondition {
                            type_: (*t).into(),
                            status: (*s).into(),
                            message: Some(format!("{t} because")),
                            ..Default::default()
                        })
                        .collect(),
                ),
                certificate: Some(ByteString(certificate.to_vec())),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn reads_the_csr_api_conditions_and_certificate() {
        assert_eq!(outcome_of(&CertificateSigningRequest::default()), None);
        assert_eq!(outcome_of(&with(&[("Approved", "True")], b"")), None);
        assert_eq!(
            outcome_of(&with(&[("Approved", "True")], b"PEM")),
            Some(Outcome::Issued("PEM".into()))
        );
        assert_eq!(
            outcome_of(&with(&[("Denied", "True")], b"")),
            Some(Outcome::Denied("Denied because".into()))
        );
        assert_eq!(
            outcome_of(&with(&[("Approved", "True"), ("Failed", "True")], b"")),
            Some(Outcome::Failed("Failed because".into()))
        );
        assert_eq!(outcome_of(&with(&[("Denied", "False")], b"")), None);
    }
}

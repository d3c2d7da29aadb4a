//! The ONE way into the issuers. Workload certificates, this replica's serving certificate and
//! istiod's certificate all go through `Issuance::issue`, so every chain an external signer
//! returns is verified here, in one place, against the pinned roots in force: a hijacked or
//! misconfigured signer cannot hand out a chain the mesh does not trust, nor one with other
//! names or another key than asked for.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use rcgen::KeyPair;
use rustls_pki_types::UnixTime;
use tokio::sync::watch;

use super::issuer::{IssueError, IssueRequest, Issued, Issuer, LeafNames};
use super::tenants::Tenant;
use crate::pki::chain::{self, ChainError, Expected, RootBundle, VerifiedChain};
use crate::pki::csr::{self, CheckedCsr, CsrError};

#[derive(Debug, thiserror::Error)]
pub enum IssuanceError {
    #[error(transparent)]
    Issue(#[from] IssueError),
    #[error("issued chain rejected: {0}")]
    Chain(#[from] ChainError),
}

/// A verified leaf and the roots it was verified against (what the answer carries).
#[derive(Clone, Debug)]
pub struct Certified {
    pub chain: VerifiedChain,
    pub roots: Arc<RootBundle>,
}

/// Issuers' clocks may run ahead of ours: this much past the granted lifetime is tolerated
/// (the Kubernetes CSR API's signers backdate by as much).
pub const ISSUER_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
}

/// Answers of external signers refused at the one verification site.
#[derive(Clone, Default)]
pub struct IssuanceMetrics {
    refused: Family<RefusedLabels, Counter>,
}

impl IssuanceMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "issued_chains_refused",
            "Chains from an external signer refused before reaching anyone, by reason (untrusted, names, key, lifetime, malformed).",
            metrics.refused.clone(),
        );
        metrics
    }
}

/// The active issuer and the pinned roots every external answer must verify against.
#[derive(Clone)]
pub struct Issuance {
    issuer: Arc<dyn Issuer>,
    roots: watch::Receiver<Arc<RootBundle>>,
    metrics: IssuanceMetrics,
}

impl Issuance {
    pub fn new(issuer: Arc<dyn Issuer>, roots: watch::Receiver<Arc<RootBundle>>) -> Self {
        Self {
            issuer,
            roots,
            metrics: IssuanceMetrics::default(),
        }
    }

    pub fn with_metrics(mut self, metrics: IssuanceMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn issuer(&self) -> &Arc<dyn Issuer> {
        &self.issuer
    }

    pub fn roots(&self) -> &watch::Receiver<Arc<RootBundle>> {
        &self.roots
    }

    /// Signs `request` with the mesh's issuer and verifies the answer against the pinned roots.
    pub async fn issue(&self, request: IssueRequest<'_>) -> Result<Certified, IssuanceError> {
        self.issue_for(None, request).await
    }

    /// Signs `request` for `tenant` (its own issuer; verified against its roots only, and
    /// answered with them), or for the mesh when `None`.
    pub async fn issue_for(
        &self,
        tenant: Option<&Tenant>,
        mut request: IssueRequest<'_>,
    ) -> Result<Certified, IssuanceError> {
        let names = request.names;
        let spki = &request.csr.public_key.spki_der;
        let granted = self.issuer.granted_lifetime(request.lifetime);
        request.route = tenant.map(|t| &t.route);
        match self.issuer.issue(request).await? {
            // Proven against these roots when the CA was loaded (local_ca's module docs).
            Issued::InProcess { .. } if tenant.is_some() => {
                Err(IssueError::internal("an in-process CA answered for a tenant signer").into())
            }
            Issued::InProcess { chain, roots } => Ok(Certified { chain, roots }),
            Issued::External { mut chain, ca } => {
                // Read the roots after signing, so a rotation during the wait is honoured.
                // A tenant's chain verifies against its own roots and nothing else.
                let roots = match tenant {
                    Some(tenant) => tenant.roots.clone(),
                    None => self.roots.borrow().clone(),
                };
                // The reported CA may hold intermediates the chain left out; a root among them
                // is dropped by path building, and is never trusted for being there.
                chain.extend(ca);
                let expected = Expected {
                    uris: &names.uris,
                    dns: &names.dns,
                    ips: &names.ips,
                    spki_der: spki,
                };
                let now = UnixTime::now();
                let now_unix = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
                let verified = chain::verify(&chain, &roots, now, &expected).and_then(|chain| {
                    chain.check_lifetime(now_unix, granted, ISSUER_CLOCK_SKEW)?;
                    Ok(chain)
                });
                match verified {
                    Ok(chain) => Ok(Certified { chain, roots }),
                    Err(error) => {
                        self.metrics
                            .refused
                            .get_or_create(&RefusedLabels {
                                reason: error.label(),
                            })
                            .inc();
                        Err(error.into())
                    }
                }
            }
        }
    }
}

/// A CSR for a key of our own, carrying `names` (SANs and CN) as external signers expect.
pub fn own_csr(names: &LeafNames, key: &KeyPair) -> Result<CheckedCsr, OwnCsrError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = &names.common_name {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn.as_str());
    }
    for uri in &names.uris {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(uri.as_str().try_into()?));
    }
    for dns in &names.dns {
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName(dns.as_str().try_into()?));
    }
    for ip in &names.ips {
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(*ip));
    }
    let der = params.serialize_request(key)?;
    Ok(csr::own_der(der.der())?)
}

#[derive(Debug, thiserror::Error)]
pub enum OwnCsrError {
    #[error("building the CSR: {0}")]
    Build(#[from] rcgen::Error),
    #[error("reading back the CSR: {0}")]
    Read(#[from] CsrError),
}

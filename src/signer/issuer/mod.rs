//! The backends that sign: cert-manager, the Kubernetes CSR API and the built-in CA. Every
//! certificate, whatever it is for, reaches them through `signer::issuance::Issuance`.

pub mod cert_manager;
pub mod kube_csr;
pub mod local_ca;
pub mod requests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use crate::pki::chain::{RootBundle, VerifiedChain};
use crate::pki::csr::CheckedCsr;

/// What a certificate is for: decides nothing about trust (every chain is verified the same
/// way) but names it in requests, logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A mesh workload's SPIFFE certificate (CreateCertificate).
    Workload,
    /// This replica's own gRPC serving certificate.
    Serving,
    /// istiod's serving certificate (Secret `istiod-tls`).
    Istiod,
}

impl Purpose {
    /// A bounded label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Purpose::Workload => "workload",
            Purpose::Serving => "serving",
            Purpose::Istiod => "istiod",
        }
    }
}

pub use crate::pki::leaf::LeafNames;

/// No extra annotations.
pub static NO_ANNOTATIONS: BTreeMap<String, String> = BTreeMap::new();

/// One signing request: a CSR that passed its checks (the workload policy, or made here).
pub struct IssueRequest<'a> {
    pub purpose: Purpose,
    pub csr: &'a CheckedCsr,
    /// What the leaf must carry (for workloads, the CSR's URI SANs, equal to the caller's).
    pub names: &'a LeafNames,
    /// Already clamped to the configured maximum.
    pub lifetime: Duration,
    /// A tenant signer's issuer (`signer::tenants`); `None`: the mesh's issuer in force.
    pub route: Option<&'a SignerRoute>,
    /// Added to the request object (cert-manager), e.g. istiod's additional annotations.
    pub annotations: &'a BTreeMap<String, String>,
}

/// Where a tenant signer's requests go: each backend reads its own field (the signer table
/// is checked at load, so the one the backend in force needs is set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerRoute {
    /// `--signer cert-manager`: the CertificateRequest's issuerRef.
    pub issuer_ref: Option<cert_manager::IssuerRef>,
    /// `--signer kube-csr`: the CertificateSigningRequest's signerName.
    pub kube_csr_signer_name: Option<String>,
}

/// What an issuer answers.
pub enum Issued {
    /// Signed in this process by a CA whose path to `roots` was verified on load. The answer
    /// carries exactly these roots, so leaf and bundle always match, even mid-rotation.
    InProcess {
        chain: VerifiedChain,
        roots: Arc<RootBundle>,
    },
    /// An external signer's answer: it must be verified against the pinned roots.
    External {
        /// Leaf first, then whatever came with it.
        chain: Vec<CertificateDer<'static>>,
        /// The CA the signer reports (cert-manager's `status.ca`); never trusted by itself.
        ca: Vec<CertificateDer<'static>>,
    },
}

impl Issued {
    /// An external answer with no separate CA.
    pub fn external(chain: Vec<CertificateDer<'static>>) -> Self {
        Issued::External {
            chain,
            ca: Vec::new(),
        }
    }
}

/// What caused an error, kept whole (a `kube::Error` with its API status, a signing error)
/// for whoever inspects it; shared, since one outcome can answer several waiters.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Debug)]
pub enum IssueError {
    NotReady(String),
    InvalidRequest(String),
    Unavailable { what: String, cause: Option<Cause> },
    Timeout,
    Denied(String),
    Failed(String),
    Internal { what: String, cause: Option<Cause> },
}

impl std::fmt::Display for IssueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotReady(why) => write!(f, "no usable issuer: {why}"),
            Self::InvalidRequest(why) => write!(f, "invalid request for this issuer: {why}"),
            Self::Unavailable { what, .. } => write!(f, "issuer unreachable: {what}"),
            Self::Timeout => f.write_str("issuer did not answer in time"),
            Self::Denied(why) => write!(f, "issuer denied the request: {why}"),
            Self::Failed(why) => write!(f, "issuer failed the request: {why}"),
            Self::Internal { what, .. } => write!(f, "internal error: {what}"),
        }
    }
}

/// By hand, not thiserror: its `#[source]` on an `Arc<dyn Error>` hands out the Arc, and a
/// caller could not downcast the cause to its own type (a `kube::Error`).
impl std::error::Error for IssueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unavailable {
                cause: Some(cause), ..
            }
            | Self::Internal {
                cause: Some(cause), ..
            } => Some(cause.as_ref()),
            _ => None,
        }
    }
}

impl IssueError {
    pub fn unavailable(what: impl Into<String>) -> Self {
        Self::Unavailable {
            what: what.into(),
            cause: None,
        }
    }

    /// `doing` failed because of `cause`. The message names the cause too, as the crate's
    /// other errors do, so a one-line log needs no chain.
    pub fn unavailable_because(
        doing: &str,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Unavailable {
            what: format!("{doing}: {cause}"),
            cause: Some(Arc::new(cause)),
        }
    }

    pub fn internal(what: impl Into<String>) -> Self {
        Self::Internal {
            what: what.into(),
            cause: None,
        }
    }

    /// As `unavailable_because`.
    pub fn internal_because(
        doing: &str,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Internal {
            what: format!("{doing}: {cause}"),
            cause: Some(Arc::new(cause)),
        }
    }
}

#[async_trait]
pub trait Issuer: Send + Sync {
    /// A bounded label for logs and metrics.
    fn label(&self) -> &'static str;

    /// Whether requests can be signed now.
    fn ready(&self) -> bool;

    /// Names the issuer that signs now (the runtime ConfigMap's issuerRef, the loaded CA...),
    /// and changes when another takes over: long-kept certificates (istiod's) are then
    /// reissued. The default never changes.
    fn signed_by(&self) -> watch::Receiver<String> {
        watch::channel(self.label().to_owned()).1
    }

    /// The lifetime this issuer really asks its signer for, given the requested one (the
    /// Kubernetes CSR API has a minimum): what an answer is allowed to live.
    fn granted_lifetime(&self, requested: Duration) -> Duration {
        requested
    }

    async fn issue(&self, request: IssueRequest<'_>) -> Result<Issued, IssueError>;
}

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn an_api_failure_keeps_the_kube_error_and_its_status() {
        let status =
            kube::core::Status::failure("etcd is down", "ServiceUnavailable").with_code(503);
        let error = IssueError::unavailable_because(
            "creating a CertificateRequest",
            kube::Error::Api(status.boxed()),
        );
        let cause =
            std::error::Error::source(&error).and_then(|cause| cause.downcast_ref::<kube::Error>());
        let Some(kube::Error::Api(status)) = cause else {
            panic!("the kube::Error is gone: {error:?}");
        };
        assert_eq!(status.code, 503);
        assert!(error.to_string().contains("etcd is down"), "{error}");
        assert!(std::error::Error::source(&IssueError::unavailable("x")).is_none());
    }
}

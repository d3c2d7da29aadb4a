//! The backends that sign: the built-in CA now; cert-manager and the Kubernetes CSR API next.

pub mod cert_manager;
pub mod kube_csr;
pub mod local_ca;
pub mod requests;

use std::time::Duration;

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;

use std::sync::Arc;

use crate::pki::chain::{RootBundle, VerifiedChain};
use crate::pki::csr::CheckedCsr;

/// One signing request after authentication and the CSR policy passed.
pub struct IssueRequest<'a> {
    pub csr: &'a CheckedCsr,
    /// The identities the leaf must carry (the CSR's URI SANs, equal to the caller's).
    pub identities: &'a [String],
    /// Already clamped to the configured maximum.
    pub lifetime: Duration,
    /// pilot-agent's `CertSigner` metadata, when non-empty.
    pub cert_signer: Option<&'a str>,
}

/// What an issuer answers.
pub enum Issued {
    /// Signed in this process by a CA whose path to `roots` was verified on load. The answer
    /// carries exactly these roots, so leaf and bundle always match, even mid-rotation.
    InProcess {
        chain: VerifiedChain,
        roots: Arc<RootBundle>,
    },
    /// An external signer's chain, leaf first: it must be verified against the pinned roots.
    External(Vec<CertificateDer<'static>>),
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum IssueError {
    #[error("no usable issuer: {0}")]
    NotReady(String),
    #[error("invalid request for this issuer: {0}")]
    InvalidRequest(String),
    #[error("issuer unreachable: {0}")]
    Unavailable(String),
    #[error("issuer did not answer in time")]
    Timeout,
    #[error("issuer denied the request: {0}")]
    Denied(String),
    #[error("issuer failed the request: {0}")]
    Failed(String),
    #[error("internal error: {0}")]
    Internal(String),
}

#[async_trait]
pub trait Issuer: Send + Sync {
    /// A bounded label for logs and metrics.
    fn label(&self) -> &'static str;

    /// Whether requests can be signed now.
    fn ready(&self) -> bool;

    async fn issue(&self, request: IssueRequest<'_>) -> Result<Issued, IssueError>;
}

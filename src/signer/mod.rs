//! The gRPC signer: authentication, authorisation, issuer selection and the issuers.

pub mod admission;
pub mod authn;
pub mod capacity;
pub mod edge;
pub mod error;
pub mod issuance;
pub mod issuer;
pub mod listener;
pub mod log_guard;
pub mod metrics;
pub mod server;
pub mod service;
pub mod serving;
pub mod tenants;
pub mod tls;

/// Which backend signs workload certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Signer {
    /// cert-manager CertificateRequests.
    CertManager,
    /// The Kubernetes CertificateSigningRequest API.
    KubeCsr,
    /// The built-in CA (`--local-ca-dir`).
    LocalCa,
}

impl Signer {
    pub fn label(self) -> &'static str {
        match self {
            Signer::CertManager => "cert-manager",
            Signer::KubeCsr => "kube-csr",
            Signer::LocalCa => "local-ca",
        }
    }
}

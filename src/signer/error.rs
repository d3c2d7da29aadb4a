//! Why a CreateCertificate failed, and the ONE place that turns it into a gRPC status.
//!
//! Codes follow the README ("Status codes"): clients retry Unavailable, DeadlineExceeded,
//! Internal and ResourceExhausted, and do not retry Unauthenticated, InvalidArgument or
//! PermissionDenied. Messages to clients stay generic; the detail goes to the logs.

use tonic::{Code, Status};

use super::admission::Refusal;
use super::authn::AuthnError;
use super::issuance::IssuanceError;
use super::issuer::IssueError;
use super::tenants::TenantError;
use crate::pki::chain::ChainError;
use crate::pki::csr::CsrError;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("authentication failed: {0}")]
    Authn(#[from] AuthnError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("invalid CSR: {0}")]
    Csr(#[from] CsrError),
    #[error("CSR identities {requested:?} are not the caller's {allowed:?}")]
    IdentityMismatch {
        requested: Vec<String>,
        allowed: Vec<String>,
    },
    #[error("impersonation refused: {0}")]
    Impersonation(String),
    #[error("impersonation not checked: {0}")]
    NodeCheckUnavailable(String),
    #[error("issuer: {0}")]
    Issue(#[from] IssueError),
    #[error("issued chain rejected: {0}")]
    Chain(#[from] ChainError),
    #[error("tenant signer: {0}")]
    Tenant(#[from] TenantError),
    /// No seat in a pipeline stage (admission.rs): the source's queue was full or the wait
    /// too long.
    #[error("overloaded: {0}")]
    Overloaded(#[from] Refusal),
}

impl From<IssuanceError> for SignError {
    fn from(error: IssuanceError) -> Self {
        match error {
            IssuanceError::Issue(e) => SignError::Issue(e),
            IssuanceError::Chain(e) => SignError::Chain(e),
        }
    }
}

impl SignError {
    pub fn code(&self) -> Code {
        match self {
            SignError::Authn(AuthnError::Unavailable(_)) | SignError::NodeCheckUnavailable(_) => {
                Code::Unavailable
            }
            SignError::Authn(_) => Code::Unauthenticated,
            SignError::InvalidRequest(_) | SignError::Csr(_) => Code::InvalidArgument,
            SignError::IdentityMismatch { .. } | SignError::Impersonation(_) => {
                Code::PermissionDenied
            }
            SignError::Issue(e) => match e {
                IssueError::NotReady(_) | IssueError::Unavailable { .. } => Code::Unavailable,
                IssueError::Timeout => Code::DeadlineExceeded,
                IssueError::InvalidRequest(_) => Code::InvalidArgument,
                IssueError::Denied(_) => Code::PermissionDenied,
                IssueError::Failed(_) | IssueError::Internal { .. } => Code::Internal,
            },
            SignError::Tenant(TenantError::Unknown(_)) => Code::InvalidArgument,
            SignError::Tenant(TenantError::NotAllowed { .. }) => Code::PermissionDenied,
            SignError::Chain(_) => Code::Internal,
            SignError::Overloaded(_) => Code::ResourceExhausted,
        }
    }
}

/// The only conversion from a signing failure to what the client sees.
pub fn to_status(error: &SignError) -> Status {
    let code = error.code();
    let message = match code {
        Code::Unauthenticated => "authentication failed",
        Code::InvalidArgument => "invalid certificate signing request",
        Code::PermissionDenied => "permission denied",
        Code::Unavailable => "certificate authority unavailable, retry later",
        Code::DeadlineExceeded => "certificate signing timed out",
        Code::ResourceExhausted => "too many requests, retry later",
        _ => "certificate signing failed",
    };
    Status::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_every_failure_to_the_documented_codes() {
        let cases: Vec<(SignError, Code)> = vec![
            (AuthnError::NoCredentials.into(), Code::Unauthenticated),
            (AuthnError::InvalidToken.into(), Code::Unauthenticated),
            (
                AuthnError::UnknownCluster("x".into()).into(),
                Code::Unauthenticated,
            ),
            (
                AuthnError::Unavailable("api down".into()).into(),
                Code::Unavailable,
            ),
            (CsrError::ForbiddenSan("DNS").into(), Code::InvalidArgument),
            (
                SignError::InvalidRequest("metadata".into()),
                Code::InvalidArgument,
            ),
            (
                SignError::IdentityMismatch {
                    requested: vec![],
                    allowed: vec![],
                },
                Code::PermissionDenied,
            ),
            (SignError::Impersonation("x".into()), Code::PermissionDenied),
            (
                SignError::NodeCheckUnavailable("x".into()),
                Code::Unavailable,
            ),
            (IssueError::NotReady("x".into()).into(), Code::Unavailable),
            (IssueError::unavailable("x").into(), Code::Unavailable),
            (IssueError::Timeout.into(), Code::DeadlineExceeded),
            (
                IssueError::InvalidRequest("x".into()).into(),
                Code::InvalidArgument,
            ),
            (
                IssueError::Denied("x".into()).into(),
                Code::PermissionDenied,
            ),
            (IssueError::Failed("x".into()).into(), Code::Internal),
            (ChainError::Untrusted("x".into()).into(), Code::Internal),
            (
                TenantError::Unknown("x".into()).into(),
                Code::InvalidArgument,
            ),
            (
                TenantError::NotAllowed {
                    signer: "x".into(),
                    namespace: "y".into(),
                }
                .into(),
                Code::PermissionDenied,
            ),
            (Refusal::QueueFull.into(), Code::ResourceExhausted),
            (Refusal::WaitedTooLong.into(), Code::ResourceExhausted),
        ];
        for (error, code) in cases {
            assert_eq!(to_status(&error).code(), code, "{error}");
        }
    }

    #[test]
    fn client_messages_carry_no_detail() {
        let error = SignError::Authn(AuthnError::UnknownCluster("secret-cluster".into()));
        assert!(!to_status(&error).message().contains("secret-cluster"));
        let error = SignError::Issue(IssueError::Failed("vault said no: token abc".into()));
        assert!(!to_status(&error).message().contains("abc"));
    }
}

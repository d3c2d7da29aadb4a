//! Who is calling: bearer tokens (static file now, TokenReview with Kubernetes) or a verified
//! client certificate. Authenticators are tried in order; the first that accepts wins.

pub mod client_cert;
pub mod jwks;
pub mod jwt;
pub mod node;
pub mod pod_cache;
pub mod signing_keys;
pub mod static_tokens;
pub mod token_review;

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;

use crate::cluster::ClusterTarget;
use crate::pki::identity::SpiffeId;

/// The credentials one request carries.
pub struct Credentials<'a> {
    /// The bearer token, trimmed; `None` when absent or empty.
    pub bearer: Option<&'a str>,
    /// Client certificate chain presented during the TLS handshake, leaf first.
    pub peer_certs: Option<&'a [CertificateDer<'static>]>,
    /// The cluster named by the `clusterid` header, already resolved.
    pub cluster: &'a ClusterTarget,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// SPIFFE identities the caller may request, parsed where the credential was read.
    pub identities: Vec<SpiffeId>,
    /// The Kubernetes service account, for token callers.
    pub service_account: Option<ServiceAccount>,
    /// The pod the token was bound to, when the review says so.
    pub pod: Option<PodRef>,
    pub method: AuthMethod,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub name: String,
    pub uid: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    StaticToken,
    TokenReview,
    ClientCertificate,
}

impl AuthMethod {
    pub fn label(self) -> &'static str {
        match self {
            AuthMethod::StaticToken => "static-token",
            AuthMethod::TokenReview => "token-review",
            AuthMethod::ClientCertificate => "client-certificate",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthnError {
    #[error("no credentials presented")]
    NoCredentials,
    #[error("bearer token not accepted")]
    InvalidToken,
    #[error("malformed authorization header")]
    MalformedHeader,
    #[error("unknown cluster {0:?}")]
    UnknownCluster(String),
    #[error("client certificate not accepted: {0}")]
    InvalidClientCertificate(String),
    #[error("authentication backend unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Authenticator: Send + Sync {
    /// `Ok(None)`: these credentials are not of this authenticator's kind.
    async fn authenticate(
        &self,
        credentials: &Credentials<'_>,
    ) -> Result<Option<Caller>, AuthnError>;
}

/// Tries each authenticator in turn: the first acceptance wins; otherwise the first refusal is
/// reported (a wrong token says more than "no client certificate").
pub async fn authenticate(
    authenticators: &[std::sync::Arc<dyn Authenticator>],
    credentials: &Credentials<'_>,
) -> Result<Caller, AuthnError> {
    let mut first_error = None;
    for authenticator in authenticators {
        match authenticator.authenticate(credentials).await {
            Ok(Some(caller)) => return Ok(caller),
            Ok(None) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or(AuthnError::NoCredentials))
}

/// Extracts the token of an `authorization: Bearer <token>` header. ztunnel sends its token
/// file's raw bytes, trailing newline included, so surrounding whitespace is stripped here.
pub fn parse_bearer(header: Option<&[u8]>) -> Result<Option<&str>, AuthnError> {
    let Some(raw) = header else {
        return Ok(None);
    };
    let value = std::str::from_utf8(raw).map_err(|_| AuthnError::MalformedHeader)?;
    let value = value.trim();
    let Some((scheme, token)) = value.split_once(' ') else {
        return Err(AuthnError::MalformedHeader);
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthnError::MalformedHeader);
    }
    let token = token.trim();
    Ok((!token.is_empty()).then_some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_headers_like_istio_clients_send_them() {
        type Case<'a> = (Option<&'a [u8]>, Result<Option<&'a str>, AuthnError>);
        let cases: Vec<Case<'_>> = vec![
            (None, Ok(None)),
            (Some(b"Bearer abc"), Ok(Some("abc"))),
            (Some(b"bearer abc"), Ok(Some("abc"))),
            (Some(b"Bearer abc\n"), Ok(Some("abc"))),
            (Some(b"Bearer abc\r\n"), Ok(Some("abc"))),
            (Some(b"Bearer   abc  "), Ok(Some("abc"))),
            (Some(b"Bearer "), Err(AuthnError::MalformedHeader)),
            (Some(b"Bearer  \n"), Err(AuthnError::MalformedHeader)),
            (Some(b"Basic abc"), Err(AuthnError::MalformedHeader)),
            (Some(b"abc"), Err(AuthnError::MalformedHeader)),
            (Some(b"Bearer \xff\xfe"), Err(AuthnError::MalformedHeader)),
        ];
        for (header, want) in cases {
            assert_eq!(parse_bearer(header), want, "{header:?}");
        }
    }
}

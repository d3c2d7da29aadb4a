//! SPIFFE identities of Kubernetes service accounts: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
//!
//! Parsing is deliberately stricter than the SPIFFE spec: every part must also be a valid
//! Kubernetes name, so an identity that no service account can hold is never issued.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";
/// Kubernetes caps namespace names at 63 characters (a DNS-1123 label).
const MAX_LABEL: usize = 63;
/// Service-account names are DNS-1123 subdomains: 253 characters at most.
const MAX_SUBDOMAIN: usize = 253;
/// The SPIFFE spec bounds trust domains at 255 bytes.
const MAX_TRUST_DOMAIN: usize = 255;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity does not start with spiffe://")]
    Scheme,
    #[error("invalid trust domain")]
    TrustDomain,
    #[error("identity path is not /ns/<namespace>/sa/<service-account>")]
    Path,
    #[error("invalid namespace name")]
    Namespace,
    #[error("invalid service account name")]
    ServiceAccount,
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        if !is_dns1123_label(namespace) {
            return Err(IdentityError::Namespace);
        }
        if !is_dns1123_subdomain(service_account) {
            return Err(IdentityError::ServiceAccount);
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix(SCHEME).ok_or(IdentityError::Scheme)?;
        let (trust_domain, path) = rest.split_once('/').ok_or(IdentityError::Path)?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(IdentityError::Path);
        };
        // Kubernetes-name validation below also refuses '%' (percent-encoding), '?', '#', '.'
        // and '..' segments and upper case, so no two strings name the same identity.
        Self::new(trust_domain, ns, sa)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// A trust domain as the SPIFFE spec allows it: lower-case letters, digits, `.`, `-`, `_`.
pub fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    let ok = !td.is_empty()
        && td.len() <= MAX_TRUST_DOMAIN
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && td != "."
        && td != "..";
    if ok {
        Ok(())
    } else {
        Err(IdentityError::TrustDomain)
    }
}

/// A DNS-1123 label: what Kubernetes requires of namespace names.
pub fn is_dns1123_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_LABEL
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A DNS-1123 subdomain: what Kubernetes requires of service-account names.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= MAX_SUBDOMAIN && !s.is_empty() && s.split('.').all(is_dns1123_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/bookinfo.reviews"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo.reviews");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo.reviews"
        );
    }

    #[test]
    fn refuses_malformed_identities() {
        let cases = [
            ("", IdentityError::Scheme),
            ("http://cluster.local/ns/a/sa/b", IdentityError::Scheme),
            ("SPIFFE://cluster.local/ns/a/sa/b", IdentityError::Scheme),
            ("spiffe://cluster.local", IdentityError::Path),
            ("spiffe:///ns/a/sa/b", IdentityError::TrustDomain),
            (
                "spiffe://Cluster.Local/ns/a/sa/b",
                IdentityError::TrustDomain,
            ),
            ("spiffe://td:8080/ns/a/sa/b", IdentityError::TrustDomain),
            ("spiffe://user@td/ns/a/sa/b", IdentityError::TrustDomain),
            ("spiffe://cluster.local/ns/a/sa", IdentityError::Path),
            (
                "spiffe://cluster.local/ns/a/sa/",
                IdentityError::ServiceAccount,
            ),
            ("spiffe://cluster.local/ns//sa/b", IdentityError::Namespace),
            ("spiffe://cluster.local/ns/a/sa/b/", IdentityError::Path),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                IdentityError::Path,
            ),
            ("spiffe://cluster.local/sa/b/ns/a", IdentityError::Path),
            ("spiffe://cluster.local//ns/a/sa/b", IdentityError::Path),
            (
                "spiffe://cluster.local/ns/a%2Fb/sa/c",
                IdentityError::Namespace,
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b%2Fc",
                IdentityError::ServiceAccount,
            ),
            (
                "spiffe://cluster.local/ns/../sa/b",
                IdentityError::Namespace,
            ),
            ("spiffe://cluster.local/ns/./sa/b", IdentityError::Namespace),
            (
                "spiffe://cluster.local/ns/a/sa/..",
                IdentityError::ServiceAccount,
            ),
            (
                "spiffe://cluster.local/ns/a/sa/.",
                IdentityError::ServiceAccount,
            ),
            ("spiffe://cluster.local/ns/A/sa/b", IdentityError::Namespace),
            (
                "spiffe://cluster.local/ns/a/sa/b?x=y",
                IdentityError::ServiceAccount,
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b#frag",
                IdentityError::ServiceAccount,
            ),
            (
                "spiffe://cluster.local/ns/-a/sa/b",
                IdentityError::Namespace,
            ),
            (
                "spiffe://cluster.local/ns/a.b/sa/c",
                IdentityError::Namespace,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<SpiffeId>(), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn enforces_kubernetes_name_lengths() {
        let long_ns = "a".repeat(64);
        assert_eq!(
            format!("spiffe://td/ns/{long_ns}/sa/b").parse::<SpiffeId>(),
            Err(IdentityError::Namespace)
        );
        let ok_ns = "a".repeat(63);
        assert!(
            format!("spiffe://td/ns/{ok_ns}/sa/b")
                .parse::<SpiffeId>()
                .is_ok()
        );
    }
}

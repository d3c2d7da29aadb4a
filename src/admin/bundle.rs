//! `/debug/bundle`: the trust state of this replica, as JSON (schema in docs/admin-api.md).

use serde::Serialize;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pki::chain::RootBundle;

#[derive(Debug, Serialize)]
pub struct BundleStatus {
    pub roots: RootsStatus,
    pub issuer: IssuerStatus,
    pub serving_certificate: Option<ServingStatus>,
    /// The leader election (Kubernetes); null without it.
    pub leader: Option<LeaderStatus>,
    /// Every cluster, local first, with its trust-bundle state (Kubernetes); empty without.
    pub clusters: Vec<crate::cluster::ClusterReport>,
    /// Tenant signers (`--signers-file`, `--mesh-config`); null without them.
    pub signers: Option<SignersStatus>,
}

#[derive(Debug, Serialize)]
pub struct SignersStatus {
    pub signers: Vec<SignerStatus>,
    /// Why the last reload failed, while the previous table stays in force; null when it
    /// succeeded.
    pub last_reload_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SignerStatus {
    /// The `CertSigner` value.
    pub name: String,
    /// `cert-manager` with `issuer_ref`, or `kube-csr` with `signer_name`.
    pub backend: &'static str,
    pub issuer_ref: Option<crate::signer::issuer::cert_manager::IssuerRef>,
    pub signer_name: Option<String>,
    /// `file:<path>`, `rootsPEM` or `mesh-config:<signer name>`.
    pub roots_source: String,
    pub roots: Vec<CertificateStatus>,
    /// The namespaces that may ask for it; `["*"]` for any.
    pub namespaces: Vec<String>,
    pub default: bool,
}

pub fn signers_status(
    backend: &'static str,
    table: &crate::signer::tenants::TenantTable,
    last_reload_error: Option<String>,
) -> SignersStatus {
    use crate::signer::tenants::Namespaces;
    SignersStatus {
        signers: table
            .tenants()
            .iter()
            .map(|t| SignerStatus {
                name: t.name.clone(),
                backend,
                issuer_ref: t.route.issuer_ref.clone(),
                signer_name: t.route.kube_csr_signer_name.clone(),
                roots_source: t.roots_source.clone(),
                roots: t
                    .roots
                    .certs()
                    .iter()
                    .map(|c| certificate_status(c))
                    .collect(),
                namespaces: match &t.namespaces {
                    Namespaces::Any => vec!["*".into()],
                    Namespaces::Only(names) => names.clone(),
                },
                default: t.default,
            })
            .collect(),
        last_reload_error,
    }
}

#[derive(Debug, Serialize)]
pub struct LeaderStatus {
    /// This replica's identity in the Lease.
    pub identity: String,
    pub is_leader: bool,
    /// The current holder's identity, when known.
    pub holder: Option<String>,
    /// When the holder acquired the Lease, RFC 3339 UTC.
    pub holder_since: Option<String>,
}

pub fn leader_status(leadership: &crate::leader::Leadership) -> LeaderStatus {
    LeaderStatus {
        identity: leadership.identity.clone(),
        is_leader: leadership.is_leader,
        holder: leadership.holder.clone(),
        holder_since: leadership.holder_since.and_then(|t| {
            let unix = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
            Some(rfc3339(i64::try_from(unix).ok()?))
        }),
    }
}

#[derive(Debug, Serialize)]
pub struct RootsStatus {
    /// Where the roots come from: `file:<path>` (pinned), `local-ca:<dir>`,
    /// `issuer-tofu:<issuer>` (trusted on first use), or `pending` (not known yet).
    pub source: String,
    pub certificates: Vec<CertificateStatus>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CertificateStatus {
    /// SHA-256 of the DER certificate, lower-case hex, as `openssl x509 -fingerprint -sha256`
    /// prints it without colons.
    pub sha256: String,
    pub subject: String,
    /// RFC 3339, UTC.
    pub not_after: String,
    pub not_after_unix: i64,
}

#[derive(Debug, Serialize)]
pub struct IssuerStatus {
    pub kind: &'static str,
    pub ready: bool,
}

#[derive(Debug, Serialize)]
pub struct ServingStatus {
    pub not_after: String,
    pub not_after_unix: i64,
}

pub fn roots_status(source: &str, roots: &RootBundle) -> RootsStatus {
    RootsStatus {
        source: source.to_owned(),
        certificates: roots
            .certs()
            .iter()
            .map(|c| certificate_status(c))
            .collect(),
    }
}

pub fn certificate_status(der: &[u8]) -> CertificateStatus {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let (subject, not_after_unix) = X509Certificate::from_der(der).map_or_else(
        |_| (String::from("<unparsable>"), 0),
        |(_, cert)| {
            (
                cert.subject().to_string(),
                cert.validity().not_after.timestamp(),
            )
        },
    );
    CertificateStatus {
        sha256: hex::encode(digest.as_ref()),
        subject,
        not_after: rfc3339(not_after_unix),
        not_after_unix,
    }
}

pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The earliest notAfter among the roots: what the root-expiry gauge reports.
pub fn earliest_expiry(roots: &RootBundle) -> i64 {
    roots
        .certs()
        .iter()
        .map(|c| certificate_status(c).not_after_unix)
        .min()
        .unwrap_or(0)
}

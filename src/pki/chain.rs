//! Trust roots, chain verification and the response format Istio clients expect.
//!
//! Every chain an issuer returns is verified against the pinned roots before it is handed out:
//! a signer that was hijacked (a rogue issuer, a tampered CertificateRequest status) cannot make
//! workloads accept a certificate the mesh does not trust, nor one for another identity or key.

use std::collections::HashSet;
use std::net::IpAddr;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::pem;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("no certificates")]
    Empty,
    #[error("malformed certificate: {0}")]
    Malformed(String),
    #[error("root certificate is not usable as a trust anchor: {0}")]
    BadRoot(String),
    #[error("chain does not verify against the trusted roots: {0}")]
    Untrusted(String),
    #[error("issued certificate does not carry the requested identities")]
    IdentityMismatch,
    #[error("issued certificate does not carry the requested public key")]
    KeyMismatch,
    #[error("issued certificate lives {issued_secs} s, past the {granted_secs} s granted")]
    OutlivesGrant { issued_secs: i64, granted_secs: u64 },
}

impl ChainError {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ChainError::Empty | ChainError::Malformed(_) => "malformed",
            ChainError::BadRoot(_) | ChainError::Untrusted(_) => "untrusted",
            ChainError::IdentityMismatch => "names",
            ChainError::KeyMismatch => "key",
            ChainError::OutlivesGrant { .. } => "lifetime",
        }
    }
}

/// Signature algorithms accepted on certificate paths: what Istio, cert-manager and Vault CAs
/// sign with. SHA-1 and RSA below 2048 bits are absent on purpose.
static SIGNATURE_ALGORITHMS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// The pinned trust roots: one or more self-signed CA certificates.
#[derive(Clone, Debug)]
pub struct RootBundle {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    /// The bundle as clients receive it: every root, normalised PEM, in file order.
    pem: String,
}

impl RootBundle {
    pub fn from_pem(input: &[u8]) -> Result<Self, ChainError> {
        let certs = pem::parse_certificates(input).map_err(|e| match e {
            pem::PemError::Missing(_) => ChainError::Empty,
            pem::PemError::Malformed(m) => ChainError::Malformed(m),
        })?;
        Self::from_certs(certs)
    }

    pub fn from_certs(certs: Vec<CertificateDer<'static>>) -> Result<Self, ChainError> {
        let certs = dedupe(certs);
        if certs.is_empty() {
            return Err(ChainError::Empty);
        }
        let anchors = certs
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| ChainError::BadRoot(format!("{e:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pem = certs.iter().map(|c| pem::encode_certificate(c)).collect();
        Ok(Self {
            certs,
            anchors,
            pem,
        })
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }
}

/// What the issued leaf must carry, checked on top of the signature path: exactly these
/// names (no more, no fewer, in any order) and this key.
pub struct Expected<'a> {
    pub uris: &'a [String],
    pub dns: &'a [String],
    pub ips: &'a [IpAddr],
    /// DER SubjectPublicKeyInfo of the CSR's key.
    pub spki_der: &'a [u8],
}

impl<'a> Expected<'a> {
    /// A workload leaf: URI SANs only.
    pub fn identities(uris: &'a [String], spki_der: &'a [u8]) -> Self {
        Self {
            uris,
            dns: &[],
            ips: &[],
            spki_der,
        }
    }
}

/// A leaf and its intermediates, in path order (leaf's issuer first), root excluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedChain {
    leaf: CertificateDer<'static>,
    intermediates: Vec<CertificateDer<'static>>,
    /// The leaf's notBefore and notAfter, unix seconds: known without parsing it again.
    validity: (i64, i64),
}

impl VerifiedChain {
    /// For a leaf signed in this process by a CA whose own path to the pinned roots was verified
    /// when it was loaded (see `signer::issuer::local_ca`): re-verifying our own signature on
    /// every request would double the CPU cost of signing and defend against nothing.
    pub(crate) fn signed_in_process(
        leaf: CertificateDer<'static>,
        intermediates: Vec<CertificateDer<'static>>,
        validity: (i64, i64),
    ) -> Self {
        Self {
            leaf,
            intermediates,
            validity,
        }
    }

    /// Refuses a leaf whose notAfter lies more than `skew` past `now + granted`: a hijacked or
    /// misconfigured issuer must not hand out certificates that outlive what was asked for.
    pub fn check_lifetime(
        &self,
        now_unix: i64,
        granted: std::time::Duration,
        skew: std::time::Duration,
    ) -> Result<(), ChainError> {
        let limit = i64::try_from((granted + skew).as_secs())
            .unwrap_or(i64::MAX)
            .saturating_add(now_unix);
        if self.validity.1 > limit {
            return Err(ChainError::OutlivesGrant {
                issued_secs: self.validity.1 - now_unix,
                granted_secs: granted.as_secs(),
            });
        }
        Ok(())
    }

    /// notAfter - notBefore of the leaf, in seconds.
    pub fn lifetime_secs(&self) -> i64 {
        self.validity.1 - self.validity.0
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.leaf
    }

    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// The `cert_chain` of an IstioCertificateResponse: the leaf, each intermediate as its own
    /// element (ztunnel reads only the first PEM block of middle elements), the root bundle last.
    pub fn to_response(&self, roots: &RootBundle) -> Vec<String> {
        let mut out = Vec::with_capacity(self.intermediates.len() + 2);
        out.push(pem::encode_certificate(&self.leaf));
        out.extend(
            self.intermediates
                .iter()
                .map(|c| pem::encode_certificate(c)),
        );
        out.push(roots.pem().to_owned());
        out
    }
}

/// Verifies a chain as an issuer returned it (leaf first; intermediates in any order, possibly
/// repeated, possibly including roots or unrelated certificates) against the pinned roots, and
/// checks the leaf carries exactly the expected identities and key.
pub fn verify(
    issued: &[CertificateDer<'static>],
    roots: &RootBundle,
    now: UnixTime,
    expected: &Expected<'_>,
) -> Result<VerifiedChain, ChainError> {
    let mut certs = dedupe(issued.to_vec()).into_iter();
    let leaf = certs.next().ok_or(ChainError::Empty)?;
    let candidates: Vec<CertificateDer<'static>> = certs.collect();
    let intermediates = verify_path(&leaf, &candidates, roots, now)?;
    let validity = check_leaf(&leaf, expected)?;
    Ok(VerifiedChain {
        leaf,
        intermediates,
        validity,
    })
}

/// Builds and verifies the path from `leaf` to one of the roots; returns the intermediates used,
/// in order. Roots and unrelated certificates among `candidates` are left out.
pub fn verify_path(
    leaf: &CertificateDer<'static>,
    candidates: &[CertificateDer<'static>],
    roots: &RootBundle,
    now: UnixTime,
) -> Result<Vec<CertificateDer<'static>>, ChainError> {
    let ee = EndEntityCert::try_from(leaf).map_err(|e| ChainError::Malformed(format!("{e:?}")))?;
    let path = ee
        .verify_for_usage(
            SIGNATURE_ALGORITHMS,
            roots.anchors(),
            candidates,
            now,
            KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| ChainError::Untrusted(format!("{e:?}")))?;
    Ok(path
        .intermediate_certificates()
        .map(|c| c.der().into_owned())
        .collect())
}

/// Checks identities and key; returns the leaf's validity (notBefore, notAfter).
fn check_leaf(
    leaf: &CertificateDer<'_>,
    expected: &Expected<'_>,
) -> Result<(i64, i64), ChainError> {
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| ChainError::Malformed(e.to_string()))?;
    if cert.public_key().raw != expected.spki_der {
        return Err(ChainError::KeyMismatch);
    }
    let names = LeafSans::of(&cert)?;
    let sorted = |items: &[String]| {
        let mut v: Vec<String> = items.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    let mut ips = expected.ips.to_vec();
    ips.sort_unstable();
    ips.dedup();
    if names.uris != sorted(expected.uris) || names.dns != sorted(expected.dns) || names.ips != ips
    {
        return Err(ChainError::IdentityMismatch);
    }
    let validity = cert.validity();
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// A leaf's SANs by kind, each sorted and deduplicated; a kind other than these is an error.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LeafSans {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl LeafSans {
    pub fn of(cert: &X509Certificate<'_>) -> Result<Self, ChainError> {
        let mut out = Self::default();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => out.uris.push((*u).to_owned()),
                        GeneralName::DNSName(d) => out.dns.push((*d).to_owned()),
                        GeneralName::IPAddress(bytes) => out.ips.push(ip_from_bytes(bytes)?),
                        _ => return Err(ChainError::IdentityMismatch),
                    }
                }
            }
        }
        out.uris.sort_unstable();
        out.uris.dedup();
        out.dns.sort_unstable();
        out.dns.dedup();
        out.ips.sort_unstable();
        out.ips.dedup();
        Ok(out)
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, ChainError> {
    match bytes.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(bytes).map_err(|_| ChainError::IdentityMismatch)?,
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(bytes).map_err(|_| ChainError::IdentityMismatch)?,
        )),
        _ => Err(ChainError::IdentityMismatch),
    }
}

/// The URI SANs of a certificate; any other SAN type on a workload leaf is an error.
pub fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, ChainError> {
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(*u),
                    _ => return Err(ChainError::IdentityMismatch),
                }
            }
        }
    }
    Ok(uris)
}

fn dedupe(certs: Vec<CertificateDer<'static>>) -> Vec<CertificateDer<'static>> {
    let mut seen = HashSet::new();
    certs
        .into_iter()
        .filter(|c| seen.insert(c.as_ref().to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::testing::{KeyAlg, TestCa};

    const ID: &str = "spiffe://cluster.local/ns/default/sa/default";

    fn now() -> UnixTime {
        UnixTime::now()
    }

    fn expected<'a>(uris: &'a [String], leaf: &'a CertificateDer<'_>) -> Expected<'a> {
        let (_, cert) = X509Certificate::from_der(leaf).unwrap();
        let spki = cert.public_key().raw;
        // Leak-free: tie the slice to the leaf's buffer, which outlives the check.
        let start = spki.as_ptr() as usize - leaf.as_ref().as_ptr() as usize;
        Expected::identities(uris, &leaf.as_ref()[start..start + spki.len()])
    }

    fn ids() -> Vec<String> {
        vec![ID.to_owned()]
    }

    #[test]
    fn verifies_a_leaf_signed_by_a_root() {
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let roots = RootBundle::from_certs(vec![root.cert.clone()]).unwrap();
        let (leaf, _) = root.leaf(ID);
        let ids = ids();
        let chain = verify(
            std::slice::from_ref(&leaf),
            &roots,
            now(),
            &expected(&ids, &leaf),
        )
        .unwrap();
        assert!(chain.intermediates().is_empty());
        let response = chain.to_response(&roots);
        assert_eq!(response.len(), 2);
        assert_eq!(response[1], roots.pem());
    }

    #[test]
    fn orders_dedupes_and_drops_roots_from_issuer_chains() {
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let mid1 = root.intermediate("mid1", KeyAlg::EcdsaP256);
        let mid2 = mid1.intermediate("mid2", KeyAlg::Rsa2048);
        let unrelated = TestCa::root("unrelated", KeyAlg::EcdsaP256);
        let roots = RootBundle::from_certs(vec![root.cert.clone()]).unwrap();
        let (leaf, _) = mid2.leaf(ID);
        // Vault-style answer: shuffled, duplicated, with the root and a stranger mixed in.
        let issued = vec![
            leaf.clone(),
            root.cert.clone(),
            mid1.cert.clone(),
            unrelated.cert.clone(),
            mid2.cert.clone(),
            mid1.cert.clone(),
        ];
        let ids = ids();
        let chain = verify(&issued, &roots, now(), &expected(&ids, &leaf)).unwrap();
        assert_eq!(
            chain.intermediates(),
            &[mid2.cert.clone(), mid1.cert.clone()]
        );
        let response = chain.to_response(&roots);
        assert_eq!(response.len(), 4, "leaf, two intermediates, root bundle");
        for element in &response[..3] {
            assert_eq!(element.matches("BEGIN CERTIFICATE").count(), 1);
        }
    }

    #[test]
    fn root_bundle_holds_several_roots_and_answers_them_all() {
        let old = TestCa::root("old", KeyAlg::EcdsaP256);
        let new = TestCa::root("new", KeyAlg::EcdsaP384);
        let pem = format!("{}\n{}", old.cert_pem(), new.cert_pem());
        let roots = RootBundle::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(roots.certs().len(), 2);
        let ids = ids();
        for ca in [&old, &new] {
            let (leaf, _) = ca.leaf(ID);
            let chain = verify(
                std::slice::from_ref(&leaf),
                &roots,
                now(),
                &expected(&ids, &leaf),
            )
            .unwrap();
            let last = chain.to_response(&roots).pop().unwrap();
            assert_eq!(last.matches("BEGIN CERTIFICATE").count(), 2);
        }
    }

    #[test]
    fn refuses_a_chain_from_a_foreign_ca() {
        let pinned = TestCa::root("pinned", KeyAlg::EcdsaP256);
        let rogue = TestCa::root("rogue", KeyAlg::EcdsaP256);
        let roots = RootBundle::from_certs(vec![pinned.cert.clone()]).unwrap();
        let (leaf, _) = rogue.leaf(ID);
        let ids = ids();
        let err = verify(
            &[leaf.clone(), rogue.cert.clone()],
            &roots,
            now(),
            &expected(&ids, &leaf),
        )
        .unwrap_err();
        assert!(matches!(err, ChainError::Untrusted(_)), "{err:?}");
    }

    #[test]
    fn refuses_a_chain_missing_its_intermediate() {
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let mid = root.intermediate("mid", KeyAlg::EcdsaP256);
        let roots = RootBundle::from_certs(vec![root.cert.clone()]).unwrap();
        let (leaf, _) = mid.leaf(ID);
        let ids = ids();
        assert!(matches!(
            verify(
                std::slice::from_ref(&leaf),
                &roots,
                now(),
                &expected(&ids, &leaf)
            ),
            Err(ChainError::Untrusted(_))
        ));
    }

    #[test]
    fn refuses_a_leaf_for_another_identity_or_key() {
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let roots = RootBundle::from_certs(vec![root.cert.clone()]).unwrap();
        let (leaf, _) = root.leaf("spiffe://cluster.local/ns/other/sa/other");
        let ids = ids();
        assert_eq!(
            verify(
                std::slice::from_ref(&leaf),
                &roots,
                now(),
                &expected(&ids, &leaf)
            ),
            Err(ChainError::IdentityMismatch)
        );
        let (leaf, _) = root.leaf(ID);
        let (other_leaf, _) = root.leaf(ID);
        assert_eq!(
            verify(&[leaf], &roots, now(), &expected(&ids, &other_leaf)),
            Err(ChainError::KeyMismatch)
        );
    }

    #[test]
    fn refuses_an_expired_leaf() {
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let roots = RootBundle::from_certs(vec![root.cert.clone()]).unwrap();
        let (leaf, _) = root.leaf(ID);
        let later =
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now().as_secs() + 2 * 3600));
        let ids = ids();
        assert!(matches!(
            verify(
                std::slice::from_ref(&leaf),
                &roots,
                later,
                &expected(&ids, &leaf)
            ),
            Err(ChainError::Untrusted(_))
        ));
    }

    #[test]
    fn refuses_empty_or_garbage_root_bundles() {
        assert!(matches!(RootBundle::from_pem(b""), Err(ChainError::Empty)));
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(RootBundle::from_pem(garbage.as_bytes()).is_err());
    }
}

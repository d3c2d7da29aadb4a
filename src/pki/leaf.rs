//! Certificates the built-in CA issues: workload leaves and its own serving certificate.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber, SigningKey,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::pki::identity::SpiffeId;

/// Backdating notBefore absorbs clock skew between this replica and the workloads: a leaf must
/// not be "not yet valid" on a node whose clock is a little behind.
pub const NOT_BEFORE_SKEW: Duration = Duration::from_secs(60);
/// RFC 5280 allows at most 20 octets; 16 random bytes is what Go's and istiod's CAs use.
const SERIAL_BYTES: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeafError {
    #[error("the signing CA certificate has expired")]
    CaExpired,
    #[error("invalid SAN: {0}")]
    InvalidSan(String),
    #[error("signing failed: {0}")]
    Signing(String),
}

/// The validity window of a new leaf: from `now - skew` to `now + lifetime`, never past the CA.
pub fn validity(
    now: OffsetDateTime,
    lifetime: Duration,
    ca_not_after: OffsetDateTime,
) -> Result<(OffsetDateTime, OffsetDateTime), LeafError> {
    if ca_not_after <= now {
        return Err(LeafError::CaExpired);
    }
    // A lifetime past the calendar's end is simply "as long as the CA lives".
    let not_after = time::Duration::try_from(lifetime)
        .ok()
        .and_then(|d| now.checked_add(d))
        .map_or(ca_not_after, |end| end.min(ca_not_after));
    Ok((now - NOT_BEFORE_SKEW, not_after))
}

/// A random, positive serial number of at most 20 octets.
pub fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; SERIAL_BYTES];
    // A failing system RNG is not recoverable; ring only fails on broken platforms.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        panic!("system random number generator failed");
    }
    // Clear the sign bit (positive) and set the next one (no leading zero octet to trim).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// The names a leaf carries. Every certificate this project asks for or signs is described by
/// one: a workload's URI SANs, a serving certificate's DNS names and IPs, istiod's both plus a CN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeafNames {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// The subject CN, when the certificate has one (istiod's); workloads have none.
    pub common_name: Option<String>,
}

impl LeafNames {
    /// A workload's: its SPIFFE identities only, as URI SANs.
    pub fn identities(identities: &[SpiffeId]) -> Self {
        Self {
            uris: identities.iter().map(SpiffeId::to_string).collect(),
            ..Self::default()
        }
    }

    /// Every name, comma-separated, for request annotations and logs.
    pub fn describe(&self) -> String {
        let mut all: Vec<String> = self.uris.clone();
        all.extend(self.dns.iter().cloned());
        all.extend(self.ips.iter().map(IpAddr::to_string));
        all.join(",")
    }

    fn sans(&self) -> Result<Vec<SanType>, LeafError> {
        let invalid = |name: &String| LeafError::InvalidSan(name.clone());
        let mut sans = Vec::with_capacity(self.uris.len() + self.dns.len() + self.ips.len());
        for uri in &self.uris {
            sans.push(SanType::URI(
                uri.as_str().try_into().map_err(|_| invalid(uri))?,
            ));
        }
        for name in &self.dns {
            sans.push(SanType::DnsName(
                name.as_str().try_into().map_err(|_| invalid(name))?,
            ));
        }
        sans.extend(self.ips.iter().copied().map(SanType::IpAddress));
        Ok(sans)
    }
}

/// Issues a workload certificate: empty subject, the URI SANs (critical because the subject is
/// empty), digitalSignature + keyEncipherment, serverAuth + clientAuth.
pub fn sign_workload(
    uris: &[String],
    public_key: &impl PublicKeyData,
    window: (OffsetDateTime, OffsetDateTime),
    issuer: &rcgen::Issuer<'_, impl SigningKey>,
) -> Result<CertificateDer<'static>, LeafError> {
    let names = LeafNames {
        uris: uris.to_vec(),
        ..LeafNames::default()
    };
    sign_leaf(&names, public_key, window, issuer)
}

/// Issues a TLS leaf for `names`: the same profile as workloads, with a CN when one is given.
pub fn sign_leaf(
    names: &LeafNames,
    public_key: &impl PublicKeyData,
    window: (OffsetDateTime, OffsetDateTime),
    issuer: &rcgen::Issuer<'_, impl SigningKey>,
) -> Result<CertificateDer<'static>, LeafError> {
    let mut subject = DistinguishedName::new();
    if let Some(cn) = &names.common_name {
        subject.push(rcgen::DnType::CommonName, cn.as_str());
    }
    sign_tls_leaf(names.sans()?, subject, public_key, window, issuer)
}

/// Parameters of a CA certificate (self-signed root or intermediate) valid from an hour ago
/// (clock skew) until `not_after`: keyCertSign + cRLSign + digitalSignature, no path limit.
pub fn ca_params(
    organization: &str,
    common_name: &str,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, organization);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params
}

fn sign_tls_leaf(
    sans: Vec<SanType>,
    subject: DistinguishedName,
    public_key: &impl PublicKeyData,
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
    issuer: &rcgen::Issuer<'_, impl SigningKey>,
) -> Result<CertificateDer<'static>, LeafError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject;
    params.subject_alt_names = sans;
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    // basicConstraints CA:false, critical: a leaf can never be taken for a CA, whatever a
    // relying party assumes when the extension is absent. Written by hand because rcgen's
    // `IsCa::ExplicitNoCa` encodes the DEFAULT FALSE explicitly, which DER forbids and strict
    // parsers (Python's cryptography, Go's x509 in some versions) refuse.
    params.is_ca = IsCa::NoCa;
    params.custom_extensions = vec![leaf_basic_constraints()];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(public_key, issuer)
        .map_err(|e| LeafError::Signing(e.to_string()))?;
    Ok(cert.der().clone())
}

/// basicConstraints (2.5.29.19), critical, `SEQUENCE {}`: cA absent means FALSE.
fn leaf_basic_constraints() -> rcgen::CustomExtension {
    const BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
    const EMPTY_SEQUENCE: [u8; 2] = [0x30, 0x00];
    let mut ext =
        rcgen::CustomExtension::from_oid_content(BASIC_CONSTRAINTS, EMPTY_SEQUENCE.to_vec());
    ext.set_criticality(true);
    ext
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(secs).unwrap()
    }

    #[test]
    fn validity_backdates_and_keeps_the_lifetime() {
        let (nb, na) = validity(at(1_000_000), Duration::from_secs(3600), at(9_000_000)).unwrap();
        assert_eq!(nb, at(1_000_000 - 60));
        assert_eq!(na, at(1_003_600));
    }

    #[test]
    fn validity_never_outlives_the_ca() {
        let (_, na) = validity(at(1_000_000), Duration::from_secs(3600), at(1_000_100)).unwrap();
        assert_eq!(na, at(1_000_100));
    }

    #[test]
    fn validity_survives_absurd_lifetimes() {
        let (_, na) =
            validity(at(1_000_000), Duration::from_secs(u64::MAX), at(9_000_000)).unwrap();
        assert_eq!(na, at(9_000_000));
    }

    #[test]
    fn validity_refuses_an_expired_ca() {
        assert_eq!(
            validity(at(1_000_000), Duration::from_secs(1), at(1_000_000)),
            Err(LeafError::CaExpired)
        );
    }

    #[test]
    fn serials_are_positive_and_sixteen_octets() {
        for _ in 0..64 {
            let serial = random_serial().to_bytes();
            assert_eq!(serial.len(), 16);
            assert_eq!(serial[0] & 0xc0, 0x40);
        }
        assert_ne!(random_serial().to_bytes(), random_serial().to_bytes());
    }

    #[test]
    fn leaves_carry_a_critical_basic_constraints_ca_false() {
        use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
        let ca = crate::pki::testing::TestCa::root("root", crate::pki::testing::KeyAlg::EcdsaP256);
        let key = crate::pki::testing::KeyAlg::EcdsaP256.generate();
        let now = OffsetDateTime::now_utc();
        let leaf = sign_workload(
            &["spiffe://cluster.local/ns/a/sa/b".to_owned()],
            &key,
            (now, now + time::Duration::hours(1)),
            &ca.issuer(),
        )
        .unwrap();
        let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
        let constraints = cert
            .extensions()
            .iter()
            .find(|e| matches!(e.parsed_extension(), ParsedExtension::BasicConstraints(_)))
            .expect("basicConstraints present");
        assert!(constraints.critical);
        let ParsedExtension::BasicConstraints(bc) = constraints.parsed_extension() else {
            unreachable!()
        };
        assert!(!bc.ca);
        // DER: the DEFAULT FALSE must be absent, so the value is an empty SEQUENCE.
        assert_eq!(constraints.value, [0x30, 0x00]);
    }
}

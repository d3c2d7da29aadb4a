//! Parsing and policy of workload CSRs (istio-csr's rules, the strictest of the references).
//!
//! A CSR passes only if it is one PEM block of bounded size, its self-signature verifies with a
//! modern algorithm, its key is RSA >= 2048 or ECDSA P-256/P-384, its subject has no common name,
//! and its only extensions are URI SANs, KeyUsage (digitalSignature, keyEncipherment) and
//! ExtendedKeyUsage (serverAuth, clientAuth).

use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_PKCS9_EXTENSION_REQUEST, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
    OID_X509_COMMON_NAME, OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE,
    OID_X509_EXT_SUBJECT_ALT_NAME, OID_X509_ORGANIZATION_NAME,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use super::identity::SpiffeId;

/// A CSR PEM larger than this is refused before any parsing (README, "The CSR").
/// Real CSRs are 0.5 to 2 KiB; 64 KiB leaves room for RSA-8192 and long identities.
pub const MAX_CSR_PEM_BYTES: usize = 64 * 1024;
/// ring verifies RSA keys up to 8192 bits; larger ones could never be signed for anyway.
const MAX_RSA_BITS: usize = 8192;
const MIN_RSA_BITS: usize = 2048;

/// KeyUsage bits (RFC 5280 4.2.1.3) as x509-parser numbers them.
const KU_DIGITAL_SIGNATURE: u16 = 1 << 0;
const KU_KEY_ENCIPHERMENT: u16 = 1 << 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("CSR is larger than {MAX_CSR_PEM_BYTES} bytes")]
    TooLarge,
    #[error("CSR must be exactly one PEM CERTIFICATE REQUEST block")]
    NotOnePemBlock,
    #[error("malformed CSR: {0}")]
    Malformed(String),
    #[error("CSR signature algorithm is not allowed")]
    SignatureAlgorithm,
    #[error("CSR self-signature does not verify")]
    BadSignature,
    #[error("CSR key type is not allowed (RSA >= 2048 bits or ECDSA P-256/P-384 only)")]
    KeyType,
    #[error("CSR subject must not carry a common name")]
    CommonName,
    #[error("CSR subject must be empty or a single empty O")]
    Subject,
    #[error("CSR requests a {0} SAN; only URI SANs are allowed")]
    ForbiddenSan(&'static str),
    #[error("CSR has no URI SAN")]
    NoUriSan,
    #[error("CSR repeats a URI SAN")]
    DuplicateUriSan,
    #[error("CSR requests extension {0}, which is not allowed")]
    ForbiddenExtension(String),
    #[error("CSR repeats extension {0}")]
    DuplicateExtension(String),
    #[error("CSR requests a key usage other than digitalSignature and keyEncipherment")]
    ForbiddenKeyUsage,
    #[error("CSR requests an extended key usage other than serverAuth and clientAuth")]
    ForbiddenExtendedKeyUsage,
    #[error("CSR carries attribute {0}, which is not allowed")]
    ForbiddenAttribute(String),
    /// Every other rule passed, but a URI SAN is not `spiffe://<td>/ns/<ns>/sa/<sa>`: no caller
    /// holds such an identity, so the signer refuses it as one the caller may not request.
    #[error("CSR requests URI SANs {0:?}, not all of them service-account identities")]
    NotAnIdentity(Vec<String>),
}

/// The public key of a checked CSR, ready to be placed into a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsrPublicKey {
    pub key_type: KeyType,
    /// The DER SubjectPublicKeyInfo, exactly as the CSR carried it.
    pub spki_der: Vec<u8>,
    /// The subjectPublicKey BIT STRING contents.
    pub raw_key: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    Rsa { bits: usize },
    EcdsaP256,
    EcdsaP384,
}

impl KeyType {
    /// A bounded label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            KeyType::Rsa { .. } => "rsa",
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
        }
    }
}

impl rcgen::PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw_key
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        // Only the key-type OIDs of these are written into the SubjectPublicKeyInfo.
        match self.key_type {
            KeyType::Rsa { .. } => &rcgen::PKCS_RSA_SHA256,
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }
}

/// A CSR that passed every rule: its requested identities and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedCsr {
    /// The URI SANs, parsed, in the order the CSR lists them (no duplicates).
    pub identities: Vec<SpiffeId>,
    pub public_key: CsrPublicKey,
    /// The DER CSR, for issuers that forward it (cert-manager, the Kubernetes CSR API).
    pub der: Vec<u8>,
}

/// Parses one PEM CSR and applies every rule; see the module documentation.
pub fn parse_and_check(pem: &str) -> Result<CheckedCsr, CsrError> {
    if pem.len() > MAX_CSR_PEM_BYTES {
        return Err(CsrError::TooLarge);
    }
    if pem.matches("-----BEGIN ").count() != 1 {
        return Err(CsrError::NotOnePemBlock);
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CsrError::NotOnePemBlock)?;
    check_der(der.as_ref())
}

/// Applies every rule to a DER CSR.
pub fn check_der(der: &[u8]) -> Result<CheckedCsr, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed("trailing data after the CSR".into()));
    }
    check_signature_algorithm(&csr)?;
    let public_key = check_public_key(&csr)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    check_subject(&csr)?;
    let uris = check_attributes_and_extensions(&csr)?;
    // Parsed last, so that a CSR breaking another rule is refused for that rule as before.
    let parsed: Result<Vec<SpiffeId>, _> = uris.iter().map(|uri| uri.parse()).collect();
    let Ok(identities) = parsed else {
        return Err(CsrError::NotAnIdentity(uris));
    };
    Ok(CheckedCsr {
        identities,
        public_key,
        der: der.to_vec(),
    })
}

/// Reads a CSR this process made for itself (serving certificates, istiod's): its key and DER,
/// without the workload policy, which forbids the DNS names and CN those carry. The names to
/// sign come from the caller, never from this CSR.
pub fn own_der(der: &[u8]) -> Result<CheckedCsr, CsrError> {
    let (_, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    let public_key = check_public_key(&csr)?;
    Ok(CheckedCsr {
        identities: Vec::new(),
        public_key,
        der: der.to_vec(),
    })
}

fn check_signature_algorithm(csr: &X509CertificationRequest<'_>) -> Result<(), CsrError> {
    let alg = &csr.signature_algorithm.algorithm;
    // SHA-1 (still accepted by x509-parser's verifier) and Ed25519 are refused here.
    let allowed = [
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_PKCS1_RSASSAPSS,
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
    ];
    if allowed.contains(alg) {
        Ok(())
    } else {
        Err(CsrError::SignatureAlgorithm)
    }
}

fn check_public_key(csr: &X509CertificationRequest<'_>) -> Result<CsrPublicKey, CsrError> {
    let spki = &csr.certification_request_info.subject_pki;
    let key_oid = &spki.algorithm.algorithm;
    let key_type = if *key_oid == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(CsrError::KeyType);
        };
        let bits = rsa.key_size();
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(CsrError::KeyType);
        }
        KeyType::Rsa { bits }
    } else if *key_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or(CsrError::KeyType)?;
        if curve == OID_EC_P256 {
            KeyType::EcdsaP256
        } else if curve == OID_NIST_EC_P384 {
            KeyType::EcdsaP384
        } else {
            return Err(CsrError::KeyType);
        }
    } else {
        return Err(CsrError::KeyType);
    };
    Ok(CsrPublicKey {
        key_type,
        spki_der: spki.raw.to_vec(),
        raw_key: spki.subject_public_key.data.to_vec(),
    })
}

/// The subject is empty or a single empty `O` (README, "The CSR"), what pilot-agent and
/// ztunnel send. cert-manager's CA issuer copies the CSR's subject into the leaf, so anything
/// else (`O=system:masters`, `OU`, `emailAddress`, `UID`) would be a DN chosen by the workload
/// that DN-mapping peers (Kafka, databases) might trust.
fn check_subject(csr: &X509CertificationRequest<'_>) -> Result<(), CsrError> {
    let subject = &csr.certification_request_info.subject;
    let attributes: Vec<_> = subject.iter_attributes().collect();
    if attributes
        .iter()
        .any(|attr| *attr.attr_type() == OID_X509_COMMON_NAME)
    {
        return Err(CsrError::CommonName);
    }
    match attributes.as_slice() {
        [] => Ok(()),
        [only]
            if subject.iter().count() == 1
                && *only.attr_type() == OID_X509_ORGANIZATION_NAME
                && only.as_str() == Ok("") =>
        {
            Ok(())
        }
        _ => Err(CsrError::Subject),
    }
}

fn check_attributes_and_extensions(
    csr: &X509CertificationRequest<'_>,
) -> Result<Vec<String>, CsrError> {
    let info = &csr.certification_request_info;
    let mut uris = Vec::new();
    let mut seen_extension_request = false;
    for attribute in info.iter_attributes() {
        if attribute.oid != OID_PKCS9_EXTENSION_REQUEST {
            return Err(CsrError::ForbiddenAttribute(attribute.oid.to_id_string()));
        }
        if std::mem::replace(&mut seen_extension_request, true) {
            return Err(CsrError::Malformed(
                "more than one extension request".into(),
            ));
        }
        // x509-parser reads only the first value of the attribute's SET (and hands us the SET
        // header with that value only); Go ignores an attribute with several. A second value
        // would be checked by nobody here yet honoured by some downstream signer.
        if !holds_exactly_one_value(attribute.value) {
            return Err(CsrError::Malformed(
                "the extension request must hold exactly one value".into(),
            ));
        }
        let ParsedCriAttribute::ExtensionRequest(request) = attribute.parsed_attribute() else {
            return Err(CsrError::Malformed("unparsable extension request".into()));
        };
        let mut seen = Vec::new();
        for ext in &request.extensions {
            if seen.contains(&ext.oid) {
                return Err(CsrError::DuplicateExtension(ext.oid.to_id_string()));
            }
            seen.push(ext.oid.clone());
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san)
                    if ext.oid == OID_X509_EXT_SUBJECT_ALT_NAME =>
                {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(uri) => {
                                if uris.iter().any(|u: &String| u == uri) {
                                    return Err(CsrError::DuplicateUriSan);
                                }
                                uris.push((*uri).to_owned());
                            }
                            other => return Err(CsrError::ForbiddenSan(san_kind(other))),
                        }
                    }
                }
                ParsedExtension::KeyUsage(ku) if ext.oid == OID_X509_EXT_KEY_USAGE => {
                    if ku.flags & !(KU_DIGITAL_SIGNATURE | KU_KEY_ENCIPHERMENT) != 0 {
                        return Err(CsrError::ForbiddenKeyUsage);
                    }
                }
                ParsedExtension::ExtendedKeyUsage(eku)
                    if ext.oid == OID_X509_EXT_EXTENDED_KEY_USAGE =>
                {
                    let only_tls = !eku.any
                        && !eku.code_signing
                        && !eku.email_protection
                        && !eku.time_stamping
                        && !eku.ocsp_signing
                        && eku.other.is_empty();
                    if !only_tls {
                        return Err(CsrError::ForbiddenExtendedKeyUsage);
                    }
                }
                ParsedExtension::ParseError { error } => {
                    return Err(CsrError::Malformed(format!(
                        "extension {}: {error}",
                        ext.oid.to_id_string()
                    )));
                }
                _ => return Err(CsrError::ForbiddenExtension(ext.oid.to_id_string())),
            }
        }
    }
    if uris.is_empty() {
        return Err(CsrError::NoUriSan);
    }
    Ok(uris)
}

/// `value` is the attribute's SET header followed by the value(s) x509-parser consumed: the
/// SET's declared length must be exactly one element long.
fn holds_exactly_one_value(value: &[u8]) -> bool {
    super::der::der_elements(value).is_some_and(|elements| elements.len() == 1)
}

fn san_kind(name: &GeneralName<'_>) -> &'static str {
    match name {
        GeneralName::DNSName(_) => "DNS",
        GeneralName::IPAddress(_) => "IP",
        GeneralName::RFC822Name(_) => "email",
        GeneralName::DirectoryName(_) => "directory name",
        GeneralName::OtherName(..) => "other name",
        GeneralName::RegisteredID(_) => "registered ID",
        GeneralName::X400Address(_) => "X.400 address",
        GeneralName::EDIPartyName(_) => "EDI party name",
        GeneralName::URI(_) => "URI",
        GeneralName::Invalid(..) => "invalid",
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::process::Command;

    use rcgen::{ExtendedKeyUsagePurpose as Eku, KeyUsagePurpose as Ku};

    use super::*;
    use crate::pki::testing::{CsrBuilder, KeyAlg};

    const ID: &str = "spiffe://cluster.local/ns/default/sa/default";

    fn ids(uris: &[&str]) -> Vec<SpiffeId> {
        uris.iter().map(|u| u.parse().unwrap()).collect()
    }

    fn check(builder: CsrBuilder) -> Result<CheckedCsr, CsrError> {
        parse_and_check(&builder.build_pem())
    }

    #[test]
    fn accepts_istio_style_csrs_for_every_allowed_key_type() {
        for alg in [
            KeyAlg::EcdsaP256,
            KeyAlg::EcdsaP384,
            KeyAlg::Rsa2048,
            KeyAlg::Rsa3072,
        ] {
            let csr =
                check(CsrBuilder::new(alg).uri(ID)).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(csr.identities, ids(&[ID]));
        }
    }

    #[test]
    fn reports_key_types() {
        let key_type = |alg| {
            check(CsrBuilder::new(alg).uri(ID))
                .unwrap()
                .public_key
                .key_type
        };
        assert_eq!(key_type(KeyAlg::EcdsaP256), KeyType::EcdsaP256);
        assert_eq!(key_type(KeyAlg::EcdsaP384), KeyType::EcdsaP384);
        assert_eq!(key_type(KeyAlg::Rsa2048), KeyType::Rsa { bits: 2048 });
    }

    #[test]
    fn accepts_allowed_usages_and_an_organization() {
        let csr = CsrBuilder::new(KeyAlg::EcdsaP256)
            .uri(ID)
            .organization("")
            .key_usages(vec![Ku::DigitalSignature, Ku::KeyEncipherment])
            .extended_key_usages(vec![Eku::ServerAuth, Eku::ClientAuth]);
        check(csr).unwrap();
    }

    #[test]
    fn the_subject_is_empty_or_a_single_empty_organization() {
        let p256 = || CsrBuilder::new(KeyAlg::EcdsaP256).uri(ID);
        check(p256()).unwrap();
        check(p256().organization("")).unwrap();
        let refused: Vec<(&str, CsrBuilder)> = vec![
            ("O=system:masters", p256().organization("system:masters")),
            ("OU", p256().subject_attribute(&[2, 5, 4, 11], "admins")),
            (
                "emailAddress",
                p256().subject_attribute(&[1, 2, 840, 113_549, 1, 9, 1], "a@b.c"),
            ),
            (
                "UID",
                p256().subject_attribute(&[0, 9, 2342, 19_200_300, 100, 1, 1], "root"),
            ),
            (
                "empty O and OU",
                p256()
                    .organization("")
                    .subject_attribute(&[2, 5, 4, 11], ""),
            ),
            ("C", p256().subject_attribute(&[2, 5, 4, 6], "US")),
        ];
        for (what, csr) in refused {
            assert_eq!(check(csr).unwrap_err(), CsrError::Subject, "{what}");
        }
    }

    #[test]
    fn keeps_several_uri_sans_in_order() {
        let other = "spiffe://cluster.local/ns/a/sa/b";
        let csr = check(CsrBuilder::new(KeyAlg::EcdsaP256).uri(ID).uri(other)).unwrap();
        assert_eq!(csr.identities, ids(&[ID, other]));
    }

    #[test]
    fn refuses_uris_that_are_not_service_account_identities_after_every_other_rule() {
        let p256 = || CsrBuilder::new(KeyAlg::EcdsaP256);
        for other in [
            "spiffe://cluster.local/foo",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "https://example.com/ns/a/sa/b",
        ] {
            assert_eq!(
                check(p256().uri(ID).uri(other)).unwrap_err(),
                CsrError::NotAnIdentity(vec![ID.to_owned(), other.to_owned()]),
                "{other}"
            );
            // Any other violation is reported first, as it was before identities were parsed.
            assert_eq!(
                check(p256().uri(other).dns("foo.example.com")).unwrap_err(),
                CsrError::ForbiddenSan("DNS"),
                "{other}"
            );
        }
    }

    #[test]
    fn refuses_policy_violations() {
        let p256 = || CsrBuilder::new(KeyAlg::EcdsaP256);
        let cases: Vec<(&str, CsrBuilder, CsrError)> = vec![
            (
                "dns san",
                p256().uri(ID).dns("foo.example.com"),
                CsrError::ForbiddenSan("DNS"),
            ),
            (
                "ip san",
                p256().uri(ID).ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                CsrError::ForbiddenSan("IP"),
            ),
            (
                "email san",
                p256().uri(ID).email("a@b.c"),
                CsrError::ForbiddenSan("email"),
            ),
            (
                "common name",
                p256().uri(ID).common_name("x"),
                CsrError::CommonName,
            ),
            ("no san", p256(), CsrError::NoUriSan),
            (
                "duplicate uri",
                p256().uri(ID).uri(ID),
                CsrError::DuplicateUriSan,
            ),
            (
                "cert sign usage",
                p256()
                    .uri(ID)
                    .key_usages(vec![Ku::DigitalSignature, Ku::KeyCertSign]),
                CsrError::ForbiddenKeyUsage,
            ),
            (
                "content commitment usage",
                p256().uri(ID).key_usages(vec![Ku::ContentCommitment]),
                CsrError::ForbiddenKeyUsage,
            ),
            (
                "code signing eku",
                p256()
                    .uri(ID)
                    .extended_key_usages(vec![Eku::ServerAuth, Eku::CodeSigning]),
                CsrError::ForbiddenExtendedKeyUsage,
            ),
            (
                "any eku",
                p256().uri(ID).extended_key_usages(vec![Eku::Any]),
                CsrError::ForbiddenExtendedKeyUsage,
            ),
            (
                "basic constraints",
                p256().uri(ID).ca(),
                CsrError::ForbiddenExtension("2.5.29.19".into()),
            ),
            (
                "unknown extension",
                p256()
                    .uri(ID)
                    .custom_extension(&[1, 2, 3, 4], vec![0x05, 0x00]),
                CsrError::ForbiddenExtension("1.2.3.4".into()),
            ),
        ];
        for (name, builder, want) in cases {
            assert_eq!(check(builder), Err(want), "case {name}");
        }
    }

    #[test]
    fn refuses_a_tampered_signature() {
        let mut der = CsrBuilder::new(KeyAlg::EcdsaP256).uri(ID).build_der();
        // The CSR's URI SAN sits inside the signed info: change one of its characters.
        let pos = der.windows(7).position(|w| w == b"default").unwrap();
        der[pos] = b'x';
        assert_eq!(check_der(&der), Err(CsrError::BadSignature));
    }

    #[test]
    fn bounds_and_frames_the_pem_input() {
        let pem = CsrBuilder::new(KeyAlg::EcdsaP256).uri(ID).build_pem();
        assert_eq!(
            parse_and_check(&"x".repeat(MAX_CSR_PEM_BYTES + 1)),
            Err(CsrError::TooLarge)
        );
        assert_eq!(parse_and_check("not a csr"), Err(CsrError::NotOnePemBlock));
        assert_eq!(parse_and_check(""), Err(CsrError::NotOnePemBlock));
        assert_eq!(
            parse_and_check(&format!("{pem}{pem}")),
            Err(CsrError::NotOnePemBlock)
        );
        let cert_block = pem.replace("CERTIFICATE REQUEST", "CERTIFICATE");
        assert_eq!(parse_and_check(&cert_block), Err(CsrError::NotOnePemBlock));
        let garbage =
            "-----BEGIN CERTIFICATE REQUEST-----\nMIIBAAAA\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(
            parse_and_check(garbage),
            Err(CsrError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_trailing_der_data() {
        let mut der = CsrBuilder::new(KeyAlg::EcdsaP256).uri(ID).build_der();
        der.extend_from_slice(&[0, 0]);
        assert!(matches!(check_der(&der), Err(CsrError::Malformed(_))));
    }

    #[test]
    fn refuses_ed25519_keys() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        // Ed25519 is refused on its signature algorithm before its key type is looked at.
        assert!(matches!(
            check(CsrBuilder::with_key(key).uri(ID)),
            Err(CsrError::SignatureAlgorithm | CsrError::KeyType)
        ));
    }

    /// CSRs that rcgen will not produce, made with the openssl CLI.
    fn openssl_csr(key_args: &[&str], req_args: &[&str]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let (command, rest) = key_args.split_first().unwrap();
        let status = Command::new("openssl")
            .arg(command)
            .arg("-out")
            .arg(&key)
            .args(rest)
            .status()
            .expect("openssl must be installed");
        assert!(status.success());
        let out = Command::new("openssl")
            .args(["req", "-new", "-key"])
            .arg(&key)
            // pilot-agent sends an empty O; openssl writes "/O=" as an empty subject.
            .args(["-subj", "/O="])
            .args(["-addext", &format!("subjectAltName=critical,URI:{ID}")])
            .args(req_args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn accepts_openssl_csrs_as_pilot_agent_sends_them() {
        let pem = openssl_csr(
            &["ecparam", "-name", "prime256v1", "-genkey", "-noout"],
            &[],
        );
        assert_eq!(parse_and_check(&pem).unwrap().identities, ids(&[ID]));
    }

    #[test]
    fn refuses_sha1_signatures() {
        let pem = openssl_csr(&["genrsa", "2048"], &["-sha1"]);
        assert_eq!(parse_and_check(&pem), Err(CsrError::SignatureAlgorithm));
    }

    #[test]
    fn refuses_rsa_keys_below_2048_bits() {
        let pem = openssl_csr(&["genrsa", "1024"], &[]);
        assert_eq!(parse_and_check(&pem), Err(CsrError::KeyType));
    }

    #[test]
    fn refuses_p521_keys() {
        let pem = openssl_csr(&["ecparam", "-name", "secp521r1", "-genkey", "-noout"], &[]);
        assert!(matches!(
            parse_and_check(&pem),
            Err(CsrError::KeyType | CsrError::SignatureAlgorithm)
        ));
    }

    /// Extensions ::= SEQUENCE OF Extension, holding one SubjectAltName with `names`.
    fn san_extensions(names: &[u8]) -> Vec<u8> {
        use crate::pki::der::der_tlv;
        let oid = [0x06, 0x03, 0x55, 0x1d, 0x11];
        let value = der_tlv(0x04, &der_tlv(0x30, names));
        der_tlv(0x30, &der_tlv(0x30, &[&oid[..], &value].concat()))
    }

    #[test]
    fn refuses_an_extension_request_with_a_second_value() {
        use crate::pki::der::der_tlv;
        let uri = der_tlv(0x86, ID.as_bytes());
        let dns = der_tlv(0x82, b"evil.example.com");
        // SET { Extensions{URI SAN}, Extensions{DNS SAN} }: readers that look at the first
        // value only would see a clean CSR.
        let values = der_tlv(0x31, &[san_extensions(&uri), san_extensions(&dns)].concat());
        let csr =
            CsrBuilder::new(KeyAlg::EcdsaP256).attribute(&[1, 2, 840, 113549, 1, 9, 14], values);
        let result = check(csr);
        assert!(matches!(result, Err(CsrError::Malformed(_))), "{result:?}");
    }

    #[test]
    fn accepts_a_hand_built_single_value_extension_request() {
        use crate::pki::der::der_tlv;
        let values = der_tlv(0x31, &san_extensions(&der_tlv(0x86, ID.as_bytes())));
        let csr =
            CsrBuilder::new(KeyAlg::EcdsaP256).attribute(&[1, 2, 840, 113549, 1, 9, 14], values);
        assert_eq!(check(csr).unwrap().identities, ids(&[ID]));
    }

    #[test]
    fn refuses_attributes_other_than_the_extension_request() {
        let csr = CsrBuilder::new(KeyAlg::EcdsaP256)
            .uri(ID)
            .challenge_password();
        assert_eq!(
            check(csr),
            Err(CsrError::ForbiddenAttribute("1.2.840.113549.1.9.7".into()))
        );
    }
}

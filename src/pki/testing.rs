//! Test fixtures: CAs and CSRs built in memory. Compiled for tests and the `testing` feature only.

use std::sync::OnceLock;

use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use super::keys;
use super::pem;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlg {
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
    Rsa3072,
}

impl KeyAlg {
    /// A fresh key; RSA keys are generated once per process and reused (generation is slow).
    pub fn generate(self) -> KeyPair {
        static RSA2048: OnceLock<String> = OnceLock::new();
        static RSA3072: OnceLock<String> = OnceLock::new();
        let rsa = |cell: &OnceLock<String>, bits| {
            let pem = cell.get_or_init(|| keys::generate_rsa(bits).unwrap().serialize_pem());
            KeyPair::from_pem(pem).unwrap()
        };
        match self {
            KeyAlg::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
            KeyAlg::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
            KeyAlg::Rsa2048 => rsa(&RSA2048, 2048),
            KeyAlg::Rsa3072 => rsa(&RSA3072, 3072),
        }
    }
}

/// A CA certificate and its key.
pub struct TestCa {
    pub cert: CertificateDer<'static>,
    pub key: KeyPair,
    pub not_after: OffsetDateTime,
}

impl TestCa {
    pub fn root(name: &str, alg: KeyAlg) -> Self {
        let key = alg.generate();
        let params = ca_params(name, Duration::days(3650));
        let not_after = params.not_after;
        let cert = params.self_signed(&key).unwrap().der().clone();
        Self {
            cert,
            key,
            not_after,
        }
    }

    /// An intermediate CA signed by `self`.
    pub fn intermediate(&self, name: &str, alg: KeyAlg) -> Self {
        let key = alg.generate();
        let params = ca_params(name, Duration::days(365));
        let not_after = params.not_after;
        let cert = params
            .signed_by(&key, &self.issuer())
            .unwrap()
            .der()
            .clone();
        Self {
            cert,
            key,
            not_after,
        }
    }

    pub fn issuer(&self) -> rcgen::Issuer<'static, &KeyPair> {
        rcgen::Issuer::from_ca_cert_der(&self.cert, &self.key).unwrap()
    }

    pub fn cert_pem(&self) -> String {
        pem::encode_certificate(&self.cert)
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A workload leaf for `uri`, signed by this CA, with a fresh key.
    pub fn leaf(&self, uri: &str) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyAlg::EcdsaP256.generate();
        let now = OffsetDateTime::now_utc();
        let cert = super::leaf::sign_workload(
            &[uri.to_owned()],
            &key,
            (now - Duration::minutes(1), now + Duration::hours(1)),
            &self.issuer(),
        )
        .unwrap();
        (cert, key)
    }
}

fn ca_params(name: &str, lifetime: Duration) -> CertificateParams {
    super::leaf::ca_params(
        "istio-csr-rs tests",
        name,
        OffsetDateTime::now_utc() + lifetime,
    )
}

/// Builds CSRs, including ones that break the policy on purpose.
pub struct CsrBuilder {
    key: KeyPair,
    params: CertificateParams,
    attributes: Vec<rcgen::Attribute>,
}

impl CsrBuilder {
    /// An Istio-style CSR: empty subject, no SANs yet.
    pub fn new(alg: KeyAlg) -> Self {
        Self::with_key(alg.generate())
    }

    pub fn with_key(key: KeyPair) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        Self {
            key,
            params,
            attributes: Vec::new(),
        }
    }

    pub fn uri(mut self, uri: &str) -> Self {
        self.params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
        self
    }

    pub fn dns(mut self, name: &str) -> Self {
        self.params
            .subject_alt_names
            .push(SanType::DnsName(name.try_into().unwrap()));
        self
    }

    pub fn ip(mut self, ip: std::net::IpAddr) -> Self {
        self.params.subject_alt_names.push(SanType::IpAddress(ip));
        self
    }

    pub fn email(mut self, email: &str) -> Self {
        self.params
            .subject_alt_names
            .push(SanType::Rfc822Name(email.try_into().unwrap()));
        self
    }

    pub fn common_name(mut self, cn: &str) -> Self {
        self.params.distinguished_name.push(DnType::CommonName, cn);
        self
    }

    /// Any subject attribute, by OID (OU, emailAddress, UID...).
    pub fn subject_attribute(mut self, oid: &[u64], value: &str) -> Self {
        self.params
            .distinguished_name
            .push(DnType::CustomDnType(oid.to_vec()), value);
        self
    }

    pub fn organization(mut self, o: &str) -> Self {
        self.params
            .distinguished_name
            .push(DnType::OrganizationName, o);
        self
    }

    pub fn key_usages(mut self, usages: Vec<KeyUsagePurpose>) -> Self {
        self.params.key_usages = usages;
        self
    }

    pub fn extended_key_usages(mut self, usages: Vec<ExtendedKeyUsagePurpose>) -> Self {
        self.params.extended_key_usages = usages;
        self
    }

    /// A BasicConstraints CA:true extension (rcgen refuses to put one in a CSR by itself).
    pub fn ca(self) -> Self {
        self.custom_extension(&[2, 5, 29, 19], vec![0x30, 0x03, 0x01, 0x01, 0xff])
    }

    /// A raw attribute: `values` is the DER SET of the attribute's values.
    pub fn attribute(mut self, oid: &'static [u64], values: Vec<u8>) -> Self {
        self.attributes.push(rcgen::Attribute { oid, values });
        self
    }

    /// A PKCS#9 challengePassword attribute (values: a DER SET holding UTF8String "secret").
    pub fn challenge_password(mut self) -> Self {
        self.attributes.push(rcgen::Attribute {
            oid: &[1, 2, 840, 113549, 1, 9, 7],
            values: vec![0x31, 0x08, 0x0c, 0x06, b's', b'e', b'c', b'r', b'e', b't'],
        });
        self
    }

    pub fn custom_extension(mut self, oid: &[u64], der_value: Vec<u8>) -> Self {
        self.params
            .custom_extensions
            .push(CustomExtension::from_oid_content(oid, der_value));
        self
    }

    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    fn serialize(&self) -> rcgen::CertificateSigningRequest {
        self.params
            .serialize_request_with_attributes(&self.key, self.attributes.clone())
            .unwrap()
    }

    pub fn build_der(&self) -> Vec<u8> {
        self.serialize().der().to_vec()
    }

    pub fn build_pem(&self) -> String {
        self.serialize().pem().unwrap()
    }

    /// The CSR and its private key, for tests that need the key afterwards.
    pub fn build(self) -> (String, KeyPair) {
        let pem = self.build_pem();
        (pem, self.key)
    }
}

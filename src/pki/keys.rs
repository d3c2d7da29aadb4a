//! Private keys: loading any common PEM layout into a signing key, generating fresh keys.
//!
//! ring (our only crypto provider) loads PKCS#8 alone, but istiod's `cacerts` and Kubernetes TLS
//! Secrets commonly hold PKCS#1 (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`) keys, so those are
//! re-encoded as PKCS#8: PKCS#1 by the `rsa` crate; SEC1 here, by wrapping it as it is, since
//! only the curve crates (not among our dependencies) would parse it.

use rcgen::KeyPair;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use super::der::{der_read, der_tlv};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no private key PEM block found (encrypted keys are not supported)")]
    Missing,
    #[error("malformed private key: {0}")]
    Malformed(String),
    #[error("unsupported private key (RSA, ECDSA P-256 or P-384 only)")]
    Unsupported,
}

/// The id-ecPublicKey OID (full TLV), for SEC1 keys' PKCS#8 AlgorithmIdentifier.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// Loads a PEM private key (PKCS#8, PKCS#1 or SEC1) as a signing key pair.
pub fn load_private_key_pem(pem: &[u8]) -> Result<KeyPair, KeyError> {
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => KeyError::Missing,
        other => KeyError::Malformed(other.to_string()),
    })?;
    let pkcs8 = match &key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(k) => rsa_pkcs1_to_pkcs8(k.secret_pkcs1_der())?,
        PrivateKeyDer::Sec1(k) => sec1_to_pkcs8(k.secret_sec1_der())?,
        _ => return Err(KeyError::Unsupported),
    };
    KeyPair::try_from(pkcs8.as_slice()).map_err(|_| KeyError::Unsupported)
}

/// Generates a fresh ECDSA P-256 key: the default for serving certificates and CAs we create.
pub fn generate_ecdsa_p256() -> Result<KeyPair, KeyError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| KeyError::Malformed(e.to_string()))
}

/// Generates a fresh RSA key (ring cannot generate RSA keys; RustCrypto's `rsa` does, and ring
/// signs with it once it is PKCS#8).
pub fn generate_rsa(bits: usize) -> Result<KeyPair, KeyError> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, bits)
        .map_err(|e| KeyError::Malformed(e.to_string()))?;
    let der = key
        .to_pkcs8_der()
        .map_err(|e| KeyError::Malformed(e.to_string()))?;
    KeyPair::try_from(der.as_bytes()).map_err(|_| KeyError::Unsupported)
}

fn rsa_pkcs1_to_pkcs8(pkcs1: &[u8]) -> Result<Vec<u8>, KeyError> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::EncodePrivateKey;
    let malformed = |e: &dyn std::fmt::Display| KeyError::Malformed(e.to_string());
    let key = rsa::RsaPrivateKey::from_pkcs1_der(pkcs1).map_err(|e| malformed(&e))?;
    let der = key.to_pkcs8_der().map_err(|e| malformed(&e))?;
    Ok(der.as_bytes().to_vec())
}

fn sec1_to_pkcs8(sec1: &[u8]) -> Result<Vec<u8>, KeyError> {
    let curve_oid = sec1_curve_oid(sec1)
        .ok_or_else(|| KeyError::Malformed("EC key does not name its curve".into()))?;
    let algorithm = der_tlv(0x30, &[OID_EC_PUBLIC_KEY, curve_oid].concat());
    Ok(pkcs8_wrap(&algorithm, sec1))
}

/// PrivateKeyInfo ::= SEQUENCE { version 0, algorithm, privateKey OCTET STRING }
fn pkcs8_wrap(algorithm: &[u8], private_key: &[u8]) -> Vec<u8> {
    let version = [0x02, 0x01, 0x00];
    let key = der_tlv(0x04, private_key);
    der_tlv(0x30, &[&version[..], algorithm, &key].concat())
}

/// Finds the named curve (full OID TLV) in an ECPrivateKey:
/// SEQUENCE { version, privateKey OCTET STRING, [0] parameters OPTIONAL, [1] publicKey OPTIONAL }
fn sec1_curve_oid(sec1: &[u8]) -> Option<&[u8]> {
    let (tag, body, _) = der_read(sec1)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = body;
    while !rest.is_empty() {
        let (tag, value, next) = der_read(rest)?;
        if tag == 0xa0 {
            let (oid_tag, _, after) = der_read(value)?;
            let oid_len = value.len() - after.len();
            return (oid_tag == 0x06).then(|| &value[..oid_len]);
        }
        rest = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Generates a key with the openssl CLI in a given layout, for cross-checking our loader.
    fn openssl_key(args: &[&str]) -> Option<Vec<u8>> {
        let out = Command::new("openssl").args(args).output().ok()?;
        out.status.success().then_some(out.stdout)
    }

    #[test]
    fn loads_pkcs8_ecdsa_keys() {
        let key = generate_ecdsa_p256().unwrap();
        let loaded = load_private_key_pem(key.serialize_pem().as_bytes()).unwrap();
        assert_eq!(loaded.public_key_raw(), key.public_key_raw());
    }

    #[test]
    fn loads_sec1_ec_keys_from_openssl() {
        for curve in ["prime256v1", "secp384r1"] {
            let pem = openssl_key(&["ecparam", "-name", curve, "-genkey", "-noout"])
                .expect("openssl must be installed");
            assert!(String::from_utf8_lossy(&pem).contains("BEGIN EC PRIVATE KEY"));
            load_private_key_pem(&pem).unwrap_or_else(|e| panic!("{curve}: {e}"));
        }
    }

    #[test]
    fn loads_pkcs1_rsa_keys_from_openssl() {
        let pem = openssl_key(&["genrsa", "-traditional", "2048"])
            .or_else(|| openssl_key(&["genrsa", "2048"]))
            .expect("openssl must be installed");
        assert!(String::from_utf8_lossy(&pem).contains("BEGIN RSA PRIVATE KEY"));
        let key = load_private_key_pem(&pem).unwrap();
        assert_eq!(key.algorithm(), &rcgen::PKCS_RSA_SHA256);
    }

    #[test]
    fn refuses_garbage_and_missing_keys() {
        assert!(matches!(
            load_private_key_pem(b"nothing"),
            Err(KeyError::Missing)
        ));
        let bogus = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(load_private_key_pem(bogus.as_bytes()).is_err());
    }
}

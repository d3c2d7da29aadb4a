//! PEM helpers shared by the CSR, chain and key code.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PemError {
    #[error("no PEM {0} block found")]
    Missing(&'static str),
    #[error("malformed PEM: {0}")]
    Malformed(String),
}

/// Parses every `CERTIFICATE` block, in order; anything else in the input is ignored.
pub fn parse_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::Missing("CERTIFICATE"));
    }
    Ok(certs)
}

/// PEM-encodes one DER block with 64-column lines (RFC 7468), as openssl and Go write it.
pub fn encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    use std::fmt::Write;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    let _ = writeln!(out, "-----BEGIN {label}-----");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

pub fn encode_certificate(der: &[u8]) -> String {
    encode("CERTIFICATE", der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_wraps_at_64_columns_and_parses_back() {
        let der = vec![0x30u8; 200];
        let pem = encode("CERTIFICATE", &der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let parsed = parse_certificates(pem.as_bytes()).unwrap();
        assert_eq!(parsed[0].as_ref(), der.as_slice());
    }

    #[test]
    fn parse_certificates_requires_one_block() {
        assert_eq!(
            parse_certificates(b"hello"),
            Err(PemError::Missing("CERTIFICATE"))
        );
    }
}

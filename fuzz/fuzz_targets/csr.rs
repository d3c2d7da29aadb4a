//! CSR parsing and policy (`pki::csr`).
//!
//! Input: one mode byte, then
//! - mode 0: text (lossy UTF-8) for `parse_and_check`, as a CSR PEM arrives in a request;
//! - mode 1: raw DER for `check_der` and `own_der`;
//! - mode 2: a DER CertificationRequestInfo, which the harness self-signs with a fixed P-256 key
//!   so that the policy checks behind the signature check are reached.
//!
//! Whatever is accepted must satisfy what the module promises: one of the allowed signature
//! algorithms and key types, a subject that is empty or one empty O, only URI SANs, at least one
//! and none repeated,
//! each a service-account SPIFFE identity, returned in order, and the DER returned unchanged.
#![no_main]

use fuzz_support::{sign_csr_info, verbose};
use istio_csr_rs::pki::csr::{self, CheckedCsr, KeyType};
use libfuzzer_sys::fuzz_target;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_PKCS1_RSASSAPSS,
    OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_X509_COMMON_NAME,
    OID_X509_ORGANIZATION_NAME,
};
use x509_parser::prelude::FromDer;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let text = String::from_utf8_lossy(rest);
            let verdict = csr::parse_and_check(&text);
            verbose!("pem: {:?}", verdict.as_ref().map(|c| &c.identities));
            if let Ok(checked) = verdict {
                assert_invariants(&checked);
                // The same DER, however it was framed, gets the same verdict.
                assert_eq!(csr::check_der(&checked.der).as_ref(), Ok(&checked));
            }
        }
        1 => {
            let verdict = csr::check_der(rest);
            verbose!("der: {:?}", verdict.as_ref().map(|c| &c.identities));
            if let Ok(checked) = verdict {
                assert_eq!(checked.der, rest);
                assert_invariants(&checked);
                // Re-framed as PEM, it passes parse_and_check unchanged.
                let pem = istio_csr_rs::pki::pem::encode("CERTIFICATE REQUEST", rest);
                assert_eq!(csr::parse_and_check(&pem).as_ref(), Ok(&checked));
            }
            if let Ok(own) = csr::own_der(rest) {
                assert!(own.identities.is_empty());
                assert_eq!(own.der, rest);
            }
        }
        _ => {
            let der = sign_csr_info(rest);
            let verdict = csr::check_der(&der);
            verbose!("signed info: {:?}", verdict.as_ref().map(|c| &c.identities));
            if let Ok(checked) = verdict {
                assert_eq!(checked.der, der);
                assert_invariants(&checked);
            }
        }
    }
});

fn assert_invariants(checked: &CheckedCsr) {
    let (rest, parsed) =
        X509CertificationRequest::from_der(&checked.der).expect("an accepted CSR parses again");
    assert!(rest.is_empty(), "an accepted CSR has no trailing data");

    let alg = &parsed.signature_algorithm.algorithm;
    assert!(
        [
            OID_PKCS1_SHA256WITHRSA,
            OID_PKCS1_SHA384WITHRSA,
            OID_PKCS1_SHA512WITHRSA,
            OID_PKCS1_RSASSAPSS,
            OID_SIG_ECDSA_WITH_SHA256,
            OID_SIG_ECDSA_WITH_SHA384,
        ]
        .contains(alg),
        "accepted signature algorithm {alg}"
    );

    // The subject is empty or one RDN holding one empty O (so no CN either).
    let info = &parsed.certification_request_info;
    let attributes: Vec<_> = info.subject.iter_attributes().collect();
    assert!(
        !attributes
            .iter()
            .any(|a| *a.attr_type() == OID_X509_COMMON_NAME),
        "an accepted CSR has no CN"
    );
    match attributes.as_slice() {
        [] => {}
        [only] => {
            assert_eq!(info.subject.iter().count(), 1);
            assert_eq!(*only.attr_type(), OID_X509_ORGANIZATION_NAME);
            assert_eq!(only.as_str(), Ok(""));
        }
        more => panic!("an accepted CSR has {} subject attributes", more.len()),
    }

    let spki = &info.subject_pki;
    assert_eq!(checked.public_key.spki_der, spki.raw);
    assert_eq!(checked.public_key.raw_key, &*spki.subject_public_key.data);
    match checked.public_key.key_type {
        KeyType::Rsa { bits } => {
            assert_eq!(spki.algorithm.algorithm, OID_PKCS1_RSAENCRYPTION);
            assert!((2048..=8192).contains(&bits), "RSA-{bits} accepted");
        }
        KeyType::EcdsaP256 | KeyType::EcdsaP384 => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .expect("an EC key names its curve");
            let want = if checked.public_key.key_type == KeyType::EcdsaP256 {
                OID_EC_P256
            } else {
                OID_NIST_EC_P384
            };
            assert_eq!(curve, want);
        }
    }

    // Every SAN is a URI, and the identities returned spell exactly those, in order, none
    // repeated.
    let mut in_csr = Vec::new();
    let mut extension_requests = 0;
    for attribute in info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(request) = attribute.parsed_attribute() else {
            panic!("an accepted CSR carries attribute {}", attribute.oid);
        };
        extension_requests += 1;
        for ext in &request.extensions {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => in_csr.push((*uri).to_owned()),
                        other => panic!("an accepted CSR carries SAN {other:?}"),
                    }
                }
            }
        }
    }
    assert!(extension_requests <= 1);
    assert!(!checked.identities.is_empty(), "accepted without a URI SAN");
    let spelled: Vec<String> = checked.identities.iter().map(ToString::to_string).collect();
    assert_eq!(spelled, in_csr);
    for (i, id) in checked.identities.iter().enumerate() {
        assert!(
            !checked.identities[..i].contains(id),
            "duplicate identity {id}"
        );
    }
}

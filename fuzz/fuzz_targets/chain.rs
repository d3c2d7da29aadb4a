//! Certificate chains (`pki::pem::parse_certificates`, `RootBundle`, `pki::chain::verify`).
//!
//! Input: one mode byte, then
//! - mode 0: PEM text: parsed as certificates, as a root bundle, and verified as an issued chain;
//! - mode 1: concatenated DER certificates (leaf first), verified against the fixed root;
//! - mode 2: concatenated DER TBSCertificates, each signed here with the fixed root's key, so
//!   that leaves the fuzzer shapes get through the signature check to the leaf checks.
//!
//! Never panics. A root bundle re-encodes to PEM that parses back to the same roots. A verified
//! chain starts with the given leaf, uses only given intermediates (never the leaf, a root, or
//! one twice) and has a valid lifetime; a leaf refused on its names or key (so its path
//! verified) passes when expected to carry exactly its own names and key.
#![no_main]

use fuzz_support::{ROOTS, SEED_URI, now, sign_with_root, split_der, verbose};
use istio_csr_rs::pki::chain::{self, ChainError, Expected, LeafSans, RootBundle};
use istio_csr_rs::pki::pem::parse_certificates;
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The SPKI of fixtures/leaf-key.pem: what the seed leaves carry.
const LEAF_SPKI: &[u8] = include_bytes!("../fixtures/leaf-spki.der");

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let certs: Vec<CertificateDer<'static>> = match mode % 3 {
        0 => {
            if let Ok(bundle) = RootBundle::from_pem(rest) {
                check_bundle(&bundle);
            }
            match parse_certificates(rest) {
                Ok(certs) => certs,
                Err(_) => return,
            }
        }
        1 => split_der(rest)
            .into_iter()
            .map(|c| CertificateDer::from(c.to_vec()))
            .collect(),
        _ => split_der(rest)
            .into_iter()
            .map(|tbs| CertificateDer::from(sign_with_root(tbs)))
            .collect(),
    };
    if mode % 3 == 1 {
        if let Ok(bundle) = RootBundle::from_certs(certs.clone()) {
            check_bundle(&bundle);
        }
    }
    check_chain(&certs);
});

fn check_bundle(bundle: &RootBundle) {
    assert_eq!(bundle.certs().len(), bundle.anchors().len());
    let again = parse_certificates(bundle.pem().as_bytes()).expect("the bundle PEM parses");
    assert_eq!(again.as_slice(), bundle.certs());
    let rebuilt = RootBundle::from_pem(bundle.pem().as_bytes()).expect("the bundle PEM loads");
    assert_eq!(rebuilt.certs(), bundle.certs());
    assert_eq!(rebuilt.pem(), bundle.pem());
}

fn check_chain(certs: &[CertificateDer<'static>]) {
    let uris = [SEED_URI.to_owned()];
    let expected = Expected::identities(&uris, LEAF_SPKI);
    let verified = chain::verify(certs, &ROOTS, now(), &expected);
    verbose!(
        "{} certs: {:?}",
        certs.len(),
        verified.as_ref().map(|v| v.intermediates().len())
    );

    // verify() drops repeats (first occurrence kept): the leaf, then the candidates.
    let mut unique: Vec<CertificateDer<'static>> = Vec::new();
    for c in certs {
        if !unique.contains(c) {
            unique.push(c.clone());
        }
    }
    let Some((leaf, candidates)) = unique.split_first() else {
        assert_eq!(verified, Err(ChainError::Empty));
        return;
    };
    match &verified {
        Ok(v) => return check_verified(leaf, candidates, v),
        // The path verified and the leaf checks refused it: with the leaf's own names and key
        // as the expectation, it must pass.
        Err(ChainError::IdentityMismatch | ChainError::KeyMismatch) => {}
        Err(_) => return,
    }
    let Ok((_, parsed)) = X509Certificate::from_der(leaf) else {
        panic!("refused on its names or key, yet the leaf does not parse");
    };
    let Ok(sans) = LeafSans::of(&parsed) else {
        // A SAN of a kind a leaf may not carry: with its own key expected, refused on its names.
        let own_key = Expected::identities(&uris, parsed.public_key().raw);
        let again = chain::verify(certs, &ROOTS, now(), &own_key);
        assert_eq!(again.err(), Some(ChainError::IdentityMismatch));
        return;
    };
    let own = Expected {
        uris: &sans.uris,
        dns: &sans.dns,
        ips: &sans.ips,
        spki_der: parsed.public_key().raw,
    };
    match chain::verify(certs, &ROOTS, now(), &own) {
        Ok(v) => {
            verbose!("  own expectations: ok");
            check_verified(leaf, candidates, &v)
        }
        Err(e) => panic!("a leaf with a verified path fails its own expectations: {e}"),
    }
}

fn check_verified(
    leaf: &CertificateDer<'static>,
    candidates: &[CertificateDer<'static>],
    v: &chain::VerifiedChain,
) {
    assert_eq!(v.leaf(), leaf);
    for (i, c) in v.intermediates().iter().enumerate() {
        assert_ne!(c, leaf);
        assert!(candidates.contains(c), "an intermediate that was not given");
        assert!(
            !v.intermediates()[..i].contains(c),
            "an intermediate used twice"
        );
        assert!(!ROOTS.certs().contains(c), "a root among the intermediates");
    }
    assert!(v.lifetime_secs() >= 0);
    let response = v.to_response(&ROOTS);
    assert_eq!(response.len(), v.intermediates().len() + 2);
    assert_eq!(response.last().map(String::as_str), Some(ROOTS.pem()));
}

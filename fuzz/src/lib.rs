//! Helpers shared by the fuzz targets: fixed keys and a fixed root (fuzz fixtures only, never used
//! outside this directory), DER framing, and signing of fuzz-built to-be-signed structures so the
//! fuzzer gets past signature checks and reaches the policy code behind them.

use std::sync::LazyLock;

use istio_csr_rs::pki::chain::RootBundle;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use rustls_pki_types::UnixTime;

/// The key the `csr` target signs fuzz-built CertificationRequestInfos with (mode 2).
pub const CSR_KEY_PK8: &[u8] = include_bytes!("../fixtures/csr-key.pk8");
/// The key of the fixed root; the `chain` target signs fuzz-built TBSCertificates with it (mode 2).
pub const ROOT_KEY_PK8: &[u8] = include_bytes!("../fixtures/root-key.pk8");
pub const ROOT_PEM: &[u8] = include_bytes!("../fixtures/root.pem");
/// The SPIFFE identity every seed asks for.
pub const SEED_URI: &str = "spiffe://cluster.local/ns/default/sa/default";

/// 2100-01-01T00:00:00Z: inside the fixed root's validity (2026..2126) and the seed leaves'
/// (100 years from their making). Fixed, so runs are reproducible.
pub fn now() -> UnixTime {
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(4_102_444_800))
}

pub static ROOTS: LazyLock<RootBundle> =
    LazyLock::new(|| RootBundle::from_pem(ROOT_PEM).expect("the fixed root is a valid root"));

static RNG: LazyLock<SystemRandom> = LazyLock::new(SystemRandom::new);

static CSR_KEY: LazyLock<EcdsaKeyPair> = LazyLock::new(|| {
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, CSR_KEY_PK8, &*RNG).unwrap()
});
static ROOT_KEY: LazyLock<EcdsaKeyPair> = LazyLock::new(|| {
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, ROOT_KEY_PK8, &*RNG).unwrap()
});

/// The DER SubjectPublicKeyInfo of the fixed CSR key: seeds' CSR infos carry it.
pub fn csr_key_public() -> &'static [u8] {
    CSR_KEY.public_key().as_ref()
}

/// AlgorithmIdentifier { ecdsa-with-SHA256 } (no parameters).
const ECDSA_SHA256_ALG: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];

/// DER tag-length-value with definite length.
pub fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// SEQUENCE { tbs, ecdsa-with-SHA256, BIT STRING sig } with `tbs` signed by `key`: the shape of
/// both a PKCS#10 CSR and an X.509 certificate.
fn signed(key: &EcdsaKeyPair, tbs: &[u8]) -> Vec<u8> {
    let sig = key.sign(&*RNG, tbs).expect("ECDSA signing does not fail");
    let mut bits = vec![0u8];
    bits.extend_from_slice(sig.as_ref());
    let body = [tbs, ECDSA_SHA256_ALG, &tlv(0x03, &bits)].concat();
    tlv(0x30, &body)
}

/// A CSR whose CertificationRequestInfo is `info`, self-signed with the fixed CSR key.
pub fn sign_csr_info(info: &[u8]) -> Vec<u8> {
    signed(&CSR_KEY, info)
}

/// A certificate whose TBSCertificate is `tbs`, signed with the fixed root key.
pub fn sign_with_root(tbs: &[u8]) -> Vec<u8> {
    signed(&ROOT_KEY, tbs)
}

/// The length of the DER element at the start of `input` (header included), if its header is
/// well-formed and it fits in `input`. Indefinite lengths are not DER and yield None.
pub fn der_element_len(input: &[u8]) -> Option<usize> {
    let (&_tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    let total = header.checked_add(len)?;
    (total <= input.len()).then_some(total)
}

/// Splits concatenated DER elements; a tail that is not a whole element is kept as one last
/// (malformed) piece so the parsers still see it.
pub fn split_der(mut input: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !input.is_empty() && out.len() < 16 {
        match der_element_len(input) {
            Some(n) => {
                out.push(&input[..n]);
                input = &input[n..];
            }
            None => {
                out.push(input);
                break;
            }
        }
    }
    out
}

/// True when `haystack` contains some `window`-byte run of `needle`.
pub fn echoes(haystack: &[u8], needle: &[u8], window: usize) -> bool {
    if needle.len() < window || haystack.len() < window {
        return false;
    }
    needle
        .windows(window)
        .any(|w| haystack.windows(window).any(|h| h == w))
}

/// `FUZZ_VERBOSE=1` makes the targets print each verdict: to check by hand that the seeds reach
/// the code behind the parsers (`cargo fuzz run <target> <seed files> -- -runs=0`).
pub static VERBOSE: LazyLock<bool> = LazyLock::new(|| std::env::var_os("FUZZ_VERBOSE").is_some());

#[macro_export]
macro_rules! verbose {
    ($($arg:tt)*) => {
        if *$crate::VERBOSE {
            eprintln!($($arg)*);
        }
    };
}

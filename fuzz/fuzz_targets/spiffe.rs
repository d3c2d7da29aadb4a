//! SPIFFE identities (`pki::identity`).
//!
//! Input: one mode byte, then
//! - mode 0: a string (lossy UTF-8) parsed as `SpiffeId`;
//! - mode 1: three NUL-separated parts given to `SpiffeId::new`.
//!
//! An identity that parses displays as exactly the input (so no two strings name the same
//! identity), parses back to itself, and its parts obey the rules the module states: the SPIFFE
//! trust-domain charset, a DNS-1123 label namespace and a DNS-1123 subdomain service account.
#![no_main]

use istio_csr_rs::pki::identity::{
    SpiffeId, is_dns1123_label, is_dns1123_subdomain, validate_trust_domain,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if mode % 2 == 0 {
        let Ok(id) = text.parse::<SpiffeId>() else {
            return;
        };
        assert_eq!(id.to_string(), text, "an identity has one spelling");
        check(&id);
    } else {
        let mut parts = text.splitn(3, '\0');
        let (Some(td), Some(ns), Some(sa)) = (parts.next(), parts.next(), parts.next()) else {
            return;
        };
        let Ok(id) = SpiffeId::new(td, ns, sa) else {
            return;
        };
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            (td, ns, sa)
        );
        check(&id);
    }
});

fn check(id: &SpiffeId) {
    let shown = id.to_string();
    assert_eq!(shown.parse::<SpiffeId>().as_ref(), Ok(id), "{shown:?}");
    assert!(validate_trust_domain(id.trust_domain()).is_ok());
    let td = id.trust_domain();
    assert!(!td.is_empty() && td.len() <= 255 && td != "." && td != "..");
    assert!(
        td.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    );
    assert!(is_dns1123_label(id.namespace()));
    assert!(id.namespace().len() <= 63);
    assert!(is_dns1123_subdomain(id.service_account()));
    assert!(id.service_account().len() <= 253);
    for part in [id.namespace(), id.service_account()] {
        assert!(
            part.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b)),
            "{part:?}"
        );
        assert!(
            !part.starts_with(['-', '.']) && !part.ends_with(['-', '.']),
            "{part:?}"
        );
        assert!(!part.contains(".."), "{part:?}");
    }
    assert!(!id.namespace().contains('.'));
    assert!(!shown["spiffe://".len()..].contains(['%', '?', '#', ':', '@']));
}

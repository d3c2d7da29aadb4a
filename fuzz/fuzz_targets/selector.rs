//! The namespace label selector (`bundle::selector`).
//!
//! Input (lossy UTF-8), line by line: a selector, a second selector, then labels `key=value`.
//!
//! Checks: no panic; no labels and an empty label map are the same; a blank selector matches
//! everything; and `A,B` (both non-blank and valid) parses and matches exactly when A and B both
//! match ("comma-separated, all must hold"). The type has no Display, so there is no round trip
//! to check.
#![no_main]

use std::collections::BTreeMap;

use istio_csr_rs::bundle::selector::Selector;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or_default();
    let second = lines.next();
    let labels: BTreeMap<String, String> = lines
        .take(32)
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (l.to_owned(), String::new()),
        })
        .collect();
    let empty = BTreeMap::new();

    let a = first.parse::<Selector>();
    if let Ok(a) = &a {
        let m = a.matches(Some(&labels));
        assert_eq!(a.matches(None), a.matches(Some(&empty)));
        if first.trim().is_empty() {
            assert!(m && a.matches(None), "a blank selector matches everything");
        }
        assert_eq!(first.parse::<Selector>().as_ref(), Ok(a));
    } else if let Err(e) = &a {
        let _ = e.to_string();
    }

    let Some(second) = second else {
        return;
    };
    let (Ok(a), Ok(b)) = (a, second.parse::<Selector>()) else {
        return;
    };
    if first.trim().is_empty() || second.trim().is_empty() {
        return;
    }
    let both = format!("{first},{second}");
    let ab = both
        .parse::<Selector>()
        .unwrap_or_else(|e| panic!("{both:?} does not parse: {e}"));
    for l in [Some(&labels), Some(&empty), None] {
        assert_eq!(
            ab.matches(l),
            a.matches(l) && b.matches(l),
            "{both:?} on {l:?}"
        );
    }
});

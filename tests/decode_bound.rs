//! What one CreateCertificate request costs in memory once decoded, worst case: a 128 KiB
//! message (the edge's limit) made of the tiniest metadata values, which prost expands
//! several-fold. The check of the metadata (at most 16 values) refuses it before the call
//! waits for anything, so that expansion lives only while the check runs; a request that
//! passes holds about its wire size. Counted with a global allocator that sums live bytes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use istio_csr_rs::proto::istio_v1_auth::IstioCertificateRequest;
use istio_csr_rs::signer::edge::EdgeLimits;
use istio_csr_rs::signer::service::check_metadata_bounds;
use prost::Message;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated (and still live at the peak) while `f` runs, above what was live before.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - before)
}

/// The largest message the edge lets through, of metadata entries with one-byte keys and
/// null values: the most entries a message can carry.
fn worst_case_message() -> Vec<u8> {
    let max = EdgeLimits::DEFAULT.max_message_bytes;
    let null = || prost_types::Value {
        kind: Some(prost_types::value::Kind::NullValue(0)),
    };
    let mut metadata = prost_types::Struct::default();
    // The request's own tag and length take at most 4 bytes at this size.
    let mut size = 4;
    for i in 0u32.. {
        // Distinct keys: a map keeps one entry per key.
        let key = format!("{i:x}");
        let one = prost_types::Struct {
            fields: [(key.clone(), null())].into(),
        };
        size += one.encoded_len();
        if size > max {
            break;
        }
        metadata.fields.insert(key, null());
    }
    let wire = IstioCertificateRequest {
        csr: String::new(),
        validity_duration: 0,
        metadata: Some(metadata),
    }
    .encode_to_vec();
    assert!(wire.len() <= max);
    wire
}

// One test: the allocator counts every thread, so two measurements must not overlap.
#[test]
fn decoding_costs_are_bounded_and_the_expansion_is_refused_before_a_call_waits() {
    a_worst_case_request_expands_while_decoding_and_is_refused_before_it_is_held();
    a_request_that_passes_the_metadata_check_holds_about_its_wire_size();
}

fn a_worst_case_request_expands_while_decoding_and_is_refused_before_it_is_held() {
    let wire = worst_case_message();
    let (request, decoded) = peak_during(|| IstioCertificateRequest::decode(wire.as_slice()));
    let request = request.unwrap();
    let entries = request.metadata.as_ref().map_or(0, |m| m.fields.len());
    eprintln!(
        "worst case: {} wire bytes, {entries} metadata entries, {decoded} bytes decoded ({:.1}x)",
        wire.len(),
        decoded as f64 / wire.len() as f64
    );
    // The expansion is real (hence the check), and bounded by the message limit.
    assert!(decoded > 4 * wire.len(), "{decoded}");
    assert!(decoded < 64 * wire.len(), "{decoded}");
    assert!(check_metadata_bounds(request.metadata.as_ref()).is_err());
}

fn a_request_that_passes_the_metadata_check_holds_about_its_wire_size() {
    // The largest CSR the edge admits, with the most metadata the check allows.
    let max = EdgeLimits::DEFAULT.max_message_bytes;
    let mut metadata = prost_types::Struct::default();
    for i in 0..istio_csr_rs::signer::service::MAX_METADATA_VALUES {
        metadata.fields.insert(
            format!("k{i}"),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("v".into())),
            },
        );
    }
    let mut request = IstioCertificateRequest {
        csr: String::new(),
        validity_duration: 3600,
        metadata: Some(metadata),
    };
    request.csr = "A".repeat(max - request.encoded_len() - 8);
    let wire = request.encode_to_vec();
    assert!(wire.len() <= max);
    let (decoded, held) = peak_during(|| IstioCertificateRequest::decode(wire.as_slice()));
    let decoded = decoded.unwrap();
    assert!(check_metadata_bounds(decoded.metadata.as_ref()).is_ok());
    eprintln!(
        "passing: {} wire bytes, {held} bytes decoded ({:.2}x)",
        wire.len(),
        held as f64 / wire.len() as f64
    );
    assert!(held < wire.len() + 4096, "{held}");
}

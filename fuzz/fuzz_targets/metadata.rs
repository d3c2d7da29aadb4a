//! The request metadata Struct (`signer::service::RequestOptions::from_metadata`).
//!
//! Input: one mode byte, then
//! - mode 0: protobuf bytes decoded as an `IstioCertificateRequest` (the real wire decoding);
//! - mode 1: bytes that build a small Struct tree directly (keys biased to the known ones).
//!
//! The result must agree with the rule as documented: the known keys are read only when they
//! are strings, "" and null mean absent, any other kind is an InvalidRequest; other keys are
//! ignored. Re-encoding a decoded request and decoding it again gives the same options.
#![no_main]

use std::collections::BTreeMap;

use istio_csr_rs::proto::istio_v1_auth::IstioCertificateRequest;
use istio_csr_rs::signer::error::SignError;
use istio_csr_rs::signer::service::RequestOptions;
use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

const KEYS: [&str; 2] = ["CertSigner", "ImpersonatedIdentity"];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let Ok(request) = IstioCertificateRequest::decode(rest) else {
            return;
        };
        let got = RequestOptions::from_metadata(request.metadata.as_ref());
        check(request.metadata.as_ref(), &got);
        let again = IstioCertificateRequest::decode(request.encode_to_vec().as_slice())
            .expect("a re-encoded request decodes");
        let got_again = RequestOptions::from_metadata(again.metadata.as_ref());
        assert_eq!(summary(&got), summary(&got_again));
    } else {
        let mut u = Unstructured::new(rest);
        let Ok(metadata) = build_struct(&mut u, 0) else {
            return;
        };
        let got = RequestOptions::from_metadata(Some(&metadata));
        check(Some(&metadata), &got);
    }
});

/// Ok((cert_signer, impersonated)) or Err(()) for any refusal.
type Summary = Result<(Option<String>, Option<String>), ()>;

fn summary(got: &Result<RequestOptions<'_>, SignError>) -> Summary {
    match got {
        Ok(o) => Ok((
            o.cert_signer.map(str::to_owned),
            o.impersonated_identity.map(str::to_owned),
        )),
        Err(_) => Err(()),
    }
}

fn check(metadata: Option<&Struct>, got: &Result<RequestOptions<'_>, SignError>) {
    let read = |key: &str| -> Result<Option<String>, ()> {
        match metadata.and_then(|m| m.fields.get(key)).map(|v| &v.kind) {
            None | Some(None) | Some(Some(Kind::NullValue(_))) => Ok(None),
            Some(Some(Kind::StringValue(s))) if s.is_empty() => Ok(None),
            Some(Some(Kind::StringValue(s))) => Ok(Some(s.clone())),
            Some(Some(_)) => Err(()),
        }
    };
    let want: Summary = match (read(KEYS[0]), read(KEYS[1])) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        _ => Err(()),
    };
    assert_eq!(summary(got), want);
    if let Err(e) = got {
        assert!(
            matches!(e, SignError::InvalidRequest(_)),
            "refused with {e:?}"
        );
    }
}

fn build_struct(u: &mut Unstructured<'_>, depth: u32) -> ArbResult<Struct> {
    let mut fields = BTreeMap::new();
    let n = u.int_in_range(0..=4)?;
    for _ in 0..n {
        let key = match u.int_in_range(0..=3)? {
            0 => KEYS[0].to_owned(),
            1 => KEYS[1].to_owned(),
            2 => KEYS[u.int_in_range(0..=1)?].to_lowercase(),
            _ => u.arbitrary::<String>()?,
        };
        fields.insert(key, build_value(u, depth)?);
    }
    Ok(Struct { fields })
}

fn build_value(u: &mut Unstructured<'_>, depth: u32) -> ArbResult<Value> {
    let deep = depth >= 3;
    let kind = match u.int_in_range(0..=if deep { 4 } else { 6 })? {
        0 => None,
        1 => Some(Kind::NullValue(u.arbitrary()?)),
        2 => Some(Kind::StringValue(u.arbitrary()?)),
        3 => Some(Kind::NumberValue(u.arbitrary()?)),
        4 => Some(Kind::BoolValue(u.arbitrary()?)),
        5 => Some(Kind::StructValue(build_struct(u, depth + 1)?)),
        _ => {
            let n = u.int_in_range(0..=3)?;
            let values = (0..n)
                .map(|_| build_value(u, depth + 1))
                .collect::<ArbResult<Vec<_>>>()?;
            Some(Kind::ListValue(ListValue { values }))
        }
    };
    Ok(Value { kind })
}

//! What a bearer must look like before it may cost a TokenReview: a well-formed JWS whose claims
//! could be accepted (not expired, for one of our audiences, from the cluster's issuer once that
//! is known). Forged tokens (random bytes, expired or foreign JWTs) are refused here, so a flood
//! of them is no load on the API server. The signature is checked next, against the cluster's
//! published keys (`jwks`, `signing_keys`); nothing here makes a token valid, it only spares the
//! review of tokens that cannot be.

use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

/// Clock skew tolerated between this replica and the API server that minted the token.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// A service-account JWT is 1 to 2 KiB; far bigger is not one.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a bearer cannot be a token the API server would accept for us.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unacceptable {
    #[error("not a compact JWS")]
    NotJws,
    #[error("unusable JOSE header")]
    Header,
    #[error("unreadable claims")]
    Claims,
    #[error("no expiry")]
    NoExpiry,
    #[error("expired")]
    Expired,
    #[error("not valid yet")]
    NotYetValid,
    #[error("not for our audiences")]
    Audience,
    #[error("from another issuer")]
    Issuer,
}

impl Unacceptable {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Unacceptable::NotJws => "not-jws",
            Unacceptable::Header => "header",
            Unacceptable::Claims => "claims",
            Unacceptable::NoExpiry => "no-expiry",
            Unacceptable::Expired => "expired",
            Unacceptable::NotYetValid => "not-yet-valid",
            Unacceptable::Audience => "audience",
            Unacceptable::Issuer => "issuer",
        }
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct RawClaims {
    iss: Option<String>,
    aud: Option<Audience>,
    exp: Option<f64>,
    nbf: Option<f64>,
}

/// The claims that decide whether a review is worth making.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub issuer: Option<String>,
    /// Unix seconds.
    pub expires: i64,
}

/// Checks the shape and claims of `token` at `now` (Unix seconds). `issuers`: the issuers the
/// cluster is known to use; empty while unknown, then any issuer passes.
pub fn precheck(
    token: &str,
    audiences: &[String],
    issuers: &[String],
    now: i64,
) -> Result<Claims, Unacceptable> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Unacceptable::NotJws);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Unacceptable::NotJws);
    };
    let decode = |part: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| Unacceptable::NotJws)
    };
    if signature.is_empty() || decode(signature)?.is_empty() {
        return Err(Unacceptable::NotJws);
    }
    let header: Header =
        serde_json::from_slice(&decode(header)?).map_err(|_| Unacceptable::Header)?;
    // Kubernetes signs service-account tokens with RS256 or ES256; an unsigned token never
    // passes a review.
    if header.alg.eq_ignore_ascii_case("none") || header.alg.is_empty() {
        return Err(Unacceptable::Header);
    }
    let claims: RawClaims =
        serde_json::from_slice(&decode(payload)?).map_err(|_| Unacceptable::Claims)?;
    let skew = CLOCK_SKEW.as_secs() as f64;
    let now_f = now as f64;
    let expires = claims.exp.ok_or(Unacceptable::NoExpiry)?;
    if !expires.is_finite() || expires + skew <= now_f {
        return Err(Unacceptable::Expired);
    }
    if claims
        .nbf
        .is_some_and(|nbf| !nbf.is_finite() || nbf - skew > now_f)
    {
        return Err(Unacceptable::NotYetValid);
    }
    let granted = match &claims.aud {
        Some(Audience::One(one)) => audiences.contains(one),
        Some(Audience::Many(many)) => many.iter().any(|a| audiences.contains(a)),
        None => false,
    };
    if !granted {
        return Err(Unacceptable::Audience);
    }
    if !issuers.is_empty() && !claims.iss.as_ref().is_some_and(|iss| issuers.contains(iss)) {
        return Err(Unacceptable::Issuer);
    }
    Ok(Claims {
        issuer: claims.iss,
        expires: expires as i64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn jwt(header: &str, claims: serde_json::Value) -> String {
        format!(
            "{}.{}.{}",
            b64(header.as_bytes()),
            b64(claims.to_string().as_bytes()),
            b64(b"signature")
        )
    }

    fn sa_token(claims: serde_json::Value) -> String {
        jwt(r#"{"alg":"RS256","kid":"k"}"#, claims)
    }

    fn ours() -> Vec<String> {
        vec!["istio-ca".to_owned()]
    }

    #[test]
    fn passes_a_token_the_api_server_could_accept() {
        let token = sa_token(serde_json::json!({
            "iss": "https://kubernetes.default.svc", "aud": ["istio-ca"],
            "exp": NOW + 3600, "nbf": NOW - 10, "sub": "system:serviceaccount:a:b"
        }));
        let claims = precheck(&token, &ours(), &[], NOW).unwrap();
        assert_eq!(
            claims.issuer.as_deref(),
            Some("https://kubernetes.default.svc")
        );
        assert_eq!(claims.expires, NOW + 3600);
        let known = ["https://kubernetes.default.svc".to_owned()];
        assert!(precheck(&token, &ours(), &known, NOW).is_ok());
        let single_audience = sa_token(serde_json::json!({"aud": "istio-ca", "exp": NOW + 60}));
        assert!(precheck(&single_audience, &ours(), &[], NOW).is_ok());
    }

    #[test]
    fn refuses_what_no_review_could_accept() {
        let good = serde_json::json!({"iss": "i", "aud": ["istio-ca"], "exp": NOW + 3600});
        let with = |key: &str, value: serde_json::Value| {
            let mut claims = good.clone();
            claims[key] = value;
            sa_token(claims)
        };
        let without = |key: &str| {
            let mut claims = good.clone();
            claims.as_object_mut().unwrap().remove(key);
            sa_token(claims)
        };
        let known = ["i".to_owned()];
        let cases: Vec<(&str, String, Unacceptable)> = vec![
            (
                "random bytes",
                "r4nd0m-garbage".into(),
                Unacceptable::NotJws,
            ),
            ("two parts", "a.b".into(), Unacceptable::NotJws),
            ("four parts", "a.b.c.d".into(), Unacceptable::NotJws),
            ("bad base64", "!!.??.**".into(), Unacceptable::NotJws),
            (
                "no signature",
                format!("{}.{}.", b64(b"{\"alg\":\"RS256\"}"), b64(b"{}")),
                Unacceptable::NotJws,
            ),
            (
                "huge",
                "a".repeat(MAX_TOKEN_BYTES + 1),
                Unacceptable::NotJws,
            ),
            (
                "alg none",
                jwt(r#"{"alg":"none"}"#, good.clone()),
                Unacceptable::Header,
            ),
            (
                "header not json",
                format!("{}.{}.{}", b64(b"x"), b64(b"{}"), b64(b"s")),
                Unacceptable::Header,
            ),
            (
                "claims not json",
                format!(
                    "{}.{}.{}",
                    b64(b"{\"alg\":\"RS256\"}"),
                    b64(b"x"),
                    b64(b"s")
                ),
                Unacceptable::Claims,
            ),
            ("no exp", without("exp"), Unacceptable::NoExpiry),
            (
                "expired",
                with("exp", (NOW - 61).into()),
                Unacceptable::Expired,
            ),
            (
                "not yet valid",
                with("nbf", (NOW + 120).into()),
                Unacceptable::NotYetValid,
            ),
            (
                "other audience",
                with("aud", serde_json::json!(["kubernetes"])),
                Unacceptable::Audience,
            ),
            ("no audience", without("aud"), Unacceptable::Audience),
        ];
        for (what, token, want) in cases {
            assert_eq!(precheck(&token, &ours(), &known, NOW), Err(want), "{what}");
        }
        assert_eq!(
            precheck(&with("iss", "forged".into()), &ours(), &known, NOW),
            Err(Unacceptable::Issuer)
        );
        assert_eq!(
            precheck(&without("iss"), &ours(), &known, NOW),
            Err(Unacceptable::Issuer)
        );
        // Within the skew, expiry and nbf do not refuse: the API server's clock decides.
        assert!(precheck(&with("exp", (NOW - 30).into()), &ours(), &known, NOW).is_ok());
        assert!(precheck(&with("nbf", (NOW + 30).into()), &ours(), &known, NOW).is_ok());
    }
}

//! JWS signature checks of service-account tokens against a cluster's published signing keys
//! (its JSON Web Key Set, `/openid/v1/jwks`). A token no key of its cluster signed is refused
//! here, so forging one costs a signature check, not a TokenReview.
//!
//! ring is used directly rather than a JWT crate: rustls already links ring, a JWT crate would
//! bring a second crypto backend, and the algorithm must follow the key, never the token's
//! `alg` (which is how HMAC-with-the-public-key confusion happens).

use base64::Engine;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

/// A cluster publishes one key per `--service-account-key-file`; far more is not a key set.
const MAX_KEYS: usize = 64;
/// ring's RSA verifier takes 2048- to 8192-bit moduli; other sizes cannot be checked here.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("unreadable key set")]
    KeySet,
    #[error("more than {MAX_KEYS} keys")]
    TooManyKeys,
    #[error("no signing key this agent can check")]
    NoUsableKey,
    #[error("not a compact JWS")]
    Malformed,
    #[error("algorithm not accepted for the key")]
    Algorithm,
    #[error("no key with this key ID")]
    UnknownKey,
    /// The key named is published but of a kind ring cannot check (e.g. P-521): the API
    /// server must decide.
    #[error("signed with a key this agent cannot check")]
    Unsupported,
    #[error("bad signature")]
    Invalid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PublicKey {
    /// Big-endian modulus and exponent, without leading zeros (as ring wants them).
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// The uncompressed point 0x04 || x || y.
    Ec { curve: Curve, point: Vec<u8> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    kid: Option<String>,
    /// The JWK's `alg`, when it names one: the only algorithm accepted with this key.
    alg: Option<String>,
    key: PublicKey,
}

/// The signing keys of one cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: Vec<Key>,
    /// Key IDs of published signing keys this agent cannot check.
    unsupported: Vec<Option<String>>,
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
struct RawKey {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

fn b64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

fn without_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}

impl RawKey {
    fn public_key(&self) -> Option<PublicKey> {
        match self.kty.as_str() {
            "RSA" => {
                let n = without_leading_zeros(b64(self.n.as_deref()?)?);
                let e = without_leading_zeros(b64(self.e.as_deref()?)?);
                let bits = n.len() * 8 - n.first()?.leading_zeros() as usize;
                ((RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) && !e.is_empty())
                    .then_some(PublicKey::Rsa { n, e })
            }
            "EC" => {
                let (curve, len) = match self.crv.as_deref()? {
                    "P-256" => (Curve::P256, 32),
                    "P-384" => (Curve::P384, 48),
                    _ => return None,
                };
                let (x, y) = (b64(self.x.as_deref()?)?, b64(self.y.as_deref()?)?);
                if x.len() != len || y.len() != len {
                    return None;
                }
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Some(PublicKey::Ec { curve, point })
            }
            // Symmetric ("oct") and unknown key types are never used to verify.
            _ => None,
        }
    }
}

impl KeySet {
    /// Reads a JWKS document. Keys for encryption are skipped; signing keys this agent cannot
    /// check are remembered by ID, so their tokens go to the API server rather than being
    /// refused.
    pub fn parse(json: &[u8]) -> Result<Self, JwksError> {
        let raw: RawSet = serde_json::from_slice(json).map_err(|_| JwksError::KeySet)?;
        if raw.keys.len() > MAX_KEYS {
            return Err(JwksError::TooManyKeys);
        }
        let mut set = KeySet::default();
        for raw_key in raw.keys {
            if raw_key.usage.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            match raw_key.public_key() {
                Some(key) => set.keys.push(Key {
                    kid: raw_key.kid,
                    alg: raw_key.alg,
                    key,
                }),
                None => set.unsupported.push(raw_key.kid),
            }
        }
        if set.keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(set)
    }

    /// Keys this agent checks signatures with.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Whether `alg` is the algorithm `key` signs with. Only RS256, ES256 and ES384 exist here
/// (what Kubernetes signs with, RSA or EC keys): `none`, HMAC and anything else fit no key.
fn fits(alg: &str, key: &Key) -> bool {
    if key.alg.as_deref().is_some_and(|declared| declared != alg) {
        return false;
    }
    matches!(
        (alg, &key.key),
        ("RS256", PublicKey::Rsa { .. })
            | (
                "ES256",
                PublicKey::Ec {
                    curve: Curve::P256,
                    ..
                }
            )
            | (
                "ES384",
                PublicKey::Ec {
                    curve: Curve::P384,
                    ..
                }
            )
    )
}

fn verifies(alg: &str, key: &PublicKey, message: &[u8], sig: &[u8]) -> bool {
    match (alg, key) {
        ("RS256", PublicKey::Rsa { n, e }) => RsaPublicKeyComponents { n, e }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
            .is_ok(),
        ("ES256", PublicKey::Ec { point, .. }) => {
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, sig)
                .is_ok()
        }
        ("ES384", PublicKey::Ec { point, .. }) => {
            UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                .verify(message, sig)
                .is_ok()
        }
        _ => false,
    }
}

/// Checks the JWS signature of `token` with the key its `kid` names (every key when it names
/// none: signers older than key IDs). `Ok` says only that one of the cluster's keys signed it;
/// claims, revocation and bound objects are for the caller and the API server.
pub fn verify(token: &str, set: &KeySet) -> Result<(), JwksError> {
    let (message, sig) = token.rsplit_once('.').ok_or(JwksError::Malformed)?;
    let (header, _) = message.split_once('.').ok_or(JwksError::Malformed)?;
    let header: Header = b64(header)
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or(JwksError::Malformed)?;
    let sig = b64(sig).ok_or(JwksError::Malformed)?;
    let named: Vec<&Key> = set
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.kid == header.kid)
        .collect();
    // A key we cannot check may have signed it: then the API server decides.
    let maybe_unsupported = match &header.kid {
        Some(_) => set.unsupported.contains(&header.kid),
        None => !set.unsupported.is_empty(),
    };
    let fitting: Vec<&Key> = named
        .iter()
        .copied()
        .filter(|k| fits(&header.alg, k))
        .collect();
    if fitting
        .iter()
        .any(|k| verifies(&header.alg, &k.key, message.as_bytes(), &sig))
    {
        return Ok(());
    }
    Err(if maybe_unsupported {
        JwksError::Unsupported
    } else if named.is_empty() {
        JwksError::UnknownKey
    } else if fitting.is_empty() {
        JwksError::Algorithm
    } else {
        JwksError::Invalid
    })
}

#[cfg(test)]
pub(crate) mod testing {
    //! Signing keys and tokens for tests.

    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, RsaKeyPair};

    use super::*;

    pub fn enc(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    pub enum Signer {
        Rsa(RsaKeyPair),
        Ec(EcdsaKeyPair, &'static str),
    }

    impl Signer {
        pub fn rsa() -> Self {
            let pair = crate::pki::testing::KeyAlg::Rsa2048.generate();
            Signer::Rsa(RsaKeyPair::from_pkcs8(&pair.serialize_der()).unwrap())
        }

        /// A fresh RSA key (the cached test key is one per process).
        pub fn fresh_rsa() -> Self {
            let pair = crate::pki::keys::generate_rsa(2048).unwrap();
            Signer::Rsa(RsaKeyPair::from_pkcs8(&pair.serialize_der()).unwrap())
        }

        pub fn ec(alg: &'static str) -> Self {
            let (signing, curve) = match alg {
                "ES256" => (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, alg),
                _ => (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, alg),
            };
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
            Signer::Ec(
                EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), &rng).unwrap(),
                curve,
            )
        }

        pub fn alg(&self) -> &'static str {
            match self {
                Signer::Rsa(_) => "RS256",
                Signer::Ec(_, alg) => alg,
            }
        }

        /// The public key as a JWK, as the API server publishes it.
        pub fn jwk(&self, kid: &str) -> serde_json::Value {
            match self {
                Signer::Rsa(pair) => {
                    let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
                    serde_json::json!({"use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256",
                                       "n": enc(&public.n), "e": enc(&public.e)})
                }
                Signer::Ec(pair, alg) => {
                    let point = pair.public_key().as_ref();
                    let half = (point.len() - 1) / 2;
                    let crv = if *alg == "ES256" { "P-256" } else { "P-384" };
                    serde_json::json!({"use": "sig", "kty": "EC", "kid": kid, "alg": alg,
                                       "crv": crv, "x": enc(&point[1..1 + half]),
                                       "y": enc(&point[1 + half..])})
                }
            }
        }

        pub fn sign(&self, message: &[u8]) -> Vec<u8> {
            let rng = SystemRandom::new();
            match self {
                Signer::Rsa(pair) => {
                    let mut sig = vec![0u8; pair.public().modulus_len()];
                    pair.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
                        .unwrap();
                    sig
                }
                Signer::Ec(pair, _) => pair.sign(&rng, message).unwrap().as_ref().to_vec(),
            }
        }

        /// A compact JWS of `claims` with `header`, signed by this key.
        pub fn token_with(&self, header: serde_json::Value, claims: &serde_json::Value) -> String {
            let message = format!(
                "{}.{}",
                enc(header.to_string().as_bytes()),
                enc(claims.to_string().as_bytes())
            );
            let sig = self.sign(message.as_bytes());
            format!("{message}.{}", enc(&sig))
        }

        pub fn token(&self, kid: Option<&str>, claims: &serde_json::Value) -> String {
            let mut header = serde_json::json!({"alg": self.alg()});
            if let Some(kid) = kid {
                header["kid"] = kid.into();
            }
            self.token_with(header, claims)
        }
    }

    pub fn key_set(keys: &[serde_json::Value]) -> KeySet {
        KeySet::parse(serde_json::json!({ "keys": keys }).to_string().as_bytes()).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn claims() -> serde_json::Value {
        serde_json::json!({"iss": "https://kubernetes.default.svc", "aud": ["istio-ca"],
                           "exp": 1_800_000_000, "sub": "system:serviceaccount:app:web"})
    }

    #[test]
    fn accepts_tokens_signed_by_a_published_key() {
        for signer in [Signer::rsa(), Signer::ec("ES256"), Signer::ec("ES384")] {
            let set = key_set(&[signer.jwk("k1")]);
            assert_eq!(set.len(), 1);
            let token = signer.token(Some("k1"), &claims());
            assert_eq!(verify(&token, &set), Ok(()), "{}", signer.alg());
        }
    }

    #[test]
    fn refuses_a_token_signed_by_another_key_or_altered() {
        for (signer, rogue) in [
            (Signer::rsa(), Signer::fresh_rsa()),
            (Signer::ec("ES256"), Signer::ec("ES256")),
        ] {
            let set = key_set(&[signer.jwk("k1")]);
            let forged = rogue.token(Some("k1"), &claims());
            assert_eq!(verify(&forged, &set), Err(JwksError::Invalid));
            // A real token whose claims were changed after signing.
            let real = signer.token(Some("k1"), &claims());
            let (rest, sig) = real.rsplit_once('.').unwrap();
            let (header, _) = rest.split_once('.').unwrap();
            let mut other = claims();
            other["sub"] = "system:serviceaccount:kube-system:admin".into();
            let altered = format!("{header}.{}.{sig}", enc(other.to_string().as_bytes()));
            assert_eq!(verify(&altered, &set), Err(JwksError::Invalid));
            // Random bytes where the signature goes.
            let random = format!("{rest}.{}", enc(&[7u8; 256]));
            assert_eq!(verify(&random, &set), Err(JwksError::Invalid));
        }
    }

    #[test]
    fn the_key_picks_the_algorithm_never_the_token() {
        let rsa = Signer::rsa();
        let set = key_set(&[rsa.jwk("k1")]);
        let message = format!(
            "{}.{}",
            enc(br#"{"alg":"HS256","kid":"k1"}"#),
            enc(claims().to_string().as_bytes())
        );
        // HMAC keyed with the public key's bytes, the classic confusion.
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(match &rsa {
            Signer::Rsa(pair) => pair.public(),
            Signer::Ec(..) => unreachable!(),
        });
        let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public.n);
        let tag = ring::hmac::sign(&hmac_key, message.as_bytes());
        let hs256 = format!("{message}.{}", enc(tag.as_ref()));
        assert_eq!(verify(&hs256, &set), Err(JwksError::Algorithm));

        let none = format!(
            "{}.{}.{}",
            enc(br#"{"alg":"none","kid":"k1"}"#),
            enc(claims().to_string().as_bytes()),
            enc(b"x")
        );
        assert_eq!(verify(&none, &set), Err(JwksError::Algorithm));
        let unsigned = format!(
            "{}.{}.",
            enc(br#"{"alg":"none"}"#),
            enc(claims().to_string().as_bytes())
        );
        assert_eq!(verify(&unsigned, &set), Err(JwksError::Algorithm));

        // An EC key does not check RS256, nor a P-256 key ES384.
        let ec = Signer::ec("ES256");
        let set = key_set(&[ec.jwk("e1")]);
        let header = serde_json::json!({"alg": "RS256", "kid": "e1"});
        assert_eq!(
            verify(&rsa.token_with(header, &claims()), &set),
            Err(JwksError::Algorithm)
        );
        let p384 = Signer::ec("ES384");
        let header = serde_json::json!({"alg": "ES384", "kid": "e1"});
        assert_eq!(
            verify(&p384.token_with(header, &claims()), &set),
            Err(JwksError::Algorithm)
        );
        // A JWK that declares its algorithm accepts no other, even one of its type.
        let mut declared = rsa.jwk("k1");
        declared["alg"] = "RS512".into();
        let set = key_set(&[declared]);
        assert_eq!(
            verify(&rsa.token(Some("k1"), &claims()), &set),
            Err(JwksError::Algorithm)
        );
    }

    #[test]
    fn kid_names_the_key_and_without_one_every_key_is_tried() {
        let (a, b) = (Signer::rsa(), Signer::ec("ES256"));
        let one = key_set(&[a.jwk("a")]);
        assert_eq!(verify(&a.token(None, &claims()), &one), Ok(()));
        let both = key_set(&[a.jwk("a"), b.jwk("b")]);
        assert_eq!(verify(&a.token(None, &claims()), &both), Ok(()));
        assert_eq!(verify(&b.token(None, &claims()), &both), Ok(()));
        assert_eq!(verify(&b.token(Some("b"), &claims()), &both), Ok(()));
        // Named by another key's ID: that key is the only one tried.
        assert_eq!(
            verify(&a.token(Some("b"), &claims()), &both),
            Err(JwksError::Algorithm)
        );
        let a2 = Signer::fresh_rsa();
        let rsa_pair = key_set(&[a.jwk("a"), a2.jwk("a2")]);
        assert_eq!(
            verify(&a.token(Some("a2"), &claims()), &rsa_pair),
            Err(JwksError::Invalid)
        );
        assert_eq!(verify(&a2.token(None, &claims()), &rsa_pair), Ok(()));
        let rogue = Signer::ec("ES256");
        assert_eq!(
            verify(&rogue.token(None, &claims()), &both),
            Err(JwksError::Invalid)
        );
        // An ID nobody published: maybe a key newer than this set (the caller refreshes).
        assert_eq!(
            verify(&a.token(Some("new"), &claims()), &both),
            Err(JwksError::UnknownKey)
        );
    }

    #[test]
    fn keys_that_cannot_be_checked_here_leave_it_to_the_api_server() {
        let rsa = Signer::rsa();
        let p521 = serde_json::json!({"use": "sig", "kty": "EC", "kid": "p521", "alg": "ES512",
                                      "crv": "P-521", "x": enc(&[1; 66]), "y": enc(&[2; 66])});
        let set = key_set(&[rsa.jwk("k1"), p521]);
        let header = serde_json::json!({"alg": "ES512", "kid": "p521"});
        let token = rsa.token_with(header, &claims());
        assert_eq!(verify(&token, &set), Err(JwksError::Unsupported));
        // Still refused when the key it names can be checked.
        let forged = Signer::fresh_rsa().token(Some("k1"), &claims());
        assert_eq!(verify(&forged, &set), Err(JwksError::Invalid));
    }

    #[test]
    fn reads_key_sets_as_kubernetes_publishes_them() {
        let rsa = Signer::rsa();
        let mut enc_key = Signer::ec("ES256").jwk("enc");
        enc_key["use"] = "enc".into();
        let hmac = serde_json::json!({"kty": "oct", "kid": "h", "k": enc(b"secret")});
        let set = key_set(&[rsa.jwk("k1"), enc_key, hmac]);
        assert_eq!(set.len(), 1);
        assert_eq!(set.unsupported, vec![Some("h".to_owned())]);
        // An HMAC "key" is never used: its tokens are the API server's to refuse.
        assert_eq!(
            KeySet::parse(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#),
            Err(JwksError::NoUsableKey)
        );
        assert_eq!(KeySet::parse(b"<html>"), Err(JwksError::KeySet));
        assert_eq!(
            KeySet::parse(br#"{"keys":[]}"#),
            Err(JwksError::NoUsableKey)
        );
        let many: Vec<serde_json::Value> = (0..=MAX_KEYS).map(|_| rsa.jwk("k")).collect();
        assert_eq!(
            KeySet::parse(serde_json::json!({ "keys": many }).to_string().as_bytes()),
            Err(JwksError::TooManyKeys)
        );
        // A 1024-bit RSA key cannot be checked with ring: kept aside, not refused.
        let small = serde_json::json!({"kty": "RSA", "kid": "small", "n": enc(&[0xff; 128]),
                                       "e": enc(&[1, 0, 1])});
        let set = key_set(&[rsa.jwk("k1"), small]);
        assert_eq!(set.unsupported, vec![Some("small".to_owned())]);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let set = key_set(&[Signer::rsa().jwk("k1")]);
        for token in ["", "abc", "a.b", "!!.??.**", "e30.e30.!!"] {
            assert_eq!(verify(token, &set), Err(JwksError::Malformed), "{token}");
        }
    }
}

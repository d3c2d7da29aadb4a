//! One cluster's service-account signing keys, fetched from its API server by OIDC discovery
//! (`/.well-known/openid-configuration`, then `/openid/v1/jwks`) through that cluster's own
//! client (its deadline and rate limit). Fetched once when the cluster starts, again in the
//! background, and on a token with an unknown key ID (a rotation) at most every
//! `MIN_REFRESH_INTERVAL`; concurrent callers share one fetch.
//!
//! Where discovery is refused or unreachable the check is off for that cluster (every token
//! goes to TokenReview, as before), said once in the log and in `/debug/bundle`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use super::jwks::{self, JwksError, KeySet};
use crate::cluster::ClusterStatus;

/// The first fetch may hold the cluster's first callers this long; beyond it, they are
/// reviewed as before.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A token naming a key not in the set refetches it at most this often per cluster: a flood of
/// made-up key IDs costs two GETs per interval.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Background refresh of a working key set (rotations are caught sooner, by their key ID).
const REFRESH_INTERVAL: Duration = Duration::from_secs(600);
/// Background retry while discovery is unavailable.
const RETRY_INTERVAL: Duration = Duration::from_secs(60);
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// The API server serves its keys here whatever `jwks_uri` says (which may name a public
/// bucket, `--service-account-jwks-uri`).
const JWKS_PATH: &str = "/openid/v1/jwks";
/// The API server answers 406 to `Accept: application/json` there.
const JWKS_TYPE: &str = "application/jwk-set+json";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{path} answered HTTP {code}")]
    Refused { path: &'static str, code: u16 },
    #[error("{path}: {error}")]
    Failed { path: &'static str, error: String },
    #[error("{path}: unreadable answer")]
    Unreadable { path: &'static str },
    #[error("{JWKS_PATH}: {0}")]
    Keys(JwksError),
    #[error("no answer within {FETCH_TIMEOUT:?}")]
    TimedOut,
}

impl FetchError {
    /// The API server said no (no discovery there, or not for us): unlike a network error or
    /// an overloaded server, retrying soon will not change that.
    fn is_definitive(&self) -> bool {
        match self {
            FetchError::Refused { code, .. } => matches!(code, 401 | 403 | 404 | 405),
            FetchError::Keys(_) => true,
            _ => false,
        }
    }
}

/// What the signature check says of one token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// One of the cluster's keys signed it.
    Verified,
    /// No key of the cluster signed it; the label says why (bounded, for metrics).
    Forged(&'static str),
    /// Not checked here (no key set, or a key this agent cannot check): the API server
    /// decides.
    Unchecked,
}

#[derive(Clone)]
enum Keys {
    Pending,
    Local(Arc<KeySet>),
    Unavailable(String),
}

impl Keys {
    fn describe(&self) -> String {
        match self {
            Keys::Pending => "pending".into(),
            Keys::Local(_) => "local".into(),
            Keys::Unavailable(why) => format!("unavailable: {why}"),
        }
    }
}

#[derive(Clone)]
struct Snapshot {
    keys: Keys,
    /// Fetches completed; a caller that saw an older one knows a fetch happened meanwhile.
    generation: u64,
    attempted: Option<Instant>,
}

pub struct SigningKeys {
    client: kube::Client,
    status: Option<Arc<ClusterStatus>>,
    state: Mutex<Snapshot>,
    /// Held for the length of a fetch: who waits on it shares that fetch's result.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
}

async fn get(
    client: &kube::Client,
    path: &'static str,
    accept: &'static str,
) -> Result<String, FetchError> {
    let request = http::Request::get(path)
        .header(http::header::ACCEPT, accept)
        .body(Vec::new())
        .map_err(|e| FetchError::Failed {
            path,
            error: e.to_string(),
        })?;
    client.request_text(request).await.map_err(|e| match e {
        kube::Error::Api(status) => FetchError::Refused {
            path,
            code: status.code,
        },
        // Reduced to its kind: an exec plugin's output may be in an auth error's text.
        kube::Error::Auth(_) => FetchError::Failed {
            path,
            error: "authentication failed".into(),
        },
        other => FetchError::Failed {
            path,
            error: other.to_string(),
        },
    })
}

/// The cluster's issuer and key set.
async fn fetch(client: &kube::Client) -> Result<(String, KeySet), FetchError> {
    let discovery: Discovery = serde_json::from_str(
        &get(client, DISCOVERY_PATH, "application/json").await?,
    )
    .map_err(|_| FetchError::Unreadable {
        path: DISCOVERY_PATH,
    })?;
    let keys = KeySet::parse(get(client, JWKS_PATH, JWKS_TYPE).await?.as_bytes())
        .map_err(FetchError::Keys)?;
    Ok((discovery.issuer, keys))
}

impl SigningKeys {
    /// The keys of the cluster `client` reaches; `status` shows the check in `/debug/bundle`.
    /// Nothing is fetched until `maintain` runs or a token needs the keys.
    pub fn new(client: kube::Client, status: Option<Arc<ClusterStatus>>) -> Arc<Self> {
        if let Some(status) = &status {
            status.set_token_signature_check(Keys::Pending.describe());
        }
        Arc::new(Self {
            client,
            status,
            state: Mutex::new(Snapshot {
                keys: Keys::Pending,
                generation: 0,
                attempted: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    fn snapshot(&self) -> Snapshot {
        match self.state.lock() {
            Ok(state) => state.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Fetches now and then for ever: at once, then every `REFRESH_INTERVAL` (or
    /// `RETRY_INTERVAL` while unavailable). Run it beside the cluster; it ends with its task.
    pub async fn maintain(self: Arc<Self>) {
        loop {
            let seen = self.snapshot().generation;
            self.refresh(seen).await;
            let wait = match self.snapshot().keys {
                Keys::Local(_) => REFRESH_INTERVAL,
                _ => RETRY_INTERVAL,
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Fetches the keys unless a fetch completed since the caller saw generation `seen` (then
    /// its result is used) or the last one began less than `MIN_REFRESH_INTERVAL` ago.
    /// Whether the keys may have changed since `seen`.
    async fn refresh(&self, seen: u64) -> bool {
        let _fetching = self.fetching.lock().await;
        let before = self.snapshot();
        if before.generation != seen {
            return true;
        }
        if before
            .attempted
            .is_some_and(|at| at.elapsed() < MIN_REFRESH_INTERVAL)
        {
            return false;
        }
        let started = Instant::now();
        let result = tokio::time::timeout(FETCH_TIMEOUT, fetch(&self.client))
            .await
            .unwrap_or(Err(FetchError::TimedOut));
        let keys = match (result, &before.keys) {
            (Ok((issuer, set)), previous) => {
                let changed = match previous {
                    Keys::Local(old) => **old != set,
                    _ => true,
                };
                if changed {
                    tracing::info!(%issuer, keys = set.len(), "checking service-account token signatures locally");
                }
                Keys::Local(Arc::new(set))
            }
            // A passing failure keeps the keys known: they still sign today's tokens.
            (Err(error), Keys::Local(set)) if !error.is_definitive() => {
                tracing::warn!(%error, "refreshing the service-account signing keys failed; keeping the known ones");
                Keys::Local(set.clone())
            }
            (Err(error), previous) => {
                if !matches!(previous, Keys::Unavailable(_)) {
                    tracing::warn!(%error, "service-account signing keys unavailable: every token goes to TokenReview");
                }
                Keys::Unavailable(error.to_string())
            }
        };
        if let Some(status) = &self.status {
            status.set_token_signature_check(keys.describe());
        }
        let next = Snapshot {
            keys,
            generation: before.generation + 1,
            attempted: Some(started),
        };
        match self.state.lock() {
            Ok(mut state) => *state = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        true
    }

    /// Checks the signature of `token` (its claims already pre-checked). Waits only for the
    /// first fetch, or for a refresh when the token names a key not seen yet.
    pub async fn check(&self, token: &str) -> Check {
        let mut snapshot = self.snapshot();
        if matches!(snapshot.keys, Keys::Pending) {
            self.refresh(snapshot.generation).await;
            snapshot = self.snapshot();
        }
        let Keys::Local(set) = &snapshot.keys else {
            return Check::Unchecked;
        };
        match jwks::verify(token, set) {
            Err(JwksError::UnknownKey) => {
                if !self.refresh(snapshot.generation).await {
                    return Check::Forged("unknown-key");
                }
                match &self.snapshot().keys {
                    Keys::Local(set) => outcome(jwks::verify(token, set)),
                    _ => Check::Unchecked,
                }
            }
            other => outcome(other),
        }
    }
}

fn outcome(result: Result<(), JwksError>) -> Check {
    match result {
        Ok(()) => Check::Verified,
        Err(JwksError::Unsupported) => Check::Unchecked,
        Err(JwksError::UnknownKey) => Check::Forged("unknown-key"),
        Err(_) => Check::Forged("signature"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

    use super::super::jwks::testing::Signer;
    use super::*;

    /// An API server's discovery endpoints, answering slowly enough for callers to overlap.
    struct Fake {
        keys: Mutex<Vec<serde_json::Value>>,
        discovery_code: AtomicU16,
        jwks_code: AtomicU16,
        jwks_fetches: AtomicUsize,
    }

    impl Fake {
        fn new(keys: Vec<serde_json::Value>) -> Arc<Self> {
            Arc::new(Self {
                keys: Mutex::new(keys),
                discovery_code: AtomicU16::new(200),
                jwks_code: AtomicU16::new(200),
                jwks_fetches: AtomicUsize::new(0),
            })
        }

        fn client(self: &Arc<Self>) -> kube::Client {
            let fake = self.clone();
            let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
                let fake = fake.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let (code, body) = match request.uri().path() {
                        DISCOVERY_PATH => (
                            fake.discovery_code.load(Ordering::SeqCst),
                            serde_json::json!({"issuer": "https://kubernetes.default.svc",
                                               "jwks_uri": "https://10.0.0.1/openid/v1/jwks"}),
                        ),
                        JWKS_PATH => {
                            fake.jwks_fetches.fetch_add(1, Ordering::SeqCst);
                            let keys = fake.keys.lock().unwrap().clone();
                            (
                                fake.jwks_code.load(Ordering::SeqCst),
                                serde_json::json!({ "keys": keys }),
                            )
                        }
                        _ => (404, serde_json::json!({})),
                    };
                    // Errors come as a Status object, as the API server sends them.
                    let body = if code == 200 {
                        body
                    } else {
                        serde_json::json!({"kind": "Status", "apiVersion": "v1",
                                           "status": "Failure", "code": code})
                    };
                    let response = http::Response::builder()
                        .status(code)
                        .body(kube::client::Body::from(body.to_string().into_bytes()))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            kube::Client::new(service, "default")
        }

        fn fetches(&self) -> usize {
            self.jwks_fetches.load(Ordering::SeqCst)
        }
    }

    fn claims() -> serde_json::Value {
        serde_json::json!({"aud": ["istio-ca"], "exp": 1_800_000_000})
    }

    async fn check_all(keys: &Arc<SigningKeys>, token: &str, callers: usize) -> Vec<Check> {
        let mut checks = tokio::task::JoinSet::new();
        for _ in 0..callers {
            let (keys, token) = (keys.clone(), token.to_owned());
            checks.spawn(async move { keys.check(&token).await });
        }
        checks.join_all().await
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch_and_refreshes_are_rate_limited() {
        let (old, new) = (Signer::rsa(), Signer::ec("ES256"));
        let fake = Fake::new(vec![old.jwk("old")]);
        let status = ClusterStatus::new("primary", false);
        let keys = SigningKeys::new(fake.client(), Some(status.clone()));
        assert_eq!(
            status.report().token_signature_check.as_deref(),
            Some("pending")
        );

        let token = old.token(Some("old"), &claims());
        let checks = check_all(&keys, &token, 20).await;
        assert!(checks.iter().all(|c| *c == Check::Verified), "{checks:?}");
        assert_eq!(fake.fetches(), 1);
        assert_eq!(
            status.report().token_signature_check.as_deref(),
            Some("local")
        );

        // A rotation: the new key's tokens wait for a refetch, at most one per interval.
        fake.keys.lock().unwrap().push(new.jwk("new"));
        let rotated = new.token(Some("new"), &claims());
        assert_eq!(keys.check(&rotated).await, Check::Forged("unknown-key"));
        assert_eq!(fake.fetches(), 1, "refetched within the interval");
        tokio::time::advance(MIN_REFRESH_INTERVAL).await;
        let checks = check_all(&keys, &rotated, 20).await;
        assert!(checks.iter().all(|c| *c == Check::Verified), "{checks:?}");
        assert_eq!(fake.fetches(), 2);

        // Made-up key IDs, however many, cost no fetch within the interval.
        for i in 0..50 {
            let forged = new.token(Some(&format!("k{i}")), &claims());
            assert_eq!(keys.check(&forged).await, Check::Forged("unknown-key"));
        }
        assert_eq!(fake.fetches(), 2);
        let wrong_key = Signer::ec("ES256").token(Some("new"), &claims());
        assert_eq!(keys.check(&wrong_key).await, Check::Forged("signature"));
    }

    #[tokio::test(start_paused = true)]
    async fn without_discovery_every_token_is_left_to_the_review() {
        let signer = Signer::rsa();
        let fake = Fake::new(vec![signer.jwk("k")]);
        fake.discovery_code.store(404, Ordering::SeqCst);
        let status = ClusterStatus::new("primary", false);
        let keys = SigningKeys::new(fake.client(), Some(status.clone()));
        let forged = Signer::ec("ES256").token(Some("k"), &claims());
        assert_eq!(keys.check(&forged).await, Check::Unchecked);
        assert_eq!(
            status.report().token_signature_check.as_deref(),
            Some("unavailable: /.well-known/openid-configuration answered HTTP 404")
        );
        // Not asked again per token; the background retry finds it once it is served.
        tokio::time::advance(MIN_REFRESH_INTERVAL).await;
        assert_eq!(keys.check(&forged).await, Check::Unchecked);
        assert_eq!(fake.fetches(), 0);
        fake.discovery_code.store(200, Ordering::SeqCst);
        let maintain = tokio::spawn(keys.clone().maintain());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(keys.check(&forged).await, Check::Forged("signature"));
        maintain.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_passing_failure_keeps_the_known_keys_and_a_refusal_drops_them() {
        let signer = Signer::rsa();
        let fake = Fake::new(vec![signer.jwk("k")]);
        let status = ClusterStatus::new("primary", false);
        let keys = SigningKeys::new(fake.client(), Some(status.clone()));
        let real = signer.token(Some("k"), &claims());
        assert_eq!(keys.check(&real).await, Check::Verified);

        fake.jwks_code.store(503, Ordering::SeqCst);
        tokio::time::advance(MIN_REFRESH_INTERVAL).await;
        let unknown = signer.token(Some("other"), &claims());
        assert_eq!(keys.check(&unknown).await, Check::Forged("unknown-key"));
        assert_eq!(keys.check(&real).await, Check::Verified);
        assert_eq!(
            status.report().token_signature_check.as_deref(),
            Some("local")
        );

        fake.jwks_code.store(403, Ordering::SeqCst);
        tokio::time::advance(MIN_REFRESH_INTERVAL).await;
        assert_eq!(keys.check(&unknown).await, Check::Unchecked);
        assert_eq!(
            status.report().token_signature_check.as_deref(),
            Some("unavailable: /openid/v1/jwks answered HTTP 403")
        );
    }
}

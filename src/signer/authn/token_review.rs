//! Service-account tokens checked by the Kubernetes TokenReview API (what istiod and istio-csr
//! do), with a bounded cache of successful reviews: a restart storm of sidecars presenting the
//! same projected tokens costs one review per token, not one per CSR.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::signing_keys::{Check, SigningKeys};
use super::{
    AuthMethod, Authenticator, AuthnError, Caller, Credentials, PodRef, ServiceAccount, jwt,
};
use crate::cluster::ClusterTarget;
use crate::pki::identity::SpiffeId;

const SA_USER_PREFIX: &str = "system:serviceaccount:";
const SA_GROUP: &str = "system:serviceaccounts";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Enough for every pod of a large cluster; beyond it expired entries go first, then any.
const MAX_CACHE_ENTRIES: usize = 65_536;
/// A TokenReview is one round trip to the apiserver; longer means it is in trouble.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// Tokens the API server refused are refused again without asking, for this long at most
/// (never past their own expiry): a client retrying a bad token costs one review.
const REJECTED_TTL: Duration = Duration::from_secs(300);
const MAX_REJECTED_ENTRIES: usize = 16_384;
/// A cluster may use a new issuer (`--service-account-issuer` migration): a token of an
/// issuer not seen there before is still reviewed, but at most once per this interval per
/// cluster, so floods of forged issuers cost next to nothing.
const NEW_ISSUER_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Issuers remembered per cluster (a migration has two).
const MAX_ISSUERS_PER_CLUSTER: usize = 4;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AvoidedLabels {
    reason: &'static str,
}

/// TokenReview calls by outcome; cache hits make none.
#[derive(Clone, Default)]
pub struct TokenReviewMetrics {
    reviews: Family<ResultLabels, Counter>,
    avoided: Family<AvoidedLabels, Counter>,
}

impl TokenReviewMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "token_reviews",
            "TokenReview calls made to the API server, by result (success, refused, error); cache hits make none.",
            metrics.reviews.clone(),
        );
        registry.register(
            "token_reviews_avoided",
            "Bearer tokens refused without a TokenReview, by reason (not-jws, header, claims, no-expiry, expired, not-yet-valid, audience, issuer, signature, unknown-key, remembered).",
            metrics.avoided.clone(),
        );
        metrics
    }

    fn avoided(&self, reason: &'static str) {
        self.avoided.get_or_create(&AvoidedLabels { reason }).inc();
    }

    fn count(&self, result: &'static str) {
        self.reviews.get_or_create(&ResultLabels { result }).inc();
    }
}

pub struct TokenReviewer {
    client: kube::Client,
    audiences: Vec<String>,
    trust_domain: String,
    cache_ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], (Caller, Instant)>>,
    /// Tokens the API server refused, by the same key, until when.
    rejected: Mutex<HashMap<[u8; 32], Instant>>,
    /// Per cluster: the issuers of tokens it accepted, and when a new one may be tried.
    issuers: Mutex<HashMap<String, KnownIssuers>>,
    /// The local cluster's signing keys (a remote's are in its `RemoteCluster`); `None`: no
    /// local signature check.
    local_keys: Option<Arc<SigningKeys>>,
    metrics: TokenReviewMetrics,
}

struct KnownIssuers {
    issuers: Vec<String>,
    next_probe: Instant,
}

/// The cluster a review goes to, by name (a remote's ID, whatever its kubeconfig generation).
fn cluster_name(cluster: &ClusterTarget) -> String {
    match cluster {
        ClusterTarget::Local => String::new(),
        ClusterTarget::Remote(remote) => remote.id.clone(),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl TokenReviewer {
    pub fn new(
        client: kube::Client,
        audiences: Vec<String>,
        trust_domain: &str,
        cache_ttl: Duration,
        metrics: TokenReviewMetrics,
    ) -> Self {
        Self {
            client,
            audiences,
            trust_domain: trust_domain.to_owned(),
            cache_ttl,
            cache: Mutex::new(HashMap::new()),
            rejected: Mutex::new(HashMap::new()),
            issuers: Mutex::new(HashMap::new()),
            local_keys: None,
            metrics,
        }
    }

    /// Checks the signatures of the local cluster's tokens against `keys` before any review.
    pub fn with_signing_keys(mut self, keys: Arc<SigningKeys>) -> Self {
        self.local_keys = Some(keys);
        self
    }

    fn signing_keys<'a>(&'a self, cluster: &'a ClusterTarget) -> Option<&'a SigningKeys> {
        match cluster {
            ClusterTarget::Local => self.local_keys.as_deref(),
            ClusterTarget::Remote(remote) => Some(&remote.signing_keys),
        }
    }

    fn known_issuers(&self, cluster: &str) -> Vec<String> {
        self.issuers
            .lock()
            .ok()
            .and_then(|known| known.get(cluster).map(|k| k.issuers.clone()))
            .unwrap_or_default()
    }

    /// Whether a token of an issuer not known for `cluster` may be reviewed now.
    fn may_probe_new_issuer(&self, cluster: &str) -> bool {
        let Ok(mut known) = self.issuers.lock() else {
            return false;
        };
        let Some(entry) = known.get_mut(cluster) else {
            return true;
        };
        let now = Instant::now();
        if now < entry.next_probe {
            return false;
        }
        entry.next_probe = now + NEW_ISSUER_PROBE_INTERVAL;
        true
    }

    fn learn_issuer(&self, cluster: String, issuer: Option<String>) {
        let (Some(issuer), Ok(mut known)) = (issuer, self.issuers.lock()) else {
            return;
        };
        let entry = known.entry(cluster).or_insert_with(|| KnownIssuers {
            issuers: Vec::new(),
            next_probe: Instant::now() + NEW_ISSUER_PROBE_INTERVAL,
        });
        if !entry.issuers.contains(&issuer) {
            if entry.issuers.len() >= MAX_ISSUERS_PER_CLUSTER {
                entry.issuers.remove(0);
            }
            entry.issuers.push(issuer);
        }
    }

    fn was_rejected(&self, key: &[u8; 32]) -> bool {
        self.rejected
            .lock()
            .ok()
            .and_then(|rejected| rejected.get(key).copied())
            .is_some_and(|until| Instant::now() < until)
    }

    fn remember_rejected(&self, key: [u8; 32], expires: i64) {
        let left = u64::try_from(expires.saturating_sub(unix_now())).unwrap_or(0);
        let keep = REJECTED_TTL.min(Duration::from_secs(left));
        let Ok(mut rejected) = self.rejected.lock() else {
            return;
        };
        let now = Instant::now();
        if rejected.len() >= MAX_REJECTED_ENTRIES {
            rejected.retain(|_, until| *until > now);
            if rejected.len() >= MAX_REJECTED_ENTRIES
                && let Some(victim) = rejected.keys().next().copied()
            {
                rejected.remove(&victim);
            }
        }
        rejected.insert(key, now + keep);
    }

    fn cache_key(&self, cluster: &ClusterTarget, token: &str) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(format!("{cluster:?}").as_bytes());
        for audience in &self.audiences {
            ctx.update(&[0]);
            ctx.update(audience.as_bytes());
        }
        ctx.update(&[0, 0]);
        ctx.update(token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Caller> {
        let cache = self.cache.lock().ok()?;
        let (caller, expiry) = cache.get(key)?;
        (Instant::now() < *expiry).then(|| caller.clone())
    }

    fn remember(&self, key: [u8; 32], caller: &Caller, token: &str) {
        // Never past the token's own expiry; a token whose expiry cannot be read is not cached.
        let Some(token_left) = token_lifetime_left(token) else {
            return;
        };
        let keep = self.cache_ttl.min(token_left);
        if keep.is_zero() {
            return;
        }
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= MAX_CACHE_ENTRIES {
            let now = Instant::now();
            cache.retain(|_, (_, expiry)| *expiry > now);
            if cache.len() >= MAX_CACHE_ENTRIES
                && let Some(victim) = cache.keys().next().copied()
            {
                cache.remove(&victim);
            }
        }
        cache.insert(key, (caller.clone(), Instant::now() + keep));
    }

    /// Asks the API server of `cluster` (the local one, or a registered remote).
    async fn review(
        &self,
        cluster: &ClusterTarget,
        token: &str,
    ) -> Result<TokenReviewStatus, AuthnError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let client = match cluster {
            ClusterTarget::Local => self.client.clone(),
            ClusterTarget::Remote(remote) => remote.review_client.clone(),
        };
        let api: Api<TokenReview> = Api::all(client);
        let answer =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| AuthnError::Unavailable("TokenReview timed out".into()))?
                .map_err(|e| AuthnError::Unavailable(format!("TokenReview failed: {e}")))?;
        answer
            .status
            .ok_or_else(|| AuthnError::Unavailable("TokenReview without status".into()))
    }
}

/// Turns a review's answer into a caller, with istiod's and istio-csr's checks.
pub fn caller_from_review(
    status: &TokenReviewStatus,
    audiences: &[String],
    trust_domain: &str,
) -> Result<Caller, AuthnError> {
    if status.authenticated != Some(true) || status.error.as_deref().is_some_and(|e| !e.is_empty())
    {
        return Err(AuthnError::InvalidToken);
    }
    // An apiserver that ignores spec.audiences answers without them: refuse rather than
    // accept a token minted for some other audience.
    let granted = status.audiences.as_deref().unwrap_or_default();
    if !granted.iter().any(|a| audiences.contains(a)) {
        return Err(AuthnError::InvalidToken);
    }
    let user = status.user.as_ref().ok_or(AuthnError::InvalidToken)?;
    if !user
        .groups
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|g| g == SA_GROUP)
    {
        return Err(AuthnError::InvalidToken);
    }
    let username = user.username.as_deref().unwrap_or_default();
    let (namespace, name) = username
        .strip_prefix(SA_USER_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .ok_or(AuthnError::InvalidToken)?;
    let identity =
        SpiffeId::new(trust_domain, namespace, name).map_err(|_| AuthnError::InvalidToken)?;
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|extra| extra.get(key))
            .and_then(|values| values.first())
            .cloned()
    };
    let pod = match (extra(EXTRA_POD_NAME), extra(EXTRA_POD_UID)) {
        (Some(name), Some(uid)) => Some(PodRef { name, uid }),
        _ => None,
    };
    Ok(Caller {
        identities: vec![identity],
        service_account: Some(ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }),
        pod,
        method: AuthMethod::TokenReview,
    })
}

/// Time left before the JWT's `exp` claim (read, not verified: the review verified it).
fn token_lifetime_left(token: &str) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let exp = u64::try_from(claims.get("exp")?.as_i64()?).ok()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(exp.saturating_sub(now)))
}

#[async_trait]
impl Authenticator for TokenReviewer {
    async fn authenticate(
        &self,
        credentials: &Credentials<'_>,
    ) -> Result<Option<Caller>, AuthnError> {
        let Some(token) = credentials.bearer else {
            return Ok(None);
        };
        let key = self.cache_key(credentials.cluster, token);
        if let Some(caller) = self.cached(&key) {
            return Ok(Some(caller));
        }
        // Spare the API server what it would refuse anyway (see `jwt`).
        if self.was_rejected(&key) {
            self.metrics.avoided("remembered");
            return Err(AuthnError::InvalidToken);
        }
        let cluster = cluster_name(credentials.cluster);
        let known = self.known_issuers(&cluster);
        let now = unix_now();
        let refuse = |reason: &'static str| {
            self.metrics.avoided(reason);
            AuthnError::InvalidToken
        };
        let (claims, new_issuer) = match jwt::precheck(token, &self.audiences, &known, now) {
            Ok(claims) => (claims, false),
            Err(jwt::Unacceptable::Issuer) => {
                let claims = jwt::precheck(token, &self.audiences, &[], now)
                    .map_err(|reason| refuse(reason.label()))?;
                (claims, true)
            }
            Err(reason) => return Err(refuse(reason.label())),
        };
        // Only the cluster's own keys make a token worth a review. A token they verify may
        // name a new issuer (a `--service-account-issuer` migration): it is the cluster's, so
        // it is reviewed; unverified ones of a new issuer are tried once per interval.
        let check = match self.signing_keys(credentials.cluster) {
            Some(keys) => keys.check(token).await,
            None => Check::Unchecked,
        };
        match check {
            Check::Forged(reason) => return Err(refuse(reason)),
            Check::Unchecked if new_issuer && !self.may_probe_new_issuer(&cluster) => {
                return Err(refuse(jwt::Unacceptable::Issuer.label()));
            }
            Check::Verified | Check::Unchecked => {}
        }
        let status = match self.review(credentials.cluster, token).await {
            Ok(status) => status,
            Err(error) => {
                self.metrics.count("error");
                return Err(error);
            }
        };
        let caller = match caller_from_review(&status, &self.audiences, &self.trust_domain) {
            Ok(caller) => caller,
            Err(error) => {
                self.metrics.count("refused");
                self.remember_rejected(key, claims.expires);
                return Err(error);
            }
        };
        self.metrics.count("success");
        self.learn_issuer(cluster, claims.issuer);
        self.remember(key, &caller, token);
        Ok(Some(caller))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(username: &str, groups: &[&str], audiences: &[&str]) -> TokenReviewStatus {
        let mut extra = BTreeMap::new();
        extra.insert(EXTRA_POD_NAME.to_owned(), vec!["web-1".to_owned()]);
        extra.insert(EXTRA_POD_UID.to_owned(), vec!["uid-1".to_owned()]);
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_owned()),
                groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
                extra: Some(extra),
                uid: None,
            }),
            error: None,
        }
    }

    fn istio_ca() -> Vec<String> {
        vec!["istio-ca".to_owned()]
    }

    #[test]
    fn accepts_a_service_account_with_pod_extras() {
        let caller = caller_from_review(
            &status(
                "system:serviceaccount:app:web",
                &[SA_GROUP, "system:authenticated"],
                &["istio-ca"],
            ),
            &istio_ca(),
            "cluster.local",
        )
        .unwrap();
        assert_eq!(
            caller.identities,
            vec!["spiffe://cluster.local/ns/app/sa/web".parse().unwrap()]
        );
        assert_eq!(
            caller.pod,
            Some(PodRef {
                name: "web-1".into(),
                uid: "uid-1".into()
            })
        );
    }

    #[test]
    fn refuses_what_istiod_refuses() {
        let cases = [
            ("not authenticated", {
                let mut s = status("system:serviceaccount:app:web", &[SA_GROUP], &["istio-ca"]);
                s.authenticated = Some(false);
                s
            }),
            ("error set", {
                let mut s = status("system:serviceaccount:app:web", &[SA_GROUP], &["istio-ca"]);
                s.error = Some("token expired".into());
                s
            }),
            (
                "not a service account",
                status("alice", &[SA_GROUP], &["istio-ca"]),
            ),
            (
                "missing group",
                status(
                    "system:serviceaccount:app:web",
                    &["system:authenticated"],
                    &["istio-ca"],
                ),
            ),
            (
                "other audience",
                status("system:serviceaccount:app:web", &[SA_GROUP], &["vault"]),
            ),
            (
                "no audiences",
                status("system:serviceaccount:app:web", &[SA_GROUP], &[]),
            ),
            (
                "malformed user",
                status("system:serviceaccount:app", &[SA_GROUP], &["istio-ca"]),
            ),
            (
                "invalid name",
                status("system:serviceaccount:App:web", &[SA_GROUP], &["istio-ca"]),
            ),
        ];
        for (name, review) in cases {
            assert_eq!(
                caller_from_review(&review, &istio_ca(), "cluster.local"),
                Err(AuthnError::InvalidToken),
                "{name}"
            );
        }
    }

    #[test]
    fn reads_the_expiry_of_a_jwt() {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"exp\":{exp},\"sub\":\"x\"}}"));
        let left = token_lifetime_left(&format!("e30.{payload}.sig")).unwrap();
        assert!(left <= Duration::from_secs(600) && left >= Duration::from_secs(590));
        assert_eq!(token_lifetime_left("not-a-jwt"), None);
    }
}

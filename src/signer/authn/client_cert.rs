//! Client-certificate authentication for renewals: a workload presenting a certificate that
//! chains to the mesh roots may request its own identities again (istio-csr's
//! `--enable-client-cert-authenticator`). The TLS layer already verified the chain at handshake;
//! it is verified again here against the roots in force now, which may have rotated since.
//! With Kubernetes, the service account must also still exist: a certificate outlives the
//! deletion of its account, and must not renew itself for ever after it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::ServiceAccount as KubeServiceAccount;
use kube::Api;
use rustls_pki_types::UnixTime;
use tokio::sync::watch;
use tokio::time::Instant;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{AuthMethod, Authenticator, AuthnError, Caller, Credentials, ServiceAccount};
use crate::cluster::ClusterTarget;
use crate::pki::chain::{self, RootBundle};
use crate::pki::identity::SpiffeId;

/// An account seen to exist is not asked about again for this long: a renewal storm costs one
/// GET per account per minute at most, and a deletion takes effect within it.
const EXISTS_TTL: Duration = Duration::from_secs(60);
/// A deletion is remembered briefly, so an account re-created is usable again soon.
const GONE_TTL: Duration = Duration::from_secs(5);
/// An API error counts as "exists" for this long: during an outage, or without RBAC to read
/// service accounts, a renewal storm costs one failing GET per account per interval.
const ERROR_TTL: Duration = Duration::from_secs(10);
/// Accounts remembered; beyond it expired entries go first, then any.
const MAX_ACCOUNTS: usize = 16_384;
/// API errors are logged at most this often (an outage would otherwise log every renewal).
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Whether service accounts still exist, asked of the local cluster and remembered.
pub struct ServiceAccounts {
    client: kube::Client,
    known: Mutex<HashMap<(String, String), (bool, Instant)>>,
    last_error_log: Mutex<Option<Instant>>,
}

impl ServiceAccounts {
    /// `client`: the local cluster's review client (authentication's rate-limit bucket, so a
    /// renewal storm never delays the Lease).
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            known: Mutex::new(HashMap::new()),
            last_error_log: Mutex::new(None),
        }
    }

    fn remembered(&self, key: &(String, String)) -> Option<bool> {
        let known = self.known.lock().ok()?;
        let (exists, until) = known.get(key)?;
        (Instant::now() < *until).then_some(*exists)
    }

    fn remember(&self, key: (String, String), exists: bool, ttl: Duration) {
        let Ok(mut known) = self.known.lock() else {
            return;
        };
        let now = Instant::now();
        if known.len() >= MAX_ACCOUNTS {
            known.retain(|_, (_, until)| *until > now);
            if known.len() >= MAX_ACCOUNTS
                && let Some(victim) = known.keys().next().cloned()
            {
                known.remove(&victim);
            }
        }
        known.insert(key, (exists, now + ttl));
    }

    /// False only when the API server says the account is gone (404).
    ///
    /// Any other failure (unreachable, throttled, forbidden) counts as "exists": the caller's
    /// certificate was issued by this CA to this account and is still valid, so refusing it on
    /// an API outage would turn the outage into a mesh-wide certificate expiry, the failure
    /// client-certificate renewal exists to avoid. Such answers are remembered for
    /// `ERROR_TTL` only.
    pub async fn still_exists(&self, namespace: &str, name: &str) -> bool {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(exists) = self.remembered(&key) {
            return exists;
        }
        let api: Api<KubeServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        match api.get_metadata_opt(name).await {
            Ok(found) => {
                let exists = found.is_some();
                self.remember(key, exists, if exists { EXISTS_TTL } else { GONE_TTL });
                exists
            }
            Err(error) => {
                self.log_error(&error);
                self.remember(key, true, ERROR_TTL);
                true
            }
        }
    }

    fn log_error(&self, error: &kube::Error) {
        let Ok(mut last) = self.last_error_log.lock() else {
            return;
        };
        if last.is_some_and(|at| at.elapsed() < ERROR_LOG_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        let error = match error {
            kube::Error::Api(status) if status.code == 403 => {
                "forbidden: grant get on serviceaccounts to check renewals".to_owned()
            }
            kube::Error::Api(status) => format!("{} {}", status.code, status.reason),
            // Reduced to its kind: an exec plugin's output may be in an auth error's text.
            kube::Error::Auth(_) => "authentication failed".to_owned(),
            other => other.to_string(),
        };
        tracing::warn!(%error, "cannot check that a renewing service account exists; renewals are allowed meanwhile");
    }
}

pub struct ClientCertAuthenticator {
    roots: watch::Receiver<Arc<RootBundle>>,
    /// Identities of other trust domains are refused even when their certificate chains to a
    /// trusted root (a bundle shared with another mesh must not let its workloads renew here).
    trust_domain: String,
    /// With Kubernetes: renewals of deleted service accounts are refused.
    accounts: Option<ServiceAccounts>,
}

impl ClientCertAuthenticator {
    pub fn new(roots: watch::Receiver<Arc<RootBundle>>, trust_domain: &str) -> Self {
        Self {
            roots,
            trust_domain: trust_domain.to_owned(),
            accounts: None,
        }
    }

    /// Refuses renewals once the caller's service account is gone from the local cluster.
    pub fn with_service_accounts(mut self, accounts: ServiceAccounts) -> Self {
        self.accounts = Some(accounts);
        self
    }
}

#[async_trait]
impl Authenticator for ClientCertAuthenticator {
    async fn authenticate(
        &self,
        credentials: &Credentials<'_>,
    ) -> Result<Option<Caller>, AuthnError> {
        let Some((leaf, intermediates)) = credentials.peer_certs.and_then(|c| c.split_first())
        else {
            return Ok(None);
        };
        if *credentials.cluster != ClusterTarget::Local {
            return Err(AuthnError::UnknownCluster("remote".into()));
        }
        let roots = self.roots.borrow().clone();
        chain::verify_path(leaf, intermediates, &roots, UnixTime::now())
            .map_err(|e| AuthnError::InvalidClientCertificate(e.to_string()))?;
        let (_, cert) = X509Certificate::from_der(leaf)
            .map_err(|e| AuthnError::InvalidClientCertificate(e.to_string()))?;
        let uris = chain::uri_sans(&cert)
            .map_err(|_| AuthnError::InvalidClientCertificate("non-URI SAN".into()))?;
        let identities: Vec<SpiffeId> = uris
            .iter()
            .map(|u| u.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| AuthnError::InvalidClientCertificate(format!("{e}")))?;
        let Some(first) = identities.first() else {
            return Err(AuthnError::InvalidClientCertificate("no URI SAN".into()));
        };
        if identities
            .iter()
            .any(|id| id.trust_domain() != self.trust_domain)
        {
            return Err(AuthnError::InvalidClientCertificate(
                "identity of another trust domain".into(),
            ));
        }
        if let Some(accounts) = &self.accounts {
            for id in &identities {
                if !accounts
                    .still_exists(id.namespace(), id.service_account())
                    .await
                {
                    return Err(AuthnError::InvalidClientCertificate(
                        "its service account no longer exists".into(),
                    ));
                }
            }
        }
        Ok(Some(Caller {
            service_account: Some(ServiceAccount {
                namespace: first.namespace().to_owned(),
                name: first.service_account().to_owned(),
            }),
            identities,
            pod: None,
            method: AuthMethod::ClientCertificate,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::testing::{KeyAlg, TestCa};

    const ID: &str = "spiffe://cluster.local/ns/default/sa/default";

    fn authenticator(root: &TestCa) -> ClientCertAuthenticator {
        let roots = RootBundle::from_certs(vec![root.cert.clone()]).unwrap();
        let (_tx, rx) = watch::channel(Arc::new(roots));
        ClientCertAuthenticator::new(rx, "cluster.local")
    }

    #[tokio::test]
    async fn a_mesh_certificate_authenticates_its_identity() {
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let (leaf, _) = root.leaf(ID);
        let certs = [leaf];
        let caller = authenticator(&root)
            .authenticate(&Credentials {
                bearer: None,
                peer_certs: Some(&certs),
                cluster: &ClusterTarget::Local,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(caller.identities, vec![ID.parse().unwrap()]);
        assert_eq!(caller.method, AuthMethod::ClientCertificate);
    }

    #[tokio::test]
    async fn a_foreign_certificate_is_refused() {
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let rogue = TestCa::root("rogue", KeyAlg::EcdsaP256);
        let (leaf, _) = rogue.leaf(ID);
        let certs = [leaf];
        let result = authenticator(&root)
            .authenticate(&Credentials {
                bearer: None,
                peer_certs: Some(&certs),
                cluster: &ClusterTarget::Local,
            })
            .await;
        assert!(matches!(
            result,
            Err(AuthnError::InvalidClientCertificate(_))
        ));
    }

    #[tokio::test]
    async fn a_mesh_certificate_of_another_trust_domain_is_refused() {
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let (leaf, _) = root.leaf("spiffe://other.mesh/ns/default/sa/default");
        let certs = [leaf];
        let result = authenticator(&root)
            .authenticate(&Credentials {
                bearer: None,
                peer_certs: Some(&certs),
                cluster: &ClusterTarget::Local,
            })
            .await;
        assert!(matches!(
            result,
            Err(AuthnError::InvalidClientCertificate(_))
        ));
    }

    #[tokio::test]
    async fn no_certificate_is_not_this_authenticators_business() {
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let result = authenticator(&root)
            .authenticate(&Credentials {
                bearer: Some("token"),
                peer_certs: None,
                cluster: &ClusterTarget::Local,
            })
            .await;
        assert_eq!(result, Ok(None));
    }

    /// An API server whose answer to every ServiceAccount GET the test sets, counting them.
    fn accounts_api(
        code: Arc<std::sync::atomic::AtomicU16>,
        gets: Arc<std::sync::atomic::AtomicUsize>,
    ) -> kube::Client {
        use std::sync::atomic::Ordering;
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let (code, gets) = (code.clone(), gets.clone());
            async move {
                assert!(request.uri().path().contains("/serviceaccounts/"));
                gets.fetch_add(1, Ordering::SeqCst);
                let code = code.load(Ordering::SeqCst);
                let body = if code == 200 {
                    serde_json::json!({"apiVersion": "meta.k8s.io/v1",
                                       "kind": "PartialObjectMetadata",
                                       "metadata": {"name": "default", "namespace": "default"}})
                } else {
                    let reason = if code == 404 {
                        "NotFound"
                    } else {
                        "ServiceUnavailable"
                    };
                    serde_json::json!({"kind": "Status", "apiVersion": "v1",
                                       "status": "Failure", "reason": reason, "code": code})
                };
                let response = http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body.to_string().into_bytes()))
                    .unwrap();
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        kube::Client::new(service, "default")
    }

    #[tokio::test(start_paused = true)]
    async fn a_deleted_service_account_renews_no_more_and_api_errors_refuse_nothing() {
        use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let (leaf, _) = root.leaf(ID);
        let certs = [leaf];
        let (code, gets) = (Arc::new(AtomicU16::new(200)), Arc::new(AtomicUsize::new(0)));
        let authenticator = authenticator(&root).with_service_accounts(ServiceAccounts::new(
            accounts_api(code.clone(), gets.clone()),
        ));
        let credentials = Credentials {
            bearer: None,
            peer_certs: Some(&certs),
            cluster: &ClusterTarget::Local,
        };
        let renew = || authenticator.authenticate(&credentials);
        // Present: asked once, then remembered for a minute.
        for _ in 0..3 {
            assert!(renew().await.unwrap().is_some());
        }
        assert_eq!(gets.load(Ordering::SeqCst), 1);

        // Deleted: refused once the remembered answer has expired, and that is remembered too.
        code.store(404, Ordering::SeqCst);
        assert!(renew().await.is_ok());
        tokio::time::advance(EXISTS_TTL).await;
        for _ in 0..3 {
            assert!(matches!(
                renew().await,
                Err(AuthnError::InvalidClientCertificate(_))
            ));
        }
        assert_eq!(gets.load(Ordering::SeqCst), 2);

        // The API failing: renewals go on, asking again only after a short while.
        tokio::time::advance(GONE_TTL).await;
        code.store(503, Ordering::SeqCst);
        assert!(renew().await.unwrap().is_some());
        assert!(renew().await.unwrap().is_some());
        assert_eq!(gets.load(Ordering::SeqCst), 3);
        tokio::time::advance(ERROR_TTL).await;
        assert!(renew().await.unwrap().is_some());
        assert_eq!(gets.load(Ordering::SeqCst), 4);
    }
}

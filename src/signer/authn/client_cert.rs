//! Client-certificate authentication for renewals: a workload presenting a certificate that
//! chains to the mesh roots may request its own identities again (istio-csr's
//! `--enable-client-cert-authenticator`). The TLS layer already verified the chain at handshake;
//! it is verified again here against the roots in force now, which may have rotated since.

use async_trait::async_trait;
use rustls_pki_types::UnixTime;
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{AuthMethod, Authenticator, AuthnError, Caller, Credentials, ServiceAccount};
use crate::cluster::ClusterTarget;
use crate::pki::chain::{self, RootBundle};
use crate::pki::identity::SpiffeId;
use std::sync::Arc;

pub struct ClientCertAuthenticator {
    roots: watch::Receiver<Arc<RootBundle>>,
    /// Identities of other trust domains are refused even when their certificate chains to a
    /// trusted root (a bundle shared with another mesh must not let its workloads renew here).
    trust_domain: String,
}

impl ClientCertAuthenticator {
    pub fn new(roots: watch::Receiver<Arc<RootBundle>>, trust_domain: &str) -> Self {
        Self {
            roots,
            trust_domain: trust_domain.to_owned(),
        }
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
}

//! Tenant signers: one issuer and one root bundle per `CertSigner`, isolated.
//!
//! Istio's "custom CA integration using Kubernetes CSR" gives each tenant its own signer:
//! pilot-agent sends `CertSigner: foo` (ISTIO_META_CERT_SIGNER, set per namespace by a
//! ProxyConfig), and workloads of different signers must not be able to talk mTLS, because
//! each trusts only the last element of its own answer. So a tenant's chain is verified
//! against that tenant's roots only, and its answer ends with exactly those roots; tenant
//! roots are never pooled with the mesh's (the serving certificate, istiod's and the
//! `istio-ca-root-cert` bundle stay on the mesh's pinned roots).
//!
//! Which tenant serves a request is decided here, before any API call:
//! - `CertSigner` set: it must be in the table (else InvalidArgument) and allowed for the
//!   caller's namespace (else PermissionDenied);
//! - `CertSigner` empty: the namespace's default signer, else the mesh's issuer and roots.

pub mod file;
pub mod load;
pub mod mesh_config;

use std::sync::Arc;

use crate::pki::chain::RootBundle;
use crate::signer::issuer::SignerRoute;
pub use file::{Backend, Namespaces};

/// One tenant signer, with its roots loaded.
#[derive(Debug)]
pub struct Tenant {
    /// The `CertSigner` value; also the bounded `signer` label of metrics.
    pub name: String,
    pub route: SignerRoute,
    pub roots: Arc<RootBundle>,
    /// Where the roots come from, for `/debug/bundle`.
    pub roots_source: String,
    pub namespaces: Namespaces,
    pub default: bool,
}

/// The signers in force. Empty when no `--signers-file` or `--mesh-config` is given.
#[derive(Debug, Default)]
pub struct TenantTable {
    tenants: Vec<Arc<Tenant>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TenantError {
    #[error("CertSigner {0:?} is not a configured signer")]
    Unknown(String),
    #[error("CertSigner {signer:?} is not allowed for namespace {namespace:?}")]
    NotAllowed { signer: String, namespace: String },
}

impl TenantTable {
    pub fn new(tenants: Vec<Tenant>) -> Self {
        Self {
            tenants: tenants.into_iter().map(Arc::new).collect(),
        }
    }

    pub fn tenants(&self) -> &[Arc<Tenant>] {
        &self.tenants
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.tenants.iter().find(|t| t.name == name)
    }

    /// The tenant that serves a caller of `namespace` asking for `cert_signer`; `None` means
    /// the mesh's own issuer and pinned roots.
    pub fn select(
        &self,
        namespace: &str,
        cert_signer: Option<&str>,
    ) -> Result<Option<Arc<Tenant>>, TenantError> {
        match cert_signer {
            Some(name) => {
                let tenant = self
                    .get(name)
                    .ok_or_else(|| TenantError::Unknown(name.to_owned()))?;
                if !tenant.namespaces.allows(namespace) {
                    return Err(TenantError::NotAllowed {
                        signer: name.to_owned(),
                        namespace: namespace.to_owned(),
                    });
                }
                Ok(Some(tenant.clone()))
            }
            None => Ok(self
                .tenants
                .iter()
                .find(|t| t.default && t.namespaces.allows(namespace))
                .cloned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::testing::{KeyAlg, TestCa};

    fn tenant(name: &str, namespaces: Namespaces, default: bool) -> Tenant {
        let ca = TestCa::root(name, KeyAlg::EcdsaP256);
        Tenant {
            name: name.into(),
            route: SignerRoute {
                issuer_ref: None,
                kube_csr_signer_name: Some(format!("example.com/{name}")),
            },
            roots: Arc::new(RootBundle::from_pem(ca.cert_pem().as_bytes()).unwrap()),
            roots_source: "test".into(),
            namespaces,
            default,
        }
    }

    #[test]
    fn selects_by_cert_signer_then_by_the_namespace_default() {
        let only = |ns: &[&str]| Namespaces::Only(ns.iter().map(|s| s.to_string()).collect());
        let table = TenantTable::new(vec![
            tenant("foo", only(&["tenant-foo"]), true),
            tenant("bar", only(&["tenant-bar", "shared"]), false),
            tenant("open", Namespaces::Any, false),
        ]);
        let name =
            |t: Result<Option<Arc<Tenant>>, TenantError>| t.map(|t| t.map(|t| t.name.clone()));
        assert_eq!(
            name(table.select("tenant-foo", None)),
            Ok(Some("foo".into()))
        );
        assert_eq!(
            name(table.select("tenant-foo", Some("foo"))),
            Ok(Some("foo".into()))
        );
        assert_eq!(
            name(table.select("shared", Some("bar"))),
            Ok(Some("bar".into()))
        );
        assert_eq!(
            name(table.select("anyone", Some("open"))),
            Ok(Some("open".into()))
        );
        // No default for the namespace: the mesh's issuer.
        assert_eq!(name(table.select("tenant-bar", None)), Ok(None));
        assert_eq!(name(table.select("elsewhere", None)), Ok(None));
        assert_eq!(
            name(table.select("tenant-bar", Some("foo"))),
            Err(TenantError::NotAllowed {
                signer: "foo".into(),
                namespace: "tenant-bar".into()
            })
        );
        assert_eq!(
            name(table.select("tenant-foo", Some("nobody"))),
            Err(TenantError::Unknown("nobody".into()))
        );
        assert_eq!(
            name(TenantTable::default().select("tenant-foo", Some("foo"))),
            Err(TenantError::Unknown("foo".into()))
        );
    }
}

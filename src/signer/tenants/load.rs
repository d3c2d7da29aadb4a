//! Builds the tenant table from `--signers-file`, the roots files it names and
//! `--mesh-config`, and follows them: a change applies to new requests; a broken update keeps
//! the previous table and is reported (log, `/debug/bundle`, a metric).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::file::{self, Backend, Namespaces, RootsSource, SignerSpec};
use super::{Tenant, TenantTable, mesh_config};
use crate::fswatch::{self, Follower};
use crate::pki::chain::RootBundle;
use crate::signer::issuer::SignerRoute;
use crate::signer::issuer::cert_manager::IssuerRef;

/// What the table is built from.
#[derive(Clone, Debug)]
pub struct Sources {
    pub signers_file: Option<PathBuf>,
    pub mesh_config: Option<PathBuf>,
    pub backend: Backend,
    /// `--cert-signer-domain`: names kube-csr signers `<domain>/<name>`, and only mesh-config
    /// `certSigners` of this domain are read.
    pub cert_signer_domain: Option<String>,
}

/// cert-manager's signer names for ClusterIssuers (`clusterissuers.cert-manager.io/<name>`),
/// so that a mesh config written for cert-manager maps onto an issuerRef.
const CLUSTER_ISSUER_SIGNER_DOMAIN: &str = "clusterissuers.cert-manager.io";

impl Sources {
    /// Every file the table was read from (the roots files depend on the signers file).
    fn paths(&self, specs: &[SignerSpec]) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self
            .signers_file
            .iter()
            .chain(self.mesh_config.iter())
            .cloned()
            .collect();
        for spec in specs {
            if let RootsSource::File(path) = &spec.roots {
                paths.push(path.clone());
            }
        }
        paths
    }

    /// Reads everything once: the table, and the signer specs it came from.
    pub fn load(&self) -> anyhow::Result<(TenantTable, Vec<SignerSpec>)> {
        use anyhow::Context;
        let specs = match &self.signers_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                file::parse(&text, self.backend, self.cert_signer_domain.as_deref())
                    .with_context(|| format!("{}", path.display()))?
            }
            None => Vec::new(),
        };
        let mesh_roots = match &self.mesh_config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                mesh_config::signer_roots(&text).with_context(|| format!("{}", path.display()))?
            }
            None => Vec::new(),
        };
        // Mesh-config roots by tenant name (the part after the domain).
        let mut by_name: BTreeMap<String, (String, String)> = BTreeMap::new();
        for entry in mesh_roots {
            let Some((domain, name)) = entry.signer_name.split_once('/') else {
                continue;
            };
            if self
                .cert_signer_domain
                .as_deref()
                .is_some_and(|d| d != domain)
            {
                continue;
            }
            match by_name.get_mut(name) {
                Some((signer_name, pem)) if *signer_name == entry.signer_name => {
                    pem.push_str(&entry.pem);
                    pem.push('\n');
                }
                Some((signer_name, _)) => anyhow::bail!(
                    "mesh config: certSigners {signer_name:?} and {:?} both name signer {name:?}; \
                     set --cert-signer-domain",
                    entry.signer_name
                ),
                None => {
                    by_name.insert(name.to_owned(), (entry.signer_name, entry.pem + "\n"));
                }
            }
        }
        let mut tenants = Vec::new();
        for spec in &specs {
            let (roots, source) = match &spec.roots {
                RootsSource::File(path) => (
                    std::fs::read(path).with_context(|| {
                        format!("signer {:?}: reading {}", spec.name, path.display())
                    })?,
                    format!("file:{}", path.display()),
                ),
                RootsSource::Pem(pem) => (pem.clone().into_bytes(), "rootsPEM".to_owned()),
                RootsSource::MeshConfig => {
                    let (signer_name, pem) = by_name.get(&spec.name).with_context(|| {
                        format!(
                            "signer {:?}: no rootsFile, no rootsPEM and no mesh-config \
                             caCertificates entry for it",
                            spec.name
                        )
                    })?;
                    (
                        pem.clone().into_bytes(),
                        format!("mesh-config:{signer_name}"),
                    )
                }
            };
            let roots = RootBundle::from_pem(&roots)
                .with_context(|| format!("signer {:?}: roots ({source})", spec.name))?;
            tenants.push(Tenant {
                name: spec.name.clone(),
                route: SignerRoute {
                    issuer_ref: spec.issuer_ref.clone(),
                    kube_csr_signer_name: spec.kube_csr_signer_name.clone(),
                },
                roots: Arc::new(roots),
                roots_source: source,
                namespaces: spec.namespaces.clone(),
                default: spec.default,
            });
        }
        // Signers only the mesh config names: open to every namespace, as in Istio.
        for (name, (signer_name, pem)) in by_name {
            if specs.iter().any(|s| s.name == name) {
                continue;
            }
            let route = self.implicit_route(&name, &signer_name)?;
            let roots = RootBundle::from_pem(pem.as_bytes())
                .with_context(|| format!("mesh config: roots of {signer_name:?}"))?;
            tenants.push(Tenant {
                name,
                route,
                roots: Arc::new(roots),
                roots_source: format!("mesh-config:{signer_name}"),
                namespaces: Namespaces::Any,
                default: false,
            });
        }
        Ok((TenantTable::new(tenants), specs))
    }

    fn implicit_route(&self, name: &str, signer_name: &str) -> anyhow::Result<SignerRoute> {
        match self.backend {
            Backend::KubeCsr => Ok(SignerRoute {
                issuer_ref: None,
                kube_csr_signer_name: Some(signer_name.to_owned()),
            }),
            Backend::CertManager => {
                let Some((CLUSTER_ISSUER_SIGNER_DOMAIN, issuer)) = signer_name.split_once('/')
                else {
                    anyhow::bail!(
                        "mesh config: certSigners {signer_name:?} names no cert-manager \
                         ClusterIssuer ({CLUSTER_ISSUER_SIGNER_DOMAIN}/<name>); list signer \
                         {name:?} with its issuerRef in --signers-file"
                    );
                };
                Ok(SignerRoute {
                    issuer_ref: Some(IssuerRef {
                        name: issuer.to_owned(),
                        kind: "ClusterIssuer".into(),
                        group: "cert-manager.io".into(),
                    }),
                    kube_csr_signer_name: None,
                })
            }
        }
    }
}

/// How the last reload went, for `/debug/bundle`.
#[derive(Debug, Default)]
pub struct ReloadStatus {
    /// The error of the last reload, while the previous table stays in force.
    pub last_error: ArcSwapOption<String>,
    pub failures: Counter,
}

impl ReloadStatus {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "signers_reload_failures",
            "Reloads of --signers-file, its roots files or --mesh-config that failed; the previous signer table stays in force.",
            self.failures.clone(),
        );
    }
}

/// Loads the table (an error here stops start-up) and returns it with the task that follows
/// the files. The watch is in place when this returns, so no change after the load is missed.
pub fn follow(
    sources: Sources,
    status: Arc<ReloadStatus>,
) -> anyhow::Result<(
    watch::Receiver<Arc<TenantTable>>,
    impl Future<Output = anyhow::Result<()>>,
)> {
    let (table, specs) = sources.load()?;
    for tenant in table.tenants() {
        tracing::info!(
            signer = %tenant.name,
            roots = %tenant.roots_source,
            namespaces = ?tenant.namespaces,
            default = tenant.default,
            "tenant signer loaded"
        );
    }
    let mut paths = sources.paths(&specs);
    let mut follower = Follower::new(&paths)?;
    let (tx, rx) = watch::channel(Arc::new(table));
    let task = async move {
        loop {
            follower.changed().await;
            follower.check(
                "tenant signer table",
                fswatch::fingerprint(&paths),
                false,
                || {
                    let (table, specs) = sources.load().inspect_err(|error| {
                        status.failures.inc();
                        status
                            .last_error
                            .store(Some(Arc::new(format!("{error:#}"))));
                    })?;
                    status.last_error.store(None);
                    let names: Vec<&str> =
                        table.tenants().iter().map(|t| t.name.as_str()).collect();
                    tracing::info!(signers = ?names, "tenant signers reloaded");
                    tx.send_replace(Arc::new(table));
                    // The table names the roots files: follow the ones it names now.
                    let now = sources.paths(&specs);
                    Ok((now != paths).then(|| {
                        paths.clone_from(&now);
                        now
                    }))
                },
            )?;
        }
    };
    Ok((rx, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::testing::{KeyAlg, TestCa};

    fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn file_entries_take_mesh_config_roots_and_mesh_only_signers_are_open() {
        let dir = tempfile::tempdir().unwrap();
        let (foo, bar, other) = (
            TestCa::root("foo", KeyAlg::EcdsaP256),
            TestCa::root("bar", KeyAlg::EcdsaP256),
            TestCa::root("other-domain", KeyAlg::EcdsaP256),
        );
        let indent = |pem: String| pem.replace('\n', "\n      ");
        let mesh = format!(
            "caCertificates:\n  - pem: |\n      {}\n    certSigners: [example.com/foo]\n  - pem: |\n      {}\n    certSigners: [example.com/bar]\n  - pem: |\n      {}\n    certSigners: [elsewhere.io/foo]\n",
            indent(foo.cert_pem()),
            indent(bar.cert_pem()),
            indent(other.cert_pem()),
        );
        let sources = Sources {
            signers_file: Some(write(
                dir.path(),
                "signers.yaml",
                "signers: [{name: foo, namespaces: [tenant-foo], default: true}]",
            )),
            mesh_config: Some(write(dir.path(), "mesh.yaml", &mesh)),
            backend: Backend::KubeCsr,
            cert_signer_domain: Some("example.com".into()),
        };
        let (table, _) = sources.load().unwrap();
        let foo_tenant = table.get("foo").unwrap();
        assert_eq!(foo_tenant.roots.certs(), std::slice::from_ref(&foo.cert));
        assert_eq!(
            foo_tenant.route.kube_csr_signer_name.as_deref(),
            Some("example.com/foo")
        );
        assert_eq!(
            foo_tenant.namespaces,
            Namespaces::Only(vec!["tenant-foo".into()])
        );
        let bar_tenant = table.get("bar").unwrap();
        assert_eq!(bar_tenant.roots.certs(), std::slice::from_ref(&bar.cert));
        assert_eq!(bar_tenant.namespaces, Namespaces::Any);
        assert_eq!(table.tenants().len(), 2, "elsewhere.io is another domain");

        // cert-manager: a mesh-only signer needs a ClusterIssuer signer name.
        let cert_manager = Sources {
            signers_file: None,
            backend: Backend::CertManager,
            cert_signer_domain: None,
            ..sources.clone()
        };
        let error = format!("{:#}", cert_manager.load().unwrap_err());
        assert!(error.contains("both name signer \"foo\""), "{error}");
        let mesh = format!(
            "caCertificates: [{{pem: {:?}, certSigners: [clusterissuers.cert-manager.io/foo]}}]",
            foo.cert_pem()
        );
        let cert_manager = Sources {
            mesh_config: Some(write(dir.path(), "mesh.yaml", &mesh)),
            ..cert_manager
        };
        let (table, _) = cert_manager.load().unwrap();
        assert_eq!(
            table.get("foo").unwrap().route.issuer_ref,
            Some(IssuerRef {
                name: "foo".into(),
                kind: "ClusterIssuer".into(),
                group: "cert-manager.io".into()
            })
        );
    }

    #[test]
    fn an_entry_without_roots_anywhere_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sources = Sources {
            signers_file: Some(write(
                dir.path(),
                "signers.yaml",
                "signers: [{name: foo, kubeCSRSignerName: example.com/foo, namespaces: [a]}]",
            )),
            mesh_config: None,
            backend: Backend::KubeCsr,
            cert_signer_domain: None,
        };
        let error = format!("{:#}", sources.load().unwrap_err());
        assert!(error.contains("no rootsFile"), "{error}");
    }

    #[tokio::test]
    async fn a_broken_update_keeps_the_table_and_a_fixed_one_applies() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (
            TestCa::root("first", KeyAlg::EcdsaP256),
            TestCa::root("second", KeyAlg::EcdsaP256),
        );
        let roots = write(dir.path(), "foo.pem", &first.cert_pem());
        let signers = format!(
            "signers: [{{name: foo, kubeCSRSignerName: example.com/foo, namespaces: [a], rootsFile: {}}}]",
            roots.display()
        );
        let sources = Sources {
            signers_file: Some(write(dir.path(), "signers.yaml", &signers)),
            mesh_config: None,
            backend: Backend::KubeCsr,
            cert_signer_domain: None,
        };
        let status = Arc::new(ReloadStatus::default());
        let (mut table, task) = follow(sources, status.clone()).unwrap();
        let _task = tokio::spawn(task);
        assert_eq!(
            table.borrow().get("foo").unwrap().roots.certs(),
            std::slice::from_ref(&first.cert)
        );

        std::fs::write(&roots, "not a certificate").unwrap();
        let deadline = std::time::Duration::from_secs(10);
        tokio::time::timeout(deadline, async {
            while status.last_error.load().is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the broken roots file was not reported");
        assert_eq!(status.failures.get(), 1);
        assert_eq!(
            table.borrow().get("foo").unwrap().roots.certs(),
            std::slice::from_ref(&first.cert)
        );

        std::fs::write(&roots, second.cert_pem()).unwrap();
        tokio::time::timeout(deadline, table.changed())
            .await
            .expect("the fixed roots file was not applied")
            .unwrap();
        assert_eq!(
            table.borrow().get("foo").unwrap().roots.certs(),
            std::slice::from_ref(&second.cert)
        );
        assert!(status.last_error.load().is_none());
    }
}

//! Where the trust roots come from: the pinned file (followed on disk), or the issuer's CA on
//! first use; and the standalone bundle file that mirrors them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

use super::plan::MIN_CERTIFICATE_DURATION;
use crate::fswatch::Follower;
use crate::pki::chain::RootBundle;
use crate::signer::issuance::own_csr;
use crate::signer::issuer::{IssueRequest, Issued, Issuer, NO_ANNOTATIONS, Purpose};
use crate::signer::serving::ServingNames;
use crate::standalone;

/// Loads the pinned root file and follows its changes: the watch is in place when this returns,
/// so no change after the load is missed. A broken update keeps the previous roots.
pub(super) fn watch_root_file(
    path: PathBuf,
) -> anyhow::Result<(
    watch::Receiver<Arc<RootBundle>>,
    impl Future<Output = anyhow::Result<()>>,
)> {
    let load = |path: &PathBuf| -> anyhow::Result<RootBundle> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        RootBundle::from_pem(&bytes).with_context(|| format!("parsing {}", path.display()))
    };
    let paths = [path.clone()];
    let follower = Follower::new(&paths)?;
    let initial = load(&path)?;
    tracing::info!(path = %path.display(), roots = initial.certs().len(), "pinned root bundle loaded");
    let (tx, rx) = watch::channel(Arc::new(initial));
    let task = async move {
        follower
            .follow("pinned root bundle", &paths, || {
                let bundle = load(&path)?;
                let changed = tx.send_if_modified(|current| {
                    let differs = current.certs() != bundle.certs();
                    if differs {
                        *current = Arc::new(bundle);
                    }
                    differs
                });
                if changed {
                    tracing::info!(path = %path.display(), "pinned root bundle changed");
                }
                Ok(())
            })
            .await
    };
    Ok((rx, task))
}

/// Without --root-ca-file, trusts the CA cert-manager names in `status.ca` of a first request
/// (istio-csr's behaviour, with its warning): a hijacked issuer at that moment would be trusted.
/// The one request that is not verified, since it is what the roots come from.
pub(super) async fn roots_on_first_use(
    issuer: &dyn Issuer,
    serving_names: &[String],
) -> anyhow::Result<RootBundle> {
    tracing::warn!(
        "no --root-ca-file: trusting the CA the issuer reports now, for the life of this process. \
         Pin the roots with --root-ca-file to defend against a hijacked signer"
    );
    let key = crate::pki::keys::generate_ecdsa_p256()?;
    let names = ServingNames::from_names(serving_names).leaf_names();
    let csr = own_csr(&names, &key)?;
    let issued = issuer
        .issue(IssueRequest {
            purpose: Purpose::Serving,
            csr: &csr,
            names: &names,
            lifetime: MIN_CERTIFICATE_DURATION,
            route: None,
            annotations: &NO_ANNOTATIONS,
        })
        .await
        .context("asking the issuer for its CA (status.ca)")?;
    let ca = match issued {
        Issued::External { ca, .. } => ca,
        Issued::InProcess { roots, .. } => roots.certs().to_vec(),
    };
    RootBundle::from_certs(ca)
        .context("the issuer's status.ca holds no usable root: pin one with --root-ca-file")
}

/// Keeps the standalone `root-cert.pem` equal to the roots in force.
pub(super) async fn follow_root_bundle_file(
    path: PathBuf,
    mut roots: watch::Receiver<Arc<RootBundle>>,
) -> anyhow::Result<()> {
    while roots.changed().await.is_ok() {
        let pem = roots.borrow_and_update().pem().to_owned();
        if let Err(error) = standalone::write_root_bundle(&path, &pem) {
            tracing::error!(error = %format!("{error:#}"), path = %path.display(), "root bundle file not updated");
        }
    }
    Ok(())
}

//! The built-in CA: signs in process with a CA key from a directory in istiod's `cacerts` layout
//! (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`) or a `kubernetes.io/tls`
//! Secret's (`tls.crt`, `tls.key`, `ca.crt`).
//!
//! Loading proves the CA is usable before it signs anything: the key matches the certificate,
//! the certificate is a CA, and a probe leaf it signs verifies through the chain to the pinned
//! roots. That proof is why in-process leaves are not re-verified per request (see
//! `VerifiedChain::signed_in_process`). Changed files are picked up without restart; a broken
//! update keeps the previous CA and logs why.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{IssueError, IssueRequest, Issued, Issuer, LeafNames};
use crate::fswatch::{self, Follower};
use crate::pki::chain::{self, RootBundle, VerifiedChain};
use crate::pki::identity::SpiffeId;
use crate::pki::{keys, leaf, pem};

#[derive(Debug, thiserror::Error)]
pub enum LocalCaError {
    #[error("{dir}: neither ca-cert.pem (cacerts layout) nor tls.crt (kubernetes.io/tls) found")]
    NoLayout { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("the CA does not chain to the trusted roots: {0}")]
    Untrusted(String),
}

/// The files of one layout.
struct Layout {
    cert: PathBuf,
    key: PathBuf,
    chain: Option<PathBuf>,
    roots: Option<PathBuf>,
}

impl Layout {
    fn detect(dir: &Path) -> Result<Self, LocalCaError> {
        if dir.join("ca-cert.pem").exists() {
            Ok(Self {
                cert: dir.join("ca-cert.pem"),
                key: dir.join("ca-key.pem"),
                chain: Some(dir.join("cert-chain.pem")),
                roots: Some(dir.join("root-cert.pem")),
            })
        } else if dir.join("tls.crt").exists() {
            Ok(Self {
                cert: dir.join("tls.crt"),
                key: dir.join("tls.key"),
                chain: None,
                roots: Some(dir.join("ca.crt")),
            })
        } else {
            Err(LocalCaError::NoLayout {
                dir: dir.to_path_buf(),
            })
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.chain.iter().cloned());
        paths.extend(self.roots.iter().cloned());
        paths
    }
}

/// A CA ready to sign.
pub struct LoadedCa {
    issuer: rcgen::Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
    /// Path from the CA certificate up to (not including) the root, in order.
    intermediates: Vec<CertificateDer<'static>>,
    /// The roots the directory names (used as the trust roots when none are pinned).
    own_roots: Arc<RootBundle>,
    /// The roots this CA was proven to chain to: what every answer it signs carries.
    trusted: Arc<RootBundle>,
    fingerprint: [u8; 32],
    /// `local-ca:` and the SHA-256 of the CA certificate: what `Issuer::signed_by` reports.
    ca_id: String,
}

impl LoadedCa {
    /// Loads and proves a CA directory. With `pinned`, the CA must chain to those roots;
    /// otherwise to the directory's own roots.
    pub fn load(dir: &Path, pinned: Option<&RootBundle>) -> Result<Self, LocalCaError> {
        let layout = Layout::detect(dir)?;
        let fingerprint = fswatch::fingerprint(&layout.paths());
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| LocalCaError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let invalid = |path: &Path, reason: String| LocalCaError::Invalid {
            path: path.to_path_buf(),
            reason,
        };

        // tls.crt may carry the CA's own chain after the CA certificate.
        let mut certs = pem::parse_certificates(&read(&layout.cert)?)
            .map_err(|e| invalid(&layout.cert, e.to_string()))?;
        let ca_cert = certs.remove(0);
        let mut chain_certs = certs;
        if let Some(path) = layout.chain.as_ref().filter(|p| p.exists()) {
            let bytes = read(path)?;
            if !bytes.iter().all(u8::is_ascii_whitespace) {
                chain_certs.extend(
                    pem::parse_certificates(&bytes).map_err(|e| invalid(path, e.to_string()))?,
                );
            }
        }

        let (_, parsed) = X509Certificate::from_der(&ca_cert)
            .map_err(|e| invalid(&layout.cert, e.to_string()))?;
        if !parsed.is_ca() {
            return Err(invalid(&layout.cert, "not a CA certificate".into()));
        }
        if let Ok(Some(ku)) = parsed.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(invalid(&layout.cert, "key usage lacks keyCertSign".into()));
        }
        let not_after = parsed.validity().not_after.to_datetime();

        let key = keys::load_private_key_pem(&read(&layout.key)?)
            .map_err(|e| invalid(&layout.key, e.to_string()))?;
        if key.public_key_raw() != parsed.public_key().subject_public_key.data.as_ref() {
            return Err(invalid(
                &layout.key,
                "key does not match the CA certificate".into(),
            ));
        }

        let own_roots = match layout.roots.as_ref().filter(|p| p.exists()) {
            Some(path) => {
                RootBundle::from_pem(&read(path)?).map_err(|e| invalid(path, e.to_string()))?
            }
            // A self-signed CA is its own root.
            None if parsed.subject() == parsed.issuer() => {
                RootBundle::from_certs(vec![ca_cert.clone()])
                    .map_err(|e| invalid(&layout.cert, e.to_string()))?
            }
            None => {
                return Err(invalid(
                    &layout.cert,
                    "no root certificate (root-cert.pem or ca.crt)".into(),
                ));
            }
        };

        let issuer = rcgen::Issuer::from_ca_cert_der(&ca_cert, key)
            .map_err(|e| invalid(&layout.cert, e.to_string()))?;
        let own_roots = Arc::new(own_roots);
        let trusted = pinned.map_or_else(|| own_roots.clone(), |p| Arc::new(p.clone()));
        let intermediates = prove(&issuer, &ca_cert, &chain_certs, &trusted, not_after)?;
        let ca_id = format!(
            "local-ca:{}",
            hex::encode(ring::digest::digest(&ring::digest::SHA256, &ca_cert))
        );
        Ok(Self {
            issuer,
            not_after,
            intermediates,
            own_roots,
            trusted,
            fingerprint,
            ca_id,
        })
    }

    pub fn own_roots(&self) -> &Arc<RootBundle> {
        &self.own_roots
    }

    /// The roots this CA was proven to chain to.
    pub fn trusted_roots(&self) -> &Arc<RootBundle> {
        &self.trusted
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Signs a workload leaf; no I/O.
    pub fn sign(
        &self,
        identities: &[SpiffeId],
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<VerifiedChain, leaf::LeafError> {
        self.sign_names(
            &LeafNames::identities(identities),
            public_key,
            lifetime,
            now,
        )
    }

    /// Signs a leaf for any purpose (workload, serving, istiod); no I/O.
    pub fn sign_names(
        &self,
        names: &LeafNames,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<VerifiedChain, leaf::LeafError> {
        let window = leaf::validity(now, lifetime, self.not_after)?;
        let cert = leaf::sign_leaf(names, public_key, window, &self.issuer)?;
        Ok(VerifiedChain::signed_in_process(
            cert,
            self.intermediates.clone(),
            (window.0.unix_timestamp(), window.1.unix_timestamp()),
        ))
    }
}

/// Signs a probe leaf and verifies it to the roots: proves key, certificate and chain together,
/// and yields the ordered intermediates every response will carry.
fn prove(
    issuer: &rcgen::Issuer<'static, KeyPair>,
    ca_cert: &CertificateDer<'static>,
    chain_certs: &[CertificateDer<'static>],
    roots: &RootBundle,
    not_after: OffsetDateTime,
) -> Result<Vec<CertificateDer<'static>>, LocalCaError> {
    let untrusted = |e: &dyn std::fmt::Display| LocalCaError::Untrusted(e.to_string());
    let probe_key = keys::generate_ecdsa_p256().map_err(|e| untrusted(&e))?;
    let now = OffsetDateTime::now_utc();
    let window =
        leaf::validity(now, Duration::from_secs(300), not_after).map_err(|e| untrusted(&e))?;
    let probe = leaf::sign_workload(
        &["spiffe://probe.invalid/ns/probe/sa/probe".to_owned()],
        &probe_key,
        window,
        issuer,
    )
    .map_err(|e| untrusted(&e))?;
    let mut candidates = vec![ca_cert.clone()];
    candidates.extend(chain_certs.iter().cloned());
    chain::verify_path(&probe, &candidates, roots, UnixTime::now()).map_err(|e| {
        let text = e.to_string();
        if text.contains("NameConstraint") {
            // rustls-webpki refuses every URI name constraint; istiod's Go verifier checks them.
            LocalCaError::Untrusted(format!(
                "{text}: CAs with name constraints on URIs cannot be verified here yet; \
                 use a CA certificate without URI name constraints"
            ))
        } else {
            untrusted(&e)
        }
    })
}

/// The built-in CA as an issuer, with hot reload.
pub struct LocalCa {
    dir: PathBuf,
    current: ArcSwap<LoadedCa>,
    /// Pinned roots, when `--root-ca-file` is set; the CA is re-proven when they change.
    pinned: Option<watch::Receiver<Arc<RootBundle>>>,
    /// Published when the CA's own roots are the trust roots (no pinned file).
    roots_out: Option<watch::Sender<Arc<RootBundle>>>,
    /// The CA certificate in force, by its `ca_id`.
    signed_by: watch::Sender<String>,
}

impl LocalCa {
    pub fn load(
        dir: &Path,
        pinned: Option<watch::Receiver<Arc<RootBundle>>>,
    ) -> Result<Self, LocalCaError> {
        let loaded = {
            let pinned_now = pinned.as_ref().map(|rx| rx.borrow().clone());
            LoadedCa::load(dir, pinned_now.as_deref())?
        };
        let (signed_by, _) = watch::channel(loaded.ca_id.clone());
        Ok(Self {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(loaded),
            pinned,
            roots_out: None,
            signed_by,
        })
    }

    /// Makes this CA the source of the trust roots (used when no root file is pinned).
    pub fn publish_roots(&mut self) -> watch::Receiver<Arc<RootBundle>> {
        let (tx, rx) = watch::channel(self.current.load().own_roots().clone());
        self.roots_out = Some(tx);
        rx
    }

    pub fn current(&self) -> Arc<LoadedCa> {
        self.current.load_full()
    }

    /// The CA, if it may sign now: not expired, and proven against the roots in force. After a
    /// pinned-root change that the CA does not chain to, it must not sign: workloads would get
    /// a leaf their root bundle cannot verify.
    pub fn usable(&self) -> Result<Arc<LoadedCa>, IssueError> {
        let ca = self.current.load_full();
        if ca.not_after <= OffsetDateTime::now_utc() {
            return Err(IssueError::NotReady(
                "the CA certificate has expired".into(),
            ));
        }
        if let Some(pinned) = &self.pinned
            && pinned.borrow().certs() != ca.trusted.certs()
        {
            return Err(IssueError::NotReady(
                "the CA does not chain to the pinned roots in force".into(),
            ));
        }
        Ok(ca)
    }

    /// Re-reads the directory; on error the current CA stays in force.
    pub fn reload(&self) -> Result<(), LocalCaError> {
        let pinned_now = self.pinned.as_ref().map(|rx| rx.borrow().clone());
        let loaded = Arc::new(LoadedCa::load(&self.dir, pinned_now.as_deref())?);
        // Store before publishing: whoever reacts to the new roots (the serving certificate)
        // must find the new CA in place.
        self.current.store(loaded.clone());
        self.signed_by.send_if_modified(|id| {
            let differs = *id != loaded.ca_id;
            if differs {
                id.clone_from(&loaded.ca_id);
            }
            differs
        });
        if let Some(tx) = &self.roots_out {
            tx.send_if_modified(|roots| {
                let differs = roots.certs() != loaded.own_roots.certs();
                if differs {
                    *roots = loaded.own_roots.clone();
                }
                differs
            });
        }
        Ok(())
    }

    /// Watches the directory (and the pinned roots); the returned task reloads on changes. The
    /// watch is in place when this returns, and a change made since the load is picked up.
    pub fn watch(
        self: Arc<Self>,
    ) -> notify::Result<impl Future<Output = anyhow::Result<()>> + use<>> {
        let mut follower = Follower::watching(
            std::slice::from_ref(&self.dir),
            self.current.load().fingerprint,
        )?;
        let mut pinned = self.pinned.clone();
        Ok(async move {
            let mut roots_changed = false;
            loop {
                // Which files make the CA depends on which layout is there now; none at all
                // fingerprints as zeros, a content of its own.
                let on_disk = Layout::detect(&self.dir)
                    .map(|l| fswatch::fingerprint(&l.paths()))
                    .unwrap_or_default();
                // A new pinned bundle may make the CA usable or not: judged again.
                follower.check("built-in CA", on_disk, roots_changed, || {
                    self.reload()?;
                    tracing::info!(dir = %self.dir.display(), "reloaded the built-in CA");
                    Ok(None)
                })?;
                roots_changed = tokio::select! {
                    _ = follower.changed() => false,
                    Ok(()) = async {
                        match pinned.as_mut() {
                            Some(rx) => rx.changed().await,
                            None => std::future::pending().await,
                        }
                    } => true,
                };
            }
        })
    }
}

#[async_trait]
impl Issuer for LocalCa {
    fn label(&self) -> &'static str {
        "local-ca"
    }

    fn ready(&self) -> bool {
        self.usable().is_ok()
    }

    fn signed_by(&self) -> watch::Receiver<String> {
        self.signed_by.subscribe()
    }

    async fn issue(&self, request: IssueRequest<'_>) -> Result<Issued, IssueError> {
        if request.route.is_some() {
            // Start-up refuses tenant signers with the built-in CA; this is the backstop.
            return Err(IssueError::InvalidRequest(
                "the built-in CA has no tenant signers".into(),
            ));
        }
        let ca = self.usable()?;
        let chain = ca
            .sign_names(
                request.names,
                &request.csr.public_key,
                request.lifetime,
                OffsetDateTime::now_utc(),
            )
            .map_err(|e| match e {
                leaf::LeafError::CaExpired => IssueError::NotReady(e.to_string()),
                other => IssueError::internal_because("signing", other),
            })?;
        Ok(Issued::InProcess {
            chain,
            roots: ca.trusted.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::pki::testing::{KeyAlg, TestCa};

    const ID: &str = "spiffe://cluster.local/ns/default/sa/default";

    fn write(dir: &Path, files: &[(&str, String)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, contents) in files {
            std::fs::write(dir.join(name), contents).unwrap();
        }
    }

    fn cacerts(dir: &Path, signing: &TestCa, chain: &[&TestCa], root: &TestCa) {
        let chain_pem: String = chain.iter().map(|c| c.cert_pem()).collect();
        write(
            dir,
            &[
                ("ca-cert.pem", signing.cert_pem()),
                ("ca-key.pem", signing.key_pem()),
                ("cert-chain.pem", chain_pem),
                ("root-cert.pem", root.cert_pem()),
            ],
        );
    }

    fn sign(ca: &LoadedCa) -> VerifiedChain {
        let key = KeyAlg::EcdsaP256.generate();
        ca.sign(
            &[ID.parse().unwrap()],
            &key,
            Duration::from_secs(3600),
            OffsetDateTime::now_utc(),
        )
        .unwrap()
    }

    #[test]
    fn loads_a_self_signed_root_in_the_cacerts_layout() {
        let dir = tempfile::tempdir().unwrap();
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        cacerts(dir.path(), &root, &[&root], &root);
        let ca = LoadedCa::load(dir.path(), None).unwrap();
        assert!(sign(&ca).intermediates().is_empty());
    }

    #[test]
    fn loads_an_intermediate_and_orders_its_chain() {
        let dir = tempfile::tempdir().unwrap();
        let root = TestCa::root("root", KeyAlg::Rsa2048);
        let mid = root.intermediate("mid", KeyAlg::EcdsaP384);
        let issuing = mid.intermediate("issuing", KeyAlg::EcdsaP256);
        // cert-chain.pem listed out of order and with the root, as some tools write it.
        cacerts(dir.path(), &issuing, &[&root, &mid, &issuing], &root);
        let ca = LoadedCa::load(dir.path(), None).unwrap();
        assert_eq!(
            sign(&ca).intermediates(),
            &[issuing.cert.clone(), mid.cert.clone()]
        );
    }

    #[test]
    fn loads_the_kubernetes_tls_layout() {
        let dir = tempfile::tempdir().unwrap();
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let mid = root.intermediate("mid", KeyAlg::EcdsaP256);
        write(
            dir.path(),
            &[
                ("tls.crt", format!("{}{}", mid.cert_pem(), root.cert_pem())),
                ("tls.key", mid.key_pem()),
                ("ca.crt", root.cert_pem()),
            ],
        );
        let ca = LoadedCa::load(dir.path(), None).unwrap();
        assert_eq!(sign(&ca).intermediates(), std::slice::from_ref(&mid.cert));
    }

    /// A CA made by the openssl CLI with a traditional (PKCS#1 / SEC1) key, as many istiod
    /// `cacerts` Secrets hold.
    fn openssl_ca(dir: &Path, key_args: &[&str]) {
        let key = dir.join("ca-key.pem");
        let (command, rest) = key_args.split_first().unwrap();
        let ok = Command::new("openssl")
            .arg(command)
            .arg("-out")
            .arg(&key)
            .args(rest)
            .status()
            .expect("openssl must be installed")
            .success();
        assert!(ok);
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-new", "-key"])
            .arg(&key)
            .args(["-subj", "/O=Istio/CN=Root CA", "-days", "30"])
            .args(["-addext", "basicConstraints=critical,CA:true"])
            .args([
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            ])
            .arg("-out")
            .arg(dir.join("ca-cert.pem"))
            .status()
            .unwrap()
            .success();
        assert!(ok);
        std::fs::copy(dir.join("ca-cert.pem"), dir.join("root-cert.pem")).unwrap();
        std::fs::copy(dir.join("ca-cert.pem"), dir.join("cert-chain.pem")).unwrap();
    }

    #[test]
    fn loads_openssl_made_cas_with_pkcs1_and_sec1_keys() {
        for key_args in [
            &["genrsa", "-traditional", "2048"][..],
            &["ecparam", "-name", "prime256v1", "-genkey", "-noout"][..],
            &["ecparam", "-name", "secp384r1", "-genkey", "-noout"][..],
        ] {
            let dir = tempfile::tempdir().unwrap();
            openssl_ca(dir.path(), key_args);
            let ca =
                LoadedCa::load(dir.path(), None).unwrap_or_else(|e| panic!("{key_args:?}: {e}"));
            sign(&ca);
        }
    }

    #[test]
    fn refuses_a_key_that_does_not_match_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let other = TestCa::root("other", KeyAlg::EcdsaP256);
        cacerts(dir.path(), &root, &[], &root);
        std::fs::write(dir.path().join("ca-key.pem"), other.key_pem()).unwrap();
        let err = LoadedCa::load(dir.path(), None).err().unwrap().to_string();
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn refuses_a_certificate_that_is_not_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let (leaf, leaf_key) = root.leaf(ID);
        write(
            dir.path(),
            &[
                ("ca-cert.pem", pem::encode_certificate(&leaf)),
                ("ca-key.pem", leaf_key.serialize_pem()),
                ("root-cert.pem", root.cert_pem()),
            ],
        );
        let err = LoadedCa::load(dir.path(), None).err().unwrap().to_string();
        assert!(err.contains("not a CA"), "{err}");
    }

    #[test]
    fn refuses_a_ca_outside_the_pinned_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        cacerts(dir.path(), &root, &[], &root);
        let pinned = TestCa::root("pinned", KeyAlg::EcdsaP256);
        let pinned = RootBundle::from_certs(vec![pinned.cert.clone()]).unwrap();
        assert!(matches!(
            LoadedCa::load(dir.path(), Some(&pinned)),
            Err(LocalCaError::Untrusted(_))
        ));
    }

    #[test]
    fn refuses_a_ca_whose_chain_is_missing_an_intermediate() {
        let dir = tempfile::tempdir().unwrap();
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        let mid = root.intermediate("mid", KeyAlg::EcdsaP256);
        let issuing = mid.intermediate("issuing", KeyAlg::EcdsaP256);
        cacerts(dir.path(), &issuing, &[], &root);
        assert!(matches!(
            LoadedCa::load(dir.path(), None),
            Err(LocalCaError::Untrusted(_))
        ));
    }

    #[test]
    fn refuses_an_empty_directory_naming_both_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let err = LoadedCa::load(dir.path(), None).err().unwrap().to_string();
        assert!(
            err.contains("ca-cert.pem") && err.contains("tls.crt"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_broken_update_keeps_the_previous_ca_and_a_good_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = TestCa::root("first", KeyAlg::EcdsaP256);
        cacerts(dir.path(), &first, &[], &first);
        let mut ca = LocalCa::load(dir.path(), None).unwrap();
        let mut roots = ca.publish_roots();

        std::fs::write(dir.path().join("ca-cert.pem"), "garbage").unwrap();
        assert!(ca.reload().is_err());
        assert_eq!(
            roots.borrow_and_update().certs(),
            std::slice::from_ref(&first.cert)
        );
        sign(&ca.current());

        let second = TestCa::root("second", KeyAlg::EcdsaP384);
        cacerts(dir.path(), &second, &[], &second);
        ca.reload().unwrap();
        assert!(roots.has_changed().unwrap());
        assert_eq!(
            roots.borrow_and_update().certs(),
            std::slice::from_ref(&second.cert)
        );
        let issued = sign(&ca.current());
        let roots_now = RootBundle::from_certs(vec![second.cert.clone()]).unwrap();
        chain::verify_path(issued.leaf(), &[], &roots_now, UnixTime::now()).unwrap();
    }

    #[test]
    fn leaves_never_outlive_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let root = TestCa::root("root", KeyAlg::EcdsaP256);
        cacerts(dir.path(), &root, &[], &root);
        let ca = LoadedCa::load(dir.path(), None).unwrap();
        let key = KeyAlg::EcdsaP256.generate();
        let chain = ca
            .sign(
                &[ID.parse().unwrap()],
                &key,
                Duration::from_secs(100 * 365 * 86_400),
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        let (_, leaf) = X509Certificate::from_der(chain.leaf()).unwrap();
        assert_eq!(leaf.validity().not_after.to_datetime(), ca.not_after());
    }
}

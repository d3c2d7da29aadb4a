//! Standalone mode: everything a signer needs, with no Kubernetes. On first start the data
//! directory gets a root CA in istiod's `cacerts` layout, a static token for `default/default`
//! and the root bundle clients trust. Existing material is never overwritten.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use time::{Duration, OffsetDateTime};

use crate::pki::{keys, leaf, pem};

/// A standalone root is for trying things out and for small meshes: ten years, like istiod's
/// self-signed root.
const ROOT_LIFETIME: Duration = Duration::days(3650);
const TOKEN_BYTES: usize = 32;

/// What standalone mode is to provide itself (flags may point elsewhere instead).
#[derive(Clone, Copy, Debug)]
pub struct Wants {
    pub ca: bool,
    pub tokens: bool,
}

impl Wants {
    pub const ALL: Wants = Wants {
        ca: true,
        tokens: true,
    };
}

/// Keeps `root-cert.pem` equal to the trust roots in force: it is what clients trust, like the
/// istio-ca-root-cert ConfigMap in a cluster. It is derived data, so it is replaced atomically.
pub fn write_root_bundle(path: &Path, pem: &str) -> anyhow::Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|current| current == pem) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".root-cert.pem.tmp-{}",
        random_token()?.get(..16).unwrap_or("0")
    ));
    write_new(&tmp, pem.as_bytes(), 0o644)?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(true)
}

/// The files standalone mode uses, all under the data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    pub fn tokens_csv(&self) -> PathBuf {
        self.root.join("tokens.csv")
    }

    /// The default workload's token alone, for `istio-csr-rs request --token-file`.
    pub fn token_file(&self) -> PathBuf {
        self.root.join("token")
    }

    pub fn root_cert(&self) -> PathBuf {
        self.root.join("root-cert.pem")
    }

    /// Creates whatever is missing of what will be used: the CA unless another CA directory
    /// is given, the tokens unless another token file is. A half-made CA (certificate without
    /// key, or the reverse) is an error: guessing could replace a CA workloads already trust.
    pub fn bootstrap(&self, wants: Wants) -> anyhow::Result<()> {
        create_private_dir(&self.root)?;
        if wants.ca {
            let ca = self.ca_dir();
            create_private_dir(&ca)?;
            let (cert, key) = (ca.join("ca-cert.pem"), ca.join("ca-key.pem"));
            match (cert.exists(), key.exists()) {
                (true, true) => {}
                (false, false) => self.create_root_ca(&ca)?,
                _ => bail!(
                    "{} holds only one of ca-cert.pem and ca-key.pem; restore the other or remove both",
                    ca.display()
                ),
            }
        }
        if wants.tokens && !self.tokens_csv().exists() {
            let token = random_token()?;
            // No trailing newline: ztunnel sends the file's bytes as the header value, untrimmed,
            // and a newline makes the header invalid (the call never leaves ztunnel).
            write_new(&self.token_file(), token.as_bytes(), 0o600)?;
            write_new(
                &self.tokens_csv(),
                format!("# token,namespace,serviceaccount\n{token},default,default\n").as_bytes(),
                0o600,
            )?;
        }
        Ok(())
    }

    fn create_root_ca(&self, ca: &Path) -> anyhow::Result<()> {
        let key = keys::generate_ecdsa_p256()?;
        let params = leaf::ca_params(
            "istio-csr-rs standalone",
            "istio-csr-rs standalone root CA",
            OffsetDateTime::now_utc() + ROOT_LIFETIME,
        );
        let cert = params.self_signed(&key)?;
        let cert_pem = pem::encode_certificate(cert.der());
        // Key first: a crash between the writes leaves "key without cert", which bootstrap
        // reports instead of silently minting a second CA.
        write_new(
            &ca.join("ca-key.pem"),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_new(&ca.join("ca-cert.pem"), cert_pem.as_bytes(), 0o644)?;
        // istiod's self-signed layout: the chain is the root itself.
        write_new(&ca.join("cert-chain.pem"), cert_pem.as_bytes(), 0o644)?;
        write_new(&ca.join("root-cert.pem"), cert_pem.as_bytes(), 0o644)?;
        tracing::info!(dir = %ca.display(), "created a standalone root CA");
        Ok(())
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Writes a file that must not exist yet, atomically: a temporary file in the same directory
/// with the final mode from the start, synced, then hard-linked into place (which fails rather
/// than replacing a file that appeared meanwhile).
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("file name")?;
    // A random name: a crash leaves a stray file, never one that blocks the next start (in a
    // container the PID is the same every time).
    let tmp = dir.join(format!(
        ".{name}.tmp-{}",
        random_token()?.get(..16).unwrap_or("0")
    ));
    let result = (|| -> anyhow::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, path).with_context(|| format!("creating {}", path.display()))?;
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("system random number generator failed"))?;
    Ok(hex::encode(bytes))
}

/// The newcomer's next step: the exact `request` and `openssl verify` commands to run.
pub fn print_try_it(data: &DataDir, grpc: std::net::SocketAddr, own_tokens: bool) {
    let host = if grpc.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        grpc.ip().to_string()
    };
    let address = std::net::SocketAddr::new(host.parse().unwrap_or(grpc.ip()), grpc.port());
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "istio-csr-rs".into());
    let dir = data.root.display();
    let token_file = if own_tokens {
        format!("{dir}/token")
    } else {
        "<a file holding one token of --token-auth-file>".to_owned()
    };
    // Not println!: that panics when stdout is a closed pipe (`serve | head -1`), and this
    // message is a convenience, never worth the process.
    let _ = writeln!(
        std::io::stdout().lock(),
        "\nistio-csr-rs (standalone) is serving Istio's CA API on {address}.\n\
         Request a certificate for spiffe://<trust-domain>/ns/default/sa/default with:\n\n  \
         {exe} request --address {address} --root-cert {dir}/root-cert.pem \
         --token-file {token_file} --out-dir {dir}/workload\n\n\
         then check it with:\n\n  \
         openssl verify -CAfile {dir}/root-cert.pem -untrusted {dir}/workload/cert-chain.pem \
         {dir}/workload/cert-chain.pem\n"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn first_start_creates_a_ca_tokens_and_the_bundle_with_private_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::new(&tmp.path().join("data"));
        data.bootstrap(Wants::ALL).unwrap();
        for file in [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem",
        ] {
            assert!(data.ca_dir().join(file).exists(), "{file}");
        }
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(data.ca_dir().join("ca-key.pem")), 0o600);
        assert_eq!(mode(data.tokens_csv()), 0o600);
        assert_eq!(mode(data.token_file()), 0o600);
        let token = std::fs::read_to_string(data.token_file()).unwrap();
        let csv = std::fs::read_to_string(data.tokens_csv()).unwrap();
        assert!(csv.contains(&format!("{token},default,default")));
        // Exactly the token: ztunnel sends the raw bytes as a header value.
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token:?}");
    }

    #[test]
    fn later_starts_never_overwrite_existing_material() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::new(tmp.path());
        let material = || -> Vec<Vec<u8>> {
            [
                data.ca_dir().join("ca-key.pem"),
                data.ca_dir().join("root-cert.pem"),
                data.tokens_csv(),
                data.token_file(),
            ]
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect()
        };
        data.bootstrap(Wants::ALL).unwrap();
        let before = material();
        data.bootstrap(Wants::ALL).unwrap();
        assert_eq!(before, material());
    }

    #[test]
    fn creates_only_what_the_flags_leave_to_it() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::new(tmp.path());
        data.bootstrap(Wants {
            ca: false,
            tokens: false,
        })
        .unwrap();
        assert!(!data.ca_dir().exists());
        assert!(!data.tokens_csv().exists() && !data.token_file().exists());
    }

    #[test]
    fn the_root_bundle_file_follows_the_roots() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("root-cert.pem");
        assert!(write_root_bundle(&path, "one").unwrap());
        assert!(
            !write_root_bundle(&path, "one").unwrap(),
            "unchanged content is not rewritten"
        );
        assert!(write_root_bundle(&path, "two").unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
    }

    #[test]
    fn a_half_made_ca_is_reported_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::new(tmp.path());
        data.bootstrap(Wants::ALL).unwrap();
        std::fs::remove_file(data.ca_dir().join("ca-cert.pem")).unwrap();
        let err = data.bootstrap(Wants::ALL).unwrap_err().to_string();
        assert!(err.contains("only one of"), "{err}");
        assert!(data.ca_dir().join("ca-key.pem").exists());
    }

    #[test]
    fn a_stale_temporary_file_does_not_block_a_start() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::new(tmp.path());
        std::fs::create_dir_all(data.ca_dir()).unwrap();
        let pid = std::process::id();
        std::fs::write(data.ca_dir().join(format!(".ca-key.pem.tmp-{pid}")), "x").unwrap();
        data.bootstrap(Wants::ALL).unwrap();
    }

    #[test]
    fn write_new_refuses_to_replace_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        write_new(&path, b"one", 0o600).unwrap();
        assert!(write_new(&path, b"two", 0o600).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
    }
}

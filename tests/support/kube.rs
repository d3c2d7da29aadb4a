//! Tier 3: a real kube-apiserver + etcd on loopback, started once per test binary (like Go's
//! envtest). Binaries come from `scripts/provision-kube.sh`; when they are missing the tests
//! FAIL with the command that provisions them.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::OnceCell;

/// The apiserver's service-account issuer; tokens carry it as `iss`.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const STARTUP_DEADLINE: Duration = Duration::from_secs(90);

pub struct TestCluster {
    pub url: String,
    pub admin_token: String,
    pub kubeconfig: PathBuf,
    /// The first service-account signing key (RSA, PKCS#8 PEM), for tokens the TokenRequest
    /// API refuses to mint (already expired).
    sa_key: PathBuf,
    /// How its apiserver runs, to restart it (`rotate_signing_key`).
    apiserver: ApiserverSpec,
    _processes: Vec<Guarded>,
    /// Its own etcd, unless it shares one (`TestClusters`).
    _etcd: Option<Etcd>,
    _dir: tempfile::TempDir,
}

/// A child that dies with the test process: it runs under a shell that SIGKILLs it as soon as
/// its stdin (a pipe held by this process) closes, however this process ends, and then removes
/// the cluster's directory (a process-wide static is never dropped, so nothing else would).
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        // Closing stdin makes the guard shell kill the child and clean up; killing the shell
        // itself would leave the child running.
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

impl Guarded {
    /// Kills the child but keeps its clean-up path (a restart reuses it).
    fn stop_keeping_files(mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"keep");
        }
        let _ = self.0.wait();
    }
}

fn guarded(program: &Path, args: &[String], log: &Path, cleanup: &Path) -> Guarded {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new("bash")
        .arg("-c")
        .arg(concat!(
            r#""$@" & child=$!; input=$(cat); kill -9 "$child" 2>/dev/null; "#,
            r#"wait "$child" 2>/dev/null; [ "$input" = keep ] || rm -rf "$GUARD_CLEANUP""#
        ))
        .arg("guard")
        .env("GUARD_CLEANUP", cleanup)
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    Guarded(child)
}

/// An apiserver's command line: what a restart repeats.
struct ApiserverSpec {
    bin: PathBuf,
    etcd_url: String,
    prefix: String,
    port: u16,
    /// Its data (certificates, keys, token file, log) and the guard's clean-up path.
    dir: PathBuf,
    /// Every key that verifies service-account tokens; the last one signs.
    sa_keys: Vec<PathBuf>,
}

impl ApiserverSpec {
    fn spawn(&self) -> Guarded {
        let d = &self.dir;
        let mut args = vec![
            format!("--etcd-servers={}", self.etcd_url),
            format!("--etcd-prefix={}", self.prefix),
            format!("--secure-port={}", self.port),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--cert-dir={}", d.join("certs").display()),
            format!("--token-auth-file={}", d.join("tokens.csv").display()),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-issuer={SA_ISSUER}"),
        ];
        for key in &self.sa_keys {
            args.push(format!("--service-account-key-file={}", key.display()));
        }
        if let Some(signing) = self.sa_keys.last() {
            args.push(format!(
                "--service-account-signing-key-file={}",
                signing.display()
            ));
        }
        args.extend([
            format!("--api-audiences=istio-ca,{SA_ISSUER}"),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            // No controller-manager runs: service accounts are created by the tests.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--enable-priority-and-fairness=false".into(),
        ]);
        guarded(
            &self.bin.join("kube-apiserver"),
            &args,
            &d.join("apiserver.log"),
            d,
        )
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two free ports, distinct: both are held until both are known (one at a time, the kernel
/// may hand out the same one twice).
fn free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = (bind(), bind());
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// Where provision-kube.sh put the binaries: $ISTIO_CSR_KUBE_BIN, else the newest cache entry.
fn binaries() -> PathBuf {
    let hint =
        "kube-apiserver and etcd are missing: run scripts/provision-kube.sh (scripts/test.sh does)";
    if let Ok(dir) = std::env::var("ISTIO_CSR_KUBE_BIN") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var("ISTIO_CSR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/istio-csr-rs")
        })
        .join("kube");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&cache)
        .unwrap_or_else(|_| panic!("{hint}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("kube-apiserver").exists() && p.join("etcd").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| panic!("{hint}"))
}

static SHARED: OnceCell<TestCluster> = OnceCell::const_new();

/// The cluster shared by every test of this binary; tests isolate themselves by namespace.
pub async fn shared() -> &'static TestCluster {
    SHARED.get_or_init(TestCluster::start).await
}

/// etcd for one or more apiservers (each under its own `--etcd-prefix`).
pub struct Etcd {
    url: String,
    _process: Guarded,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> Self {
        let bin = binaries();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (etcd_port, peer_port) = free_ports();
        let process = guarded(
            &bin.join("etcd"),
            &[
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                "--log-level=warn".into(),
            ],
            &d.join("etcd.log"),
            d,
        );
        Self {
            url: format!("http://127.0.0.1:{etcd_port}"),
            _process: process,
            _dir: dir,
        }
    }
}

/// Several clusters on one etcd: the first is the local one, the others are remotes.
pub struct TestClusters {
    pub clusters: Vec<TestCluster>,
    _etcd: Etcd,
}

impl TestClusters {
    pub async fn start(count: usize) -> Self {
        let etcd = Etcd::start();
        let mut clusters = Vec::new();
        for i in 0..count {
            clusters.push(TestCluster::start_on(&etcd.url, &format!("/cluster-{i}")).await);
        }
        Self {
            clusters,
            _etcd: etcd,
        }
    }
}

impl TestCluster {
    /// A cluster with its own etcd.
    pub async fn start() -> Self {
        let etcd = Etcd::start();
        let mut cluster = Self::start_on(&etcd.url, "/registry").await;
        cluster._etcd = Some(etcd);
        cluster
    }

    /// A kube-apiserver storing under `prefix` in the etcd at `etcd_url`.
    pub async fn start_on(etcd_url: &str, prefix: &str) -> Self {
        let bin = binaries();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let sa_key = d.join("sa.key");
        let ok = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("openssl must be installed")
            .success();
        assert!(ok);
        let admin_token = hex_token();
        std::fs::write(
            d.join("tokens.csv"),
            format!("{admin_token},admin,admin,\"system:masters\"\n"),
        )
        .unwrap();
        let cert_dir = d.join("certs");
        let mut spec = ApiserverSpec {
            bin,
            etcd_url: etcd_url.to_owned(),
            prefix: prefix.to_owned(),
            port: 0,
            dir: d.to_owned(),
            sa_keys: vec![sa_key.clone()],
        };
        // The port is free when picked but may be taken before the apiserver binds it (tests
        // run side by side): then start over on another.
        let mut attempts = 0;
        let (apiserver, url, kubeconfig) = loop {
            attempts += 1;
            spec.port = free_port();
            let apiserver = spec.spawn();
            let url = format!("https://127.0.0.1:{}", spec.port);
            let kubeconfig = d.join("kubeconfig");
            let ready = wait_ready(
                &url,
                &admin_token,
                &cert_dir,
                &kubeconfig,
                &d.join("apiserver.log"),
            )
            .await;
            match ready {
                Some(_) => break (apiserver, url, kubeconfig),
                // Not dropped: the guard's drop would remove `d` (its clean-up path), which
                // the next attempt needs. The apiserver has exited; its idle guard ends with
                // this process, as every guard does.
                None if attempts < 5 => std::mem::forget(apiserver),
                None => panic!("kube-apiserver found its port taken {attempts} times"),
            }
        };
        Self {
            url,
            admin_token,
            kubeconfig,
            sa_key,
            apiserver: spec,
            _processes: vec![apiserver],
            _etcd: None,
            _dir: dir,
        }
    }

    /// Rotates the service-account signer: restarts the apiserver (same port, same data) signing
    /// with a new EC P-256 key (ES256), every earlier key still verifying, as an operator
    /// rotating `--service-account-signing-key-file` does. Returns once it is ready again.
    pub async fn rotate_signing_key(&mut self) {
        let d = self.apiserver.dir.clone();
        let key = d.join(format!("sa-{}.key", self.apiserver.sa_keys.len()));
        let ok = Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ])
            .arg(&key)
            .stderr(Stdio::null())
            .status()
            .expect("openssl must be installed")
            .success();
        assert!(ok);
        for process in self._processes.drain(..) {
            process.stop_keeping_files();
        }
        self.apiserver.sa_keys.push(key);
        let process = self.apiserver.spawn();
        let ready = wait_ready(
            &self.url,
            &self.admin_token,
            &d.join("certs"),
            &self.kubeconfig,
            &d.join("apiserver.log"),
        )
        .await;
        assert!(
            ready.is_some(),
            "kube-apiserver did not restart on its port"
        );
        self._processes.push(process);
    }

    /// A token of the given claims signed with the first signing key (RS256, no key ID, as
    /// some signers make them): claims the TokenRequest API would never put in one.
    pub fn sign_claims(&self, claims: &serde_json::Value) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        let signing_input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let pem = std::fs::read_to_string(&self.sa_key).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        let key = ring::signature::RsaKeyPair::from_pkcs8(&der).expect("a PKCS#8 RSA key");
        let mut signature = vec![0u8; key.public().modulus_len()];
        key.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            signing_input.as_bytes(),
            &mut signature,
        )
        .unwrap();
        format!("{signing_input}.{}", b64.encode(signature))
    }

    /// An admin client. Made per call: a kube client lives on the runtime that made it, and
    /// every #[tokio::test] has its own.
    pub async fn client(&self) -> kube::Client {
        client_for(&self.kubeconfig).await
    }

    /// A client of this cluster that authenticates with `token` (e.g. a service account's).
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        let mut config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&self.kubeconfig).unwrap(),
            &KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        config.auth_info.token = Some(token.to_owned().into());
        kube::Client::try_from(config).unwrap()
    }

    /// A kubeconfig of this cluster that authenticates with `token`, written to `path`.
    pub fn kubeconfig_with_token(&self, path: &Path, token: &str) {
        let admin = std::fs::read_to_string(&self.kubeconfig).unwrap();
        assert!(admin.contains(&self.admin_token));
        std::fs::write(path, admin.replace(&self.admin_token, token)).unwrap();
    }

    pub async fn namespace(&self, name: &str) {
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}
        }))
        .unwrap();
        create_or_keep(Api::<Namespace>::all(self.client().await), ns).await;
    }

    pub async fn service_account(&self, namespace: &str, name: &str) {
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace}
        }))
        .unwrap();
        create_or_keep(
            Api::<ServiceAccount>::namespaced(self.client().await, namespace),
            sa,
        )
        .await;
    }

    /// A Pod object (nothing runs it) using `service_account` on `node`.
    pub async fn pod(&self, namespace: &str, name: &str, service_account: &str, node: &str) -> Pod {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "serviceAccountName": service_account,
                "nodeName": node,
                "containers": [{"name": "app", "image": "example.invalid/app"}]
            }
        }))
        .unwrap();
        Api::<Pod>::namespaced(self.client().await, namespace)
            .create(&PostParams::default(), &pod)
            .await
            .unwrap()
    }

    /// A token from the TokenRequest API, for `audiences`, optionally bound to a Pod.
    pub async fn token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        expiration_seconds: i64,
        bound_pod: Option<&Pod>,
    ) -> String {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
                expiration_seconds: Some(expiration_seconds),
                bound_object_ref: bound_pod.map(|pod| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let api = Api::<ServiceAccount>::namespaced(self.client().await, namespace);
        let response: TokenRequest = api
            .create_subresource("token", service_account, &PostParams::default(), &request)
            .await
            .unwrap();
        response.status.unwrap().token
    }
}

impl TestCluster {
    /// A bound service-account token signed with the cluster's own key, valid from `iat` to
    /// `exp` (unix seconds): the way to get an expired token the apiserver itself issued.
    pub async fn signed_token(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        iat: i64,
        exp: i64,
    ) -> String {
        let sa = Api::<ServiceAccount>::namespaced(self.client().await, namespace)
            .get(service_account)
            .await
            .unwrap();
        let claims = serde_json::json!({
            "iss": SA_ISSUER,
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "aud": [audience],
            "iat": iat,
            "nbf": iat,
            "exp": exp,
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": sa.metadata.uid.unwrap()},
            },
        });
        self.sign_claims(&claims)
    }
}

async fn create_or_keep<K>(api: Api<K>, object: K)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating {object:?}: {e}"),
    }
}

fn hex_token() -> String {
    let mut bytes = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits until the apiserver answers /readyz, returning a client for it.
async fn wait_ready(
    url: &str,
    token: &str,
    cert_dir: &Path,
    kubeconfig: &Path,
    log: &Path,
) -> Option<kube::Client> {
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        if let Ok(ca) = std::fs::read_to_string(cert_dir.join("apiserver.crt")) {
            write_kubeconfig(kubeconfig, url, &ca, token);
            let client = client_for(kubeconfig).await;
            let readyz = http::Request::get("/readyz").body(Vec::new()).unwrap();
            if client
                .request_text(readyz)
                .await
                .is_ok_and(|body| body.trim() == "ok")
            {
                return Some(client);
            }
        }
        // Lost the race for its port: the caller starts it again on another.
        if std::fs::read_to_string(log).is_ok_and(|text| text.contains("address already in use")) {
            return None;
        }
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "kube-apiserver not ready in {STARTUP_DEADLINE:?}:\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn client_for(kubeconfig: &Path) -> kube::Client {
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn write_kubeconfig(path: &Path, url: &str, ca_pem: &str, token: &str) {
    use std::fmt::Write as _;
    let b64 = base64_std(ca_pem.as_bytes());
    let mut yaml = String::new();
    let _ = write!(
        yaml,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority-data: {b64}\n\
         users:\n- name: admin\n  user:\n    token: {token}\n\
         contexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n"
    );
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(yaml.as_bytes()).unwrap();
}

fn base64_std(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

//! Tier 4: several istio-csr-rs processes against one real kube-apiserver, stopped with real
//! signals. Replicas all sign; the Lease moves on SIGTERM (released) and on SIGKILL (after
//! it expires), the trust bundle is kept by whoever leads, and signing never pauses.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use istio_csr_rs::client::Target;
use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
use k8s_openapi::api::core::v1::ConfigMap;
use support::kube::{TestCluster, shared};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_istio-csr-rs");
const TEST: &str = "multi-process";
const WAIT: Duration = Duration::from_secs(30);

struct Replica {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
}

impl Replica {
    fn start(cluster: &TestCluster, dir: &Path) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--signer", "local-ca", "--local-ca-dir"])
            .arg(dir.join("ca"))
            .arg("--root-ca-file")
            .arg(dir.join("ca/root-cert.pem"))
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .args([
                "--serving-address=127.0.0.1:0",
                "--admin-address=127.0.0.1:0",
                "--serving-certificate-dns-names=localhost",
                "--leader-election-namespace",
                TEST,
                "--leader-election-lease-duration=4s",
                "--leader-election-renew-deadline=3s",
                "--leader-election-retry-period=500ms",
                "--configmap-namespace-selector=bundle-test=multi-process",
                "--log-format=json",
                "--log-level=info",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the log until both addresses are known, then keeps draining it.
        std::thread::spawn(move || {
            let (mut grpc, mut admin) = (None, None);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let Some(a) = json["admin"].as_str() {
                    admin = a.parse::<SocketAddr>().ok();
                }
                if let Some(g) = json["grpc"].as_str() {
                    grpc = g.parse::<SocketAddr>().ok();
                }
                if let (Some(g), Some(a)) = (grpc, admin) {
                    let _ = tx.send((g, a));
                    grpc = None;
                }
            }
        });
        let (grpc, admin) = rx
            .recv_timeout(WAIT)
            .expect("the replica never logged its addresses");
        Self { child, grpc, admin }
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    async fn bundle(&self) -> serde_json::Value {
        let (_, body) = http_get(&format!("http://{}/debug/bundle", self.admin)).await;
        serde_json::from_str(&body).unwrap_or_default()
    }

    async fn is_leader(&self) -> bool {
        self.bundle().await["leader"]["is_leader"] == true
    }

    fn target(&self, dir: &Path) -> Target {
        localhost_target(self.grpc, dir.join("ca/root-cert.pem"))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn managed_namespace(cluster: &TestCluster, name: &str) {
    let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"bundle-test": TEST}}
    }))
    .unwrap();
    ::kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(cluster.client().await)
        .create(&Default::default(), &ns)
        .await
        .unwrap();
}

async fn has_bundle(cluster: &TestCluster, namespace: &str, pem: &str) -> bool {
    ::kube::Api::<ConfigMap>::namespaced(cluster.client().await, namespace)
        .get_opt("istio-ca-root-cert")
        .await
        .ok()
        .flatten()
        .and_then(|cm| cm.data)
        .is_some_and(|d| d.get("root-cert.pem").is_some_and(|v| v == pem))
}

/// A leader change must not hold up signing: the Lease's 15 s would show in the latency.
const SIGNING_BOUND: Duration = Duration::from_secs(2);

/// Back-to-back CreateCertificate calls to one replica until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    calls: tokio::task::JoinHandle<Vec<Duration>>,
}

impl Load {
    fn start(target: Target, token: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = tokio::spawn({
            let stop = stop.clone();
            async move {
                let identity = format!("spiffe://cluster.local/ns/{TEST}/sa/web");
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    let started = std::time::Instant::now();
                    request_certificate(&target, Some(&token), &identity)
                        .await
                        .expect("signing failed during a leader change");
                    latencies.push(started.elapsed());
                }
                latencies
            }
        });
        Self { stop, calls }
    }

    /// Every call of the phase succeeded (or the task panicked), each within the bound.
    async fn stop_and_check(self, phase: &str) {
        self.stop.store(true, Ordering::Release);
        let latencies = self.calls.await.unwrap();
        assert!(
            latencies.len() >= 5,
            "{phase}: only {} calls",
            latencies.len()
        );
        let slowest = latencies.iter().max().copied().unwrap_or_default();
        assert!(
            slowest < SIGNING_BOUND,
            "{phase}: a call took {slowest:?} of {} calls",
            latencies.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lease_moves_on_sigterm_and_sigkill_while_signing_never_pauses() {
    install_crypto_provider();
    let cluster = shared().await;
    cluster.namespace(TEST).await;
    cluster.service_account(TEST, "web").await;
    let dir = tempfile::tempdir().unwrap();
    let root = TestCa::root("multi-process root", KeyAlg::EcdsaP256);
    let ca = dir.path().join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    for name in ["ca-cert.pem", "cert-chain.pem", "root-cert.pem"] {
        std::fs::write(ca.join(name), root.cert_pem()).unwrap();
    }
    std::fs::write(ca.join("ca-key.pem"), root.key_pem()).unwrap();
    let pem = root.cert_pem();

    let mut a = Replica::start(cluster, dir.path());
    assert!(
        eventually(WAIT, || a.is_leader()).await,
        "the first replica never led"
    );
    let b = Replica::start(cluster, dir.path());
    let a_identity = a.bundle().await["leader"]["identity"].clone();
    let following = eventually(WAIT, || async {
        let view = b.bundle().await;
        view["leader"]["is_leader"] == false && view["leader"]["holder"] == a_identity
    })
    .await;
    assert!(following, "{:#}", b.bundle().await);
    managed_namespace(cluster, "mp-one").await;
    assert!(eventually(WAIT, || has_bundle(cluster, "mp-one", &pem)).await);

    // Load on B through A's SIGTERM and B's takeover: every call succeeds, promptly.
    let token = cluster.token(TEST, "web", &["istio-ca"], 3600, None).await;
    let load = Load::start(b.target(dir.path()), token.clone());

    // SIGTERM: A drains, releases the Lease and exits 0; B takes over at its next try.
    a.signal("TERM");
    let status = a.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        eventually(Duration::from_secs(3), || b.is_leader()).await,
        "B did not take the released Lease"
    );
    managed_namespace(cluster, "mp-two").await;
    assert!(eventually(WAIT, || has_bundle(cluster, "mp-two", &pem)).await);
    load.stop_and_check("A's SIGTERM").await;

    // SIGKILL: C only gets the Lease once B's expires, then keeps the bundle. The load moves
    // to C before B dies and runs until C has taken over and written.
    let c = Replica::start(cluster, dir.path());
    let b_identity = b.bundle().await["leader"]["identity"].clone();
    let following = eventually(WAIT, || async {
        c.bundle().await["leader"]["holder"] == b_identity
    })
    .await;
    assert!(following, "{:#}", c.bundle().await);
    let load = Load::start(c.target(dir.path()), token);
    b.signal("KILL");
    assert!(
        eventually(WAIT, || c.is_leader()).await,
        "C never took over"
    );
    managed_namespace(cluster, "mp-three").await;
    assert!(eventually(WAIT, || has_bundle(cluster, "mp-three", &pem)).await);
    load.stop_and_check("B's SIGKILL").await;
    let identity = format!("spiffe://cluster.local/ns/{TEST}/sa/web");
    let token = cluster.token(TEST, "web", &["istio-ca"], 3600, None).await;
    request_certificate(&c.target(dir.path()), Some(&token), &identity)
        .await
        .unwrap();
}

//! Tier 3: the trust bundle on real kube-apiservers, one local and two remotes sharing one
//! etcd. Each test runs its own server that only looks after namespaces labelled
//! `bundle-test=<test>` (its --configmap-namespace-selector), competes for its own Lease and
//! reads remote Secrets from its own namespace, so tests never touch each other's objects.
//!
//! "Left alone" is shown without sleeping: servers run one reconcile worker, so once a later
//! event of the same watch (a witness) has been handled, the earlier one has been too.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ::kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use clap::Parser;
use istio_csr_rs::app::{self, Hooks, Running};
use istio_csr_rs::client::Target;
use istio_csr_rs::config::{Cli, Command};
use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use support::ambient::{impersonate, pod_reads, until_cache_warm};
use support::kube::{TestCluster, TestClusters};
use support::*;
use tokio::sync::OnceCell;
use tonic::Code;

const CM: &str = "istio-ca-root-cert";
const WAIT: Duration = Duration::from_secs(30);

static CLUSTERS: OnceCell<TestClusters> = OnceCell::const_new();

async fn clusters() -> &'static [TestCluster] {
    &CLUSTERS
        .get_or_init(|| TestClusters::start(3))
        .await
        .clusters
}

struct BundleServer {
    running: Running,
    test: String,
    dir: tempfile::TempDir,
    root: TestCa,
}

impl BundleServer {
    /// A server with the built-in CA and `root` pinned, electing in namespace `test`.
    async fn start(test: &str) -> Self {
        Self::start_with(
            test,
            TestCa::root(&format!("{test} root"), KeyAlg::EcdsaP256),
            tempfile::tempdir().unwrap(),
            &[],
        )
        .await
    }

    /// `extra`: flags beyond the bundle's.
    async fn start_with(test: &str, root: TestCa, dir: tempfile::TempDir, extra: &[&str]) -> Self {
        install_crypto_provider();
        let local = &clusters().await[0];
        create_namespace(local, test, &[]).await;
        let ca = dir.path().join("ca");
        std::fs::create_dir_all(&ca).unwrap();
        for name in ["ca-cert.pem", "cert-chain.pem", "root-cert.pem"] {
            std::fs::write(ca.join(name), root.cert_pem()).unwrap();
        }
        std::fs::write(ca.join("ca-key.pem"), root.key_pem()).unwrap();
        let pinned = dir.path().join("pinned.pem");
        if !pinned.exists() {
            std::fs::write(&pinned, root.cert_pem()).unwrap();
        }
        let selector = format!("bundle-test={test},excluded!=true");
        let mut argv = vec![
            "istio-csr-rs".to_owned(),
            "serve".into(),
            "--signer".into(),
            "local-ca".into(),
            "--local-ca-dir".into(),
            ca.to_str().unwrap().into(),
            "--root-ca-file".into(),
            pinned.to_str().unwrap().into(),
            "--kubeconfig".into(),
            local.kubeconfig.to_str().unwrap().into(),
            "--serving-address".into(),
            "127.0.0.1:0".into(),
            "--admin-address".into(),
            "127.0.0.1:0".into(),
            "--serving-certificate-dns-names".into(),
            "localhost".into(),
            "--leader-election-namespace".into(),
            test.into(),
            // The remote-cluster Secrets go in the test's namespace too (add_remote).
            "--multicluster-secret-namespace".into(),
            test.into(),
            "--leader-election-lease-duration".into(),
            "4s".into(),
            "--leader-election-renew-deadline".into(),
            "3s".into(),
            "--leader-election-retry-period".into(),
            "500ms".into(),
            "--configmap-namespace-selector".into(),
            selector,
            "--max-concurrent-reconciles".into(),
            "1".into(),
        ];
        argv.extend(extra.iter().map(|flag| (*flag).to_owned()));
        let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
            unreachable!()
        };
        let running = app::start(*args, Hooks::default()).await.unwrap();
        Self {
            running,
            test: test.to_owned(),
            dir,
            root,
        }
    }

    fn pinned(&self) -> PathBuf {
        self.dir.path().join("pinned.pem")
    }

    fn pem(&self) -> String {
        std::fs::read_to_string(self.pinned()).unwrap()
    }

    /// Registers `remote` under `id` through a multi-cluster Secret in the server's namespace.
    async fn add_remote(&self, id: &str, kubeconfig: &[u8]) {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("istio-remote-secret-{id}"),
                "labels": {"istio/multiCluster": "true"},
                "annotations": {"networking.istio.io/cluster": id},
            },
            "stringData": {id: String::from_utf8_lossy(kubeconfig)},
        }))
        .unwrap();
        let api: Api<Secret> = Api::namespaced(clusters().await[0].client().await, &self.test);
        api.create(&PostParams::default(), &secret).await.unwrap();
    }

    async fn remove_remote(&self, id: &str) {
        let api: Api<Secret> = Api::namespaced(clusters().await[0].client().await, &self.test);
        api.delete(
            &format!("istio-remote-secret-{id}"),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    }

    async fn debug_bundle(&self) -> serde_json::Value {
        let (status, body) = http_get(&format!(
            "http://{}/debug/bundle",
            self.running.admin_address
        ))
        .await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn cluster_report(&self, id: &str) -> Option<serde_json::Value> {
        let bundle = self.debug_bundle().await;
        bundle["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, body) = http_get(&format!("http://{}/metrics", self.running.admin_address)).await;
        openmetrics::parse(&body).value(name, labels)
    }
}

async fn create_namespace(cluster: &TestCluster, name: &str, labels: &[(&str, &str)]) {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels}
    }))
    .unwrap();
    match Api::<Namespace>::all(cluster.client().await)
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(::kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

/// A namespace the server of `test` looks after.
async fn managed_namespace(cluster: &TestCluster, test: &str, name: &str) {
    create_namespace(cluster, name, &[("bundle-test", test)]).await;
}

async fn config_map(cluster: &TestCluster, namespace: &str) -> Option<ConfigMap> {
    Api::<ConfigMap>::namespaced(cluster.client().await, namespace)
        .get_opt(CM)
        .await
        .unwrap()
}

fn is_bundle(cm: &ConfigMap, pem: &str) -> bool {
    let labelled = cm
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("istio.io/config"))
        .is_some_and(|v| v == "true");
    let data = cm.data.clone().unwrap_or_default();
    labelled && data.len() == 1 && data.get("root-cert.pem").is_some_and(|v| v == pem)
}

async fn expect_bundle(cluster: &TestCluster, namespace: &str, pem: &str) {
    let right = eventually(WAIT, || async {
        config_map(cluster, namespace)
            .await
            .is_some_and(|cm| is_bundle(&cm, pem))
    })
    .await;
    assert!(
        right,
        "{namespace} at {}: {:?}",
        cluster.url,
        config_map(cluster, namespace).await
    );
}

async fn patch_config_map(cluster: &TestCluster, namespace: &str, patch: serde_json::Value) {
    Api::<ConfigMap>::namespaced(cluster.client().await, namespace)
        .patch(CM, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn label_namespace(cluster: &TestCluster, name: &str, labels: serde_json::Value) {
    Api::<Namespace>::all(cluster.client().await)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"labels": labels}})),
        )
        .await
        .unwrap();
}

fn kubeconfig_of(cluster: &TestCluster) -> Vec<u8> {
    std::fs::read(&cluster.kubeconfig).unwrap()
}

#[tokio::test]
async fn every_namespace_of_all_clusters_gets_the_bundle_and_drift_is_repaired() {
    let test = "all";
    let all = clusters().await;
    for cluster in all {
        managed_namespace(cluster, test, "all-a").await;
        managed_namespace(cluster, test, "all-b").await;
    }
    let server = BundleServer::start(test).await;
    server.add_remote("remote-1", &kubeconfig_of(&all[1])).await;
    server.add_remote("remote-2", &kubeconfig_of(&all[2])).await;
    let pem = server.pem();
    for cluster in all {
        expect_bundle(cluster, "all-a", &pem).await;
        expect_bundle(cluster, "all-b", &pem).await;
        // The server's own Lease namespace is not selected: nothing there.
    }

    // A new namespace, in a remote.
    managed_namespace(&all[2], test, "all-new").await;
    expect_bundle(&all[2], "all-new", &pem).await;

    // Drift, in the local cluster and in a remote: each is repaired.
    for cluster in [&all[0], &all[1]] {
        patch_config_map(
            cluster,
            "all-a",
            serde_json::json!({"data": {"root-cert.pem": "wrong"}}),
        )
        .await;
        expect_bundle(cluster, "all-a", &pem).await;
        patch_config_map(
            cluster,
            "all-a",
            serde_json::json!({"metadata": {"labels": {"istio.io/config": null}}}),
        )
        .await;
        expect_bundle(cluster, "all-a", &pem).await;
        patch_config_map(
            cluster,
            "all-a",
            serde_json::json!({"data": {"extra": "x"}}),
        )
        .await;
        expect_bundle(cluster, "all-a", &pem).await;
        Api::<ConfigMap>::namespaced(cluster.client().await, "all-b")
            .delete(CM, &DeleteParams::default())
            .await
            .unwrap();
        expect_bundle(cluster, "all-b", &pem).await;
    }

    // A second pinned root (a rotation's first step) reaches every cluster.
    let next = TestCa::root("all next root", KeyAlg::EcdsaP256);
    std::fs::write(
        server.pinned(),
        format!("{}{}", server.root.cert_pem(), next.cert_pem()),
    )
    .unwrap();
    let rotated = format!("{}{}", server.root.cert_pem(), next.cert_pem());
    for cluster in all {
        for namespace in ["all-a", "all-b"] {
            expect_bundle(cluster, namespace, &rotated).await;
        }
    }
    expect_bundle(&all[2], "all-new", &rotated).await;

    // The admin API sees three synced clusters with every namespace in sync.
    let settled = eventually(WAIT, || async {
        let bundle = server.debug_bundle().await;
        let clusters = bundle["clusters"].as_array().unwrap().clone();
        clusters.len() == 3
            && clusters.iter().all(|c| {
                c["state"] == "synced"
                    && c["bundle"]["in_sync"] == c["bundle"]["namespaces"]
                    && c["bundle"]["pending"] == 0
                    && c["bundle"]["errors"] == 0
            })
    })
    .await;
    assert!(settled, "{:#}", server.debug_bundle().await);
    let bundle = server.debug_bundle().await;
    assert_eq!(bundle["leader"]["is_leader"], true);
    let ids: Vec<&str> = bundle["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["Kubernetes", "remote-1", "remote-2"]);
    assert_eq!(bundle["clusters"][2]["bundle"]["namespaces"], 3);
    for (cluster, state, value) in [
        ("remote-2", "synced", 1.0),
        ("remote-2", "error", 0.0),
        ("Kubernetes", "synced", 1.0),
    ] {
        let got = server
            .metric(
                "istio_csr_cluster_state",
                &[("cluster", cluster), ("state", state)],
            )
            .await;
        assert_eq!(got, value, "{cluster} {state}");
    }
    let in_sync = server
        .metric(
            "istio_csr_bundle_namespaces",
            &[("cluster", "remote-1"), ("status", "in_sync")],
        )
        .await;
    assert_eq!(in_sync, 2.0);
}

#[tokio::test]
async fn excluded_and_terminating_namespaces_are_left_alone() {
    let test = "alone";
    let local = &clusters().await[0];
    let server = BundleServer::start(test).await;
    let pem = server.pem();
    managed_namespace(local, test, "alone-kept").await;
    expect_bundle(local, "alone-kept", &pem).await;

    // Excluded from the start: never gets one.
    create_namespace(
        local,
        "alone-excluded",
        &[("bundle-test", test), ("excluded", "true")],
    )
    .await;
    // Terminating (no namespace controller runs here, so it stays Terminating), then
    // selected: still nothing, and no failed write either.
    create_namespace(
        local,
        "alone-doomed",
        &[("bundle-test", test), ("excluded", "true")],
    )
    .await;
    Api::<Namespace>::all(local.client().await)
        .delete("alone-doomed", &DeleteParams::default())
        .await
        .unwrap();
    label_namespace(local, "alone-doomed", serde_json::json!({"excluded": null})).await;
    // Leaving the selection: the ConfigMap stays as it is, even when it drifts.
    label_namespace(local, "alone-kept", serde_json::json!({"excluded": "true"})).await;
    // The witness: a later event of the same watch.
    managed_namespace(local, test, "alone-witness").await;
    expect_bundle(local, "alone-witness", &pem).await;

    assert!(config_map(local, "alone-excluded").await.is_none());
    assert!(config_map(local, "alone-doomed").await.is_none());
    patch_config_map(
        local,
        "alone-kept",
        serde_json::json!({"data": {"root-cert.pem": "mine"}}),
    )
    .await;
    // A ConfigMap witness, after the drift on the same watch.
    patch_config_map(
        local,
        "alone-witness",
        serde_json::json!({"data": {"root-cert.pem": "x"}}),
    )
    .await;
    expect_bundle(local, "alone-witness", &pem).await;
    let kept = config_map(local, "alone-kept").await.unwrap();
    assert_eq!(kept.data.unwrap()["root-cert.pem"], "mine");
    let errors = server
        .metric(
            "istio_csr_bundle_reconciles_total",
            &[("cluster", "Kubernetes"), ("result", "error")],
        )
        .await;
    assert_eq!(
        errors, 0.0,
        "nothing was attempted where it could only fail"
    );
}

#[tokio::test]
async fn remote_secrets_come_and_go_at_runtime_and_a_broken_one_harms_no_other() {
    let test = "runtime";
    let all = clusters().await;
    for cluster in &all[1..] {
        managed_namespace(cluster, test, "runtime-a").await;
    }
    let server = BundleServer::start(test).await;
    let pem = server.pem();
    server.add_remote("remote-1", &kubeconfig_of(&all[1])).await;
    expect_bundle(&all[1], "runtime-a", &pem).await;

    // A kubeconfig that would run a program here: refused, reported, and nobody else hurt.
    let exec = String::from_utf8(kubeconfig_of(&all[2])).unwrap().replace(
        &format!("    token: {}\n", all[2].admin_token),
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/true\n",
    );
    assert!(exec.contains("exec:"), "the kubeconfig was not rewritten");
    server.add_remote("broken", exec.as_bytes()).await;
    let reported = eventually(WAIT, || async {
        server.cluster_report("broken").await.is_some_and(|c| {
            c["state"] == "error"
                && c["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("exec plugin"))
        })
    })
    .await;
    assert!(reported, "{:#}", server.debug_bundle().await);

    // One whose API server is not verified: whoever sits on the path could answer its
    // TokenReviews. Refused and reported the same way.
    let unverified: String = String::from_utf8(kubeconfig_of(&all[2]))
        .unwrap()
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("certificate-authority-data:") {
                "    insecure-skip-tls-verify: true\n".to_owned()
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    assert!(unverified.contains("insecure-skip-tls-verify"));
    server.add_remote("unverified", unverified.as_bytes()).await;
    let reported = eventually(WAIT, || async {
        server.cluster_report("unverified").await.is_some_and(|c| {
            c["state"] == "error"
                && c["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("insecure-skip-tls-verify"))
        })
    })
    .await;
    assert!(reported, "{:#}", server.debug_bundle().await);
    managed_namespace(&all[1], test, "runtime-b").await;
    expect_bundle(&all[1], "runtime-b", &pem).await;
    assert_eq!(
        server.cluster_report("remote-1").await.unwrap()["state"],
        "synced"
    );

    // The same kubeconfig again (only the Secret's metadata changed): nothing is rebuilt, so
    // no new client lists the remote's namespaces again.
    let namespace_lists = || async {
        server
            .metric(
                "istio_csr_kube_api_requests_total",
                &[
                    ("code", "200"),
                    ("resource", "namespaces"),
                    ("verb", "list"),
                ],
            )
            .await
    };
    let lists_before = namespace_lists().await;
    Api::<Secret>::namespaced(all[0].client().await, test)
        .patch(
            "istio-remote-secret-remote-1",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"annotations": {"touched": "yes"}}})),
        )
        .await
        .unwrap();
    // Witness: a Secret event after it on the same watch.
    server.add_remote("witness", b"not a kubeconfig").await;
    let witnessed = eventually(WAIT, || async {
        server
            .cluster_report("witness")
            .await
            .is_some_and(|c| c["state"] == "error")
    })
    .await;
    assert!(witnessed, "{:#}", server.debug_bundle().await);
    assert_eq!(
        namespace_lists().await,
        lists_before,
        "an unchanged kubeconfig was rebuilt"
    );

    // Added at runtime: synced. Removed: stopped and gone.
    server.add_remote("remote-2", &kubeconfig_of(&all[2])).await;
    expect_bundle(&all[2], "runtime-a", &pem).await;
    server.remove_remote("remote-2").await;
    let gone = eventually(WAIT, || async {
        server.cluster_report("remote-2").await.is_none()
    })
    .await;
    assert!(gone, "{:#}", server.debug_bundle().await);
    managed_namespace(&all[2], test, "runtime-late").await;
    // Witness in a cluster still served.
    managed_namespace(&all[1], test, "runtime-c").await;
    expect_bundle(&all[1], "runtime-c", &pem).await;
    assert!(config_map(&all[2], "runtime-late").await.is_none());
}

#[tokio::test]
async fn tokens_are_reviewed_by_the_cluster_their_clusterid_names() {
    let test = "tokens";
    let all = clusters().await;
    let server = BundleServer::start(test).await;
    server.add_remote("remote-1", &kubeconfig_of(&all[1])).await;
    let remote = &all[1];
    remote.namespace("tokens-app").await;
    remote.service_account("tokens-app", "web").await;
    let token = remote
        .token("tokens-app", "web", &["istio-ca"], 3600, None)
        .await;
    let identity = "spiffe://cluster.local/ns/tokens-app/sa/web";
    let target = |cluster_id: &str| Target {
        cluster_id: cluster_id.into(),
        ..localhost_target(server.running.grpc_address, server.pinned())
    };
    let registered = eventually(WAIT, || async {
        server
            .cluster_report("remote-1")
            .await
            .is_some_and(|c| c["state"] == "synced" || c["state"] == "connected")
    })
    .await;
    assert!(registered, "{:#}", server.debug_bundle().await);

    let chain = request_certificate(&target("remote-1"), Some(&token), identity)
        .await
        .expect("the remote cluster's own token");
    assert_eq!(leaf_identity(&chain).0, vec![identity]);
    // The remote's own keys check the signatures of its tokens: a forgery naming its key
    // costs no review.
    let report = server.cluster_report("remote-1").await.unwrap();
    assert_eq!(report["token_signature_check"], "local", "{report:#}");
    let reviews = || {
        server.metric(
            "istio_csr_kube_api_requests_total",
            &[
                ("verb", "create"),
                ("resource", "tokenreviews"),
                ("code", "201"),
            ],
        )
    };
    let reviewed = reviews().await;
    let (signed, _) = token.rsplit_once('.').unwrap();
    for i in 0..20u8 {
        let forged = format!("{signed}.{}", b64_url(&[i; 256]));
        let status = request_certificate(&target("remote-1"), Some(&forged), identity)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert_eq!(
        reviews().await,
        reviewed,
        "forged signatures reached a review"
    );
    // The same token sent to the local cluster means nothing there.
    let local = request_certificate(&target("Kubernetes"), Some(&token), identity)
        .await
        .unwrap_err();
    assert_eq!(local.code(), Code::Unauthenticated);
    let unknown = request_certificate(&target("remote-9"), Some(&token), identity)
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_new_leader_resyncs_everything_with_zero_writes() {
    let test = "resync";
    let all = clusters().await;
    for name in ["resync-a", "resync-b", "resync-c"] {
        managed_namespace(&all[0], test, name).await;
        managed_namespace(&all[1], test, name).await;
    }
    let root = TestCa::root("resync root", KeyAlg::EcdsaP256);
    let dir = tempfile::tempdir().unwrap();
    let first = BundleServer::start_with(test, root, dir, &[]).await;
    first.add_remote("remote-1", &kubeconfig_of(&all[1])).await;
    let pem = first.pem();
    for cluster in &all[..2] {
        for name in ["resync-a", "resync-b", "resync-c"] {
            expect_bundle(cluster, name, &pem).await;
        }
    }
    let written = first
        .metric(
            "istio_csr_bundle_writes_total",
            &[("cluster", "Kubernetes"), ("op", "create")],
        )
        .await;
    assert_eq!(written, 3.0);
    let BundleServer {
        running, dir, root, ..
    } = first;
    running.shutdown();
    running.wait().await.unwrap();

    // A new replica takes the released Lease and looks at every namespace again.
    let second = BundleServer::start_with(test, root, dir, &[]).await;
    let settled = eventually(WAIT, || async {
        let report = second.debug_bundle().await;
        let clusters = report["clusters"].as_array().unwrap().clone();
        report["leader"]["is_leader"] == true
            && clusters.len() == 2
            && clusters.iter().all(|c| {
                c["state"] == "synced"
                    && c["bundle"]["namespaces"] == 3
                    && c["bundle"]["in_sync"] == 3
                    && c["bundle"]["pending"] == 0
            })
    })
    .await;
    assert!(settled, "{:#}", second.debug_bundle().await);
    for cluster in ["Kubernetes", "remote-1"] {
        let unchanged = second
            .metric(
                "istio_csr_bundle_reconciles_total",
                &[("cluster", cluster), ("result", "unchanged")],
            )
            .await;
        assert!(
            unchanged >= 3.0,
            "{cluster}: {unchanged} unchanged reconciles"
        );
        for op in ["create", "update"] {
            let writes = second
                .metric(
                    "istio_csr_bundle_writes_total",
                    &[("cluster", cluster), ("op", op)],
                )
                .await;
            assert_eq!(writes, 0.0, "{cluster}: {op} on a correct cluster");
        }
    }
}

#[tokio::test]
async fn a_duplicate_cluster_id_is_ignored_until_its_first_owner_goes() {
    let test = "dup";
    let all = clusters().await;
    let server = BundleServer::start(test).await;
    let pem = server.pem();
    server.add_remote("remote-1", &kubeconfig_of(&all[1])).await;
    managed_namespace(&all[1], test, "dup-a").await;
    expect_bundle(&all[1], "dup-a", &pem).await;

    // A second Secret names the same cluster ID: ignored while the first one has it.
    let second: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "second-definition", "labels": {"istio/multiCluster": "true"}},
        "stringData": {"remote-1": String::from_utf8_lossy(&kubeconfig_of(&all[1]))},
    }))
    .unwrap();
    let secrets: Api<Secret> = Api::namespaced(all[0].client().await, test);
    secrets
        .create(&PostParams::default(), &second)
        .await
        .unwrap();
    server.remove_remote("remote-1").await;

    // The ID is free again: the second definition takes it and the cluster keeps its bundle.
    managed_namespace(&all[1], test, "dup-b").await;
    expect_bundle(&all[1], "dup-b", &pem).await;
    let synced = eventually(WAIT, || async {
        server
            .cluster_report("remote-1")
            .await
            .is_some_and(|c| c["state"] == "synced")
    })
    .await;
    assert!(synced, "{:#}", server.debug_bundle().await);
}

#[tokio::test]
async fn a_changed_kubeconfig_takes_over_and_a_broken_change_keeps_the_old_one() {
    let test = "change";
    let all = clusters().await;
    let server = BundleServer::start(test).await;
    let pem = server.pem();
    let good = kubeconfig_of(&all[1]);
    server.add_remote("remote-1", &good).await;
    managed_namespace(&all[1], test, "change-a").await;
    expect_bundle(&all[1], "change-a", &pem).await;
    let namespace_lists = || async {
        server
            .metric(
                "istio_csr_kube_api_requests_total",
                &[
                    ("code", "200"),
                    ("resource", "namespaces"),
                    ("verb", "list"),
                ],
            )
            .await
    };
    let put = |kubeconfig: Vec<u8>| async move {
        let secret =
            serde_json::json!({"stringData": {"remote-1": String::from_utf8_lossy(&kubeconfig)}});
        Api::<Secret>::namespaced(clusters().await[0].client().await, test)
            .patch(
                "istio-remote-secret-remote-1",
                &PatchParams::default(),
                &Patch::Merge(&secret),
            )
            .await
            .unwrap();
    };

    // A changed (still valid) kubeconfig: a new client lists the namespaces, then serves.
    let lists_before = namespace_lists().await;
    let mut changed = good.clone();
    changed.extend_from_slice(b"# rotated\n");
    put(changed).await;
    let relisted = eventually(WAIT, || async { namespace_lists().await > lists_before }).await;
    assert!(relisted, "the changed kubeconfig was not used");
    managed_namespace(&all[1], test, "change-b").await;
    expect_bundle(&all[1], "change-b", &pem).await;

    // A broken change: reported, and the working client keeps the cluster served.
    put(b"not: [a kubeconfig".to_vec()).await;
    let reported = eventually(WAIT, || async {
        server
            .cluster_report("remote-1")
            .await
            .is_some_and(|c| c["state"] == "error")
    })
    .await;
    assert!(reported, "{:#}", server.debug_bundle().await);
    managed_namespace(&all[1], test, "change-c").await;
    expect_bundle(&all[1], "change-c", &pem).await;
}

#[tokio::test]
async fn a_remote_clusters_ztunnel_is_checked_against_that_clusters_pod_cache() {
    let test = "remote-pods";
    let remote = &clusters().await[1];
    let (system, app, node) = ("rp-system", "rp-app", "rp-node-1");
    for namespace in [system, app] {
        remote.namespace(namespace).await;
    }
    remote.service_account(system, "ztunnel").await;
    let ztunnel_pod = remote.pod(system, "ztunnel-1", "ztunnel", node).await;
    let accounts: Vec<String> = (0..10).map(|i| format!("web-{i}")).collect();
    for sa in &accounts {
        remote.service_account(app, sa).await;
        remote.pod(app, &format!("{sa}-1"), sa, node).await;
    }
    let token = remote
        .token(system, "ztunnel", &["istio-ca"], 3600, Some(&ztunnel_pod))
        .await;
    let server = BundleServer::start_with(
        test,
        TestCa::root("remote pods root", KeyAlg::EcdsaP256),
        tempfile::tempdir().unwrap(),
        &["--ca-trusted-node-accounts", "rp-system/ztunnel"],
    )
    .await;
    server.add_remote("remote-1", &kubeconfig_of(remote)).await;
    let target = Target {
        cluster_id: "remote-1".into(),
        ..localhost_target(server.running.grpc_address, server.pinned())
    };
    let admin = server.running.admin_address;
    let id = |sa: &str| format!("spiffe://cluster.local/ns/{app}/sa/{sa}");

    // Once the remote is registered and its own pod cache has synced, its ztunnel's
    // impersonations read no pod from any API server.
    until_cache_warm(&target, admin, &token, &id(&accounts[0])).await;
    let before = pod_reads(admin).await;
    for sa in &accounts {
        let chain = impersonate(&target, &token, &id(sa))
            .await
            .unwrap_or_else(|s| panic!("{sa}: {s:?}"));
        assert_eq!(leaf_identity(&chain).0, vec![id(sa)]);
    }
    assert_eq!(pod_reads(admin).await, before, "pod (GET, LIST) requests");

    // The remote's entry goes, and its cache with it: its ztunnel is unknown.
    server.remove_remote("remote-1").await;
    let gone = eventually(WAIT, || async {
        impersonate(&target, &token, &id(&accounts[0]))
            .await
            .is_err_and(|s| s.code() == Code::Unauthenticated)
    })
    .await;
    assert!(gone, "remote-1 still answers after its Secret was deleted");
}

fn b64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

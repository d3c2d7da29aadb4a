//! The cost of a CSR on a real kube-apiserver: latency at 1, 10 and 50 concurrent requests,
//! 1,000 requests at once, and the API requests each CSR makes; an ambient restart (one
//! ztunnel asking for 1,000 pods of its node at once). Ignored by `cargo test`; run:
//!
//!   ISTIO_CSR_KUBE_BIN=... cargo test --release --test kube_bench -- --ignored --nocapture
//!
//! (`scripts/bench.sh kube` does this). Every pod has its own token, as after a restart, so
//! every request pays for one TokenReview.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use istio_csr_rs::signer::issuer::{IssueRequest, Issuer, LeafNames, NO_ANNOTATIONS, Purpose};
use support::ambient::ztunnel_on;
use support::cert_manager::{cert_manager_server_with, target_for};
use support::kube::shared;
use support::*;

type IstioClient = istio_csr_rs::proto::istio_v1_auth::istio_certificate_service_client::IstioCertificateServiceClient<tonic::transport::Channel>;

const NAMESPACE: &str = "bench";
const ACCOUNTS: usize = 2000;
/// Connections the simulated pods share (as pods on 16 nodes would through ztunnel); each
/// carries at most 128 concurrent calls, the server's stream limit.
const CONNECTIONS: usize = 16;

/// API requests made so far, by (verb, resource), from the server's own metric.
async fn api_calls(admin: std::net::SocketAddr) -> openmetrics::Exposition {
    let (_, body) = http_get(&format!("http://{admin}/metrics")).await;
    openmetrics::parse(&body)
}

fn calls(metrics: &openmetrics::Exposition, verb: &str, resource: &str, code: &str) -> f64 {
    metrics.value(
        "istio_csr_kube_api_requests_total",
        &[("code", code), ("resource", resource), ("verb", verb)],
    )
}

/// The API work of one CSR done directly, back to back: TokenReview, create the request,
/// set its status as cert-manager would, delete it. What the API server needs per CSR,
/// whoever sends it: the floor our latency is compared with.
async fn floor_cycle(
    client: ::kube::Client,
    token: String,
    name: String,
    status: serde_json::Value,
) -> Duration {
    use ::kube::api::{Api, Patch, PatchParams, PostParams};
    use istio_csr_rs::signer::issuer::cert_manager::CertificateRequest;
    use k8s_openapi::api::authentication::v1::TokenReview;
    let review: TokenReview = serde_json::from_value(serde_json::json!({
        "spec": {"token": token, "audiences": ["istio-ca"]}
    }))
    .unwrap();
    let request: CertificateRequest = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"request": "Zmxvb3I=", "issuerRef": {"name": "floor", "kind": "Issuer", "group": "cert-manager.io"}}
    }))
    .unwrap();
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let requests: Api<CertificateRequest> = Api::namespaced(client, NAMESPACE);
    let started = Instant::now();
    let reviewed = reviews
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    assert_eq!(reviewed.status.and_then(|s| s.authenticated), Some(true));
    requests
        .create(&PostParams::default(), &request)
        .await
        .unwrap();
    requests
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    requests.delete(&name, &Default::default()).await.unwrap();
    elapsed
}

/// CreateCertificate for each (service account, token), `concurrency` at a time over the
/// shared connections: each call's latency, and the wall time of the whole batch.
async fn csr_phase(
    target: &istio_csr_rs::client::Target,
    clients: &[IstioClient],
    batch: &[(String, String)],
    concurrency: usize,
) -> (Vec<Duration>, Duration) {
    let started = Instant::now();
    let latencies = futures_util::stream::iter(batch.iter().cloned())
        .enumerate()
        .map(|(i, (sa, token))| {
            let mut client = clients[i % clients.len()].clone();
            async move {
                let identity = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{sa}");
                let (csr, _) = p256_csr(&identity);
                let request = pilot_agent_request(target, Some(&token), csr, 3600);
                let t = Instant::now();
                let answer = client.create_certificate(request).await;
                let elapsed = t.elapsed();
                let chain = answer
                    .expect("every CSR must succeed")
                    .into_inner()
                    .cert_chain;
                assert_eq!(leaf_identity(&chain).0, vec![identity]);
                elapsed
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    (latencies, started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run with --ignored --nocapture (scripts/bench.sh kube)"]
async fn csr_latency_and_api_cost_on_a_real_apiserver() {
    let cluster = shared().await;
    cluster.namespace(NAMESPACE).await;
    let (running, dir, _root, _fixture) = cert_manager_server_with(NAMESPACE, true, &[]).await;
    let target = target_for(&running, &dir);

    // One service account and token per simulated pod, made concurrently.
    let prepared = Instant::now();
    let tokens: Vec<(String, String)> = futures_util::stream::iter(0..ACCOUNTS)
        .map(|i| async move {
            let sa = format!("pod-{i}");
            cluster.service_account(NAMESPACE, &sa).await;
            let token = cluster
                .token(NAMESPACE, &sa, &["istio-ca"], 3600, None)
                .await;
            (sa, token)
        })
        .buffered(32)
        .collect()
        .await;
    eprintln!(
        "prepared {ACCOUNTS} service accounts and tokens in {:?}",
        prepared.elapsed()
    );

    // The floor: the same API requests sent directly, with fresh tokens too (the API server
    // caches token authentication for a few seconds).
    let (floor_tokens, tokens) = tokens.split_at(500);
    let kube_client = cluster.client().await;
    let status = {
        let ca = istio_csr_rs::pki::testing::TestCa::root(
            "floor",
            istio_csr_rs::pki::testing::KeyAlg::EcdsaP256,
        );
        let (leaf, _) = ca.leaf("spiffe://cluster.local/ns/bench/sa/floor");
        let b64 = |text: String| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(text)
        };
        serde_json::json!({"status": {
            "conditions": [
                {"type": "Approved", "status": "True", "reason": "cert-manager.io"},
                {"type": "Ready", "status": "True", "reason": "Issued", "message": "issued"}
            ],
            "certificate": b64(istio_csr_rs::pki::pem::encode_certificate(&leaf)),
            "ca": b64(ca.cert_pem()),
        }})
    };
    println!(
        "Floor: the API requests of one CSR sent directly (TokenReview, create, status, delete).\n"
    );
    println!("| concurrency | requests | p50 ms | p99 ms | wall s |");
    println!("|---|---|---|---|---|");
    let mut floor_rest = floor_tokens;
    let mut floor_p50 = Vec::new();
    for (concurrency, count) in [(1, 100), (10, 200), (50, 200)] {
        let (batch, remaining) = floor_rest.split_at(count);
        floor_rest = remaining;
        let started = Instant::now();
        let mut latencies: Vec<Duration> = futures_util::stream::iter(batch.iter().cloned())
            .enumerate()
            .map(|(i, (_, token))| {
                floor_cycle(
                    kube_client.clone(),
                    token,
                    format!("floor-{concurrency}-{i}"),
                    status.clone(),
                )
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let wall = started.elapsed();
        latencies.sort();
        floor_p50.push(percentile(&latencies, 0.50));
        println!(
            "| {concurrency} | {count} | {} | {} | {:.2} |",
            ms(percentile(&latencies, 0.50)),
            ms(percentile(&latencies, 0.99)),
            wall.as_secs_f64()
        );
    }
    // The issuer alone (no gRPC, TLS, authentication or CSR checks): create, wait on the
    // shared watch for the fixture's answer, delete. What is left of a call once the API
    // server's part is known.
    let (issuer, watch) = istio_csr_rs::signer::issuer::cert_manager::CertManagerIssuer::new(
        cluster.client().await,
        istio_csr_rs::signer::issuer::cert_manager::Settings {
            static_issuer: true,
            namespace: NAMESPACE.into(),
            issuer: istio_csr_rs::signer::issuer::cert_manager::IssuerRef {
                name: "ca-issuer".into(),
                kind: "Issuer".into(),
                group: "cert-manager.io".into(),
            },
            additional_annotations: Default::default(),
            preserve_requests: false,
            timeout: Duration::from_secs(30),
        },
    );
    let _watch = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(watch));
    tokio::time::timeout(Duration::from_secs(30), issuer.wait_ready())
        .await
        .unwrap();
    println!("\nThe cert-manager issuer alone: create, wait on the shared watch, delete.\n");
    println!("| concurrency | requests | p50 ms | p99 ms | wall s |");
    println!("|---|---|---|---|---|");
    for (concurrency, count) in [(1, 100), (10, 200), (50, 200)] {
        let started = Instant::now();
        let mut latencies: Vec<Duration> = futures_util::stream::iter(0..count)
            .map(|i| {
                let issuer = issuer.clone();
                async move {
                    let identity = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/direct-{i}");
                    let (csr, _) = p256_csr(&identity);
                    let t = Instant::now();
                    let checked = istio_csr_rs::pki::csr::parse_and_check(&csr).unwrap();
                    let names = LeafNames::identities(&checked.identities);
                    issuer
                        .issue(IssueRequest {
                            purpose: Purpose::Workload,
                            csr: &checked,
                            names: &names,
                            lifetime: Duration::from_secs(3600),
                            route: None,
                            annotations: &NO_ANNOTATIONS,
                        })
                        .await
                        .unwrap();
                    t.elapsed()
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let wall = started.elapsed();
        latencies.sort();
        println!(
            "| {concurrency} | {count} | {} | {} | {:.2} |",
            ms(percentile(&latencies, 0.50)),
            ms(percentile(&latencies, 0.99)),
            wall.as_secs_f64()
        );
    }

    println!(
        "\nistio-csr-rs: CreateCertificate over gRPC/TLS, cert-manager fixture signing at once.\n"
    );

    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(target.connect().await.unwrap());
    }
    let mut rest = tokens;
    println!(
        "| concurrency | requests | p50 ms | p99 ms | max ms | wall s | creates/CSR | deletes/CSR | TokenReviews/CSR | GETs | lists |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (concurrency, count) in [(1, 100), (10, 200), (50, 200), (1000, 1000)] {
        let (batch, remaining) = rest.split_at(count.min(rest.len()));
        rest = remaining;
        let before = api_calls(running.admin_address).await;
        let (mut latencies, wall) = csr_phase(&target, &clients, batch, concurrency).await;
        let after = api_calls(running.admin_address).await;
        latencies.sort();
        let n = latencies.len() as f64;
        let per_csr = |verb: &str, resource: &str, code: &str| {
            (calls(&after, verb, resource, code) - calls(&before, verb, resource, code)) / n
        };
        let gets = [
            "certificaterequests",
            "tokenreviews",
            "serviceaccounts",
            "pods",
        ]
        .iter()
        .map(|r| calls(&after, "get", r, "200") - calls(&before, "get", r, "200"))
        .sum::<f64>();
        let lists = calls(&after, "list", "certificaterequests", "200")
            - calls(&before, "list", "certificaterequests", "200");
        let label = if concurrency >= count {
            "all at once".to_owned()
        } else {
            concurrency.to_string()
        };
        println!(
            "| {label} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {gets} | {lists} |",
            latencies.len(),
            ms(percentile(&latencies, 0.50)),
            ms(percentile(&latencies, 0.99)),
            ms(*latencies.last().unwrap()),
            wall.as_secs_f64(),
            per_csr("create", "certificaterequests", "201"),
            per_csr("delete", "certificaterequests", "200"),
            per_csr("create", "tokenreviews", "201"),
        );
    }

    // The same 500 pods again within the cache TTL: no TokenReview at all.
    let again = &tokens[tokens.len() - 500..];
    let before = api_calls(running.admin_address).await;
    let (mut latencies, _) = csr_phase(&target, &clients, again, 10).await;
    latencies.sort();
    let after = api_calls(running.admin_address).await;
    let reviews = calls(&after, "create", "tokenreviews", "201")
        - calls(&before, "create", "tokenreviews", "201");
    println!(
        "\nrepeat of 500 cached tokens at concurrency 10: {reviews} TokenReviews, p50 {} ms, p99 {} ms",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
    );

    let waited = after.value("istio_csr_kube_api_rate_limit_wait_seconds_total", &[]);
    println!("client-side rate-limit wait over the whole run: {waited:.2} s");

    // Deletions run after each answer; under load they trail it, but none is lost.
    let requests =
        ::kube::Api::<istio_csr_rs::signer::issuer::cert_manager::CertificateRequest>::namespaced(
            cluster.client().await,
            NAMESPACE,
        );
    let drained = eventually(Duration::from_secs(60), || async {
        requests
            .list(&Default::default())
            .await
            .is_ok_and(|list| list.items.is_empty())
    })
    .await;
    assert!(drained, "CertificateRequests were left behind");
    let last = api_calls(running.admin_address).await;
    let created = calls(&last, "create", "certificaterequests", "201");
    let deleted = calls(&last, "delete", "certificaterequests", "200");
    println!("whole run: {created} CertificateRequests created, {deleted} deleted, none left");
    assert_eq!(created, deleted);
}

const BUNDLE_NAMESPACES: usize = 2000;
/// Namespaces beside them that the selector leaves out: what a server-side selector saves.
const UNSELECTED_NAMESPACES: usize = 2000;

/// This process's resident memory (the agent runs inside the benchmark's process), in MiB.
fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// A server whose bundle covers namespaces labelled `bundle-bench=yes`, with `pinned` roots.
async fn bundle_server(
    dir: &std::path::Path,
    root: &istio_csr_rs::pki::testing::TestCa,
) -> istio_csr_rs::app::Running {
    let cluster = shared().await;
    let ca = dir.join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    for name in ["ca-cert.pem", "cert-chain.pem", "root-cert.pem"] {
        std::fs::write(ca.join(name), root.cert_pem()).unwrap();
    }
    std::fs::write(ca.join("ca-key.pem"), root.key_pem()).unwrap();
    let pinned = dir.join("pinned.pem");
    if !pinned.exists() {
        std::fs::write(&pinned, root.cert_pem()).unwrap();
    }
    let flags = [
        "--signer=local-ca".to_owned(),
        format!("--local-ca-dir={}", ca.display()),
        format!("--root-ca-file={}", pinned.display()),
        format!("--kubeconfig={}", cluster.kubeconfig.display()),
        "--leader-election-namespace=bundle-bench".into(),
        "--configmap-namespace-selector=bundle-bench=yes".into(),
    ];
    istio_csr_rs::app::start(serve_args(&flags), Default::default())
        .await
        .unwrap()
}

/// Waits until the local cluster's bundle is in sync everywhere: how long it took, and the
/// ConfigMap writes (create, update) made meanwhile.
async fn until_in_sync(admin: std::net::SocketAddr) -> (Duration, f64, f64) {
    let started = Instant::now();
    loop {
        let (_, body) = http_get(&format!("http://{admin}/debug/bundle")).await;
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        let local = &report["clusters"][0]["bundle"];
        if local["synced"] == true
            && local["namespaces"] == BUNDLE_NAMESPACES
            && local["in_sync"] == BUNDLE_NAMESPACES
            && local["pending"] == 0
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "{local}");
        // A measurement, not a wait for an event: 50 ms is the resolution of the figure.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    let metrics = api_calls(admin).await;
    let writes = |op: &str| {
        metrics.value(
            "istio_csr_bundle_writes_total",
            &[("cluster", "Kubernetes"), ("op", op)],
        )
    };
    (elapsed, writes("create"), writes("update"))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run with --ignored --nocapture (scripts/bench.sh kube)"]
async fn trust_bundle_fill_rotation_and_resync_of_2000_namespaces() {
    use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
    install_crypto_provider();
    let cluster = shared().await;
    cluster.namespace("bundle-bench").await;
    let created = Instant::now();
    futures_util::stream::iter(0..BUNDLE_NAMESPACES + UNSELECTED_NAMESPACES)
        .map(|i| async move {
            let selected = if i < BUNDLE_NAMESPACES { "yes" } else { "no" };
            let ns: k8s_openapi::api::core::v1::Namespace =
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("bb-{i}"), "labels": {"bundle-bench": selected}}
                }))
                .unwrap();
            ::kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(cluster.client().await)
                .create(&Default::default(), &ns)
                .await
                .unwrap();
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    eprintln!(
        "created {} namespaces in {:?}",
        BUNDLE_NAMESPACES + UNSELECTED_NAMESPACES,
        created.elapsed()
    );
    let before_agent = resident_mib();

    let dir = tempfile::tempdir().unwrap();
    let root = TestCa::root("bundle bench root", KeyAlg::EcdsaP256);
    println!(
        "\n| {BUNDLE_NAMESPACES} of {} namespaces, --max-concurrent-reconciles 8 | time s | creates | updates | GETs | agent RSS MiB |",
        BUNDLE_NAMESPACES + UNSELECTED_NAMESPACES
    );
    println!("|---|---|---|---|---|---|");
    let report = |what: &str, (elapsed, creates, updates): (Duration, f64, f64), gets: f64| {
        println!(
            "| {what} | {:.2} | {creates} | {updates} | {gets} | {:.1} |",
            elapsed.as_secs_f64(),
            resident_mib() - before_agent
        );
    };
    let gets = |metrics: &openmetrics::Exposition| {
        calls(metrics, "get", "configmaps", "200") + calls(metrics, "get", "configmaps", "404")
    };

    let first = bundle_server(dir.path(), &root).await;
    let fill = until_in_sync(first.admin_address).await;
    report(
        "first leader: every ConfigMap created",
        fill,
        gets(&api_calls(first.admin_address).await),
    );

    // A second pinned root: every ConfigMap is updated.
    let next = TestCa::root("bundle bench next root", KeyAlg::EcdsaP256);
    std::fs::write(
        dir.path().join("pinned.pem"),
        format!("{}{}", root.cert_pem(), next.cert_pem()),
    )
    .unwrap();
    let noticed = eventually(Duration::from_secs(30), || async {
        let (_, body) = http_get(&format!("http://{}/debug/bundle", first.admin_address)).await;
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["roots"]["certificates"]
            .as_array()
            .is_some_and(|c| c.len() == 2)
    })
    .await;
    assert!(noticed, "the new root was not picked up");
    let (elapsed, creates, updates) = until_in_sync(first.admin_address).await;
    report(
        "root rotation: every ConfigMap updated",
        (elapsed, creates - fill.1, updates - fill.2),
        gets(&api_calls(first.admin_address).await),
    );
    first.shutdown();
    first.wait().await.unwrap();

    // A new leader over correct ConfigMaps: a full pass from its caches, no write at all.
    let second = bundle_server(dir.path(), &root).await;
    let resync = until_in_sync(second.admin_address).await;
    report(
        "new leader: full resync, all correct",
        resync,
        gets(&api_calls(second.admin_address).await),
    );
    assert_eq!((resync.1, resync.2), (0.0, 0.0), "a correct resync wrote");

    // The API server's floor for the fill: as many ConfigMap creates, 8 at a time (the
    // reconciler's concurrency), sent directly by one client.
    let direct = cluster.client().await;
    let pem = root.cert_pem();
    let started = Instant::now();
    futures_util::stream::iter(0..BUNDLE_NAMESPACES)
        .map(|i| {
            let (direct, pem) = (direct.clone(), pem.clone());
            async move {
                let cm: k8s_openapi::api::core::v1::ConfigMap =
                    serde_json::from_value(serde_json::json!({
                        "metadata": {"name": "bundle-floor"},
                        "data": {"root-cert.pem": pem},
                    }))
                    .unwrap();
                ::kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
                    direct,
                    &format!("bb-{i}"),
                )
                .create(&Default::default(), &cm)
                .await
                .unwrap();
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    println!(
        "| API server floor: {BUNDLE_NAMESPACES} ConfigMap creates sent directly, 8 at a time | {:.2} | {BUNDLE_NAMESPACES} | 0 | 0 | - |",
        started.elapsed().as_secs_f64()
    );
}

/// The ambient restart: pods (one service account each, as ztunnel asks once per identity)
/// on the restarted ztunnel's node, spread over namespaces, among as many on other nodes.
const AMBIENT_PODS: usize = 1000;
const AMBIENT_NAMESPACES: usize = 4;
const AMBIENT_OTHER_NODES: usize = 9;
/// ztunnel's connections to the CA: 8 x 128 streams carry all 1,000 calls at once.
const AMBIENT_CONNECTIONS: usize = 8;

/// Requests with `verb` on `resource`, whatever the answer.
fn all_codes(metrics: &openmetrics::Exposition, verb: &str, resource: &str) -> f64 {
    metrics.sum(
        "istio_csr_kube_api_requests_total",
        &[("verb", verb), ("resource", resource)],
    )
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run with --ignored --nocapture (scripts/bench.sh kube)"]
async fn ambient_restart_one_ztunnel_asks_for_1000_pods_of_its_node() {
    let cluster = shared().await;
    let node = "ambient-node-0";
    let namespaces: Vec<String> = (0..AMBIENT_NAMESPACES)
        .map(|i| format!("ambient-{i}"))
        .collect();
    for namespace in &namespaces {
        cluster.namespace(namespace).await;
    }
    // (namespace, service account, node): the restarted node's pods first.
    let pods: Vec<(String, String, String)> = (0..2 * AMBIENT_PODS)
        .map(|i| {
            let namespace = namespaces[i % AMBIENT_NAMESPACES].clone();
            let node = if i < AMBIENT_PODS {
                node.to_owned()
            } else {
                format!("ambient-node-{}", 1 + i % AMBIENT_OTHER_NODES)
            };
            (namespace, format!("sa-{i}"), node)
        })
        .collect();
    let prepared = Instant::now();
    futures_util::stream::iter(pods.iter())
        .map(|(namespace, sa, node)| async move {
            cluster.service_account(namespace, sa).await;
            cluster.pod(namespace, &format!("{sa}-1"), sa, node).await;
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    eprintln!("prepared {} pods in {:?}", pods.len(), prepared.elapsed());
    // All 1,000 calls come from one address: the per-source bound (256 by default) would turn
    // most of them into ResourceExhausted and retries, and this measures the node check.
    let (signer, ztunnel) = ztunnel_on(
        cluster,
        "ambient-system",
        node,
        &["--max-inflight-per-source", "0", "--log-level", "warn"],
    )
    .await;
    let identities: Vec<String> = pods[..AMBIENT_PODS]
        .iter()
        .map(|(namespace, sa, _)| format!("spiffe://cluster.local/ns/{namespace}/sa/{sa}"))
        .collect();
    signer.until_cache_warm(&ztunnel, &identities[0]).await;
    let mut clients = Vec::new();
    for _ in 0..AMBIENT_CONNECTIONS {
        clients.push(signer.target().connect().await.unwrap());
    }
    // Keys and CSRs are made first: ztunnel has them before it asks.
    let requests: Vec<_> = identities
        .iter()
        .map(|identity| (identity.clone(), signer.impersonation(&ztunnel, identity)))
        .collect();

    let admin = signer.running.admin_address;
    let before = api_calls(admin).await;
    let started = Instant::now();
    let answers = futures_util::future::join_all(requests.into_iter().enumerate().map(
        |(i, (identity, request))| {
            let mut client = clients[i % clients.len()].clone();
            async move {
                let t = Instant::now();
                let answer = client.create_certificate(request).await;
                let ok =
                    answer.is_ok_and(|a| leaf_identity(&a.into_inner().cert_chain).0 == [identity]);
                (t.elapsed(), ok)
            }
        },
    ))
    .await;
    let wall = started.elapsed();
    let after = api_calls(admin).await;
    let failures = answers.iter().filter(|(_, ok)| !ok).count();
    let mut latencies: Vec<Duration> = answers.iter().map(|(t, _)| *t).collect();
    latencies.sort();
    let delta = |verb: &str, resource: &str| {
        all_codes(&after, verb, resource) - all_codes(&before, verb, resource)
    };

    println!(
        "\nAmbient restart: one ztunnel asks for {AMBIENT_PODS} pods of its node at once ({} \
         namespaces, one service account per pod, {} pods in the cluster), pod cache warm, \
         built-in CA.\n",
        AMBIENT_NAMESPACES,
        pods.len() + 1
    );
    println!(
        "| calls | failures | p50 ms | p99 ms | max ms | wall s | pod GETs | pod LISTs | pod watches | TokenReviews |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {failures} | {} | {} | {} | {:.2} | {} | {} | {} | {} |",
        latencies.len(),
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap()),
        wall.as_secs_f64(),
        delta("get", "pods"),
        delta("list", "pods"),
        delta("watch", "pods"),
        delta("create", "tokenreviews"),
    );
    assert_eq!(failures, 0, "every impersonation must succeed");

    // The floor of the path without a cache: the same 1,000 checks' reads (a GET of the
    // ztunnel's pod, a LIST of its node's pods in the identity's namespace) sent straight to
    // this API server, as concurrently, by one client.
    let direct = cluster.client().await;
    let started = Instant::now();
    let reads =
        futures_util::future::join_all(pods[..AMBIENT_PODS].iter().map(|(namespace, _, node)| {
            let direct = direct.clone();
            async move {
                let t = Instant::now();
                let own: ::kube::Api<k8s_openapi::api::core::v1::Pod> =
                    ::kube::Api::namespaced(direct.clone(), "ambient-system");
                own.get("ztunnel-1").await.unwrap();
                let on_node: ::kube::Api<k8s_openapi::api::core::v1::Pod> =
                    ::kube::Api::namespaced(direct, namespace);
                let params =
                    ::kube::api::ListParams::default().fields(&format!("spec.nodeName={node}"));
                on_node.list(&params).await.unwrap();
                t.elapsed()
            }
        }))
        .await;
    let floor_wall = started.elapsed();
    let mut reads = reads;
    reads.sort();
    println!(
        "\nThe API server's floor for the reads a cacheless check makes (1 GET + 1 LIST per \
         call, {AMBIENT_PODS} at once, sent directly):\n"
    );
    println!("| reads | p50 ms | p99 ms | max ms | wall s |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {:.2} |",
        2 * reads.len(),
        ms(percentile(&reads, 0.50)),
        ms(percentile(&reads, 0.99)),
        ms(*reads.last().unwrap()),
        floor_wall.as_secs_f64()
    );
}

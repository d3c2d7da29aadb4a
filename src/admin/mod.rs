//! The admin HTTP API: `/livez`, `/readyz`, `/metrics` and `/debug/bundle`
//! (docs/admin-api.md describes each).

pub mod bundle;
pub mod health;
mod server;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::{Semaphore, watch};

pub use health::{Liveness, Readiness};
pub use server::{ServeLimits, serve};

use crate::cluster::ClusterRegistry;
use crate::leader::Leadership;
use crate::pki::chain::RootBundle;

/// The OpenMetrics text format, which prometheus-client writes.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Gauges computed from the current state while a scrape encodes them: never stale, and two
/// concurrent scrapes cannot interleave a clear and a refill of shared gauges.
pub struct StateGauges {
    serving_cert: Arc<crate::signer::tls::ServingCertResolver>,
    trust: Arc<OnceLock<Trust>>,
    clusters: Option<ClusterRegistry>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterStateLabels {
    cluster: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BundleNamespaceLabels {
    cluster: String,
    status: &'static str,
}

/// `Collector` asks for Debug; the state it reads has none worth printing.
impl std::fmt::Debug for StateGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateGauges").finish_non_exhaustive()
    }
}

impl StateGauges {
    pub fn register(
        registry: &mut Registry,
        serving_cert: Arc<crate::signer::tls::ServingCertResolver>,
        trust: Arc<OnceLock<Trust>>,
        clusters: Option<ClusterRegistry>,
    ) {
        registry.register_collector(Box::new(Self {
            serving_cert,
            trust,
            clusters,
        }));
    }
}

impl Collector for StateGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let seconds = Unit::Seconds;
        ConstGauge::new(self.serving_cert.not_after_unix()).encode(encoder.encode_descriptor(
            "serving_certificate_expiry_timestamp",
            "When this replica's gRPC serving certificate expires, as unix time.",
            Some(&seconds),
            MetricType::Gauge,
        )?)?;
        let root_expiry = self
            .trust
            .get()
            .map_or(0, |trust| bundle::earliest_expiry(&trust.roots.borrow()));
        ConstGauge::new(root_expiry).encode(encoder.encode_descriptor(
            "root_certificate_expiry_timestamp",
            "When the first of the trusted root certificates expires, as unix time.",
            Some(&seconds),
            MetricType::Gauge,
        )?)?;
        // Clusters that left are simply not reported any more.
        let reports = self
            .clusters
            .as_ref()
            .map(ClusterRegistry::reports)
            .unwrap_or_default();
        // A family with nothing to report is left out, as the registry leaves out an empty one.
        if reports.is_empty() {
            return Ok(());
        }
        let mut states = encoder.encode_descriptor(
            "cluster_state",
            "1 for each cluster's current state (connecting, connected, syncing, synced, error), 0 for the others.",
            None,
            MetricType::Gauge,
        )?;
        for report in &reports {
            for state in crate::cluster::ClusterState::ALL {
                let labels = ClusterStateLabels {
                    cluster: report.id.clone(),
                    state: state.label(),
                };
                ConstGauge::new(i64::from(state == report.state))
                    .encode(states.encode_family(&labels)?)?;
            }
        }
        if reports.iter().all(|r| r.bundle.is_none()) {
            return Ok(());
        }
        let mut namespaces = encoder.encode_descriptor(
            "bundle_namespaces",
            "Namespaces of each cluster by trust-bundle status (selected, in_sync, pending, error); leader only.",
            None,
            MetricType::Gauge,
        )?;
        for report in &reports {
            let Some(counts) = &report.bundle else {
                continue;
            };
            for (status, value) in [
                ("selected", counts.namespaces),
                ("in_sync", counts.in_sync),
                ("pending", counts.pending),
                ("error", counts.errors),
            ] {
                let labels = BundleNamespaceLabels {
                    cluster: report.id.clone(),
                    status,
                };
                ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
                    .encode(namespaces.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

pub fn register_build_info(registry: &mut Registry) {
    registry.register(
        "build",
        "The running istio-csr-rs version.",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
}

/// Everything the admin endpoints read.
pub struct AdminState {
    pub readiness: Arc<Readiness>,
    pub liveness: Arc<Liveness>,
    /// Its `StateGauges` read the trust and clusters below.
    pub registry: Registry,
    /// Set once the roots are known: at start, or after the issuer's first answer when they
    /// are trusted on first use.
    pub trust: Arc<OnceLock<Trust>>,
    /// The clusters whose bundles are kept (Kubernetes only).
    pub clusters: Option<ClusterRegistry>,
    /// The leader election (Kubernetes only).
    pub leadership: Option<watch::Receiver<Leadership>>,
    /// Tenant signers, when configured.
    pub signers: Option<Signers>,
}

/// The tenant signer table in force and how its last reload went.
pub struct Signers {
    pub backend: &'static str,
    pub table: watch::Receiver<Arc<crate::signer::tenants::TenantTable>>,
    pub status: Arc<crate::signer::tenants::load::ReloadStatus>,
}

/// The roots in force and where they come from.
pub struct Trust {
    pub roots: watch::Receiver<Arc<RootBundle>>,
    /// `file:<path>`, `local-ca:<dir>` or `issuer-tofu:<issuer>`, for `/debug/bundle`.
    pub source: String,
}

/// Scrapes encoded at once; one more gets 503 at once. Prometheus scrapes one at a time.
const MAX_CONCURRENT_SCRAPES: usize = 2;
/// `/debug/*` answers at once, for a person or the `status` command.
const MAX_CONCURRENT_DEBUG: usize = 1;

/// Who may read `/debug/*`: they name tenants, clusters, errors and the leader's pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugAccess {
    /// Loopback callers only (`kubectl port-forward` and `kubectl exec` arrive there).
    Loopback,
    /// Any caller (`--admin-remote-debug`).
    Anyone,
}

/// The admin routes. The probes answer from memory with no bound of their own: what could
/// slow them (scrapes, debug dumps) is bounded separately and answers 503 when busy.
pub fn router(state: Arc<AdminState>, debug_access: DebugAccess) -> Router {
    let scrapes = Arc::new(Semaphore::new(MAX_CONCURRENT_SCRAPES));
    let dumps = Arc::new(Semaphore::new(MAX_CONCURRENT_DEBUG));
    let metrics_routes = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(scrapes, at_most));
    let debug_routes = Router::new()
        .route("/debug/bundle", get(debug_bundle))
        .route_layer(middleware::from_fn_with_state(dumps, at_most))
        .route_layer(middleware::from_fn_with_state(debug_access, debug_gate));
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .merge(metrics_routes)
        .merge(debug_routes)
        .with_state(state)
}

/// 503 unless one of the route's seats is free.
async fn at_most(
    State(seats): State<Arc<Semaphore>>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    match seats.try_acquire() {
        Ok(_seat) => next.run(request).await,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy; retry\n").into_response(),
    }
}

/// 403 for `/debug/*` from a non-loopback peer unless [`DebugAccess::Anyone`]. A request
/// with no peer address (none was recorded) counts as remote.
async fn debug_gate(
    State(access): State<DebugAccess>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let loopback = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|ConnectInfo(peer)| crate::per_source::canonical(peer.ip()).is_loopback());
    if loopback || access == DebugAccess::Anyone {
        return next.run(request).await;
    }
    (
        StatusCode::FORBIDDEN,
        "/debug/* answers on loopback only (kubectl port-forward), unless --admin-remote-debug\n",
    )
        .into_response()
}

async fn livez(State(state): State<Arc<AdminState>>) -> (StatusCode, String) {
    let dead = state.liveness.dead_tasks();
    if dead.is_empty() {
        return (StatusCode::OK, "ok\n".into());
    }
    let mut body: String = dead
        .iter()
        .map(|(name, reason)| format!("[-] task {name}: {reason}\n"))
        .collect();
    body.push_str("not alive\n");
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

async fn readyz(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<VerboseQuery>,
) -> (StatusCode, String) {
    let checks = state.readiness.checks();
    let ready = checks.iter().all(|(_, ok)| *ok);
    let mut body = String::new();
    if query.verbose.is_some() {
        for (name, ok) in &checks {
            body.push_str(&format!("[{}] {name}\n", if *ok { "+" } else { "-" }));
        }
    }
    body.push_str(if ready { "ok\n" } else { "not ready\n" });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn debug_bundle(State(state): State<Arc<AdminState>>) -> Json<bundle::BundleStatus> {
    let serving = state.readiness.serving_cert.not_after_unix();
    Json(bundle::BundleStatus {
        roots: match state.trust.get() {
            Some(trust) => bundle::roots_status(&trust.source, &trust.roots.borrow()),
            None => bundle::RootsStatus {
                source: "pending".into(),
                certificates: Vec::new(),
            },
        },
        issuer: bundle::IssuerStatus {
            kind: state.readiness.issuer.label(),
            ready: state.readiness.issuer.ready(),
        },
        serving_certificate: (serving > 0).then(|| bundle::ServingStatus {
            not_after: bundle::rfc3339(serving),
            not_after_unix: serving,
        }),
        leader: state
            .leadership
            .as_ref()
            .map(|l| bundle::leader_status(&l.borrow())),
        clusters: state
            .clusters
            .as_ref()
            .map(|c| c.reports())
            .unwrap_or_default(),
        signers: state.signers.as_ref().map(|s| {
            bundle::signers_status(
                s.backend,
                &s.table.borrow(),
                s.status.last_error.load_full().map(|e| (*e).clone()),
            )
        }),
    })
}

/// `?verbose` carries no value.
#[derive(serde::Deserialize)]
struct VerboseQuery {
    verbose: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use async_trait::async_trait;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::pki::testing::{KeyAlg, TestCa};
    use crate::signer::issuer::{IssueError, IssueRequest, Issued, Issuer};
    use crate::signer::tls::ServingCertResolver;

    struct FakeIssuer {
        ready: bool,
    }

    #[async_trait]
    impl Issuer for FakeIssuer {
        fn label(&self) -> &'static str {
            "fake"
        }
        fn ready(&self) -> bool {
            self.ready
        }
        async fn issue(&self, _: IssueRequest<'_>) -> Result<Issued, IssueError> {
            Err(IssueError::NotReady("fake".into()))
        }
    }

    struct Fixture {
        state: Arc<AdminState>,
        root: TestCa,
    }

    fn fixture(issuer_ready: bool) -> Fixture {
        let root = TestCa::root("admin root", KeyAlg::EcdsaP256);
        let roots = RootBundle::from_certs(vec![root.cert.clone()]).unwrap();
        // The receiver keeps the last value after the sender is gone.
        let (_, rx) = watch::channel(Arc::new(roots));
        let mut registry = Registry::with_prefix("istio_csr");
        register_build_info(&mut registry);
        let resolver = Arc::new(ServingCertResolver::default());
        let trust = Arc::new(OnceLock::from(Trust {
            roots: rx,
            source: "file:/etc/roots.pem".into(),
        }));
        StateGauges::register(&mut registry, resolver.clone(), trust.clone(), None);
        let readiness = Arc::new(Readiness::new(
            resolver,
            Arc::new(FakeIssuer {
                ready: issuer_ready,
            }),
        ));
        let state = Arc::new(AdminState {
            readiness,
            liveness: Arc::new(Liveness::default()),
            registry,
            trust,
            clusters: None,
            leadership: None,
            signers: None,
        });
        Fixture { state, root }
    }

    impl Fixture {
        fn make_ready(&self) {
            let (leaf, key) = self.root.leaf("spiffe://td/ns/a/sa/b");
            self.state
                .readiness
                .serving_cert
                .install(vec![leaf], &key)
                .unwrap();
            self.state
                .readiness
                .grpc_listening
                .store(true, Ordering::Release);
        }

        async fn get(&self, uri: &str) -> (StatusCode, String, Option<String>) {
            self.get_from(uri, [127, 0, 0, 1], DebugAccess::Loopback)
                .await
        }

        async fn get_from(
            &self,
            uri: &str,
            peer: [u8; 4],
            access: DebugAccess,
        ) -> (StatusCode, String, Option<String>) {
            let mut request = Request::get(uri).body(Body::empty()).unwrap();
            request
                .extensions_mut()
                .insert(ConnectInfo(SocketAddr::from((peer, 40000))));
            let response = router(self.state.clone(), access)
                .oneshot(request)
                .await
                .unwrap();
            let status = response.status();
            let content_type = response
                .headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_owned());
            let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            (
                status,
                String::from_utf8(body.to_vec()).unwrap(),
                content_type,
            )
        }
    }

    #[tokio::test]
    async fn debug_answers_loopback_only_unless_opened_and_probes_answer_anyone() {
        let fixture = fixture(true);
        fixture.make_ready();
        let remote = [10, 1, 2, 3];
        let (status, body, _) = fixture
            .get_from("/debug/bundle", remote, DebugAccess::Loopback)
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("--admin-remote-debug"), "{body}");
        let (status, _, _) = fixture
            .get_from("/debug/bundle", remote, DebugAccess::Anyone)
            .await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = fixture.get("/debug/bundle").await;
        assert_eq!(status, StatusCode::OK);
        for probe in ["/livez", "/readyz", "/metrics"] {
            let (status, _, _) = fixture.get_from(probe, remote, DebugAccess::Loopback).await;
            assert_eq!(status, StatusCode::OK, "{probe}");
        }
    }

    #[tokio::test]
    async fn readyz_is_false_before_the_serving_certificate_exists() {
        let fixture = fixture(true);
        fixture
            .state
            .readiness
            .grpc_listening
            .store(true, Ordering::Release);
        let (status, body, _) = fixture.get("/readyz?verbose").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("[-] serving-certificate"), "{body}");
        fixture.make_ready();
        let (status, body, _) = fixture.get("/readyz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
    }

    #[tokio::test]
    async fn readyz_is_false_without_a_usable_issuer() {
        let fixture = fixture(false);
        fixture.make_ready();
        let (status, body, _) = fixture.get("/readyz?verbose").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("[-] issuer"), "{body}");
    }

    #[tokio::test]
    async fn readyz_turns_false_when_shutdown_starts() {
        let fixture = fixture(true);
        fixture.make_ready();
        assert_eq!(fixture.get("/readyz").await.0, StatusCode::OK);
        fixture
            .state
            .readiness
            .shutting_down
            .store(true, Ordering::Release);
        let (status, body, _) = fixture.get("/readyz?verbose").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("[-] not-shutting-down"), "{body}");
    }

    #[tokio::test]
    async fn livez_fails_when_a_critical_task_dies() {
        let fixture = fixture(true);
        assert_eq!(fixture.get("/livez").await.0, StatusCode::OK);
        let handle = fixture.state.liveness.spawn("token-reload", async {
            Err(anyhow::anyhow!("watch failed"))
        });
        let _ = handle.await;
        let (status, body, _) = fixture.get("/livez").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("token-reload: watch failed"), "{body}");
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_text_with_the_expiry_gauges() {
        let fixture = fixture(true);
        fixture.make_ready();
        let (status, body, content_type) = fixture.get("/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            content_type
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        let root_expiry = fixture.root.not_after.unix_timestamp();
        assert!(
            body.contains(&format!(
                "istio_csr_root_certificate_expiry_timestamp_seconds {root_expiry}"
            )),
            "{body}"
        );
        let serving = fixture.state.readiness.serving_cert.not_after_unix();
        assert!(body.contains(&format!(
            "istio_csr_serving_certificate_expiry_timestamp_seconds {serving}"
        )));
        assert!(body.contains(&format!(
            "istio_csr_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[tokio::test]
    async fn debug_bundle_describes_the_pinned_roots() {
        let fixture = fixture(true);
        let (status, body, _) = fixture.get("/debug/bundle").await;
        assert_eq!(status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let root = &json["roots"]["certificates"][0];
        let want = hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            &fixture.root.cert,
        ));
        assert_eq!(root["sha256"], want);
        assert_eq!(
            root["not_after_unix"],
            fixture.root.not_after.unix_timestamp()
        );
        assert_eq!(json["roots"]["source"], "file:/etc/roots.pem");
        assert_eq!(json["issuer"]["kind"], "fake");
        assert!(json["serving_certificate"].is_null());
        assert!(json["leader"].is_null());
        assert_eq!(json["clusters"], serde_json::json!([]));
    }
}

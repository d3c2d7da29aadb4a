//! Wiring: resolve the configuration, build the parts, run them, shut down gracefully.

mod plan;
mod roots;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::admin::{self, AdminState, Liveness, Readiness, StateGauges, Trust};
use crate::bundle::{BundleMetrics, reconciler};
use crate::cluster::client::ClientFactory;
use crate::cluster::remote::{ClusterWork, RemoteSecrets};
use crate::cluster::{self, ClusterRegistry};
use crate::config::{LogFormat, ServeArgs};
use crate::istiod::{IstiodCertMetrics, IstiodCerts};
use crate::leader::{self, Elector, LeaderMetrics, Leadership};
use crate::pki::chain::RootBundle;
use crate::retry;
use crate::signer::admission::SeatLimits;
use crate::signer::authn::Authenticator;
use crate::signer::authn::client_cert::{ClientCertAuthenticator, ServiceAccounts};
use crate::signer::authn::node::KubeNodeAuthorizer;
use crate::signer::authn::pod_cache::PodCache;
use crate::signer::authn::signing_keys::SigningKeys;
use crate::signer::authn::static_tokens::StaticTokens;
use crate::signer::authn::token_review::{TokenReviewMetrics, TokenReviewer};
use crate::signer::issuance::{Issuance, IssuanceMetrics};
use crate::signer::issuer::Issuer;
use crate::signer::issuer::cert_manager::CertManagerIssuer;
use crate::signer::issuer::kube_csr::KubeCsrIssuer;
use crate::signer::issuer::local_ca::LocalCa;
use crate::signer::metrics::SignerMetrics;
use crate::signer::server::{self, GrpcOptions, GrpcServer};
use crate::signer::service::{CaService, Settings};
use crate::signer::serving::{ServingCerts, ServingNames};
use crate::signer::tenants::{self, TenantTable};
use crate::signer::tls::{MeshClientVerifier, ServingCertResolver};
use crate::standalone::{self, DataDir, Wants};
use plan::{Plan, SignerPlan};
use prometheus_client::registry::Registry;

// The gRPC edge's bounds (message, header and stream sizes, keepalive, request-read
// deadline, idle connections) live in `signer::edge::EdgeLimits::DEFAULT`; the admin API's in
// `admin::ServeLimits::DEFAULT`.

pub fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).context("--log-level")?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("logging: {e}"))
}

/// Replaces the issuer with one that wraps it.
pub type IssuerWrapper = Box<dyn FnOnce(Arc<dyn Issuer>) -> Arc<dyn Issuer> + Send>;

/// Test seams: lets tests wrap the real issuer (e.g. to hold requests in flight).
#[derive(Default)]
pub struct Hooks {
    pub wrap_issuer: Option<IssuerWrapper>,
}

/// A server whose admin API is up, while the rest starts in the background: waiting for an
/// issuer or a first certificate shows as "not ready", never as a crash loop.
pub struct Launched {
    pub admin_address: SocketAddr,
    stop: CancellationToken,
    serving: oneshot::Receiver<SocketAddr>,
    done: JoinHandle<anyhow::Result<()>>,
}

impl Launched {
    /// Stops the start-up (or, once serving, starts a graceful shutdown).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Waits until the gRPC port serves. `None`: stopped before that; an error: start-up failed.
    pub async fn serving(self) -> anyhow::Result<Option<Running>> {
        match self.serving.await {
            Ok(grpc_address) => Ok(Some(Running {
                grpc_address,
                admin_address: self.admin_address,
                stop: self.stop,
                done: self.done,
            })),
            Err(_) => {
                self.done.await??;
                Ok(None)
            }
        }
    }
}

/// A serving server.
pub struct Running {
    pub grpc_address: SocketAddr,
    pub admin_address: SocketAddr,
    stop: CancellationToken,
    done: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Starts a graceful shutdown, as SIGTERM does.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Waits until the server has stopped: `Ok` after a clean shutdown.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.done.await?
    }
}

/// `istio-csr-rs serve`: runs until SIGTERM or SIGINT, then drains and exits.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log.log_format, &args.log.log_level)?;
    let standalone = args
        .standalone
        .standalone
        .then(|| DataDir::new(&args.standalone.data_dir));
    let own_tokens = args.server.token_auth_file.is_none();
    // Handlers go in before anything is printed or bound: a SIGTERM that arrives while
    // starting must stop cleanly, not kill the process with the default action.
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let launched = launch(args, Hooks::default()).await?;
    let stop = launched.stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        }
        stop.cancel();
    });
    let Some(running) = launched.serving().await? else {
        tracing::info!("stopped before serving");
        return Ok(());
    };
    if let Some(data) = &standalone {
        standalone::print_try_it(data, running.grpc_address, own_tokens);
    }
    running.wait().await
}

/// Builds every part and returns once the gRPC port serves.
pub async fn start(args: ServeArgs, hooks: Hooks) -> anyhow::Result<Running> {
    launch(args, hooks)
        .await?
        .serving()
        .await?
        .context("stopped before serving")
}

/// Checks the configuration, builds what needs no waiting, binds the admin API, and leaves
/// the rest (an issuer, the roots, the first serving certificate, the gRPC port) to a
/// background task. Configuration errors fail here, at once.
pub async fn launch(args: ServeArgs, hooks: Hooks) -> anyhow::Result<Launched> {
    let plan = Plan::resolve(&args)?;
    plan.log(&args);
    if let Some(data) = &plan.standalone {
        let wants = Wants {
            ca: args.issuance.local_ca_dir.is_none(),
            tokens: args.server.token_auth_file.is_none(),
        };
        data.bootstrap(wants)
            .with_context(|| format!("preparing {}", data.root.display()))?;
    }
    let liveness = Arc::new(Liveness::default());
    let mut tasks = Vec::new();
    let mut registry = Registry::with_prefix("istio_csr");
    admin::register_build_info(&mut registry);
    let signer_metrics = SignerMetrics::register(&mut registry);
    let clients = ClientFactory::new(
        &mut registry,
        args.server.kube_api_qps,
        args.server.kube_api_burst,
    );

    // Trust roots: the pinned file when given, else the built-in CA's own roots.
    let pinned = match &args.issuance.root_ca_file {
        Some(path) => {
            let (rx, task) = roots::watch_root_file(path.clone())?;
            tasks.push(liveness.spawn("root-file", task));
            Some((rx, format!("file:{}", path.display())))
        }
        None => None,
    };
    // TokenReviews get a client (and a rate-limit bucket) of their own.
    let (kube, review_client) = match &plan.standalone {
        Some(_) => (None, None),
        None => {
            let config = cluster::client::local_config(args.server.kubeconfig.as_deref()).await;
            match config.and_then(|config| clients.build_with_review_client(config)) {
                Ok((client, reviews)) => (Some(client), Some(reviews)),
                Err(error) if args.server.kubeconfig.is_some() => {
                    return Err(error.context("--kubeconfig"));
                }
                Err(error) => {
                    tracing::info!(error = %format!("{error:#}"), "no Kubernetes configuration found");
                    (None, None)
                }
            }
        }
    };
    let signer = build_signer(&plan, &args, kube.as_ref(), pinned, &liveness, &mut tasks)?;
    let tenants = build_tenants(&plan, &args, &mut registry, &liveness, &mut tasks)?;
    let clusters = ClusterRegistry::with_aliases(
        args.server.cluster_id.clone(),
        args.server.cluster_id_aliases.clone(),
    );
    let stop = CancellationToken::new();
    // Every replica competes for the Lease; only the leader writes trust bundles.
    let leader = match &kube {
        Some(client) => {
            let (elector, leadership) = Elector::new(
                client.clone(),
                &args.bundle.leader_election_namespace,
                leader::identity(),
                plan.leader_timing.clone(),
                LeaderMetrics::register(&mut registry),
            );
            Some(LeaderTask {
                leadership,
                elector: Some(elector),
                task: None,
            })
        }
        None => None,
    };
    let bundle_metrics = BundleMetrics::register(&mut registry);
    let issuance_metrics = IssuanceMetrics::register(&mut registry);
    let istiod_metrics = plan
        .istiod_cert
        .as_ref()
        .map(|_| IstiodCertMetrics::register(&mut registry));
    if plan.istiod_cert.is_some() && kube.is_none() {
        bail!(
            "--istiod-cert-enabled needs a Kubernetes configuration (--kubeconfig, KUBECONFIG or \
             in-cluster) to write Secret istiod-tls"
        );
    }
    let mut issuer = signer.issuer.clone();
    if let Some(wrap) = hooks.wrap_issuer {
        issuer = wrap(issuer);
    }

    let authenticators = build_authenticators(
        &plan,
        &args,
        review_client.as_ref(),
        &clusters.local_status(),
        &mut registry,
        &liveness,
        &mut tasks,
    )?;

    let resolver = Arc::new(ServingCertResolver::default());
    let readiness = Arc::new(Readiness::new(resolver.clone(), issuer.clone()));
    let admin_listener = TcpListener::bind(plan.admin_address)
        .await
        .with_context(|| format!("binding the admin address {}", plan.admin_address))?;
    let admin_address = admin_listener.local_addr()?;
    tracing::info!(admin = %admin_address, "admin API listening");
    let trust = Arc::new(OnceLock::new());
    let reported_clusters = kube.as_ref().map(|_| clusters.clone());
    StateGauges::register(
        &mut registry,
        resolver.clone(),
        trust.clone(),
        reported_clusters.clone(),
    );
    let admin_state = Arc::new(AdminState {
        readiness: readiness.clone(),
        liveness: liveness.clone(),
        registry,
        trust,
        clusters: reported_clusters,
        leadership: leader.as_ref().map(|l| l.leadership.clone()),
        signers: tenants.as_ref().map(|(table, status)| admin::Signers {
            backend: signer.issuer.label(),
            table: table.clone(),
            status: status.clone(),
        }),
    });
    let debug_access = if args.admin.admin_remote_debug {
        admin::DebugAccess::Anyone
    } else {
        admin::DebugAccess::Loopback
    };
    let admin_router = admin::router(admin_state.clone(), debug_access);
    // The admin API outlives the gRPC drain: probes must see "not ready", not a closed port.
    let admin_shutdown = CancellationToken::new();
    let admin_stop = admin_shutdown.clone();
    tasks.push(liveness.spawn("admin", async move {
        // Bounded: a connection cap, a header-read timeout and a request timeout.
        admin::serve(
            admin_listener,
            admin_router,
            admin::ServeLimits::DEFAULT,
            admin_shutdown.cancelled_owned(),
        )
        .await?;
        Ok(())
    }));

    let (serving_tx, serving) = oneshot::channel();
    let starting = Starting {
        args,
        plan,
        signer: SignerSide {
            parts: signer,
            issuer,
            authenticators,
            metrics: signer_metrics,
            issuance_metrics,
            resolver,
            tenants: tenants.map(|(table, _)| table),
        },
        cluster: ClusterSide {
            kube,
            review_kube: review_client,
            clients,
            clusters,
            leader,
            bundle_metrics,
            istiod_metrics,
        },
        sup: Supervision {
            liveness,
            readiness,
            admin_state,
            tasks,
        },
    };
    let stop_requested = stop.clone();
    let done = tokio::spawn(async move {
        let result = starting.run(stop_requested, serving_tx).await;
        admin_stop.cancel();
        result
    });
    Ok(Launched {
        admin_address,
        stop,
        serving,
        done,
    })
}

/// The signer's parts that exist before anything is waited for.
struct SignerParts {
    issuer: Arc<dyn Issuer>,
    /// Set for `--signer cert-manager`: start-up waits for it to be usable.
    cert_manager: Option<Arc<CertManagerIssuer>>,
    /// `None`: trust the issuer's CA on first use.
    roots: Option<(watch::Receiver<Arc<RootBundle>>, String)>,
}

fn build_signer(
    plan: &Plan,
    args: &ServeArgs,
    kube: Option<&kube::Client>,
    pinned: Option<(watch::Receiver<Arc<RootBundle>>, String)>,
    liveness: &Arc<Liveness>,
    tasks: &mut Vec<AbortOnDropHandle<()>>,
) -> anyhow::Result<SignerParts> {
    match &plan.signer {
        SignerPlan::LocalCa(dir) => {
            let mut ca = LocalCa::load(dir, pinned.as_ref().map(|(rx, _)| rx.clone()))
                .with_context(|| format!("loading the CA in {}", dir.display()))?;
            let roots = match pinned {
                Some(pinned) => pinned,
                None => (ca.publish_roots(), format!("local-ca:{}", dir.display())),
            };
            let ca = Arc::new(ca);
            tasks.push(liveness.spawn("ca-reload", ca.clone().watch()?));
            Ok(SignerParts {
                issuer: ca,
                cert_manager: None,
                roots: Some(roots),
            })
        }
        SignerPlan::CertManager(settings) => {
            let client = kube.cloned().context(
                "--signer cert-manager needs a Kubernetes configuration (--kubeconfig, \
                 KUBECONFIG or in-cluster)",
            )?;
            let (issuer, watch) = CertManagerIssuer::new(client.clone(), settings.clone());
            tasks.push(liveness.spawn("certificate-request-watch", watch));
            if let Some(name) = &args.issuance.runtime_issuance_config_map_name {
                let namespace = args
                    .issuance
                    .runtime_issuance_config_map_namespace
                    .clone()
                    .unwrap_or_else(|| settings.namespace.clone());
                let follow = issuer
                    .clone()
                    .follow_runtime_config(client, &namespace, name);
                tasks.push(liveness.spawn("runtime-issuer", follow));
            }
            Ok(SignerParts {
                issuer: issuer.clone(),
                cert_manager: Some(issuer),
                roots: pinned,
            })
        }
        SignerPlan::KubeCsr(settings) => {
            let client = kube.cloned().context(
                "--signer kube-csr needs a Kubernetes configuration (--kubeconfig, KUBECONFIG \
                 or in-cluster)",
            )?;
            let (issuer, watch) = KubeCsrIssuer::new(client, settings.clone());
            tasks.push(liveness.spawn("certificate-signing-request-watch", watch));
            Ok(SignerParts {
                issuer,
                cert_manager: None,
                roots: pinned,
            })
        }
    }
}

/// Who may ask: the static token file (followed), TokenReview in the local cluster when
/// there is one. Client certificates join once the roots are known.
fn build_authenticators(
    plan: &Plan,
    args: &ServeArgs,
    review_client: Option<&kube::Client>,
    local: &Arc<cluster::ClusterStatus>,
    registry: &mut Registry,
    liveness: &Arc<Liveness>,
    tasks: &mut Vec<AbortOnDropHandle<()>>,
) -> anyhow::Result<Vec<Arc<dyn Authenticator>>> {
    let mut authenticators: Vec<Arc<dyn Authenticator>> = Vec::new();
    if let Some(path) = &plan.token_auth_file {
        let tokens = StaticTokens::load(path, &args.server.trust_domain)?;
        tasks.push(liveness.spawn("token-reload", tokens.clone().watch()?));
        authenticators.push(tokens);
    }
    match review_client {
        Some(client) => {
            // Fetched through the review client: authentication's budget, never the Lease's.
            let keys = SigningKeys::new(client.clone(), Some(local.clone()));
            tasks.push(AbortOnDropHandle::new(tokio::spawn(
                keys.clone()
                    .maintain()
                    .instrument(cluster::cluster_span(&local.id)),
            )));
            let reviewer = TokenReviewer::new(
                client.clone(),
                args.server.token_audiences.clone(),
                &args.server.trust_domain,
                args.server.token_review_cache_ttl,
                TokenReviewMetrics::register(registry),
            )
            .with_signing_keys(keys);
            authenticators.push(Arc::new(reviewer));
        }
        None if plan.standalone.is_none() => tracing::info!("TokenReview is off"),
        None => {}
    }
    if authenticators.is_empty() && !args.server.enable_client_cert_authenticator {
        bail!(
            "no way to authenticate callers: give a Kubernetes configuration (--kubeconfig, \
             KUBECONFIG or in-cluster) for TokenReview, --token-auth-file, or \
             --enable-client-cert-authenticator"
        );
    }
    Ok(authenticators)
}

type TenantParts = (
    watch::Receiver<Arc<TenantTable>>,
    Arc<tenants::load::ReloadStatus>,
);

/// Tenant signers, when `--signers-file` or `--mesh-config` is given: loaded now (a broken
/// table stops start-up) and followed.
fn build_tenants(
    plan: &Plan,
    args: &ServeArgs,
    registry: &mut Registry,
    liveness: &Arc<Liveness>,
    tasks: &mut Vec<AbortOnDropHandle<()>>,
) -> anyhow::Result<Option<TenantParts>> {
    if args.issuance.signers_file.is_none() && args.issuance.mesh_config.is_none() {
        return Ok(None);
    }
    let backend = match &plan.signer {
        SignerPlan::CertManager(_) => tenants::Backend::CertManager,
        SignerPlan::KubeCsr(_) => tenants::Backend::KubeCsr,
        SignerPlan::LocalCa(_) => bail!(
            "tenant signers (--signers-file, --mesh-config) need --signer cert-manager or \
             --signer kube-csr: the built-in CA is one CA"
        ),
    };
    let sources = tenants::load::Sources {
        signers_file: args.issuance.signers_file.clone(),
        mesh_config: args.issuance.mesh_config.clone(),
        backend,
        cert_signer_domain: args.issuance.cert_signer_domain.clone(),
    };
    let status = Arc::new(tenants::load::ReloadStatus::default());
    status.register(registry);
    let (table, follow) =
        tenants::load::follow(sources, status.clone()).context("tenant signers")?;
    tasks.push(liveness.spawn("signers-reload", follow));
    Ok(Some((table, status)))
}

/// The election and what it publishes. It starts only once this replica serves: one that
/// cannot do the leader's work must not hold the Lease.
struct LeaderTask {
    leadership: watch::Receiver<Leadership>,
    elector: Option<Elector>,
    task: Option<AbortOnDropHandle<()>>,
}

/// What signs: the issuer and its parts, who may ask, and the signer's metrics.
struct SignerSide {
    parts: SignerParts,
    /// `parts.issuer`, as the hooks may have wrapped it.
    issuer: Arc<dyn Issuer>,
    authenticators: Vec<Arc<dyn Authenticator>>,
    metrics: SignerMetrics,
    issuance_metrics: IssuanceMetrics,
    resolver: Arc<ServingCertResolver>,
    tenants: Option<watch::Receiver<Arc<TenantTable>>>,
}

/// What talks to Kubernetes: the clients, the clusters, the election and the leader's work's
/// metrics.
struct ClusterSide {
    kube: Option<kube::Client>,
    /// The local cluster's client for authentication (its own rate-limit bucket).
    review_kube: Option<kube::Client>,
    clients: ClientFactory,
    clusters: ClusterRegistry,
    leader: Option<LeaderTask>,
    bundle_metrics: BundleMetrics,
    istiod_metrics: Option<IstiodCertMetrics>,
}

/// What watches over the process: the tasks kept alive, their liveness, the readiness and the
/// admin API's state.
struct Supervision {
    liveness: Arc<Liveness>,
    readiness: Arc<Readiness>,
    admin_state: Arc<AdminState>,
    tasks: Vec<AbortOnDropHandle<()>>,
}

/// Start-up after `launch`: the built parts, waiting for what takes time.
struct Starting {
    args: ServeArgs,
    plan: Plan,
    signer: SignerSide,
    cluster: ClusterSide,
    sup: Supervision,
}

impl Starting {
    /// Finishes start-up (unless stopped first), reports the gRPC address, then serves until
    /// stopped.
    async fn run(
        mut self,
        stop: CancellationToken,
        serving: oneshot::Sender<SocketAddr>,
    ) -> anyhow::Result<()> {
        let started = tokio::select! {
            started = self.until_serving() => started?,
            _ = stop.cancelled() => return Ok(()),
        };
        let _ = serving.send(started.grpc.address);
        if let Some(leader) = &mut self.cluster.leader
            && let Some(elector) = leader.elector.take()
        {
            tracing::info!(identity = %leader.leadership.borrow().identity, namespace = %self.args.bundle.leader_election_namespace, "competing for the leader Lease");
            leader.task = Some(
                self.sup
                    .liveness
                    .spawn("leader-election", elector.run(stop.clone())),
            );
        }
        let result = run_until_stopped(
            stop,
            self.args.server.shutdown_delay,
            self.sup.tasks,
            self.sup.liveness,
            self.sup.readiness,
            started.grpc,
            self.args.server.shutdown_grace,
        )
        .await;
        // The election saw the same stop and releases the Lease; let it finish.
        if let Some(task) = self.cluster.leader.and_then(|l| l.task) {
            let bound = self.args.bundle.leader_election_renew_deadline;
            let _ = tokio::time::timeout(bound, task).await;
        }
        result
    }

    /// The local cluster's trust bundle and the remote clusters, once the roots are known.
    fn cluster_work(&self, roots: &watch::Receiver<Arc<RootBundle>>) -> Vec<AbortOnDropHandle<()>> {
        let (Some(client), Some(leader)) = (&self.cluster.kube, &self.cluster.leader) else {
            return Vec::new();
        };
        let work = ClusterWork {
            leadership: leader.leadership.clone(),
            roots: roots.clone(),
            bundle: reconciler::Settings {
                cluster: String::new(),
                selector: self.plan.namespace_selector.clone(),
                workers: self.args.bundle.max_concurrent_reconciles,
                metrics: self.cluster.bundle_metrics.clone(),
            },
        };
        let local = self.cluster.clusters.local_status();
        let local_work = self.sup.liveness.spawn(
            "bundle-local",
            work.clone()
                .run(
                    self.cluster.clusters.local_id().to_owned(),
                    client.clone(),
                    local.bundle.clone(),
                )
                .instrument(crate::cluster::cluster_span(
                    self.cluster.clusters.local_id(),
                )),
        );
        if !self.args.bundle.multicluster_enabled {
            tracing::info!("remote clusters are off (--multicluster-enabled=false)");
            return vec![local_work];
        }
        let remotes = RemoteSecrets {
            namespace: self.args.bundle.multicluster_secret_namespace.clone(),
            allow_insecure: self.args.bundle.allow_insecure_kubeconfig,
            registry: self.cluster.clusters.clone(),
            clients: self.cluster.clients.clone(),
            work,
            watch_pods: !self.args.server.ca_trusted_node_accounts.is_empty(),
        };
        let remote_work = self
            .sup
            .liveness
            .spawn("remote-clusters", remotes.run(client.clone()));
        vec![local_work, remote_work]
    }

    /// The CreateCertificate service: its bounds, who may ask, the node check of ztunnel's
    /// calls (a pod cache when trusted node accounts are set) and the tenant signers.
    fn ca_service(
        &self,
        issuance: Issuance,
        authenticators: Vec<Arc<dyn Authenticator>>,
    ) -> CaService {
        let service = CaService::new(
            Settings {
                max_lifetime: self.args.server.max_client_certificate_duration,
                trusted_node_accounts: self.args.server.ca_trusted_node_accounts.clone(),
                admission: SeatLimits {
                    total: self.args.server.max_inflight,
                    per_source: self.args.server.max_inflight_per_source,
                    queue_per_source: self.args.server.max_queued_per_source,
                    max_wait: self.args.server.max_queue_wait,
                },
                trust_domain: self.args.server.trust_domain.clone(),
            },
            self.signer.metrics.clone(),
            self.cluster.clusters.clone(),
            authenticators,
            issuance,
        );
        let service = match &self.cluster.kube {
            Some(client) => {
                let mut nodes = KubeNodeAuthorizer::new(client.clone());
                // Only ztunnel's calls read pods: without trusted node accounts, no watch.
                if !self.args.server.ca_trusted_node_accounts.is_empty() {
                    nodes = nodes.with_pod_cache(PodCache::start(
                        client.clone(),
                        self.cluster.clusters.local_id(),
                    ));
                }
                service.with_node_authorizer(Arc::new(nodes))
            }
            None => service,
        };
        match &self.signer.tenants {
            Some(tenants) => service.with_tenants(tenants.clone()),
            None => service,
        }
    }

    async fn until_serving(&mut self) -> anyhow::Result<Started> {
        let args = &self.args;
        if let Some(issuer) = &self.signer.parts.cert_manager {
            // The serving certificate needs the watch and an issuer (the runtime ConfigMap's,
            // when configured). Until then: not ready, and say so now and then.
            let warn_every = args.issuance.issuance_timeout;
            while tokio::time::timeout(warn_every, issuer.wait_ready())
                .await
                .is_err()
            {
                tracing::warn!(
                    "waiting for a usable issuer: the CertificateRequest watch has not synced, \
                     or the runtime issuance ConfigMap names no issuer"
                );
            }
        }
        let (roots, source) = match (
            self.signer.parts.roots.take(),
            &self.signer.parts.cert_manager,
        ) {
            (Some(known), _) => known,
            (None, Some(issuer)) => {
                let bundle = retry::retry_forever("trusting the issuer's CA on first use", || {
                    roots::roots_on_first_use(issuer.as_ref(), &self.plan.serving_names)
                })
                .await;
                let (tx, rx) = watch::channel(Arc::new(bundle));
                // Nothing ever changes these roots; the sender lives as long as the process.
                self.sup
                    .tasks
                    .push(self.sup.liveness.spawn("tofu-roots", async move {
                        tx.closed().await;
                        Ok(())
                    }));
                (rx, format!("issuer-tofu:{}", args.issuance.issuer_name))
            }
            (None, None) => bail!("no trust roots: give --root-ca-file"),
        };
        let _ = self.sup.admin_state.trust.set(Trust {
            roots: roots.clone(),
            source,
        });
        if let Some(data) = &self.plan.standalone {
            // Written before the port opens, so the printed command works at once.
            standalone::write_root_bundle(&data.root_cert(), roots.borrow().pem())?;
            self.sup.tasks.push(self.sup.liveness.spawn(
                "root-bundle-file",
                roots::follow_root_bundle_file(data.root_cert(), roots.clone()),
            ));
        }

        let cluster_work = self.cluster_work(&roots);
        self.sup.tasks.extend(cluster_work);

        let mut authenticators = std::mem::take(&mut self.signer.authenticators);
        let client_verifier = if args.server.enable_client_cert_authenticator {
            let mut by_certificate =
                ClientCertAuthenticator::new(roots.clone(), &args.server.trust_domain);
            if let Some(client) = &self.cluster.review_kube {
                by_certificate =
                    by_certificate.with_service_accounts(ServiceAccounts::new(client.clone()));
            }
            authenticators.push(Arc::new(by_certificate));
            let verifier = MeshClientVerifier::new(&roots.borrow())?;
            let follow = verifier.clone().follow(roots.clone());
            self.sup
                .tasks
                .push(self.sup.liveness.spawn("client-roots", async move {
                    follow.await;
                    Ok(())
                }));
            Some(verifier)
        } else {
            None
        };

        // The one way into the issuers, for every certificate from here on.
        let issuance = Issuance::new(self.signer.issuer.clone(), roots.clone())
            .with_metrics(self.signer.issuance_metrics.clone());
        let serving_certs = Arc::new(ServingCerts::new(
            issuance.clone(),
            &ServingNames::from_names(&self.plan.serving_names),
            args.serving_tls.serving_certificate_duration,
            self.signer.resolver.clone(),
        ));
        let renewals = serving_certs.start().await;
        self.sup
            .tasks
            .push(self.sup.liveness.spawn("serving-cert", renewals));
        if let (Some(spec), Some(metrics), Some(client), Some(leader)) = (
            &self.plan.istiod_cert,
            &self.cluster.istiod_metrics,
            &self.cluster.kube,
            &self.cluster.leader,
        ) {
            let istiod = IstiodCerts {
                client: client.clone(),
                spec: Arc::new(spec.clone()),
                issuance: issuance.clone(),
                metrics: metrics.clone(),
            };
            self.sup.tasks.push(self.sup.liveness.spawn(
                "istiod-cert",
                istiod.run_while_leader(leader.leadership.clone()),
            ));
        }

        let service = self.ca_service(issuance, authenticators);
        let (grpc, accept) = server::start(
            GrpcOptions {
                address: self.plan.serving_address,
                max_connections: self.plan.max_connections,
                max_connections_per_source: args.server.max_connections_per_source,
                max_streams_per_source: max_streams_per_source(&args.server),
                max_request_bytes: self.plan.max_request_bytes,
                client_verifier,
                metrics: self.signer.metrics.clone(),
            },
            service,
            self.signer.resolver.clone(),
        )
        .await?;
        self.sup
            .tasks
            .push(self.sup.liveness.spawn("accept", async move {
                accept.await;
                Ok(())
            }));
        self.sup
            .readiness
            .grpc_listening
            .store(true, Ordering::Release);
        tracing::info!(grpc = %grpc.address, "serving");
        Ok(Started { grpc })
    }
}

struct Started {
    grpc: GrpcServer,
}

/// Streams one source may open: its calls in both stages, seated or waiting, and room for
/// health checks and calls still being read. 0 when calls per source are not bounded.
fn max_streams_per_source(server: &crate::config::ServerArgs) -> usize {
    if server.max_inflight_per_source == 0 {
        return 0;
    }
    server.max_inflight_per_source + server.max_queued_per_source + STREAMS_BEYOND_CALLS
}

/// Health checks and calls still arriving, on top of a source's seated and waiting calls.
const STREAMS_BEYOND_CALLS: usize = 64;

/// Serves until asked to stop, then: readiness off, health NOT_SERVING, no new connections,
/// in-flight requests finish within the grace period. The gRPC server ending by itself is an
/// error (the process cannot serve any more); other critical tasks only fail `/livez`.
async fn run_until_stopped(
    stop: CancellationToken,
    shutdown_delay: Duration,
    tasks: Vec<AbortOnDropHandle<()>>,
    liveness: Arc<Liveness>,
    readiness: Arc<Readiness>,
    mut grpc: GrpcServer,
    grace: Duration,
) -> anyhow::Result<()> {
    let early_end = tokio::select! {
        _ = stop.cancelled() => None,
        ended = grpc.ended() => Some(ended),
    };
    liveness.stopping();
    readiness.shutting_down.store(true, Ordering::Release);
    grpc.not_serving().await;
    if let Some(ended) = early_end {
        grpc.close();
        drop(tasks);
        return match ended {
            Ok(Ok(())) => Err(anyhow::anyhow!("the gRPC server stopped unexpectedly")),
            Ok(Err(error)) => Err(anyhow::Error::new(error).context("the gRPC server failed")),
            Err(error) => Err(anyhow::Error::new(error).context("the gRPC server task failed")),
        };
    }
    if !shutdown_delay.is_zero() {
        tracing::info!(
            ?shutdown_delay,
            "not ready; serving on while endpoints update"
        );
        tokio::time::sleep(shutdown_delay).await;
    }
    grpc.drain(grace).await;
    drop(tasks);
    Ok(())
}

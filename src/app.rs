//! Wiring: resolve the configuration, build the parts, run them, shut down gracefully.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::admin::{self, AdminState, ExpiryGauges, Liveness, Readiness};
use crate::cluster::ClusterRegistry;
use crate::cluster::api_metrics::ApiMetricsLayer;
use crate::config::{IssuanceArgs, LogFormat, ServeArgs};
use crate::fswatch::{self, FileWatch};
use crate::pki::chain::RootBundle;
use crate::pki::identity;
use crate::proto::istio_v1_auth::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::signer::Signer;
use crate::signer::authn::Authenticator;
use crate::signer::authn::client_cert::ClientCertAuthenticator;
use crate::signer::authn::static_tokens::StaticTokens;
use crate::signer::authn::token_review::{TokenReviewMetrics, TokenReviewer};
use crate::signer::issuer::Issuer;
use crate::signer::issuer::cert_manager::{self, CertManagerIssuer};
use crate::signer::issuer::local_ca::LocalCa;
use crate::signer::listener;
use crate::signer::metrics::SignerMetrics;
use crate::signer::service::{CaService, Settings};
use crate::signer::serving::{ServingCerts, ServingNames, ServingSource};
use crate::signer::tls::{self, MeshClientVerifier, ServingCertResolver};
use crate::standalone::{self, DataDir, Wants};
use prometheus_client::registry::Registry;

/// Istio CSRs are about 1 KiB; 64 KiB CSR + metadata fit well under this. Bigger is hostile.
const MAX_GRPC_MESSAGE_BYTES: usize = 128 * 1024;
/// Dead peers are found within interval + timeout.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// pilot-agent sends one call at a time and ztunnel at most 8; 128 is generous. The bound
/// on work in progress is --max-inflight.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// Service-account JWTs are 1 to 2 KiB; 32 KiB of headers is plenty and bounds hpack memory.
const MAX_HEADER_LIST_BYTES: u32 = 32 * 1024;
/// Certificate lifetimes accepted in flags: below a minute renewals would never rest; beyond
/// ten years the CA's own lifetime is the real limit anyway.
const MIN_CERTIFICATE_DURATION: Duration = Duration::from_secs(60);
const MAX_CERTIFICATE_DURATION: Duration = Duration::from_secs(3650 * 86_400);
const DEFAULT_SERVING_ADDRESS: &str = "0.0.0.0:6443";
const STANDALONE_SERVING_ADDRESS: &str = "127.0.0.1:6443";
const DEFAULT_ADMIN_ADDRESS: &str = "0.0.0.0:9402";
const STANDALONE_ADMIN_ADDRESS: &str = "127.0.0.1:9402";
const DEFAULT_SERVING_DNS_NAME: &str = "cert-manager-istio-csr.cert-manager.svc";

/// Which signer, with what it needs.
enum SignerPlan {
    LocalCa(PathBuf),
    CertManager(cert_manager::Settings),
}

/// The effective configuration, after standalone defaults are applied.
struct Plan {
    serving_address: SocketAddr,
    admin_address: SocketAddr,
    signer: SignerPlan,
    token_auth_file: Option<PathBuf>,
    serving_names: Vec<String>,
    standalone: Option<DataDir>,
}

impl Plan {
    fn resolve(args: &ServeArgs) -> anyhow::Result<Self> {
        identity::validate_trust_domain(&args.server.trust_domain).context("--trust-domain")?;
        for account in &args.server.ca_trusted_node_accounts {
            let valid = account.split_once('/').is_some_and(|(ns, sa)| {
                identity::is_dns1123_label(ns) && identity::is_dns1123_subdomain(sa)
            });
            if !valid {
                bail!("--ca-trusted-node-accounts: {account:?} is not namespace/serviceaccount");
            }
        }
        if args.server.max_inflight == 0 {
            bail!("--max-inflight must be at least 1");
        }
        for (flag, value) in [
            (
                "--max-client-certificate-duration",
                args.server.max_client_certificate_duration,
            ),
            (
                "--serving-certificate-duration",
                args.serving_tls.serving_certificate_duration,
            ),
        ] {
            if !(MIN_CERTIFICATE_DURATION..=MAX_CERTIFICATE_DURATION).contains(&value) {
                bail!(
                    "{flag} must be between 1m and 3650d, not {}",
                    humantime::format_duration(value)
                );
            }
        }
        let standalone = args.standalone.standalone;
        let address = |given: Option<SocketAddr>, default: &str, standalone_default: &str| {
            given.map_or_else(
                || {
                    if standalone {
                        standalone_default
                    } else {
                        default
                    }
                    .parse()
                },
                Ok,
            )
        };
        let serving_address = address(
            args.server.serving_address,
            DEFAULT_SERVING_ADDRESS,
            STANDALONE_SERVING_ADDRESS,
        )?;
        let admin_address = address(
            args.admin.admin_address,
            DEFAULT_ADMIN_ADDRESS,
            STANDALONE_ADMIN_ADDRESS,
        )?;
        let mut serving_names = args.serving_tls.serving_certificate_dns_names.clone();
        if standalone {
            let data = DataDir::new(&args.standalone.data_dir);
            if serving_names.is_empty() {
                serving_names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
            }
            return Ok(Self {
                serving_address,
                admin_address,
                signer: SignerPlan::LocalCa(
                    args.issuance.local_ca_dir.clone().unwrap_or(data.ca_dir()),
                ),
                token_auth_file: Some(
                    args.server
                        .token_auth_file
                        .clone()
                        .unwrap_or(data.tokens_csv()),
                ),
                serving_names,
                standalone: Some(data),
            });
        }
        let signer = match args.issuance.signer {
            Signer::LocalCa => SignerPlan::LocalCa(
                args.issuance
                    .local_ca_dir
                    .clone()
                    .context("--signer local-ca needs --local-ca-dir")?,
            ),
            Signer::CertManager => SignerPlan::CertManager(cert_manager_settings(&args.issuance)?),
            Signer::KubeCsr => bail!(
                "--signer kube-csr is not available yet; use --signer cert-manager or local-ca"
            ),
        };
        if serving_names.is_empty() {
            serving_names = vec![DEFAULT_SERVING_DNS_NAME.into()];
        }
        Ok(Self {
            serving_address,
            admin_address,
            signer,
            token_auth_file: args.server.token_auth_file.clone(),
            serving_names,
            standalone: None,
        })
    }
}

fn cert_manager_settings(args: &IssuanceArgs) -> anyhow::Result<cert_manager::Settings> {
    let mut annotations = std::collections::BTreeMap::new();
    for pair in &args.certificate_request_additional_annotations {
        let (key, value) = pair.split_once('=').with_context(|| {
            format!("--certificate-request-additional-annotations: {pair:?} is not key=value")
        })?;
        annotations.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Ok(cert_manager::Settings {
        namespace: args.certificate_namespace.clone(),
        issuer: cert_manager::IssuerRef {
            name: args.issuer_name.clone(),
            kind: args.issuer_kind.clone(),
            group: args.issuer_group.clone(),
        },
        additional_annotations: annotations,
        preserve_requests: args.preserve_certificate_requests,
        timeout: args.issuance_timeout,
    })
}

impl Plan {
    /// The effective configuration, once, at start-up. Paths only: never file contents.
    fn log(&self, args: &ServeArgs) {
        tracing::info!(
            standalone = self.standalone.is_some(),
            signer = args.issuance.signer.label(),
            local_ca_dir = ?args.issuance.local_ca_dir,
            issuer = %format!("{}/{}.{}", args.issuance.issuer_name, args.issuance.issuer_kind, args.issuance.issuer_group),
            root_ca_file = ?args.issuance.root_ca_file,
            token_auth_file = ?self.token_auth_file,
            client_cert_authenticator = args.server.enable_client_cert_authenticator,
            trust_domain = %args.server.trust_domain,
            cluster_id = %args.server.cluster_id,
            max_certificate_duration = ?args.server.max_client_certificate_duration,
            trusted_node_accounts = ?args.server.ca_trusted_node_accounts,
            serving_address = %self.serving_address,
            admin_address = %self.admin_address,
            serving_names = ?self.serving_names,
            max_inflight = args.server.max_inflight,
            "effective configuration"
        );
    }
}

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

/// A started server.
pub struct Running {
    pub grpc_address: SocketAddr,
    pub admin_address: SocketAddr,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
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
    // starting must drain cleanly, not kill the process with the default action.
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let running = start(args, Hooks::default()).await?;
    if let Some(data) = &standalone {
        print_try_it(data, running.grpc_address, own_tokens);
    }
    let stop = running.stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        }
        stop.cancel();
    });
    running.wait().await
}

/// Builds every part, binds the listeners and returns once the server accepts requests.
pub async fn start(args: ServeArgs, hooks: Hooks) -> anyhow::Result<Running> {
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
    let shutdown = CancellationToken::new();
    let liveness = Arc::new(Liveness::default());
    let mut tasks = Vec::new();
    let mut registry = Registry::with_prefix("istio_csr");
    admin::register_build_info(&mut registry);
    let signer_metrics = SignerMetrics::register(&mut registry);
    let gauges = ExpiryGauges::register(&mut registry);

    // Trust roots: the pinned file when given, else the built-in CA's own roots.
    let pinned = match &args.issuance.root_ca_file {
        Some(path) => {
            let (rx, task) = watch_root_file(path.clone())?;
            tasks.push(liveness.spawn("root-file", task));
            Some(rx)
        }
        None => None,
    };
    let kube = match &plan.standalone {
        Some(_) => None,
        None => match kube_client(
            args.server.kubeconfig.as_deref(),
            &ApiMetricsLayer::register(&mut registry),
        )
        .await
        {
            Ok(client) => Some(client),
            Err(error) if args.server.kubeconfig.is_some() => {
                return Err(error.context("--kubeconfig"));
            }
            Err(error) => {
                tracing::info!(error = %format!("{error:#}"), "no Kubernetes configuration found");
                None
            }
        },
    };
    let pinned_source = args
        .issuance
        .root_ca_file
        .as_ref()
        .map(|p| format!("file:{}", p.display()));
    let (serving_source, real_issuer, roots, root_source): (_, Arc<dyn Issuer>, _, _) =
        match &plan.signer {
            SignerPlan::LocalCa(dir) => {
                let mut ca = LocalCa::load(dir, pinned.clone())
                    .with_context(|| format!("loading the CA in {}", dir.display()))?;
                let (roots, source) = match (pinned, pinned_source) {
                    (Some(rx), Some(source)) => (rx, source),
                    _ => (ca.publish_roots(), format!("local-ca:{}", dir.display())),
                };
                let ca = Arc::new(ca);
                tasks.push(liveness.spawn("ca-reload", ca.clone().watch()?));
                (ServingSource::LocalCa(ca.clone()), ca, roots, source)
            }
            SignerPlan::CertManager(settings) => {
                let client = kube.clone().context(
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
                // The serving certificate needs the watch and an issuer (the runtime ConfigMap's,
                // when configured); after start-up, losing the issuer only means not ready.
                let synced = tokio::time::timeout(settings.timeout, async {
                    while !issuer.ready() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await;
                if synced.is_err() {
                    bail!(
                        "no usable issuer within --issuance-timeout (the CertificateRequest watch \
                         did not sync, or the runtime issuance ConfigMap names no issuer)"
                    );
                }
                let (roots, source) = match (pinned, pinned_source) {
                    (Some(rx), Some(source)) => (rx, source),
                    _ => {
                        let roots = roots_on_first_use(&issuer, &plan.serving_names).await?;
                        let (tx, rx) = watch::channel(Arc::new(roots));
                        // Nothing ever changes these roots; the sender lives as long as the process.
                        tasks.push(liveness.spawn("tofu-roots", async move {
                            tx.closed().await;
                            Ok(())
                        }));
                        (rx, format!("issuer-tofu:{}", settings.issuer.name))
                    }
                };
                (
                    ServingSource::CertManager(issuer.clone()),
                    issuer,
                    roots,
                    source,
                )
            }
        };
    if let Some(data) = &plan.standalone {
        // Written before the port opens, so the printed command works at once.
        standalone::write_root_bundle(&data.root_cert(), roots.borrow().pem())?;
        tasks.push(liveness.spawn(
            "root-bundle-file",
            follow_root_bundle_file(data.root_cert(), roots.clone()),
        ));
    }
    let mut issuer = real_issuer;
    if let Some(wrap) = hooks.wrap_issuer {
        issuer = wrap(issuer);
    }

    let mut authenticators: Vec<Arc<dyn Authenticator>> = Vec::new();
    if let Some(path) = &plan.token_auth_file {
        let tokens = StaticTokens::load(path, &args.server.trust_domain)?;
        tasks.push(liveness.spawn("token-reload", tokens.clone().watch()?));
        authenticators.push(tokens);
    }
    match &kube {
        Some(client) => authenticators.push(Arc::new(TokenReviewer::new(
            client.clone(),
            args.server.token_audiences.clone(),
            &args.server.trust_domain,
            args.server.token_review_cache_ttl,
            TokenReviewMetrics::register(&mut registry),
        ))),
        None if plan.standalone.is_none() => tracing::info!("TokenReview is off"),
        None => {}
    }
    let client_verifier = if args.server.enable_client_cert_authenticator {
        authenticators.push(Arc::new(ClientCertAuthenticator::new(
            roots.clone(),
            &args.server.trust_domain,
        )));
        let verifier = MeshClientVerifier::new(&roots.borrow())?;
        let follow = verifier.clone().follow(roots.clone());
        tasks.push(liveness.spawn("client-roots", async move {
            follow.await;
            Ok(())
        }));
        Some(verifier)
    } else {
        None
    };

    if authenticators.is_empty() && !args.server.enable_client_cert_authenticator {
        bail!(
            "no way to authenticate callers: give a Kubernetes configuration (--kubeconfig, \
             KUBECONFIG or in-cluster) for TokenReview, --token-auth-file, or \
             --enable-client-cert-authenticator"
        );
    }
    let resolver = Arc::new(ServingCertResolver::default());
    let serving = Arc::new(ServingCerts::new(
        serving_source,
        ServingNames::from_names(&plan.serving_names),
        args.serving_tls.serving_certificate_duration,
        resolver.clone(),
        roots.clone(),
    ));
    tasks.push(liveness.spawn("serving-cert", serving.start().await?));

    let readiness = Arc::new(Readiness::new(resolver.clone(), issuer.clone()));
    let admin_listener = TcpListener::bind(plan.admin_address)
        .await
        .with_context(|| format!("binding the admin address {}", plan.admin_address))?;
    let admin_address = admin_listener.local_addr()?;
    let admin_router = admin::router(Arc::new(AdminState {
        readiness: readiness.clone(),
        liveness: liveness.clone(),
        registry,
        gauges,
        roots: roots.clone(),
        root_source,
    }));
    // The admin API outlives the gRPC drain: probes must see "not ready", not a closed port.
    let admin_shutdown = CancellationToken::new();
    let admin_stop = admin_shutdown.clone();
    tasks.push(liveness.spawn("admin", async move {
        axum::serve(admin_listener, admin_router)
            .with_graceful_shutdown(admin_shutdown.cancelled_owned())
            .await?;
        Ok(())
    }));

    let service = CaService::new(
        Settings {
            max_lifetime: args.server.max_client_certificate_duration,
            trusted_node_accounts: args.server.ca_trusted_node_accounts.clone(),
            max_inflight: args.server.max_inflight,
        },
        signer_metrics,
        ClusterRegistry::new(args.server.cluster_id.clone()),
        authenticators,
        issuer,
        roots,
    );
    let tls_config = Arc::new(tls::server_config(resolver, client_verifier)?);
    let listener = TcpListener::bind(plan.serving_address)
        .await
        .with_context(|| format!("binding the gRPC address {}", plan.serving_address))?;
    let grpc_address = listener.local_addr()?;
    let (conn_tx, conn_rx) = mpsc::channel(128);
    let max_connections = listener::connection_cap(args.server.max_connections);
    tasks.push(liveness.spawn("accept", {
        let shutdown = shutdown.clone();
        async move {
            listener::accept_loop(listener, tls_config, max_connections, conn_tx, shutdown).await;
            Ok(())
        }
    }));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<IstioCertificateServiceServer<CaService>>()
        .await;
    let grpc = tonic::transport::Server::builder()
        // Reap peers that vanished without closing (node crash, partition).
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .add_service(health_service)
        .add_service(
            IstioCertificateServiceServer::new(service)
                .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            ReceiverStream::new(conn_rx),
            shutdown.clone().cancelled_owned(),
        );
    let grpc = tokio::spawn(grpc);
    readiness.grpc_listening.store(true, Ordering::Release);
    tracing::info!(grpc = %grpc_address, admin = %admin_address, "serving");

    let stop = CancellationToken::new();
    let stop_requested = stop.clone();
    let shutdown_delay = args.server.shutdown_delay;
    let done = tokio::spawn(async move {
        let result = run_until_stopped(
            stop_requested,
            shutdown_delay,
            tasks,
            liveness,
            readiness,
            health,
            shutdown,
            grpc,
            args.server.shutdown_grace,
        )
        .await;
        admin_stop.cancel();
        result
    });
    Ok(Running {
        grpc_address,
        admin_address,
        stop,
        done,
    })
}

/// Serves until asked to stop, then: readiness off, health NOT_SERVING, no new connections,
/// in-flight requests finish within the grace period. The gRPC server ending by itself is an
/// error (the process cannot serve any more); other critical tasks only fail `/livez`.
#[allow(clippy::too_many_arguments)]
async fn run_until_stopped(
    stop: CancellationToken,
    shutdown_delay: Duration,
    tasks: Vec<AbortOnDropHandle<()>>,
    liveness: Arc<Liveness>,
    readiness: Arc<Readiness>,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
    mut grpc: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
) -> anyhow::Result<()> {
    let early_end = tokio::select! {
        _ = stop.cancelled() => None,
        ended = &mut grpc => Some(ended),
    };
    liveness.stopping();
    readiness.shutting_down.store(true, Ordering::Release);
    health
        .set_not_serving::<IstioCertificateServiceServer<CaService>>()
        .await;
    // gRPC health probes ask about the whole server ("") by default.
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    if early_end.is_none() && !shutdown_delay.is_zero() {
        tracing::info!(
            ?shutdown_delay,
            "not ready; serving on while endpoints update"
        );
        tokio::time::sleep(shutdown_delay).await;
    }
    shutdown.cancel();
    if let Some(ended) = early_end {
        drop(tasks);
        return match ended {
            Ok(Ok(())) => Err(anyhow::anyhow!("the gRPC server stopped unexpectedly")),
            Ok(Err(error)) => Err(anyhow::Error::new(error).context("the gRPC server failed")),
            Err(error) => Err(anyhow::Error::new(error).context("the gRPC server task failed")),
        };
    }
    match tokio::time::timeout(grace, grpc).await {
        Ok(Ok(Ok(()))) => tracing::info!("in-flight requests finished; exiting"),
        Ok(Ok(Err(error))) => tracing::error!(%error, "gRPC server failed"),
        Ok(Err(error)) => tracing::error!(%error, "gRPC server task failed"),
        Err(_) => tracing::warn!(
            ?grace,
            "shutdown grace period over; abandoning in-flight requests"
        ),
    }
    drop(tasks);
    Ok(())
}

/// Loads the pinned root file and follows its changes: the watch is in place when this returns,
/// so no change after the load is missed. A broken update keeps the previous roots.
fn watch_root_file(
    path: PathBuf,
) -> anyhow::Result<(
    watch::Receiver<Arc<RootBundle>>,
    impl Future<Output = anyhow::Result<()>>,
)> {
    let load = |path: &PathBuf| -> anyhow::Result<RootBundle> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        RootBundle::from_pem(&bytes).with_context(|| format!("parsing {}", path.display()))
    };
    let initial = load(&path)?;
    tracing::info!(path = %path.display(), roots = initial.certs().len(), "pinned root bundle loaded");
    let mut files = FileWatch::new(std::slice::from_ref(&path), fswatch::DEFAULT_RESYNC)?;
    let (tx, rx) = watch::channel(Arc::new(initial));
    let task = async move {
        let mut failed = None;
        loop {
            let on_disk = fswatch::fingerprint(std::slice::from_ref(&path));
            if Some(on_disk) != failed {
                match load(&path) {
                    Ok(bundle) => {
                        failed = None;
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
                    }
                    Err(error) => {
                        failed = Some(on_disk);
                        tracing::error!(error = %format!("{error:#}"), "pinned roots not reloaded; keeping the previous roots");
                    }
                }
            }
            files.changed().await;
        }
    };
    Ok((rx, task))
}

/// Without --root-ca-file, trusts the CA cert-manager names in `status.ca` of a first request
/// (istio-csr's behaviour, with its warning): a hijacked issuer at that moment would be trusted.
async fn roots_on_first_use(
    issuer: &CertManagerIssuer,
    serving_names: &[String],
) -> anyhow::Result<RootBundle> {
    tracing::warn!(
        "no --root-ca-file: trusting the CA the issuer reports now, for the life of this process. \
         Pin the roots with --root-ca-file to defend against a hijacked signer"
    );
    let key = crate::pki::keys::generate_ecdsa_p256()?;
    let names = ServingNames::from_names(serving_names);
    let csr = crate::signer::serving::serving_csr(&names, &key)?;
    let (_, ca_pem) = issuer
        .submit(&csr, &names.dns.join(","), MIN_CERTIFICATE_DURATION)
        .await
        .context("asking the issuer for its CA (status.ca)")?;
    RootBundle::from_pem(ca_pem.as_bytes())
        .context("the issuer's status.ca holds no usable root: pin one with --root-ca-file")
}

/// Every call to an API server has a deadline: a hung apiserver must not hang a CreateCertificate.
const KUBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KUBE_READ_TIMEOUT: Duration = Duration::from_secs(15);

/// A client for the local cluster: `--kubeconfig`, else kube's usual inference; every call
/// counted by `metrics`.
async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
    metrics: &ApiMetricsLayer,
) -> anyhow::Result<kube::Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    config.connect_timeout = Some(KUBE_CONNECT_TIMEOUT);
    config.read_timeout = Some(KUBE_READ_TIMEOUT);
    config.write_timeout = Some(KUBE_READ_TIMEOUT);
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(metrics)
        .build())
}

/// Keeps the standalone `root-cert.pem` equal to the roots in force.
async fn follow_root_bundle_file(
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

fn print_try_it(data: &DataDir, grpc: SocketAddr, own_tokens: bool) {
    let host = if grpc.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        grpc.ip().to_string()
    };
    let address = SocketAddr::new(host.parse().unwrap_or(grpc.ip()), grpc.port());
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

//! The gRPC server, assembled: TLS, the accept loop, the edge that serves each connection,
//! gRPC health and the CA service; and its drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::edge::{self, EdgeLimits};
use super::listener::{self, ConnectionLimits};
use super::metrics::SignerMetrics;
use super::service::CaService;
use super::tls::{self, MeshClientVerifier, ServingCertResolver};
use crate::proto::istio_v1_auth::istio_certificate_service_server::IstioCertificateServiceServer;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::HealthService;

/// What the gRPC listener is given.
pub struct GrpcOptions {
    pub address: SocketAddr,
    /// `--max-connections`, resolved.
    pub max_connections: usize,
    /// `--max-connections-per-source` (0: no bound).
    pub max_connections_per_source: usize,
    /// Open streams one source may have, all its connections together (0: no bound).
    pub max_streams_per_source: usize,
    /// Request bytes that calls may hold, all sources together.
    pub max_request_bytes: usize,
    /// Client certificates are asked for (and verified) when set.
    pub client_verifier: Option<Arc<MeshClientVerifier>>,
    /// Where the edge's refusals are counted.
    pub metrics: SignerMetrics,
}

/// A bound, serving gRPC server.
pub struct GrpcServer {
    pub address: SocketAddr,
    health: tonic_health::server::HealthReporter,
    /// Cancelled to close the listener and drain the connections.
    shutdown: CancellationToken,
    serving: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Binds and starts serving `service`; the accept loop is returned for the caller to run
/// (it ends when the server is stopped).
pub async fn start(
    options: GrpcOptions,
    service: CaService,
    resolver: Arc<ServingCertResolver>,
) -> anyhow::Result<(GrpcServer, impl Future<Output = ()> + Send + 'static)> {
    let tls_config = Arc::new(tls::server_config(resolver, options.client_verifier)?);
    let listener = TcpListener::bind(options.address)
        .await
        .with_context(|| format!("binding the gRPC address {}", options.address))?;
    let address = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let (conn_tx, conn_rx) = mpsc::channel(128);
    let limits = ConnectionLimits {
        total: listener::connection_cap(options.max_connections),
        per_source: options.max_connections_per_source,
    };
    let accept = {
        let shutdown = shutdown.clone();
        let metrics = options.metrics.clone();
        listener::accept_loop(listener, tls_config, limits, metrics, conn_tx, shutdown)
    };

    let health = tonic_health::server::HealthReporter::new();
    health
        .set_serving::<IstioCertificateServiceServer<CaService>>()
        .await;
    // The edge serves each connection (HTTP/2 settings, idle connections, request-read
    // deadline, RESOURCE_EXHAUSTED for over-size messages); tonic routes and decodes.
    // tonic's own size limit stays as a backstop behind the edge's.
    let limits = EdgeLimits::in_force();
    let health_service = HealthServer::new(BoundedHealth {
        inner: HealthService::from_health_reporter(health.clone()),
        max_watch: limits.max_health_watch,
    });
    let routes = tonic::service::Routes::new(health_service)
        .add_service(
            IstioCertificateServiceServer::new(service)
                .max_decoding_message_size(limits.max_message_bytes)
                .max_encoding_message_size(limits.max_message_bytes),
        )
        .prepare();
    let serving = tokio::spawn(edge::serve(
        ReceiverStream::new(conn_rx),
        routes,
        edge::EdgeOptions {
            limits,
            max_streams_per_source: options.max_streams_per_source,
            max_request_bytes: options.max_request_bytes,
            metrics: options.metrics,
        },
        shutdown.clone(),
    ));
    Ok((
        GrpcServer {
            address,
            health,
            shutdown,
            serving,
        },
        accept,
    ))
}

/// How the server ended before it was asked to stop.
pub type Ended = Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>;

impl GrpcServer {
    /// Resolves if the server stops by itself (it never should).
    pub async fn ended(&mut self) -> Ended {
        (&mut self.serving).await
    }

    /// gRPC health says NOT_SERVING, for the service and the whole server ("", what
    /// probes ask by default); connections and calls go on.
    pub async fn not_serving(&self) {
        self.health
            .set_not_serving::<IstioCertificateServiceServer<CaService>>()
            .await;
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    }

    /// Closes the listener and drains: in-flight calls get `grace` to finish.
    pub async fn drain(self, grace: Duration) {
        self.shutdown.cancel();
        match tokio::time::timeout(grace, self.serving).await {
            Ok(Ok(Ok(()))) => tracing::info!("in-flight requests finished; exiting"),
            Ok(Ok(Err(error))) => tracing::error!(%error, "gRPC server failed"),
            Ok(Err(error)) => tracing::error!(%error, "gRPC server task failed"),
            Err(_) => tracing::warn!(
                ?grace,
                "shutdown grace period over; abandoning in-flight requests"
            ),
        }
    }

    /// Closes the listener without waiting (the server has ended already).
    pub fn close(&self) {
        self.shutdown.cancel();
    }
}

/// gRPC health as tonic-health serves it, except that a Watch ends after `max_watch`: an
/// unauthenticated call that never ends would pin its connection (it is never idle) for as
/// long as the peer likes. Watchers re-watch when their stream ends, as gRPC's health
/// checking clients do.
struct BoundedHealth {
    inner: HealthService,
    max_watch: Duration,
}

type WatchStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl Health for BoundedHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let updates = self.inner.watch(request).await?.into_inner();
        let bounded =
            futures_util::StreamExt::take_until(updates, tokio::time::sleep(self.max_watch));
        Ok(tonic::Response::new(Box::pin(bounded)))
    }
}

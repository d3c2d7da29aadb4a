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
use super::listener;
use super::service::CaService;
use super::tls::{self, MeshClientVerifier, ServingCertResolver};
use crate::proto::istio_v1_auth::istio_certificate_service_server::IstioCertificateServiceServer;

/// What the gRPC listener is given.
pub struct GrpcOptions {
    pub address: SocketAddr,
    /// `--max-connections` (0: the default cap).
    pub max_connections: usize,
    /// Client certificates are asked for (and verified) when set.
    pub client_verifier: Option<Arc<MeshClientVerifier>>,
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
    let max_connections = listener::connection_cap(options.max_connections);
    let accept = {
        let shutdown = shutdown.clone();
        listener::accept_loop(listener, tls_config, max_connections, conn_tx, shutdown)
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<IstioCertificateServiceServer<CaService>>()
        .await;
    // The edge serves each connection (HTTP/2 settings, idle connections, request-read
    // deadline, RESOURCE_EXHAUSTED for over-size messages); tonic routes and decodes.
    // tonic's own size limit stays as a backstop behind the edge's.
    let limits = EdgeLimits::in_force();
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
        limits,
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

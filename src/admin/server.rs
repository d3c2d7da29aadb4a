//! The admin listener: HTTP/1.1 with bounds, so a peer cannot hold the probes' port or eat
//! the process's file descriptors.
//!
//! `axum::serve` has no knob for any of this (no header-read timeout, no connection cap), so
//! connections are served here with hyper directly:
//! - at most `max_connections_per_source` from one address and `max_connections` in all;
//!   connections beyond either are closed at once. The kubelet probes from one address and
//!   holds a connection or two, so no number of connections from other addresses keeps a
//!   probe out until `max_connections` are held by many addresses. The cap sits inside the
//!   file descriptors that the gRPC listener leaves free
//!   (`signer::listener::connection_cap`);
//! - the request head (line and headers) must arrive within `header_read_timeout`. The clock
//!   also runs while a kept-alive connection waits for its next request, so an idle
//!   keep-alive connection goes too (slowloris);
//! - a handler that takes longer than `request_timeout` gets 503;
//! - a connection lives at most `max_connection_age`. It is closed after its current
//!   request, and dropped `request_timeout` later if it still lingers (a peer that does not
//!   read its answer).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::per_source::{PerSourceLimit, SourceSlot};

/// Probes and scrapes send a few hundred bytes of headers.
const MAX_BUFFER_BYTES: usize = 16 * 1024;
/// At most one warning per this long about refused connections, with the count.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// The admin listener's bounds. [`ServeLimits::DEFAULT`] is what the server uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// The kubelet's probes and a Prometheus scraper need a handful; the rest is room for
    /// 128 addresses at the per-source bound. An idle connection costs a few KiB and is
    /// closed within `header_read_timeout`.
    pub max_connections: usize,
    /// One address: the kubelet's probes, a scraper, a person with `status`.
    pub max_connections_per_source: usize,
    /// A real client sends its request head in one packet.
    pub header_read_timeout: Duration,
    /// Every handler answers from memory in microseconds.
    pub request_timeout: Duration,
    pub max_connection_age: Duration,
}

impl ServeLimits {
    pub const DEFAULT: Self = Self {
        max_connections: 1024,
        max_connections_per_source: 8,
        header_read_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        max_connection_age: Duration::from_secs(60),
    };
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Serves `router` on `listener` until `shutdown` resolves. Then it stops accepting, lets
/// current requests finish, and returns once every connection is closed. That takes at most
/// `header_read_timeout` or `request_timeout`, plus `request_timeout`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_source = PerSourceLimit::new(limits.max_connections_per_source);
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut shutdown = pin!(shutdown);
    let mut refused = 0u64;
    let mut warned: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = per_source
            .try_acquire(Some(remote.ip()))
            .ok()
            .zip(slots.clone().try_acquire_owned().ok());
        let Some(slot) = slot else {
            drop(tcp);
            refused += 1;
            if warned.is_none_or(|at| at.elapsed() >= REFUSAL_WARNING_EVERY) {
                tracing::warn!(%remote, refused, max_connections = limits.max_connections, max_connections_per_source = limits.max_connections_per_source, "admin connection limit reached; closing new connections");
                warned = Some(Instant::now());
                refused = 0;
            }
            continue;
        };
        connections.spawn(serve_connection(
            tcp,
            remote,
            router.clone(),
            limits,
            stop.clone(),
            slot,
        ));
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn serve_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    router: Router,
    limits: ServeLimits,
    stop: CancellationToken,
    _slots: (Option<SourceSlot>, OwnedSemaphorePermit),
) {
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_BUFFER_BYTES);
    let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
        // Handlers that care who asks (/debug/*) read the peer here.
        request.extensions_mut().insert(ConnectInfo(remote));
        let router = router.clone();
        async move {
            let answer = tower::ServiceExt::oneshot(router, request);
            let response = match tokio::time::timeout(limits.request_timeout, answer).await {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "request timed out\n").into_response(),
            };
            Ok::<_, Infallible>(response)
        }
    });
    let mut connection = pin!(http1.serve_connection(TokioIo::new(tcp), service));
    let too_old = Instant::now() + limits.max_connection_age;
    let mut drop_at: Option<Instant> = None;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "admin connection ended");
                }
                return;
            }
            _ = stop.cancelled(), if drop_at.is_none() => {
                connection.as_mut().graceful_shutdown();
                drop_at = Some(Instant::now() + limits.request_timeout);
            }
            _ = tokio::time::sleep_until(too_old), if drop_at.is_none() => {
                connection.as_mut().graceful_shutdown();
                drop_at = Some(Instant::now() + limits.request_timeout);
            }
            _ = tokio::time::sleep_until(drop_at.unwrap_or(too_old)), if drop_at.is_some() => {
                tracing::debug!("dropping an admin connection that outlived its bound");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn start(limits: ServeLimits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/fast", get(|| async { "ok\n" }))
            .route("/slow", get(std::future::pending::<&'static str>));
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            router,
            limits,
            shutdown.clone().cancelled_owned(),
        ));
        (address, shutdown)
    }

    async fn get_path(address: std::net::SocketAddr, path: &str) -> String {
        let mut tcp = TcpStream::connect(address).await.unwrap();
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn a_handler_slower_than_the_request_timeout_gets_503() {
        let limits = ServeLimits {
            request_timeout: Duration::from_millis(200),
            ..ServeLimits::DEFAULT
        };
        let (address, _shutdown) = start(limits).await;
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), get_path(address, "/slow"))
            .await
            .expect("the slow request was not cut off");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(get_path(address, "/fast").await.starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn a_connection_older_than_its_bound_is_closed_after_its_request() {
        let limits = ServeLimits {
            max_connection_age: Duration::from_millis(300),
            request_timeout: Duration::from_millis(300),
            ..ServeLimits::DEFAULT
        };
        let (address, _shutdown) = start(limits).await;
        let mut tcp = TcpStream::connect(address).await.unwrap();
        // A request whose answer stays unread: the connection still goes.
        tcp.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
            .await
            .expect("the connection outlived its bound");
        assert!(read.is_ok());
        assert!(rest.starts_with(b"HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn shutdown_waits_for_no_idle_connection() {
        let (address, shutdown) = start(ServeLimits::DEFAULT).await;
        let mut idle = TcpStream::connect(address).await.unwrap();
        assert!(get_path(address, "/fast").await.starts_with("HTTP/1.1 200"));
        shutdown.cancel();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf))
            .await
            .expect("an idle connection held up shutdown");
        assert!(matches!(read, Ok(0) | Err(_)));
    }
}

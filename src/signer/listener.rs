//! The gRPC listener: accepts TCP connections, completes TLS and checks the HTTP/2 preface
//! under one deadline, and hands finished connections to the gRPC server.
//!
//! Hostile or broken peers must not starve real clients: the accept loop never waits, every
//! connection (pending or established) counts against one cap, and a peer that does not finish
//! TLS and send the HTTP/2 preface within the deadline is dropped. Without the preface check a
//! peer could hold a connection forever without sending a request (and make every graceful
//! shutdown wait its full grace period).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::log_guard::{Admission, RateLimiter};
use super::metrics::SignerMetrics;
use crate::per_source::{PerSourceLimit, SourceSlot};

/// TLS handshake and HTTP/2 preface together: a real client needs milliseconds.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// RFC 9113 3.4: every HTTP/2 connection starts with these 24 octets.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// File descriptors kept free for files, the admin listener and outgoing connections.
const RESERVED_FDS: u64 = 128 + crate::admin::ServeLimits::DEFAULT.max_connections as u64;
/// `istio_csr_refusals_total` reasons of the accept loop.
pub const REFUSED_CONNECTIONS: &str = "connections";
pub const REFUSED_SOURCE_CONNECTIONS: &str = "source-connections";
pub const REFUSED_CONNECT_DEADLINE: &str = "connect-deadline";

/// What the gRPC handlers learn about a connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// The client certificate chain, when one was presented (and verified) during TLS.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// A TLS connection whose HTTP/2 preface was already read; it is replayed to the server.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    preface_sent: usize,
    info: ConnInfo,
    /// Held for the connection's life: counts against the connection caps.
    _slots: (OwnedSemaphorePermit, Option<SourceSlot>),
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.preface_sent < H2_PREFACE.len() {
            let rest = &H2_PREFACE[self.preface_sent..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.preface_sent += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// Raises the soft open-files limit to the hard one (as Go's runtime does) and returns how
/// many connections fit under it, at most `wanted`.
pub fn connection_cap(wanted: usize) -> usize {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let fit = usize::try_from(limit.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
    wanted.min(fit).max(1)
}

/// How many connections the accept loop lets in.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// All sources together (after [`connection_cap`]).
    pub total: usize,
    /// One source address (0: no per-source bound).
    pub per_source: usize,
}

/// Accepts until `shutdown` fires. Connections beyond either limit are closed at once:
/// better a fast refusal (clients retry elsewhere) than a queue that grows without bound.
/// Each refusal is counted (`istio_csr_refusals_total`) and logged a few times a second at
/// most.
pub async fn accept_loop(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: ConnectionLimits,
    metrics: SignerMetrics,
    connections: mpsc::Sender<Result<Conn, io::Error>>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(limits.total));
    let per_source = PerSourceLimit::new(limits.per_source);
    let refusal_log = RateLimiter::new(1);
    let refuse = |remote: SocketAddr, reason: &'static str| {
        metrics.observe_refusal(reason);
        if let Admission::Log { suppressed } = refusal_log.admit(reason) {
            tracing::warn!(%remote, reason, suppressed, max_connections = limits.total, max_connections_per_source = limits.per_source, "closing a new connection: limit reached");
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(source_slot) = per_source.try_acquire(Some(remote.ip())) else {
            refuse(remote, REFUSED_SOURCE_CONNECTIONS);
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(remote, REFUSED_CONNECTIONS);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let connections = connections.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(CONNECT_DEADLINE, establish(&acceptor, tcp)).await {
                Ok(Ok(tls)) => {
                    let peer_certs = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|certs| Arc::new(certs.to_vec()));
                    let conn = Conn {
                        tls,
                        preface_sent: 0,
                        info: ConnInfo { remote, peer_certs },
                        _slots: (slot, source_slot),
                    };
                    let _ = connections.send(Ok(conn)).await;
                }
                Ok(Err(error)) => tracing::debug!(%remote, %error, "connection refused"),
                Err(_) => {
                    metrics.observe_refusal(REFUSED_CONNECT_DEADLINE);
                    tracing::debug!(%remote, "connection dropped: no TLS and HTTP/2 preface in time")
                }
            }
        });
    }
}

/// TLS handshake, then the HTTP/2 preface.
async fn establish(acceptor: &TlsAcceptor, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
    let mut tls = acceptor.accept(tcp).await?;
    let mut preface = [0u8; 24];
    tls.read_exact(&mut preface).await?;
    if &preface != H2_PREFACE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an HTTP/2 client",
        ));
    }
    Ok(tls)
}

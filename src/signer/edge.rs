//! The gRPC edge: serves every connection the listener hands over with HTTP/2, and bounds
//! what one peer can hold there.
//!
//! We serve connections ourselves with hyper instead of `tonic::transport::Server`, with
//! tonic's `Routes` as the service. tonic owns each connection's future and offers no way to
//! close one connection gracefully, but closing idle connections needs exactly that. hyper's
//! HTTP/2 server has no idle timeout either. What tonic's server did besides is done here:
//! each request gets the connection's [`ConnInfo`] and is bounded by the client's
//! `grpc-timeout`.
//!
//! The bounds, per request, per connection and for the process:
//! - **Message size.** A request message over `max_message_bytes` gets RESOURCE_EXHAUSTED, as
//!   gRPC's status-code spec says. tonic itself answers OUT_OF_RANGE for this
//!   (`codec/decode.rs`, checked against `max_decoding_message_size`). Rewriting tonic's status
//!   afterwards would mean matching its message text. Instead the edge reads the 5-byte gRPC
//!   prefix as it arrives and refuses at once, before buffering the rest. tonic's limit stays
//!   as a backstop that nothing well-formed reaches.
//! - **Reading the request.** A request must be in, up to the end of its stream, within
//!   `request_read_deadline` of its HEADERS. Otherwise it gets DEADLINE_EXCEEDED, and HTTP/2
//!   resets the half-received stream (RST_STREAM NO_ERROR). Every method here takes exactly
//!   one request message, and tonic waits for the end of the stream before calling a
//!   handler. The deadline covers only this read. The handler (a signing wait of up to
//!   `--issuance-timeout`) runs without it.
//! - **Buffered bytes, process-wide.** Partly received requests share one budget. Each one is
//!   charged a fixed amount per stream plus the buffer it holds, until tonic has decoded it.
//!   The budget caps the memory that stalled peers can pin, whatever the number of
//!   connections. When it is used up, the reads that have taken longer than
//!   [`PRESSURE_AGE`] are evicted (RESOURCE_EXHAUSTED) to make room. A real client sends
//!   its request in milliseconds, so stalled peers cannot keep real clients out. A new
//!   request gets RESOURCE_EXHAUSTED only when the evicted bytes do not come back within
//!   [`PRESSURE_WAIT`] (docs/benchmarks.md measures a flood that does this).
//! - **Per connection:** at most `max_streams_per_connection` concurrent streams (h2 refuses
//!   more with REFUSED_STREAM) and `max_header_list_bytes` of headers. Flow-control windows
//!   are small. Keepalive reaps peers that vanished. A connection with no open stream for
//!   `idle_connection_timeout` gets GOAWAY. If it is still not closed after a further
//!   [`GOAWAY_LINGER`] with no stream open, it is dropped.
//!
//! Not bounded here: a peer that never opens its HTTP/2 receive window leaves a finished
//! call's answer unsent, and its stream open. Keepalive does not reap it, because it answers
//! PINGs. Each such stream holds one of its connection's streams and a few KiB.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::service::Routes;
use tonic::transport::server::Connected;

use super::listener::{Conn, ConnInfo};
use super::metrics::SignerMetrics;
use crate::per_source::{PerSourceLimit, SourceSlot};

/// The gRPC message prefix: a compression flag and a 4-byte big-endian length.
const GRPC_PREFIX_BYTES: usize = 5;
/// Charged to the budget for every stream being read, on top of its bytes. This bounds
/// how many partly received requests can exist at once, even if each holds few bytes.
const STREAM_CHARGE_BYTES: u32 = 4 * 1024;
/// HTTP/2 receive windows. Requests are one small message, and the edge reads it as it
/// arrives. Small windows bound what h2 buffers for a peer before the edge sees it.
const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 256 * 1024;
/// What h2 buffers per stream for a peer that reads its answers slowly. Answers are a few
/// KiB.
const SEND_BUFFER_BYTES: usize = 64 * 1024;
/// Under memory pressure, reads in progress for longer than this are evicted.
pub const PRESSURE_AGE: Duration = Duration::from_secs(1);
/// How long a new request waits for evicted reads to give their bytes back.
pub const PRESSURE_WAIT: Duration = Duration::from_millis(200);
/// After GOAWAY, how long a connection may stay open with no stream before it is dropped.
/// This covers peers that never answer the GOAWAY's PING or never close.
pub const GOAWAY_LINGER: Duration = Duration::from_secs(5);

/// The edge's bounds. [`EdgeLimits::DEFAULT`] is what the server uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeLimits {
    /// Largest request or response message. Istio CSRs are about 1 KiB, and a 64 KiB CSR plus
    /// metadata fits well under this. Anything bigger is hostile.
    pub max_message_bytes: usize,
    /// pilot-agent sends one call at a time and ztunnel at most 8, so 128 is generous. The
    /// bound on work in progress is `--max-inflight`.
    pub max_streams_per_connection: u32,
    /// Service-account JWTs are 1 to 2 KiB. 32 KiB of headers is plenty and bounds hpack
    /// memory.
    pub max_header_list_bytes: u32,
    /// Dead peers are found within interval + timeout.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// From a request's HEADERS to the end of its stream. A real client sends its one message
    /// at once.
    pub request_read_deadline: Duration,
    /// A connection with no open stream for this long is closed (GOAWAY). Clients reconnect
    /// when they next need a certificate.
    pub idle_connection_timeout: Duration,
    /// Bytes that partly received requests may hold, all connections together.
    pub request_buffer_budget: usize,
    /// How long a gRPC health Watch may last before its stream ends (server.rs).
    pub max_health_watch: Duration,
    /// Request bytes one source address may hold in calls being served or waiting, all its
    /// streams together. A decoded request waits with its call: this bounds what one address
    /// can make the process hold that way. Real requests are 1 to 3 KiB, so a restart storm
    /// of a thousand calls fits; 32 calls of the largest message do too.
    pub max_request_bytes_per_source: usize,
}

impl EdgeLimits {
    pub const DEFAULT: Self = Self {
        max_message_bytes: 128 * 1024,
        max_streams_per_connection: 128,
        max_header_list_bytes: 32 * 1024,
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
        request_read_deadline: Duration::from_secs(10),
        idle_connection_timeout: Duration::from_secs(300),
        request_buffer_budget: 64 * 1024 * 1024,
        max_health_watch: Duration::from_secs(300),
        max_request_bytes_per_source: 4 * 1024 * 1024,
    };

    /// The limits a server starting now uses. This is [`EdgeLimits::DEFAULT`], unless a test
    /// set others with `EdgeLimits::set_for_tests` (feature `testing`).
    pub fn in_force() -> Self {
        #[cfg(feature = "testing")]
        if let Some(limits) = test_limits::get() {
            return limits;
        }
        Self::DEFAULT
    }

    /// Test seam: servers started after this in this process use `limits` (e.g. a 2 s idle
    /// bound instead of 5 min). The setting is process-wide, so every test in one test binary
    /// must set the same limits.
    #[cfg(feature = "testing")]
    pub fn set_for_tests(limits: Self) {
        test_limits::set(limits);
    }
}

#[cfg(feature = "testing")]
mod test_limits {
    use std::sync::Mutex;

    use super::EdgeLimits;

    static LIMITS: Mutex<Option<EdgeLimits>> = Mutex::new(None);

    pub fn get() -> Option<EdgeLimits> {
        LIMITS.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(limits: EdgeLimits) {
        *LIMITS.lock().unwrap_or_else(|p| p.into_inner()) = Some(limits);
    }
}

/// Serves connections from `incoming` until `shutdown` fires (or `incoming` ends). Then every
/// connection gets GOAWAY and in-flight calls finish; this returns once all connections are
/// closed. It never fails: its type matches what tonic's server returned.
pub async fn serve(
    incoming: impl Stream<Item = Result<Conn, io::Error>> + Send,
    routes: Routes,
    options: EdgeOptions,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let EdgeOptions {
        limits,
        max_streams_per_source,
        max_request_bytes,
        metrics,
    } = options;
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .max_header_list_size(limits.max_header_list_bytes)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_send_buf_size(SEND_BUFFER_BYTES);
    let http2 = Arc::new(http2);
    let shared = Arc::new(Shared {
        routes,
        budget: Budget::new(limits.request_buffer_budget),
        streams_per_source: PerSourceLimit::new(max_streams_per_source),
        request_bytes_per_source: PerSourceLimit::new(limits.max_request_bytes_per_source),
        request_bytes: Arc::new(Semaphore::new(max_request_bytes)),
        limits,
        metrics,
    });
    let stop = shutdown.child_token();
    let connections = TaskTracker::new();
    let mut incoming = Box::pin(incoming);
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            next = incoming.next() => next,
        };
        match next {
            Some(Ok(conn)) => {
                connections.spawn(serve_connection(
                    conn,
                    http2.clone(),
                    shared.clone(),
                    stop.clone(),
                ));
            }
            Some(Err(error)) => tracing::debug!(%error, "connection failed before serving"),
            None => break,
        }
    }
    // Handshakes still under way find the channel closed and drop their connection.
    drop(incoming);
    stop.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

/// What [`serve`] is given besides the connections and routes.
pub struct EdgeOptions {
    pub limits: EdgeLimits,
    /// Open streams one source address may have, all its connections together (0: no
    /// bound): every call counts, health Watches included.
    pub max_streams_per_source: usize,
    /// Request bytes that calls may hold while they wait or are served, all sources
    /// together: what many addresses at their per-source bound could otherwise add up to.
    pub max_request_bytes: usize,
    /// Where refusals are counted (`istio_csr_refusals_total`).
    pub metrics: SignerMetrics,
}

/// `istio_csr_refusals_total` reasons of the edge.
pub const REFUSED_SOURCE_STREAMS: &str = "source-streams";
pub const REFUSED_TOO_LARGE: &str = "message-size";
pub const REFUSED_READ_DEADLINE: &str = "read-deadline";
pub const REFUSED_BUDGET: &str = "buffer-budget";
pub const REFUSED_SOURCE_BYTES: &str = "source-bytes";
pub const REFUSED_HELD_BYTES: &str = "held-bytes";

struct Shared {
    routes: Routes,
    budget: Budget,
    limits: EdgeLimits,
    streams_per_source: Arc<PerSourceLimit>,
    request_bytes_per_source: Arc<PerSourceLimit>,
    request_bytes: Arc<Semaphore>,
    metrics: SignerMetrics,
}

/// The bytes that partly received requests may hold, all connections together.
struct Budget {
    bytes: Arc<Semaphore>,
    /// Reads that started before this give their bytes back (memory pressure).
    evict_before: watch::Sender<Instant>,
}

impl Budget {
    fn new(bytes: usize) -> Self {
        let (evict_before, _) = watch::channel(Instant::now());
        Self {
            bytes: Arc::new(Semaphore::new(bytes)),
            evict_before,
        }
    }

    /// `n` bytes of the budget. When they are not free, this evicts the reads older than
    /// [`PRESSURE_AGE`] and waits briefly for their bytes.
    async fn charge(&self, n: u32) -> Result<OwnedSemaphorePermit, Refused> {
        if let Ok(permit) = self.bytes.clone().try_acquire_many_owned(n) {
            return Ok(permit);
        }
        if let Some(cutoff) = Instant::now().checked_sub(PRESSURE_AGE) {
            // At most one eviction per PRESSURE_WAIT: every read in progress wakes for it.
            self.evict_before.send_if_modified(|before| {
                let due = cutoff >= *before + PRESSURE_WAIT;
                if due {
                    *before = cutoff;
                }
                due
            });
        }
        match tokio::time::timeout(PRESSURE_WAIT, self.bytes.clone().acquire_many_owned(n)).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(busy()),
        }
    }

    /// Resolves when a read that started at `started` is to give its bytes back.
    async fn evicted(&self, started: Instant) {
        let mut evict_before = self.evict_before.subscribe();
        if evict_before
            .wait_for(|before| *before > started)
            .await
            .is_err()
        {
            std::future::pending::<()>().await;
        }
    }
}

/// Open streams of one connection, and since when none has been open.
#[derive(Clone, Copy)]
struct Streams {
    open: usize,
    idle_since: Instant,
}

async fn serve_connection(
    conn: Conn,
    http2: Arc<http2::Builder<TokioExecutor>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let info = conn.connect_info();
    let remote = info.remote;
    let started = Instant::now();
    let (streams, mut watch_streams) = watch::channel(Streams {
        open: 0,
        idle_since: started,
    });
    let idle_bound = shared.limits.idle_connection_timeout;
    let service = EdgeService {
        shared,
        info,
        streams: Arc::new(streams),
    };
    let mut connection = pin!(http2.serve_connection(TokioIo::new(conn), service));
    let mut going_away: Option<Instant> = None;
    loop {
        let (bound, not_before) = match going_away {
            None => (idle_bound, started),
            Some(at) => (GOAWAY_LINGER, at),
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%remote, %error, "connection ended");
                }
                return;
            }
            _ = stop.cancelled(), if going_away.is_none() => {
                connection.as_mut().graceful_shutdown();
                going_away = Some(Instant::now());
            }
            _ = idle_for(&mut watch_streams, bound, not_before) => {
                if going_away.is_some() {
                    tracing::debug!(%remote, "dropping a connection that stayed open after GOAWAY");
                    return;
                }
                tracing::debug!(%remote, ?idle_bound, "closing an idle connection");
                connection.as_mut().graceful_shutdown();
                going_away = Some(Instant::now());
            }
        }
    }
}

/// Resolves once no stream has been open for `bound`, counting from `not_before` at the
/// earliest.
async fn idle_for(streams: &mut watch::Receiver<Streams>, bound: Duration, not_before: Instant) {
    loop {
        let now = *streams.borrow_and_update();
        if now.open == 0 {
            let deadline = now.idle_since.max(not_before) + bound;
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                changed = streams.changed() => if changed.is_err() { return },
            }
        } else if streams.changed().await.is_err() {
            return;
        }
    }
}

/// Counts a stream as open from its HEADERS until hyper drops its answer (sent or reset).
struct StreamGuard(Arc<watch::Sender<Streams>>);

impl StreamGuard {
    fn open(streams: Arc<watch::Sender<Streams>>) -> Self {
        streams.send_modify(|s| s.open += 1);
        Self(streams)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.send_modify(|s| {
            s.open -= 1;
            if s.open == 0 {
                s.idle_since = Instant::now();
            }
        });
    }
}

/// One connection's service. hyper calls it synchronously for every new stream, so the
/// stream counts as open before the connection task can think it idle.
#[derive(Clone)]
struct EdgeService {
    shared: Arc<Shared>,
    info: ConnInfo,
    streams: Arc<watch::Sender<Streams>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl hyper::service::Service<Request<Incoming>> for EdgeService {
    type Response = Response<GuardedBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let guard = StreamGuard::open(self.streams.clone());
        let shared = self.shared.clone();
        let info = self.info.clone();
        Box::pin(async move {
            let (response, source_slot) = handle(&shared, info, request).await;
            Ok(response.map(|inner| GuardedBody {
                inner,
                _stream: (guard, source_slot),
            }))
        })
    }
}

/// The request bytes a call counts against its source, released with the request.
#[derive(Clone)]
struct HeldBytes {
    _held: Arc<(Option<SourceSlot>, OwnedSemaphorePermit)>,
}

/// Serves one call; the source slot it returns is held until hyper is done with the answer.
async fn handle(
    shared: &Shared,
    info: ConnInfo,
    request: Request<Incoming>,
) -> (Response<tonic::body::Body>, Option<SourceSlot>) {
    let received = Instant::now();
    let client_deadline = grpc_timeout(request.headers()).map(|t| received + t);
    let read_deadline = received + shared.limits.request_read_deadline;
    let remote = info.remote;
    // Held until the answer is done: the stream counts against its source from its HEADERS.
    let Ok(source_slot) = shared.streams_per_source.try_acquire(Some(remote.ip())) else {
        shared.metrics.observe_refusal(REFUSED_SOURCE_STREAMS);
        tracing::debug!(%remote, "too many open streams from this source; refusing a call");
        return (
            Status::resource_exhausted("too many calls from this address at once; retry")
                .into_http(),
            None,
        );
    };
    let (mut parts, body) = request.into_parts();
    let call = async {
        let read = read_request(body, shared.limits.max_message_bytes, &shared.budget);
        let body = match tokio::time::timeout_at(read_deadline, read).await {
            Ok(Ok(body)) => body,
            Ok(Err(refusal)) => {
                if let Some(reason) = refusal.reason {
                    shared.metrics.observe_refusal(reason);
                }
                tracing::debug!(%remote, path = %parts.uri.path(), message = refusal.status.message(), "request refused at the edge");
                return refusal.status.into_http();
            }
            Err(_) => {
                shared.metrics.observe_refusal(REFUSED_READ_DEADLINE);
                tracing::debug!(%remote, path = %parts.uri.path(), "request message not received in time; resetting the stream");
                return Status::deadline_exceeded("request message not received in time")
                    .into_http();
            }
        };
        // Counted until the answer is done, with the stream (the request may wait in a queue).
        let held = body.data.as_ref().map_or(0, Bytes::len);
        let Ok(bytes_slot) = shared
            .request_bytes_per_source
            .try_acquire_many(Some(remote.ip()), held)
        else {
            shared.metrics.observe_refusal(REFUSED_SOURCE_BYTES);
            tracing::debug!(%remote, held, "too many request bytes held for this source; refusing a call");
            return Status::resource_exhausted("too many calls from this address at once; retry")
                .into_http();
        };
        let held_u32 = u32::try_from(held).unwrap_or(u32::MAX);
        let Ok(bytes_permit) = shared
            .request_bytes
            .clone()
            .try_acquire_many_owned(held_u32)
        else {
            shared.metrics.observe_refusal(REFUSED_HELD_BYTES);
            tracing::debug!(%remote, held, "too many request bytes held in all; refusing a call");
            return Status::resource_exhausted("server busy; retry").into_http();
        };
        parts.extensions.insert(HeldBytes {
            _held: Arc::new((bytes_slot, bytes_permit)),
        });
        parts.extensions.insert(info);
        let routes = shared.routes.clone();
        match tower::ServiceExt::oneshot(routes, Request::from_parts(parts, body)).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    };
    let response = match client_deadline {
        None => call.await,
        // As tonic's server answers when the client's deadline passes.
        Some(deadline) => tokio::time::timeout_at(deadline, call)
            .await
            .unwrap_or_else(|_| Status::cancelled("Timeout expired").into_http()),
    };
    (response, source_slot)
}

/// A request the edge will not pass on: the answer, and the `istio_csr_refusals_total`
/// reason when the refusal is one of the edge's bounds (not a failed stream).
#[derive(Debug)]
struct Refused {
    status: Status,
    reason: Option<&'static str>,
}

impl Refused {
    #[cfg(test)]
    fn code(&self) -> tonic::Code {
        self.status.code()
    }
}

fn too_large(max_message_bytes: usize) -> Refused {
    Refused {
        status: Status::resource_exhausted(format!(
            "request message larger than the limit of {max_message_bytes} bytes"
        )),
        reason: Some(REFUSED_TOO_LARGE),
    }
}

fn busy() -> Refused {
    Refused {
        status: Status::resource_exhausted("too many requests being received at once; retry"),
        reason: Some(REFUSED_BUDGET),
    }
}

/// Reads a request body to its end: one length-prefixed message (and trailers, if any).
/// It refuses the body as soon as the prefix announces too big a message, the body grows
/// beyond one message of the largest size, or the budget cannot cover the buffer.
async fn read_request<B>(
    body: B,
    max_message_bytes: usize,
    budget: &Budget,
) -> Result<Buffered, Refused>
where
    B: Body<Data = Bytes> + Unpin,
{
    let started = Instant::now();
    tokio::select! {
        read = read_body(body, max_message_bytes, budget) => read,
        () = budget.evicted(started) => Err(Refused {
            status: Status::resource_exhausted(
                "server busy and the request message is slow to arrive; retry",
            ),
            reason: Some(REFUSED_BUDGET),
        }),
    }
}

async fn read_body<B>(
    mut body: B,
    max_message_bytes: usize,
    budget: &Budget,
) -> Result<Buffered, Refused>
where
    B: Body<Data = Bytes> + Unpin,
{
    let limit = max_message_bytes + GRPC_PREFIX_BYTES;
    let mut charge = budget.charge(STREAM_CHARGE_BYTES).await?;
    let mut buffer: Vec<u8> = Vec::new();
    let mut trailers = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|_| Refused {
            status: Status::cancelled("request stream failed"),
            reason: None,
        })?;
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        let needed = buffer.len() + data.len();
        if needed > limit {
            return Err(too_large(max_message_bytes));
        }
        if needed > buffer.capacity() {
            // Our own buffer, grown under the budget. h2's chunks share its read buffers
            // and would pin more memory than they hold.
            let capacity = needed.max(buffer.capacity() * 2).min(limit);
            let extra = u32::try_from(capacity - buffer.capacity()).unwrap_or(u32::MAX);
            charge.merge(budget.charge(extra).await?);
            buffer.reserve_exact(capacity - buffer.len());
        }
        buffer.extend_from_slice(&data);
        if let Some(prefix) = buffer.get(1..GRPC_PREFIX_BYTES) {
            let declared = u32::from_be_bytes(prefix.try_into().expect("4 bytes"));
            if usize::try_from(declared).map_or(true, |n| n > max_message_bytes) {
                return Err(too_large(max_message_bytes));
            }
        }
    }
    Ok(Buffered {
        data: (!buffer.is_empty()).then(|| Bytes::from(buffer)),
        trailers,
        _charge: charge,
    })
}

/// A request body read in full, replayed to tonic. Its budget charge is returned when tonic
/// drops it, once the message is decoded.
struct Buffered {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    _charge: OwnedSemaphorePermit,
}

impl Body for Buffered {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// An answer that keeps its stream counted as open until hyper is done with it.
struct GuardedBody {
    inner: tonic::body::Body,
    _stream: (StreamGuard, Option<SourceSlot>),
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's `grpc-timeout` (gRPC over HTTP/2: at most 8 digits and a unit).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if !(2..=9).contains(&value.len()) {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A request body sent as these chunks, then either ended or stalled forever.
    struct Chunks {
        chunks: VecDeque<Bytes>,
        stall: bool,
        /// Chunks handed out so far: shows whether the reader stopped early.
        taken: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Chunks {
        fn new(chunks: &[&[u8]], stall: bool) -> Self {
            Self {
                chunks: chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect(),
                stall,
                taken: Arc::default(),
            }
        }
    }

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.chunks.pop_front() {
                Some(chunk) => {
                    self.taken
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                None if self.stall => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    fn message(len: usize) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        out.resize(GRPC_PREFIX_BYTES + len, b'x');
        out
    }

    async fn collect(mut body: Buffered) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            out.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_message_in_several_chunks_is_replayed_whole_and_its_charge_returned() {
        let budget = Budget::new(1 << 20);
        let whole = message(3000);
        let chunks: Vec<&[u8]> = whole.chunks(7).collect();
        let body = read_request(Chunks::new(&chunks, false), 4096, &budget)
            .await
            .unwrap();
        assert!(
            budget.bytes.available_permits() < 1 << 20,
            "nothing was charged"
        );
        assert_eq!(collect(body).await, whole);
        assert_eq!(budget.bytes.available_permits(), 1 << 20);
    }

    #[tokio::test]
    async fn an_announced_over_size_message_is_refused_before_the_rest_is_read() {
        let budget = Budget::new(1 << 20);
        let whole = message(5000);
        let chunks: Vec<&[u8]> = whole.chunks(1000).collect();
        let body = Chunks::new(&chunks, true);
        let taken = body.taken.clone();
        let refusal = read_request(body, 4096, &budget).await.err().unwrap();
        assert_eq!(refusal.code(), tonic::Code::ResourceExhausted);
        assert_eq!(taken.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(budget.bytes.available_permits(), 1 << 20);
    }

    #[tokio::test]
    async fn more_than_one_largest_message_is_refused() {
        let budget = Budget::new(1 << 20);
        let first = message(4096);
        let second = message(10);
        let refusal = read_request(Chunks::new(&[&first, &second], false), 4096, &budget)
            .await
            .err()
            .unwrap();
        assert_eq!(refusal.code(), tonic::Code::ResourceExhausted);
    }

    #[tokio::test(start_paused = true)]
    async fn a_used_up_budget_refuses_new_requests_until_bytes_are_returned() {
        let budget = Budget::new(STREAM_CHARGE_BYTES as usize + 1000);
        let small = message(500);
        let held = read_request(Chunks::new(&[&small], false), 4096, &budget)
            .await
            .unwrap();
        let refusal = read_request(Chunks::new(&[&small], false), 4096, &budget)
            .await
            .err()
            .unwrap();
        assert_eq!(refusal.code(), tonic::Code::ResourceExhausted);
        // A message bigger than what is left of the budget is refused as well.
        drop(held);
        let big = message(2000);
        let refusal = read_request(Chunks::new(&[&big], false), 4096, &budget)
            .await
            .err()
            .unwrap();
        assert_eq!(refusal.code(), tonic::Code::ResourceExhausted);
        assert!(
            read_request(Chunks::new(&[&small], false), 4096, &budget)
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn under_pressure_a_slow_read_is_evicted_for_a_new_request() {
        let budget = Arc::new(Budget::new(STREAM_CHARGE_BYTES as usize + 1000));
        let half = message(500);
        let stalled = tokio::spawn({
            let budget = budget.clone();
            async move {
                let body = Chunks::new(&[&half[..300]], true);
                read_request(body, 4096, &budget).await.err().unwrap()
            }
        });
        tokio::time::sleep(PRESSURE_AGE / 2).await;
        // The stalled read is young: nothing to evict yet.
        let small = message(500);
        let refusal = read_request(Chunks::new(&[&small], false), 4096, &budget)
            .await
            .err()
            .unwrap();
        assert_eq!(refusal.code(), tonic::Code::ResourceExhausted);
        assert!(!stalled.is_finished());
        // Once it is older than a real client ever takes, it makes room.
        tokio::time::sleep(PRESSURE_AGE).await;
        let body = read_request(Chunks::new(&[&small], false), 4096, &budget)
            .await
            .unwrap();
        assert_eq!(collect(body).await, small);
        assert_eq!(
            stalled.await.unwrap().code(),
            tonic::Code::ResourceExhausted
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_holds_its_charge_only_until_the_read_is_abandoned() {
        let budget = Budget::new(1 << 20);
        let whole = message(3000);
        let read = read_request(Chunks::new(&[&whole[..1000]], true), 4096, &budget);
        let timed = tokio::time::timeout(Duration::from_secs(10), read).await;
        assert!(timed.is_err(), "a stalled body finished");
        assert_eq!(budget.bytes.available_permits(), 1 << 20);
    }

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        let parse = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse("20000m"), Some(Duration::from_secs(20)));
        assert_eq!(parse("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "10x", "+1S", "1.5S", "-1S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_once_no_stream_has_been_open_for_the_bound() {
        let start = Instant::now();
        let (tx, mut rx) = watch::channel(Streams {
            open: 0,
            idle_since: start,
        });
        let tx = Arc::new(tx);
        let bound = Duration::from_secs(60);
        let guard = StreamGuard::open(tx.clone());
        let idle = tokio::spawn(async move {
            idle_for(&mut rx, bound, start).await;
            Instant::now()
        });
        // Open for 10 minutes: never idle meanwhile.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!idle.is_finished());
        drop(guard);
        let closed_at = idle.await.unwrap();
        assert_eq!(closed_at - start, Duration::from_secs(660));
    }
}

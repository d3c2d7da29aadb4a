//! A client-side token bucket for Kubernetes API calls, like client-go's QPS and burst but with
//! generous defaults: it guards the API server against a runaway loop, and must never be what
//! makes a restart storm fail (istio-csr's 5 QPS did).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tower::{Layer, Service};

/// Tokens are reserved in arrival order: a caller that finds the bucket empty is told how long
/// to wait, and later callers queue behind it, so nobody starves.
struct Bucket {
    qps: f64,
    burst: f64,
    tokens: f64,
    refreshed: Instant,
}

impl Bucket {
    fn reserve(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.refreshed).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.qps).min(self.burst);
        self.refreshed = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            // Flags keep qps sane; a wait that cannot be represented is no reason to panic.
            Duration::try_from_secs_f64(-self.tokens / self.qps).unwrap_or(Duration::MAX)
        }
    }
}

/// Shared by every client of one cluster. `None` inside: unlimited.
#[derive(Clone)]
pub struct RateLimitLayer {
    bucket: Option<Arc<Mutex<Bucket>>>,
    waited: Counter<f64, std::sync::atomic::AtomicU64>,
}

impl RateLimitLayer {
    /// `qps` requests per second on average, `burst` at once; `qps` 0 turns limiting off.
    pub fn new(qps: f64, burst: u32, waited: Counter<f64, std::sync::atomic::AtomicU64>) -> Self {
        let bucket = (qps > 0.0).then(|| {
            let burst = f64::from(burst.max(1));
            Arc::new(Mutex::new(Bucket {
                qps,
                burst,
                tokens: burst,
                refreshed: Instant::now(),
            }))
        });
        Self { bucket, waited }
    }

    /// The counter of seconds spent waiting, for `register`.
    pub fn register_wait_counter(
        registry: &mut Registry,
    ) -> Counter<f64, std::sync::atomic::AtomicU64> {
        let waited = Counter::default();
        registry.register(
            "kube_api_rate_limit_wait_seconds",
            "Seconds Kubernetes API calls waited for the client-side rate limit (--kube-api-qps).",
            waited.clone(),
        );
        waited
    }

    /// How long the next call must wait before it may go.
    fn reserve(&self) -> Duration {
        match &self.bucket {
            // A poisoned lock means a panic mid-arithmetic; limiting is not worth failing calls.
            Some(bucket) => bucket
                .lock()
                .map(|mut b| b.reserve(Instant::now()))
                .unwrap_or(Duration::ZERO),
            None => Duration::ZERO,
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;

    fn layer(&self, inner: S) -> RateLimited<S> {
        RateLimited {
            inner,
            limit: self.clone(),
            state: Permit::None,
        }
    }
}

/// Where the next call stands: the wait happens in `poll_ready`, as tower intends, so the
/// client's request queue holds callers in arrival order.
enum Permit {
    None,
    Waiting(Pin<Box<tokio::time::Sleep>>),
    Granted,
}

pub struct RateLimited<S> {
    inner: S,
    limit: RateLimitLayer,
    state: Permit,
}

impl<S, Req> Service<Req> for RateLimited<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        loop {
            match &mut self.state {
                Permit::None => {
                    let wait = self.limit.reserve();
                    self.state = if wait.is_zero() {
                        Permit::Granted
                    } else {
                        self.limit.waited.inc_by(wait.as_secs_f64());
                        Permit::Waiting(Box::pin(tokio::time::sleep(wait)))
                    };
                }
                Permit::Waiting(sleep) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.state = Permit::Granted;
                }
                Permit::Granted => return self.inner.poll_ready(cx),
            }
        }
    }

    fn call(&mut self, request: Req) -> S::Future {
        self.state = Permit::None;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn bucket(qps: f64, burst: f64) -> Bucket {
        Bucket {
            qps,
            burst,
            tokens: burst,
            refreshed: Instant::now(),
        }
    }

    #[test]
    fn a_burst_passes_at_once_then_calls_are_spaced_by_the_rate() {
        let mut b = bucket(10.0, 3.0);
        let now = Instant::now();
        let waits: Vec<Duration> = (0..6).map(|_| b.reserve(now)).collect();
        assert_eq!(&waits[..3], &[Duration::ZERO; 3]);
        let ms: Vec<u128> = waits[3..].iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_refill_with_time_up_to_the_burst_only() {
        let mut b = bucket(10.0, 3.0);
        let start = Instant::now();
        for _ in 0..3 {
            b.reserve(start);
        }
        // A long idle time refills to the burst, not beyond it.
        let later = start + Duration::from_secs(60);
        let waits: Vec<Duration> = (0..4).map(|_| b.reserve(later)).collect();
        assert_eq!(&waits[..3], &[Duration::ZERO; 3]);
        assert_eq!(waits[3].as_millis(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_beyond_the_burst_wait_and_the_wait_is_counted() {
        let waited = Counter::default();
        let layer = RateLimitLayer::new(100.0, 2, waited.clone());
        let mut service = layer.layer(tower::service_fn(|()| async {
            Ok::<_, std::convert::Infallible>(Instant::now())
        }));
        let start = Instant::now();
        let mut answered = Vec::new();
        for _ in 0..4 {
            let ready = service.ready().await.unwrap();
            answered.push(ready.call(()).await.unwrap() - start);
        }
        assert_eq!(answered[0], Duration::ZERO);
        assert_eq!(answered[1], Duration::ZERO);
        assert_eq!(answered[2].as_millis(), 10);
        assert_eq!(answered[3].as_millis(), 20);
        assert!(waited.get() > 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_qps_means_unlimited() {
        let layer = RateLimitLayer::new(0.0, 1, Counter::default());
        assert!((0..10_000).all(|_| layer.reserve().is_zero()));
    }
}

//! A deadline on every Kubernetes API request except watches: a hung API server must not
//! hang a caller. Not hyper's read timeout alone: that one also cuts a quiet watch, which the
//! API server keeps open for minutes without a byte (kube-runtime's watcher has its own idle
//! timeout for those), so every watch was torn down and re-made each time it elapsed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower::{BoxError, Layer, Service};

use super::api_metrics::is_watch;

#[derive(Debug, thiserror::Error)]
#[error("the API server did not answer within {0:?}")]
pub struct DeadlineExceeded(Duration);

#[derive(Clone)]
pub struct DeadlineLayer {
    limit: Duration,
}

impl DeadlineLayer {
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
}

impl<S, B, R> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limit = (!is_watch(request.uri())).then_some(self.limit);
        let call = self.inner.call(request);
        Box::pin(async move {
            let Some(limit) = limit else {
                return call.await.map_err(Into::into);
            };
            match tokio::time::timeout(limit, call).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(DeadlineExceeded(limit)) as BoxError),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers after `delay`.
    #[derive(Clone)]
    struct Slow(Duration);

    impl Service<Request<()>> for Slow {
        type Response = Response<()>;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            let delay = self.0;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(Response::new(()))
            })
        }
    }

    fn request(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_gets_the_deadline_and_a_watch_does_not() {
        let mut service =
            DeadlineLayer::new(Duration::from_secs(15)).layer(Slow(Duration::from_secs(60)));
        let error = service
            .call(request("/api/v1/namespaces/a/configmaps/b"))
            .await
            .unwrap_err();
        assert!(error.is::<DeadlineExceeded>(), "{error}");
        service
            .call(request("/api/v1/configmaps?watch=true&timeoutSeconds=290"))
            .await
            .expect("a watch outlives the deadline");
    }
}

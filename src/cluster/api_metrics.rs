//! Counts every Kubernetes API call by verb, resource and HTTP code: the evidence that a CSR
//! costs two writes and at most one TokenReview, and no GET or poll.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Method, Request, Response, Uri};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub verb: &'static str,
    pub resource: &'static str,
    pub code: &'static str,
}

/// Resources this program touches; anything else is counted as `other` (bounded labels).
const KNOWN_RESOURCES: &[&str] = &[
    "certificaterequests",
    "certificaterequests/status",
    "certificatesigningrequests",
    "certificatesigningrequests/approval",
    "configmaps",
    "leases",
    "namespaces",
    "pods",
    "secrets",
    "serviceaccounts",
    "serviceaccounts/token",
    "tokenreviews",
];
const KNOWN_CODES: &[&str] = &[
    "200", "201", "202", "204", "400", "401", "403", "404", "409", "410", "422", "429", "500",
    "502", "503", "504",
];

#[derive(Clone)]
pub struct ApiMetricsLayer {
    requests: Family<ApiLabels, Counter>,
}

impl ApiMetricsLayer {
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::default();
        registry.register(
            "kube_api_requests",
            "Kubernetes API requests made, by verb, resource and HTTP status code (error: no answer).",
            requests.clone(),
        );
        Self { requests }
    }
}

impl<S> Layer<S> for ApiMetricsLayer {
    type Service = ApiMetrics<S>;

    fn layer(&self, inner: S) -> ApiMetrics<S> {
        ApiMetrics {
            inner,
            requests: self.requests.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ApiMetrics<S> {
    inner: S,
    requests: Family<ApiLabels, Counter>,
}

impl<S, B, R> Service<Request<B>> for ApiMetrics<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (verb, resource) = classify(request.method(), request.uri());
        let requests = self.requests.clone();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                Ok(response) => {
                    let code = response.status().as_str().to_owned();
                    KNOWN_CODES
                        .iter()
                        .find(|c| **c == code)
                        .copied()
                        .unwrap_or("other")
                }
                Err(_) => "error",
            };
            requests
                .get_or_create(&ApiLabels {
                    verb,
                    resource,
                    code,
                })
                .inc();
            result
        })
    }
}

/// (verb, resource) of an API request, in kubectl's vocabulary.
pub fn classify(method: &Method, uri: &Uri) -> (&'static str, &'static str) {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let rest: &[&str] = match segments.first() {
        Some(&"api") => segments.get(2..).unwrap_or_default(),
        Some(&"apis") => segments.get(3..).unwrap_or_default(),
        _ => return (verb_of(method, false, false), "other"),
    };
    // namespaces/<ns>/<resource>... is a namespaced resource; namespaces[/<name>] is itself.
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let watch = is_watch(uri);
    let resource = match rest {
        [resource, _, sub, ..] => format!("{resource}/{sub}"),
        [resource, ..] => (*resource).to_owned(),
        [] => String::new(),
    };
    let resource = KNOWN_RESOURCES
        .iter()
        .find(|r| **r == resource)
        .copied()
        .unwrap_or("other");
    (verb_of(method, rest.len() >= 2, watch), resource)
}

/// A watch request (`?watch=true`): a response that streams for minutes.
pub fn is_watch(uri: &Uri) -> bool {
    uri.query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"))
}

fn verb_of(method: &Method, named: bool, watch: bool) -> &'static str {
    match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_requests_like_kubectl_names_them() {
        let cases = [
            (
                "POST",
                "/apis/cert-manager.io/v1/namespaces/istio-system/certificaterequests",
                ("create", "certificaterequests"),
            ),
            (
                "DELETE",
                "/apis/cert-manager.io/v1/namespaces/istio-system/certificaterequests/istio-csr-x",
                ("delete", "certificaterequests"),
            ),
            (
                "GET",
                "/apis/cert-manager.io/v1/namespaces/istio-system/certificaterequests?watch=true&resourceVersion=1",
                ("watch", "certificaterequests"),
            ),
            (
                "GET",
                "/apis/cert-manager.io/v1/namespaces/istio-system/certificaterequests?limit=500",
                ("list", "certificaterequests"),
            ),
            (
                "GET",
                "/apis/cert-manager.io/v1/namespaces/istio-system/certificaterequests/x",
                ("get", "certificaterequests"),
            ),
            (
                "PATCH",
                "/apis/cert-manager.io/v1/namespaces/ns/certificaterequests/x/status",
                ("patch", "certificaterequests/status"),
            ),
            (
                "POST",
                "/apis/authentication.k8s.io/v1/tokenreviews",
                ("create", "tokenreviews"),
            ),
            (
                "POST",
                "/api/v1/namespaces/ns/serviceaccounts/web/token",
                ("create", "serviceaccounts/token"),
            ),
            ("GET", "/api/v1/namespaces", ("list", "namespaces")),
            ("GET", "/api/v1/namespaces/default", ("get", "namespaces")),
            ("GET", "/api/v1/namespaces/ns/pods/p", ("get", "pods")),
            ("GET", "/version", ("list", "other")),
            ("GET", "/apis/example.com/v1/widgets", ("list", "other")),
        ];
        for (method, uri, want) in cases {
            let method: Method = method.parse().unwrap();
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(classify(&method, &uri), want, "{method} {uri}");
        }
    }
}

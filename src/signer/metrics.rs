//! The signer's metric families. Label values are bounded: gRPC code names, signer kinds and
//! authentication methods; never identities, namespaces or pods.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tonic::Code;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub code: &'static str,
    /// The signing backend: cert-manager, kube-csr or local-ca.
    pub backend: &'static str,
    /// The tenant signer (a name of the signer table), else "default".
    pub signer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    pub method: &'static str,
    pub result: &'static str,
}

#[derive(Clone)]
pub struct SignerMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<CodeLabels, Histogram, fn() -> Histogram>,
    in_flight: Gauge,
    authentications: Family<AuthLabels, Counter>,
    lifetime: Histogram,
    log_lines_suppressed: Family<ReasonLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
}

impl SignerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::default();
        registry.register(
            "certificate_requests",
            "CreateCertificate calls answered, by gRPC result code, backend and tenant signer.",
            requests.clone(),
        );
        let duration = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "certificate_request_duration",
            "Time from receiving a CreateCertificate call to answering it, by gRPC result code.",
            Unit::Seconds,
            duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "certificate_requests_in_flight",
            "CreateCertificate calls being handled now.",
            in_flight.clone(),
        );
        let authentications = Family::default();
        registry.register(
            "authentications",
            "Authentication attempts of CreateCertificate callers, by method and result.",
            authentications.clone(),
        );
        // 5 minutes to a week: Istio asks for 24h; operators clamp to 1h or less.
        let lifetime = Histogram::new([
            300.0, 600.0, 1800.0, 3600.0, 7200.0, 21_600.0, 43_200.0, 86_400.0, 604_800.0,
        ]);
        registry.register_with_unit(
            "issued_certificate_lifetime",
            "Validity period (notAfter - notBefore) of the certificates issued.",
            Unit::Seconds,
            lifetime.clone(),
        );
        let log_lines_suppressed = Family::default();
        registry.register(
            "log_lines_suppressed",
            "Refusal log lines not written because too many came at once, by reason (the gRPC code).",
            log_lines_suppressed.clone(),
        );
        let refusals = Family::default();
        registry.register(
            "refusals",
            "Connections and calls refused by a bound before reaching a signer, by reason (see docs/admin-api.md).",
            refusals.clone(),
        );
        Self {
            requests,
            duration,
            in_flight,
            authentications,
            lifetime,
            log_lines_suppressed,
            refusals,
        }
    }

    pub fn observe_request(&self, code: Code, backend: &'static str, signer: &str, seconds: f64) {
        let code = code_name(code);
        self.requests
            .get_or_create(&RequestLabels {
                code,
                backend,
                signer: signer.to_owned(),
            })
            .inc();
        self.duration
            .get_or_create(&CodeLabels { code })
            .observe(seconds);
    }

    pub fn observe_authentication(&self, method: &'static str, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.authentications
            .get_or_create(&AuthLabels { method, result })
            .inc();
    }

    pub fn observe_lifetime(&self, seconds: f64) {
        self.lifetime.observe(seconds);
    }

    /// A refusal log line of `reason` was dropped by the rate limit.
    pub fn observe_suppressed_log_line(&self, reason: &'static str) {
        self.log_lines_suppressed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A connection or call was refused by one of the edge's or the pipeline's bounds;
    /// `reason` is one of a fixed set of labels.
    pub fn observe_refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts a call in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }
}

/// 0.5 ms to 32 s: local signing sits at the bottom, issuance timeouts at the top.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The canonical gRPC status names (as grpc-go and the gRPC spec spell them).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

//! The admin HTTP API: liveness and readiness now; metrics and bundle status join it next.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use serde_free::VerboseQuery;

use crate::signer::issuer::Issuer;
use crate::signer::tls::ServingCertResolver;

/// What readiness is made of. Each part is owned by the subsystem that sets it.
pub struct Readiness {
    pub serving_cert: Arc<ServingCertResolver>,
    pub issuer: Arc<dyn Issuer>,
    pub grpc_listening: AtomicBool,
    /// Set first thing on SIGTERM, so load balancers drain this replica before it closes.
    pub shutting_down: AtomicBool,
}

impl Readiness {
    fn checks(&self) -> [(&'static str, bool); 4] {
        [
            ("serving-certificate", self.serving_cert.is_loaded()),
            ("grpc-listener", self.grpc_listening.load(Ordering::Acquire)),
            ("issuer", self.issuer.ready()),
            (
                "not-shutting-down",
                !self.shutting_down.load(Ordering::Acquire),
            ),
        ]
    }
}

pub fn router(readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(readiness)
}

async fn readyz(
    State(readiness): State<Arc<Readiness>>,
    Query(query): Query<VerboseQuery>,
) -> (StatusCode, String) {
    let checks = readiness.checks();
    let ready = checks.iter().all(|(_, ok)| *ok);
    let mut body = String::new();
    if query.verbose.is_some() {
        for (name, ok) in checks {
            body.push_str(&format!("[{}] {name}\n", if ok { "+" } else { "-" }));
        }
    }
    body.push_str(if ready { "ok\n" } else { "not ready\n" });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

mod serde_free {
    //! `?verbose` carries no value; a map keeps the query extractor free of serde derives.
    use std::collections::HashMap;

    pub struct VerboseQuery {
        pub verbose: Option<String>,
    }

    impl<'de> serde::Deserialize<'de> for VerboseQuery {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let mut map = HashMap::<String, String>::deserialize(d)?;
            Ok(Self {
                verbose: map.remove("verbose"),
            })
        }
    }
}

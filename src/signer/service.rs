//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: the pipeline the README's
//! "What the signer enforces" describes.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost_types::value::Kind;
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status};

use super::admission::{SeatLimits, Seats};
use super::authn::node::{NodeAuthorizer, NodeCheckError};
use super::authn::{self, Authenticator, Caller, Credentials};
use super::error::{SignError, to_status};
use super::issuance::{Certified, Issuance};
use super::issuer::{IssueRequest, LeafNames, NO_ANNOTATIONS, Purpose};
use super::listener::ConnInfo;
use super::log_guard::{
    Admission, MAX_DETAIL_BYTES, MAX_VALUE_BYTES, REFUSAL_LINES_PER_SECOND, RateLimiter, sanitize,
};
use super::metrics::{SignerMetrics, code_name};
use super::tenants::{Tenant, TenantError, TenantTable};
use crate::cluster::{ClusterRegistry, ClusterTarget};
use crate::pki::csr;
use crate::pki::identity::SpiffeId;
use crate::proto::istio_v1_auth::istio_certificate_service_server::IstioCertificateService;
use crate::proto::istio_v1_auth::{IstioCertificateRequest, IstioCertificateResponse};

/// pilot-agent's metadata key naming a signer (Kubernetes CSR API signer names).
const META_CERT_SIGNER: &str = "CertSigner";
/// ztunnel's metadata key naming the workload it requests a certificate for.
const META_IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Values in a request's metadata Struct, nested ones included. pilot-agent sends one
/// (CertSigner) and ztunnel one (ImpersonatedIdentity); a few more leave room for clients
/// to come, while a message of tiny entries cannot make a large decoded request wait.
pub const MAX_METADATA_VALUES: usize = 16;
/// Nesting of Structs and lists in the metadata: every key read here is at the top.
pub const MAX_METADATA_DEPTH: usize = 2;

pub struct Settings {
    pub max_lifetime: Duration,
    /// `namespace/name` of service accounts allowed to impersonate (ztunnel).
    pub trusted_node_accounts: Vec<String>,
    /// Seats of each pipeline stage (authentication, then issuance): every stage admits
    /// calls by these bounds, fairly across source addresses (admission.rs).
    pub admission: SeatLimits,
    /// Impersonated identities must be of this trust domain.
    pub trust_domain: String,
}

pub struct CaService {
    settings: Settings,
    metrics: SignerMetrics,
    clusters: ClusterRegistry,
    authenticators: Vec<Arc<dyn Authenticator>>,
    issuance: Issuance,
    /// Tenant signers (`--signers-file`, `--mesh-config`); empty without them.
    tenants: watch::Receiver<Arc<TenantTable>>,
    /// Authenticating callers (a TokenReview at most): bounded on its own, so a flood of
    /// tokens to review cannot take the seats of callers already authenticated.
    authentication: Seats,
    /// The node check, the CSR check and the issuer's signing.
    issuance_seats: Seats,
    node_authorizer: Option<Arc<dyn NodeAuthorizer>>,
    /// Bounds the refusal lines per gRPC code (log_guard.rs).
    refusal_log: RateLimiter,
}

impl CaService {
    pub fn new(
        settings: Settings,
        metrics: SignerMetrics,
        clusters: ClusterRegistry,
        authenticators: Vec<Arc<dyn Authenticator>>,
        issuance: Issuance,
    ) -> Self {
        let authentication = Seats::new(settings.admission);
        let issuance_seats = Seats::new(settings.admission);
        Self {
            settings,
            metrics,
            clusters,
            authenticators,
            issuance,
            tenants: watch::channel(Arc::new(TenantTable::default())).1,
            authentication,
            issuance_seats,
            node_authorizer: None,
            refusal_log: RateLimiter::new(REFUSAL_LINES_PER_SECOND),
        }
    }

    async fn sign(
        &self,
        request: &Request<IstioCertificateRequest>,
        source: Option<IpAddr>,
        caller_out: &mut Option<Caller>,
        tenant_out: &mut Option<Arc<Tenant>>,
    ) -> Result<Signed, SignError> {
        // Checked before the call waits anywhere: a request it refuses is held no longer.
        let body = request.get_ref();
        check_metadata_bounds(body.metadata.as_ref())?;
        let options = RequestOptions::from_metadata(body.metadata.as_ref())?;
        let metadata = request.metadata();
        let cluster_id = match metadata.get("clusterid") {
            Some(v) => v
                .to_str()
                .map_err(|_| authn::AuthnError::UnknownCluster("<non-ascii>".into()))?,
            None => "",
        };
        let cluster = self
            .clusters
            .resolve(cluster_id)
            .map_err(|e| authn::AuthnError::UnknownCluster(e.0))?;
        let bearer = authn::parse_bearer(metadata.get("authorization").map(|v| v.as_bytes()))?;
        let peer_certs = request
            .extensions()
            .get::<ConnInfo>()
            .and_then(|info| info.peer_certs.as_deref());
        let credentials = Credentials {
            bearer,
            peer_certs: peer_certs.map(Vec::as_slice),
            cluster: &cluster,
        };
        let presented = credential_kind(&credentials);
        let caller = {
            let _seat = self.authentication.admit(source).await?;
            authn::authenticate(&self.authenticators, &credentials).await
        };
        self.metrics
            .observe_authentication(presented, caller.is_ok());
        let caller = caller_out.insert(caller?);

        // Only authenticated callers reach the issuance stage.
        let _seat = self.issuance_seats.admit(source).await?;
        let _in_flight = self.metrics.in_flight();
        let allowed = match options.impersonated_identity {
            Some(identity) => vec![self.check_impersonation(&cluster, caller, identity).await?],
            None => caller.identities.clone(),
        };

        let csr = check_csr(&body.csr, &allowed)?;

        // Decided before any request reaches an issuer (tenants/mod.rs).
        let table = self.tenants.borrow().clone();
        let tenant = select_tenant(&table, &allowed, options.cert_signer).inspect_err(|e| {
            // A table name refused for this namespace is counted under its name.
            if let SignError::Tenant(TenantError::NotAllowed { signer, .. }) = e {
                tenant_out.clone_from(&table.get(signer).cloned());
            }
        })?;
        tenant_out.clone_from(&tenant);

        let lifetime = clamp_lifetime(body.validity_duration, self.settings.max_lifetime);
        let names = LeafNames::identities(&csr.identities);
        let Certified {
            chain: verified,
            roots,
        } = self
            .issuance
            .issue_for(
                tenant.as_deref(),
                IssueRequest {
                    purpose: Purpose::Workload,
                    csr: &csr,
                    names: &names,
                    lifetime,
                    route: None,
                    annotations: &NO_ANNOTATIONS,
                },
            )
            .await?;
        Ok(Signed {
            lifetime_secs: verified.lifetime_secs() as f64,
            response: IstioCertificateResponse {
                cert_chain: verified.to_response(&roots),
            },
        })
    }

    /// README "Impersonation (ztunnel)": the caller must be a trusted node account, the identity
    /// well-formed and of our trust domain, and a pod of it must run on the caller's node.
    /// That last check needs the Kubernetes API: without it every impersonation is refused.
    async fn check_impersonation(
        &self,
        cluster: &ClusterTarget,
        caller: &Caller,
        identity: &str,
    ) -> Result<SpiffeId, SignError> {
        let account = caller
            .service_account
            .as_ref()
            .map(|sa| format!("{}/{}", sa.namespace, sa.name))
            .ok_or_else(|| SignError::Impersonation("caller has no service account".into()))?;
        if !self.settings.trusted_node_accounts.contains(&account) {
            return Err(SignError::Impersonation(format!(
                "{account} is not a trusted node account"
            )));
        }
        let identity: SpiffeId = identity
            .parse()
            .map_err(|e| SignError::Impersonation(format!("requested identity: {e}")))?;
        if identity.trust_domain() != self.settings.trust_domain {
            return Err(SignError::Impersonation(format!(
                "{identity} is not of trust domain {}",
                self.settings.trust_domain
            )));
        }
        let Some(nodes) = &self.node_authorizer else {
            return Err(SignError::Impersonation(format!(
                "cannot verify that {identity} runs on the caller's node without Kubernetes"
            )));
        };
        match nodes.authorize(cluster, caller, &identity).await {
            Ok(()) => Ok(identity),
            Err(NodeCheckError::Refused(why)) => Err(SignError::Impersonation(why)),
            Err(NodeCheckError::Unavailable(why)) => Err(SignError::NodeCheckUnavailable(why)),
        }
    }

    /// Enables impersonation (ztunnel) through `authorizer`'s pod-on-node check.
    pub fn with_node_authorizer(mut self, authorizer: Arc<dyn NodeAuthorizer>) -> Self {
        self.node_authorizer = Some(authorizer);
        self
    }

    pub fn with_tenants(mut self, tenants: watch::Receiver<Arc<TenantTable>>) -> Self {
        self.tenants = tenants;
        self
    }
}

/// A successful signing, with what the metrics need to know of it.
struct Signed {
    response: IstioCertificateResponse,
    lifetime_secs: f64,
}

/// Which kind of credential a caller presented, for the authentication metric.
fn credential_kind(credentials: &Credentials<'_>) -> &'static str {
    if credentials.bearer.is_some() {
        "token"
    } else if credentials.peer_certs.is_some_and(|c| !c.is_empty()) {
        "client-certificate"
    } else {
        "none"
    }
}

/// Refuses metadata with more than [`MAX_METADATA_VALUES`] values or deeper than
/// [`MAX_METADATA_DEPTH`].
pub fn check_metadata_bounds(metadata: Option<&prost_types::Struct>) -> Result<(), SignError> {
    fn walk<'a>(
        values: impl Iterator<Item = &'a prost_types::Value>,
        depth: usize,
        count: &mut usize,
    ) -> Result<(), SignError> {
        for value in values {
            *count += 1;
            if *count > MAX_METADATA_VALUES {
                return Err(SignError::InvalidRequest(format!(
                    "metadata has more than {MAX_METADATA_VALUES} values"
                )));
            }
            let nested: Box<dyn Iterator<Item = &prost_types::Value>> = match &value.kind {
                Some(Kind::StructValue(s)) => Box::new(s.fields.values()),
                Some(Kind::ListValue(l)) => Box::new(l.values.iter()),
                _ => continue,
            };
            if depth + 1 >= MAX_METADATA_DEPTH {
                return Err(SignError::InvalidRequest(format!(
                    "metadata nested deeper than {MAX_METADATA_DEPTH}"
                )));
            }
            walk(nested, depth + 1, count)?;
        }
        Ok(())
    }
    let Some(metadata) = metadata else {
        return Ok(());
    };
    walk(metadata.fields.values(), 0, &mut 0)
}

/// The request's metadata Struct, read strictly: known keys must be strings.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestOptions<'a> {
    pub cert_signer: Option<&'a str>,
    pub impersonated_identity: Option<&'a str>,
}

impl<'a> RequestOptions<'a> {
    pub fn from_metadata(metadata: Option<&'a prost_types::Struct>) -> Result<Self, SignError> {
        let string = |key: &str| -> Result<Option<&'a str>, SignError> {
            let Some(value) = metadata.and_then(|m| m.fields.get(key)) else {
                return Ok(None);
            };
            match &value.kind {
                // pilot-agent always sends CertSigner, empty when unset: "" means absent.
                Some(Kind::StringValue(s)) if s.is_empty() => Ok(None),
                Some(Kind::StringValue(s)) => Ok(Some(s.as_str())),
                Some(Kind::NullValue(_)) | None => Ok(None),
                Some(_) => Err(SignError::InvalidRequest(format!(
                    "metadata {key} must be a string"
                ))),
            }
        };
        Ok(Self {
            cert_signer: string(META_CERT_SIGNER)?,
            impersonated_identity: string(META_IMPERSONATED_IDENTITY)?,
        })
    }
}

/// Checks the CSR, which must ask for exactly the `allowed` identities: no more, no fewer.
/// A URI SAN that is no service-account identity is one the caller may not request either,
/// refused (and logged) like another caller's identity.
fn check_csr(pem: &str, allowed: &[SpiffeId]) -> Result<csr::CheckedCsr, SignError> {
    let mismatch = |requested: Vec<String>| SignError::IdentityMismatch {
        requested,
        allowed: allowed.iter().map(SpiffeId::to_string).collect(),
    };
    let csr = csr::parse_and_check(pem).map_err(|e| match e {
        csr::CsrError::NotAnIdentity(uris) => mismatch(uris),
        other => SignError::Csr(other),
    })?;
    if !same_identities(&csr.identities, allowed) {
        return Err(mismatch(
            csr.identities.iter().map(SpiffeId::to_string).collect(),
        ));
    }
    Ok(csr)
}

/// The CSR must ask for exactly the allowed identities: no more, no fewer.
fn same_identities(requested: &[SpiffeId], allowed: &[SpiffeId]) -> bool {
    requested.len() == allowed.len() && requested.iter().all(|r| allowed.contains(r))
}

/// README "Lifetime": shorten to the maximum; zero or negative asks for the maximum.
pub fn clamp_lifetime(requested_secs: i64, max: Duration) -> Duration {
    match u64::try_from(requested_secs) {
        Ok(secs) if secs > 0 => Duration::from_secs(secs).min(max),
        _ => max,
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    // Everything logged while serving the call (authentication, the node check, the issuer)
    // carries the peer and the cluster the caller named, escaped like every logged value.
    #[tracing::instrument(
        name = "CreateCertificate",
        skip_all,
        fields(peer = tracing::field::Empty, cluster = tracing::field::Empty)
    )]
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        let span = tracing::Span::current();
        if let Some(info) = request.extensions().get::<ConnInfo>() {
            span.record("peer", tracing::field::display(info.remote));
        }
        if let Some(cluster) = request.metadata().get("clusterid") {
            let cluster = sanitize_value(String::from_utf8_lossy(cluster.as_bytes()));
            span.record("cluster", &*cluster);
        }
        let mut caller = None;
        let mut tenant = None;
        let source = request
            .extensions()
            .get::<ConnInfo>()
            .map(|info| info.remote.ip());
        let result = self.sign(&request, source, &mut caller, &mut tenant).await;
        if let Err(SignError::Overloaded(refusal)) = &result {
            self.metrics.observe_refusal(refusal.label());
        }
        let elapsed = started.elapsed().as_secs_f64();
        let elapsed_ms = (elapsed * 1e5).round() / 100.0;
        let backend = self.issuance.issuer().label();
        // Bounded: a name from the signer table, else "default".
        let signer = tenant
            .as_ref()
            .map_or(DEFAULT_SIGNER_LABEL, |t| t.name.as_str());
        match result {
            Ok(signed) => {
                self.metrics
                    .observe_request(Code::Ok, backend, signer, elapsed);
                self.metrics.observe_lifetime(signed.lifetime_secs);
                if tracing::enabled!(tracing::Level::DEBUG) {
                    let fields = LogFields::of(&request, caller.as_ref());
                    tracing::debug!(
                        identity = &*fields.identity,
                        impersonating = &*fields.impersonating,
                        cert_signer = &*fields.cert_signer,
                        cluster = &*fields.cluster,
                        code = "OK",
                        elapsed_ms,
                        "certificate issued"
                    );
                }
                Ok(Response::new(signed.response))
            }
            Err(error) => {
                let status = to_status(&error);
                self.metrics
                    .observe_request(status.code(), backend, signer, elapsed);
                // Anyone can make refusals: at most a few lines a second per code reach the
                // log, the rest are counted. The gRPC code is a bounded, meaningful reason:
                // a flood of bad tokens (UNAUTHENTICATED) does not hide UNAVAILABLE.
                let reason = code_name(status.code());
                match self.refusal_log.admit(reason) {
                    Admission::Suppress => self.metrics.observe_suppressed_log_line(reason),
                    Admission::Log { suppressed } => {
                        if suppressed > 0 {
                            tracing::warn!(
                                reason,
                                suppressed,
                                "refusal log lines were suppressed: too many at once"
                            );
                        }
                        let fields = LogFields::of(&request, caller.as_ref());
                        let detail = error.to_string();
                        tracing::info!(
                            identity = &*fields.identity,
                            impersonating = &*fields.impersonating,
                            cert_signer = &*fields.cert_signer,
                            cluster = &*fields.cluster,
                            code = ?status.code(),
                            elapsed_ms,
                            error = &*sanitize(&detail, MAX_DETAIL_BYTES),
                            "certificate request refused"
                        );
                    }
                }
                Err(status)
            }
        }
    }
}

/// The `signer` label of requests served by the mesh's own issuer.
pub const DEFAULT_SIGNER_LABEL: &str = "default";

/// The tenant for identities `allowed` (the caller's, or the impersonated one) asking for
/// `cert_signer`. Identities of several namespaces (a client certificate may carry more than
/// one) may use a tenant only if every namespace may.
fn select_tenant(
    table: &TenantTable,
    allowed: &[SpiffeId],
    cert_signer: Option<&str>,
) -> Result<Option<Arc<Tenant>>, SignError> {
    let mut selected: Option<Option<Arc<Tenant>>> = None;
    for identity in allowed {
        let tenant = table.select(identity.namespace(), cert_signer)?;
        match &selected {
            None => selected = Some(tenant),
            Some(first) if first.as_ref().map(|t| &t.name) == tenant.as_ref().map(|t| &t.name) => {}
            Some(_) => {
                return Err(SignError::InvalidRequest(
                    "the identities' namespaces have different default signers".into(),
                ));
            }
        }
    }
    Ok(selected.flatten())
}

/// What the per-request log lines say of a call. Every value a caller chooses (headers,
/// metadata, and through the error, CSR SANs) is sanitized: escaped and bounded.
struct LogFields<'a> {
    /// The caller's first identity; "-" before authentication.
    identity: Cow<'a, str>,
    /// For ztunnel, the identity asked for on a workload's behalf (the caller is ztunnel).
    impersonating: Cow<'a, str>,
    cert_signer: Cow<'a, str>,
    /// The `clusterid` header as sent ("" when absent), even when it is not valid ASCII.
    cluster: Cow<'a, str>,
}

impl<'a> LogFields<'a> {
    fn of(request: &'a Request<IstioCertificateRequest>, caller: Option<&'a Caller>) -> Self {
        let identity = caller
            .and_then(|c| c.identities.first())
            .map_or(Cow::Borrowed("-"), |id| Cow::Owned(id.to_string()));
        let cluster = request
            .metadata()
            .get("clusterid")
            .map_or(Cow::Borrowed(""), |v| String::from_utf8_lossy(v.as_bytes()));
        let options = RequestOptions::from_metadata(request.get_ref().metadata.as_ref()).ok();
        let (impersonating, cert_signer) = options.map_or(("-", "-"), |o| {
            (
                o.impersonated_identity.unwrap_or("-"),
                o.cert_signer.unwrap_or("-"),
            )
        });
        Self {
            identity: sanitize_value(identity),
            impersonating: sanitize(impersonating, MAX_VALUE_BYTES),
            cert_signer: sanitize(cert_signer, MAX_VALUE_BYTES),
            cluster: sanitize_value(cluster),
        }
    }
}

/// `sanitize` for a value that may be borrowed from the request or made for the log line.
fn sanitize_value(value: Cow<'_, str>) -> Cow<'_, str> {
    match value {
        Cow::Borrowed(value) => sanitize(value, MAX_VALUE_BYTES),
        Cow::Owned(value) => Cow::Owned(sanitize(&value, MAX_VALUE_BYTES).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_is_chosen_by_the_namespace_of_every_identity_allowed() {
        use crate::pki::chain::RootBundle;
        use crate::pki::testing::{KeyAlg, TestCa};
        use crate::signer::issuer::SignerRoute;
        use crate::signer::tenants::Namespaces;
        let roots = TestCa::root("t", KeyAlg::EcdsaP256);
        let tenant = |name: &str, namespaces: &[&str], default: bool| Tenant {
            name: name.into(),
            route: SignerRoute {
                issuer_ref: None,
                kube_csr_signer_name: Some(format!("example.com/{name}")),
            },
            roots: Arc::new(RootBundle::from_pem(roots.cert_pem().as_bytes()).unwrap()),
            roots_source: "test".into(),
            namespaces: Namespaces::Only(namespaces.iter().map(|s| s.to_string()).collect()),
            default,
        };
        let table = TenantTable::new(vec![
            tenant("a", &["ns-a", "shared"], true),
            tenant("b", &["ns-b", "shared"], false),
        ]);
        let id = |ns: &str| SpiffeId::new("cluster.local", ns, "web").unwrap();
        let chosen = |allowed: &[SpiffeId], signer: Option<&str>| {
            select_tenant(&table, allowed, signer).map(|t| t.map(|t| t.name.clone()))
        };
        // ztunnel: `allowed` is the impersonated identity, so its namespace decides.
        assert_eq!(chosen(&[id("ns-a")], None).unwrap(), Some("a".into()));
        assert_eq!(chosen(&[id("ns-b")], None).unwrap(), None);
        assert_eq!(chosen(&[id("ns-b")], Some("b")).unwrap(), Some("b".into()));
        // Several identities: every namespace must be allowed, and agree on the default.
        assert_eq!(
            chosen(&[id("ns-a"), id("shared")], None).unwrap(),
            Some("a".into())
        );
        assert_eq!(
            chosen(&[id("ns-b"), id("shared")], Some("b")).unwrap(),
            Some("b".into())
        );
        assert!(matches!(
            chosen(&[id("ns-a"), id("ns-b")], Some("b")),
            Err(SignError::Tenant(TenantError::NotAllowed { .. }))
        ));
        assert!(matches!(
            chosen(&[id("ns-a"), id("ns-b")], None),
            Err(SignError::InvalidRequest(_))
        ));
        assert!(matches!(
            chosen(&[id("ns-a")], Some("c")),
            Err(SignError::Tenant(TenantError::Unknown(_)))
        ));
    }

    #[test]
    fn clamps_lifetimes_to_the_maximum() {
        let max = Duration::from_secs(3600);
        assert_eq!(clamp_lifetime(86_400, max), max);
        assert_eq!(clamp_lifetime(600, max), Duration::from_secs(600));
        assert_eq!(clamp_lifetime(3600, max), max);
        assert_eq!(clamp_lifetime(0, max), max);
        assert_eq!(clamp_lifetime(-5, max), max);
        assert_eq!(clamp_lifetime(i64::MIN, max), max);
        assert_eq!(clamp_lifetime(i64::MAX, max), max);
    }

    #[test]
    fn a_csr_uri_that_is_no_service_account_identity_is_refused_as_another_callers() {
        use crate::pki::testing::{CsrBuilder, KeyAlg};
        let allowed = ["spiffe://td/ns/a/sa/a".parse().unwrap()];
        for uri in [
            "spiffe://td/foo",
            "spiffe://td/ns/a/sa/a/extra",
            "spiffe://TD/ns/a/sa/a",
            "spiffe://td/ns/b/sa/b",
        ] {
            let pem = CsrBuilder::new(KeyAlg::EcdsaP256).uri(uri).build_pem();
            let error = check_csr(&pem, &allowed).unwrap_err();
            assert_eq!(error.code(), Code::PermissionDenied, "{uri}");
            assert_eq!(
                error.to_string(),
                format!(
                    "CSR identities [{uri:?}] are not the caller's [\"spiffe://td/ns/a/sa/a\"]"
                )
            );
        }
        let pem = CsrBuilder::new(KeyAlg::EcdsaP256)
            .uri("spiffe://td/ns/a/sa/a")
            .build_pem();
        assert_eq!(check_csr(&pem, &allowed).unwrap().identities, allowed);
    }

    #[test]
    fn identities_must_match_exactly() {
        let a: SpiffeId = "spiffe://td/ns/a/sa/a".parse().unwrap();
        let b: SpiffeId = "spiffe://td/ns/b/sa/b".parse().unwrap();
        assert!(same_identities(
            std::slice::from_ref(&a),
            std::slice::from_ref(&a)
        ));
        assert!(same_identities(
            &[b.clone(), a.clone()],
            &[a.clone(), b.clone()]
        ));
        assert!(!same_identities(
            std::slice::from_ref(&a),
            std::slice::from_ref(&b)
        ));
        assert!(!same_identities(
            &[a.clone(), b.clone()],
            std::slice::from_ref(&a)
        ));
        assert!(!same_identities(
            std::slice::from_ref(&a),
            &[a.clone(), b.clone()]
        ));
    }

    fn metadata(pairs: &[(&str, Kind)]) -> prost_types::Struct {
        prost_types::Struct {
            fields: pairs
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        prost_types::Value {
                            kind: Some(v.clone()),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn reads_metadata_like_pilot_agent_and_ztunnel_send_it() {
        let empty = metadata(&[(META_CERT_SIGNER, Kind::StringValue(String::new()))]);
        let opts = RequestOptions::from_metadata(Some(&empty)).unwrap();
        assert_eq!(opts.cert_signer, None);
        let named = metadata(&[(META_CERT_SIGNER, Kind::StringValue("clusterissuer".into()))]);
        let opts = RequestOptions::from_metadata(Some(&named)).unwrap();
        assert_eq!(opts.cert_signer, Some("clusterissuer"));
        let ztunnel = metadata(&[(
            META_IMPERSONATED_IDENTITY,
            Kind::StringValue("spiffe://td/ns/a/sa/b".into()),
        )]);
        let opts = RequestOptions::from_metadata(Some(&ztunnel)).unwrap();
        assert_eq!(opts.impersonated_identity, Some("spiffe://td/ns/a/sa/b"));
        assert!(
            RequestOptions::from_metadata(None)
                .unwrap()
                .cert_signer
                .is_none()
        );
    }

    #[test]
    fn bounds_the_metadata_values_and_their_nesting() {
        let string = || Kind::StringValue("x".into());
        let list = |values: Vec<Kind>| {
            Kind::ListValue(prost_types::ListValue {
                values: values
                    .into_iter()
                    .map(|kind| prost_types::Value { kind: Some(kind) })
                    .collect(),
            })
        };
        let keys: Vec<String> = (0..MAX_METADATA_VALUES + 1)
            .map(|i| format!("k{i}"))
            .collect();
        let flat = |n: usize| {
            let pairs: Vec<(&str, Kind)> =
                keys[..n].iter().map(|k| (k.as_str(), string())).collect();
            metadata(&pairs)
        };
        assert!(check_metadata_bounds(None).is_ok());
        assert!(check_metadata_bounds(Some(&flat(MAX_METADATA_VALUES))).is_ok());
        assert!(matches!(
            check_metadata_bounds(Some(&flat(MAX_METADATA_VALUES + 1))),
            Err(SignError::InvalidRequest(_))
        ));
        // Nested values count too: one key holding a long list is as many values.
        let long = metadata(&[("k", list(vec![string(); MAX_METADATA_VALUES]))]);
        assert!(check_metadata_bounds(Some(&long)).is_err());
        let nested = metadata(&[("k", list(vec![string(); 3]))]);
        assert!(check_metadata_bounds(Some(&nested)).is_ok());
        let deeper = metadata(&[("k", list(vec![list(vec![string()])]))]);
        assert!(matches!(
            check_metadata_bounds(Some(&deeper)),
            Err(SignError::InvalidRequest(_))
        ));
    }

    #[test]
    fn refuses_non_string_metadata_values() {
        let hostile = metadata(&[(META_CERT_SIGNER, Kind::NumberValue(1.0))]);
        assert!(matches!(
            RequestOptions::from_metadata(Some(&hostile)),
            Err(SignError::InvalidRequest(_))
        ));
    }
}

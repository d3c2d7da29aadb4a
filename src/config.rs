//! Command-line flags. Names follow cert-manager's istio-csr so users can move over; every `serve`
//! flag also reads `ISTIO_CSR_<FLAG>` from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::signer::Signer;

#[derive(Debug, Parser)]
#[command(
    name = "istio-csr-rs",
    version,
    about = "Certificate authority agent for Istio meshes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the certificate authority (gRPC signer and admin API).
    Serve(Box<ServeArgs>),
    /// Request one certificate from a running server, as a workload would.
    Request(crate::client::request::RequestArgs),
    /// Drive CreateCertificate with concurrent load and report latency and CPU per request.
    Bench(crate::client::bench::BenchArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub issuance: IssuanceArgs,
    #[command(flatten)]
    pub serving_tls: ServingTlsArgs,
    #[command(flatten)]
    pub standalone: StandaloneArgs,
    #[command(flatten)]
    pub bundle: BundleArgs,
    #[command(flatten)]
    pub istiod_cert: IstiodCertArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Trust bundle, leader election and remote clusters")]
pub struct BundleArgs {
    /// Namespace of the leader Lease (`istio-csr-rs`). Only the leader writes
    /// istio-ca-root-cert ConfigMaps; every replica signs.
    #[arg(
        long,
        env = "ISTIO_CSR_LEADER_ELECTION_NAMESPACE",
        default_value = "istio-system"
    )]
    pub leader_election_namespace: String,

    /// How long a leader's Lease lasts without renewal before another replica may take it.
    #[arg(long, env = "ISTIO_CSR_LEADER_ELECTION_LEASE_DURATION", default_value = "15s",
          value_parser = humantime::parse_duration)]
    pub leader_election_lease_duration: Duration,

    /// A leader that cannot renew within this long steps down (and keeps competing).
    #[arg(long, env = "ISTIO_CSR_LEADER_ELECTION_RENEW_DEADLINE", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub leader_election_renew_deadline: Duration,

    /// How often replicas try to acquire or renew the Lease.
    #[arg(long, env = "ISTIO_CSR_LEADER_ELECTION_RETRY_PERIOD", default_value = "2s",
          value_parser = humantime::parse_duration)]
    pub leader_election_retry_period: Duration,

    /// Label selector of the namespaces that get the istio-ca-root-cert ConfigMap [default:
    /// all]. ConfigMaps in namespaces that leave the selection are left as they are.
    #[arg(
        long,
        env = "ISTIO_CSR_CONFIGMAP_NAMESPACE_SELECTOR",
        default_value = ""
    )]
    pub configmap_namespace_selector: String,

    /// Namespaces reconciled at once, per cluster.
    #[arg(long, env = "ISTIO_CSR_MAX_CONCURRENT_RECONCILES", default_value_t = 8)]
    pub max_concurrent_reconciles: usize,

    /// Follow remote-cluster Secrets (istiod's multi-cluster convention). False: the local
    /// cluster only, and no Secret is read. Accepts `--multicluster-enabled=false`.
    #[arg(long, env = "ISTIO_CSR_MULTICLUSTER_ENABLED", num_args = 0..=1,
          default_value_t = true, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub multicluster_enabled: bool,

    /// Namespace of the remote-cluster Secrets (label istio/multiCluster=true; each key a
    /// cluster ID, each value a kubeconfig). Reading them takes the right to read every Secret
    /// there, so it is a namespace of their own, never istio-system (istiod's Secrets).
    #[arg(
        long,
        env = "ISTIO_CSR_MULTICLUSTER_SECRET_NAMESPACE",
        default_value = "istio-csr-rs-remotes"
    )]
    pub multicluster_secret_namespace: String,

    /// Accept remote kubeconfigs with exec plugins, auth providers or file paths. Anyone who
    /// can write a Secret there could then run programs or read files in this pod.
    #[arg(long, env = "ISTIO_CSR_ALLOW_INSECURE_KUBECONFIG")]
    pub allow_insecure_kubeconfig: bool,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "istiod's serving certificate (leader only)")]
pub struct IstiodCertArgs {
    /// Issue istiod's serving certificate into Secret `istiod-tls` (tls.crt, tls.key, ca.crt),
    /// for istiod running with ENABLE_CA_SERVER=false. Accepts `--istiod-cert-enabled=false`.
    #[arg(long, env = "ISTIO_CSR_ISTIOD_CERT_ENABLED", num_args = 0..=1,
          default_value_t = false, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub istiod_cert_enabled: bool,

    /// Namespace of istiod and of its Secret `istiod-tls`.
    #[arg(
        long,
        env = "ISTIO_CSR_ISTIOD_CERT_NAMESPACE",
        default_value = "istio-system"
    )]
    pub istiod_cert_namespace: String,

    /// Lifetime requested for istiod's certificate.
    #[arg(long, env = "ISTIO_CSR_ISTIOD_CERT_DURATION", default_value = "1h",
          value_parser = humantime::parse_duration)]
    pub istiod_cert_duration: Duration,

    /// How long before expiry istiod's certificate is renewed.
    #[arg(long, env = "ISTIO_CSR_ISTIOD_CERT_RENEW_BEFORE", default_value = "30m",
          value_parser = humantime::parse_duration)]
    pub istiod_cert_renew_before: Duration,

    /// Key algorithm of istiod's private key.
    #[arg(long, env = "ISTIO_CSR_ISTIOD_CERT_KEY_ALGORITHM", value_enum,
          default_value_t = IstiodKeyAlgorithm::Rsa, ignore_case = true)]
    pub istiod_cert_key_algorithm: IstiodKeyAlgorithm,

    /// Key size: 2048, 3072 or 4096 for RSA; 256 or 384 for ECDSA [default: 2048 / 256].
    #[arg(long, env = "ISTIO_CSR_ISTIOD_CERT_KEY_SIZE")]
    pub istiod_cert_key_size: Option<u32>,

    /// More DNS names for istiod's certificate, comma-separated.
    #[arg(
        long,
        env = "ISTIO_CSR_ISTIOD_CERT_ADDITIONAL_DNS_NAMES",
        value_delimiter = ','
    )]
    pub istiod_cert_additional_dns_names: Vec<String>,

    /// Annotations on istiod's CertificateRequest, `key=value`, comma-separated.
    #[arg(
        long,
        env = "ISTIO_CSR_ISTIOD_CERT_ADDITIONAL_ANNOTATIONS",
        value_delimiter = ','
    )]
    pub istiod_cert_additional_annotations: Vec<String>,

    /// Istio revisions served: `default` gives istiod.<ns>.svc, any other R gives
    /// istiod-R.<ns>.svc; comma-separated.
    #[arg(
        long,
        env = "ISTIO_CSR_ISTIOD_CERT_ISTIO_REVISIONS",
        value_delimiter = ',',
        default_value = "default"
    )]
    pub istiod_cert_istio_revisions: Vec<String>,
}

/// istio-csr's `--istiod-cert-key-algorithm` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IstiodKeyAlgorithm {
    #[value(name = "RSA")]
    Rsa,
    #[value(name = "ECDSA")]
    Ecdsa,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Signer")]
pub struct ServerArgs {
    /// gRPC listen address [default: 0.0.0.0:6443; 127.0.0.1:6443 with --standalone].
    #[arg(long, env = "ISTIO_CSR_SERVING_ADDRESS")]
    pub serving_address: Option<SocketAddr>,

    /// Trust domain of the SPIFFE identities issued.
    #[arg(long, env = "ISTIO_CSR_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// ID of the local cluster: a `clusterid` request header that is empty, equal to it or to
    /// one of --cluster-id-aliases means the local cluster; others name remote clusters.
    #[arg(long, env = "ISTIO_CSR_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// Other names of the local cluster (e.g. its ID before a rename), comma-separated.
    #[arg(
        long,
        env = "ISTIO_CSR_CLUSTER_ID_ALIASES",
        value_delimiter = ',',
        num_args = 1..
    )]
    pub cluster_id_aliases: Vec<String>,

    /// Longest certificate lifetime handed out; longer requests are shortened to it.
    #[arg(long, env = "ISTIO_CSR_MAX_CLIENT_CERTIFICATE_DURATION", default_value = "1h",
          value_parser = humantime::parse_duration)]
    pub max_client_certificate_duration: Duration,

    /// Authenticate callers by a client certificate chaining to the mesh roots.
    #[arg(long, env = "ISTIO_CSR_ENABLE_CLIENT_CERT_AUTHENTICATOR")]
    pub enable_client_cert_authenticator: bool,

    /// Service accounts (`namespace/name`, comma-separated) allowed to impersonate workloads on
    /// their node (ztunnel). Without any, every impersonation is refused.
    #[arg(
        long,
        env = "ISTIO_CSR_CA_TRUSTED_NODE_ACCOUNTS",
        value_delimiter = ','
    )]
    pub ca_trusted_node_accounts: Vec<String>,

    /// Static bearer tokens: CSV lines `token,namespace,serviceaccount`, reloaded on change.
    #[arg(long, env = "ISTIO_CSR_TOKEN_AUTH_FILE")]
    pub token_auth_file: Option<PathBuf>,

    /// Audiences a service-account token must be valid for (TokenReview).
    #[arg(
        long,
        env = "ISTIO_CSR_TOKEN_AUDIENCES",
        value_delimiter = ',',
        default_value = "istio-ca"
    )]
    pub token_audiences: Vec<String>,

    /// How long a successful TokenReview is reused (never past the token's own expiry; 0 turns
    /// the cache off).
    #[arg(long, env = "ISTIO_CSR_TOKEN_REVIEW_CACHE_TTL", default_value = "60s",
          value_parser = humantime::parse_duration)]
    pub token_review_cache_ttl: Duration,

    /// Kubeconfig of the local cluster [default: $KUBECONFIG, ~/.kube/config, or in-cluster].
    /// Without a usable one, TokenReview is off (standalone mode never uses Kubernetes).
    #[arg(long, env = "ISTIO_CSR_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes API calls per second per cluster, on average (client-side token bucket; 0 =
    /// unlimited). Generous on purpose: a restart storm must not queue behind it.
    #[arg(long, env = "ISTIO_CSR_KUBE_API_QPS", default_value_t = 1000.0)]
    pub kube_api_qps: f64,

    /// Kubernetes API calls per cluster allowed at once above --kube-api-qps.
    #[arg(long, env = "ISTIO_CSR_KUBE_API_BURST", default_value_t = 2000)]
    pub kube_api_burst: u32,

    /// CreateCertificate calls handled at once, in each stage (authentication, then
    /// issuance); beyond it callers wait their turn (--max-queued-per-source).
    #[arg(long, env = "ISTIO_CSR_MAX_INFLIGHT", default_value_t = 1024)]
    pub max_inflight: usize,

    /// CreateCertificate calls one source address may have in progress in each stage (0 = no
    /// bound); its further calls wait their turn. Small on purpose: what runs goes on to the
    /// API server and the issuer, which serve in arrival order, so this is how far ahead of
    /// another address's call one address's burst can be there.
    #[arg(long, env = "ISTIO_CSR_MAX_INFLIGHT_PER_SOURCE", default_value_t = 8)]
    pub max_inflight_per_source: usize,

    /// CreateCertificate calls of one source address that may wait for a seat, per stage;
    /// beyond it they get ResourceExhausted at once. Room for a node's ztunnel asking for
    /// every pod of its node after a restart, or a remote cluster behind one gateway.
    #[arg(long, env = "ISTIO_CSR_MAX_QUEUED_PER_SOURCE", default_value_t = 1024)]
    pub max_queued_per_source: usize,

    /// How long a call may wait for a seat before it gets ResourceExhausted. Long: the
    /// client's own deadline (grpc-timeout) still ends its wait sooner.
    #[arg(long, env = "ISTIO_CSR_MAX_QUEUE_WAIT", default_value = "2m",
          value_parser = humantime::parse_duration)]
    pub max_queue_wait: Duration,

    /// Open gRPC connections (including ones still in their TLS handshake) at most; more are
    /// closed at once [default: what half of --memory-limit holds at 48 KiB a connection, at
    /// most 16384]. Also bounded by the open-files limit.
    #[arg(long, env = "ISTIO_CSR_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Open gRPC connections one source address may hold (0 = no bound). A pod holds one or
    /// two, a node's ztunnel a few; small, so that a handful of pods cannot fill
    /// --max-connections. Raise it for a NAT or a gateway in front of many pods.
    #[arg(
        long,
        env = "ISTIO_CSR_MAX_CONNECTIONS_PER_SOURCE",
        default_value_t = 32
    )]
    pub max_connections_per_source: usize,

    /// The memory this process may use, in bytes or with a Ki/Mi/Gi suffix, from which
    /// --max-connections is derived [default: the container's cgroup limit, if any]. The
    /// chart sets it from the container's memory limit.
    #[arg(long, env = "ISTIO_CSR_MEMORY_LIMIT", value_parser = crate::signer::capacity::parse_bytes)]
    pub memory_limit: Option<u64>,

    /// After SIGTERM, how long to keep serving while reporting not-ready, so load balancers
    /// and Kubernetes endpoints stop sending new connections before the listener closes.
    #[arg(long, env = "ISTIO_CSR_SHUTDOWN_DELAY", default_value = "0s",
          value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "ISTIO_CSR_SHUTDOWN_GRACE", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Issuance")]
pub struct IssuanceArgs {
    /// Which signer issues certificates.
    #[arg(long, env = "ISTIO_CSR_SIGNER", value_enum, default_value_t = Signer::CertManager)]
    pub signer: Signer,

    /// Directory of the built-in CA: istiod's `cacerts` layout (ca-cert.pem, ca-key.pem,
    /// cert-chain.pem, root-cert.pem) or a kubernetes.io/tls one (tls.crt, tls.key, ca.crt).
    #[arg(long, env = "ISTIO_CSR_LOCAL_CA_DIR")]
    pub local_ca_dir: Option<PathBuf>,

    /// Namespace of the CertificateRequests (--signer cert-manager).
    #[arg(
        long,
        env = "ISTIO_CSR_CERTIFICATE_NAMESPACE",
        default_value = "istio-system"
    )]
    pub certificate_namespace: String,

    /// Sign with the static issuer (--issuer-name/-kind/-group) when no runtime issuance
    /// ConfigMap names one. False: only the runtime ConfigMap's issuer signs, and until it
    /// exists nothing does. Accepts `--issuer-enabled=false`.
    #[arg(long, env = "ISTIO_CSR_ISSUER_ENABLED", num_args = 0..=1,
          default_value_t = true, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub issuer_enabled: bool,

    /// cert-manager issuer that signs: name, kind and group of its issuerRef.
    #[arg(long, env = "ISTIO_CSR_ISSUER_NAME", default_value = "istio-ca")]
    pub issuer_name: String,
    #[arg(long, env = "ISTIO_CSR_ISSUER_KIND", default_value = "Issuer")]
    pub issuer_kind: String,
    #[arg(
        long,
        env = "ISTIO_CSR_ISSUER_GROUP",
        default_value = "cert-manager.io"
    )]
    pub issuer_group: String,

    /// Keep CertificateRequests after they are answered (for debugging); by default every one
    /// is deleted whatever its outcome.
    #[arg(long, env = "ISTIO_CSR_PRESERVE_CERTIFICATE_REQUESTS")]
    pub preserve_certificate_requests: bool,

    /// Extra annotations on every CertificateRequest, `key=value`, comma-separated.
    #[arg(
        long,
        env = "ISTIO_CSR_CERTIFICATE_REQUEST_ADDITIONAL_ANNOTATIONS",
        value_delimiter = ','
    )]
    pub certificate_request_additional_annotations: Vec<String>,

    /// ConfigMap naming the issuer at run time (keys issuer-name, issuer-kind, issuer-group);
    /// changes apply to new requests at once. While it does not exist, the static issuer signs
    /// (unless --issuer-enabled=false); while it is invalid, none does.
    #[arg(long, env = "ISTIO_CSR_RUNTIME_ISSUANCE_CONFIG_MAP_NAME")]
    pub runtime_issuance_config_map_name: Option<String>,

    /// Namespace of that ConfigMap [default: --certificate-namespace].
    #[arg(long, env = "ISTIO_CSR_RUNTIME_ISSUANCE_CONFIG_MAP_NAMESPACE")]
    pub runtime_issuance_config_map_namespace: Option<String>,

    /// `spec.signerName` of the CertificateSigningRequests of --signer kube-csr (e.g.
    /// `example.com/istio`); a signer for it must run in the cluster.
    #[arg(long, env = "ISTIO_CSR_KUBE_CSR_SIGNER_NAME")]
    pub kube_csr_signer_name: Option<String>,

    /// istiod's CERT_SIGNER_DOMAIN: tenant signer X of --signers-file without a
    /// kubeCSRSignerName asks for signer `<domain>/X`, and only --mesh-config certSigners of
    /// this domain are read.
    #[arg(long, env = "ISTIO_CSR_CERT_SIGNER_DOMAIN")]
    pub cert_signer_domain: Option<String>,

    /// Tenant signers (YAML `signers:` list): pilot-agent's `CertSigner: X` picks entry X,
    /// with its own issuer and roots, for the namespaces it lists. Watched: a change applies
    /// to new requests; a broken update keeps the previous table.
    #[arg(long, env = "ISTIO_CSR_SIGNERS_FILE")]
    pub signers_file: Option<PathBuf>,

    /// Istio's mesh config (the `mesh` key of the `istio` ConfigMap): its `caCertificates`
    /// entries with `certSigners: [DOMAIN/X]` are the roots of tenant signer X. Watched.
    #[arg(long, env = "ISTIO_CSR_MESH_CONFIG")]
    pub mesh_config: Option<PathBuf>,

    /// With --signer kube-csr: leave approval to an external approver instead of approving our
    /// own (authenticated and checked) requests.
    #[arg(long, env = "ISTIO_CSR_KUBE_CSR_EXTERNAL_APPROVAL")]
    pub kube_csr_external_approval: bool,

    /// How long a CertificateRequest may take to be answered (then DeadlineExceeded).
    #[arg(long, env = "ISTIO_CSR_ISSUANCE_TIMEOUT", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub issuance_timeout: Duration,

    /// Pinned root bundle (one or more PEM roots): every issued chain must verify against it.
    #[arg(long, env = "ISTIO_CSR_ROOT_CA_FILE")]
    pub root_ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Serving TLS")]
pub struct ServingTlsArgs {
    /// DNS names of the gRPC serving certificate [default: cert-manager-istio-csr.cert-manager.svc;
    /// localhost and 127.0.0.1 with --standalone].
    #[arg(
        long,
        env = "ISTIO_CSR_SERVING_CERTIFICATE_DNS_NAMES",
        value_delimiter = ','
    )]
    pub serving_certificate_dns_names: Vec<String>,

    /// Lifetime of the serving certificate; it is renewed at two thirds of it.
    #[arg(long, env = "ISTIO_CSR_SERVING_CERTIFICATE_DURATION", default_value = "1h",
          value_parser = humantime::parse_duration)]
    pub serving_certificate_duration: Duration,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Standalone")]
pub struct StandaloneArgs {
    /// Run with no Kubernetes at all: built-in CA and static tokens kept in --data-dir.
    #[arg(long, env = "ISTIO_CSR_STANDALONE")]
    pub standalone: bool,

    /// Where standalone mode keeps its CA, tokens and root bundle (created on first start).
    #[arg(long, env = "ISTIO_CSR_DATA_DIR", default_value = "./istio-csr-data")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Admin")]
pub struct AdminArgs {
    /// Admin HTTP listener (/livez, /readyz) [default: 0.0.0.0:9402; 127.0.0.1:9402 with
    /// --standalone].
    #[arg(long, env = "ISTIO_CSR_ADMIN_ADDRESS")]
    pub admin_address: Option<SocketAddr>,

    /// Serve /debug/* to callers other than loopback too. Off, they answer only on loopback
    /// (`kubectl port-forward`, `kubectl exec`): they name tenants, clusters and errors.
    #[arg(long, env = "ISTIO_CSR_ADMIN_REMOTE_DEBUG")]
    pub admin_remote_debug: bool,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
    #[arg(long, env = "ISTIO_CSR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Filter in tracing's env-filter syntax, e.g. `info` or `info,istio_csr_rs=debug`.
    #[arg(long, env = "ISTIO_CSR_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_serve_flag_reads_an_environment_variable() {
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").unwrap();
        for arg in serve.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg.get_env().unwrap_or_else(|| panic!("--{id} has no env"));
            let want = format!("ISTIO_CSR_{}", id.to_uppercase());
            assert_eq!(env.to_str().unwrap(), want, "--{id}");
        }
    }

    #[test]
    fn request_key_types_use_the_documented_names() {
        for name in ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"] {
            let parsed = Cli::try_parse_from([
                "istio-csr-rs",
                "request",
                "--root-cert",
                "r.pem",
                "--key-type",
                name,
            ]);
            assert!(parsed.is_ok(), "{name}: {parsed:?}");
        }
    }

    #[test]
    fn defaults_match_istio_csr() {
        let cli = Cli::try_parse_from(["istio-csr-rs", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.server.trust_domain, "cluster.local");
        assert_eq!(args.server.cluster_id, "Kubernetes");
        assert_eq!(
            args.server.max_client_certificate_duration,
            Duration::from_secs(3600)
        );
        assert_eq!(args.issuance.signer, Signer::CertManager);
    }
}

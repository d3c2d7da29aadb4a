//! Shared harness for the gRPC tier: a real server (the production `app::start` wiring) on
//! 127.0.0.1:0 over TLS, and a real tonic client.
#![allow(dead_code)]

pub mod ambient;
pub mod cert_manager;
pub mod csr_signer;
pub mod kube;
pub mod kube_signer;
pub mod mtls;
pub mod openmetrics;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use istio_csr_rs::app::{self, Hooks, Running};
use istio_csr_rs::client::{Target, build_csr, metadata};
use istio_csr_rs::config::{Cli, Command, ServeArgs};
use istio_csr_rs::proto::istio_v1_auth::IstioCertificateRequest;
use istio_csr_rs::proto::istio_v1_auth::istio_certificate_service_client::IstioCertificateServiceClient;
use istio_csr_rs::signer::issuer::{IssueError, IssueRequest, Issued, Issuer, Purpose};
use rcgen::KeyPair;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

pub const DEFAULT_ID: &str = "spiffe://cluster.local/ns/default/sa/default";

pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // RUST_LOG=debug shows the server's logs in failing tests.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// `serve --standalone` arguments on ephemeral loopback ports, plus `extra`.
pub fn standalone_args(data_dir: &Path, extra: &[&str]) -> ServeArgs {
    let mut argv = vec![
        "istio-csr-rs",
        "serve",
        "--standalone",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--serving-address",
        "127.0.0.1:0",
        "--admin-address",
        "127.0.0.1:0",
    ];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Serve(args) => *args,
        _ => unreachable!(),
    }
}

/// `serve` with `flags`, as every in-process test server runs: ephemeral loopback ports and a
/// serving certificate for localhost.
pub fn try_serve_args<S: AsRef<str>>(flags: &[S]) -> Result<ServeArgs, clap::Error> {
    let mut argv: Vec<String> = [
        "istio-csr-rs",
        "serve",
        "--serving-address",
        "127.0.0.1:0",
        "--admin-address",
        "127.0.0.1:0",
        "--serving-certificate-dns-names",
        "localhost",
    ]
    .map(str::to_owned)
    .to_vec();
    argv.extend(flags.iter().map(|flag| flag.as_ref().to_owned()));
    Cli::try_parse_from(argv).map(|cli| match cli.command {
        Command::Serve(args) => *args,
        _ => unreachable!(),
    })
}

/// `try_serve_args`, for flags that must parse.
pub fn serve_args<S: AsRef<str>>(flags: &[S]) -> ServeArgs {
    try_serve_args(flags).unwrap()
}

/// A standalone server in a fresh data directory.
pub struct Server {
    pub running: Running,
    pub data_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Server {
    pub async fn start(extra: &[&str]) -> Self {
        Self::start_with(extra, Hooks::default(), |_| {}).await
    }

    /// `prepare` runs on the data directory before the server starts (e.g. to place a CA).
    pub async fn start_with(extra: &[&str], hooks: Hooks, prepare: impl FnOnce(&Path)) -> Self {
        install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        prepare(&data_dir);
        let running = app::start(standalone_args(&data_dir, extra), hooks)
            .await
            .unwrap();
        Self {
            running,
            data_dir,
            _tmp: tmp,
        }
    }

    pub fn target(&self) -> Target {
        Target {
            address: self.running.grpc_address.to_string(),
            server_name: Some("localhost".into()),
            root_cert: self.data_dir.join("root-cert.pem"),
            token_file: Some(self.data_dir.join("token")),
            cluster_id: "Kubernetes".into(),
            timeout: Duration::from_secs(20),
            source_address: None,
        }
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub async fn client(&self) -> IstioCertificateServiceClient<Channel> {
        self.target().connect().await.unwrap()
    }

    /// A certificate for the default identity with the default token.
    pub async fn request_default(&self) -> Result<Vec<String>, tonic::Status> {
        request_certificate(&self.target(), Some(&self.token()), DEFAULT_ID).await
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.admin_address)
    }

    /// `target()` as a client at `source` (a 127.0.0.0/8 address) reaches it.
    pub fn target_from(&self, source: &str) -> Target {
        Target {
            source_address: Some(source.parse().unwrap()),
            ..self.target()
        }
    }

    /// A call for the default identity, on a connection of its own to `target`, in the
    /// background.
    pub fn spawn_request(
        &self,
        target: Target,
    ) -> tokio::task::JoinHandle<Result<Vec<String>, tonic::Status>> {
        let token = self.token();
        tokio::spawn(async move { request_certificate(&target, Some(&token), DEFAULT_ID).await })
    }

    /// A new HTTP/2 connection to the gRPC port from `source` (a 127.0.0.0/8 address).
    pub async fn channel_from(&self, source: &str) -> Channel {
        let roots = std::fs::read(self.data_dir.join("root-cert.pem")).unwrap();
        Channel::from_shared(format!("https://{}", self.running.grpc_address))
            .unwrap()
            .local_address(Some(source.parse().unwrap()))
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(roots))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// `istio_csr_refusals_total{reason}` now.
    pub async fn refusals(&self, reason: &str) -> f64 {
        let (_, body) = http_get(&self.admin_url("/metrics")).await;
        openmetrics::parse(&body).value("istio_csr_refusals_total", &[("reason", reason)])
    }
}

/// TokenReviews that the server with admin API `admin` has had accepted (201), all clusters.
pub async fn token_reviews(admin: std::net::SocketAddr) -> f64 {
    let (_, body) = http_get(&format!("http://{admin}/metrics")).await;
    openmetrics::parse(&body).value(
        "istio_csr_kube_api_requests_total",
        &[
            ("code", "201"),
            ("resource", "tokenreviews"),
            ("verb", "create"),
        ],
    )
}

/// A request as pilot-agent sends it: token, clusterid, CertSigner "".
pub fn pilot_agent_request(
    target: &Target,
    token: Option<&str>,
    csr: String,
    ttl_secs: i64,
) -> tonic::Request<IstioCertificateRequest> {
    target
        .request(
            token,
            IstioCertificateRequest {
                csr,
                validity_duration: ttl_secs,
                metadata: Some(metadata(None, None)),
            },
        )
        .unwrap()
}

/// One CreateCertificate as pilot-agent makes it, with a fresh P-256 key: the `cert_chain`.
/// A connection failure is a test failure, not a status.
pub async fn request_certificate(
    target: &Target,
    token: Option<&str>,
    identity: &str,
) -> Result<Vec<String>, tonic::Status> {
    let (csr, _) = p256_csr(identity);
    let mut client = target.connect().await.expect("connecting to the server");
    client
        .create_certificate(pilot_agent_request(target, token, csr, 3600))
        .await
        .map(|r| r.into_inner().cert_chain)
}

/// The leaf of a `cert_chain` as Istio workloads need it: its URI SANs (any other SAN type,
/// a non-critical SAN or a subject fails the test) and its lifetime in seconds.
pub fn leaf_identity(chain: &[String]) -> (Vec<String>, i64) {
    use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};
    let der = istio_csr_rs::pki::pem::parse_certificates(chain[0].as_bytes())
        .unwrap()
        .remove(0);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            assert!(ext.critical, "SAN must be critical with an empty subject");
            for name in &san.general_names {
                match name {
                    GeneralName::URI(u) => uris.push((*u).to_owned()),
                    other => panic!("unexpected SAN {other:?}"),
                }
            }
        }
    }
    assert!(
        cert.subject().iter_attributes().next().is_none(),
        "subject must be empty"
    );
    let validity = cert.validity();
    (
        uris,
        validity.not_after.timestamp() - validity.not_before.timestamp(),
    )
}

pub fn p256_csr(identity: &str) -> (String, KeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    (build_csr(identity, &key).unwrap(), key)
}

/// Plain HTTP GET against the admin listener: (status, body).
pub async fn http_get(url: &str) -> (u16, String) {
    let url = url.strip_prefix("http://").unwrap();
    let (host, path) = url.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Wraps an issuer and holds every request until released: lets tests keep requests in flight
/// without sleeping.
pub struct GatedIssuer {
    inner: Arc<dyn Issuer>,
    pub entered: Semaphore,
    pub release: Semaphore,
}

impl GatedIssuer {
    pub fn hooks() -> (Hooks, Arc<tokio::sync::OnceCell<Arc<GatedIssuer>>>) {
        let cell = Arc::new(tokio::sync::OnceCell::new());
        let out = cell.clone();
        let hooks = Hooks {
            wrap_issuer: Some(Box::new(move |inner| {
                let gated = Arc::new(GatedIssuer {
                    inner,
                    entered: Semaphore::new(0),
                    release: Semaphore::new(0),
                });
                let _ = cell.set(gated.clone());
                gated
            })),
        };
        (hooks, out)
    }

    /// Waits until `n` requests are inside the issuer.
    pub async fn wait_entered(&self, n: u32) {
        tokio::time::timeout(Duration::from_secs(20), self.entered.acquire_many(n))
            .await
            .expect("requests did not reach the issuer")
            .unwrap()
            .forget();
    }
}

#[async_trait]
impl Issuer for GatedIssuer {
    fn label(&self) -> &'static str {
        "gated"
    }

    fn ready(&self) -> bool {
        self.inner.ready()
    }

    fn signed_by(&self) -> tokio::sync::watch::Receiver<String> {
        self.inner.signed_by()
    }

    async fn issue(&self, request: IssueRequest<'_>) -> Result<Issued, IssueError> {
        // Only workload requests are held: the replica's own certificates must not wait.
        if request.purpose != Purpose::Workload {
            return self.inner.issue(request).await;
        }
        self.entered.add_permits(1);
        self.release
            .acquire()
            .await
            .map_err(|_| IssueError::internal("gate closed"))?
            .forget();
        self.inner.issue(request).await
    }
}

/// Polls `check` until it returns true or `timeout` passes: for effects that happen on a
/// background event (file watches), where there is nothing to await directly.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An issuer whose answer the test chooses: an error, or a chain it builds from the request
/// (e.g. signed by a rogue CA), standing in for a hijacked or failing external signer.
pub type Answer = Box<dyn Fn(&IssueRequest<'_>) -> Result<Issued, IssueError> + Send + Sync>;

pub struct ScriptedIssuer {
    pub answer: Answer,
    /// Signs everything but workload certificates (the serving certificate, istiod's).
    pub real: Arc<dyn Issuer>,
}

impl ScriptedIssuer {
    pub fn hooks(
        answer: impl Fn(&IssueRequest<'_>) -> Result<Issued, IssueError> + Send + Sync + 'static,
    ) -> Hooks {
        Hooks {
            wrap_issuer: Some(Box::new(move |real| {
                Arc::new(ScriptedIssuer {
                    answer: Box::new(answer),
                    real,
                })
            })),
        }
    }
}

#[async_trait]
impl Issuer for ScriptedIssuer {
    fn label(&self) -> &'static str {
        "scripted"
    }

    fn ready(&self) -> bool {
        true
    }

    fn signed_by(&self) -> tokio::sync::watch::Receiver<String> {
        self.real.signed_by()
    }

    async fn issue(&self, request: IssueRequest<'_>) -> Result<Issued, IssueError> {
        if request.purpose != Purpose::Workload {
            return self.real.issue(request).await;
        }
        (self.answer)(&request)
    }
}

/// The serving certificate presented on a fresh TLS handshake.
pub async fn presented_certificate(
    address: std::net::SocketAddr,
    roots_pem: &Path,
) -> rustls_pki_types::CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        istio_csr_rs::pki::pem::parse_certificates(&std::fs::read(roots_pem).unwrap()).unwrap()
    {
        roots.add(cert).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// A client of a test server on `address` presenting a `localhost` certificate, trusting
/// `root_cert`, as a pod of the local cluster (20 s per call; tests that need another
/// timeout or cluster override those fields).
pub fn localhost_target(address: impl std::fmt::Display, root_cert: PathBuf) -> Target {
    Target {
        address: address.to_string(),
        server_name: Some("localhost".into()),
        root_cert,
        token_file: None,
        cluster_id: "Kubernetes".into(),
        timeout: Duration::from_secs(20),
        source_address: None,
    }
}

/// CreateCertificate for `namespace/web` (its service-account token from the shared cluster)
/// through `target`, with `CertSigner` metadata when given: the answer and the CSR's key.
pub async fn request_as_web(
    target: &Target,
    namespace: &str,
    cert_signer: Option<&str>,
) -> Result<(Vec<String>, KeyPair), tonic::Status> {
    let token = kube::shared()
        .await
        .token(namespace, "web", &["istio-ca"], 3600, None)
        .await;
    let identity = format!("spiffe://cluster.local/ns/{namespace}/sa/web");
    let (csr, key) = p256_csr(&identity);
    let request = target
        .request(
            Some(&token),
            IstioCertificateRequest {
                csr,
                validity_duration: 3600,
                metadata: Some(metadata(cert_signer, None)),
            },
        )
        .unwrap();
    let mut client = target.connect().await.unwrap();
    let answer = client.create_certificate(request).await?;
    Ok((answer.into_inner().cert_chain, key))
}

//! A real Istio CA client, as pilot-agent and ztunnel behave: for trying a server out
//! (`request`) and for load (`bench`).

pub mod bench;
pub mod request;

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rcgen::KeyPair;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::pki::keys;
use crate::proto::istio_v1_auth::IstioCertificateRequest;
use crate::proto::istio_v1_auth::istio_certificate_service_client::IstioCertificateServiceClient;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyType {
    #[value(name = "ec-p256")]
    EcP256,
    #[value(name = "ec-p384")]
    EcP384,
    #[value(name = "rsa-2048")]
    Rsa2048,
    #[value(name = "rsa-3072")]
    Rsa3072,
}

impl KeyType {
    pub fn generate(self) -> anyhow::Result<KeyPair> {
        Ok(match self {
            KeyType::EcP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
            KeyType::EcP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?,
            KeyType::Rsa2048 => keys::generate_rsa(2048)?,
            KeyType::Rsa3072 => keys::generate_rsa(3072)?,
        })
    }
}

/// How to reach and trust a server.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// Server address, `host:port` (an `https://` prefix is accepted).
    #[arg(long, default_value = "127.0.0.1:6443")]
    pub address: String,
    /// Name to verify the server certificate against [default: the address's host].
    #[arg(long)]
    pub server_name: Option<String>,
    /// Roots that the server certificate must chain to (the istio-ca-root-cert bundle).
    #[arg(long)]
    pub root_cert: std::path::PathBuf,
    /// File holding the bearer token (read and trimmed, as pilot-agent does).
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
    /// Value of the `clusterid` header.
    #[arg(long, default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Give up on a call after this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Local address to connect from [default: chosen by the system].
    #[arg(long)]
    pub source_address: Option<std::net::IpAddr>,
}

impl Target {
    pub async fn connect(&self) -> anyhow::Result<IstioCertificateServiceClient<Channel>> {
        let address = self
            .address
            .trim_start_matches("https://")
            .trim_end_matches('/');
        let host = address
            .rsplit_once(':')
            .map_or(address, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let server_name = self.server_name.clone().unwrap_or_else(|| host.to_owned());
        let roots = std::fs::read(&self.root_cert)
            .with_context(|| format!("reading {}", self.root_cert.display()))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(roots))
            .domain_name(server_name);
        let channel = Channel::from_shared(format!("https://{address}"))
            .context("--address")?
            .tls_config(tls)?
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .local_address(self.source_address)
            .connect()
            .await
            .with_context(|| format!("connecting to {address}"))?;
        Ok(IstioCertificateServiceClient::new(channel))
    }

    pub fn token(&self) -> anyhow::Result<Option<String>> {
        self.token_file.as_deref().map(read_token).transpose()
    }

    /// A request carrying this target's headers, like pilot-agent sends.
    pub fn request(
        &self,
        token: Option<&str>,
        body: IstioCertificateRequest,
    ) -> anyhow::Result<tonic::Request<IstioCertificateRequest>> {
        let mut request = tonic::Request::new(body);
        if let Some(token) = token {
            let value: MetadataValue<_> = format!("Bearer {token}")
                .parse()
                .context("token is not a valid header value")?;
            request.metadata_mut().insert("authorization", value);
        }
        request.metadata_mut().insert(
            "clusterid",
            self.cluster_id.parse().context("--cluster-id")?,
        );
        Ok(request)
    }
}

/// The workload identity a client asks for, as namespace + service account.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkloadArgs {
    #[arg(long, default_value = "default")]
    pub namespace: String,
    #[arg(long, default_value = "default")]
    pub service_account: String,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
}

impl WorkloadArgs {
    pub fn identity(&self) -> anyhow::Result<String> {
        Ok(crate::pki::identity::SpiffeId::new(
            &self.trust_domain,
            &self.namespace,
            &self.service_account,
        )?
        .to_string())
    }
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let token =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(token.trim().to_owned())
}

/// An Istio-style CSR: empty subject, one URI SAN (critical, as the subject is empty).
pub fn build_csr(identity: &str, key: &KeyPair) -> anyhow::Result<String> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        identity.try_into().context("identity is not a valid URI")?,
    )];
    Ok(params.serialize_request(key)?.pem()?)
}

/// The request metadata Struct: pilot-agent's `CertSigner` (sent even when empty) and
/// ztunnel's `ImpersonatedIdentity`.
pub fn metadata(cert_signer: Option<&str>, impersonate: Option<&str>) -> prost_types::Struct {
    let string = |s: &str| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.to_owned())),
    };
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("CertSigner".to_owned(), string(cert_signer.unwrap_or("")));
    if let Some(identity) = impersonate {
        fields.insert("ImpersonatedIdentity".to_owned(), string(identity));
    }
    prost_types::Struct { fields }
}

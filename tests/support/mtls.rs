//! mTLS between two workloads as Istio's proxies make it: each side presents the chain of its
//! CreateCertificate answer and trusts ONLY the last element of that answer (its roots).
//! Identities are SPIFFE URIs, not DNS names, so the server is verified by its chain alone.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use istio_csr_rs::pki::chain::{RootBundle, verify_path};
use istio_csr_rs::pki::pem;
use rcgen::KeyPair;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A workload: its answer (leaf, intermediates, then its roots) and its key.
#[derive(Debug)]
pub struct Workload {
    pub answer: Vec<String>,
    pub key: KeyPair,
}

impl Workload {
    fn presented(&self) -> Vec<CertificateDer<'static>> {
        let (_, chain) = self.answer.split_last().expect("an empty answer");
        chain
            .iter()
            .flat_map(|pem| pem::parse_certificates(pem.as_bytes()).unwrap())
            .collect()
    }

    fn trusted(&self) -> Vec<CertificateDer<'static>> {
        let roots = self.answer.last().expect("an empty answer");
        pem::parse_certificates(roots.as_bytes()).unwrap()
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key.serialize_der()).into()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies the server's chain against the client's roots; names are not DNS here.
#[derive(Debug)]
struct ChainOnly {
    roots: RootBundle,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let intermediates: Vec<_> = intermediates
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        verify_path(
            &end_entity.clone().into_owned(),
            &intermediates,
            &self.roots,
            now,
        )
        .map(|_| ServerCertVerified::assertion())
        .map_err(|e| rustls::Error::General(e.to_string()))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An mTLS handshake from `client` to `server` over an in-memory stream, then one byte each
/// way (with TLS 1.3 a refused client certificate shows only after the handshake).
pub async fn handshake(client: &Workload, server: &Workload) -> Result<(), String> {
    let provider = provider();
    let mut server_roots = RootCertStore::empty();
    for root in server.trusted() {
        server_roots.add(root).map_err(|e| e.to_string())?;
    }
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(server_roots), provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(server.presented(), server.key())
        .map_err(|e| e.to_string())?;
    let verifier = ChainOnly {
        roots: RootBundle::from_certs(client.trusted()).map_err(|e| e.to_string())?,
        provider: provider.clone(),
    };
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(client.presented(), client.key())
        .map_err(|e| e.to_string())?;

    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let serve = async move {
        let mut tls = acceptor
            .accept(server_io)
            .await
            .map_err(|e| format!("server: {e}"))?;
        tls.write_all(b"s")
            .await
            .map_err(|e| format!("server: {e}"))?;
        tls.flush().await.map_err(|e| format!("server: {e}"))?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte)
            .await
            .map_err(|e| format!("server: {e}"))?;
        Ok::<_, String>(())
    };
    let connect = async move {
        let name = ServerName::try_from("workload").unwrap();
        let mut tls = connector
            .connect(name, client_io)
            .await
            .map_err(|e| format!("client: {e}"))?;
        tls.write_all(b"c")
            .await
            .map_err(|e| format!("client: {e}"))?;
        tls.flush().await.map_err(|e| format!("client: {e}"))?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte)
            .await
            .map_err(|e| format!("client: {e}"))?;
        Ok::<_, String>(())
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        tokio::try_join!(serve, connect).map(|_| ())
    })
    .await
    .map_err(|_| "the handshake hung".to_owned())?
}

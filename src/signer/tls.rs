//! TLS for the gRPC listener: TLS 1.2 and 1.3, ALPN h2, a serving certificate that can be
//! swapped without dropping connections, and optional client certificates verified against the
//! mesh roots in force.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rcgen::KeyPair;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pki::chain::RootBundle;

/// The serving certificate in force; swapped atomically on renewal. Open connections keep the
/// certificate they were established with.
#[derive(Debug, Default)]
pub struct ServingCertResolver {
    current: ArcSwapOption<CertifiedKey>,
    not_after_unix: std::sync::atomic::AtomicI64,
}

impl ServingCertResolver {
    pub fn install(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: &KeyPair,
    ) -> Result<(), rustls::Error> {
        let not_after = chain
            .first()
            .and_then(|c| X509Certificate::from_der(c).ok())
            .map_or(0, |(_, c)| c.validity().not_after.timestamp());
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&der)?;
        self.current
            .store(Some(Arc::new(CertifiedKey::new(chain, signing_key))));
        self.not_after_unix
            .store(not_after, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }

    /// notAfter of the certificate in force, as unix seconds (0 before the first one).
    pub fn not_after_unix(&self) -> i64 {
        self.not_after_unix
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl ResolvesServerCert for ServingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

/// Verifies optional client certificates against the current mesh roots.
#[derive(Debug)]
pub struct MeshClientVerifier {
    inner: ArcSwap<Arc<dyn ClientCertVerifier>>,
}

impl MeshClientVerifier {
    pub fn new(roots: &RootBundle) -> Result<Arc<Self>, rustls::Error> {
        Ok(Arc::new(Self {
            inner: ArcSwap::from_pointee(build_client_verifier(roots)?),
        }))
    }

    pub fn update(&self, roots: &RootBundle) -> Result<(), rustls::Error> {
        self.inner.store(Arc::new(build_client_verifier(roots)?));
        Ok(())
    }

    /// Follows root changes until the sender is dropped.
    pub async fn follow(self: Arc<Self>, mut roots: watch::Receiver<Arc<RootBundle>>) {
        while roots.changed().await.is_ok() {
            let bundle = roots.borrow_and_update().clone();
            if let Err(error) = self.update(&bundle) {
                tracing::error!(%error, "client certificate roots not updated");
            }
        }
    }
}

fn build_client_verifier(roots: &RootBundle) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
    let mut store = RootCertStore::empty();
    for cert in roots.certs() {
        store.add(cert.clone())?;
    }
    WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    // Most callers authenticate with a token; a certificate is an alternative, not a must.
    .allow_unauthenticated()
    .build()
    .map_err(|e| rustls::Error::General(e.to_string()))
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional (RFC 8446 4.2.4) and the roots can change under us.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .load()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.load().supported_verify_schemes()
    }
}

pub fn server_config(
    certs: Arc<ServingCertResolver>,
    client_verifier: Option<Arc<MeshClientVerifier>>,
) -> Result<ServerConfig, rustls::Error> {
    let builder =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

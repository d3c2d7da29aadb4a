//! This replica's own serving certificate: obtained before the gRPC port opens, renewed at two
//! thirds of its life, swapped into the TLS acceptor without dropping open connections.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use tokio::sync::watch;

use rustls_pki_types::UnixTime;

use super::issuer::cert_manager::CertManagerIssuer;
use super::issuer::kube_csr::KubeCsrIssuer;
use super::issuer::local_ca::LocalCa;
use super::tls::ServingCertResolver;
use crate::backoff;
use crate::pki::chain::RootBundle;
use crate::pki::keys;
use crate::pki::{chain, pem};

/// Keeps a CA about to expire (so short leaves) from a busy renewal loop.
const RENEW_FLOOR: Duration = Duration::from_secs(1);

/// Names the serving certificate is valid for.
#[derive(Clone, Debug)]
pub struct ServingNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl ServingNames {
    /// Splits configured names into DNS names and IP addresses.
    pub fn from_names(names: &[String]) -> Self {
        let (ips, dns): (Vec<_>, Vec<_>) = names
            .iter()
            .map(|n| (n.parse::<IpAddr>().ok(), n))
            .partition(|(ip, _)| ip.is_some());
        Self {
            dns: dns.into_iter().map(|(_, n)| n.clone()).collect(),
            ips: ips.into_iter().filter_map(|(ip, _)| ip).collect(),
        }
    }
}

/// Where serving certificates come from: the active issuer.
#[derive(Clone)]
pub enum ServingSource {
    LocalCa(Arc<LocalCa>),
    CertManager(Arc<CertManagerIssuer>),
    KubeCsr(Arc<KubeCsrIssuer>),
}

impl ServingSource {
    /// A chain (leaf first, no root) for `key`, verified against `roots`.
    async fn obtain(
        &self,
        names: &ServingNames,
        key: &KeyPair,
        lifetime: Duration,
        roots: &RootBundle,
    ) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        match self {
            ServingSource::LocalCa(ca) => {
                let chain = ca.usable()?.sign_serving(
                    &names.dns,
                    &names.ips,
                    key,
                    lifetime,
                    OffsetDateTime::now_utc(),
                )?;
                let mut certs = vec![chain.leaf().clone()];
                certs.extend(chain.intermediates().iter().cloned());
                Ok(certs)
            }
            ServingSource::CertManager(issuer) => {
                let csr = serving_csr(names, key)?;
                let label = names.dns.join(",");
                let (chain_pem, ca_pem) = issuer.submit(&csr, &label, lifetime).await?;
                let mut certs = pem::parse_certificates(chain_pem.as_bytes())?;
                certs.extend(pem::parse_certificates(ca_pem.as_bytes()).unwrap_or_default());
                verified_chain(certs, roots)
            }
            ServingSource::KubeCsr(issuer) => {
                let csr = serving_csr(names, key)?;
                let chain_pem = issuer
                    .submit(&csr, &issuer.signer_for(None)?, lifetime)
                    .await?;
                verified_chain(pem::parse_certificates(chain_pem.as_bytes())?, roots)
            }
        }
    }
}

/// An external signer's answer (leaf first, then whatever came with it), as the chain to serve:
/// the same defence as for workloads, only a path to the pinned roots is served.
fn verified_chain(
    mut certs: Vec<CertificateDer<'static>>,
    roots: &RootBundle,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    anyhow::ensure!(!certs.is_empty(), "the signer answered no certificate");
    let leaf = certs.remove(0);
    let intermediates = chain::verify_path(&leaf, &certs, roots, UnixTime::now())?;
    let mut out = vec![leaf];
    out.extend(intermediates);
    Ok(out)
}

/// A CSR for the serving names: empty subject, DNS and IP SANs.
pub fn serving_csr(names: &ServingNames, key: &KeyPair) -> anyhow::Result<String> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    for dns in &names.dns {
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName(dns.as_str().try_into()?));
    }
    for ip in &names.ips {
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(*ip));
    }
    Ok(params.serialize_request(key)?.pem()?)
}

/// Obtains, installs and renews this replica's serving certificate.
pub struct ServingCerts {
    source: ServingSource,
    names: ServingNames,
    lifetime: Duration,
    resolver: Arc<ServingCertResolver>,
    /// Clients trust the CA's serving certificate through the root bundle: when the roots
    /// change, a certificate from the new CA is needed at once, not at the next renewal.
    roots: watch::Receiver<Arc<RootBundle>>,
}

/// One installed certificate's validity.
struct Installed {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl ServingCerts {
    pub fn new(
        source: ServingSource,
        names: ServingNames,
        lifetime: Duration,
        resolver: Arc<ServingCertResolver>,
        roots: watch::Receiver<Arc<RootBundle>>,
    ) -> Self {
        Self {
            source,
            names,
            lifetime,
            resolver,
            roots,
        }
    }

    async fn renew(&self) -> anyhow::Result<Installed> {
        let key = keys::generate_ecdsa_p256()?;
        let now = OffsetDateTime::now_utc();
        let roots = self.roots.borrow().clone();
        let certs = self
            .source
            .obtain(&self.names, &key, self.lifetime, &roots)
            .await?;
        install(&self.resolver, certs, &key)?;
        let not_after = OffsetDateTime::from_unix_timestamp(self.resolver.not_after_unix())?;
        tracing::info!(%not_after, "serving certificate installed");
        Ok(Installed {
            not_before: now,
            not_after,
        })
    }

    /// Obtains the first certificate, retrying with backoff for as long as it takes (the
    /// listener must not open before). Then renews at two thirds of each certificate's life,
    /// with backoff on failure, for as long as the returned task runs.
    pub async fn start(self: Arc<Self>) -> impl Future<Output = anyhow::Result<()>> + use<> {
        // Taken before the first certificate, so no root change between the two is missed
        // (the task below may first run much later).
        let mut roots = self.roots.clone();
        roots.mark_unchanged();
        let first =
            backoff::retry_forever("obtaining the first serving certificate", || self.renew())
                .await;
        self.renew_forever(first, roots)
    }

    async fn renew_forever(
        self: Arc<Self>,
        first: Installed,
        mut roots: watch::Receiver<Arc<RootBundle>>,
    ) -> anyhow::Result<()> {
        let Installed {
            mut not_before,
            mut not_after,
        } = first;
        loop {
            let life: time::Duration = not_after - not_before;
            let renew_at: OffsetDateTime = not_before + life * 2 / 3;
            let remaining: time::Duration = renew_at - OffsetDateTime::now_utc();
            // The floor keeps a CA that is about to expire (short leaves) from a busy loop.
            let wait = Duration::try_from(remaining)
                .unwrap_or(Duration::ZERO)
                .max(RENEW_FLOOR);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                Ok(()) = roots.changed() => {
                    roots.mark_unchanged();
                    tracing::info!("trust roots changed; renewing the serving certificate");
                }
            }
            let installed =
                backoff::retry_forever("serving certificate renewal", || self.renew()).await;
            not_before = installed.not_before;
            not_after = installed.not_after;
        }
    }
}

fn install(
    resolver: &ServingCertResolver,
    certs: Vec<CertificateDer<'static>>,
    key: &KeyPair,
) -> anyhow::Result<()> {
    resolver.install(certs, key)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_dns_names_and_ip_addresses() {
        let names = ServingNames::from_names(&[
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
            "istio-csr.cert-manager.svc".into(),
        ]);
        assert_eq!(names.dns, vec!["localhost", "istio-csr.cert-manager.svc"]);
        assert_eq!(names.ips.len(), 2);
    }
}

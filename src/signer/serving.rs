//! This replica's own serving certificate: obtained before the gRPC port opens, renewed at two
//! thirds of its life, swapped into the TLS acceptor without dropping open connections.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use tokio::sync::watch;

use super::issuance::{Issuance, own_csr};
use super::issuer::{IssueRequest, LeafNames, NO_ANNOTATIONS, Purpose};
use super::tls::ServingCertResolver;
use crate::pki::chain::RootBundle;
use crate::pki::keys;
use crate::retry;

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

impl ServingNames {
    /// As the issuers take them.
    pub fn leaf_names(&self) -> LeafNames {
        LeafNames {
            dns: self.dns.clone(),
            ips: self.ips.clone(),
            ..LeafNames::default()
        }
    }
}

/// Obtains, installs and renews this replica's serving certificate.
pub struct ServingCerts {
    issuance: Issuance,
    names: LeafNames,
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
        issuance: Issuance,
        names: &ServingNames,
        lifetime: Duration,
        resolver: Arc<ServingCertResolver>,
    ) -> Self {
        Self {
            roots: issuance.roots().clone(),
            issuance,
            names: names.leaf_names(),
            lifetime,
            resolver,
        }
    }

    async fn renew(&self) -> anyhow::Result<Installed> {
        let key = keys::generate_ecdsa_p256()?;
        let now = OffsetDateTime::now_utc();
        let csr = own_csr(&self.names, &key)?;
        let certified = self
            .issuance
            .issue(IssueRequest {
                purpose: Purpose::Serving,
                csr: &csr,
                names: &self.names,
                lifetime: self.lifetime,
                route: None,
                annotations: &NO_ANNOTATIONS,
            })
            .await?;
        let mut certs = vec![certified.chain.leaf().clone()];
        certs.extend(certified.chain.intermediates().iter().cloned());
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
            retry::retry_forever("obtaining the first serving certificate", || self.renew()).await;
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
                retry::retry_forever("serving certificate renewal", || self.renew()).await;
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

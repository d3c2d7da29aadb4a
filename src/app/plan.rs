//! The effective configuration: flags checked and standalone defaults applied, before anything
//! is built.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::bundle::selector::Selector;
use crate::config::{IssuanceArgs, ServeArgs};
use crate::istiod::IstiodCertSpec;
use crate::leader::Timing;
use crate::pki::identity;
use crate::signer::issuer::{cert_manager, kube_csr};
use crate::signer::{Signer, capacity};
use crate::standalone::DataDir;

/// Certificate lifetimes accepted in flags: below a minute renewals would never rest; beyond
/// ten years the CA's own lifetime is the real limit anyway.
pub(super) const MIN_CERTIFICATE_DURATION: Duration = Duration::from_secs(60);
const MAX_CERTIFICATE_DURATION: Duration = Duration::from_secs(3650 * 86_400);
const DEFAULT_SERVING_ADDRESS: &str = "0.0.0.0:6443";
const STANDALONE_SERVING_ADDRESS: &str = "127.0.0.1:6443";
const DEFAULT_ADMIN_ADDRESS: &str = "0.0.0.0:9402";
const STANDALONE_ADMIN_ADDRESS: &str = "127.0.0.1:9402";
const DEFAULT_SERVING_DNS_NAME: &str = "cert-manager-istio-csr.cert-manager.svc";

/// Which signer, with what it needs.
pub(super) enum SignerPlan {
    LocalCa(PathBuf),
    CertManager(cert_manager::Settings),
    KubeCsr(kube_csr::Settings),
}

/// The effective configuration, after standalone defaults are applied.
pub(super) struct Plan {
    pub serving_address: SocketAddr,
    pub admin_address: SocketAddr,
    pub signer: SignerPlan,
    pub token_auth_file: Option<PathBuf>,
    pub serving_names: Vec<String>,
    pub standalone: Option<DataDir>,
    pub namespace_selector: Selector,
    pub leader_timing: Timing,
    /// istiod's certificate, when `--istiod-cert-enabled`.
    pub istiod_cert: Option<IstiodCertSpec>,
    /// `--max-connections`, or what the memory limit holds.
    pub max_connections: usize,
    /// Request bytes that calls may hold, all sources together (from the memory limit).
    pub max_request_bytes: usize,
}

impl Plan {
    pub(super) fn resolve(args: &ServeArgs) -> anyhow::Result<Self> {
        identity::validate_trust_domain(&args.server.trust_domain).context("--trust-domain")?;
        for account in &args.server.ca_trusted_node_accounts {
            let valid = account.split_once('/').is_some_and(|(ns, sa)| {
                identity::is_dns1123_label(ns) && identity::is_dns1123_subdomain(sa)
            });
            if !valid {
                bail!("--ca-trusted-node-accounts: {account:?} is not namespace/serviceaccount");
            }
        }
        let qps = args.server.kube_api_qps;
        if !(qps.is_finite() && (qps == 0.0 || qps >= 0.1)) {
            bail!("--kube-api-qps must be 0 (no limit) or at least 0.1");
        }
        let namespace_selector: Selector = args
            .bundle
            .configmap_namespace_selector
            .parse()
            .context("--configmap-namespace-selector")?;
        let leader_timing = Timing {
            lease_duration: args.bundle.leader_election_lease_duration,
            renew_deadline: args.bundle.leader_election_renew_deadline,
            retry_period: args.bundle.leader_election_retry_period,
        };
        leader_timing.validate().map_err(|reason| {
            anyhow::anyhow!(
                "--leader-election-lease-duration / -renew-deadline / -retry-period: {reason}"
            )
        })?;
        if args.bundle.max_concurrent_reconciles == 0 {
            bail!("--max-concurrent-reconciles must be at least 1");
        }
        if args.server.max_inflight == 0 {
            bail!("--max-inflight must be at least 1");
        }
        if args.server.max_connections == Some(0) {
            bail!("--max-connections must be at least 1");
        }
        let memory_limit = args
            .server
            .memory_limit
            .or_else(capacity::cgroup_memory_limit);
        let max_connections = args
            .server
            .max_connections
            .unwrap_or_else(|| capacity::default_max_connections(memory_limit));
        let max_request_bytes = capacity::held_request_bytes(memory_limit);
        for (flag, value) in [
            (
                "--max-client-certificate-duration",
                args.server.max_client_certificate_duration,
            ),
            (
                "--serving-certificate-duration",
                args.serving_tls.serving_certificate_duration,
            ),
        ] {
            if !(MIN_CERTIFICATE_DURATION..=MAX_CERTIFICATE_DURATION).contains(&value) {
                bail!(
                    "{flag} must be between 1m and 3650d, not {}",
                    humantime::format_duration(value)
                );
            }
        }
        let standalone = args.standalone.standalone;
        let istiod_cert = if args.istiod_cert.istiod_cert_enabled {
            if standalone {
                bail!("--istiod-cert-enabled needs Kubernetes: it writes Secret istiod-tls");
            }
            Some(
                IstiodCertSpec::from_args(&args.istiod_cert, &args.server.trust_domain)
                    .map_err(anyhow::Error::msg)?,
            )
        } else {
            None
        };
        let address = |given: Option<SocketAddr>, default: &str, standalone_default: &str| {
            given.map_or_else(
                || {
                    if standalone {
                        standalone_default
                    } else {
                        default
                    }
                    .parse()
                },
                Ok,
            )
        };
        let serving_address = address(
            args.server.serving_address,
            DEFAULT_SERVING_ADDRESS,
            STANDALONE_SERVING_ADDRESS,
        )?;
        let admin_address = address(
            args.admin.admin_address,
            DEFAULT_ADMIN_ADDRESS,
            STANDALONE_ADMIN_ADDRESS,
        )?;
        let mut serving_names = args.serving_tls.serving_certificate_dns_names.clone();
        if standalone {
            let data = DataDir::new(&args.standalone.data_dir);
            if serving_names.is_empty() {
                serving_names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
            }
            return Ok(Self {
                serving_address,
                admin_address,
                signer: SignerPlan::LocalCa(
                    args.issuance.local_ca_dir.clone().unwrap_or(data.ca_dir()),
                ),
                token_auth_file: Some(
                    args.server
                        .token_auth_file
                        .clone()
                        .unwrap_or(data.tokens_csv()),
                ),
                serving_names,
                standalone: Some(data),
                namespace_selector,
                leader_timing,
                istiod_cert,
                max_connections,
                max_request_bytes,
            });
        }
        let signer = match args.issuance.signer {
            Signer::LocalCa => SignerPlan::LocalCa(
                args.issuance
                    .local_ca_dir
                    .clone()
                    .context("--signer local-ca needs --local-ca-dir")?,
            ),
            Signer::CertManager => SignerPlan::CertManager(cert_manager_settings(&args.issuance)?),
            Signer::KubeCsr => SignerPlan::KubeCsr(kube_csr_settings(&args.issuance)?),
        };
        if matches!(signer, SignerPlan::KubeCsr(_)) {
            // The CSR API refuses expirationSeconds below ten minutes: shorter maxima could
            // not be honoured.
            for (flag, value) in [
                (
                    "--max-client-certificate-duration",
                    args.server.max_client_certificate_duration,
                ),
                (
                    "--serving-certificate-duration",
                    args.serving_tls.serving_certificate_duration,
                ),
                (
                    "--istiod-cert-duration",
                    istiod_cert.as_ref().map_or(Duration::MAX, |c| c.duration),
                ),
            ] {
                if value < Duration::from_secs(600) {
                    bail!("{flag} must be at least 10m with --signer kube-csr");
                }
            }
        }
        if serving_names.is_empty() {
            serving_names = vec![DEFAULT_SERVING_DNS_NAME.into()];
        }
        Ok(Self {
            serving_address,
            admin_address,
            signer,
            token_auth_file: args.server.token_auth_file.clone(),
            serving_names,
            standalone: None,
            namespace_selector,
            leader_timing,
            istiod_cert,
            max_connections,
            max_request_bytes,
        })
    }
}

fn kube_csr_settings(args: &IssuanceArgs) -> anyhow::Result<kube_csr::Settings> {
    let signer_name = args
        .kube_csr_signer_name
        .clone()
        .context("--signer kube-csr needs --kube-csr-signer-name")?;
    let qualified = |name: &str| {
        name.split_once('/').is_some_and(|(domain, path)| {
            identity::is_dns1123_subdomain(domain) && !path.is_empty() && !path.contains('/')
        })
    };
    if !qualified(&signer_name) {
        bail!("--kube-csr-signer-name: {signer_name:?} is not <domain>/<name>");
    }
    if let Some(domain) = &args.cert_signer_domain
        && !identity::is_dns1123_subdomain(domain)
    {
        bail!("--cert-signer-domain: {domain:?} is not a DNS name");
    }
    // The CSR API returns no CA: only the pinned roots can vouch for its answers.
    if args.root_ca_file.is_none() {
        bail!("--signer kube-csr needs --root-ca-file (the CSR API returns no CA to trust)");
    }
    Ok(kube_csr::Settings {
        signer_name,
        approve: !args.kube_csr_external_approval,
        timeout: args.issuance_timeout,
        preserve_requests: args.preserve_certificate_requests,
    })
}

fn cert_manager_settings(args: &IssuanceArgs) -> anyhow::Result<cert_manager::Settings> {
    let mut annotations = std::collections::BTreeMap::new();
    for pair in &args.certificate_request_additional_annotations {
        let (key, value) = pair.split_once('=').with_context(|| {
            format!("--certificate-request-additional-annotations: {pair:?} is not key=value")
        })?;
        annotations.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    if !args.issuer_enabled && args.runtime_issuance_config_map_name.is_none() {
        bail!(
            "--issuer-enabled=false needs --runtime-issuance-config-map-name: nothing would \
             name an issuer"
        );
    }
    Ok(cert_manager::Settings {
        static_issuer: args.issuer_enabled,
        namespace: args.certificate_namespace.clone(),
        issuer: cert_manager::IssuerRef {
            name: args.issuer_name.clone(),
            kind: args.issuer_kind.clone(),
            group: args.issuer_group.clone(),
        },
        additional_annotations: annotations,
        preserve_requests: args.preserve_certificate_requests,
        timeout: args.issuance_timeout,
    })
}

impl Plan {
    /// The effective configuration, once, at start-up. Paths only: never file contents.
    pub(super) fn log(&self, args: &ServeArgs) {
        // The signer that really signs: standalone mode always uses the built-in CA.
        let (signer, signs_with) = match &self.signer {
            SignerPlan::LocalCa(dir) => ("local-ca", format!("built-in CA in {}", dir.display())),
            SignerPlan::CertManager(s) => (
                "cert-manager",
                match &args.issuance.runtime_issuance_config_map_name {
                    Some(name) if !s.static_issuer => {
                        format!("the issuer named by ConfigMap {name}")
                    }
                    Some(name) => format!(
                        "the issuer named by ConfigMap {name}, else {}/{}.{} in {}",
                        s.issuer.name, s.issuer.kind, s.issuer.group, s.namespace
                    ),
                    None => format!(
                        "{}/{}.{} in {}",
                        s.issuer.name, s.issuer.kind, s.issuer.group, s.namespace
                    ),
                },
            ),
            SignerPlan::KubeCsr(s) => ("kube-csr", format!("signerName {}", s.signer_name)),
        };
        tracing::info!(
            standalone = self.standalone.is_some(),
            signer,
            signs_with = %signs_with,
            istiod_cert = ?self.istiod_cert.as_ref().map(|c| (&c.namespace, &c.names.dns)),
            root_ca_file = ?args.issuance.root_ca_file,
            token_auth_file = ?self.token_auth_file,
            client_cert_authenticator = args.server.enable_client_cert_authenticator,
            trust_domain = %args.server.trust_domain,
            cluster_id = %args.server.cluster_id,
            max_certificate_duration = ?args.server.max_client_certificate_duration,
            trusted_node_accounts = ?args.server.ca_trusted_node_accounts,
            serving_address = %self.serving_address,
            admin_address = %self.admin_address,
            serving_names = ?self.serving_names,
            max_inflight = args.server.max_inflight,
            max_connections = self.max_connections,
            "effective configuration"
        );
    }
}

//! Istio's own mesh config (`--mesh-config`, the `mesh` key of the `istio` ConfigMap): its
//! `caCertificates` entries with `certSigners` give the roots of each tenant signer, as in
//! Istio's "custom CA integration using Kubernetes CSR". Everything else in it is ignored.

use serde::Deserialize;

use super::file::is_qualified_signer_name;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshConfig {
    #[serde(default)]
    ca_certificates: Vec<CaCertificate>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CaCertificate {
    #[serde(default)]
    pem: String,
    #[serde(default)]
    cert_signers: Vec<String>,
}

/// The roots a mesh config gives one signer name (`<domain>/<name>`), in document order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerRoots {
    pub signer_name: String,
    pub pem: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeshConfigError {
    #[error("not a mesh config: {0}")]
    Malformed(String),
    #[error("caCertificates[{index}]: {problem}")]
    Entry { index: usize, problem: String },
}

/// The `(signer name, PEM)` pairs of every `caCertificates` entry with `certSigners`. Entries
/// without `certSigners` are trust anchors of the whole mesh, which Istio's agent handles;
/// they are not ours to pool into any tenant.
pub fn signer_roots(text: &str) -> Result<Vec<SignerRoots>, MeshConfigError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let config: MeshConfig = serde_saphyr::from_str(text).map_err(|e| {
        let message = e.to_string();
        let line = message.lines().next().unwrap_or("invalid YAML");
        MeshConfigError::Malformed(crate::signer::log_guard::sanitize(line, 200).into_owned())
    })?;
    let mut roots = Vec::new();
    for (index, entry) in config.ca_certificates.into_iter().enumerate() {
        if entry.cert_signers.is_empty() {
            continue;
        }
        if entry.pem.trim().is_empty() {
            return Err(MeshConfigError::Entry {
                index,
                problem: "certSigners without a pem".into(),
            });
        }
        for signer_name in entry.cert_signers {
            if !is_qualified_signer_name(&signer_name) {
                return Err(MeshConfigError::Entry {
                    index,
                    problem: format!("certSigners entry {signer_name:?} is not <domain>/<name>"),
                });
            }
            roots.push(SignerRoots {
                signer_name,
                pem: entry.pem.clone(),
            });
        }
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documents_ca_certificates_and_ignores_the_rest() {
        let text = r#"
trustDomain: cluster.local
defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
caCertificates:
  - pem: |
      FOO ROOT
    certSigners:
      - clusterissuers.istio.io/foo
  - pem: "BAR ROOT"
    certSigners: [clusterissuers.istio.io/bar, example.com/bar]
  - pem: "MESH ANCHOR"
  - spiffeBundleUrl: https://example.com/bundle
    trustDomains: [other.example]
"#;
        let roots = signer_roots(text).unwrap();
        let pairs: Vec<(&str, &str)> = roots
            .iter()
            .map(|r| (r.signer_name.as_str(), r.pem.trim()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("clusterissuers.istio.io/foo", "FOO ROOT"),
                ("clusterissuers.istio.io/bar", "BAR ROOT"),
                ("example.com/bar", "BAR ROOT"),
            ]
        );
        assert_eq!(signer_roots("").unwrap(), vec![]);
        assert_eq!(signer_roots("trustDomain: x").unwrap(), vec![]);
    }

    #[test]
    fn refuses_entries_it_cannot_use() {
        assert!(matches!(
            signer_roots("caCertificates: [{certSigners: [example.com/foo]}]"),
            Err(MeshConfigError::Entry { index: 0, .. })
        ));
        assert!(matches!(
            signer_roots("caCertificates: [{pem: x}, {pem: y, certSigners: [foo]}]"),
            Err(MeshConfigError::Entry { index: 1, .. })
        ));
        assert!(matches!(
            signer_roots("caCertificates: {pem: x}"),
            Err(MeshConfigError::Malformed(_))
        ));
    }
}

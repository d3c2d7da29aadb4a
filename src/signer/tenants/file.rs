//! The `--signers-file` document: one entry per tenant signer, checked as a whole (a broken
//! document changes nothing). Roots are only named here; `load` reads them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::pki::identity;
use crate::signer::issuer::cert_manager::IssuerRef;

/// The document as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    signers: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    name: String,
    issuer_ref: Option<EntryIssuerRef>,
    #[serde(rename = "kubeCSRSignerName")]
    kube_csr_signer_name: Option<String>,
    roots_file: Option<PathBuf>,
    #[serde(rename = "rootsPEM")]
    roots_pem: Option<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    default: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryIssuerRef {
    name: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    group: Option<String>,
}

/// Where a tenant's roots come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootsSource {
    File(PathBuf),
    Pem(String),
    /// Istio's mesh config (`caCertificates` whose `certSigners` name this signer).
    MeshConfig,
}

/// Who may ask for a signer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespaces {
    Any,
    Only(Vec<String>),
}

impl Namespaces {
    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            Namespaces::Any => true,
            Namespaces::Only(names) => names.iter().any(|n| n == namespace),
        }
    }
}

/// One checked entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerSpec {
    /// The `CertSigner` value that selects it.
    pub name: String,
    /// For `--signer cert-manager`.
    pub issuer_ref: Option<IssuerRef>,
    /// For `--signer kube-csr`.
    pub kube_csr_signer_name: Option<String>,
    pub roots: RootsSource,
    pub namespaces: Namespaces,
    /// Used for its namespaces when a request names no signer.
    pub default: bool,
}

/// Which backend signs: an entry must name what that backend needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    CertManager,
    KubeCsr,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("not a signers document: {0}")]
    Malformed(String),
    #[error("signer {name:?}: {problem}")]
    Entry { name: String, problem: String },
    #[error("namespace {namespace:?} has more than one default signer: {first:?} and {second:?}")]
    TwoDefaults {
        namespace: String,
        first: String,
        second: String,
    },
}

/// cert-manager's defaults for an issuerRef that leaves them out.
const DEFAULT_ISSUER_KIND: &str = "Issuer";
const DEFAULT_ISSUER_GROUP: &str = "cert-manager.io";

/// Parses and checks a signers document for `backend`. `cert_signer_domain`
/// (`--cert-signer-domain`) gives kube-csr entries without `kubeCSRSignerName` the signer
/// name `<domain>/<name>`. Entries without roots take them from the mesh config.
pub fn parse(
    text: &str,
    backend: Backend,
    cert_signer_domain: Option<&str>,
) -> Result<Vec<SignerSpec>, SpecError> {
    let document: Document = serde_saphyr::from_str(text)
        // serde-saphyr's messages quote the document: keep only the first line's kind.
        .map_err(|e| SpecError::Malformed(first_line(&e.to_string())))?;
    let mut specs: Vec<SignerSpec> = Vec::with_capacity(document.signers.len());
    for entry in document.signers {
        let spec = check(entry, backend, cert_signer_domain)?;
        if specs.iter().any(|s| s.name == spec.name) {
            return Err(SpecError::Entry {
                name: spec.name,
                problem: "listed twice".into(),
            });
        }
        specs.push(spec);
    }
    check_defaults(&specs)?;
    Ok(specs)
}

fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or("invalid YAML");
    crate::signer::log_guard::sanitize(line, 200).into_owned()
}

fn check(
    entry: Entry,
    backend: Backend,
    cert_signer_domain: Option<&str>,
) -> Result<SignerSpec, SpecError> {
    let name = entry.name;
    let problem = |problem: String| SpecError::Entry {
        name: name.clone(),
        problem,
    };
    // A CertSigner becomes one path segment of a signer name and a metric label value.
    if !identity::is_dns1123_subdomain(&name) {
        return Err(problem(
            "the name must be a DNS-1123 subdomain (lower-case letters, digits, '-', '.')".into(),
        ));
    }
    let issuer_ref = entry.issuer_ref.map(|r| IssuerRef {
        name: r.name,
        kind: r.kind.unwrap_or_else(|| DEFAULT_ISSUER_KIND.to_owned()),
        group: r.group.unwrap_or_else(|| DEFAULT_ISSUER_GROUP.to_owned()),
    });
    if let Some(r) = &issuer_ref
        && (!identity::is_dns1123_subdomain(&r.name) || r.kind.is_empty() || r.group.is_empty())
    {
        return Err(problem(format!(
            "issuerRef {:?}/{:?}/{:?} is not a valid reference",
            r.name, r.kind, r.group
        )));
    }
    let kube_csr_signer_name = entry
        .kube_csr_signer_name
        .or_else(|| cert_signer_domain.map(|domain| format!("{domain}/{name}")));
    if let Some(signer) = &kube_csr_signer_name
        && !is_qualified_signer_name(signer)
    {
        return Err(problem(format!(
            "kubeCSRSignerName {signer:?} is not <domain>/<name>"
        )));
    }
    match backend {
        Backend::CertManager if issuer_ref.is_none() => {
            return Err(problem("--signer cert-manager needs an issuerRef".into()));
        }
        Backend::KubeCsr if kube_csr_signer_name.is_none() => {
            return Err(problem(
                "--signer kube-csr needs a kubeCSRSignerName (or --cert-signer-domain)".into(),
            ));
        }
        _ => {}
    }
    let roots = match (entry.roots_file, entry.roots_pem) {
        (Some(_), Some(_)) => {
            return Err(problem("set rootsFile or rootsPEM, not both".into()));
        }
        (Some(path), None) => RootsSource::File(path),
        (None, Some(pem)) => RootsSource::Pem(pem),
        (None, None) => RootsSource::MeshConfig,
    };
    let namespaces = if entry.namespaces.iter().any(|n| n == "*") {
        if entry.namespaces.len() > 1 {
            return Err(problem("\"*\" stands alone in namespaces".into()));
        }
        Namespaces::Any
    } else {
        if entry.namespaces.is_empty() {
            return Err(problem(
                "namespaces is empty: list who may ask for it, or \"*\"".into(),
            ));
        }
        if let Some(bad) = entry
            .namespaces
            .iter()
            .find(|n| !identity::is_dns1123_label(n))
        {
            return Err(problem(format!(
                "namespace {bad:?} is not a namespace name"
            )));
        }
        Namespaces::Only(entry.namespaces)
    };
    if entry.default && namespaces == Namespaces::Any {
        return Err(problem(
            "a default signer must list its namespaces: \"*\" would change every namespace's \
             issuer"
                .into(),
        ));
    }
    Ok(SignerSpec {
        name,
        issuer_ref,
        kube_csr_signer_name,
        roots,
        namespaces,
        default: entry.default,
    })
}

/// `<domain>/<name>`, as the Kubernetes CSR API requires of a signer name.
pub fn is_qualified_signer_name(name: &str) -> bool {
    name.split_once('/').is_some_and(|(domain, path)| {
        identity::is_dns1123_subdomain(domain) && !path.is_empty() && !path.contains('/')
    })
}

fn check_defaults(specs: &[SignerSpec]) -> Result<(), SpecError> {
    let mut defaults: BTreeMap<&str, &str> = BTreeMap::new();
    for spec in specs.iter().filter(|s| s.default) {
        let Namespaces::Only(namespaces) = &spec.namespaces else {
            continue;
        };
        for namespace in namespaces {
            if let Some(first) = defaults.insert(namespace, &spec.name) {
                return Err(SpecError::TwoDefaults {
                    namespace: namespace.clone(),
                    first: first.to_owned(),
                    second: spec.name.clone(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_TENANTS: &str = r#"
signers:
  - name: foo
    issuerRef: {name: foo, kind: ClusterIssuer, group: cert-manager.io}
    kubeCSRSignerName: clusterissuers.cert-manager.io/foo
    rootsFile: /etc/istio-csr/signers/foo.pem
    namespaces: [tenant-foo]
    default: true
  - name: bar
    issuerRef: {name: bar}
    rootsPEM: |
      -----BEGIN CERTIFICATE-----
      -----END CERTIFICATE-----
    namespaces: ["*"]
"#;

    #[test]
    fn reads_the_documented_entry_and_fills_in_cert_managers_defaults() {
        let specs = parse(TWO_TENANTS, Backend::CertManager, None).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(
            specs[0],
            SignerSpec {
                name: "foo".into(),
                issuer_ref: Some(IssuerRef {
                    name: "foo".into(),
                    kind: "ClusterIssuer".into(),
                    group: "cert-manager.io".into(),
                }),
                kube_csr_signer_name: Some("clusterissuers.cert-manager.io/foo".into()),
                roots: RootsSource::File("/etc/istio-csr/signers/foo.pem".into()),
                namespaces: Namespaces::Only(vec!["tenant-foo".into()]),
                default: true,
            }
        );
        let bar = &specs[1];
        assert_eq!(
            bar.issuer_ref,
            Some(IssuerRef {
                name: "bar".into(),
                kind: "Issuer".into(),
                group: "cert-manager.io".into(),
            })
        );
        assert!(matches!(bar.roots, RootsSource::Pem(_)));
        assert_eq!(bar.namespaces, Namespaces::Any);
        assert!(bar.namespaces.allows("anything"));
        assert!(!specs[0].namespaces.allows("tenant-bar"));
    }

    #[test]
    fn each_backend_needs_its_own_field() {
        let error = parse(TWO_TENANTS, Backend::KubeCsr, None).unwrap_err();
        assert!(
            matches!(&error, SpecError::Entry { name, problem } if name == "bar" && problem.contains("kubeCSRSignerName")),
            "{error}"
        );
        // --cert-signer-domain names it.
        let specs = parse(TWO_TENANTS, Backend::KubeCsr, Some("example.com")).unwrap();
        assert_eq!(
            specs[1].kube_csr_signer_name.as_deref(),
            Some("example.com/bar")
        );
        assert_eq!(
            specs[0].kube_csr_signer_name.as_deref(),
            Some("clusterissuers.cert-manager.io/foo"),
            "an explicit name wins over the domain"
        );
        let no_ref = "signers: [{name: foo, kubeCSRSignerName: example.com/foo, namespaces: [a]}]";
        let error = parse(no_ref, Backend::CertManager, None).unwrap_err();
        assert!(error.to_string().contains("issuerRef"), "{error}");
        let specs = parse(no_ref, Backend::KubeCsr, None).unwrap();
        assert_eq!(specs[0].roots, RootsSource::MeshConfig);
    }

    #[test]
    fn a_namespace_has_at_most_one_default() {
        let text = "signers:
  - {name: foo, kubeCSRSignerName: example.com/foo, namespaces: [a, shared], default: true}
  - {name: bar, kubeCSRSignerName: example.com/bar, namespaces: [shared, b], default: true}
";
        assert_eq!(
            parse(text, Backend::KubeCsr, None).unwrap_err(),
            SpecError::TwoDefaults {
                namespace: "shared".into(),
                first: "foo".into(),
                second: "bar".into(),
            }
        );
        // Two defaults for different namespaces are fine.
        let fine = text.replace("[shared, b]", "[b]");
        assert!(parse(&fine, Backend::KubeCsr, None).is_ok());
    }

    #[test]
    fn refuses_what_would_be_ambiguous_or_unsafe() {
        let cases = [
            (
                "signers: [{name: Foo, kubeCSRSignerName: example.com/foo, namespaces: [a]}]",
                "DNS-1123",
            ),
            (
                "signers: [{name: a/b, kubeCSRSignerName: example.com/foo, namespaces: [a]}]",
                "DNS-1123",
            ),
            (
                "signers: [{name: foo, kubeCSRSignerName: foo, namespaces: [a]}]",
                "<domain>/<name>",
            ),
            (
                "signers: [{name: foo, kubeCSRSignerName: example.com/a/b, namespaces: [a]}]",
                "<domain>/<name>",
            ),
            (
                "signers: [{name: foo, kubeCSRSignerName: example.com/foo}]",
                "namespaces is empty",
            ),
            (
                "signers: [{name: foo, kubeCSRSignerName: example.com/foo, namespaces: ['*', a]}]",
                "stands alone",
            ),
            (
                "signers: [{name: foo, kubeCSRSignerName: example.com/foo, namespaces: [A_B]}]",
                "not a namespace",
            ),
            (
                "signers: [{name: foo, kubeCSRSignerName: example.com/foo, namespaces: ['*'], default: true}]",
                "default signer must list",
            ),
            (
                "signers: [{name: foo, kubeCSRSignerName: example.com/foo, namespaces: [a], rootsFile: /x, rootsPEM: y}]",
                "not both",
            ),
            (
                "signers: [{name: foo, kubeCSRSignerName: example.com/foo, namespaces: [a]}, {name: foo, kubeCSRSignerName: example.com/foo, namespaces: [b]}]",
                "listed twice",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text, Backend::KubeCsr, None).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
        for malformed in [
            "signers: {name: foo}",
            "signers: [{name: foo, kubeCSRSignerName: example.com/foo, namespaces: [a], issuer: x}]",
            "other: 1",
            "signers: [",
        ] {
            assert!(
                matches!(
                    parse(malformed, Backend::KubeCsr, None),
                    Err(SpecError::Malformed(_))
                ),
                "{malformed}"
            );
        }
        assert_eq!(
            parse("signers: []", Backend::KubeCsr, None).unwrap(),
            vec![]
        );
    }
}

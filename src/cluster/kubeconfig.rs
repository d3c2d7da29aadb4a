//! Remote-cluster kubeconfigs from Secrets, checked as istiod checks them: a kubeconfig that
//! runs a program (exec), calls an auth provider, or reads files from this pod's disk is
//! refused unless `--allow-insecure-kubeconfig`: whoever can write a Secret in the control
//! plane's namespace must not get code execution or file access in the CA.

use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KubeconfigError {
    #[error("not a kubeconfig: {0}")]
    Malformed(String),
    #[error("refused: {0} (allowed only with --allow-insecure-kubeconfig)")]
    Insecure(String),
    #[error("unusable: {0}")]
    Unusable(String),
}

/// At most this many YAML events replayed through aliases per kubeconfig. kubectl, clusteradm
/// and istioctl never write aliases; serde-saphyr's default (a million) lets a 369-byte
/// Secret expand to 100,000 scalars and cost seconds of CPU on every parse.
pub const MAX_ALIAS_REPLAYED_EVENTS: usize = 1_000;

/// `Kubeconfig::from_yaml` (documents merged in order, as kubectl does), with tight alias
/// limits, which kube's own parser does not let us set.
fn from_yaml(text: &str) -> Result<Kubeconfig, KubeconfigError> {
    let mut aliases = serde_saphyr::options::AliasLimits::default();
    aliases.max_total_replayed_events = MAX_ALIAS_REPLAYED_EVENTS;
    let mut options = serde_saphyr::Options::default();
    options.alias_limits = aliases;
    // YAML errors quote the document (tokens, keys): say only what failed.
    let documents: Vec<Kubeconfig> = serde_saphyr::from_multiple_with_options(text, options)
        .map_err(|_| KubeconfigError::Malformed("failed to parse kubeconfig YAML".into()))?;
    documents
        .into_iter()
        .try_fold(Kubeconfig::default(), Kubeconfig::merge)
        .map_err(|_| KubeconfigError::Malformed("failed to merge kubeconfig documents".into()))
}

/// Parses `bytes` and refuses what a remote Secret must not contain.
pub fn parse(bytes: &[u8], allow_insecure: bool) -> Result<Kubeconfig, KubeconfigError> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| KubeconfigError::Malformed("not UTF-8".into()))?;
    let config = from_yaml(text)?;
    if config.clusters.is_empty() {
        return Err(KubeconfigError::Malformed("no cluster in it".into()));
    }
    if !allow_insecure {
        for named in &config.auth_infos {
            let Some(auth) = &named.auth_info else {
                continue;
            };
            let user = &named.name;
            if auth.exec.is_some() {
                return Err(KubeconfigError::Insecure(format!(
                    "user {user:?} runs an exec plugin"
                )));
            }
            if auth.auth_provider.is_some() {
                return Err(KubeconfigError::Insecure(format!(
                    "user {user:?} uses an auth provider"
                )));
            }
            for (field, path) in [
                ("tokenFile", &auth.token_file),
                ("client-certificate", &auth.client_certificate),
                ("client-key", &auth.client_key),
            ] {
                if path.is_some() {
                    return Err(KubeconfigError::Insecure(format!(
                        "user {user:?} reads {field} from a file"
                    )));
                }
            }
        }
        for named in &config.clusters {
            let Some(cluster) = &named.cluster else {
                continue;
            };
            let name = &named.name;
            if cluster.certificate_authority.is_some() {
                return Err(KubeconfigError::Insecure(format!(
                    "cluster {name:?} reads certificate-authority from a file"
                )));
            }
            // Without server verification, or in clear text, whoever sits on the path to that
            // API server answers the TokenReviews and mints any identity of that cluster.
            if cluster.insecure_skip_tls_verify == Some(true) {
                return Err(KubeconfigError::Insecure(format!(
                    "cluster {name:?} sets insecure-skip-tls-verify"
                )));
            }
            if cluster
                .server
                .as_deref()
                .is_some_and(|s| s.trim().to_ascii_lowercase().starts_with("http://"))
            {
                return Err(KubeconfigError::Insecure(format!(
                    "cluster {name:?} has an http:// server"
                )));
            }
            // A proxy sees (and, over http://, could alter) the API traffic and the tokens.
            if cluster.proxy_url.is_some() {
                return Err(KubeconfigError::Insecure(format!(
                    "cluster {name:?} sets proxy-url"
                )));
            }
        }
    }
    Ok(config)
}

/// The client configuration of the kubeconfig's current context.
pub async fn client_config(config: Kubeconfig) -> Result<kube::Config, KubeconfigError> {
    kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .map_err(|e| KubeconfigError::Unusable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: v1
kind: Config
clusters:
- name: remote
  cluster:
    server: https://10.0.0.1:6443
    certificate-authority-data: Zm9v
users:
- name: reader
  user:
    token: abc
contexts:
- name: remote
  context: {cluster: remote, user: reader}
current-context: remote
";

    #[test]
    fn accepts_inline_credentials() {
        assert!(parse(GOOD.as_bytes(), false).is_ok());
    }

    /// `levels` nested lists of ten, each level ten aliases of the one below: 10^levels
    /// scalars from a few hundred bytes.
    fn alias_bomb(levels: usize) -> String {
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..levels {
            let below = format!("*a{}", level - 1);
            doc += &format!("a{level}: &a{level} [{}]\n", vec![below; 10].join(", "));
        }
        doc += "clusters: [{name: c, cluster: {server: \"https://c\"}}]\n";
        doc += &format!("extensions: [{{name: e, extension: *a{}}}]\n", levels - 1);
        doc
    }

    #[test]
    fn refuses_alias_bombs_but_keeps_a_few_aliases() {
        // 10^5 scalars from 369 bytes: refused by the replay budget, whatever the override.
        let bomb = alias_bomb(5);
        assert!(bomb.len() < 400, "{}", bomb.len());
        for allow_insecure in [false, true] {
            assert_eq!(
                parse(bomb.as_bytes(), allow_insecure).err(),
                Some(KubeconfigError::Malformed(
                    "failed to parse kubeconfig YAML".into()
                ))
            );
        }
        // 100 scalars through aliases stay well inside the budget.
        let parsed = parse(alias_bomb(2).as_bytes(), false).expect("a few aliases are fine");
        assert_eq!(parsed.clusters.len(), 1);
        // A reused anchor as kubectl users may write it by hand.
        let shared = GOOD.replace(
            "    certificate-authority-data: Zm9v\n",
            "    certificate-authority-data: &ca Zm9v\n    tls-server-name: *ca\n",
        );
        assert!(parse(shared.as_bytes(), false).is_ok());
    }

    #[test]
    fn refuses_exec_auth_providers_and_file_paths_unless_allowed() {
        let cases = [
            (
                "    token: abc\n",
                "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh\n",
                "exec plugin",
            ),
            (
                "    token: abc\n",
                "    auth-provider:\n      name: gcp\n      config: {}\n",
                "auth provider",
            ),
            (
                "    token: abc\n",
                "    tokenFile: /var/run/secrets/token\n",
                "tokenFile",
            ),
            (
                "    token: abc\n",
                "    client-certificate: /etc/cert.pem\n",
                "client-certificate",
            ),
            (
                "    token: abc\n",
                "    client-key: /etc/key.pem\n",
                "client-key",
            ),
            (
                "    certificate-authority-data: Zm9v\n",
                "    certificate-authority: /etc/ca.pem\n",
                "certificate-authority",
            ),
            (
                "    certificate-authority-data: Zm9v\n",
                "    insecure-skip-tls-verify: true\n",
                "insecure-skip-tls-verify",
            ),
            (
                "    server: https://10.0.0.1:6443\n",
                "    server: http://10.0.0.1:8080\n",
                "http://",
            ),
            (
                "    server: https://10.0.0.1:6443\n",
                "    server: HTTP://10.0.0.1:8080\n",
                "http://",
            ),
            (
                "    certificate-authority-data: Zm9v\n",
                "    certificate-authority-data: Zm9v\n    proxy-url: http://proxy:3128\n",
                "proxy-url",
            ),
        ];
        for (from, to, what) in cases {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "{what}: the case did not apply");
            let error = parse(text.as_bytes(), false).unwrap_err();
            assert!(
                matches!(&error, KubeconfigError::Insecure(m) if m.contains(what)),
                "{what}: {error}"
            );
            assert!(
                parse(text.as_bytes(), true).is_ok(),
                "{what} with the override"
            );
        }
    }

    #[test]
    fn malformed_input_is_refused_without_echoing_it() {
        for bad in [
            &b"\xff\xfe"[..],
            b"clusters: [",
            b"kind: Config\n",
            b"- just\n- a list\n",
        ] {
            let error = parse(bad, false).unwrap_err();
            assert!(matches!(error, KubeconfigError::Malformed(_)), "{error}");
        }
        let secretish = "users: [{name: u, user: {token: SUPERSECRET}}]\nclusters: [";
        let error = parse(secretish.as_bytes(), false).unwrap_err().to_string();
        assert!(!error.contains("SUPERSECRET"), "{error}");
    }
}

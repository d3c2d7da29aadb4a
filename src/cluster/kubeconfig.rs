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

/// Parses `bytes` and refuses what a remote Secret must not contain.
pub fn parse(bytes: &[u8], allow_insecure: bool) -> Result<Kubeconfig, KubeconfigError> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| KubeconfigError::Malformed("not UTF-8".into()))?;
    let config = Kubeconfig::from_yaml(text).map_err(|e| {
        // The YAML error may quote the document (tokens, keys): keep only its kind.
        let kind = e.to_string();
        let kind = kind.split(':').next().unwrap_or("invalid YAML").to_owned();
        KubeconfigError::Malformed(kind)
    })?;
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

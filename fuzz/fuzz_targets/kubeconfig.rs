//! Remote-cluster kubeconfigs (`cluster::kubeconfig::parse`).
//!
//! Input: the kubeconfig bytes, parsed both strictly and with `allow_insecure`.
//!
//! Checks what the module promises: strictly accepted means no exec plugin, no auth provider and
//! no file path (tokenFile, client-certificate, client-key, certificate-authority), no
//! insecure-skip-tls-verify, http:// server or proxy-url, and at least one cluster; the override
//! only lifts the Insecure refusals; and an error never echoes the document (no 32-byte run of
//! the input in its message, apart from the user or cluster name that an Insecure refusal names
//! on purpose).
#![no_main]

use fuzz_support::echoes;
use istio_csr_rs::cluster::kubeconfig::{KubeconfigError, parse};
use libfuzzer_sys::fuzz_target;

const WINDOW: usize = 32;

/// The fixed wording of the messages (ours and kube's): the fuzzer learns to copy it into the
/// input, so it is taken out before looking for echoed input.
const WORDING: &[&str] = &[
    "not a kubeconfig: ",
    "failed to parse kubeconfig YAML",
    "failed to merge kubeconfig documents",
    "no cluster in it",
    "refused: ",
    " (allowed only with --allow-insecure-kubeconfig)",
    "runs an exec plugin",
    "uses an auth provider",
    "reads tokenFile from a file",
    "reads client-certificate from a file",
    "reads client-key from a file",
    "reads certificate-authority from a file",
    "sets insecure-skip-tls-verify",
    "has an http:// server",
    "sets proxy-url",
];

fn echoes_input(message: &str, data: &[u8]) -> bool {
    let mut rest = message.to_owned();
    for phrase in WORDING {
        rest = rest.replace(phrase, "\0");
    }
    echoes(rest.as_bytes(), data, WINDOW)
}

fuzz_target!(|data: &[u8]| {
    let strict = parse(data, false);
    let lax = parse(data, true);
    fuzz_support::verbose!(
        "strict {:?} / lax {:?}",
        strict.as_ref().map(|_| ()),
        lax.as_ref().map(|_| ())
    );
    match (&strict, &lax) {
        (Ok(config), Ok(_)) => {
            assert!(!config.clusters.is_empty());
            for named in &config.auth_infos {
                if let Some(auth) = &named.auth_info {
                    assert!(auth.exec.is_none(), "exec plugin accepted");
                    assert!(auth.auth_provider.is_none(), "auth provider accepted");
                    assert!(auth.token_file.is_none(), "tokenFile accepted");
                    assert!(auth.client_certificate.is_none(), "client-certificate file");
                    assert!(auth.client_key.is_none(), "client-key file accepted");
                }
            }
            for named in &config.clusters {
                if let Some(cluster) = &named.cluster {
                    assert!(cluster.certificate_authority.is_none(), "CA file accepted");
                    assert_ne!(cluster.insecure_skip_tls_verify, Some(true));
                    assert!(cluster.proxy_url.is_none(), "proxy-url accepted");
                    let server = cluster.server.as_deref().unwrap_or_default();
                    assert!(
                        !server.trim().to_ascii_lowercase().starts_with("http://"),
                        "http:// server accepted"
                    );
                }
            }
        }
        (Err(KubeconfigError::Insecure(message)), Ok(config)) => {
            // The message names one user or cluster; nothing else of the input may appear.
            let names = config
                .auth_infos
                .iter()
                .map(|n| &n.name)
                .chain(config.clusters.iter().map(|n| &n.name));
            // The longest quoted name that appears: a short name ("c") may also appear
            // inside the quoted form of a longer one.
            let quoted = names
                .map(|n| format!("{n:?}"))
                .filter(|q| message.contains(q.as_str()))
                .max_by_key(String::len)
                .unwrap_or_else(|| panic!("{message:?} names no user or cluster"));
            let shown = strict.as_ref().unwrap_err().to_string();
            let rest = shown.replacen(&quoted, "\0", 1);
            assert!(!echoes_input(&rest, data), "echoes input: {shown:?}");
            assert!(shown.contains("--allow-insecure-kubeconfig"));
        }
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "the override changed a non-Insecure refusal");
            assert!(
                !matches!(a, KubeconfigError::Insecure(_)),
                "Insecure despite the override"
            );
            let shown = a.to_string();
            assert!(!echoes_input(&shown, data), "echoes input: {shown:?}");
        }
        (strict, lax) => panic!(
            "strict {:?} vs allow_insecure {:?}",
            strict.as_ref().map(|_| ()),
            lax.as_ref().map(|_| ())
        ),
    }
});

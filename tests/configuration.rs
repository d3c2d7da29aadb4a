//! Running outside standalone mode: own CA directory, pinned roots, and clear start-up errors
//! for configurations that cannot work.

mod support;

use std::path::{Path, PathBuf};

use istio_csr_rs::app::{self, Hooks};
use istio_csr_rs::client::Target;
use istio_csr_rs::config::{Cli, ServeArgs};
use istio_csr_rs::pki::pem;
use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
use support::*;

fn write_ca(dir: &Path, ca: &TestCa) {
    std::fs::create_dir_all(dir).unwrap();
    for name in ["ca-cert.pem", "cert-chain.pem", "root-cert.pem"] {
        std::fs::write(dir.join(name), ca.cert_pem()).unwrap();
    }
    std::fs::write(dir.join("ca-key.pem"), ca.key_pem()).unwrap();
}

/// Arguments of a local-ca server: `ca` in `tmp/ca`, `pinned_pem` as `tmp/roots.pem`, and the
/// token `t0ken` for default/default. Returns them with the pinned file's path.
fn pinned_local_ca(tmp: &Path, ca: &TestCa, pinned_pem: &str) -> (ServeArgs, PathBuf) {
    write_ca(&tmp.join("ca"), ca);
    let pinned = tmp.join("roots.pem");
    std::fs::write(&pinned, pinned_pem).unwrap();
    let tokens = tmp.join("tokens.csv");
    std::fs::write(&tokens, "t0ken,default,default\n").unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let args = try_serve_args(&[
        "--signer",
        "local-ca",
        "--local-ca-dir",
        &path(&tmp.join("ca")),
        "--root-ca-file",
        &path(&pinned),
        "--token-auth-file",
        &path(&tokens),
    ])
    .unwrap();
    (args, pinned)
}

async fn start_error(extra: &[&str]) -> String {
    install_crypto_provider();
    match app::start(try_serve_args(extra).unwrap(), Hooks::default()).await {
        Ok(_) => panic!("{extra:?} started"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn answers_every_pinned_root_for_a_rotation() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let current = TestCa::root("current", KeyAlg::EcdsaP256);
    let next = TestCa::root("next", KeyAlg::EcdsaP384);
    let (args, pinned) = pinned_local_ca(
        tmp.path(),
        &current,
        &format!("{}{}", current.cert_pem(), next.cert_pem()),
    );
    let running = app::start(args, Hooks::default()).await.unwrap();
    let target = Target {
        timeout: std::time::Duration::from_secs(10),
        source_address: None,
        ..localhost_target(running.grpc_address, pinned.clone())
    };
    let (csr, _) = p256_csr(DEFAULT_ID);
    let mut client = target.connect().await.unwrap();
    let chain = client
        .create_certificate(pilot_agent_request(&target, Some("t0ken"), csr, 3600))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    let roots = pem::parse_certificates(chain.last().unwrap().as_bytes()).unwrap();
    assert_eq!(roots, vec![current.cert.clone(), next.cert.clone()]);
}

#[tokio::test]
async fn stops_signing_when_the_pinned_roots_no_longer_cover_the_ca_and_recovers() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::root("ca", KeyAlg::EcdsaP256);
    let (args, pinned) = pinned_local_ca(tmp.path(), &ca, &ca.cert_pem());
    // The client trusts both bundles: this test is about what the CA answers, not about TLS.
    let foreign = TestCa::root("foreign", KeyAlg::EcdsaP256);
    let client_roots = tmp.path().join("client-roots.pem");
    std::fs::write(
        &client_roots,
        format!("{}{}", ca.cert_pem(), foreign.cert_pem()),
    )
    .unwrap();
    let running = app::start(args, Hooks::default()).await.unwrap();
    let target = Target {
        timeout: std::time::Duration::from_secs(10),
        source_address: None,
        ..localhost_target(running.grpc_address, client_roots)
    };
    let call = || request_certificate(&target, Some("t0ken"), DEFAULT_ID);
    let readyz = || async {
        http_get(&format!("http://{}/readyz", running.admin_address))
            .await
            .0
    };
    assert!(call().await.is_ok());

    // An operator pins a root the CA does not chain to: no chain may go out that the pinned
    // bundle cannot verify.
    std::fs::write(&pinned, foreign.cert_pem()).unwrap();
    let refused = eventually(std::time::Duration::from_secs(10), || async {
        matches!(call().await, Err(s) if s.code() == tonic::Code::Unavailable)
    })
    .await;
    assert!(refused, "kept signing with roots that do not cover the CA");
    assert_eq!(readyz().await, 503);

    // Adding the CA's root back (a two-root bundle) makes it usable again.
    std::fs::write(&pinned, format!("{}{}", foreign.cert_pem(), ca.cert_pem())).unwrap();
    let recovered = eventually(std::time::Duration::from_secs(10), || async {
        call().await.is_ok()
    })
    .await;
    assert!(
        recovered,
        "did not recover after the roots covered the CA again"
    );
    let chain = call().await.unwrap();
    let roots = pem::parse_certificates(chain.last().unwrap().as_bytes()).unwrap();
    assert_eq!(roots, vec![foreign.cert.clone(), ca.cert.clone()]);
    assert_eq!(readyz().await, 200);
}

#[tokio::test]
async fn refuses_to_start_with_a_ca_outside_the_pinned_roots() {
    let tmp = tempfile::tempdir().unwrap();
    write_ca(
        &tmp.path().join("ca"),
        &TestCa::root("ca", KeyAlg::EcdsaP256),
    );
    let pinned = tmp.path().join("roots.pem");
    std::fs::write(&pinned, TestCa::root("other", KeyAlg::EcdsaP256).cert_pem()).unwrap();
    let tokens = tmp.path().join("tokens.csv");
    std::fs::write(&tokens, "t,default,default\n").unwrap();
    let error = start_error(&[
        "--signer",
        "local-ca",
        "--local-ca-dir",
        tmp.path().join("ca").to_str().unwrap(),
        "--root-ca-file",
        pinned.to_str().unwrap(),
        "--token-auth-file",
        tokens.to_str().unwrap(),
    ])
    .await;
    assert!(
        error.contains("does not chain to the trusted roots"),
        "{error}"
    );
}

#[tokio::test]
async fn explains_configurations_that_cannot_work() {
    let cases: [(&[&str], &str); 7] = [
        (
            &[
                "--standalone",
                "--signers-file",
                "/nonexistent/signers.yaml",
            ],
            "the built-in CA is one CA",
        ),
        (
            &["--standalone", "--max-client-certificate-duration", "9000y"],
            "between 1m and 3650d",
        ),
        (
            &["--standalone", "--serving-certificate-duration", "0s"],
            "between 1m and 3650d",
        ),
        (&["--kubeconfig", "/nonexistent/kubeconfig"], "--kubeconfig"),
        (&["--signer", "kube-csr"], "--kube-csr-signer-name"),
        (
            &["--signer", "local-ca", "--token-auth-file", "t"],
            "needs --local-ca-dir",
        ),
        (
            &["--standalone", "--trust-domain", "Not Valid"],
            "--trust-domain",
        ),
    ];
    for (extra, want) in cases {
        let error = start_error(extra).await;
        assert!(error.contains(want), "{extra:?}: {error}");
    }
}

#[tokio::test]
async fn standalone_with_its_own_ca_directory_trusts_that_ca_only() {
    let tmp = tempfile::tempdir().unwrap();
    let own = TestCa::root("own", KeyAlg::EcdsaP256);
    let own_dir = tmp.path().join("own-ca");
    write_ca(&own_dir, &own);
    let own_dir = own_dir.to_str().unwrap().to_owned();
    let server = Server::start(&["--local-ca-dir", &own_dir]).await;
    assert!(
        !server.data_dir.join("ca").exists(),
        "an unused CA was created"
    );
    let bundle = std::fs::read(server.data_dir.join("root-cert.pem")).unwrap();
    assert_eq!(
        pem::parse_certificates(&bundle).unwrap(),
        vec![own.cert.clone()]
    );
    // The target trusts data/root-cert.pem, as the printed command does.
    server.request_default().await.unwrap();
}

#[test]
fn refuses_malformed_flag_values_before_starting() {
    for extra in [
        &["--max-client-certificate-duration", "soon"][..],
        &["--serving-address", "not-an-address"][..],
        &["--signer", "vault"][..],
        &["--log-format", "xml"][..],
    ] {
        assert!(try_serve_args(extra).is_err(), "{extra:?} accepted");
    }
}

#[tokio::test]
async fn refuses_untrusted_node_account_syntax() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().to_str().unwrap();
    let error = start_error(&[
        "--standalone",
        "--data-dir",
        data,
        "--ca-trusted-node-accounts",
        "istio-system",
    ])
    .await;
    assert!(error.contains("namespace/serviceaccount"), "{error}");
}

#[tokio::test]
async fn a_serving_certificate_renewal_keeps_open_connections_and_calls() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::root("ca", KeyAlg::EcdsaP256);
    let (args, pinned) = pinned_local_ca(tmp.path(), &ca, &ca.cert_pem());
    let (hooks, gate) = GatedIssuer::hooks();
    let running = app::start(args, hooks).await.unwrap();
    let gate = gate.get().unwrap().clone();
    let target = localhost_target(running.grpc_address, pinned.clone());
    let before = presented_certificate(running.grpc_address, &pinned).await;

    // A call held in flight on an open connection...
    let (csr, _) = p256_csr(DEFAULT_ID);
    let mut client = target.connect().await.unwrap();
    let request = pilot_agent_request(&target, Some("t0ken"), csr, 3600);
    let in_flight = tokio::spawn(async move { client.create_certificate(request).await });
    gate.wait_entered(1).await;

    // ...while the roots change (a second root added), which renews the serving certificate.
    let next = TestCa::root("next", KeyAlg::EcdsaP256);
    std::fs::write(&pinned, format!("{}{}", ca.cert_pem(), next.cert_pem())).unwrap();
    let renewed = eventually(std::time::Duration::from_secs(10), || async {
        presented_certificate(running.grpc_address, &pinned).await != before
    })
    .await;
    assert!(renewed, "the serving certificate was not renewed");

    gate.release.add_permits(1);
    let answer = in_flight
        .await
        .unwrap()
        .expect("the open connection's call must complete");
    let roots =
        pem::parse_certificates(answer.into_inner().cert_chain.last().unwrap().as_bytes()).unwrap();
    assert_eq!(roots, vec![ca.cert.clone(), next.cert.clone()]);
}

#[tokio::test]
async fn refuses_a_negative_or_absurd_api_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data = data.to_str().unwrap();
    for qps in ["-1", "NaN", "inf", "1e-310"] {
        let flag = format!("--kube-api-qps={qps}");
        let error = start_error(&["--standalone", "--data-dir", data, &flag]).await;
        assert!(error.contains("--kube-api-qps"), "{qps}: {error}");
    }
}

/// The Helm chart passes flags by name; a renamed or removed flag would only fail in a cluster.
/// This reads the template itself, every branch of it (tests/chart.rs renders the chart with
/// Helm and runs the binary with the result, for the value sets it covers).
#[test]
fn every_flag_the_helm_chart_passes_exists() {
    use clap::CommandFactory;
    let cli = Cli::command();
    let serve = cli.find_subcommand("serve").unwrap();
    let known: Vec<&str> = serve.get_arguments().filter_map(|a| a.get_long()).collect();
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/istio-csr-rs/templates/deployment.yaml"
    ))
    .unwrap();
    let mut passed = 0;
    for line in template.lines() {
        // `- --flag=...`, or `- {{ printf "--flag=%s" ... | quote }}` for free-text values.
        let item = line.trim();
        let Some(flag) = item
            .strip_prefix("- --")
            .or_else(|| item.strip_prefix("- {{ printf \"--"))
        else {
            continue;
        };
        let name = flag.split(['=', ' ', '"']).next().unwrap();
        assert!(
            known.contains(&name),
            "the chart passes --{name}, which serve does not know"
        );
        passed += 1;
    }
    assert!(
        passed > 20,
        "only {passed} flags found: is the template still there?"
    );
}

//! Tier 3: tenant signers (`--signers-file`, `--mesh-config`) on a real kube-apiserver, with
//! the CSR-API stand-in and with the cert-manager stand-in, one CA per tenant. Each tenant's
//! answer must end with exactly its own roots, and workloads of different tenants must not
//! be able to make mTLS with each other.

mod support;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use istio_csr_rs::app::{self, Hooks, Running};
use istio_csr_rs::client::Target;
use istio_csr_rs::pki::pem;
use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
use support::kube::shared;
use support::mtls::{Workload, handshake};
use support::*;
use tonic::Code;

/// The CAs of this test binary: the CSR-API stand-in answers cluster-wide, so one stand-in per
/// process serves every test here.
struct Cas {
    mesh: Arc<TestCa>,
    foo: Arc<TestCa>,
    bar: Arc<TestCa>,
    /// foo's next root, for the rotation.
    foo_next: TestCa,
}

fn cas() -> &'static Cas {
    static CAS: OnceLock<Cas> = OnceLock::new();
    CAS.get_or_init(|| Cas {
        mesh: Arc::new(TestCa::root("tenants: mesh CA", KeyAlg::EcdsaP256)),
        foo: Arc::new(TestCa::root("tenants: foo CA", KeyAlg::EcdsaP256)),
        bar: Arc::new(TestCa::root("tenants: bar CA", KeyAlg::EcdsaP256)),
        foo_next: TestCa::root("tenants: foo next CA", KeyAlg::EcdsaP256),
    })
}

/// The root bundle PEM of `cas`, as the answer's last element carries it.
fn bundle(cas: &[&TestCa]) -> Vec<Vec<u8>> {
    cas.iter().map(|ca| ca.cert.to_vec()).collect()
}

fn last_element(answer: &[String]) -> Vec<Vec<u8>> {
    let last = answer.last().expect("an empty answer");
    pem::parse_certificates(last.as_bytes())
        .unwrap()
        .iter()
        .map(|c| c.to_vec())
        .collect()
}

struct Tenancy {
    running: Running,
    dir: tempfile::TempDir,
    /// The namespaces of this test: foo's, bar's, and one with no entry.
    foo_ns: String,
    bar_ns: String,
    plain_ns: String,
    /// `certificatesigningrequests` or `certificaterequests`.
    resource: &'static str,
    _stand_ins: Vec<tokio_util::task::AbortOnDropHandle<()>>,
}

impl Tenancy {
    fn target(&self) -> Target {
        localhost_target(self.running.grpc_address, self.dir.path().join("mesh.pem"))
    }

    /// CreateCertificate for `namespace/web` with `cert_signer`: the answer and the key.
    async fn request(
        &self,
        namespace: &str,
        cert_signer: Option<&str>,
    ) -> Result<Workload, tonic::Status> {
        let (answer, key) = request_as_web(&self.target(), namespace, cert_signer).await?;
        Ok(Workload { answer, key })
    }

    /// Requests of `self.resource` this server created so far.
    async fn created(&self) -> f64 {
        let admin = self.running.admin_address;
        let (_, body) = http_get(&format!("http://{admin}/metrics")).await;
        openmetrics::parse(&body).value(
            "istio_csr_kube_api_requests_total",
            &[
                ("code", "201"),
                ("resource", self.resource),
                ("verb", "create"),
            ],
        )
    }

    async fn requests_counted(&self, code: &str, signer: &str) -> f64 {
        let admin = self.running.admin_address;
        let (_, body) = http_get(&format!("http://{admin}/metrics")).await;
        let backend = match self.resource {
            "certificatesigningrequests" => "kube-csr",
            _ => "cert-manager",
        };
        openmetrics::parse(&body).value(
            "istio_csr_certificate_requests_total",
            &[("backend", backend), ("code", code), ("signer", signer)],
        )
    }
}

async fn namespaces(prefix: &str) -> (String, String, String) {
    let cluster = shared().await;
    let names = (
        format!("{prefix}-foo"),
        format!("{prefix}-bar"),
        format!("{prefix}-plain"),
    );
    for ns in [&names.0, &names.1, &names.2] {
        cluster.namespace(ns).await;
        cluster.service_account(ns, "web").await;
    }
    names
}

fn write_roots(dir: &Path) {
    let cas = cas();
    std::fs::write(dir.join("mesh.pem"), cas.mesh.cert_pem()).unwrap();
    std::fs::write(dir.join("foo.pem"), cas.foo.cert_pem()).unwrap();
    std::fs::write(dir.join("bar.pem"), cas.bar.cert_pem()).unwrap();
}

/// The flags of `serve --signer kube-csr` with mesh signer `tenants.example.com/mesh`, the mesh root
/// `dir/mesh.pem`, the signers file `dir/signers.yaml` and `kubeconfig`, then `extra`.
fn csr_api_args(
    dir: &Path,
    kubeconfig: &Path,
    leader_namespace: &str,
    extra: &[&str],
) -> Vec<String> {
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let mut argv: Vec<String> = [
        "--signer",
        "kube-csr",
        "--kube-csr-signer-name",
        "tenants.example.com/mesh",
        "--cert-signer-domain",
        "tenants.example.com",
        "--root-ca-file",
        &path("mesh.pem"),
        "--signers-file",
        &path("signers.yaml"),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--leader-election-namespace",
        leader_namespace,
    ]
    .map(str::to_owned)
    .to_vec();
    argv.extend(extra.iter().map(|a| (*a).to_owned()));
    argv
}

async fn start(flags: Vec<String>) -> Running {
    app::start(serve_args(&flags), Hooks::default())
        .await
        .unwrap()
}

/// `--signer kube-csr`: mesh signer `tenants.example.com/mesh`, tenants `.../foo` and
/// `.../bar`, each signed by its own CA.
async fn csr_api_tenancy(prefix: &str) -> Tenancy {
    install_crypto_provider();
    let cluster = shared().await;
    let (foo_ns, bar_ns, plain_ns) = namespaces(prefix).await;
    let cas = cas();
    let stand_in = support::csr_signer::start_tenant_csr_signers(
        cluster.client().await,
        vec![
            ("tenants.example.com/mesh".into(), cas.mesh.clone()),
            ("tenants.example.com/foo".into(), cas.foo.clone()),
            ("tenants.example.com/bar".into(), cas.bar.clone()),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    write_roots(dir.path());
    let signers = format!(
        "signers:
  - name: foo
    rootsFile: {foo}
    namespaces: [{foo_ns}]
    default: true
  - name: bar
    kubeCSRSignerName: tenants.example.com/bar
    rootsFile: {bar}
    namespaces: [{bar_ns}]
",
        foo = dir.path().join("foo.pem").display(),
        bar = dir.path().join("bar.pem").display(),
    );
    std::fs::write(dir.path().join("signers.yaml"), signers).unwrap();
    let argv = csr_api_args(dir.path(), &cluster.kubeconfig, &plain_ns, &[]);
    let running = start(argv).await;
    Tenancy {
        running,
        dir,
        foo_ns,
        bar_ns,
        plain_ns,
        resource: "certificatesigningrequests",
        _stand_ins: vec![stand_in],
    }
}

/// `--signer cert-manager`: mesh issuer `ca-issuer` (the fixture's CA), tenant issuers
/// `tenant-foo` and `tenant-bar` in the certificate namespace.
async fn cert_manager_tenancy(prefix: &str) -> Tenancy {
    install_crypto_provider();
    let cluster = shared().await;
    let (foo_ns, bar_ns, plain_ns) = namespaces(prefix).await;
    let issuers_ns = format!("{prefix}-issuers");
    let (mesh_root, fixture) = support::cert_manager::fixture_in(&issuers_ns).await;
    let cas = cas();
    let tenants = support::cert_manager::start_tenant_issuers(
        cluster.client().await,
        &issuers_ns,
        vec![
            ("tenant-foo".into(), cas.foo.clone()),
            ("tenant-bar".into(), cas.bar.clone()),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    write_roots(dir.path());
    // The fixture's mesh CA is its own, not cas().mesh.
    std::fs::write(dir.path().join("mesh.pem"), mesh_root.cert_pem()).unwrap();
    let signers = format!(
        "signers:
  - name: foo
    issuerRef: {{name: tenant-foo, kind: Issuer, group: cert-manager.io}}
    rootsFile: {foo}
    namespaces: [{foo_ns}]
    default: true
  - name: bar
    issuerRef: {{name: tenant-bar}}
    rootsPEM: |
{bar_pem}
    namespaces: [{bar_ns}]
",
        foo = dir.path().join("foo.pem").display(),
        bar_pem = cas
            .bar
            .cert_pem()
            .lines()
            .map(|l| format!("      {l}"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    std::fs::write(dir.path().join("signers.yaml"), signers).unwrap();
    let signers = dir.path().join("signers.yaml");
    let pinned = dir.path().join("mesh.pem");
    let launched = support::cert_manager::launch_replica(
        &issuers_ns,
        Some(&pinned),
        &[
            "--signers-file",
            signers.to_str().unwrap(),
            "--leader-election-namespace",
            &plain_ns,
        ],
        Hooks::default(),
    )
    .await;
    let running = launched.serving().await.unwrap().unwrap();
    Tenancy {
        running,
        dir,
        foo_ns,
        bar_ns,
        plain_ns,
        resource: "certificaterequests",
        _stand_ins: vec![fixture, tenants],
    }
}

/// What both backends must show.
async fn tenants_are_isolated(tenancy: &Tenancy, mesh_root: &[Vec<u8>]) {
    let cas = cas();
    let (foo_ns, bar_ns, plain_ns) = (&tenancy.foo_ns, &tenancy.bar_ns, &tenancy.plain_ns);

    // foo's namespace gets foo without asking (its default), and when asking.
    let foo_a = tenancy.request(foo_ns, None).await.unwrap();
    let foo_b = tenancy.request(foo_ns, Some("foo")).await.unwrap();
    for workload in [&foo_a, &foo_b] {
        assert_eq!(last_element(&workload.answer), bundle(&[&cas.foo]));
        assert_eq!(workload.answer.len(), 2, "leaf, then foo's roots");
    }
    // bar's namespace has no default: without CertSigner, the mesh's issuer and roots.
    let bar_workload = tenancy.request(bar_ns, Some("bar")).await.unwrap();
    assert_eq!(last_element(&bar_workload.answer), bundle(&[&cas.bar]));
    let bar_mesh = tenancy.request(bar_ns, None).await.unwrap();
    assert_eq!(last_element(&bar_mesh.answer), mesh_root);
    // A namespace without any entry: the mesh's issuer and roots.
    let plain = tenancy.request(plain_ns, None).await.unwrap();
    assert_eq!(last_element(&plain.answer), mesh_root);

    // Isolation, by TLS itself: each side trusts only the last element of its own answer.
    handshake(&foo_a, &foo_b)
        .await
        .expect("two workloads of foo make mTLS");
    handshake(&bar_workload, &bar_workload)
        .await
        .expect("bar with itself");
    for (client, server, what) in [
        (&foo_a, &bar_workload, "foo -> bar"),
        (&bar_workload, &foo_a, "bar -> foo"),
        (&foo_a, &plain, "foo -> mesh"),
        (&plain, &foo_a, "mesh -> foo"),
    ] {
        assert!(
            handshake(client, server).await.is_err(),
            "{what}: tenants trust each other"
        );
    }

    // Refusals are decided before any request reaches the API server.
    let created = tenancy.created().await;
    assert!(created >= 5.0, "the answers above made {created} requests");
    let denied = tenancy.request(foo_ns, Some("bar")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let unknown = tenancy.request(foo_ns, Some("nobody")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert_eq!(
        tenancy.created().await,
        created,
        "a refusal reached the API"
    );
    // Metrics name the table's signers; unknown ones count as "default".
    assert_eq!(tenancy.requests_counted("OK", "foo").await, 2.0);
    assert_eq!(tenancy.requests_counted("OK", "bar").await, 1.0);
    assert_eq!(
        tenancy.requests_counted("PERMISSION_DENIED", "bar").await,
        1.0
    );
    assert_eq!(
        tenancy
            .requests_counted("INVALID_ARGUMENT", "default")
            .await,
        1.0
    );

    // Rotating foo's roots file changes foo's answers within seconds, and nobody else's.
    let foo_file = tenancy.dir.path().join("foo.pem");
    if foo_file.exists() {
        std::fs::write(
            &foo_file,
            format!("{}{}", cas.foo.cert_pem(), cas.foo_next.cert_pem()),
        )
        .unwrap();
        let rotated = eventually(Duration::from_secs(10), || async {
            let answer = tenancy.request(foo_ns, None).await.unwrap();
            last_element(&answer.answer) == bundle(&[&cas.foo, &cas.foo_next])
        })
        .await;
        assert!(rotated, "foo's new roots did not reach its answers");
        let bar_workload = tenancy.request(bar_ns, Some("bar")).await.unwrap();
        assert_eq!(last_element(&bar_workload.answer), bundle(&[&cas.bar]));
        let plain = tenancy.request(plain_ns, None).await.unwrap();
        assert_eq!(last_element(&plain.answer), mesh_root);
        std::fs::write(&foo_file, cas.foo.cert_pem()).unwrap();
    }
}

#[tokio::test]
async fn csr_api_tenants_are_signed_by_their_own_ca_and_isolated() {
    let tenancy = csr_api_tenancy("tn-csr").await;
    tenants_are_isolated(&tenancy, &bundle(&[&cas().mesh])).await;
}

#[tokio::test]
async fn cert_manager_tenants_are_signed_by_their_own_issuer_and_isolated() {
    let tenancy = cert_manager_tenancy("tn-cm").await;
    let mesh = std::fs::read(tenancy.dir.path().join("mesh.pem")).unwrap();
    let mesh: Vec<Vec<u8>> = pem::parse_certificates(&mesh)
        .unwrap()
        .iter()
        .map(|c| c.to_vec())
        .collect();
    tenants_are_isolated(&tenancy, &mesh).await;
}

/// Istio's document sets tenants up with the mesh config alone: `caCertificates` entries
/// with `certSigners: [DOMAIN/X]`. Those signers are open to every namespace (as in Istio);
/// a `--signers-file` entry without roots takes its roots from there and limits who asks.
#[tokio::test]
async fn mesh_config_ca_certificates_give_each_signer_its_roots() {
    install_crypto_provider();
    let cluster = shared().await;
    let (foo_ns, bar_ns, plain_ns) = namespaces("tn-mesh").await;
    let cas = cas();
    let stand_in = support::csr_signer::start_tenant_csr_signers(
        cluster.client().await,
        vec![
            ("tenants.example.com/mesh".into(), cas.mesh.clone()),
            ("tenants.example.com/foo".into(), cas.foo.clone()),
            ("tenants.example.com/bar".into(), cas.bar.clone()),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    write_roots(dir.path());
    let indented = |ca: &TestCa| ca.cert_pem().replace('\n', "\n      ");
    // As in the istio ConfigMap's `mesh` key; the rest of it is ignored.
    let mesh = format!(
        "trustDomain: cluster.local
defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
caCertificates:
  - pem: |
      {foo}
    certSigners:
      - tenants.example.com/foo
  - pem: |
      {bar}
    certSigners:
      - tenants.example.com/bar
",
        foo = indented(&cas.foo),
        bar = indented(&cas.bar),
    );
    std::fs::write(dir.path().join("mesh.yaml"), mesh).unwrap();
    // foo is limited to its namespace; bar comes from the mesh config alone.
    std::fs::write(
        dir.path().join("signers.yaml"),
        format!("signers: [{{name: foo, namespaces: [{foo_ns}]}}]\n"),
    )
    .unwrap();
    let mesh = dir.path().join("mesh.yaml");
    let argv = csr_api_args(
        dir.path(),
        &cluster.kubeconfig,
        &plain_ns,
        &["--mesh-config", mesh.to_str().unwrap()],
    );
    let tenancy = Tenancy {
        running: start(argv).await,
        dir,
        foo_ns,
        bar_ns,
        plain_ns,
        resource: "certificatesigningrequests",
        _stand_ins: vec![stand_in],
    };
    let foo_workload = tenancy.request(&tenancy.foo_ns, Some("foo")).await.unwrap();
    assert_eq!(last_element(&foo_workload.answer), bundle(&[&cas.foo]));
    for ns in [&tenancy.bar_ns, &tenancy.plain_ns, &tenancy.foo_ns] {
        let bar_workload = tenancy.request(ns, Some("bar")).await.unwrap();
        assert_eq!(
            last_element(&bar_workload.answer),
            bundle(&[&cas.bar]),
            "{ns}"
        );
    }
    let denied = tenancy
        .request(&tenancy.bar_ns, Some("foo"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // No default anywhere: without CertSigner, the mesh's roots.
    let plain = tenancy.request(&tenancy.foo_ns, None).await.unwrap();
    assert_eq!(last_element(&plain.answer), bundle(&[&cas.mesh]));

    // /debug/bundle lists each signer with its backend, roots, namespaces.
    let (status, body) = http_get(&format!(
        "http://{}/debug/bundle",
        tenancy.running.admin_address
    ))
    .await;
    assert_eq!(status, 200);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let signers = &report["signers"];
    assert_eq!(signers["last_reload_error"], serde_json::Value::Null);
    let listed: Vec<(&str, &str, &str)> = signers["signers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap(),
                s["signer_name"].as_str().unwrap(),
                s["roots_source"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            (
                "foo",
                "tenants.example.com/foo",
                "mesh-config:tenants.example.com/foo"
            ),
            (
                "bar",
                "tenants.example.com/bar",
                "mesh-config:tenants.example.com/bar"
            ),
        ]
    );
    let foo_report = &signers["signers"][0];
    assert_eq!(foo_report["backend"], "kube-csr");
    assert_eq!(
        foo_report["namespaces"],
        serde_json::json!([tenancy.foo_ns])
    );
    assert_eq!(
        signers["signers"][1]["namespaces"],
        serde_json::json!(["*"])
    );
    let fingerprint = foo_report["roots"][0]["sha256"].as_str().unwrap();
    let expected = ring::digest::digest(&ring::digest::SHA256, &cas.foo.cert);
    assert_eq!(fingerprint, hex::encode(expected.as_ref()));

    // A broken mesh config keeps the table, and says so.
    std::fs::write(tenancy.dir.path().join("mesh.yaml"), "caCertificates: {").unwrap();
    let reported = eventually(Duration::from_secs(10), || async {
        let (_, body) = http_get(&format!(
            "http://{}/debug/bundle",
            tenancy.running.admin_address
        ))
        .await;
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        report["signers"]["last_reload_error"].is_string()
    })
    .await;
    assert!(reported, "the broken mesh config was not reported");
    let bar_workload = tenancy
        .request(&tenancy.plain_ns, Some("bar"))
        .await
        .unwrap();
    assert_eq!(last_element(&bar_workload.answer), bundle(&[&cas.bar]));
    let (_, body) = http_get(&format!("http://{}/metrics", tenancy.running.admin_address)).await;
    assert_eq!(
        openmetrics::parse(&body).value("istio_csr_signers_reload_failures_total", &[]),
        1.0
    );
}

/// A table that cannot be right stops the start, with the reason.
#[tokio::test]
async fn a_broken_signers_file_stops_the_start() {
    install_crypto_provider();
    let cluster = shared().await;
    cluster.namespace("tn-broken").await;
    let dir = tempfile::tempdir().unwrap();
    write_roots(dir.path());
    for (signers, expected) in [
        (
            "signers:\n  - {name: foo, rootsPEM: x, namespaces: [shared], default: true}\n  - {name: bar, rootsPEM: x, namespaces: [shared], default: true}\n",
            "namespace \"shared\" has more than one default signer",
        ),
        (
            "signers: [{name: foo, namespaces: [a]}]",
            "no rootsFile, no rootsPEM and no mesh-config",
        ),
        (
            "signers: [{name: foo, rootsPEM: junk, namespaces: [a]}]",
            "signer \"foo\": roots",
        ),
    ] {
        std::fs::write(dir.path().join("signers.yaml"), signers).unwrap();
        let flags = csr_api_args(dir.path(), &cluster.kubeconfig, "tn-broken", &[]);
        let error = match app::start(serve_args(&flags), Hooks::default()).await {
            Ok(_) => panic!("started with {signers}"),
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains(expected), "{expected}: {error}");
    }
}

//! Tier 3: istiod's serving certificate (Secret `istiod-tls`) on a real kube-apiserver, signed
//! by the cert-manager fixture: its contents, renewal, reissue on every change, that only
//! the leader writes it, and what a leader without the right to create it does.

mod support;

use std::time::Duration;

use ::kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use ::kube::runtime::wait::await_condition;
use istio_csr_rs::istiod::spec::{ISSUER_ANNOTATION, SECRET_NAME};
use istio_csr_rs::pki::chain::{self, RootBundle};
use istio_csr_rs::pki::pem;
use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use rustls_pki_types::{CertificateDer, UnixTime};
use support::cert_manager::{cert_manager_server_with, launch_replica};
use support::kube::{SA_ISSUER, shared};
use support::openmetrics;
use support::*;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

/// Writes happen within a second or two here; this bound only turns a hang into a failure.
const WITHIN: Duration = Duration::from_secs(60);

/// A server whose leader writes istiod-tls into `ns` (also its Lease's namespace).
async fn server(
    ns: &str,
    extra: &[&str],
) -> (
    istio_csr_rs::app::Running,
    tempfile::TempDir,
    std::sync::Arc<TestCa>,
    tokio_util::task::AbortOnDropHandle<()>,
) {
    let mut args = vec![
        "--istiod-cert-enabled",
        "--istiod-cert-namespace",
        ns,
        "--leader-election-namespace",
        ns,
        "--multicluster-secret-namespace",
        ns,
    ];
    args.extend_from_slice(extra);
    cert_manager_server_with(ns, true, &args).await
}

async fn secrets(ns: &str) -> Api<Secret> {
    Api::namespaced(shared().await.client().await, ns)
}

/// Waits (on a watch) until istiod-tls exists and `accept` holds for it.
async fn secret_where(ns: &str, accept: impl Fn(&Secret) -> bool) -> Secret {
    let api = secrets(ns).await;
    let found = tokio::time::timeout(
        WITHIN,
        await_condition(api, SECRET_NAME, |s: Option<&Secret>| {
            s.is_some_and(&accept)
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("istiod-tls in {ns} never reached the expected state"))
    .unwrap();
    found.unwrap()
}

fn data<'a>(secret: &'a Secret, key: &str) -> &'a [u8] {
    &secret.data.as_ref().unwrap()[key].0
}

fn chain_of(secret: &Secret) -> Vec<CertificateDer<'static>> {
    pem::parse_certificates(data(secret, "tls.crt")).unwrap()
}

fn serial_of(secret: &Secret) -> Vec<u8> {
    let chain = chain_of(secret);
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    leaf.raw_serial().to_vec()
}

async fn issued(running: &istio_csr_rs::app::Running, reason: &str) -> f64 {
    let (_, body) = http_get(&format!("http://{}/metrics", running.admin_address)).await;
    openmetrics::parse(&body).value(
        "istio_csr_istiod_certificate_issued_total",
        &[("reason", reason)],
    )
}

/// The counter, once it reaches `at_least` (counted just after the write the test saw
/// returns, so it may trail the watch event by a moment); then its exact value.
async fn issued_once_at_least(
    running: &istio_csr_rs::app::Running,
    reason: &str,
    at_least: f64,
) -> f64 {
    eventually(WITHIN, || async {
        issued(running, reason).await >= at_least
    })
    .await;
    issued(running, reason).await
}

async fn issued_total(running: &istio_csr_rs::app::Running) -> f64 {
    let (_, body) = http_get(&format!("http://{}/metrics", running.admin_address)).await;
    openmetrics::parse(&body)
        .samples
        .iter()
        .filter(|s| s.name == "istio_csr_istiod_certificate_issued_total")
        .map(|s| s.value)
        .sum()
}

#[tokio::test]
async fn istiod_tls_carries_istio_csr_names_its_key_and_a_chain_to_the_pinned_root() {
    let ns = "istiod-contents";
    let (running, _dir, root, _fixture) = server(
        ns,
        &[
            "--istiod-cert-istio-revisions",
            "default,canary",
            "--istiod-cert-additional-dns-names",
            "istiod.example.com",
        ],
    )
    .await;
    let secret = secret_where(ns, |_| true).await;
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));

    let chain = chain_of(&secret);
    let roots = RootBundle::from_certs(vec![root.cert.clone()]).unwrap();
    chain::verify_path(&chain[0], &chain[1..], &roots, UnixTime::now())
        .expect("tls.crt chains to the pinned root");
    assert_eq!(data(&secret, "ca.crt"), roots.pem().as_bytes());

    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let cn: Vec<_> = leaf
        .subject()
        .iter_common_name()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(cn, [format!("istiod.{ns}.svc")]);
    let (mut dns, mut uris) = (Vec::new(), Vec::new());
    for ext in leaf.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                    GeneralName::URI(u) => uris.push((*u).to_owned()),
                    other => panic!("unexpected SAN {other:?}"),
                }
            }
        }
    }
    dns.sort();
    let mut want = vec![
        format!("istiod.{ns}.svc"),
        format!("istiod-canary.{ns}.svc"),
        "istiod.example.com".to_owned(),
    ];
    want.sort();
    assert_eq!(dns, want);
    assert_eq!(
        uris,
        [format!(
            "spiffe://cluster.local/ns/{ns}/sa/istiod-service-account"
        )]
    );

    // The key beside it is the leaf's, RSA 2048 by default (istio-csr's).
    let key = istio_csr_rs::pki::keys::load_private_key_pem(data(&secret, "tls.key")).unwrap();
    assert_eq!(
        key.public_key_raw(),
        leaf.public_key().subject_public_key.data.as_ref()
    );
    let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = leaf.public_key().parsed() else {
        panic!("not an RSA key");
    };
    assert_eq!(rsa.key_size(), 2048);
    assert_eq!(issued_once_at_least(&running, "missing", 1.0).await, 1.0);
}

#[tokio::test]
async fn istiod_tls_is_renewed_renew_before_its_expiry() {
    let ns = "istiod-renewal";
    // A 70 s certificate renewed 60 s before expiry: renewed about 10 s after issuance.
    let (running, _dir, _root, _fixture) = server(
        ns,
        &[
            "--istiod-cert-duration",
            "70s",
            "--istiod-cert-renew-before",
            "60s",
            "--istiod-cert-key-algorithm",
            "ECDSA",
        ],
    )
    .await;
    let first = secret_where(ns, |_| true).await;
    let first_serial = serial_of(&first);
    let first_chain = chain_of(&first);
    let (_, leaf) = X509Certificate::from_der(&first_chain[0]).unwrap();
    let first_not_after = leaf.validity().not_after.timestamp();
    let renewed = secret_where(ns, |s| serial_of(s) != first_serial).await;
    let renewed_chain = chain_of(&renewed);
    let (_, leaf) = X509Certificate::from_der(&renewed_chain[0]).unwrap();
    let renewed_not_before = leaf.validity().not_before.timestamp();
    // Renewed once due (not before: the fixture backdates notBefore by one minute), and well
    // before the first one expired.
    assert!(
        renewed_not_before + 60 + 1 >= first_not_after - 60,
        "renewed too early"
    );
    assert!(
        time::OffsetDateTime::now_utc().unix_timestamp() < first_not_after,
        "renewed only after the old certificate expired"
    );
    assert!(issued_once_at_least(&running, "due", 1.0).await >= 1.0);
}

#[tokio::test]
async fn istiod_tls_is_reissued_when_deleted_or_tampered_with() {
    let ns = "istiod-repair";
    let (running, _dir, root, _fixture) = server(ns, &[]).await;
    let first = secret_where(ns, |_| true).await;
    let api = secrets(ns).await;

    api.delete(SECRET_NAME, &DeleteParams::default())
        .await
        .unwrap();
    let first_uid = first.metadata.uid.clone();
    let recreated = secret_where(ns, |s| s.metadata.uid != first_uid).await;
    assert_eq!(issued_once_at_least(&running, "missing", 2.0).await, 2.0);

    // A certificate for the same names from a CA nobody trusts, with its own key.
    let rogue = TestCa::root("rogue", KeyAlg::EcdsaP256);
    let (forged, forged_key) =
        rogue.leaf("spiffe://cluster.local/ns/istiod-repair/sa/istiod-service-account");
    let mut tampered = recreated.clone();
    let data = tampered.data.as_mut().unwrap();
    data.insert(
        "tls.crt".into(),
        ByteString(pem::encode_certificate(&forged).into_bytes()),
    );
    data.insert(
        "tls.key".into(),
        ByteString(forged_key.serialize_pem().into_bytes()),
    );
    tampered.metadata.managed_fields = None;
    let tampered = api
        .replace(SECRET_NAME, &PostParams::default(), &tampered)
        .await
        .unwrap();
    let tampered_version = tampered.metadata.resource_version.clone();
    let roots = RootBundle::from_certs(vec![root.cert.clone()]).unwrap();
    let repaired = secret_where(ns, |s| {
        s.metadata.resource_version != tampered_version
            && chain::verify_path(&chain_of(s)[0], &chain_of(s)[1..], &roots, UnixTime::now())
                .is_ok()
    })
    .await;
    assert_ne!(chain_of(&repaired)[0], forged);
    assert_eq!(issued_once_at_least(&running, "untrusted", 1.0).await, 1.0);
}

#[tokio::test]
async fn istiod_tls_is_reissued_for_a_new_root_bundle() {
    let ns = "istiod-roots";
    let (running, dir, root, _fixture) = server(ns, &[]).await;
    let first = secret_where(ns, |_| true).await;
    assert_eq!(data(&first, "ca.crt"), root.cert_pem().as_bytes());

    // Step one of a rotation: the new root joins the pinned bundle.
    let next = TestCa::root("next root", KeyAlg::EcdsaP256);
    let bundle = format!("{}{}", root.cert_pem(), next.cert_pem());
    std::fs::write(dir.path().join("roots.pem"), &bundle).unwrap();
    let both = RootBundle::from_pem(bundle.as_bytes()).unwrap();
    let rotated = secret_where(ns, |s| data(s, "ca.crt") == both.pem().as_bytes()).await;
    assert_ne!(serial_of(&rotated), serial_of(&first));
    assert_eq!(
        issued_once_at_least(&running, "roots-changed", 1.0).await,
        1.0
    );
}

#[tokio::test]
async fn istiod_tls_is_reissued_when_the_runtime_issuer_switches() {
    let ns = "istiod-issuer-switch";
    let cluster = shared().await;
    cluster.namespace(ns).await;
    let config_maps: Api<ConfigMap> = Api::namespaced(cluster.client().await, ns);
    let runtime = |issuer: &str| ConfigMap {
        metadata: ObjectMeta {
            name: Some("istio-issuer".into()),
            ..Default::default()
        },
        data: Some([("issuer-name".to_owned(), issuer.to_owned())].into()),
        ..Default::default()
    };
    config_maps
        .patch(
            "istio-issuer",
            &PatchParams::apply("test").force(),
            &Patch::Apply(runtime("ca-issuer")),
        )
        .await
        .unwrap();
    let (running, _dir, _root, _fixture) =
        server(ns, &["--runtime-issuance-config-map-name", "istio-issuer"]).await;
    let by = |s: &Secret| {
        s.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ISSUER_ANNOTATION).cloned())
            .unwrap_or_default()
    };
    let first = secret_where(ns, |s| by(s).ends_with("/ca-issuer")).await;
    config_maps
        .patch(
            "istio-issuer",
            &PatchParams::apply("test").force(),
            &Patch::Apply(runtime("second-ca-issuer")),
        )
        .await
        .unwrap();
    let switched = secret_where(ns, |s| by(s).ends_with("/second-ca-issuer")).await;
    assert_ne!(serial_of(&switched), serial_of(&first));
    assert_eq!(
        issued_once_at_least(&running, "issuer-changed", 1.0).await,
        1.0
    );
}

#[tokio::test]
async fn with_two_replicas_only_the_leader_writes_istiod_tls() {
    let ns = "istiod-two-replicas";
    let (first, dir, _root, _fixture) = server(ns, &[]).await;
    // The second replica shares the fixture and its pinned root.
    let second = launch_replica(
        ns,
        Some(&dir.path().join("roots.pem")),
        &[
            "--istiod-cert-enabled",
            "--istiod-cert-namespace",
            ns,
            "--leader-election-namespace",
            ns,
            "--multicluster-secret-namespace",
            ns,
        ],
        istio_csr_rs::app::Hooks::default(),
    )
    .await
    .serving()
    .await
    .unwrap()
    .unwrap();
    let secret = secret_where(ns, |_| true).await;

    // Deleted while both run: put back once, by the leader alone.
    secrets(ns)
        .await
        .delete(SECRET_NAME, &DeleteParams::default())
        .await
        .unwrap();
    let uid = secret.metadata.uid.clone();
    secret_where(ns, |s| s.metadata.uid != uid).await;
    let both = || async { issued_total(&first).await + issued_total(&second).await };
    eventually(WITHIN, || async { both().await >= 2.0 }).await;
    let counts = (issued_total(&first).await, issued_total(&second).await);
    assert!(
        counts == (2.0, 0.0) || counts == (0.0, 2.0),
        "writes by replica: {counts:?}"
    );
}

#[tokio::test]
async fn the_built_in_ca_signs_istiod_tls_and_a_new_ca_reissues_it() {
    let ns = "istiod-local-ca";
    let cluster = shared().await;
    cluster.namespace(ns).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    let root = TestCa::root("built-in root", KeyAlg::EcdsaP256);
    let install = |ca: &TestCa| {
        std::fs::write(ca_dir.join("ca-cert.pem"), ca.cert_pem()).unwrap();
        std::fs::write(ca_dir.join("ca-key.pem"), ca.key_pem()).unwrap();
        std::fs::write(ca_dir.join("cert-chain.pem"), ca.cert_pem()).unwrap();
        std::fs::write(ca_dir.join("root-cert.pem"), root.cert_pem()).unwrap();
    };
    install(&root);
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, "t0ken,default,default\n").unwrap();
    let kubeconfig = cluster.kubeconfig.to_str().unwrap().to_owned();
    let flags = [
        "--signer",
        "local-ca",
        "--local-ca-dir",
        ca_dir.to_str().unwrap(),
        "--token-auth-file",
        tokens.to_str().unwrap(),
        "--kubeconfig",
        &kubeconfig,
        "--istiod-cert-enabled",
        "--istiod-cert-namespace",
        ns,
        "--leader-election-namespace",
        ns,
        "--multicluster-secret-namespace",
        ns,
    ];
    let running = istio_csr_rs::app::start(serve_args(&flags), Default::default())
        .await
        .unwrap();
    let roots = RootBundle::from_certs(vec![root.cert.clone()]).unwrap();
    let first = secret_where(ns, |_| true).await;
    let first_chain = chain_of(&first);
    assert!(
        chain::verify_path(&first_chain[0], &first_chain[1..], &roots, UnixTime::now()).is_ok()
    );

    // The CA is replaced by an intermediate of the same root: istiod gets a leaf from it.
    let intermediate = root.intermediate("built-in intermediate", KeyAlg::EcdsaP256);
    install(&intermediate);
    let reissued = secret_where(ns, |s| chain_of(s).len() == 2).await;
    let chain = chain_of(&reissued);
    assert_eq!(chain[1], intermediate.cert);
    assert!(chain::verify_path(&chain[0], &chain[1..], &roots, UnixTime::now()).is_ok());
    assert_eq!(
        issued_once_at_least(&running, "issuer-changed", 1.0).await,
        1.0
    );
}

const BIN: &str = env!("CARGO_BIN_EXE_istio-csr-rs");

/// The Helm chart's rights for a leader with istiod's certificate on (charts/istio-csr-rs/
/// templates/rbac.yaml): istiod-tls read and updated by name, and no right to create any
/// Secret. Granted to service account `agent` of `ns`.
async fn chart_like_rights(ns: &str) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let client = shared().await.client().await;
    let apply = PatchParams::apply("kube-istiod-test").force();
    let subject = serde_json::json!([{"kind": "ServiceAccount", "name": "agent", "namespace": ns}]);
    let rule = |group: &str, resource: &str, names: &[&str], verbs: &[&str]| {
        serde_json::json!({"apiGroups": [group], "resources": [resource],
                           "resourceNames": names, "verbs": verbs})
    };
    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "agent", "namespace": ns},
        "rules": [
            rule("", "secrets", &[SECRET_NAME], &["get", "list", "watch", "update"]),
            rule("cert-manager.io", "certificaterequests", &[], &["create", "delete", "get", "list", "watch"]),
            rule("coordination.k8s.io", "leases", &["istio-csr-rs"], &["get", "update"]),
            rule("coordination.k8s.io", "leases", &[], &["create"]),
        ],
    }))
    .unwrap();
    Api::<Role>::namespaced(client.clone(), ns)
        .patch("agent", &apply, &Patch::Apply(&role))
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "agent", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "agent"},
        "subjects": subject,
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .patch("agent", &apply, &Patch::Apply(&binding))
        .await
        .unwrap();
    // The trust bundle's rights, cluster-wide.
    let cluster_role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": {"name": ns},
        "rules": [
            rule("", "namespaces", &[], &["list", "watch"]),
            rule("", "configmaps", &["istio-ca-root-cert"], &["list", "watch", "update"]),
            rule("", "configmaps", &[], &["create"]),
        ],
    }))
    .unwrap();
    Api::<ClusterRole>::all(client.clone())
        .patch(ns, &apply, &Patch::Apply(&cluster_role))
        .await
        .unwrap();
    let cluster_binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ns},
        "subjects": subject,
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client)
        .patch(ns, &apply, &Patch::Apply(&cluster_binding))
        .await
        .unwrap();
}

/// (status, body) of a GET on the admin listener, None while it does not answer.
async fn admin_get(admin: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.get(9..12)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_owned()))
}

/// The binary, killed on drop.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn without_istiod_tls_and_the_right_to_create_it_the_leader_signs_nothing_and_says_what_to_do()
 {
    let ns = "istiod-no-create";
    let cluster = shared().await;
    let (root, _fixture) = support::cert_manager::fixture_in(ns).await;
    cluster.service_account(ns, "agent").await;
    chart_like_rights(ns).await;
    let token = cluster.token(ns, "agent", &[SA_ISSUER], 3600, None).await;
    let agent_client = cluster.client_with_token(&token).await;
    // The premise: this account may not create Secrets in istiod's namespace.
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let refused = Api::<Secret>::namespaced(agent_client, ns)
        .create(&dry_run, &istio_csr_rs::istiod::empty_secret(ns))
        .await;
    assert!(
        matches!(refused, Err(::kube::Error::Api(ref e)) if e.code == 403),
        "the agent's account may create Secrets: {refused:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.kubeconfig_with_token(&kubeconfig, &token);
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, root.cert_pem()).unwrap();
    let (grpc, admin) = {
        let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, b) = (bind(), bind());
        (a.local_addr().unwrap(), b.local_addr().unwrap())
    };
    let log = dir.path().join("istio-csr-rs.log");
    let file = std::fs::File::create(&log).unwrap();
    let (kubeconfig, roots) = (kubeconfig.to_str().unwrap(), roots.to_str().unwrap());
    let (grpc_arg, admin_arg) = (grpc.to_string(), admin.to_string());
    let child = std::process::Command::new(BIN)
        .args([
            "serve",
            "--signer",
            "cert-manager",
            "--kubeconfig",
            kubeconfig,
        ])
        .args(["--certificate-namespace", ns, "--issuer-name", "ca-issuer"])
        .args([
            "--root-ca-file",
            roots,
            "--serving-certificate-dns-names",
            "localhost",
        ])
        .args([
            "--serving-address",
            &grpc_arg,
            "--admin-address",
            &admin_arg,
        ])
        .args(["--istiod-cert-enabled", "--istiod-cert-namespace", ns])
        .args([
            "--istiod-cert-key-algorithm",
            "ECDSA",
            "--leader-election-namespace",
            ns,
        ])
        .args([
            "--multicluster-enabled=false",
            "--configmap-namespace-selector",
            "none=none",
        ])
        .args(["--log-format", "text"])
        .env_clear()
        .env("POD_NAME", "agent-0")
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let _agent = Agent(child);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let ready = eventually(WITHIN, || async {
        admin_get(admin, "/readyz")
            .await
            .is_some_and(|(s, _)| s == 200)
    })
    .await;
    assert!(ready, "not ready within {WITHIN:?}:\n{}", log_text());
    let metrics = || async {
        let (_, body) = admin_get(admin, "/metrics").await.unwrap_or_default();
        openmetrics::parse(&body)
    };
    let failures =
        |m: &openmetrics::Exposition| m.value("istio_csr_istiod_certificate_failures_total", &[]);
    let signing_requests = |m: &openmetrics::Exposition| {
        m.sum(
            "istio_csr_kube_api_requests_total",
            &[("verb", "create"), ("resource", "certificaterequests")],
        )
    };
    // Only its own serving certificate was signed to become ready.
    let at_ready = signing_requests(&metrics().await);

    // Five attempts, each refused: the next one is 16 s to 32 s away.
    let refused = eventually(WITHIN, || async { failures(&metrics().await) >= 5.0 }).await;
    assert!(refused, "no failed attempt counted:\n{}", log_text());
    let now = metrics().await;
    assert_eq!(
        signing_requests(&now),
        at_ready,
        "signed certificates for a Secret it may not create"
    );
    assert!(
        now.value(
            "istio_csr_kube_api_requests_total",
            &[("verb", "create"), ("resource", "secrets"), ("code", "403")]
        ) >= 5.0
    );
    assert_eq!(
        now.sum("istio_csr_istiod_certificate_issued_total", &[]),
        0.0
    );
    let said = format!(
        "Secret istiod-tls does not exist in namespace {ns} and this service account may not \
         create Secrets there: create istiod-tls empty (type kubernetes.io/tls, empty tls.crt \
         and tls.key; the Helm chart does, docs/istio.md shows it) or grant create on secrets \
         in {ns}"
    );
    let text = log_text();
    let lines = text.lines().filter(|l| l.contains(&said)).count() as f64;
    // One line per attempt, so at the backoff's rate (the counter may trail its line).
    let counted = failures(&now);
    assert!(
        lines >= counted && lines <= counted + 1.0,
        "{lines} lines saying what to do for {counted} failures:\n{text}"
    );
    assert!(
        secrets(ns)
            .await
            .get_opt(SECRET_NAME)
            .await
            .unwrap()
            .is_none(),
        "istiod-tls exists"
    );

    // Created empty as the chart does: filled at once, not at the end of the backoff (which
    // leaves 10 s for the signing round trip on a loaded machine).
    secrets(ns)
        .await
        .create(
            &PostParams::default(),
            &istio_csr_rs::istiod::empty_secret(ns),
        )
        .await
        .unwrap();
    let roots = RootBundle::from_certs(vec![root.cert.clone()]).unwrap();
    let filled = tokio::time::timeout(
        Duration::from_secs(10),
        secret_where(ns, |s| {
            let written = s.data.as_ref().and_then(|d| d.get("tls.crt"));
            written.is_some_and(|crt| !crt.0.is_empty()) && {
                let chain = chain_of(s);
                chain::verify_path(&chain[0], &chain[1..], &roots, UnixTime::now()).is_ok()
            }
        }),
    )
    .await;
    assert!(
        filled.is_ok(),
        "istiod-tls not filled within 10 s of being created:\n{}",
        log_text()
    );

    // Replaced by a Secret of another type, which only a delete and a create could fix.
    let after_fill = signing_requests(&metrics().await);
    let api = secrets(ns).await;
    api.delete(SECRET_NAME, &DeleteParams::default())
        .await
        .unwrap();
    let opaque: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": SECRET_NAME, "namespace": ns},
        "type": "Opaque",
        "stringData": {"note": "not istiod's"},
    }))
    .unwrap();
    let opaque = api.create(&PostParams::default(), &opaque).await.unwrap();
    let said = format!(
        "Secret istiod-tls in namespace {ns} has type \"Opaque\", not kubernetes.io/tls, and a \
         Secret's type cannot change, but this service account may not delete and re-create \
         it: replace it with an empty kubernetes.io/tls Secret (docs/istio.md) or grant delete \
         and create on secrets in {ns}"
    );
    let told = eventually(WITHIN, || async { log_text().contains(&said) }).await;
    assert!(told, "no word about the wrong type:\n{}", log_text());
    assert_eq!(
        signing_requests(&metrics().await),
        after_fill,
        "signed a certificate it could not write"
    );
    let left = api.get(SECRET_NAME).await.unwrap();
    assert_eq!(left.metadata.uid, opaque.metadata.uid);
}

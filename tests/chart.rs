//! Tier 4: the Helm chart as a user installs it. For each set of values the chart is linted,
//! rendered and schema-checked by Helm's own Go SDK (`tests/chart/render.py`, rendering for the
//! test cluster the way `helm install --dry-run=server` does), every object is applied
//! server-side to a real kube-apiserver, and then the real binary runs with exactly the
//! rendered container's arguments and environment, as the chart's ServiceAccount, under the
//! chart's RBAC and nothing else. It must sign, write the bundle, take the Lease and (when on)
//! write istiod-tls; SubjectAccessReviews prove what it may not do. Remote clusters are set up
//! as deploy/multicluster/README.md says (remote-rbac.yaml, make-remote-secret.sh), and where
//! Helm's own behaviour matters (istiod-tls across an upgrade and an uninstall) a real release
//! is driven through `tests/chart/helm.py`.
//!
//! What stands in for Kubernetes running the pod, and nothing more:
//! - the ServiceAccount's token comes from the TokenRequest API and reaches the binary as a
//!   kubeconfig in `KUBECONFIG` (the kubelet would mount a projected token instead);
//! - `valueFrom.fieldRef` environment variables are resolved as the kubelet would (POD_NAME);
//! - the image's own ENV (ISTIO_CSR_SERVING_ADDRESS, ...) is left out: the chart passes every
//!   one of those as a flag, and flags win.
//!
//! Values chosen for this machine (see `Install::values`): the gRPC and admin addresses are
//! free loopback ports (`app.server.serving.*`, `app.metrics.address/port`); the root bundle is
//! mounted (`app.tls.rootCA`) at a temporary directory where the test writes the file the
//! kubelet would project from the Secret; every namespace value points at the test's own
//! namespace, and the bundle's namespace selector at namespaces labelled for this test, so
//! the tests sharing one cluster stay apart.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ::kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use ::kube::core::GroupVersionKind;
use ::kube::discovery::{self, Scope};
use ::kube::runtime::wait::await_condition;
use istio_csr_rs::client::Target;
use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};
use support::kube::{SA_ISSUER, TestCluster, shared};
use support::*;
use tokio_util::task::AbortOnDropHandle;

const BIN: &str = env!("CARGO_BIN_EXE_istio-csr-rs");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/istio-csr-rs");
const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chart");
const FIELD_MANAGER: &str = "istio-csr-rs-chart-test";
/// Start-up includes the serving certificate (one issuance round trip) and the caches.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Leader work (Lease, bundle, istiod-tls) after the binary is ready.
const WAIT: Duration = Duration::from_secs(30);
/// The cert-manager fixture's issuer that signs (support::cert_manager).
const SIGNING_ISSUER: &str = "ca-issuer";

/// The venv's interpreter, set up once per test binary by tests/chart/setup.sh.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("bash")
            .arg(format!("{SCRIPTS}/setup.sh"))
            .output()
            .expect("bash must be installed");
        assert!(
            out.status.success(),
            "tests/chart/setup.sh failed (it installs PyPI helm-python-sdk and \
             kubernetes-validate into a venv; scripts/provision.sh runs it):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cache = std::env::var("ISTIO_CSR_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/istio-csr-rs")
            });
        cache.join("chart-venv/bin/python")
    })
}

/// Runs the Python side with `stdin`; its stdout parsed as JSON. Blocking: call it through
/// `spawn_blocking`.
fn run_python(args: &[&str], stdin: &str) -> Value {
    use std::io::Write;
    let mut child = Command::new(python())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script's output is JSON")
}

/// The chart's objects for `values` (render.py lints and schema-checks them), rendered for
/// `cluster` as a server dry run of `helm install` would (its version picks API versions;
/// objects of the release must not exist there yet), or offline (`helm template`) without one.
async fn render(
    cluster: Option<&TestCluster>,
    release: &str,
    namespace: &str,
    values: &Value,
) -> Vec<Value> {
    let mut args = vec![
        format!("{SCRIPTS}/render.py"),
        CHART.to_owned(),
        format!("--release={release}"),
        format!("--namespace={namespace}"),
        "--values=-".to_owned(),
    ];
    if let Some(cluster) = cluster {
        args.push(format!("--kubeconfig={}", cluster.kubeconfig.display()));
    }
    let values = values.to_string();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match run_python(&args, &values) {
            Value::Array(objects) => objects,
            other => panic!("render.py printed {other}"),
        }
    })
    .await
    .unwrap()
}

/// A real Helm action (tests/chart/helm.py) on release `name` in namespace `name` of the shared
/// cluster: `install` and `upgrade` (with `values`) answer the objects Helm applied,
/// `uninstall` Helm's answer.
async fn helm_release(action: &str, name: &str, values: Option<&Value>) -> Vec<Value> {
    let cluster = shared().await;
    let mut args = vec![format!("{SCRIPTS}/helm.py"), action.to_owned()];
    if values.is_some() {
        args.extend([CHART.to_owned(), "--values=-".to_owned()]);
    }
    args.extend([
        format!("--release={name}"),
        format!("--namespace={name}"),
        format!("--kubeconfig={}", cluster.kubeconfig.display()),
    ]);
    let stdin = values.map(Value::to_string).unwrap_or_default();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match run_python(&args, &stdin) {
            Value::Array(objects) => objects,
            other => vec![other],
        }
    })
    .await
    .unwrap()
}

/// The objects of a multi-document YAML file (through the venv's PyYAML: no YAML crate here).
async fn yaml_objects(path: &str) -> Vec<Value> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let code = "import json, sys, yaml; \
                    json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)";
        match run_python(&["-c", code, &path], "") {
            Value::Array(objects) => objects,
            other => panic!("{path}: {other}"),
        }
    })
    .await
    .unwrap()
}

/// Applies every object server-side, as `kubectl apply --server-side` would; namespaced objects
/// without a namespace go to `namespace` (as Helm does).
async fn apply_all(client: &::kube::Client, objects: &[Value], namespace: &str) {
    for object in objects {
        let api_version = object["apiVersion"].as_str().unwrap();
        let kind = object["kind"].as_str().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, capabilities) = discovery::pinned_kind(client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("the API server does not serve {api_version} {kind}: {e}"));
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Namespaced => {
                let ns = object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or(namespace);
                Api::namespaced_with(client.clone(), ns, &resource)
            }
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(object),
        )
        .await
        .unwrap_or_else(|e| panic!("server-side apply of {kind} {name} refused: {e}"));
    }
}

async fn labelled_namespace(client: &::kube::Client, name: &str, labels: Value) {
    let ns = json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels}});
    Api::<Namespace>::all(client.clone())
        .patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&ns))
        .await
        .unwrap();
}

/// Two free ports, distinct: both are held until both are known (one at a time, the kernel
/// may hand out the same one twice).
fn free_ports() -> (u16, u16) {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = (bind(), bind());
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// Deep merge: `overrides` wins, objects merge key by key (like Helm's values coalescing).
fn merge(base: &mut Value, overrides: &Value) {
    match (base, overrides) {
        (Value::Object(base), Value::Object(overrides)) => {
            for (key, value) in overrides {
                merge(base.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (base, overrides) => *base = overrides.clone(),
    }
}

/// A kubeconfig authenticating with `token`, for the server of `cluster` (inline CA and token,
/// which is also what remote-cluster Secrets must look like). JSON is YAML.
fn kubeconfig_with_token(cluster: &TestCluster, user: &str, token: &str) -> String {
    let admin = ::kube::config::Kubeconfig::read_from(&cluster.kubeconfig).unwrap();
    let ca = admin.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.certificate_authority_data.clone())
        .expect("the harness kubeconfig carries its CA");
    json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": cluster.url, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "test", "user": user}}],
        "current-context": user,
    })
    .to_string()
}

/// One installation of the chart, in namespace `name` (which plays istio-system: certificates,
/// Lease, istiod), with workloads in `<name>-app`, the namespace the bundle must reach.
struct Install {
    name: String,
    app_namespace: String,
    dir: tempfile::TempDir,
    root: Arc<TestCa>,
    values: Value,
    objects: Vec<Value>,
    _fixture: Option<AbortOnDropHandle<()>>,
}

impl Install {
    /// The values every entry shares (see the module comment), with `overrides` merged in.
    fn values(name: &str, dir: &Path, overrides: Value) -> Value {
        let (grpc_port, admin_port) = free_ports();
        let mut values = json!({
            "app": {
                "server": {"serving": {"address": "127.0.0.1", "port": grpc_port}},
                "metrics": {"address": "127.0.0.1", "port": admin_port},
                "tls": {"rootCA": {
                    "secretName": "istio-root-ca",
                    "key": "ca.crt",
                    "mountPath": dir.join("root-ca").to_str().unwrap(),
                }},
                "certmanager": {"namespace": name, "issuer": {"name": SIGNING_ISSUER}},
                "tenants": {"mountPath": dir.join("tenants").to_str().unwrap()},
                "istio": {"namespace": name},
                "controller": {
                    "leaderElectionNamespace": name,
                    "configmapNamespaceSelector": format!("chart-test={name}"),
                },
            }
        });
        merge(&mut values, &overrides);
        values
    }

    /// Prepares what the chart expects to exist (namespaces, the root Secret and its mounted
    /// file) and the values with `overrides`; nothing of the chart is applied yet. With `root`
    /// the signer is not cert-manager's fixture (whose CA is used otherwise).
    async fn prepare(name: &str, overrides: Value, root: Option<Arc<TestCa>>) -> Self {
        install_crypto_provider();
        let cluster = shared().await;
        let admin = cluster.client().await;
        let (root, fixture) = match root {
            Some(root) => {
                cluster.namespace(name).await;
                (root, None)
            }
            None => {
                let (root, fixture) = support::cert_manager::fixture_in(name).await;
                (root, Some(fixture))
            }
        };
        let app_namespace = format!("{name}-app");
        labelled_namespace(&admin, &app_namespace, json!({"chart-test": name})).await;
        cluster.service_account(&app_namespace, "web").await;
        let dir = tempfile::tempdir().unwrap();
        // What the kubelet would project from Secret istio-root-ca (key ca.crt).
        std::fs::create_dir_all(dir.path().join("root-ca")).unwrap();
        std::fs::write(dir.path().join("root-ca/root-cert.pem"), root.cert_pem()).unwrap();
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
                            "metadata": {"name": "istio-root-ca", "namespace": name},
                            "stringData": {"ca.crt": root.cert_pem()}});
        apply_all(&admin, &[secret], name).await;

        let values = Self::values(name, dir.path(), overrides);
        Self {
            name: name.to_owned(),
            app_namespace,
            dir,
            root,
            values,
            objects: Vec::new(),
            _fixture: fixture,
        }
    }

    /// Renders with `overrides`, prepares what the chart expects to exist (namespaces, the root
    /// Secret and its mounted file), and applies every object. With `root` the signer is not
    /// cert-manager's fixture (whose CA is used otherwise).
    async fn new(name: &str, overrides: Value, root: Option<Arc<TestCa>>) -> Self {
        let mut install = Self::prepare(name, overrides, root).await;
        let cluster = shared().await;
        install.objects = render(Some(cluster), name, name, &install.values).await;
        apply_all(&cluster.client().await, &install.objects, name).await;
        install
    }

    /// Like `new`, but installed by Helm itself (`helm install`, tests/chart/helm.py), as a
    /// release that can then be upgraded and uninstalled.
    async fn with_helm(name: &str, overrides: Value) -> Self {
        let mut install = Self::prepare(name, overrides, None).await;
        install.objects = helm_release("install", name, Some(&install.values)).await;
        install
    }

    fn object(&self, kind: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("the chart rendered no {kind}"))
    }

    fn objects_of(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn container(&self) -> &Value {
        &self.object("Deployment")["spec"]["template"]["spec"]["containers"][0]
    }

    fn args(&self) -> Vec<String> {
        self.container()["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    }

    fn arg(&self, flag: &str) -> Option<String> {
        let prefix = format!("{flag}=");
        self.args()
            .iter()
            .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
    }

    fn service_account(&self) -> String {
        self.object("ServiceAccount")["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// A client of the shared cluster as the chart's ServiceAccount.
    async fn sa_client(&self) -> ::kube::Client {
        let cluster = shared().await;
        let token = cluster
            .token(
                &self.name,
                &self.service_account(),
                &[SA_ISSUER],
                3600,
                None,
            )
            .await;
        cluster.client_with_token(&token).await
    }

    /// Starts the binary as the pod would run it, and waits until /readyz answers 200.
    async fn start(&self) -> Process {
        let cluster = shared().await;
        let token = cluster
            .token(
                &self.name,
                &self.service_account(),
                &[SA_ISSUER],
                3600,
                None,
            )
            .await;
        let kubeconfig = self.dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_with_token(cluster, &self.service_account(), &token),
        )
        .unwrap();
        let deployment = self.object("Deployment");
        let pod_name = format!("{}-0", deployment["metadata"]["name"].as_str().unwrap());
        let mut env = BTreeMap::new();
        for var in self.container()["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap().to_owned();
            let value = match (&var["value"], &var["valueFrom"]["fieldRef"]["fieldPath"]) {
                (Value::String(v), _) => v.clone(),
                (_, Value::String(path)) if path == "metadata.name" => pod_name.clone(),
                (_, Value::String(path)) if path == "metadata.namespace" => self.name.clone(),
                // The kubelet gives the container's limit in bytes (divisor 1).
                _ if var["valueFrom"]["resourceFieldRef"]["resource"] == "limits.memory" => {
                    let limit = self.container()["resources"]["limits"]["memory"]
                        .as_str()
                        .expect("a memory limit to project")
                        .to_owned();
                    istio_csr_rs::signer::capacity::parse_bytes(&limit)
                        .unwrap()
                        .to_string()
                }
                _ => panic!("the test cannot resolve env {var}: teach it how the kubelet would"),
            };
            env.insert(name, value);
        }
        // What the kubelet would project from the tenant signers' ConfigMap.
        if let Some(signers) = self
            .objects_of("ConfigMap")
            .into_iter()
            .find(|c| c["data"]["signers.yaml"].is_string())
        {
            let dir = self.dir.path().join("tenants/signers");
            std::fs::create_dir_all(&dir).unwrap();
            let text = signers["data"]["signers.yaml"].as_str().unwrap();
            std::fs::write(dir.join("signers.yaml"), text).unwrap();
        }
        let log = self.dir.path().join("istio-csr-rs.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(self.args())
            .env_clear()
            .envs(&env)
            .env("KUBECONFIG", &kubeconfig)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let address = |flag: &str| -> SocketAddr {
            self.arg(flag)
                .unwrap_or_else(|| panic!("the chart passes no {flag}"))
                .parse()
                .unwrap()
        };
        let mut process = Process {
            child,
            log,
            grpc: address("--serving-address"),
            admin: address("--admin-address"),
            pod_name,
        };
        process.wait_ready().await;
        process
    }

    /// A client of `process` as pilot-agent in this install's cluster would be: it dials the
    /// Service's name and trusts the mounted root.
    fn target(&self, process: &Process) -> Target {
        let service = self
            .objects_of("Service")
            .into_iter()
            .find(|s| s["spec"]["ports"][0]["name"] == "grpc")
            .expect("the gRPC Service")["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        Target {
            server_name: Some(format!("{service}.{}.svc", self.name)),
            ..localhost_target(process.grpc, self.dir.path().join("root-ca/root-cert.pem"))
        }
    }

    /// `web` of the app namespace gets a certificate for its identity.
    async fn signs_a_workload_certificate(&self, process: &Process) {
        let cluster = shared().await;
        let token = cluster
            .token(&self.app_namespace, "web", &["istio-ca"], 3600, None)
            .await;
        let identity = format!("spiffe://cluster.local/ns/{}/sa/web", self.app_namespace);
        let chain = request_certificate(&self.target(process), Some(&token), &identity)
            .await
            .unwrap_or_else(|s| panic!("no certificate: {s}\n{}", process.log_tail()));
        assert_eq!(leaf_identity(&chain).0, vec![identity]);
        let roots =
            istio_csr_rs::pki::pem::parse_certificates(chain.last().unwrap().as_bytes()).unwrap();
        assert_eq!(
            roots,
            vec![self.root.cert.clone()],
            "the root bundle is the pinned root"
        );
    }

    /// A workload certificate of the app namespace asking for tenant signer `cert_signer`.
    async fn request_with_signer(&self, process: &Process, cert_signer: &str) -> Vec<String> {
        request_as_web(
            &self.target(process),
            &self.app_namespace,
            Some(cert_signer),
        )
        .await
        .unwrap_or_else(|s| panic!("no {cert_signer} certificate: {s}\n{}", process.log_tail()))
        .0
    }

    /// The bundle in the app namespace, the Lease held by this pod: the leader's work.
    async fn leads_and_writes_the_bundle(&self, process: &Process) {
        let cluster = shared().await;
        let admin = cluster.client().await;
        let prefix = format!("{}_", process.pod_name);
        let lease = Api::<Lease>::namespaced(admin.clone(), &self.name);
        let held = tokio::time::timeout(
            WAIT,
            await_condition(lease, "istio-csr-rs", |l: Option<&Lease>| {
                l.and_then(|l| l.spec.as_ref())
                    .and_then(|s| s.holder_identity.as_deref())
                    .is_some_and(|h| h.starts_with(&prefix))
            }),
        )
        .await;
        assert!(
            matches!(held, Ok(Ok(_))),
            "Lease istio-csr-rs in {} not taken by {} within {WAIT:?}\n{}",
            self.name,
            process.pod_name,
            process.log_tail()
        );
        let pem = self.root.cert_pem();
        has_bundle(&admin, &self.app_namespace, &pem, process).await;
    }

    /// Secret istiod-tls as istiod reads it; its certificate names istiod's Service.
    async fn writes_istiod_tls(&self, process: &Process) {
        let admin = shared().await.client().await;
        let secrets = Api::<Secret>::namespaced(admin, &self.name);
        let written = tokio::time::timeout(
            WAIT,
            await_condition(secrets, "istiod-tls", |s: Option<&Secret>| {
                s.is_some_and(|s| {
                    let data = s.data.clone().unwrap_or_default();
                    s.type_.as_deref() == Some("kubernetes.io/tls")
                        && ["tls.crt", "tls.key", "ca.crt"]
                            .iter()
                            .all(|k| data.get(*k).is_some_and(|v| !v.0.is_empty()))
                })
            }),
        )
        .await;
        let secret = match written {
            Ok(Ok(Some(secret))) => secret,
            _ => panic!(
                "Secret istiod-tls (kubernetes.io/tls: tls.crt, tls.key, ca.crt) not written in \
                 {} within {WAIT:?}\n{}",
                self.name,
                process.log_tail()
            ),
        };
        let crt = &secret.data.unwrap()["tls.crt"].0;
        let leaf = istio_csr_rs::pki::pem::parse_certificates(crt)
            .unwrap()
            .remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let want = format!("istiod.{}.svc", self.name);
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .map(|n| n.to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            names.iter().any(|n| n.contains(&want)),
            "istiod's certificate does not name {want}: {names:?}"
        );
    }

    /// Whether the chart's ServiceAccount may do `verb` on `resource` (a SubjectAccessReview).
    async fn may(
        &self,
        verb: &str,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> bool {
        let admin = shared().await.client().await;
        let account = (self.name.as_str(), self.service_account());
        may_in(
            &admin,
            (account.0, &account.1),
            verb,
            group,
            resource,
            namespace,
            name,
        )
        .await
    }

    /// Exactly the Secret rights of the chart's ServiceAccount: istiod-tls by name (read and
    /// update, no delete) when the istiod certificate is on, the remote-cluster Secrets of
    /// `remotes` (read) when multi-cluster is on, and nothing else: no other Secret of
    /// istiod's or any namespace, and no create anywhere (a Secret created in istiod's
    /// namespace could hold a token for istiod's service account).
    async fn has_only_its_own_secret_rights(&self, istiod_tls: bool, remotes: Option<&str>) {
        let ns = Some(self.name.as_str());
        let mut expected: Vec<(&str, Option<&str>, Option<&str>, bool)> = vec![
            ("get", ns, Some("istiod-tls"), istiod_tls),
            ("list", ns, Some("istiod-tls"), istiod_tls),
            ("watch", ns, Some("istiod-tls"), istiod_tls),
            ("update", ns, Some("istiod-tls"), istiod_tls),
            ("patch", ns, Some("istiod-tls"), false),
            ("delete", ns, Some("istiod-tls"), false),
            ("create", ns, None, false),
            ("create", ns, Some("istiod-tls"), false),
            ("get", ns, Some("istio-root-ca"), false),
            ("get", ns, Some("cacerts"), false),
            ("list", ns, None, false),
            ("get", Some("kube-system"), Some("any"), false),
            ("create", Some("kube-system"), None, false),
            ("list", None, None, false),
            ("create", Some(self.app_namespace.as_str()), None, false),
        ];
        if let Some(remotes) = remotes {
            expected.extend([
                (
                    "get",
                    Some(remotes),
                    Some("istio-remote-secret-remote-1"),
                    true,
                ),
                ("list", Some(remotes), None, true),
                ("watch", Some(remotes), None, true),
                ("create", Some(remotes), None, false),
                (
                    "update",
                    Some(remotes),
                    Some("istio-remote-secret-remote-1"),
                    false,
                ),
                (
                    "delete",
                    Some(remotes),
                    Some("istio-remote-secret-remote-1"),
                    false,
                ),
            ]);
        }
        let mut wrong = Vec::new();
        for (verb, namespace, name, allowed) in expected {
            if self.may(verb, "", "secrets", namespace, name).await != allowed {
                wrong.push(format!(
                    "{verb} secrets {namespace:?}/{name:?}: want allowed={allowed}"
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "the chart's Secret rights differ:\n{}",
            wrong.join("\n")
        );
    }

    /// What no configuration of the chart may allow (all in the core API group).
    async fn refuses_what_it_never_needs(&self) {
        struct Denied<'a> {
            verb: &'a str,
            resource: &'a str,
            namespace: Option<&'a str>,
            name: Option<&'a str>,
            what: &'a str,
        }
        let app = Some(self.app_namespace.as_str());
        let denied = [
            Denied {
                verb: "list",
                resource: "secrets",
                namespace: None,
                name: None,
                what: "read Secrets cluster-wide",
            },
            Denied {
                verb: "get",
                resource: "secrets",
                namespace: Some("kube-system"),
                name: Some("any"),
                what: "read a Secret in kube-system",
            },
            Denied {
                verb: "list",
                resource: "secrets",
                namespace: Some("kube-system"),
                name: None,
                what: "list Secrets in kube-system",
            },
            Denied {
                verb: "update",
                resource: "configmaps",
                namespace: Some("kube-system"),
                name: Some("coredns"),
                what: "update ConfigMap coredns",
            },
            Denied {
                verb: "list",
                resource: "configmaps",
                namespace: None,
                name: None,
                what: "list every ConfigMap",
            },
            Denied {
                verb: "create",
                resource: "pods",
                namespace: app,
                name: None,
                what: "create pods",
            },
            Denied {
                verb: "delete",
                resource: "namespaces",
                namespace: None,
                name: app,
                what: "delete namespaces",
            },
        ];
        for d in denied {
            assert!(
                !self.may(d.verb, "", d.resource, d.namespace, d.name).await,
                "the chart's ServiceAccount may {}",
                d.what
            );
        }
    }
}

/// Whether service account `account` (namespace, name) may do `verb` on `resource` in the
/// cluster of `admin` (a SubjectAccessReview with the groups the API server gives its tokens).
async fn may_in(
    admin: &::kube::Client,
    account: (&str, &str),
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{}:{}", account.0, account.1)),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", account.0),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                namespace: namespace.map(Into::into),
                name: name.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SubjectAccessReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .is_some_and(|s| s.allowed)
}

/// istio-ca-root-cert in `namespace` holds exactly `pem` (event-driven, bounded).
async fn has_bundle(client: &::kube::Client, namespace: &str, pem: &str, process: &Process) {
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let written = tokio::time::timeout(
        WAIT,
        await_condition(
            config_maps,
            "istio-ca-root-cert",
            |cm: Option<&ConfigMap>| {
                cm.and_then(|cm| cm.data.as_ref())
                    .and_then(|d| d.get("root-cert.pem"))
                    .is_some_and(|v| v == pem)
            },
        ),
    )
    .await;
    assert!(
        matches!(written, Ok(Ok(_))),
        "istio-ca-root-cert not written in {namespace} within {WAIT:?}\n{}",
        process.log_tail()
    );
}

/// The binary, killed on drop.
struct Process {
    child: Child,
    log: PathBuf,
    grpc: SocketAddr,
    admin: SocketAddr,
    pod_name: String,
}

impl Process {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- istio-csr-rs log (last lines) ---\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.admin).await.ok()?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let status = response.get(9..12)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Some((status, body))
    }

    /// Polls /readyz (bounded): there is no event to wait on from outside the process.
    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "istio-csr-rs exited with {status} before it was ready\n{}",
                    self.log_tail()
                );
            }
            let readyz = self.get("/readyz?verbose").await;
            if readyz.as_ref().is_some_and(|(status, _)| *status == 200) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "istio-csr-rs not ready within {READY_TIMEOUT:?}: /readyz said {readyz:?}\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_values_sign_write_the_bundle_and_istiod_tls_under_least_privilege() {
    let install = Install::new("chart-default", json!({}), None).await;
    let args = install.args();
    assert!(
        args.contains(&"--signer=cert-manager".to_owned()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--istiod-cert-enabled=true".to_owned()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--multicluster-enabled=false".to_owned()),
        "{args:?}"
    );
    // The chart creates istiod-tls empty, kept by Helm, for the leader to fill: the agent
    // may not create Secrets.
    let rendered = install
        .objects_of("Secret")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "istiod-tls")
        .expect("the chart renders istiod-tls while it does not exist");
    assert_eq!(rendered["metadata"]["namespace"], install.name.as_str());
    assert_eq!(rendered["type"], "kubernetes.io/tls");
    assert_eq!(rendered["data"], json!({"tls.crt": "", "tls.key": ""}));
    assert_eq!(
        rendered["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let secrets = Api::<Secret>::namespaced(shared().await.client().await, &install.name);
    let created = secrets.get("istiod-tls").await.expect("istiod-tls applied");
    let empty = created.data.clone().unwrap_or_default();
    assert!(
        empty.values().all(|v| v.0.is_empty()),
        "istiod-tls is created empty"
    );
    // Multi-cluster is opt-in: by default no Secret of istiod's namespace (cacerts...) is
    // readable, only istiod-tls by name, and no Secret can be created.
    install.has_only_its_own_secret_rights(true, None).await;

    let process = install.start().await;
    install.signs_a_workload_certificate(&process).await;
    install.leads_and_writes_the_bundle(&process).await;
    install.refuses_what_it_never_needs().await;
    // The chart's account reads the service-account signing keys: forged tokens are refused
    // with no TokenReview.
    let (_, bundle) = http_get(&format!("http://{}/debug/bundle", process.admin)).await;
    let bundle: Value = serde_json::from_str(&bundle).unwrap();
    assert_eq!(
        bundle["clusters"][0]["token_signature_check"], "local",
        "{bundle}"
    );
    // The gRPC connection cap follows the container's memory limit (256Mi by default).
    let log = std::fs::read_to_string(&process.log).unwrap();
    assert!(
        log.contains(r#""max_connections":2730"#),
        "{}",
        process.log_tail()
    );

    // Named rights, on the API server these tests run (1.20): a list selecting the name by
    // field is allowed by a resourceNames rule, a list of everything is not.
    let sa = install.sa_client().await;
    let by_name = ListParams::default().fields("metadata.name=istio-ca-root-cert");
    Api::<ConfigMap>::all(sa.clone())
        .list(&by_name)
        .await
        .expect("list by metadata.name under resourceNames [istio-ca-root-cert]");
    assert!(
        Api::<ConfigMap>::all(sa.clone())
            .list(&ListParams::default())
            .await
            .is_err()
    );
    let istiod_tls = ListParams::default().fields("metadata.name=istiod-tls");
    Api::<Secret>::namespaced(sa.clone(), &install.name)
        .list(&istiod_tls)
        .await
        .expect("list by metadata.name under resourceNames [istiod-tls]");
    assert!(
        !install
            .may("get", "", "pods", Some(&install.app_namespace), Some("x"))
            .await,
        "pods are readable without trusted node accounts"
    );
    assert!(
        !install.may("watch", "", "pods", None, None).await,
        "pods are watchable without trusted node accounts"
    );
    assert!(
        !install
            .may(
                "update",
                "coordination.k8s.io",
                "leases",
                Some(&install.name),
                Some("other")
            )
            .await,
        "other Leases are writable"
    );
    install.writes_istiod_tls(&process).await;
    // Filled in place: the same object, still Helm's and still kept on uninstall.
    let filled = secrets.get("istiod-tls").await.unwrap();
    assert_eq!(filled.metadata.uid, created.metadata.uid);
    assert_eq!(
        filled
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("helm.sh/resource-policy"))
            .map(String::as_str),
        Some("keep")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_tls_keeps_its_certificate_through_helm_upgrade_and_uninstall() {
    let name = "chart-helm-release";
    let install = Install::with_helm(name, json!({})).await;
    let is_istiod_tls = |o: &&Value| o["kind"] == "Secret" && o["metadata"]["name"] == "istiod-tls";
    assert!(
        install.objects.iter().any(|o| is_istiod_tls(&o)),
        "helm install created no istiod-tls"
    );
    let process = install.start().await;
    install.writes_istiod_tls(&process).await;
    // Stopped: nobody would repair what Helm might do to the Secret from here on.
    drop(process);
    let secrets = Api::<Secret>::namespaced(shared().await.client().await, name);
    let filled = secrets.get("istiod-tls").await.unwrap();

    let upgraded = helm_release("upgrade", name, Some(&install.values)).await;
    assert!(
        upgraded.iter().any(|o| o["kind"] == "Deployment"),
        "{upgraded:?}"
    );
    assert!(
        !upgraded.iter().any(|o| is_istiod_tls(&o)),
        "helm upgrade rendered istiod-tls over the filled one"
    );
    let after_upgrade = secrets.get("istiod-tls").await.unwrap();
    assert_eq!(after_upgrade.metadata.uid, filled.metadata.uid);
    assert_eq!(
        after_upgrade.data, filled.data,
        "helm upgrade changed the certificate"
    );

    helm_release("uninstall", name, None).await;
    let roles =
        Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(shared().await.client().await, name);
    assert!(
        roles
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "helm uninstall left the release's Roles"
    );
    let after_uninstall = secrets.get("istiod-tls").await.unwrap();
    assert_eq!(after_uninstall.metadata.uid, filled.metadata.uid);
    assert_eq!(
        after_uninstall.data, filled.data,
        "helm uninstall changed the certificate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_istiod_tls_is_left_alone_and_helm_template_renders_it_empty() {
    // As istio-csr (or an earlier install) left it: `helm install` must neither fail on it
    // (an object it does not own) nor put empty keys over its certificate.
    let name = "chart-existing-istiod-tls";
    let cluster = shared().await;
    cluster.namespace(name).await;
    let existing = json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                          "metadata": {"name": "istiod-tls", "namespace": name},
                          "stringData": {"tls.crt": "certificate", "tls.key": "key"}});
    apply_all(&cluster.client().await, &[existing], name).await;
    let dir = tempfile::tempdir().unwrap();
    let values = Install::values(name, dir.path(), json!({}));
    let is_istiod_tls = |o: &&Value| o["kind"] == "Secret" && o["metadata"]["name"] == "istiod-tls";
    let installed = render(Some(cluster), name, name, &values).await;
    assert!(
        !installed.iter().any(|o| is_istiod_tls(&o)),
        "istiod-tls rendered over an existing one"
    );
    let templated = render(None, name, name, &values).await;
    let empty = templated
        .iter()
        .find(is_istiod_tls)
        .expect("helm template renders istiod-tls (no cluster to look it up in)");
    assert_eq!(empty["data"], json!({"tls.crt": "", "tls.key": ""}));
    let kept = Api::<Secret>::namespaced(cluster.client().await, name)
        .get("istiod-tls")
        .await
        .unwrap();
    assert_eq!(kept.data.unwrap()["tls.crt"].0, b"certificate");
    // With istiodSecretCreate off, never.
    let values = Install::values(
        name,
        dir.path(),
        json!({"app": {"tls": {"istiodSecretCreate": false}}}),
    );
    let templated = render(None, name, name, &values).await;
    assert!(!templated.iter().any(|o| is_istiod_tls(&o)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_csr_and_tenant_signers_sign_with_approval_limited_to_their_names() {
    let (root, foreign) = (
        Arc::new(TestCa::root("chart kube-csr CA", KeyAlg::EcdsaP256)),
        Arc::new(TestCa::root("chart kube-csr foreign CA", KeyAlg::EcdsaP256)),
    );
    let _signer = support::csr_signer::start_csr_signer(
        shared().await.client().await,
        root.clone(),
        foreign.clone(),
    );
    // A tenant signer of its own CA (the stand-in's example.com/foreign), named through
    // the domain, open to the app namespace.
    let tenant_roots = foreign.cert_pem();
    let install = Install::new(
        "chart-kube-csr",
        json!({"app": {
            "signer": "kube-csr",
            "kubeCSR": {"signerName": "example.com/ca", "certSignerDomain": "example.com"},
            "tenants": {
                "signers": [{
                    "name": "foreign", "rootsPEM": tenant_roots,
                    "namespaces": ["chart-kube-csr-app"],
                }],
                "meshConfig": {"configMapName": "istio-mesh"},
            },
        }}),
        Some(root.clone()),
    )
    .await;
    // The mesh config's ConfigMap is the user's; the kubelet would project its key `mesh`.
    let volumes = &install.object("Deployment")["spec"]["template"]["spec"]["volumes"];
    let mesh_volume = volumes
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "mesh-config")
        .expect("no mesh-config volume");
    assert_eq!(mesh_volume["configMap"]["name"], "istio-mesh");
    assert_eq!(mesh_volume["configMap"]["items"][0]["key"], "mesh");
    let mesh_dir = install.dir.path().join("tenants/mesh");
    std::fs::create_dir_all(&mesh_dir).unwrap();
    let indented = root.cert_pem().replace('\n', "\n      ");
    std::fs::write(
        mesh_dir.join("mesh.yaml"),
        format!(
            "caCertificates:\n  - pem: |\n      {indented}\n    certSigners: [example.com/ca]\n"
        ),
    )
    .unwrap();
    assert_eq!(
        install.arg("--mesh-config"),
        Some(format!(
            "{}/tenants/mesh/mesh.yaml",
            install.dir.path().display()
        ))
    );
    assert_eq!(
        install.arg("--signers-file"),
        Some(format!(
            "{}/tenants/signers/signers.yaml",
            install.dir.path().display()
        ))
    );
    assert!(
        install.arg("--certificate-namespace").is_none(),
        "cert-manager flags with kube-csr"
    );
    assert!(
        install
            .objects_of("Role")
            .iter()
            .all(|r| !r["metadata"]["name"]
                .as_str()
                .unwrap()
                .ends_with("-certificates")),
        "CertificateRequest rights with kube-csr"
    );
    let process = install.start().await;
    install.signs_a_workload_certificate(&process).await;
    // CertSigner "foreign": its own CA, answered with exactly its roots; "ca" comes from the
    // mesh config alone.
    for (signer, ca) in [("foreign", &foreign), ("ca", &root)] {
        let chain = install.request_with_signer(&process, signer).await;
        let last = istio_csr_rs::pki::pem::parse_certificates(chain.last().unwrap().as_bytes());
        assert_eq!(
            last.unwrap(),
            vec![ca.cert.clone()],
            "the roots of {signer}"
        );
    }
    install.leads_and_writes_the_bundle(&process).await;
    install.refuses_what_it_never_needs().await;
    assert!(
        install
            .may(
                "approve",
                "certificates.k8s.io",
                "signers",
                None,
                Some("example.com/foreign")
            )
            .await,
        "may not approve for its tenant signer"
    );
    let approve = |signer: &'static str| {
        install.may(
            "approve",
            "certificates.k8s.io",
            "signers",
            None,
            Some(signer),
        )
    };
    assert!(approve("example.com/ca").await);
    assert!(
        !approve("kubernetes.io/kube-apiserver-client").await,
        "may approve for any signer"
    );
    assert!(
        !approve("example.com/other").await,
        "may approve for a signer it does not use"
    );
    // Every request it made is gone (deleted after its answer).
    let csrs = Api::<CertificateSigningRequest>::all(shared().await.client().await);
    let left = eventually(WAIT, || async {
        csrs.list(&ListParams::default().labels(&format!(
            "{}=true",
            istio_csr_rs::signer::issuer::kube_csr::REQUEST_LABEL_KEY
        )))
        .await
        .is_ok_and(|l| l.items.is_empty())
    })
    .await;
    assert!(left, "CertificateSigningRequests were left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambient_trusted_node_accounts_get_pod_rights_and_ztunnel_impersonates() {
    let name = "chart-ambient";
    let install = Install::new(
        name,
        json!({"app": {"server": {"caTrustedNodeAccounts": format!("{name}/ztunnel")}}}),
        None,
    )
    .await;
    assert_eq!(
        install.arg("--ca-trusted-node-accounts").as_deref(),
        Some("chart-ambient/ztunnel")
    );
    assert!(
        install
            .may("get", "", "pods", Some(name), Some("ztunnel-1"))
            .await
    );
    assert!(
        install
            .may("list", "", "pods", Some(&install.app_namespace), None)
            .await
    );
    // The pod cache: every pod of the cluster, listed and watched.
    for verb in ["list", "watch"] {
        assert!(
            install.may(verb, "", "pods", None, None).await,
            "{verb} pods in every namespace"
        );
    }
    assert!(
        !install
            .may("update", "", "pods", Some(name), Some("ztunnel-1"))
            .await
    );

    let cluster = shared().await;
    cluster.service_account(name, "ztunnel").await;
    let ztunnel_pod: Pod = cluster.pod(name, "ztunnel-1", "ztunnel", "node-1").await;
    cluster
        .pod(&install.app_namespace, "web-1", "web", "node-1")
        .await;
    let process = install.start().await;
    let token = cluster
        .token(name, "ztunnel", &["istio-ca"], 3600, Some(&ztunnel_pod))
        .await;
    let web = format!("spiffe://cluster.local/ns/{}/sa/web", install.app_namespace);
    let target = install.target(&process);
    let (csr, _) = p256_csr(&web);
    let request = target
        .request(
            Some(&token),
            istio_csr_rs::proto::istio_v1_auth::IstioCertificateRequest {
                csr,
                validity_duration: 3600,
                metadata: Some(istio_csr_rs::client::metadata(None, Some(&web))),
            },
        )
        .unwrap();
    let chain = target
        .connect()
        .await
        .unwrap()
        .create_certificate(request)
        .await
        .unwrap_or_else(|s| panic!("ztunnel was refused: {s}\n{}", process.log_tail()))
        .into_inner()
        .cert_chain;
    assert_eq!(leaf_identity(&chain).0, vec![web]);
    install.leads_and_writes_the_bundle(&process).await;
    install.refuses_what_it_never_needs().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_issuer_configmap_from_values_is_the_issuer_in_force() {
    let name = "chart-runtime";
    // The static issuer denies everything: only the runtime one can sign.
    let install = Install::new(
        name,
        json!({"app": {
            "certmanager": {"issuer": {"name": "deny-issuer"}},
            "runtimeConfiguration": {"create": true, "issuer": {"name": SIGNING_ISSUER}},
        }}),
        None,
    )
    .await;
    let config_map = format!("{name}-istio-csr-rs-issuer");
    assert_eq!(
        install.arg("--runtime-issuance-config-map-name"),
        Some(config_map.clone())
    );
    assert_eq!(
        install
            .arg("--runtime-issuance-config-map-namespace")
            .as_deref(),
        Some(name)
    );
    let created = Api::<ConfigMap>::namespaced(shared().await.client().await, name)
        .get(&config_map)
        .await
        .expect("the chart creates the runtime ConfigMap");
    assert_eq!(created.data.unwrap()["issuer-name"], SIGNING_ISSUER);
    assert!(
        install
            .may("watch", "", "configmaps", Some(name), Some(&config_map))
            .await
    );
    assert!(
        !install
            .may("get", "", "configmaps", Some(name), Some("other"))
            .await
    );
    assert!(
        !install
            .may("update", "", "configmaps", Some(name), Some(&config_map))
            .await,
        "may change its own issuer"
    );

    let process = install.start().await;
    install.signs_a_workload_certificate(&process).await;
    install.leads_and_writes_the_bundle(&process).await;
    install.refuses_what_it_never_needs().await;
    install.writes_istiod_tls(&process).await;

    // istio-csr's app.certmanager.issuer.enabled=false: only the ConfigMap names an issuer.
    let values = Install::values(
        name,
        install.dir.path(),
        json!({"app": {
            "certmanager": {"issuer": {"enabled": false}},
            "runtimeConfiguration": {"create": true},
        }}),
    );
    let objects = render(None, name, name, &values).await;
    let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        args.as_array()
            .unwrap()
            .contains(&json!("--issuer-enabled=false")),
        "{args}"
    );
}

/// A second cluster with its own etcd, kept for the life of the test binary like the shared one:
/// the harness stops a cluster's processes cleanly when the test process exits, whereas
/// dropping a `TestCluster` kills only its guard shells and leaves kube-apiserver running.
async fn remote_cluster() -> &'static TestCluster {
    static REMOTE: tokio::sync::OnceCell<TestCluster> = tokio::sync::OnceCell::const_new();
    REMOTE.get_or_init(TestCluster::start).await
}

/// One access review and its expected answer: verb, API group, resource, namespace, name,
/// allowed.
type Access<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    bool,
);

/// The remote credential (deploy/multicluster/remote-rbac.yaml, applied in `remote`) may do
/// exactly what the agent does there (src/bundle/reconciler.rs, src/signer/authn/): ConfigMaps
/// only istio-ca-root-cert by name, plus the create Kubernetes cannot name; no Secret at all.
/// Checked by access reviews with exact answers, and by a real write of kube-system/coredns
/// with the credential's own token.
async fn remote_rbac_is_limited_to_what_the_agent_does(remote: &TestCluster) {
    let admin = remote.client().await;
    remote.namespace("kube-system").await;
    let coredns = json!({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "coredns", "namespace": "kube-system"},
                         "data": {"Corefile": ".:53 { forward . /etc/resolv.conf }"}});
    apply_all(&admin, &[coredns], "kube-system").await;
    let account = ("istio-system", "istio-csr-rs-remote");
    let ks = Some("kube-system");
    let any_ns = Some("chart-remote-remote-app");
    let bundle = Some("istio-ca-root-cert");
    #[rustfmt::skip]
    let expected: &[Access] = &[
        // The bundle: the list and watch select metadata.name; writes replace it whole.
        ("list", "", "configmaps", None, bundle, true),
        ("watch", "", "configmaps", None, bundle, true),
        ("update", "", "configmaps", any_ns, bundle, true),
        ("create", "", "configmaps", any_ns, None, true),
        ("get", "", "configmaps", any_ns, bundle, false),
        ("patch", "", "configmaps", any_ns, bundle, false),
        ("delete", "", "configmaps", any_ns, bundle, false),
        ("list", "", "configmaps", None, None, false),
        ("watch", "", "configmaps", None, None, false),
        // Any other ConfigMap, e.g. the cluster's DNS.
        ("get", "", "configmaps", ks, Some("coredns"), false),
        ("update", "", "configmaps", ks, Some("coredns"), false),
        ("patch", "", "configmaps", ks, Some("coredns"), false),
        ("delete", "", "configmaps", ks, Some("coredns"), false),
        ("update", "", "configmaps", ks, Some("aws-auth"), false),
        ("list", "", "namespaces", None, None, true),
        ("watch", "", "namespaces", None, None, true),
        ("get", "", "namespaces", None, Some("kube-system"), false),
        ("create", "authentication.k8s.io", "tokenreviews", None, None, true),
        // ztunnel's node check.
        ("get", "", "pods", any_ns, Some("x"), true),
        ("list", "", "pods", None, None, true),
        ("watch", "", "pods", None, None, true),
        ("update", "", "pods", any_ns, Some("x"), false),
        // No Secret: not its own token's, not any other.
        ("get", "", "secrets", Some("istio-system"), Some("istio-csr-rs-remote-token"), false),
        ("list", "", "secrets", None, None, false),
        ("create", "", "secrets", Some("istio-system"), None, false),
    ];
    let mut wrong = Vec::new();
    for &(verb, group, resource, namespace, name, allowed) in expected {
        if may_in(&admin, account, verb, group, resource, namespace, name).await != allowed {
            wrong.push(format!(
                "{verb} {resource} {namespace:?}/{name:?}: want allowed={allowed}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "remote-rbac.yaml grants other rights than the agent uses:\n{}",
        wrong.join("\n")
    );
    // The same credential, for real: coredns cannot be replaced.
    let token = remote
        .token(account.0, account.1, &[SA_ISSUER], 600, None)
        .await;
    let as_remote = remote.client_with_token(&token).await;
    let mut changed: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "coredns", "namespace": "kube-system"},
        "data": {"Corefile": ".:53 { forward . 192.0.2.1 }"}}))
    .unwrap();
    changed.metadata.resource_version = Api::<ConfigMap>::namespaced(admin.clone(), "kube-system")
        .get("coredns")
        .await
        .unwrap()
        .metadata
        .resource_version;
    let refused = Api::<ConfigMap>::namespaced(as_remote, "kube-system")
        .replace("coredns", &PostParams::default(), &changed)
        .await;
    assert!(
        matches!(refused, Err(::kube::Error::Api(ref e)) if e.code == 403),
        "replacing kube-system/coredns with the remote credential: {refused:?}"
    );
}

/// Runs deploy/multicluster/make-remote-secret.sh against `remote` (its admin kubeconfig,
/// context `test`) with `extra` arguments; the child, still running.
fn make_remote_secret(remote: &TestCluster, namespace: &str, extra: &[&str]) -> Child {
    Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/multicluster/make-remote-secret.sh"
        ))
        .args(["--context", "test", "--cluster-id", "remote-1"])
        .args(["--namespace", namespace])
        .args(extra)
        .env("KUBECONFIG", &remote.kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash must be installed")
}

/// The remote Secret as deploy/multicluster/README.md makes it, right after remote-rbac.yaml
/// was applied in `remote`. The test apiserver runs no token controller: the test plays it,
/// filling the token Secret a while after the script started, as the real one does about a
/// second after the apply. Before that, a short `--wait` must fail saying what to do.
async fn remote_secret_from_the_script(remote: &TestCluster, namespace: &str) -> Value {
    use base64::Engine as _;
    let impatient = make_remote_secret(remote, namespace, &["--wait", "1"]);
    let out = tokio::task::spawn_blocking(move || impatient.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "Secret istio-system/istio-csr-rs-remote-token in test has no token after 1s: is \
             the controller-manager (its token controller) running there? Retry in a moment"
        ),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    let mut patient = make_remote_secret(remote, namespace, &[]);
    // The token controller's delay: the script must still be waiting after it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        patient.try_wait().unwrap().is_none(),
        "make-remote-secret.sh did not wait for the token"
    );
    let token = remote
        .token(
            "istio-system",
            "istio-csr-rs-remote",
            &[SA_ISSUER],
            3600,
            None,
        )
        .await;
    let admin = ::kube::config::Kubeconfig::read_from(&remote.kubeconfig).unwrap();
    let ca = admin.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.certificate_authority_data.clone())
        .expect("the harness kubeconfig carries its CA");
    let b64 = base64::engine::general_purpose::STANDARD;
    let filled = json!({"data": {"token": b64.encode(&token), "ca.crt": ca}});
    Api::<Secret>::namespaced(remote.client().await, "istio-system")
        .patch(
            "istio-csr-rs-remote-token",
            &PatchParams::default(),
            &Patch::Merge(&filled),
        )
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || patient.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &out.stdout).unwrap();
    let mut objects = yaml_objects(file.path().to_str().unwrap()).await;
    assert_eq!(objects.len(), 1, "{objects:?}");
    objects.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_cluster_secrets_are_read_in_their_namespace_only_and_remotes_are_served() {
    let name = "chart-remote";
    // By default the remote-cluster Secrets have a namespace of their own, the binary's too.
    let defaults = render(
        None,
        name,
        name,
        &json!({"app": {"multicluster": {"enabled": true}}}),
    )
    .await;
    let reads_secrets: Vec<&Value> = defaults
        .iter()
        .filter(|o| o["kind"] == "Role" && o["rules"][0]["resources"] == json!(["secrets"]))
        .collect();
    let mut namespaces: Vec<&str> = reads_secrets
        .iter()
        .map(|r| r["metadata"]["namespace"].as_str().unwrap())
        .collect();
    namespaces.sort_unstable();
    // The remote-cluster Secrets' namespace, and istiod's for istiod-tls by name.
    assert_eq!(namespaces, ["istio-csr-rs-remotes", "istio-system"]);
    let args = &defaults.iter().find(|o| o["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"]
        ["containers"][0]["args"];
    assert!(
        args.as_array().unwrap().contains(&json!(
            "--multicluster-secret-namespace=istio-csr-rs-remotes"
        )),
        "{args}"
    );
    let secrets_namespace = format!("{name}-remotes");
    let admin = shared().await.client().await;
    shared().await.namespace(&secrets_namespace).await;
    let install = Install::new(
        name,
        json!({"app": {"multicluster": {"enabled": true, "secretNamespace": secrets_namespace}}}),
        None,
    )
    .await;
    // Read rights on the remote-cluster Secrets' own namespace, istiod-tls by name, nothing
    // else, and no create anywhere.
    install
        .has_only_its_own_secret_rights(true, Some(&secrets_namespace))
        .await;

    // A remote cluster with the documented remote RBAC (deploy/multicluster/remote-rbac.yaml).
    let remote = remote_cluster().await;
    let remote_admin = remote.client().await;
    let rbac = yaml_objects(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/multicluster/remote-rbac.yaml"
    ))
    .await;
    apply_all(&remote_admin, &rbac, "istio-system").await;
    remote_rbac_is_limited_to_what_the_agent_does(remote).await;
    // The primary's Secret, as the guide makes it.
    let secret = remote_secret_from_the_script(remote, &secrets_namespace).await;
    assert_eq!(secret["metadata"]["namespace"], secrets_namespace.as_str());
    apply_all(&admin, &[secret], &secrets_namespace).await;
    let remote_app = format!("{name}-remote-app");
    labelled_namespace(&remote_admin, &remote_app, json!({"chart-test": name})).await;
    remote.service_account(&remote_app, "web").await;

    let process = install.start().await;
    install.signs_a_workload_certificate(&process).await;
    install.leads_and_writes_the_bundle(&process).await;
    has_bundle(
        &remote_admin,
        &remote_app,
        &install.root.cert_pem(),
        &process,
    )
    .await;
    // A workload of the remote cluster, reviewed there.
    let token = remote
        .token(&remote_app, "web", &["istio-ca"], 3600, None)
        .await;
    let identity = format!("spiffe://cluster.local/ns/{remote_app}/sa/web");
    let target = Target {
        cluster_id: "remote-1".into(),
        ..install.target(&process)
    };
    let signed = eventually(WAIT, || async {
        request_certificate(&target, Some(&token), &identity)
            .await
            .is_ok()
    })
    .await;
    assert!(
        signed,
        "the remote cluster's workload got no certificate\n{}",
        process.log_tail()
    );
    install.refuses_what_it_never_needs().await;
    // Under the istiod-tls rights alone: Secrets of this namespace are not readable otherwise.
    install.writes_istiod_tls(&process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_istiod_certificate_off_no_secret_rights_in_istiods_namespace() {
    let name = "chart-no-istiod";
    shared().await.namespace(&format!("{name}-remotes")).await;
    let install = Install::new(
        name,
        json!({"app": {
            "tls": {"istiodCertificateEnable": false},
            "multicluster": {"enabled": true, "secretNamespace": format!("{name}-remotes")},
        }}),
        None,
    )
    .await;
    assert!(
        install
            .args()
            .contains(&"--istiod-cert-enabled=false".to_owned())
    );
    assert!(install.arg("--istiod-cert-namespace").is_none());
    assert!(
        install.objects_of("Secret").is_empty(),
        "istiod-tls rendered with the istiod certificate off"
    );
    install
        .has_only_its_own_secret_rights(false, Some(&format!("{name}-remotes")))
        .await;
    let process = install.start().await;
    install.signs_a_workload_certificate(&process).await;
    // Once the leader has done its other work, istiod-tls still does not exist.
    install.leads_and_writes_the_bundle(&process).await;
    let secret = Api::<Secret>::namespaced(shared().await.client().await, name)
        .get_opt("istiod-tls")
        .await
        .unwrap();
    assert!(
        secret.is_none(),
        "istiod-tls written with the istiod certificate off"
    );
    install.refuses_what_it_never_needs().await;
}

/// The ServiceMonitor CRD (the Prometheus Operator's), schema-less: its server-side checks are
/// not what this test is about (render.py checks the spec).
async fn install_service_monitor_crd(client: &::kube::Client) {
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com", "scope": "Namespaced",
            "names": {"kind": "ServiceMonitor", "listKind": "ServiceMonitorList",
                      "plural": "servicemonitors", "singular": "servicemonitor"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                          "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    }))
    .unwrap();
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    match api.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(::kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("installing the ServiceMonitor CRD: {e}"),
    }
    let established = tokio::time::timeout(
        WAIT,
        await_condition(
            api,
            "servicemonitors.monitoring.coreos.com",
            |crd: Option<&CustomResourceDefinition>| {
                crd.and_then(|c| c.status.as_ref())
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
            },
        ),
    )
    .await;
    assert!(
        matches!(established, Ok(Ok(_))),
        "the ServiceMonitor CRD was never established"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_objects_render_validate_apply_and_match_what_runs() {
    let name = "chart-optional";
    let admin = shared().await.client().await;
    install_service_monitor_crd(&admin).await;
    let digest = format!("sha256:{}", "ab".repeat(32));
    let install = Install::new(
        name,
        json!({
            "image": {"digest": digest},
            "imagePullSecrets": [{"name": "registry"}],
            "commonLabels": {"team": "mesh"},
            "podLabels": {"sidecar.istio.io/inject": "false"},
            "podAnnotations": {"example.com/note": "chart test"},
            "priorityClassName": "system-cluster-critical",
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": name}}}],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            "podDisruptionBudget": {"maxUnavailable": "50%"},
            "networkPolicy": {"enabled": true, "adminFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
            "app": {"metrics": {"service": {"servicemonitor": {"enabled": true, "labels": {"release": "prom"}}}}},
            "extraObjects": [
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: '{{ include \"istio-csr-rs.fullname\" . }}-extra'\n  namespace: '{{ .Release.Namespace }}'\ndata:\n  trust-domain: '{{ .Values.app.tls.trustDomain }}'\n",
            ],
        }),
        None,
    )
    .await;
    // Every object of the chart (extraObjects are the user's own) carries commonLabels.
    let extra_name = format!("{name}-istio-csr-rs-extra");
    for object in install
        .objects
        .iter()
        .filter(|o| o["metadata"]["name"] != extra_name.as_str())
    {
        assert_eq!(
            object["metadata"]["labels"]["team"], "mesh",
            "commonLabels missing on {}",
            object["kind"]
        );
    }
    let pod = &install.object("Deployment")["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"]["sidecar.istio.io/inject"],
        "false"
    );
    assert_eq!(
        install.container()["image"],
        format!("istio-csr-rs@{digest}")
    );
    let security = &install.container()["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(pod["spec"]["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["spec"]["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let pdb = install.object("PodDisruptionBudget");
    // Rendered for the cluster it is applied to, as `helm install` does: policy/v1 only from
    // Kubernetes 1.21 (the test apiserver is 1.20).
    let version = admin.apiserver_version().await.unwrap();
    let minor: u32 = version.minor.trim_end_matches('+').parse().unwrap();
    let want = if minor >= 21 {
        "policy/v1"
    } else {
        "policy/v1beta1"
    };
    assert_eq!(
        pdb["apiVersion"], want,
        "for Kubernetes {}",
        version.git_version
    );
    assert_eq!(pdb["spec"]["maxUnavailable"], "50%");
    assert!(pdb["spec"].get("minAvailable").is_none());
    let extra = Api::<ConfigMap>::namespaced(admin.clone(), name)
        .get(&extra_name)
        .await
        .expect("the templated extra object exists");
    assert_eq!(extra.data.unwrap()["trust-domain"], "cluster.local");

    // The ServiceMonitor scrapes the metrics Service, whose port is the admin listener's.
    let monitor = install.object("ServiceMonitor");
    let metrics = install
        .objects_of("Service")
        .into_iter()
        .find(|s| s["spec"]["ports"][0]["name"] == "metrics")
        .expect("a metrics Service");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &metrics["metadata"]["labels"][key], value,
            "the ServiceMonitor misses the Service on {key}"
        );
    }
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(metrics["spec"]["ports"][0]["targetPort"], "admin");
    let admin_port = install.container()["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .unwrap()["containerPort"]
        .as_u64()
        .unwrap();
    let policy = install.object("NetworkPolicy");
    assert_eq!(policy["spec"]["ingress"][1]["ports"][0]["port"], "admin");
    let process = install.start().await;
    assert_eq!(u64::from(process.admin.port()), admin_port);
    let (status, body) = process.get("/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(body.contains("# EOF"), "not OpenMetrics: {body:.200}");
}

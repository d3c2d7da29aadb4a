//! Tier 3: the node check of impersonation against a real kube-apiserver, with pods in every
//! phase and being deleted. Nothing runs the pods (there is no kubelet): they stay Pending
//! unless a test sets their phase through the status subresource, and a deleted pod with a
//! finalizer stays Terminating until the test removes the finalizer. The signer caches pods
//! (trusted node accounts are set): the last tests show what that cache saves and where the
//! API server is still asked.

mod support;

use ::kube::Api;
use ::kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use k8s_openapi::api::core::v1::Pod;
use support::ambient::{CACHE_WAIT as WAIT, Signer, signer, ztunnel_on};
use support::kube::{TestCluster, shared};
use support::kube_signer::signer_as;
use support::*;
use tonic::Code;

/// Holds deleted pods in Terminating.
const FINALIZER: &str = "istio-csr-rs.test/hold";

/// Node `kh-node-<name>` with a ztunnel (namespace `kh-<name>-system`) that the signer trusts,
/// and a pod of each of `accounts` (namespace `kh-<name>-app`); the signer's pod cache is warm.
struct WarmNode {
    signer: Signer,
    ztunnel: String,
    app: String,
    name: String,
}

impl WarmNode {
    fn id(&self, sa: &str) -> String {
        format!("spiffe://cluster.local/ns/{}/sa/{sa}", self.app)
    }
}

async fn warm_node(name: &str, accounts: &[String]) -> WarmNode {
    let cluster = shared().await;
    let (node, app) = (format!("kh-node-{name}"), format!("kh-{name}-app"));
    cluster.namespace(&app).await;
    for sa in accounts {
        cluster.service_account(&app, sa).await;
        cluster.pod(&app, &format!("{sa}-1"), sa, &node).await;
    }
    let system = format!("kh-{name}-system");
    let (signer, ztunnel) = ztunnel_on(cluster, &system, &node, &[]).await;
    let warm = WarmNode {
        signer,
        ztunnel,
        app,
        name: node,
    };
    warm.signer
        .until_cache_warm(&warm.ztunnel, &warm.id(&accounts[0]))
        .await;
    warm
}

async fn pods(cluster: &TestCluster, namespace: &str) -> Api<Pod> {
    Api::namespaced(cluster.client().await, namespace)
}

/// Sets `status.phase`, as a kubelet would.
async fn set_phase(cluster: &TestCluster, namespace: &str, name: &str, phase: &str) {
    let patch = serde_json::json!({"status": {"phase": phase}});
    let pod = pods(cluster, namespace)
        .await
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some(phase));
}

/// A pod with a finalizer, so that deleting it leaves it Terminating.
async fn held_pod(cluster: &TestCluster, namespace: &str, name: &str, sa: &str, node: &str) -> Pod {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": namespace, "finalizers": [FINALIZER]},
        "spec": {
            "serviceAccountName": sa,
            "nodeName": node,
            "containers": [{"name": "app", "image": "example.invalid/app"}]
        }
    }))
    .unwrap();
    pods(cluster, namespace)
        .await
        .create(&PostParams::default(), &pod)
        .await
        .unwrap()
}

/// Deletes a held pod: it stays, with `metadata.deletionTimestamp` set.
async fn start_deleting(cluster: &TestCluster, namespace: &str, name: &str) {
    let api = pods(cluster, namespace).await;
    api.delete(name, &DeleteParams::default()).await.unwrap();
    let pod = api.get(name).await.unwrap();
    assert!(
        pod.metadata.deletion_timestamp.is_some(),
        "{name} is Terminating"
    );
}

/// Lets a held pod go, and makes sure it is gone.
async fn release(cluster: &TestCluster, namespace: &str, name: &str) {
    let api = pods(cluster, namespace).await;
    let patch = serde_json::json!({"metadata": {"finalizers": null}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let _ = api
        .delete(name, &DeleteParams::default().grace_period(0))
        .await;
    assert!(
        api.get_opt(name).await.unwrap().is_none(),
        "{name} is still there"
    );
}

#[tokio::test]
async fn only_pending_or_running_pods_not_being_deleted_allow_impersonation() {
    let cluster = shared().await;
    for namespace in ["kh-system", "kh-app"] {
        cluster.namespace(namespace).await;
    }
    cluster.service_account("kh-system", "ztunnel").await;
    let accounts = [
        "pending",
        "running",
        "succeeded",
        "failed",
        "leaving",
        "mixed",
    ];
    for sa in accounts {
        cluster.service_account("kh-app", sa).await;
    }
    let node = "kh-node-1";
    let ztunnel_pod = cluster.pod("kh-system", "ztunnel-1", "ztunnel", node).await;
    cluster.pod("kh-app", "pending-1", "pending", node).await;
    cluster.pod("kh-app", "running-1", "running", node).await;
    set_phase(cluster, "kh-app", "running-1", "Running").await;
    cluster
        .pod("kh-app", "succeeded-1", "succeeded", node)
        .await;
    set_phase(cluster, "kh-app", "succeeded-1", "Succeeded").await;
    cluster.pod("kh-app", "failed-1", "failed", node).await;
    set_phase(cluster, "kh-app", "failed-1", "Failed").await;
    held_pod(cluster, "kh-app", "leaving-1", "leaving", node).await;
    set_phase(cluster, "kh-app", "leaving-1", "Running").await;
    start_deleting(cluster, "kh-app", "leaving-1").await;
    // One finished pod and one running: the running one is enough.
    cluster.pod("kh-app", "mixed-1", "mixed", node).await;
    set_phase(cluster, "kh-app", "mixed-1", "Succeeded").await;
    cluster.pod("kh-app", "mixed-2", "mixed", node).await;
    set_phase(cluster, "kh-app", "mixed-2", "Running").await;

    let signer = signer(
        cluster,
        &["--ca-trusted-node-accounts", "kh-system/ztunnel"],
    )
    .await;
    let ztunnel = cluster
        .token(
            "kh-system",
            "ztunnel",
            &["istio-ca"],
            3600,
            Some(&ztunnel_pod),
        )
        .await;
    let id = |sa: &str| format!("spiffe://cluster.local/ns/kh-app/sa/{sa}");
    for (sa, allowed, why) in [
        ("pending", true, "a Pending pod is bound to the node"),
        ("running", true, "a Running pod"),
        ("mixed", true, "one of its pods is Running"),
        ("succeeded", false, "its only pod has Succeeded"),
        ("failed", false, "its only pod has Failed"),
        ("leaving", false, "its only pod is being deleted"),
    ] {
        let result = signer.impersonate(&ztunnel, &id(sa)).await;
        if allowed {
            let chain = result.unwrap_or_else(|s| panic!("{why}: {s:?}"));
            assert_eq!(leaf_identity(&chain).0, vec![id(sa)], "{why}");
        } else {
            let status = result.expect_err(why);
            assert_eq!(status.code(), Code::PermissionDenied, "{why}");
        }
    }

    release(cluster, "kh-app", "leaving-1").await;
}

#[tokio::test]
async fn a_terminating_ztunnel_still_impersonates_but_a_terminated_one_cannot() {
    let cluster = shared().await;
    for namespace in ["kh-nodes", "kh-workloads"] {
        cluster.namespace(namespace).await;
    }
    cluster.service_account("kh-nodes", "ztunnel").await;
    cluster.service_account("kh-workloads", "web").await;
    let node = "kh-node-2";
    cluster.pod("kh-workloads", "web-1", "web", node).await;
    set_phase(cluster, "kh-workloads", "web-1", "Running").await;
    // Tokens are minted while the pods are fine, as the kubelet mints them.
    let leaving = held_pod(cluster, "kh-nodes", "ztunnel-leaving", "ztunnel", node).await;
    set_phase(cluster, "kh-nodes", "ztunnel-leaving", "Running").await;
    let mut finished = Vec::new();
    for name in ["ztunnel-succeeded", "ztunnel-failed"] {
        finished.push(cluster.pod("kh-nodes", name, "ztunnel", node).await);
        set_phase(cluster, "kh-nodes", name, "Running").await;
    }
    let token = |pod: Pod| async move {
        cluster
            .token("kh-nodes", "ztunnel", &["istio-ca"], 3600, Some(&pod))
            .await
    };
    let leaving_token = token(leaving).await;
    let mut finished_tokens = Vec::new();
    for pod in finished {
        finished_tokens.push(token(pod).await);
    }
    let signer = signer(cluster, &["--ca-trusted-node-accounts", "kh-nodes/ztunnel"]).await;
    let web = "spiffe://cluster.local/ns/kh-workloads/sa/web";

    // A DaemonSet rolling update: the old ztunnel serves its node until its grace period ends.
    start_deleting(cluster, "kh-nodes", "ztunnel-leaving").await;
    let chain = signer
        .impersonate(&leaving_token, web)
        .await
        .expect("a Terminating ztunnel still serves its node");
    assert_eq!(leaf_identity(&chain).0, vec![web]);

    // A ztunnel whose containers have all stopped serves nothing: its token has leaked.
    for (name, phase, token) in [
        ("ztunnel-succeeded", "Succeeded", &finished_tokens[0]),
        ("ztunnel-failed", "Failed", &finished_tokens[1]),
    ] {
        set_phase(cluster, "kh-nodes", name, phase).await;
        // Refused as soon as the signer's pod cache has seen the new phase (milliseconds).
        let refused = eventually(WAIT, || async {
            signer
                .impersonate(token, web)
                .await
                .is_err_and(|s| s.code() == Code::PermissionDenied)
        })
        .await;
        assert!(refused, "a {phase} ztunnel still impersonates");
    }

    release(cluster, "kh-nodes", "ztunnel-leaving").await;
}

#[tokio::test]
async fn a_warm_pod_cache_answers_30_impersonations_without_a_pod_get_or_list() {
    let accounts: Vec<String> = (0..30).map(|i| format!("web-{i}")).collect();
    let node = warm_node("warm", &accounts).await;
    let (signer, ztunnel, id) = (&node.signer, &node.ztunnel, |sa: &str| node.id(sa));

    let before = signer.pod_reads().await;
    let answers = futures_util::future::join_all(
        accounts
            .iter()
            .map(|sa| async { (id(sa), signer.impersonate(ztunnel, &id(sa)).await) }),
    )
    .await;
    for (identity, answer) in answers {
        let chain = answer.unwrap_or_else(|s| panic!("{identity}: {s:?}"));
        assert_eq!(leaf_identity(&chain).0, vec![identity]);
    }
    assert_eq!(
        signer.pod_reads().await,
        before,
        "pod (GET, LIST) requests during 30 impersonations on a warm cache"
    );
    assert!(
        signer.pod_requests("watch").await >= 1.0,
        "the cache watches pods"
    );
}

#[tokio::test]
async fn a_pod_created_just_now_is_accepted_before_the_cache_has_seen_it() {
    let cluster = shared().await;
    let node = warm_node("fresh", &["old".to_owned()]).await;

    // Asked for the moment the API server has it: whether or not the watch event has reached
    // the cache, the node's pods are listed again when the cache knows none of the account.
    for i in 0..5 {
        let sa = format!("new-{i}");
        cluster.service_account(&node.app, &sa).await;
        cluster
            .pod(&node.app, &format!("{sa}-1"), &sa, &node.name)
            .await;
        let chain = node
            .signer
            .impersonate(&node.ztunnel, &node.id(&sa))
            .await
            .unwrap_or_else(|s| panic!("{sa}, created just now: {s:?}"));
        assert_eq!(leaf_identity(&chain).0, vec![node.id(&sa)]);
    }
}

#[tokio::test]
async fn a_deleted_pods_identity_is_refused_once_the_cache_has_seen_the_deletion() {
    let cluster = shared().await;
    let node = warm_node("deleted", &["gone".to_owned()]).await;
    let (signer, ztunnel, gone) = (&node.signer, &node.ztunnel, node.id("gone"));

    let api = pods(cluster, &node.app).await;
    api.delete("gone-1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(api.get_opt("gone-1").await.unwrap().is_none());
    let refused = eventually(WAIT, || async {
        signer
            .impersonate(ztunnel, &gone)
            .await
            .is_err_and(|s| s.code() == Code::PermissionDenied)
    })
    .await;
    assert!(refused, "the deleted pod's identity is still handed out");
    // And it stays refused: the cache does not bring it back.
    let status = signer.impersonate(ztunnel, &gone).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_pod_cache_whose_watch_is_refused_does_not_vouch_for_a_deleted_pod() {
    let cluster = shared().await;
    let (system, app, node) = ("kh-frozen-system", "kh-frozen-app", "kh-node-frozen");
    cluster.namespace(system).await;
    cluster.namespace(app).await;
    // The agent runs as a service account that may list pods but not watch them: its pod
    // cache lists once, then every watch is refused.
    cluster.service_account(system, "agent").await;
    let admin = cluster.client().await;
    let role: k8s_openapi::api::rbac::v1::ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kh-frozen-agent"},
        "rules": [
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
             "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}
        ]
    }))
    .unwrap();
    let binding: k8s_openapi::api::rbac::v1::ClusterRoleBinding =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kh-frozen-agent"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "kh-frozen-agent"},
            "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": system}]
        }))
        .unwrap();
    Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(admin)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let agent_token = cluster.token(system, "agent", &[], 3600, None).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("agent.kubeconfig");
    cluster.kubeconfig_with_token(&kubeconfig, &agent_token);

    cluster.service_account(app, "web").await;
    cluster.pod(app, "web-1", "web", node).await;
    cluster.service_account(system, "ztunnel").await;
    let ztunnel_pod = cluster.pod(system, "ztunnel-1", "ztunnel", node).await;
    let ztunnel = cluster
        .token(system, "ztunnel", &["istio-ca"], 3600, Some(&ztunnel_pod))
        .await;
    let trusted = format!("{system}/ztunnel");
    let signer = signer_as(
        &kubeconfig,
        &[
            "--ca-trusted-node-accounts",
            &trusted,
            "--multicluster-enabled=false",
        ],
    )
    .await;
    let web = format!("spiffe://cluster.local/ns/{app}/sa/web");
    signer.impersonate(&ztunnel, &web).await.unwrap();
    // The cache has listed and its watch has been refused at least once.
    let refused_watch = eventually(WAIT, || async {
        let (_, body) = http_get(&format!("http://{}/metrics", signer.running.admin_address)).await;
        openmetrics::parse(&body).sum(
            "istio_csr_kube_api_requests_total",
            &[("verb", "watch"), ("resource", "pods"), ("code", "403")],
        ) >= 1.0
    })
    .await;
    assert!(refused_watch, "the pod watch was never refused");

    pods(cluster, app)
        .await
        .delete("web-1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(
        pods(cluster, app)
            .await
            .get_opt("web-1")
            .await
            .unwrap()
            .is_none()
    );
    // No event can tell the cache: only the API server can say the pod is gone.
    let status = signer.impersonate(&ztunnel, &web).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

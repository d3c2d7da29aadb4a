//! Tier 3: TokenReview authentication against a real kube-apiserver.

mod support;

use support::kube::shared;
use support::kube_signer::signer;
use support::*;
use tonic::Code;

#[tokio::test]
async fn a_token_minted_for_istio_ca_gets_exactly_its_identity() {
    let cluster = shared().await;
    cluster.namespace("tr-happy").await;
    cluster.service_account("tr-happy", "web").await;
    let pod = cluster.pod("tr-happy", "web-0", "web", "node-a").await;
    let token = cluster
        .token("tr-happy", "web", &["istio-ca"], 3600, Some(&pod))
        .await;
    let signer = signer(cluster, &[]).await;
    let id = "spiffe://cluster.local/ns/tr-happy/sa/web";
    let chain = signer.create(&token, id).await.unwrap();
    assert_eq!(leaf_identity(&chain).0, vec![id.to_owned()]);
    // The token does not entitle its holder to another identity.
    let other = signer
        .create(&token, "spiffe://cluster.local/ns/tr-happy/sa/admin")
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn refuses_wrong_audience_garbage_and_deleted_service_accounts() {
    let cluster = shared().await;
    cluster.namespace("tr-refuse").await;
    cluster.service_account("tr-refuse", "web").await;
    cluster.service_account("tr-refuse", "gone").await;
    let signer = signer(cluster, &[]).await;
    let id = |sa: &str| format!("spiffe://cluster.local/ns/tr-refuse/sa/{sa}");

    let wrong_audience = cluster
        .token("tr-refuse", "web", &["vault"], 3600, None)
        .await;
    let status = signer
        .create(&wrong_audience, &id("web"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "wrong audience");

    let status = signer.create("not.a.token", &id("web")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "garbage");

    let doomed = cluster
        .token("tr-refuse", "gone", &["istio-ca"], 3600, None)
        .await;
    ::kube::Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
        cluster.client().await,
        "tr-refuse",
    )
    .delete("gone", &Default::default())
    .await
    .unwrap();
    let status = signer.create(&doomed, &id("gone")).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "deleted service account"
    );
}

#[tokio::test]
async fn an_expired_token_is_unauthenticated() {
    let cluster = shared().await;
    cluster.namespace("tr-expired").await;
    cluster.service_account("tr-expired", "web").await;
    let signer = signer(cluster, &[]).await;
    let id = "spiffe://cluster.local/ns/tr-expired/sa/web";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    // The same kind of token, signed the same way, is accepted while it is valid...
    let valid = cluster
        .signed_token("tr-expired", "web", "istio-ca", now - 60, now + 600)
        .await;
    signer.create(&valid, id).await.expect("a valid token");
    // ...and refused once it has expired.
    let expired = cluster
        .signed_token("tr-expired", "web", "istio-ca", now - 7200, now - 3600)
        .await;
    let status = signer.create(&expired, id).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "expired token");
}

#[tokio::test]
async fn an_unknown_cluster_is_unauthenticated() {
    let cluster = shared().await;
    cluster.namespace("tr-cluster").await;
    cluster.service_account("tr-cluster", "web").await;
    let token = cluster
        .token("tr-cluster", "web", &["istio-ca"], 3600, None)
        .await;
    let signer = signer(cluster, &[]).await;
    let mut target = signer.target();
    target.cluster_id = "remote-1".into();
    let (csr, _) = p256_csr("spiffe://cluster.local/ns/tr-cluster/sa/web");
    let mut client = target.connect().await.unwrap();
    let status = client
        .create_certificate(pilot_agent_request(&target, Some(&token), csr, 3600))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_cached_review_makes_no_second_tokenreview() {
    let cluster = shared().await;
    cluster.namespace("tr-cache").await;
    cluster.service_account("tr-cache", "web").await;
    let token = cluster
        .token("tr-cache", "web", &["istio-ca"], 3600, None)
        .await;
    let signer = signer(cluster, &[]).await;
    let id = "spiffe://cluster.local/ns/tr-cache/sa/web";
    let reviews = || async {
        let (_, body) = http_get(&format!("http://{}/metrics", signer.running.admin_address)).await;
        let exposition = support::openmetrics::parse(&body);
        exposition.value("istio_csr_token_reviews_total", &[("result", "success")])
    };
    signer.create(&token, id).await.unwrap();
    assert_eq!(reviews().await, 1.0);
    for _ in 0..3 {
        signer.create(&token, id).await.unwrap();
    }
    assert_eq!(reviews().await, 1.0, "cache hits must not call TokenReview");
}

/// ztunnel on `node-1` asks for the certificates of the pods on its node.
#[tokio::test]
async fn ztunnel_gets_identities_of_pods_on_its_node_only() {
    let cluster = shared().await;
    for namespace in ["imp-system", "imp-app"] {
        cluster.namespace(namespace).await;
    }
    cluster.service_account("imp-system", "ztunnel").await;
    cluster.service_account("imp-system", "intruder").await;
    for sa in ["web", "db", "batch"] {
        cluster.service_account("imp-app", sa).await;
    }
    let ztunnel_pod = cluster
        .pod("imp-system", "ztunnel-1", "ztunnel", "node-1")
        .await;
    let intruder_pod = cluster
        .pod("imp-system", "intruder-1", "intruder", "node-1")
        .await;
    cluster.pod("imp-app", "web-1", "web", "node-1").await;
    cluster.pod("imp-app", "db-1", "db", "node-2").await;
    cluster.pod("imp-app", "batch-1", "batch", "node-1").await;
    // batch-1 has failed: it no longer counts as running there.
    ::kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.client().await, "imp-app")
        .patch_status(
            "batch-1",
            &::kube::api::PatchParams::default(),
            &::kube::api::Patch::Merge(&serde_json::json!({"status": {"phase": "Failed"}})),
        )
        .await
        .unwrap();
    let signer = signer(
        cluster,
        &["--ca-trusted-node-accounts", "imp-system/ztunnel"],
    )
    .await;
    let ztunnel = cluster
        .token(
            "imp-system",
            "ztunnel",
            &["istio-ca"],
            3600,
            Some(&ztunnel_pod),
        )
        .await;
    let unbound = cluster
        .token("imp-system", "ztunnel", &["istio-ca"], 3600, None)
        .await;
    let intruder = cluster
        .token(
            "imp-system",
            "intruder",
            &["istio-ca"],
            3600,
            Some(&intruder_pod),
        )
        .await;

    let impersonate = |token: String, identity: &'static str| {
        let target = signer.target();
        async move {
            let (csr, _) = p256_csr(identity);
            let request = target
                .request(
                    Some(&token),
                    istio_csr_rs::proto::istio_v1_auth::IstioCertificateRequest {
                        csr,
                        validity_duration: 3600,
                        metadata: Some(istio_csr_rs::client::metadata(None, Some(identity))),
                    },
                )
                .unwrap();
            let mut client = target.connect().await.unwrap();
            client
                .create_certificate(request)
                .await
                .map(|r| r.into_inner().cert_chain)
        }
    };
    let web = "spiffe://cluster.local/ns/imp-app/sa/web";
    let chain = impersonate(ztunnel.clone(), web)
        .await
        .expect("a pod of web is on node-1");
    assert_eq!(leaf_identity(&chain).0, vec![web]);

    for (token, identity, why) in [
        (
            ztunnel.clone(),
            "spiffe://cluster.local/ns/imp-app/sa/db",
            "db runs on node-2 only",
        ),
        (
            ztunnel.clone(),
            "spiffe://cluster.local/ns/imp-app/sa/batch",
            "batch's pod has failed",
        ),
        (
            ztunnel.clone(),
            "spiffe://cluster.local/ns/imp-app/sa/nobody",
            "no such pods",
        ),
        (
            ztunnel.clone(),
            "spiffe://other.domain/ns/imp-app/sa/web",
            "another trust domain",
        ),
        (unbound, web, "the token is bound to no pod"),
        (intruder, web, "not a trusted node account"),
    ] {
        let status = impersonate(token, identity).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{why}");
    }
}

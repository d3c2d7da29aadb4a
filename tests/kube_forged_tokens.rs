//! Tier 3: forged credentials cost the API server nothing. Random bytes, well-formed JWTs that
//! no review could accept (expired, another audience, another issuer) and tokens with the
//! cluster's own claims but a signature none of its keys made are refused before any
//! TokenReview; the signer's keys are followed through a rotation; a token the API server
//! refused once is not reviewed again; real tokens keep working. A client certificate no
//! longer renews once its service account is deleted.

mod support;

use base64::Engine;
use support::cert_manager::{cert_manager_server, cert_manager_server_with, target_for};
use support::kube::{SA_ISSUER, shared};
use support::*;
use tonic::Code;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWT shaped like a service-account token, with a signature nobody made.
fn forged(claims: serde_json::Value) -> String {
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","kid":"forged"}"#),
        b64(claims.to_string().as_bytes()),
        b64(&[7u8; 256])
    )
}

fn random_token(i: usize) -> String {
    let mut bytes = [0u8; 48];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    // Some look like base64, some like hex, some carry dots: none is a JWS.
    match i % 3 {
        0 => base64::engine::general_purpose::STANDARD.encode(bytes),
        1 => hex::encode(bytes),
        _ => format!("{}.{}", b64(&bytes[..24]), b64(&bytes[24..])),
    }
}

#[tokio::test]
async fn forged_tokens_cost_no_token_review_and_real_ones_still_work() {
    let ns = "forged-tokens";
    let (running, dir, _root, _fixture) = cert_manager_server(ns).await;
    let cluster = shared().await;
    cluster.service_account(ns, "web").await;
    let id = format!("spiffe://cluster.local/ns/{ns}/sa/web");
    let target = target_for(&running, &dir);
    let reviews = || token_reviews(running.admin_address);

    // A real token first: reviewed once, and the cluster's issuer is now known.
    let real = cluster.token(ns, "web", &["istio-ca"], 3600, None).await;
    request_certificate(&target, Some(&real), &id)
        .await
        .unwrap();
    assert_eq!(reviews().await, 1.0);

    // The forged JWTs come first: a token of a new issuer may be reviewed once per 10 s per
    // cluster (an issuer migration), and this keeps them well inside that window.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut hostile: Vec<String> = Vec::new();
    for i in 0..100 {
        let sub = format!("system:serviceaccount:{ns}:web");
        hostile.push(forged(match i % 3 {
            0 => serde_json::json!({"iss": SA_ISSUER, "aud": ["istio-ca"], "sub": sub,
                                    "exp": now - 3600 - i, "iat": now - 7200}),
            1 => serde_json::json!({"iss": SA_ISSUER, "aud": ["kubernetes"], "sub": sub,
                                    "exp": now + 3600, "iat": now}),
            _ => serde_json::json!({"iss": format!("https://attacker-{i}.example"),
                                    "aud": ["istio-ca"], "sub": sub,
                                    "exp": now + 3600, "iat": now}),
        }));
    }
    hostile.extend((0..300).map(random_token));
    let mut client = target.connect().await.unwrap();
    for token in &hostile {
        let (csr, _) = p256_csr(&id);
        let status = client
            .create_certificate(pilot_agent_request(&target, Some(token), csr, 3600))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert_eq!(reviews().await, 1.0, "forged tokens reached the API server");

    // A real token with its signature broken: refused by the local signature check.
    // Another lifetime: two TokenRequests alike within one second give the same token.
    let other = cluster.token(ns, "web", &["istio-ca"], 3599, None).await;
    assert_ne!(other, real);
    let (unsigned, _) = other.rsplit_once('.').unwrap();
    let broken = format!("{unsigned}.{}", b64(&[1u8; 256]));
    for _ in 0..5 {
        let status = request_certificate(&target, Some(&broken), &id)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert_eq!(reviews().await, 1.0, "a broken signature was reviewed");

    // A well-formed, well-signed token the API server refuses (its service account was
    // deleted): reviewed once, then remembered.
    cluster.service_account(ns, "gone").await;
    let revoked = cluster.token(ns, "gone", &["istio-ca"], 3600, None).await;
    delete_service_account(cluster, ns, "gone").await;
    let gone = format!("spiffe://cluster.local/ns/{ns}/sa/gone");
    for _ in 0..5 {
        let status = request_certificate(&target, Some(&revoked), &gone)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert_eq!(reviews().await, 2.0, "a refused token was reviewed again");

    // Real tokens still work: the cached one without a review, a new one with one.
    request_certificate(&target, Some(&real), &id)
        .await
        .unwrap();
    request_certificate(&target, Some(&other), &id)
        .await
        .unwrap();
    assert_eq!(reviews().await, 3.0);

    let (_, body) = http_get(&format!("http://{}/metrics", running.admin_address)).await;
    let metrics = openmetrics::parse(&body);
    let avoided = |reason: &str| {
        metrics.value(
            "istio_csr_token_reviews_avoided_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(avoided("not-jws"), 300.0);
    assert_eq!(avoided("expired"), 34.0);
    assert_eq!(avoided("audience"), 33.0);
    // Another issuer's forged tokens name a key the cluster never published.
    assert_eq!(avoided("unknown-key"), 33.0);
    assert_eq!(avoided("signature"), 5.0);
    assert_eq!(avoided("remembered"), 4.0);
}

async fn delete_service_account(cluster: &support::kube::TestCluster, ns: &str, name: &str) {
    use k8s_openapi::api::core::v1::ServiceAccount;
    ::kube::Api::<ServiceAccount>::namespaced(cluster.client().await, ns)
        .delete(name, &Default::default())
        .await
        .unwrap();
}

/// The JOSE header of a compact JWS.
fn header_of(token: &str) -> serde_json::Value {
    let header = token.split('.').next().unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    serde_json::from_slice(&json).unwrap()
}

/// `claims` under `header`, with a signature nobody made.
fn forged_with(header: serde_json::Value, claims: &serde_json::Value, i: usize) -> String {
    let mut signature = [0u8; 256];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut signature).unwrap();
    // Some keep the length of a real RS256 signature, some do not.
    let len = if i % 2 == 0 { 256 } else { 64 };
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(&signature[..len])
    )
}

async fn bundle_clusters(admin: std::net::SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = http_get(&format!("http://{admin}/debug/bundle")).await;
    assert_eq!(status, 200, "{body}");
    let bundle: serde_json::Value = serde_json::from_str(&body).unwrap();
    bundle["clusters"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn tokens_with_the_clusters_claims_but_a_forged_signature_cost_no_token_review() {
    let ns = "forged-signatures";
    let (running, dir, _root, _fixture) = cert_manager_server(ns).await;
    let cluster = shared().await;
    cluster.service_account(ns, "web").await;
    let id = format!("spiffe://cluster.local/ns/{ns}/sa/web");
    let target = target_for(&running, &dir);
    let metric = |name: &'static str, labels: &'static [(&'static str, &'static str)]| {
        let admin = running.admin_address;
        async move {
            let (_, body) = http_get(&format!("http://{admin}/metrics")).await;
            openmetrics::parse(&body).value(name, labels)
        }
    };
    let reviews = || token_reviews(running.admin_address);
    let local = eventually(std::time::Duration::from_secs(30), || async {
        bundle_clusters(running.admin_address).await[0]["token_signature_check"] == "local"
    })
    .await;
    assert!(
        local,
        "the local cluster's keys were never fetched: {:?}",
        bundle_clusters(running.admin_address).await
    );

    // A real token: one review, and its header names the cluster's key.
    let real = cluster.token(ns, "web", &["istio-ca"], 3600, None).await;
    request_certificate(&target, Some(&real), &id)
        .await
        .unwrap();
    assert_eq!(reviews().await, 1.0);
    let kid = header_of(&real)["kid"].as_str().unwrap().to_owned();

    // 200 tokens, each different, with everything a real one has but its signature: the
    // cluster's key ID, none, an unknown one, or HMAC "signed" under the real key's ID.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut hostile = Vec::new();
    for i in 0..200 {
        let claims = serde_json::json!({
            "iss": SA_ISSUER, "aud": ["istio-ca"], "exp": now + 3600, "iat": now, "nbf": now,
            "sub": format!("system:serviceaccount:{ns}:sa-{i}"),
            "jti": format!("forged-{i}"),
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": format!("sa-{i}"),
                              "uid": format!("00000000-0000-0000-0000-{i:012}")}},
        });
        let header = match i % 4 {
            0 => serde_json::json!({"alg": "RS256", "kid": kid}),
            1 => serde_json::json!({"alg": "RS256"}),
            2 => serde_json::json!({"alg": "HS256", "kid": kid}),
            _ => serde_json::json!({"alg": "RS256", "kid": format!("made-up-{i}")}),
        };
        hostile.push(forged_with(header, &claims, i));
    }
    // Key fetches: the discovery document and the key set, the agent's only GETs outside
    // the API's resources.
    let fetches = || {
        metric(
            "istio_csr_kube_api_requests_total",
            &[("code", "200"), ("resource", "other"), ("verb", "list")],
        )
    };
    let fetched = fetches().await;
    let started = std::time::Instant::now();
    let mut client = target.connect().await.unwrap();
    for token in &hostile {
        let (csr, _) = p256_csr(&id);
        let status = client
            .create_certificate(pilot_agent_request(&target, Some(token), csr, 3600))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert_eq!(
        reviews().await,
        1.0,
        "forged signatures reached the API server"
    );
    let avoided = |reason: &'static str| async move {
        let (_, body) = http_get(&format!("http://{}/metrics", running.admin_address)).await;
        openmetrics::parse(&body).value(
            "istio_csr_token_reviews_avoided_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(avoided("signature").await, 150.0);
    assert_eq!(avoided("unknown-key").await, 50.0);
    // 50 made-up key IDs refetch the keys at most once per 10 s (two GETs each time).
    let intervals = (started.elapsed().as_secs() / 10 + 1) as f64;
    let refetched = fetches().await - fetched;
    assert!(
        refetched <= 2.0 * intervals,
        "{refetched} key fetches in {:?}",
        started.elapsed()
    );

    // A real token still costs exactly one review.
    let other = cluster.token(ns, "web", &["istio-ca"], 3599, None).await;
    request_certificate(&target, Some(&other), &id)
        .await
        .unwrap();
    assert_eq!(reviews().await, 2.0);
}

#[tokio::test]
async fn a_rotation_of_the_service_account_signer_is_followed() {
    // A cluster of its own: its apiserver restarts with a new signing key.
    let mut cluster = support::kube::TestCluster::start().await;
    let ns = "rotation";
    cluster.namespace(ns).await;
    cluster.service_account(ns, "web").await;
    let signer = support::kube_signer::signer(&cluster, &[]).await;
    let admin = signer.running.admin_address;
    let id = format!("spiffe://cluster.local/ns/{ns}/sa/web");
    let reviews = || token_reviews(admin);
    let before = cluster.token(ns, "web", &["istio-ca"], 3600, None).await;
    signer.create(&before, &id).await.unwrap();
    assert_eq!(reviews().await, 1.0);
    assert_eq!(
        bundle_clusters(admin).await[0]["token_signature_check"],
        "local"
    );

    cluster.rotate_signing_key().await;
    let after = cluster.token(ns, "web", &["istio-ca"], 3600, None).await;
    let (old, new) = (header_of(&before), header_of(&after));
    assert_eq!(new["alg"], "ES256", "{new}");
    assert_ne!(new["kid"], old["kid"]);

    // The new key ID is unknown to the agent until it refetches the keys, which a token
    // naming it triggers (at most every 10 s per cluster: the last fetch may be that recent).
    let accepted = eventually(std::time::Duration::from_secs(60), || async {
        signer.create(&after, &id).await.is_ok()
    })
    .await;
    assert!(
        accepted,
        "a token of the new signing key was never accepted"
    );
    assert_eq!(
        reviews().await,
        2.0,
        "refusals before the refetch cost reviews"
    );

    // A forgery naming the new key is refused without a review; tokens of the old key, still
    // published, keep working.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = serde_json::json!({"iss": SA_ISSUER, "aud": ["istio-ca"], "exp": now + 600,
                                    "sub": format!("system:serviceaccount:{ns}:web")});
    let forgery = forged_with(
        serde_json::json!({"alg": "ES256", "kid": new["kid"]}),
        &claims,
        1,
    );
    let status = signer.create(&forgery, &id).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let signed_by_old = cluster
        .signed_token(ns, "web", "istio-ca", now, now + 600)
        .await;
    signer.create(&signed_by_old, &id).await.unwrap();
    assert_eq!(reviews().await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_tokens_to_review_does_not_starve_the_lease_renewals() {
    let ns = "token-flood";
    // A tight API budget (10 calls/s per bucket; a Lease try costs a read and a write, so the
    // renewals alone use 4/s) and a Lease lost after 2 s without a renewal: if the reviews
    // shared the Lease's bucket, the flood would cost the leadership.
    let (running, dir, _root, _fixture) = cert_manager_server_with(
        ns,
        true,
        &[
            // The 40 callers below each open a connection per call, all from 127.0.0.1.
            "--max-connections-per-source",
            "256",
            "--kube-api-qps",
            "10",
            "--kube-api-burst",
            "10",
            "--leader-election-namespace",
            ns,
            "--multicluster-secret-namespace",
            ns,
            "--leader-election-lease-duration",
            "3s",
            "--leader-election-renew-deadline",
            "2s",
            "--leader-election-retry-period",
            "500ms",
        ],
    )
    .await;
    let metric = |name: &'static str, labels: &'static [(&'static str, &'static str)]| {
        let admin = running.admin_address;
        async move {
            let (_, body) = http_get(&format!("http://{admin}/metrics")).await;
            openmetrics::parse(&body).value(name, labels)
        }
    };
    let leading = eventually(std::time::Duration::from_secs(30), || async {
        metric("istio_csr_leader_is_leader", &[]).await == 1.0
    })
    .await;
    assert!(leading, "never became leader");
    let waited_before = metric("istio_csr_kube_api_rate_limit_wait_seconds_total", &[]).await;
    let lost_before = metric("istio_csr_leader_transitions_total", &[("event", "lost")]).await;

    // Well-formed tokens, each new, each needing a review the API server will refuse: 40
    // callers for 6 s, far beyond the review budget.
    let id = format!("spiffe://cluster.local/ns/{ns}/sa/web");
    let target = target_for(&running, &dir);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(6);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..40 {
        let (target, id) = (target.clone(), id.clone());
        callers.spawn(async move {
            let mut refused = 0u32;
            let mut n = 0;
            while tokio::time::Instant::now() < deadline {
                n += 1;
                // Signed with the cluster's key: only the review finds the account missing.
                let token = shared().await.sign_claims(&serde_json::json!({
                    "iss": SA_ISSUER, "aud": ["istio-ca"], "exp": now + 3600, "iat": now,
                    "sub": format!("system:serviceaccount:{ns}:flood-{caller}-{n}"),
                }));
                if request_certificate(&target, Some(&token), &id)
                    .await
                    .is_err()
                {
                    refused += 1;
                }
            }
            refused
        });
    }
    let mut refused = 0;
    while let Some(count) = callers.join_next().await {
        refused += count.unwrap();
    }
    assert!(refused > 0);
    let waited = metric("istio_csr_kube_api_rate_limit_wait_seconds_total", &[]).await;
    assert!(
        waited - waited_before > 1.0,
        "the flood never reached the review rate limit ({} s waited)",
        waited - waited_before
    );
    assert_eq!(metric("istio_csr_leader_is_leader", &[]).await, 1.0);
    assert_eq!(
        metric("istio_csr_leader_transitions_total", &[("event", "lost")]).await,
        lost_before,
        "leadership was lost during the flood"
    );
}

/// A channel to `signer` presenting `identity` as its client certificate.
async fn mtls_channel(
    signer: &support::kube_signer::Signer,
    identity: tonic::transport::Identity,
) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let roots = std::fs::read(signer.target().root_cert).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(roots))
        .domain_name("localhost")
        .identity(identity);
    Channel::from_shared(format!("https://{}", signer.running.grpc_address))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_client_certificate_no_longer_renews_once_its_service_account_is_deleted() {
    use istio_csr_rs::proto::istio_v1_auth::istio_certificate_service_client::IstioCertificateServiceClient;
    let ns = "deleted-accounts";
    let cluster = shared().await;
    cluster.namespace(ns).await;
    let signer =
        support::kube_signer::signer(cluster, &["--enable-client-cert-authenticator"]).await;
    let target = signer.target();
    // A certificate for each of two accounts, obtained with their tokens.
    let mut clients = Vec::new();
    for name in ["kept", "deleted"] {
        cluster.service_account(ns, name).await;
        let id = format!("spiffe://cluster.local/ns/{ns}/sa/{name}");
        let token = cluster.token(ns, name, &["istio-ca"], 3600, None).await;
        let (csr, key) = p256_csr(&id);
        let chain = target
            .connect()
            .await
            .unwrap()
            .create_certificate(pilot_agent_request(&target, Some(&token), csr, 3600))
            .await
            .unwrap()
            .into_inner()
            .cert_chain;
        let identity = tonic::transport::Identity::from_pem(
            chain[..chain.len() - 1].concat(),
            key.serialize_pem(),
        );
        let client = IstioCertificateServiceClient::new(mtls_channel(&signer, identity).await);
        clients.push((id, client));
    }
    delete_service_account(cluster, ns, "deleted").await;

    let [(kept_id, mut kept), (deleted_id, mut deleted)] =
        <[_; 2]>::try_from(clients).ok().unwrap();
    let (csr, _) = p256_csr(&kept_id);
    let renewed = kept
        .create_certificate(pilot_agent_request(&target, None, csr, 3600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leaf_identity(&renewed.cert_chain).0, vec![kept_id]);
    let (csr, _) = p256_csr(&deleted_id);
    let status = deleted
        .create_certificate(pilot_agent_request(&target, None, csr, 3600))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn where_the_keys_cannot_be_fetched_every_token_goes_to_token_review_as_before() {
    use ::kube::api::PostParams;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let cluster = shared().await;
    let ns = "no-discovery";
    cluster.namespace(ns).await;
    cluster.service_account(ns, "web").await;
    // The agent runs as a user that may review tokens and nothing else (not a service
    // account, which a default binding may let read the issuer discovery documents).
    let user = "istio-csr-no-discovery";
    let admin = cluster.client().await;
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": {"name": user},
        "rules": [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
                   "verbs": ["create"]}]
    }))
    .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": user},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))
    .unwrap();
    ::kube::Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    ::kube::Api::<ClusterRoleBinding>::all(admin)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("impersonating.kubeconfig");
    let admin_config = std::fs::read_to_string(&cluster.kubeconfig).unwrap();
    let token_line = format!("    token: {}\n", cluster.admin_token);
    assert!(admin_config.contains(&token_line));
    std::fs::write(
        &kubeconfig,
        admin_config.replace(&token_line, &format!("{token_line}    as: {user}\n")),
    )
    .unwrap();
    let signer =
        support::kube_signer::signer_as(&kubeconfig, &["--multicluster-enabled=false"]).await;
    let admin_address = signer.running.admin_address;
    let unavailable = "unavailable: /.well-known/openid-configuration answered HTTP 403";
    let reported = eventually(std::time::Duration::from_secs(30), || async {
        bundle_clusters(admin_address).await[0]["token_signature_check"] == unavailable
    })
    .await;
    assert!(reported, "{:?}", bundle_clusters(admin_address).await);
    let reviews = || token_reviews(admin_address);
    let id = format!("spiffe://cluster.local/ns/{ns}/sa/web");
    let real = cluster.token(ns, "web", &["istio-ca"], 3600, None).await;
    signer.create(&real, &id).await.unwrap();
    assert_eq!(reviews().await, 1.0);
    // A forged signature is the API server's to refuse again: one review.
    let (signed, _) = real.rsplit_once('.').unwrap();
    let forgery = format!("{signed}.{}", b64(&[3u8; 256]));
    let status = signer.create(&forgery, &id).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reviews().await, 2.0);
}

//! Tier 3: forged bearer tokens cost the API server nothing. Random bytes and well-formed JWTs
//! that no review could accept (expired, another audience, another issuer) are refused before
//! any TokenReview; a token the API server refused once is not reviewed again; real tokens
//! keep working.

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
    let reviews = || async {
        let (_, body) = http_get(&format!("http://{}/metrics", running.admin_address)).await;
        openmetrics::parse(&body).value(
            "istio_csr_kube_api_requests_total",
            &[
                ("code", "201"),
                ("resource", "tokenreviews"),
                ("verb", "create"),
            ],
        )
    };

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

    // A well-formed token the API server refuses (its signature is broken): reviewed once,
    // then remembered.
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
    assert_eq!(avoided("issuer"), 33.0);
    assert_eq!(avoided("remembered"), 4.0);
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
                let token = forged(serde_json::json!({
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

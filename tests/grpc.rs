//! Tier 2: the real server (production wiring) over TLS on loopback, a real tonic client.

mod support;

use std::path::Path;
use std::time::Duration;

use istio_csr_rs::client::{build_csr, metadata};
use istio_csr_rs::pki::pem;
use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
use istio_csr_rs::proto::istio_v1_auth::IstioCertificateRequest;
use istio_csr_rs::proto::istio_v1_auth::istio_certificate_service_client::IstioCertificateServiceClient;
use support::*;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

async fn create(
    server: &Server,
    token: Option<&str>,
    csr: String,
    ttl: i64,
) -> Result<Vec<String>, tonic::Status> {
    let mut client = server.client().await;
    let request = pilot_agent_request(&server.target(), token, csr, ttl);
    client
        .create_certificate(request)
        .await
        .map(|r| r.into_inner().cert_chain)
}

#[tokio::test]
async fn issues_the_token_identity_with_leaf_first_and_root_bundle_last() {
    let server = Server::start(&[]).await;
    let (csr, _) = p256_csr(DEFAULT_ID);
    let chain = create(&server, Some(&server.token()), csr, 86_400)
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    let (uris, _) = leaf_identity(&chain);
    assert_eq!(uris, vec![DEFAULT_ID.to_owned()]);
    let root_file = std::fs::read_to_string(server.data_dir.join("root-cert.pem")).unwrap();
    assert_eq!(
        pem::parse_certificates(chain[1].as_bytes()).unwrap(),
        pem::parse_certificates(root_file.as_bytes()).unwrap()
    );
}

#[tokio::test]
async fn signs_rsa_and_p384_csrs() {
    let server = Server::start(&[]).await;
    for alg in [KeyAlg::Rsa2048, KeyAlg::EcdsaP384] {
        let csr = build_csr(DEFAULT_ID, &alg.generate()).unwrap();
        let chain = create(&server, Some(&server.token()), csr, 3600).await;
        assert!(chain.is_ok(), "{alg:?}: {chain:?}");
    }
}

#[tokio::test]
async fn clamps_lifetimes_to_the_maximum_and_honours_shorter_ones() {
    let server = Server::start(&["--max-client-certificate-duration", "30m"]).await;
    let skew = 60;
    for (requested, want) in [(86_400, 1800), (0, 1800), (-1, 1800), (600, 600)] {
        let (csr, _) = p256_csr(DEFAULT_ID);
        let chain = create(&server, Some(&server.token()), csr, requested)
            .await
            .unwrap();
        let (_, lifetime) = leaf_identity(&chain);
        assert_eq!(lifetime, want + skew, "requested {requested}");
    }
}

#[tokio::test]
async fn refuses_a_dns_san_as_invalid_argument() {
    let server = Server::start(&[]).await;
    let csr = istio_csr_rs::pki::testing::CsrBuilder::new(KeyAlg::EcdsaP256)
        .uri(DEFAULT_ID)
        .dns("foo.example.com")
        .build_pem();
    let status = create(&server, Some(&server.token()), csr, 3600)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn refuses_garbage_as_invalid_argument() {
    let server = Server::start(&[]).await;
    let status = create(&server, Some(&server.token()), "not a csr".into(), 3600)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// A valid CSR behind `len` bytes of text, which PEM readers skip: only its size is wrong.
fn padded_csr(len: usize) -> String {
    let (csr, _) = p256_csr(DEFAULT_ID);
    let padding = len - csr.len();
    format!("{}\n{csr}", "x".repeat(padding - 1))
}

#[tokio::test]
async fn refuses_a_valid_csr_over_64_kib_as_invalid_argument() {
    let server = Server::start(&[]).await;
    let limit = istio_csr_rs::pki::csr::MAX_CSR_PEM_BYTES;
    // At the limit it is signed: only the size refuses the next one.
    create(&server, Some(&server.token()), padded_csr(limit), 3600)
        .await
        .unwrap();
    let status = create(&server, Some(&server.token()), padded_csr(limit + 1), 3600)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn refuses_messages_over_the_grpc_size_limit_as_resource_exhausted() {
    let server = Server::start(&[]).await;
    let (csr, _) = p256_csr(DEFAULT_ID);
    // A valid request made large by a metadata field the server ignores.
    let padded = |bytes: usize| {
        let mut request =
            pilot_agent_request(&server.target(), Some(&server.token()), csr.clone(), 3600);
        let fields = &mut request.get_mut().metadata.as_mut().unwrap().fields;
        fields.insert(
            "Padding".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("p".repeat(bytes))),
            },
        );
        request
    };
    let mut client = server.client().await;
    client.create_certificate(padded(100 * 1024)).await.unwrap();
    let status = client
        .create_certificate(padded(1024 * 1024))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test]
async fn refuses_missing_wrong_and_malformed_credentials_as_unauthenticated() {
    let server = Server::start(&[]).await;
    let (csr, _) = p256_csr(DEFAULT_ID);
    for token in [None, Some("wrong-token")] {
        let status = create(&server, token, csr.clone(), 3600).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
        assert_eq!(status.message(), "authentication failed");
    }
    let mut client = server.client().await;
    let mut request = pilot_agent_request(&server.target(), None, csr, 3600);
    request
        .metadata_mut()
        .insert("authorization", "Basic dXNlcjpwdw==".parse().unwrap());
    let status = client.create_certificate(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn accepts_ztunnel_style_tokens_with_a_trailing_newline() {
    let server = Server::start(&[]).await;
    let (csr, _) = p256_csr(DEFAULT_ID);
    let mut client = server.client().await;
    let mut request = pilot_agent_request(&server.target(), None, csr, 3600);
    let raw = format!("Bearer {}\n", server.token());
    request.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::try_from(raw.as_str()).unwrap_or_else(|_| {
            // A newline is not a legal header value over HTTP/2 in tonic; trailing spaces are.
            format!("Bearer {}  ", server.token()).parse().unwrap()
        }),
    );
    client.create_certificate(request).await.unwrap();
}

#[tokio::test]
async fn refuses_an_unknown_cluster_as_unauthenticated() {
    let server = Server::start(&[]).await;
    let mut target = server.target();
    target.cluster_id = "some-other-cluster".into();
    let (csr, _) = p256_csr(DEFAULT_ID);
    let mut client = server.client().await;
    let request = pilot_agent_request(&target, Some(&server.token()), csr, 3600);
    let status = client.create_certificate(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn refuses_another_identity_as_permission_denied() {
    let server = Server::start(&[]).await;
    for csr_identity in [
        "spiffe://cluster.local/ns/other/sa/other",
        "spiffe://other.domain/ns/default/sa/default",
        // Valid spiffe:// URIs, but no service account's identity: refused all the same.
        "spiffe://cluster.local/default",
        "spiffe://cluster.local/ns/default/sa/default/extra",
        "spiffe://Cluster.Local/ns/default/sa/default",
    ] {
        let (csr, _) = p256_csr(csr_identity);
        let status = create(&server, Some(&server.token()), csr, 3600)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{csr_identity}");
    }
}

#[tokio::test]
async fn refuses_impersonation_by_untrusted_and_unverifiable_callers() {
    for extra in [
        &[][..],
        &["--ca-trusted-node-accounts", "default/default"][..],
    ] {
        let server = Server::start(extra).await;
        let impersonated = "spiffe://cluster.local/ns/app/sa/web";
        let (csr, _) = p256_csr(impersonated);
        let mut client = server.client().await;
        let request = server
            .target()
            .request(
                Some(&server.token()),
                IstioCertificateRequest {
                    csr,
                    validity_duration: 3600,
                    metadata: Some(metadata(None, Some(impersonated))),
                },
            )
            .unwrap();
        let status = client.create_certificate(request).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{extra:?}");
    }
}

#[tokio::test]
async fn refuses_non_string_metadata_as_invalid_argument() {
    let server = Server::start(&[]).await;
    let (csr, _) = p256_csr(DEFAULT_ID);
    let mut body = IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata: Some(metadata(None, None)),
    };
    body.metadata.as_mut().unwrap().fields.insert(
        "CertSigner".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::BoolValue(true)),
        },
    );
    let mut client = server.client().await;
    let request = server
        .target()
        .request(Some(&server.token()), body)
        .unwrap();
    let status = client.create_certificate(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// Places a root + intermediate CA in istiod's cacerts layout.
fn write_intermediate_ca(data_dir: &Path) -> (TestCa, TestCa) {
    let root = TestCa::root("test root", KeyAlg::EcdsaP256);
    let intermediate = root.intermediate("test intermediate", KeyAlg::EcdsaP256);
    let ca = data_dir.join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    std::fs::write(ca.join("ca-cert.pem"), intermediate.cert_pem()).unwrap();
    std::fs::write(ca.join("ca-key.pem"), intermediate.key_pem()).unwrap();
    let chain = format!("{}{}", intermediate.cert_pem(), root.cert_pem());
    std::fs::write(ca.join("cert-chain.pem"), chain).unwrap();
    std::fs::write(ca.join("root-cert.pem"), root.cert_pem()).unwrap();
    (root, intermediate)
}

#[tokio::test]
async fn answers_one_intermediate_per_element_for_a_ca_with_an_intermediate() {
    let mut cas = None;
    let server = Server::start_with(&[], Default::default(), |dir| {
        cas = Some(write_intermediate_ca(dir));
    })
    .await;
    let (root, intermediate) = cas.unwrap();
    let (csr, _) = p256_csr(DEFAULT_ID);
    let chain = create(&server, Some(&server.token()), csr, 3600)
        .await
        .unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root bundle");
    assert_eq!(
        pem::parse_certificates(chain[1].as_bytes()).unwrap(),
        vec![intermediate.cert]
    );
    assert_eq!(
        pem::parse_certificates(chain[2].as_bytes()).unwrap(),
        vec![root.cert]
    );
}

#[tokio::test]
async fn serves_the_grpc_health_service() {
    let server = Server::start(&[]).await;
    let channel = channel(&server, None).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "istio.v1.auth.IstioCertificateService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

async fn channel(server: &Server, identity: Option<Identity>) -> Channel {
    let roots = std::fs::read(server.data_dir.join("root-cert.pem")).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(roots))
        .domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Channel::from_shared(format!("https://{}", server.running.grpc_address))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn renews_with_a_client_certificate_instead_of_a_token() {
    let server = Server::start(&["--enable-client-cert-authenticator"]).await;
    let (csr, key) = p256_csr(DEFAULT_ID);
    let chain = create(&server, Some(&server.token()), csr, 3600)
        .await
        .unwrap();
    let identity = Identity::from_pem(chain[..chain.len() - 1].concat(), key.serialize_pem());
    let mut client =
        IstioCertificateServiceClient::new(channel(&server, Some(identity.clone())).await);

    let (csr, _) = p256_csr(DEFAULT_ID);
    let renewed = client
        .create_certificate(pilot_agent_request(&server.target(), None, csr, 3600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        leaf_identity(&renewed.cert_chain).0,
        vec![DEFAULT_ID.to_owned()]
    );

    let (csr, _) = p256_csr("spiffe://cluster.local/ns/other/sa/other");
    let status = client
        .create_certificate(pilot_agent_request(&server.target(), None, csr, 3600))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn ignores_client_certificates_when_the_authenticator_is_off() {
    let server = Server::start(&[]).await;
    let (csr, _) = p256_csr(DEFAULT_ID);
    let status = create(&server, None, csr, 3600).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn picks_up_token_file_changes_without_restart() {
    let server = Server::start(&[]).await;
    let tokens = server.data_dir.join("tokens.csv");
    let old = server.token();
    std::fs::write(&tokens, "fresh-token,default,default\n").unwrap();
    let accepted = eventually(Duration::from_secs(10), || async {
        let (csr, _) = p256_csr(DEFAULT_ID);
        create(&server, Some("fresh-token"), csr, 3600)
            .await
            .is_ok()
    })
    .await;
    assert!(accepted, "new token never accepted");
    let (csr, _) = p256_csr(DEFAULT_ID);
    let status = create(&server, Some(&old), csr, 3600).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "removed token still accepted"
    );
}

#[tokio::test]
async fn picks_up_a_new_ca_without_restart() {
    let server = Server::start(&[]).await;
    let root = TestCa::root("rotated root", KeyAlg::EcdsaP384);
    // As in a real rotation, clients trust the old and the new root while it happens.
    let old_root = std::fs::read_to_string(server.data_dir.join("root-cert.pem")).unwrap();
    let both = server.data_dir.join("both-roots.pem");
    std::fs::write(&both, format!("{old_root}{}", root.cert_pem())).unwrap();
    let mut target = server.target();
    target.root_cert = both;

    let ca = server.data_dir.join("ca");
    // Write the new CA next to the old files and swap them in by rename, as Kubernetes does.
    for (name, contents) in [
        ("ca-key.pem", root.key_pem()),
        ("ca-cert.pem", root.cert_pem()),
        ("cert-chain.pem", root.cert_pem()),
        ("root-cert.pem", root.cert_pem()),
    ] {
        let tmp = ca.join(format!(".{name}.new"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, ca.join(name)).unwrap();
    }
    let rotated = eventually(Duration::from_secs(10), || async {
        let (csr, _) = p256_csr(DEFAULT_ID);
        let Ok(mut client) = target.connect().await else {
            return false;
        };
        let request = pilot_agent_request(&target, Some(&server.token()), csr, 3600);
        match client.create_certificate(request).await {
            Ok(r) => {
                let chain = r.into_inner().cert_chain;
                pem::parse_certificates(chain[1].as_bytes()).unwrap() == vec![root.cert.clone()]
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(rotated, "new CA never used");

    // Clients that trust only the new root reach the CA: the serving certificate was renewed
    // from the new CA as soon as the roots changed.
    std::fs::write(server.data_dir.join("root-cert.pem"), root.cert_pem()).unwrap();
    let reachable = eventually(Duration::from_secs(10), || async {
        server.target().connect().await.is_ok()
    })
    .await;
    assert!(
        reachable,
        "serving certificate not renewed after the root change"
    );
}

#[tokio::test]
async fn a_call_beyond_max_inflight_waits_for_a_seat_and_is_answered() {
    let (hooks, gate) = GatedIssuer::hooks();
    let server = Server::start_with(&["--max-inflight", "2"], hooks, |_| {}).await;
    let gate = gate.get().unwrap().clone();
    let held: Vec<_> = (0..3)
        .map(|_| server.spawn_request(server.target()))
        .collect();
    // Two calls reach the issuer; the third waits for a seat instead of being refused.
    gate.wait_entered(2).await;
    assert!(!held[2].is_finished());
    assert_eq!(
        server.refusals("queue-wait").await + server.refusals("queue-full").await,
        0.0
    );
    gate.release.add_permits(3);
    // The third reaches the issuer once a seat is free.
    gate.wait_entered(1).await;
    for call in held {
        call.await.unwrap().unwrap();
    }
}

/// `istio_csr_certificate_requests_in_flight` of `server` now.
async fn in_flight(server: &Server) -> f64 {
    let (_, body) = http_get(&server.admin_url("/metrics")).await;
    openmetrics::parse(&body).value("istio_csr_certificate_requests_in_flight", &[])
}

#[tokio::test]
async fn answers_resource_exhausted_when_the_source_queue_is_full() {
    let (hooks, gate) = GatedIssuer::hooks();
    let server = Server::start_with(
        &["--max-inflight", "2", "--max-queued-per-source", "0"],
        hooks,
        |_| {},
    )
    .await;
    let gate = gate.get().unwrap().clone();
    let held: Vec<_> = (0..2)
        .map(|_| server.spawn_request(server.target()))
        .collect();
    gate.wait_entered(2).await;
    let (csr, _) = p256_csr(DEFAULT_ID);
    let status = create(&server, Some(&server.token()), csr, 3600)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(server.refusals("queue-full").await, 1.0);
    gate.release.add_permits(2);
    for call in held {
        call.await.unwrap().unwrap();
    }
    // Capacity is back once the held requests are done.
    gate.release.add_permits(1);
    let (csr, _) = p256_csr(DEFAULT_ID);
    create(&server, Some(&server.token()), csr, 3600)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_call_that_waited_too_long_for_a_seat_gets_resource_exhausted() {
    let (hooks, gate) = GatedIssuer::hooks();
    let server = Server::start_with(
        &["--max-inflight", "1", "--max-queue-wait", "300ms"],
        hooks,
        |_| {},
    )
    .await;
    let gate = gate.get().unwrap().clone();
    let held = server.spawn_request(server.target());
    gate.wait_entered(1).await;
    let (csr, _) = p256_csr(DEFAULT_ID);
    let status = create(&server, Some(&server.token()), csr, 3600)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(server.refusals("queue-wait").await, 1.0);
    gate.release.add_permits(1);
    held.await.unwrap().unwrap();
}

#[tokio::test]
async fn graceful_shutdown_turns_unready_and_finishes_the_in_flight_call() {
    let (hooks, gate) = GatedIssuer::hooks();
    let server = Server::start_with(&[], hooks, |_| {}).await;
    let gate = gate.get().unwrap().clone();
    assert_eq!(http_get(&server.admin_url("/readyz")).await.0, 200);

    let (csr, _) = p256_csr(DEFAULT_ID);
    let mut client = server.client().await;
    let request = pilot_agent_request(&server.target(), Some(&server.token()), csr, 3600);
    let in_flight = tokio::spawn(async move { client.create_certificate(request).await });
    gate.wait_entered(1).await;

    server.running.shutdown();
    let unready = eventually(Duration::from_secs(5), || async {
        http_get(&server.admin_url("/readyz")).await.0 == 503
    })
    .await;
    assert!(unready, "/readyz stayed ready during shutdown");

    gate.release.add_permits(1);
    let response = in_flight
        .await
        .unwrap()
        .expect("in-flight call must finish");
    assert_eq!(response.into_inner().cert_chain.len(), 2);
    let Server { running, .. } = server;
    tokio::time::timeout(Duration::from_secs(15), running.wait())
        .await
        .expect("server did not stop")
        .expect("clean shutdown");
}

/// A raw TLS handshake with only `version` enabled: returns the negotiated version and ALPN.
async fn handshake(
    server: &Server,
    version: &'static rustls::SupportedProtocolVersion,
) -> (rustls::ProtocolVersion, Option<Vec<u8>>) {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(server.data_dir.join("root-cert.pem")).unwrap();
    for cert in pem::parse_certificates(&pem).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_protocol_versions(&[version])
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.running.grpc_address)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let session = tls.get_ref().1;
    (
        session.protocol_version().unwrap(),
        session.alpn_protocol().map(<[u8]>::to_vec),
    )
}

#[tokio::test]
async fn speaks_tls_1_2_and_1_3_with_alpn_h2() {
    let server = Server::start(&[]).await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let (negotiated, alpn) = handshake(&server, version).await;
        assert_eq!(negotiated, version.version);
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    }
}

#[tokio::test]
async fn serves_a_certificate_for_localhost_and_127_0_0_1() {
    let server = Server::start(&[]).await;
    // The handshake above verifies "localhost"; the IP address is what `request` uses by default.
    let mut target = server.target();
    target.server_name = Some("127.0.0.1".into());
    target.connect().await.unwrap();
}

#[tokio::test]
async fn one_source_address_waits_its_turn_while_another_source_is_served_at_once() {
    let (hooks, gate) = GatedIssuer::hooks();
    let server = Server::start_with(
        &["--max-inflight", "100", "--max-inflight-per-source", "2"],
        hooks,
        |_| {},
    )
    .await;
    let gate = gate.get().unwrap().clone();
    let held: Vec<_> = (0..2)
        .map(|_| server.spawn_request(server.target()))
        .collect();
    gate.wait_entered(2).await;
    // 127.0.0.1 holds its share although 98 seats are free: its third call waits.
    let waiting = server.spawn_request(server.target());
    // Another source address still gets in.
    let from_elsewhere = server.spawn_request(server.target_from("127.0.0.2"));
    // The other source's call reaches the issuer while 127.0.0.1's third still waits: three
    // calls in flight, not four.
    gate.wait_entered(1).await;
    assert_eq!(in_flight(&server).await, 3.0);
    assert!(!waiting.is_finished());
    gate.release.add_permits(4);
    from_elsewhere.await.unwrap().unwrap();
    for call in held {
        call.await.unwrap().unwrap();
    }
    waiting.await.unwrap().unwrap();
    assert_eq!(server.refusals("queue-full").await, 0.0);
}

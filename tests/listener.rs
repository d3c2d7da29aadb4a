//! The listener under hostile or broken peers: idle sockets, peers that never speak HTTP/2,
//! and more connections than allowed.

mod support;

use std::time::Duration;

use istio_csr_rs::pki::pem;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than any real request takes here, shorter than the 10 s connect deadline that a
/// blocked accept loop or a held shutdown would cost.
const PROMPT: Duration = Duration::from_secs(5);

async fn tls_client(server: &Server) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let pem_bytes = std::fs::read(server.data_dir.join("root-cert.pem")).unwrap();
    for cert in pem::parse_certificates(&pem_bytes).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(server.running.grpc_address)
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

async fn request_ok(server: &Server) {
    tokio::time::timeout(PROMPT, server.request_default())
        .await
        .expect("a real client was held up")
        .unwrap();
}

#[tokio::test]
async fn idle_sockets_from_one_source_do_not_delay_real_clients() {
    let server = Server::start(&["--max-connections-per-source", "700"]).await;
    let mut idle = Vec::new();
    for _ in 0..600 {
        idle.push(
            TcpStream::connect(server.running.grpc_address)
                .await
                .unwrap(),
        );
    }
    // From the same address (under its share) and from another one.
    request_ok(&server).await;
    let elsewhere = server.target_from("127.0.0.2");
    tokio::time::timeout(
        PROMPT,
        request_certificate(&elsewhere, Some(&server.token()), DEFAULT_ID),
    )
    .await
    .expect("a real client was held up")
    .unwrap();
    drop(idle);
}

/// A new TCP connection to the gRPC port is closed (or reset) by the server at once.
async fn assert_closed_at_once(server: &Server, what: &str) {
    let mut extra = TcpStream::connect(server.running.grpc_address)
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(PROMPT, extra.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what} was kept"));
    assert!(matches!(read, Ok(0) | Err(_)), "{what}: {read:?}");
}

#[tokio::test]
async fn connections_beyond_the_per_source_cap_are_closed_and_counted_while_other_sources_connect()
{
    let server = Server::start(&["--max-connections-per-source", "4"]).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tls_client(&server).await);
    }
    // The fifth from the same address is closed before TLS.
    assert_closed_at_once(&server, "a connection over the per-source cap").await;
    request_certificate(
        &server.target_from("127.0.0.2"),
        Some(&server.token()),
        DEFAULT_ID,
    )
    .await
    .unwrap();
    assert_eq!(server.refusals("source-connections").await, 1.0);
    // A slot comes back when a connection closes.
    drop(held.pop());
    let freed = eventually(PROMPT, || async {
        request_certificate(&server.target(), Some(&server.token()), DEFAULT_ID)
            .await
            .is_ok()
    })
    .await;
    assert!(freed);
}

#[tokio::test]
async fn a_peer_that_is_not_http2_is_closed() {
    let server = Server::start(&[]).await;
    let mut tls = tls_client(&server).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(PROMPT, tls.read(&mut buf))
        .await
        .expect("connection left open");
    assert!(matches!(read, Ok(0) | Err(_)), "got an answer: {read:?}");
}

#[tokio::test]
async fn a_silent_tls_peer_does_not_hold_up_shutdown() {
    let server = Server::start(&[]).await;
    let _silent = tls_client(&server).await;
    request_ok(&server).await;
    server.running.shutdown();
    let Server { running, .. } = server;
    tokio::time::timeout(PROMPT, running.wait())
        .await
        .expect("shutdown waited for a peer that never sent a request")
        .unwrap();
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let server = Server::start(&["--max-connections", "3"]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            TcpStream::connect(server.running.grpc_address)
                .await
                .unwrap(),
        );
    }
    assert_closed_at_once(&server, "the connection over the cap").await;
    // Slots come back when connections close.
    drop(held);
    let freed = eventually(PROMPT, || async {
        let (csr, _) = p256_csr(DEFAULT_ID);
        let Ok(mut client) = server.target().connect().await else {
            return false;
        };
        client
            .create_certificate(pilot_agent_request(
                &server.target(),
                Some(&server.token()),
                csr,
                3600,
            ))
            .await
            .is_ok()
    })
    .await;
    assert!(freed);
}

#[tokio::test]
async fn the_whole_server_reports_not_serving_once_shutdown_starts() {
    let server = Server::start(&["--shutdown-delay", "3s"]).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("https://{}", server.running.grpc_address))
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(
                        std::fs::read(server.data_dir.join("root-cert.pem")).unwrap(),
                    ))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(
        health.check(check("")).await.unwrap().into_inner().status(),
        ServingStatus::Serving
    );
    server.running.shutdown();
    // During the shutdown delay the server still answers, and says it is going away.
    let not_serving = eventually(Duration::from_secs(2), || {
        let mut health = health.clone();
        async move {
            health
                .check(check(""))
                .await
                .is_ok_and(|r| r.into_inner().status() == ServingStatus::NotServing)
        }
    })
    .await;
    assert!(not_serving);
}

#[tokio::test]
async fn an_over_size_message_gets_resource_exhausted_and_the_connection_serves_the_next_call() {
    let server = Server::start(&[]).await;
    let target = server.target();
    let token = server.token();
    // One channel is one HTTP/2 connection: every call below shares it.
    let client = server.client().await;
    let call = |csr: String| {
        let request = pilot_agent_request(&target, Some(&token), csr, 3600);
        let mut client = client.clone();
        async move { client.create_certificate(request).await }
    };
    // Over the 128 KiB message limit: refused before decoding, as gRPC's spec says.
    let status = call("A".repeat(200 * 1024)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    // Under it, the message reaches the CSR checks (a CSR is at most 64 KiB).
    let status = call("A".repeat(100 * 1024)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let (csr, _) = p256_csr(DEFAULT_ID);
    call(csr).await.unwrap();
}

//! The admin API of a real server: metrics move by exactly what was served; /debug/bundle
//! describes the pinned roots as docs/admin-api.md says; the listener bounds slow and excess
//! connections.

mod support;

use std::time::{Duration, Instant};

use istio_csr_rs::admin::ServeLimits;
use support::openmetrics;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

/// Room for a loaded machine on top of a bound.
const SLACK: Duration = Duration::from_secs(3);

async fn scrape(server: &Server) -> openmetrics::Exposition {
    let (status, body) = http_get(&server.admin_url("/metrics")).await;
    assert_eq!(status, 200);
    openmetrics::parse(&body)
}

#[tokio::test]
async fn request_metrics_move_by_exactly_the_calls_made_per_code() {
    let server = Server::start(&[]).await;
    let before = scrape(&server).await;
    let (mut ok, mut unauthenticated, mut denied, mut invalid) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..12 {
        let mut client = server.client().await;
        let (token, identity) = match i % 4 {
            0 | 1 => (Some(server.token()), DEFAULT_ID),
            2 => (None, DEFAULT_ID),
            _ => (Some(server.token()), "spiffe://cluster.local/ns/x/sa/y"),
        };
        let (csr, _) = p256_csr(identity);
        let csr = if i == 11 { "garbage".to_owned() } else { csr };
        let result = client
            .create_certificate(pilot_agent_request(
                &server.target(),
                token.as_deref(),
                csr,
                3600,
            ))
            .await;
        match result.map_err(|s| s.code()) {
            Ok(_) => ok += 1.0,
            Err(Code::Unauthenticated) => unauthenticated += 1.0,
            Err(Code::PermissionDenied) => denied += 1.0,
            Err(Code::InvalidArgument) => invalid += 1.0,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, unauthenticated, denied, invalid), (6.0, 3.0, 2.0, 1.0));
    let after = scrape(&server).await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    for (code, want) in [
        ("OK", ok),
        ("UNAUTHENTICATED", unauthenticated),
        ("PERMISSION_DENIED", denied),
        ("INVALID_ARGUMENT", invalid),
    ] {
        let counter = moved(
            "istio_csr_certificate_requests_total",
            &[
                ("code", code),
                ("backend", "local-ca"),
                ("signer", "default"),
            ],
        );
        assert_eq!(counter, want, "counter for {code}");
        let histogram = moved(
            "istio_csr_certificate_request_duration_seconds_count",
            &[("code", code)],
        );
        assert_eq!(histogram, want, "histogram for {code}");
    }
    assert_eq!(
        moved("istio_csr_issued_certificate_lifetime_seconds_count", &[]),
        ok
    );
    // Each leaf lives the 1h maximum plus the 60 s notBefore backdating.
    assert_eq!(
        moved("istio_csr_issued_certificate_lifetime_seconds_sum", &[]),
        ok * 3660.0
    );
    assert_eq!(
        moved(
            "istio_csr_authentications_total",
            &[("method", "token"), ("result", "success")]
        ),
        ok + denied + invalid
    );
    assert_eq!(
        moved(
            "istio_csr_authentications_total",
            &[("method", "none"), ("result", "failure")]
        ),
        unauthenticated
    );
    assert_eq!(
        after.value("istio_csr_certificate_requests_in_flight", &[]),
        0.0
    );
}

#[tokio::test]
async fn metrics_follow_the_openmetrics_format_and_name_no_identities() {
    let server = Server::start(&[]).await;
    server.request_default().await.unwrap();
    let (_, body) = http_get(&server.admin_url("/metrics")).await;
    let exposition = openmetrics::parse(&body);
    for family in exposition.types.keys() {
        assert!(
            family.starts_with("istio_csr_"),
            "{family} lacks the prefix"
        );
        let help = &exposition.help[family];
        assert!(
            help.ends_with('.') && help.len() > 20,
            "{family}: help must be a sentence: {help:?}"
        );
    }
    assert!(!body.contains("spiffe://"), "an identity reached a label");
    // The caller's namespace is "default"; so is the name of the mesh's own signer, the
    // one label allowed to say it.
    for sample in &exposition.samples {
        for (label, value) in &sample.labels {
            assert!(
                value != "default" || label == "signer",
                "a namespace reached label {label} of {}",
                sample.name
            );
        }
    }
    assert!(
        exposition
            .samples
            .iter()
            .any(|s| s.labels.get("signer").is_some_and(|v| v == "default")),
        "the request was not counted for the default signer"
    );
}

#[tokio::test]
async fn debug_bundle_reports_the_root_fingerprint_and_expiry_as_openssl_sees_them() {
    let server = Server::start(&[]).await;
    let (status, body) = http_get(&server.admin_url("/debug/bundle")).await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let root = &json["roots"]["certificates"][0];

    let openssl = std::process::Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-fingerprint",
            "-sha256",
            "-enddate",
            "-in",
        ])
        .arg(server.data_dir.join("root-cert.pem"))
        .output()
        .expect("openssl must be installed");
    let out = String::from_utf8(openssl.stdout).unwrap();
    let fingerprint = out
        .lines()
        .find_map(|l| {
            l.split_once("Fingerprint=")
                .map(|(_, f)| f.replace(':', "").to_lowercase())
        })
        .unwrap();
    assert_eq!(root["sha256"], fingerprint);
    let end = out
        .lines()
        .find_map(|l| l.strip_prefix("notAfter="))
        .unwrap();
    let format = time::macros::format_description!(
        "[month repr:short] [day padding:space] [hour]:[minute]:[second] [year] GMT"
    );
    let end = time::PrimitiveDateTime::parse(end, &format)
        .unwrap()
        .assume_utc();
    assert_eq!(root["not_after_unix"], end.unix_timestamp());
    assert!(root["not_after"].as_str().unwrap().ends_with('Z'));
    assert!(root["source"].is_null());
    assert!(
        json["roots"]["source"]
            .as_str()
            .unwrap()
            .starts_with("local-ca:")
    );
    assert_eq!(
        json["issuer"],
        serde_json::json!({"kind": "local-ca", "ready": true})
    );
    assert!(
        json["serving_certificate"]["not_after_unix"]
            .as_i64()
            .unwrap()
            > 0
    );
}

/// Reads until the server closes (a reset counts as closed): what it sent first.
async fn until_closed(tcp: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_slowloris_connection_is_closed_at_the_header_read_timeout() {
    let server = Server::start(&[]).await;
    let bound = ServeLimits::DEFAULT.header_read_timeout;
    let mut slow = TcpStream::connect(server.running.admin_address)
        .await
        .unwrap();
    // Half a request line, then nothing.
    slow.write_all(b"GET /liv").await.unwrap();
    let sent = Instant::now();
    // Others are served meanwhile.
    assert_eq!(http_get(&server.admin_url("/livez")).await.0, 200);
    let answer = tokio::time::timeout(bound + SLACK, until_closed(&mut slow))
        .await
        .expect("a slowloris connection was kept open");
    let elapsed = sent.elapsed();
    assert!(elapsed >= bound - Duration::from_millis(200), "{elapsed:?}");
    // hyper may say 408 before closing; the half request is never served.
    assert!(!answer.contains(" 200 "), "{answer}");
}

/// A TCP connection to `address` from `source` (any 127.0.0.0/8 address is this machine's).
async fn connect_from(
    source: [u8; 4],
    address: std::net::SocketAddr,
) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    socket.connect(address).await
}

/// GET `path` on a new connection from `source`: the status line, or why there was none.
async fn get_from(source: [u8; 4], address: std::net::SocketAddr, path: &str) -> String {
    let mut tcp = match connect_from(source, address).await {
        Ok(tcp) => tcp,
        Err(error) => return format!("connect: {error}"),
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if let Err(error) = tcp.write_all(request.as_bytes()).await {
        return format!("write: {error}");
    }
    let answer = until_closed(&mut tcp).await;
    answer
        .lines()
        .next()
        .unwrap_or("closed with no answer")
        .to_owned()
}

const ATTACKER: [u8; 4] = [127, 0, 0, 1];
const KUBELET: [u8; 4] = [127, 0, 0, 2];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_from_one_source_fail_no_probe_from_another() {
    let server = Server::start(&[]).await;
    let address = server.running.admin_address;
    let per_source = ServeLimits::DEFAULT.max_connections_per_source;
    // 1,000 idle connections from one address: all but its share are closed at once.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(connect_from(ATTACKER, address).await.unwrap());
    }
    // Read all at once: the refused ones are closed as soon as the server accepts them, the
    // admitted ones stay open (their header-read timeout is 5 s).
    let reads = idle.iter_mut().map(|tcp| async move {
        let mut buf = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await {
            Err(_) => true,
            Ok(read) => {
                assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
                false
            }
        }
    });
    let kept = futures_util::future::join_all(reads)
        .await
        .into_iter()
        .filter(|open| *open)
        .count();
    assert_eq!(kept, per_source, "connections kept open from one address");
    // The attacker re-opens what is closed, while the kubelet probes from its own address.
    let stop = tokio_util::sync::CancellationToken::new();
    let attacker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut reopened = 0u32;
            while !stop.is_cancelled() {
                for tcp in &mut idle {
                    let mut buf = [0u8; 1];
                    let closed = match tcp.try_read(&mut buf) {
                        Ok(n) => n == 0,
                        Err(error) => error.kind() != std::io::ErrorKind::WouldBlock,
                    };
                    if closed && let Ok(new) = connect_from(ATTACKER, address).await {
                        *tcp = new;
                        reopened += 1;
                    }
                }
                tokio::task::yield_now().await;
            }
            reopened
        })
    };
    let mut failed = Vec::new();
    for i in 0..60 {
        let path = if i % 2 == 0 { "/livez" } else { "/readyz" };
        let status = get_from(KUBELET, address, path).await;
        if status != "HTTP/1.1 200 OK" {
            failed.push(format!("{path}: {status}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let reopened = attacker.await.unwrap();
    assert!(reopened > 0, "the attacker never re-opened a connection");
    assert!(failed.is_empty(), "probes failed: {failed:?}");
}

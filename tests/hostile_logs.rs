//! Tier 2: hostile request values and floods of refusals against the real server. The server
//! must keep answering correctly, its refusal lines must stay escaped, bounded and few, and
//! what it leaves out must show in `istio_csr_log_lines_suppressed_total`.
//!
//! The server runs in this process, so its log lines are captured with a global tracing
//! subscriber writing to a buffer. Tests of this binary share that buffer: each one finds its
//! own lines by a marker in the values it sends.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use istio_csr_rs::client::metadata;
use istio_csr_rs::proto::istio_v1_auth::IstioCertificateRequest;
use support::openmetrics;
use support::*;
use tonic::Code;

/// What the real server allows before it suppresses (log_guard.rs).
const LINES_PER_SECOND: f64 = 10.0;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log lines written so far by every test of this binary (text format, as `--log-format
/// text` writes them, without colours).
fn logs() -> Vec<String> {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    let captured = CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        captured
    });
    let bytes = captured.0.lock().unwrap().clone();
    String::from_utf8(bytes)
        .expect("log output is UTF-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn suppressed_total(server: &Server, reason: &str) -> f64 {
    let (status, body) = http_get(&server.admin_url("/metrics")).await;
    assert_eq!(status, 200);
    openmetrics::parse(&body).value(
        "istio_csr_log_lines_suppressed_total",
        &[("reason", reason)],
    )
}

/// A CreateCertificate for `csr_identity` asking, as ztunnel does, for `impersonate`.
fn impersonation(
    server: &Server,
    cert_signer: Option<&str>,
    impersonate: &str,
) -> tonic::Request<IstioCertificateRequest> {
    let (csr, _) = p256_csr(DEFAULT_ID);
    server
        .target()
        .request(
            Some(&server.token()),
            IstioCertificateRequest {
                csr,
                validity_duration: 3600,
                metadata: Some(metadata(cert_signer, Some(impersonate))),
            },
        )
        .unwrap()
}

#[tokio::test]
async fn a_flood_of_100_kib_identities_is_answered_and_logged_briefly_and_rarely() {
    logs();
    let server = Server::start(&[]).await;
    let marker = "flood-marker";
    let identity = format!(
        "spiffe://cluster.local/ns/{marker}/sa/{}",
        "x".repeat(100 * 1024)
    );
    let calls: usize = 240;
    let tasks = 8; // ztunnel's concurrency
    let client = server.client().await;
    let started = Instant::now();
    let mut joins = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let mut client = client.clone();
        let requests: Vec<_> = (0..calls / tasks)
            .map(|_| impersonation(&server, None, &identity))
            .collect();
        joins.spawn(async move {
            for request in requests {
                let status = client.create_certificate(request).await.unwrap_err();
                assert_eq!(status.code(), Code::PermissionDenied);
                assert_eq!(status.message(), "permission denied");
            }
        });
    }
    while let Some(joined) = joins.join_next().await {
        joined.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();

    let lines: Vec<String> = logs().into_iter().filter(|l| l.contains(marker)).collect();
    let suppressed = suppressed_total(&server, "PERMISSION_DENIED").await as usize;
    assert_eq!(
        lines.len() + suppressed,
        calls,
        "every refusal is either logged or counted"
    );
    // The burst, plus what the bucket refilled while the calls came in.
    let allowed = LINES_PER_SECOND * (1.0 + elapsed) + 1.0;
    assert!(
        lines.len() as f64 <= allowed,
        "{} lines in {elapsed:.1}s",
        lines.len()
    );
    assert!(suppressed > 0, "{calls} refusals in {elapsed:.1}s");
    for line in &lines {
        assert!(line.contains("certificate request refused"), "{line}");
        assert!(line.contains("PermissionDenied"), "{line}");
        assert!(line.len() < 1024, "a {}-byte line", line.len());
        assert!(line.contains("…(+"), "the cut is marked: {line}");
    }

    // Once the flood is over, the next refusal is logged after a line that sums up what the
    // earlier summaries (at most one a second) have not reported yet.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let status = client
        .clone()
        .create_certificate(impersonation(&server, None, &identity))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let logs = logs();
    let summaries: Vec<u64> = logs
        .iter()
        .filter(|l| l.contains("refusal log lines were suppressed"))
        .filter(|l| l.contains(r#"reason="PERMISSION_DENIED""#))
        .map(|l| {
            let (_, count) = l.rsplit_once("suppressed=").expect("a count");
            count.trim().parse().expect("a number")
        })
        .collect();
    assert_eq!(
        summaries.iter().sum::<u64>(),
        suppressed as u64,
        "the summaries account for every suppressed line: {summaries:?}"
    );
    assert!(
        summaries.len() as f64 <= 2.0 + elapsed,
        "one summary a second: {summaries:?}"
    );
    assert_eq!(
        logs.iter().filter(|l| l.contains(marker)).count(),
        lines.len() + 1
    );
    // And the server still signs.
    let chain = server.request_default().await.unwrap();
    assert_eq!(leaf_identity(&chain).0, vec![DEFAULT_ID.to_owned()]);
}

#[tokio::test]
async fn newlines_and_quotes_in_request_values_cannot_forge_a_log_line() {
    logs();
    let server = Server::start(&["--ca-trusted-node-accounts", "default/default"]).await;
    let identity = "spiffe://cluster.local/ns/escape-marker/sa/a\nINFO forged line \"x\"";
    let cert_signer = "signer\r\nWARN forged \u{1b}[2J";
    let status = server
        .client()
        .await
        .create_certificate(impersonation(&server, Some(cert_signer), identity))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let logs = logs();
    let line = logs
        .iter()
        .find(|l| l.contains("escape-marker"))
        .expect("the refusal is logged");
    assert!(line.contains("certificate request refused"), "{line}");
    // Escaped by the signer (\n -> \n, " -> \"), then quoted by the text format (\ -> \\).
    assert!(
        line.contains(r#"impersonating="spiffe://cluster.local/ns/escape-marker/sa/a\\nINFO forged line \\\"x\\\"""#),
        "{line}"
    );
    assert!(
        line.contains(r#"cert_signer="signer\\r\\nWARN forged \\u{1b}[2J""#),
        "{line}"
    );
    assert!(
        !logs
            .iter()
            .any(|l| l.starts_with("INFO forged") || l.starts_with("WARN forged")),
        "a value started a line of its own"
    );
    assert!(
        !logs.iter().any(|l| l.contains('\u{1b}')),
        "a terminal escape reached the log"
    );
}

#[tokio::test]
async fn a_hostile_cluster_header_is_escaped_in_the_refusal() {
    logs();
    let server = Server::start(&[]).await;
    let mut request = impersonation(&server, None, "spiffe://cluster.local/ns/a/sa/b");
    // HTTP allows tabs, quotes and bytes above 0x7f in header values.
    request.metadata_mut().insert(
        "clusterid",
        tonic::metadata::MetadataValue::try_from(&b"cluster-marker\t\"\xff"[..]).unwrap(),
    );
    let status = server
        .client()
        .await
        .create_certificate(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let logs = logs();
    let line = logs
        .iter()
        .find(|l| l.contains("cluster-marker"))
        .expect("the refusal is logged");
    assert!(
        line.contains(r#"cluster="cluster-marker\\t\\\"�""#),
        "{line}"
    );
    assert!(!line.contains('\t'), "{line}");
}

//! The newcomer's path, with real processes: `serve --standalone`, then the `request` command
//! it prints, then `openssl verify`; SIGTERM ends the server with status 0.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_istio-csr-rs");

struct ServerProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ServerProcess {
    fn start(data_dir: &std::path::Path) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--standalone", "--data-dir"])
            .arg(data_dir)
            .args([
                "--serving-address",
                "127.0.0.1:0",
                "--admin-address",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The first printed line containing `needle`.
    fn wait_for_line(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("server never printed {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        self.child.wait().unwrap()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn run(words: &[&str]) -> std::process::Output {
    Command::new(words[0]).args(&words[1..]).output().unwrap()
}

#[test]
fn the_printed_request_command_yields_a_chain_openssl_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = ServerProcess::start(&data);
    let command = server.wait_for_line(" request ");
    let words: Vec<&str> = command.split_whitespace().collect();
    assert!(words[0].ends_with("istio-csr-rs"), "{command}");

    let output = run(&words);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("issued spiffe://cluster.local/ns/default/sa/default"),
        "{stdout}"
    );
    assert!(stdout.contains("chain_length=2"), "{stdout}");

    let roots = data.join("root-cert.pem");
    let chain = data.join("workload/cert-chain.pem");
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&roots)
        .arg("-untrusted")
        .arg(&chain)
        .arg(&chain)
        .output()
        .expect("openssl must be installed");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let san = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&chain)
        .output()
        .unwrap();
    let san = String::from_utf8_lossy(&san.stdout);
    let names: Vec<&str> = san.lines().skip(1).map(str::trim).collect();
    assert_eq!(
        names,
        vec!["URI:spiffe://cluster.local/ns/default/sa/default"]
    );

    let mode = |path: &str| {
        let metadata = std::fs::metadata(data.join(path)).unwrap();
        std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o777
    };
    assert_eq!(mode("workload/key.pem"), 0o600);
    assert_eq!(mode("workload"), 0o700, "the directory it made is private");
    let mut written: Vec<String> = std::fs::read_dir(data.join("workload"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(
        written,
        ["cert-chain.pem", "key.pem", "root-cert.pem"],
        "no temporary file is left"
    );

    let status = server.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must end the server cleanly"
    );
}

#[test]
fn the_request_command_exits_with_the_grpc_code_on_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = ServerProcess::start(&data);
    let command = server.wait_for_line(" request ");
    let words: Vec<&str> = command.split_whitespace().collect();

    // Without the token: Unauthenticated (16).
    let no_token: Vec<&str> = words
        .iter()
        .enumerate()
        .filter(|(i, w)| **w != "--token-file" && (*i == 0 || words[i - 1] != "--token-file"))
        .map(|(_, w)| *w)
        .collect();
    assert_eq!(run(&no_token).status.code(), Some(16));

    // Another identity than the token's: PermissionDenied (7).
    let mut other = words.clone();
    other.extend(["--namespace", "other", "--service-account", "other"]);
    assert_eq!(run(&other).status.code(), Some(7));

    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn restarting_keeps_the_ca_and_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let first = ServerProcess::start(&data);
    first.wait_for_line(" request ");
    let root_before = std::fs::read(data.join("root-cert.pem")).unwrap();
    let token_before = std::fs::read(data.join("token")).unwrap();
    assert_eq!(first.terminate().code(), Some(0));

    let second = ServerProcess::start(&data);
    let command = second.wait_for_line(" request ");
    assert_eq!(
        std::fs::read(data.join("root-cert.pem")).unwrap(),
        root_before
    );
    assert_eq!(std::fs::read(data.join("token")).unwrap(), token_before);
    let words: Vec<&str> = command.split_whitespace().collect();
    assert!(run(&words).status.success());
    assert_eq!(second.terminate().code(), Some(0));
}

#[test]
fn refuses_to_start_without_any_way_to_authenticate_callers() {
    use istio_csr_rs::pki::testing::{KeyAlg, TestCa};
    let tmp = tempfile::tempdir().unwrap();
    let root = TestCa::root("ca", KeyAlg::EcdsaP256);
    let ca = tmp.path().join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    for name in ["ca-cert.pem", "cert-chain.pem", "root-cert.pem"] {
        std::fs::write(ca.join(name), root.cert_pem()).unwrap();
    }
    std::fs::write(ca.join("ca-key.pem"), root.key_pem()).unwrap();
    // An empty environment: no KUBECONFIG, no ~/.kube/config, not in a pod.
    let output = Command::new(BIN)
        .env_clear()
        .env("HOME", tmp.path())
        .args(["serve", "--signer", "local-ca", "--local-ca-dir"])
        .arg(&ca)
        .args([
            "--serving-address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no way to authenticate callers"),
        "{stderr}"
    );
}

#[test]
fn logs_never_carry_the_token_or_any_pem_block() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut child = Command::new(BIN)
        .args(["serve", "--standalone", "--data-dir"])
        .arg(&data)
        .args([
            "--serving-address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
        ])
        .args(["--log-level", "debug", "--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let command = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains(" request "))
        .expect("no request command printed");
    let words: Vec<&str> = command.split_whitespace().collect();
    assert!(run(&words).status.success());
    let mut wrong_identity = words.clone();
    wrong_identity.extend(["--namespace", "other"]);
    assert_eq!(run(&wrong_identity).status.code(), Some(7));
    let token = std::fs::read_to_string(data.join("token")).unwrap();

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(
        logs.contains("certificate request refused"),
        "the refusal must be logged"
    );
    assert!(logs.contains("PermissionDenied"), "with its code");
    assert!(
        !logs.contains(token.trim()),
        "the token leaked into the logs"
    );
    assert!(!logs.contains("BEGIN"), "a PEM block leaked into the logs");
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        assert!(line.starts_with('{'), "not a JSON log line: {line}");
    }
}

#[test]
fn the_start_up_log_names_the_built_in_ca_as_the_signer_in_standalone_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--standalone", "--data-dir"])
        .arg(tmp.path().join("data"))
        .args([
            "--serving-address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let config = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("no effective configuration logged");
        if line.contains("effective configuration") {
            break line;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let event: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(event["signer"], "local-ca", "{config}");
    assert!(
        event["signs_with"]
            .as_str()
            .unwrap()
            .starts_with("built-in CA in "),
        "{config}"
    );
    assert!(!config.contains("cert-manager"), "{config}");
}

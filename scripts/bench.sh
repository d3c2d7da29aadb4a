#!/usr/bin/env bash
# Measures the signer and prints a report for docs/benchmarks.md. Everything runs on this
# machine in one go, so the crypto limit (openssl speed) and our figures share its noise.
#   scripts/bench.sh > /tmp/bench.txt        the signer core (built-in CA)
#   scripts/bench.sh kube > /tmp/kube.txt    cert-manager on a real kube-apiserver, with the
#                                            API server's own floor measured in the same run
#   scripts/bench.sh hostile > /tmp/hostile.txt   the server's memory and a real client's
#                                            latency under 1,000 hostile peers, and under
#                                            8,000 health Watches from one address
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "hostile" ]; then
  # The release server under 1,000 hostile peers (tests/hostile_peers.rs): its memory and a
  # real client's latency, without and during the attack.
  echo "## machine"
  echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(rustc --version)"
  echo
  cargo test --release --locked --quiet --test hostile_peers -- --ignored --nocapture \
    hostile_peers_benchmark 2>&1 | grep -vE '^(running|test |$)'
  # 8,000 connections with health Watches from one address, a real client from another.
  cargo test --release --locked --quiet --test hostile_peers -- --nocapture \
    a_watch_flood_from_one_source 2>&1 | grep -vE '^(running|test |$)'
  exit 0
fi

if [ "${1:-}" = "kube" ]; then
  scripts/provision.sh >/dev/null
  ISTIO_CSR_KUBE_BIN="$(scripts/provision-kube.sh | tail -n 1)"
  export ISTIO_CSR_KUBE_BIN
  echo "## machine"
  echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "kube-apiserver and etcd from $ISTIO_CSR_KUBE_BIN, $(rustc --version)"
  echo
  cargo test --release --locked --quiet --test kube_bench -- --ignored --nocapture \
    --test-threads=1 2>&1 |
    grep -vE '^(running|test |$)'
  exit 0
fi

cargo build --release --locked --quiet --bin istio-csr-rs
bin=target/release/istio-csr-rs
tmp="$(mktemp -d)"
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

echo "## machine"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "$(openssl version), $(rustc --version)"
echo
echo "## openssl speed ecdsap256 rsa2048 (single core)"
openssl speed -seconds 3 ecdsap256 rsa2048 2>/dev/null | grep -E 'sign|bits'
echo
echo "## criterion: pure sign path (CSR check + sign + response), single core"
cargo bench --locked --quiet --bench sign_path -- --noplot 2>/dev/null | grep -E '^(sign_path|csr_check)|time:' || true
echo
echo "## load generator: CreateCertificate over TLS on loopback, release build"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$bin" serve --standalone --data-dir "$tmp/data" --serving-address "127.0.0.1:$port" \
  --admin-address 127.0.0.1:0 --log-level warn >"$tmp/server.out" 2>&1 &
server_pid=$!
for _ in $(seq 1 600); do
  grep -q " request " "$tmp/server.out" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$tmp/server.out"; exit 1; }
  sleep 0.1
done
common=(--address "127.0.0.1:$port" --server-name localhost --root-cert "$tmp/data/root-cert.pem"
        --token-file "$tmp/data/token" --server-pid "$server_pid")
# Three runs per configuration: quote the median, the spread shows the machine's noise.
for key in ec-p256 rsa-2048; do
  for c in 1 16 64; do
    echo "### key $key, concurrency $c"
    for run in 1 2 3; do
      "$bin" bench "${common[@]}" --key-type "$key" --concurrency "$c" --requests 20000 --duration 60s
    done
    echo
  done
done

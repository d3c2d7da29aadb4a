#!/usr/bin/env bash
# The project's test command (README, .ci/run): provisions what the tests need, then runs the
# format check, clippy and every test tier:
#   1. unit tests beside the code;
#   2. gRPC tests: the real server over TLS on loopback with a real tonic client, plus an
#      independent Python grpcio client (tests/interop);
#   3. process tests: the real binary, signals and the printed commands.
# (The Kubernetes tier, with etcd and kube-apiserver, joins with the Kubernetes issue.)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/provision.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

echo "== cargo test (unit, gRPC, process tiers)"
cargo test --locked --all-targets

echo "== independent gRPC client (Python grpcio)"
cargo build --locked --quiet --bin istio-csr-rs
bash tests/interop/run.sh target/debug/istio-csr-rs

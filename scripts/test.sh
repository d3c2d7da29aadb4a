#!/usr/bin/env bash
# The project's test command (README, .ci/run): provisions what the tests need, then runs the
# format check, clippy and every test tier:
#   1. unit tests beside the code;
#   2. gRPC tests: the real server over TLS on loopback with a real tonic client, plus an
#      independent Python grpcio client (tests/interop);
#   3. Kubernetes tests against a real kube-apiserver + etcd on loopback (tests/kube_*.rs);
#   4. packaging and process tests: the chart rendered by Helm's SDK, applied and run as its
#      ServiceAccount (tests/chart.rs); the real binary, signals and the printed commands; the
#      container image built and its entrypoint run from the unpacked image (tests/image).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/provision.sh
# etcd + kube-apiserver, built once and cached by version outside the checkout.
ISTIO_CSR_KUBE_BIN="$(scripts/provision-kube.sh | tail -n 1)"
export ISTIO_CSR_KUBE_BIN

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

echo "== cargo test (unit, gRPC, Kubernetes, process tiers)"
cargo test --locked --all-targets

echo "== independent gRPC client (Python grpcio)"
cargo build --locked --quiet --bin istio-csr-rs
bash tests/interop/run.sh target/debug/istio-csr-rs

echo "== container image (scripts/image.sh; the entrypoint run from the unpacked image)"
# The release binary users get; building it also proves the README's first command builds.
cargo build --locked --release --quiet --bin istio-csr-rs
ISTIO_CSR_IMAGE_BIN=target/release/istio-csr-rs bash tests/image/run.sh

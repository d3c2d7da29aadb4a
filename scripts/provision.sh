#!/usr/bin/env bash
# Installs what the tests need, idempotently: the openssl CLI (tests cross-check against it),
# buildah for the image test, the Python environment of the independent gRPC client
# (tests/interop) and Helm's SDK for the chart tests (tests/chart). Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
# The container image test (tests/image): buildah builds FROM scratch with no registry.
command -v buildah >/dev/null 2>&1 || need_apt+=(buildah)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v pgrep >/dev/null 2>&1 || need_apt+=(procps)
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
if ((${#need_apt[@]})); then
  echo "provision: installing ${need_apt[*]}" >&2
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
  fi
fi

for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

bash tests/interop/setup.sh >/dev/null
# Helm's Go SDK and the Kubernetes schemas for the chart tests (tests/chart.rs).
bash tests/chart/setup.sh >/dev/null

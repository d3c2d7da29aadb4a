#!/usr/bin/env bash
# Installs what the tests need, idempotently: the openssl CLI (tests cross-check against it) and
# the Python environment of the independent gRPC client (tests/interop). Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
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

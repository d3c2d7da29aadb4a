#!/usr/bin/env bash
# Idempotently creates the chart tests' virtualenv with tests/chart/requirements.txt. Prints
# nothing on success; the interpreter is $ISTIO_CSR_CACHE/chart-venv/bin/python
# (ISTIO_CSR_CACHE defaults to ~/.cache/istio-csr-rs), where tests/chart.rs looks for it.
# Also makes sure kubectl is there: tests/chart.rs runs deploy/multicluster/make-remote-secret.sh,
# which uses it (Debian's kubernetes-client when there is none).
set -euo pipefail

if ! command -v kubectl >/dev/null 2>&1; then
    as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    log="$(mktemp)"
    if ! { as_root apt-get update -qq && as_root apt-get install -y -qq kubernetes-client; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "tests/chart/setup.sh: installing kubectl (Debian's kubernetes-client) failed" >&2
        exit 1
    fi
    rm -f "$log"
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements.txt"
cache="${ISTIO_CSR_CACHE:-$HOME/.cache/istio-csr-rs}"
venv="$cache/chart-venv"
py="$venv/bin/python"
stamp="$venv/.requirements.sha256"

mkdir -p "$cache"
if [ ! -x "$py" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
fi

want="$(sha256sum "$req" | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
    log="$(mktemp)"
    if ! "$py" -m pip install --quiet --disable-pip-version-check -r "$req" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "tests/chart/setup.sh: installing $req into $venv failed" >&2
        exit 1
    fi
    rm -f "$log"
    # Prove the install is usable (the SDK loads its native library) before stamping it.
    "$py" -c 'import helm_python, kubernetes_validate; helm_python.helm_sdk_version()'
    printf '%s\n' "$want" > "$stamp"
fi

#!/usr/bin/env bash
# Idempotently create the interop test virtualenv and install tests/interop/requirements.txt.
# The last line printed is the path of the venv's python interpreter.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements.txt"
cache="${ISTIO_CSR_CACHE:-$HOME/.cache/istio-csr-rs}"
venv="$cache/interop-venv"
py="$venv/bin/python"
stamp="$venv/.requirements.sha256"

mkdir -p "$cache"

if [ ! -x "$py" ]; then
    echo "setup.sh: creating venv at $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
fi

want="$(sha256sum "$req" | cut -d' ' -f1)"
have=""
if [ -f "$stamp" ]; then
    have="$(cat "$stamp")"
fi

if [ "$want" != "$have" ]; then
    echo "setup.sh: installing $req" >&2
    "$py" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
    # Prove the install is usable before stamping it.
    "$py" -c 'import grpc, grpc_tools.protoc, cryptography' >&2
    printf '%s\n' "$want" > "$stamp"
else
    echo "setup.sh: requirements already satisfied" >&2
fi

echo "$py"

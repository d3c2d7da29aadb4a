#!/usr/bin/env bash
# Interop test: start istio-csr-rs in standalone mode and run the independent Python client
# (tests/interop/interop_test.py) against it.
#
#   bash tests/interop/run.sh target/debug/istio-csr-rs
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 PATH/TO/istio-csr-rs" >&2
    exit 2
fi
bin="$1"
if [ ! -x "$bin" ]; then
    echo "run.sh: $bin is not an executable" >&2
    exit 2
fi
case "$bin" in
    */*) bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")" ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

py="$(bash "$here/setup.sh" | tail -n 1)"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/istio-csr-interop.XXXXXX")"
log="$tmp/server.log"
data="$tmp/data"
mkdir -p "$data"
server_pid=""
status=1

print_log() {
    echo "----- server log ($log) -----" >&2
    cat "$log" >&2 || true
    echo "----- end of server log -----" >&2
}

# Stop the server with SIGTERM and wait for it (SIGKILL after 10 s). Sets server_rc.
server_rc=""
stop_server() {
    [ -n "$server_pid" ] || return 0
    local pid="$server_pid" rc=0
    server_pid=""
    kill -TERM "$pid" 2>/dev/null || true
    # bash reaps its exited children at once, so kill -0 fails as soon as the server is gone.
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -KILL "$pid" 2>/dev/null; then
        echo "run.sh: server did not exit within 10 s of SIGTERM; sent SIGKILL" >&2
    fi
    wait "$pid" 2>/dev/null || rc=$?
    server_rc=$rc
}

cleanup() {
    local rc=$?
    stop_server
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
addr="127.0.0.1:$port"

echo "run.sh: starting $bin on $addr (data dir $data)" >&2
"$bin" serve --standalone --data-dir "$data" --serving-address "$addr" \
    --admin-address 127.0.0.1:0 >"$log" 2>&1 &
server_pid=$!

# Wait up to 60 s for the TLS port to accept a TCP connection, every 100 ms.
if ! "$py" - "$port" "$server_pid" <<'PYEOF'
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 60.0
def alive():
    try:
        # A zombie (exited, not yet reaped) still answers kill(0); look at /proc too.
        os.kill(pid, 0)
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
while True:
    if not alive():
        print("run.sh: server process %d exited before listening" % pid, file=sys.stderr)
        sys.exit(1)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        sys.exit(0)
    except OSError:
        pass
    if time.monotonic() >= deadline:
        print("run.sh: server not accepting on 127.0.0.1:%d within 60 s" % port, file=sys.stderr)
        sys.exit(1)
    time.sleep(0.1)
PYEOF
then
    print_log
    exit 1
fi
echo "run.sh: server is accepting connections on $addr" >&2

set +e
"$py" "$here/interop_test.py" --address "$addr" --data-dir "$data"
status=$?
set -e

stop_server
echo "run.sh: server exited with status $server_rc" >&2

if [ "$status" -ne 0 ]; then
    print_log
fi
exit "$status"

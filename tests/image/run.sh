#!/usr/bin/env bash
# Packaging test of the container image (tier 4). Containers cannot run on this machine
# (cgroups), so this does what a runtime would, by hand:
#   1. build the image with scripts/image.sh (private buildah storage) and export an OCI archive;
#   2. unpack it: index.json -> manifest -> config + layers (digests checked, layers applied in
#      order, whiteouts honoured) into a root filesystem, and check the config and the files;
#   3. run the image's entrypoint + `serve --standalone` from that root filesystem: chroot as
#      65532:65532 with the image's environment, in a private mount namespace where the root is
#      a read-only bind mount and only the data directory (a directory owned by 65532,
#      bind-mounted at the image's ISTIO_CSR_DATA_DIR) is writable;
#   4. wait for /readyz, request a certificate with the host's binary, `openssl verify` it,
#      SIGTERM the server and expect exit status 0.
# Mounts live only in the server's mount namespace, so they vanish with it on every exit path.
#
#   bash tests/image/run.sh                 builds the release binary (cargo build --release)
#   ISTIO_CSR_IMAGE_BIN=target/debug/istio-csr-rs bash tests/image/run.sh    reuses a binary
#
# Needs root (chroot, mount namespaces), python3, openssl, curl; buildah is installed by
# scripts/image.sh when missing. Every step has a time bound; the last line is the result.
set -euo pipefail
umask 022

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build_timeout="${ISTIO_CSR_IMAGE_TEST_BUILD_TIMEOUT:-2700}" # a cold release build, 2 cores
ready_timeout=60
uid=65532

tmp=""
log=""
server_pid=""
passed=0

say() { echo "image test: $*" >&2; }
fail() {
  say "FAIL: $*"
  exit 1
}

print_log() {
  [ -n "$log" ] && [ -s "$log" ] || return 0
  echo "----- server log ($log) -----" >&2
  cat "$log" >&2 || true
  echo "----- end of server log -----" >&2
}

# SIGTERM the server and wait for it, SIGKILL after 30 s (its default drain is 10 s).
# Sets server_rc to its exit status.
server_rc=""
stop_server() {
  [ -n "$server_pid" ] || return 0
  local pid="$server_pid" rc=0
  server_pid=""
  kill -TERM "$pid" 2>/dev/null || true
  # bash reaps its exited children at once, so kill -0 fails as soon as the server is gone.
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -KILL "$pid" 2>/dev/null; then
    say "the server did not exit within 30 s of SIGTERM; sent SIGKILL"
  fi
  wait "$pid" 2>/dev/null || rc=$?
  server_rc=$rc
}

# Runs "$@" under timeout(1) in the background and waits for it, so that a signal to this
# script is handled at once (the trap stops the step) rather than after the step ends.
step_pid=""
bounded() {
  local seconds="$1" rc=0
  shift
  # <&0: a background command would otherwise read /dev/null instead of our stdin.
  timeout --kill-after=10 "$seconds" "$@" <&0 &
  step_pid=$!
  wait "$step_pid" || rc=$?
  step_pid=""
  [ "$rc" -ne 124 ] || say "timed out after $seconds s: $*"
  return "$rc"
}

finish() {
  local rc=$?
  trap - EXIT
  set +e
  # A signal may arrive while a step runs with its output redirected: report on the originals.
  exec 1>&3 2>&4
  if [ -n "$step_pid" ]; then
    # timeout(1) passes the signal on to its process group (the step and its children, e.g.
    # cargo or buildah), which must be gone before their files are deleted.
    kill -TERM "$step_pid" 2>/dev/null
    wait "$step_pid" 2>/dev/null
    for _ in $(seq 1 100); do
      pgrep -g "$step_pid" >/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$step_pid" 2>/dev/null
  fi
  stop_server
  if [ "$rc" -ne 0 ] || [ "$passed" -ne 1 ]; then
    print_log
  fi
  if [ -n "$tmp" ] && [ -d "$tmp" ]; then
    # Nothing is mounted in this namespace; should something be, never delete through it.
    if findmnt -rn -o TARGET | grep -qF "$tmp"; then
      findmnt -rn -o TARGET | grep -F "$tmp" | sort -r | xargs -r -n1 umount -l || true
    fi
    rm -rf "$tmp"
  fi
  if [ "$rc" -eq 0 ] && [ "$passed" -eq 1 ]; then
    echo "image: 1 passed, 0 failed"
    exit 0
  fi
  echo "image: 0 passed, 1 failed"
  [ "$rc" -ne 0 ] || rc=1
  exit "$rc"
}
exec 3>&1 4>&2
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" -eq 0 ] || fail "needs root (chroot and mount namespaces); run it as root or with sudo"
for tool in python3 openssl curl chroot unshare mount findmnt timeout pgrep; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is missing (scripts/provision.sh installs what is needed)"
done
py="$(command -v python3)"
chroot_bin="$(command -v chroot)"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/istio-csr-image.XXXXXX")"
root="$tmp/rootfs"
data="$tmp/data"
log="$tmp/server.log"

# 1. Build and export. The binary packaged is also the host's client below.
if [ -n "${ISTIO_CSR_IMAGE_BIN:-}" ]; then
  case "$ISTIO_CSR_IMAGE_BIN" in /*) host_bin="$ISTIO_CSR_IMAGE_BIN" ;; *) host_bin="$PWD/$ISTIO_CSR_IMAGE_BIN" ;; esac
else
  host_bin="${CARGO_TARGET_DIR:-target}/release/istio-csr-rs"
  case "$host_bin" in /*) ;; *) host_bin="$repo/$host_bin" ;; esac
fi
export ISTIO_CSR_IMAGE_BIN="${ISTIO_CSR_IMAGE_BIN:+$host_bin}"
say "building the image with scripts/image.sh (at most $build_timeout s)"
started=$SECONDS
STORAGE_DRIVER=vfs bounded "$build_timeout" "$repo/scripts/image.sh" build \
  --tag localhost/istio-csr-rs:image-test --storage-root "$tmp/buildah" \
  --context "$tmp/context" --oci-archive "$tmp/image.oci.tar" >/dev/null ||
  fail "scripts/image.sh build failed"
say "image built and exported in $((SECONDS - started)) s"
[ -x "$host_bin" ] || fail "$host_bin (the host's client) is missing"

# 2. Unpack the OCI archive and check what it holds. Prints the image's environment, one
# VAR=value a line, into $tmp/env, and its data directory into $tmp/data-dir.
say "unpacking $tmp/image.oci.tar"
bounded 300 "$py" - "$tmp/image.oci.tar" "$tmp/oci" "$root" "$tmp" "$uid" \
  "$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$repo/Cargo.toml" | head -n 1)" <<'PYEOF'
import gzip, hashlib, json, os, shutil, stat, sys, tarfile

archive, layout, root, out, uid, version = sys.argv[1:7]
uid = int(uid)
errors = []

def check(cond, message):
    if not cond:
        errors.append(message)
    return cond

def safe_name(name):
    parts = name.split("/")
    return not name.startswith("/") and ".." not in parts

def extract(tf, member, dest):
    kwargs = {"numeric_owner": True}
    if hasattr(tarfile, "fully_trusted_filter"):  # names are checked by safe_name
        kwargs["filter"] = "fully_trusted"
    tf.extract(member, dest, **kwargs)

os.makedirs(layout)
with tarfile.open(archive) as tf:
    for m in tf.getmembers():
        if not safe_name(m.name):
            sys.exit("unsafe path in the archive: %r" % m.name)
        extract(tf, m, layout)

def blob(desc, want_type=None):
    if want_type:
        check(desc["mediaType"] == want_type, "%s is a %s, not a %s" % (desc["digest"], desc["mediaType"], want_type))
    alg, hexdigest = desc["digest"].split(":", 1)
    path = os.path.join(layout, "blobs", alg, hexdigest)
    with open(path, "rb") as f:
        content = f.read()
    if hashlib.new(alg, content).hexdigest() != hexdigest or len(content) != desc["size"]:
        sys.exit("blob %s does not match its descriptor" % desc["digest"])
    return content

with open(os.path.join(layout, "oci-layout")) as f:
    check(json.load(f).get("imageLayoutVersion") == "1.0.0", "oci-layout is not version 1.0.0")
with open(os.path.join(layout, "index.json")) as f:
    index = json.load(f)
manifests = index["manifests"]
if len(manifests) != 1:
    sys.exit("index.json lists %d manifests, expected 1" % len(manifests))
manifest = json.loads(blob(manifests[0], "application/vnd.oci.image.manifest.v1+json"))
config = json.loads(blob(manifest["config"], "application/vnd.oci.image.config.v1+json"))
check(config.get("os") == "linux" and config.get("architecture") == "amd64",
      "platform is %s/%s, not linux/amd64" % (config.get("os"), config.get("architecture")))
diff_ids = config["rootfs"]["diff_ids"]
layers = manifest["layers"]
if len(diff_ids) != len(layers):
    sys.exit("%d layers but %d diff_ids" % (len(layers), len(diff_ids)))

# Apply the layers in order, as a runtime's snapshotter would.
os.makedirs(root)
os.chmod(root, 0o755)
for desc, diff_id in zip(layers, diff_ids):
    media = desc["mediaType"]
    content = blob(desc)
    if media.endswith(".tar+gzip") or media.endswith(".tar.gzip"):
        content = gzip.decompress(content)
    elif not media.endswith(".tar"):
        sys.exit("unsupported layer media type %s" % media)
    if "sha256:" + hashlib.sha256(content).hexdigest() != diff_id:
        sys.exit("layer %s does not match diff_id %s" % (desc["digest"], diff_id))
    path = os.path.join(out, "layer.tar")
    with open(path, "wb") as f:
        f.write(content)
    with tarfile.open(path) as tf:
        members = tf.getmembers()
        for m in members:  # whiteouts first: they delete what lower layers made
            if not safe_name(m.name):
                sys.exit("unsafe path in a layer: %r" % m.name)
            d, base = os.path.split(m.name.rstrip("/"))
            if base == ".wh..wh..opq":
                target = os.path.join(root, d)
                for entry in os.listdir(target) if os.path.isdir(target) else []:
                    p = os.path.join(target, entry)
                    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
            elif base.startswith(".wh."):
                p = os.path.join(root, d, base[4:])
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                elif os.path.lexists(p):
                    os.unlink(p)
        for m in members:
            if os.path.basename(m.name.rstrip("/")).startswith(".wh."):
                continue
            p = os.path.join(root, m.name)
            if os.path.lexists(p) and not (m.isdir() and os.path.isdir(p)):
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
            extract(tf, m, root)
    os.unlink(path)

c = config.get("config", {})
entrypoint = "/usr/local/bin/istio-csr-rs"
check(c.get("User") in ("65532", "65532:65532"), "User is %r, not 65532" % c.get("User"))
check(c.get("Entrypoint") == [entrypoint], "Entrypoint is %r" % c.get("Entrypoint"))
check(c.get("Cmd") == ["serve"], "Cmd is %r" % c.get("Cmd"))
ports = set((c.get("ExposedPorts") or {}).keys())
check({"6443/tcp", "9402/tcp"} <= ports, "ExposedPorts is %r" % sorted(ports))
env = dict(e.split("=", 1) for e in c.get("Env") or [])
data_dir = env.get("ISTIO_CSR_DATA_DIR", "")
check(data_dir.startswith("/"), "no absolute ISTIO_CSR_DATA_DIR in Env %r" % c.get("Env"))
labels = c.get("Labels") or {}
for key, want in [("org.opencontainers.image.title", "istio-csr-rs"),
                  ("org.opencontainers.image.version", version),
                  ("org.opencontainers.image.licenses", "Apache-2.0")]:
    check(labels.get(key) == want, "label %s is %r, not %r" % (key, labels.get(key), want))
check(labels.get("org.opencontainers.image.revision", "unknown") != "unknown",
      "label org.opencontainers.image.revision is missing")

# The files: root's and read-only for everyone else, but the data directory (65532's);
# an entrypoint that is an executable file; no shell.
entries = [root]
for dirpath, dirnames, filenames in os.walk(root):
    entries += [os.path.join(dirpath, name) for name in dirnames + filenames]
files = []
for p in entries:
    st = os.lstat(p)
    rel = "/" if p == root else "/" + os.path.relpath(p, root)
    files.append("%s  %d:%d %04o" % (rel, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)))
    if rel == data_dir:
        check((st.st_uid, st.st_gid) == (uid, uid), "%s is owned by %d:%d, not %d:%d" % (rel, st.st_uid, st.st_gid, uid, uid))
        check(stat.S_ISDIR(st.st_mode), "%s is not a directory" % rel)
        continue
    check((st.st_uid, st.st_gid) == (0, 0), "%s is owned by %d:%d, not root" % (rel, st.st_uid, st.st_gid))
    if not stat.S_ISLNK(st.st_mode):
        check(st.st_mode & 0o022 == 0, "%s is writable by group or others (mode %04o)" % (rel, stat.S_IMODE(st.st_mode)))
        check(st.st_mode & 0o6000 == 0, "%s is setuid or setgid" % rel)
ep = os.path.join(root, entrypoint.lstrip("/"))
check(os.path.isfile(ep) and os.access(ep, os.X_OK), "the entrypoint %s is not an executable file" % entrypoint)
for shell in ("bin/sh", "bin/bash", "usr/bin/sh"):
    check(not os.path.lexists(os.path.join(root, shell)), "the image has a shell: /%s" % shell)

print("image config: User=%s Entrypoint=%s Cmd=%s ExposedPorts=%s" % (
    c.get("User"), c.get("Entrypoint"), c.get("Cmd"), sorted(ports)), file=sys.stderr)
print("image files (%d layer(s)):" % len(layers), file=sys.stderr)
for rel in sorted(files):
    print("  " + rel, file=sys.stderr)
if errors:
    for e in errors:
        print("image test: FAIL: " + e, file=sys.stderr)
    sys.exit(1)
with open(os.path.join(out, "env"), "w") as f:
    for e in c.get("Env") or []:
        f.write(e + "\n")
with open(os.path.join(out, "data-dir"), "w") as f:
    f.write(data_dir + "\n")
PYEOF
[ -s "$tmp/data-dir" ] || fail "unpacking the image gave no result"
rm -rf "$tmp/oci" "$tmp/buildah"
mapfile -t image_env <"$tmp/env"
image_data_dir="$(cat "$tmp/data-dir")"
say "config and files are as expected (data dir $image_data_dir)"

# 3. Run the entrypoint from the root filesystem. The data directory lives outside it, owned by
# 65532, so the host can read what the server writes; /proc and /dev are the mount points a
# runtime would provide (they are made before the root turns read-only).
mkdir -m 0700 "$data"
chown "$uid:$uid" "$data"
mkdir -p "$root/proc" "$root/dev"
for node in null zero random urandom; do : >"$root/dev/$node"; done
read -r grpc_port admin_port < <("$py" -c '
import socket
a, b = socket.socket(), socket.socket()
a.bind(("127.0.0.1", 0)); b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])')
say "starting the entrypoint in $root as $uid:$uid: serve --standalone on 127.0.0.1:$grpc_port, admin 127.0.0.1:$admin_port"
# Without --fork, unshare, sh, env and chroot each exec the next: $! is the server itself.
# shellcheck disable=SC2016 # the inner script expands its own positional parameters
unshare --mount --propagation private -- /bin/sh -euc '
  root="$1" data="$2" datadir="$3"; shift 3
  mount --bind "$root" "$root"
  mount -o remount,bind,ro,nosuid,nodev "$root"
  mount --bind "$data" "$root$datadir"
  mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
  for node in null zero random urandom; do mount --bind "/dev/$node" "$root/dev/$node"; done
  exec "$@"
' sh "$root" "$data" "$image_data_dir" \
  env -i "${image_env[@]}" "$chroot_bin" --userspec="$uid:$uid" --groups="$uid" "$root" \
  /usr/local/bin/istio-csr-rs serve --standalone \
  --serving-address "127.0.0.1:$grpc_port" --admin-address "127.0.0.1:$admin_port" \
  >"$log" 2>&1 &
server_pid=$!

# 4. Ready within $ready_timeout s (polled every 100 ms; the server must stay alive).
deadline=$((SECONDS + ready_timeout))
until curl -fsS --max-time 1 "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1; do
  kill -0 "$server_pid" 2>/dev/null || {
    wait "$server_pid" && rc=0 || rc=$?
    server_pid=""
    fail "the server exited with status $rc before it was ready"
  }
  [ "$SECONDS" -lt "$deadline" ] || fail "/readyz did not answer 200 within $ready_timeout s"
  sleep 0.1
done
say "ready"

# Whom it runs as and what it may write: the process's own view.
status="/proc/$server_pid/status"
grep -Eq "^Uid:\s+$uid\s+$uid\s+$uid\s+$uid$" "$status" || fail "the server does not run as uid $uid: $(grep ^Uid: "$status")"
grep -Eq "^Gid:\s+$uid\s+$uid\s+$uid\s+$uid$" "$status" || fail "the server does not run as gid $uid: $(grep ^Gid: "$status")"
grep -Eq "^Groups:\s*($uid)?\s*$" "$status" || fail "the server has other groups: $(grep ^Groups: "$status")"
grep -Eq "^CapEff:\s+0+$" "$status" || fail "the server has capabilities: $(grep ^CapEff: "$status")"
[ "$(readlink "/proc/$server_pid/root")" = "$root" ] || fail "the server's root is not $root"
mount_options() { awk -v m="$1" '$5 == m { print $6 }' "/proc/$server_pid/mountinfo" | tail -n 1; }
case ",$(mount_options /)," in *,ro,*) ;; *) fail "the server's / is not read-only: $(mount_options /)" ;; esac
case ",$(mount_options "$image_data_dir")," in *,rw,*) ;; *) fail "the data directory is not writable" ;; esac
for file in ca/ca-key.pem ca/ca-cert.pem tokens.csv token root-cert.pem; do
  [ -f "$data/$file" ] || fail "standalone mode did not create $image_data_dir/$file"
  [ "$(stat -c %u:%g "$data/$file")" = "$uid:$uid" ] || fail "$image_data_dir/$file is not owned by $uid"
done
[ "$(stat -c %a "$data/ca/ca-key.pem")" = 600 ] || fail "the CA key is not mode 0600"
say "runs as $uid:$uid without capabilities, / read-only, writes only $image_data_dir"

# The host's client asks for a certificate, as a workload would.
out="$tmp/workload"
bounded 60 "$host_bin" request --address "127.0.0.1:$grpc_port" --root-cert "$data/root-cert.pem" \
  --token-file "$data/token" --out-dir "$out" >"$tmp/request.out" 2>&1 || {
  cat "$tmp/request.out" >&2
  fail "istio-csr-rs request failed"
}
cat "$tmp/request.out" >&2
openssl verify -CAfile "$data/root-cert.pem" -untrusted "$out/cert-chain.pem" "$out/cert-chain.pem" >&2 ||
  fail "openssl verify rejected the issued chain"
openssl x509 -in "$out/cert-chain.pem" -noout -ext subjectAltName |
  grep -q "URI:spiffe://cluster.local/ns/default/sa/default" ||
  fail "the certificate is not for spiffe://cluster.local/ns/default/sa/default"

stop_server
[ "$server_rc" = 0 ] || fail "the server exited with status $server_rc after SIGTERM, not 0"
say "SIGTERM: the server exited with status 0"
passed=1

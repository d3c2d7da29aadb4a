#!/usr/bin/env bash
# Builds the istio-csr-rs container image offline: FROM scratch, the release binary plus only the
# shared libraries `ldd` lists for it (and the dynamic loader), built with buildah (installed
# from Debian if missing). Run `scripts/image.sh help` for the commands and the docker way.
set -euo pipefail
umask 022 # the image's directories must be traversable by 65532

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$repo/Cargo.toml" | head -n 1)"
version="${version:-0.0.0}"
marker=".istio-csr-rs-image-context"

usage() {
  cat <<EOF
usage: scripts/image.sh [build] [OPTIONS]     stage a build context, then build the image with buildah
       scripts/image.sh stage DIR [--bin PATH]   only write the build context into DIR
       scripts/image.sh help

Options (each also read from the environment variable shown):
  --bin PATH           use this istio-csr-rs binary instead of running          ISTIO_CSR_IMAGE_BIN
                       cargo build --release --locked --bin istio-csr-rs
  --tag NAME           image name [default: localhost/istio-csr-rs:$version]   ISTIO_CSR_IMAGE_TAG
  --context DIR        where to stage the build context                     ISTIO_CSR_IMAGE_CONTEXT
                       [default: target/image/context]
  --oci-archive PATH   also export the image as an OCI archive to PATH      ISTIO_CSR_IMAGE_ARCHIVE
  --storage-root DIR   private buildah storage (--root DIR/storage,        ISTIO_CSR_IMAGE_STORAGE_ROOT
                       --runroot DIR/run) instead of the system's
buildah also honours STORAGE_DRIVER (e.g. vfs) and SOURCE_DATE_EPOCH sets the image's timestamps
[default: the time of the last commit], so rebuilding the same inputs gives the same image.

The build context is a directory with rootfs/ (every file at its path in the image: the binary
at /usr/local/bin/istio-csr-rs, the libraries and the loader where ldd found them, a minimal
/etc) and data/istio-csr-rs/ (the data directory, owned by 65532 in the image). With docker:

  scripts/image.sh stage /tmp/istio-csr-rs-context
  docker build -f Containerfile -t istio-csr-rs:$version \\
    --build-arg VERSION=$version --build-arg REVISION="\$(git rev-parse HEAD)" /tmp/istio-csr-rs-context
  docker run --rm --read-only -p 127.0.0.1:6443:6443 -p 127.0.0.1:9402:9402 \\
    --tmpfs /var/lib/istio-csr-rs:uid=65532,gid=65532,mode=0700 istio-csr-rs:$version serve --standalone

An OCI archive made with --oci-archive loads with 'podman load -i PATH' or
'skopeo copy oci-archive:PATH docker-daemon:istio-csr-rs:$version'.
EOF
}

say() { echo "image.sh: $*" >&2; }
die() {
  say "error: $*"
  exit 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  else
    sudo "$@"
  fi
}

ensure_buildah() {
  command -v buildah >/dev/null 2>&1 && return 0
  say "buildah is missing; installing Debian's buildah with apt-get"
  command -v apt-get >/dev/null 2>&1 || die "buildah is missing and there is no apt-get to install it"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    buildah >/dev/null
  command -v buildah >/dev/null 2>&1 || die "apt-get install buildah did not provide buildah"
}

# Prints the absolute path of the binary to package, building it when none was given.
resolve_binary() {
  local bin="$1"
  if [ -z "$bin" ]; then
    say "cargo build --release --locked --bin istio-csr-rs"
    (cd "$repo" && cargo build --release --locked --bin istio-csr-rs) >&2
    bin="${CARGO_TARGET_DIR:-target}/release/istio-csr-rs"
    case "$bin" in /*) ;; *) bin="$repo/$bin" ;; esac
  fi
  if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then
    die "$bin is not an executable file"
  fi
  (cd "$(dirname "$bin")" && echo "$(pwd -P)/$(basename "$bin")")
}

# The absolute paths of the shared objects the binary needs, the dynamic loader included.
shared_objects() {
  local bin="$1" out
  if ! out="$(LC_ALL=C ldd "$bin" 2>&1)"; then
    case "$out" in
      *"not a dynamic executable"*) return 0 ;;
      *) die "ldd $bin failed: $out" ;;
    esac
  fi
  case "$out" in *"statically linked"*) return 0 ;; esac
  if grep -q "not found" <<<"$out"; then
    die "ldd cannot resolve every library of $bin:"$'\n'"$out"
  fi
  # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)";
  # linux-vdso.so.1 lives in the kernel and has no path.
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $2 != "=>" && $1 ~ /^\// { print $1 }' <<<"$out" |
    sort -u
}

# Writes the build context into $2 (see usage). Safe to repeat: it replaces a directory it made
# before, and refuses to touch any other non-empty one.
stage() {
  local bin="$1" dir="$2" epoch="$3" so found libs=()
  if [ -e "$dir" ] && [ ! -e "$dir/$marker" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
    die "$dir exists, is not empty and was not staged by this script; choose another directory"
  fi
  found="$(shared_objects "$bin")"
  [ -z "$found" ] || mapfile -t libs <<<"$found"
  rm -rf "$dir"
  mkdir -p "$dir/rootfs/usr/local/bin" "$dir/rootfs/etc" "$dir/rootfs/var/lib" \
    "$dir/data/istio-csr-rs"
  : >"$dir/$marker"
  install -m 0755 "$bin" "$dir/rootfs/usr/local/bin/istio-csr-rs"
  for so in "${libs[@]}"; do
    # The file itself (not the distribution's symlink to it) at the path the loader looks up.
    install -D -m 0755 "$(readlink -f "$so")" "$dir/rootfs$so"
  done
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/var/lib/istio-csr-rs:/sbin/nologin' >"$dir/rootfs/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$dir/rootfs/etc/group"
  printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >"$dir/rootfs/etc/nsswitch.conf"
  chmod 0644 "$dir/rootfs/etc/passwd" "$dir/rootfs/etc/group" "$dir/rootfs/etc/nsswitch.conf"
  chmod 0755 "$dir/rootfs" "$dir/rootfs/etc" "$dir/rootfs/var" "$dir/rootfs/var/lib"
  chmod 0700 "$dir/data/istio-csr-rs"
  cp "$repo/Containerfile" "$dir/Containerfile"
  if [ -n "$epoch" ]; then
    find "$dir" -exec touch -h -d "@$epoch" {} +
  fi
  say "staged $dir:"
  (cd "$dir/rootfs" && find . -type f -printf '  /%P  %s bytes\n' | sort) >&2
}

source_date_epoch() {
  if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
    echo "$SOURCE_DATE_EPOCH"
  else
    git -C "$repo" log -1 --format=%ct 2>/dev/null || true
  fi
}

revision() {
  local rev
  rev="$(git -C "$repo" rev-parse HEAD 2>/dev/null)" || {
    echo unknown
    return
  }
  git -C "$repo" diff --quiet HEAD -- 2>/dev/null || rev="$rev-dirty"
  echo "$rev"
}

cmd="build"
case "${1:-}" in
  build | stage) cmd="$1" && shift ;;
  help | -h | --help)
    usage
    exit 0
    ;;
esac

bin="${ISTIO_CSR_IMAGE_BIN:-}"
tag="${ISTIO_CSR_IMAGE_TAG:-localhost/istio-csr-rs:$version}"
context="${ISTIO_CSR_IMAGE_CONTEXT:-$repo/target/image/context}"
archive="${ISTIO_CSR_IMAGE_ARCHIVE:-}"
storage_root="${ISTIO_CSR_IMAGE_STORAGE_ROOT:-}"
if [ "$cmd" = stage ]; then
  if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    usage >&2
    die "stage needs a directory"
  fi
  context="$1"
  shift
fi
while [ $# -gt 0 ]; do
  case "$1" in
    --bin | --tag | --context | --oci-archive | --storage-root)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --bin) bin="$2" ;;
        --tag) tag="$2" ;;
        --context) context="$2" ;;
        --oci-archive) archive="$2" ;;
        --storage-root) storage_root="$2" ;;
      esac
      shift 2
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      usage >&2
      die "unknown argument: $1"
      ;;
  esac
done
if [ "$cmd" = stage ] && { [ -n "$archive" ] || [ -n "$storage_root" ]; }; then
  die "--oci-archive and --storage-root belong to build, not stage"
fi

case "$context" in /*) ;; *) context="$PWD/$context" ;; esac
epoch="$(source_date_epoch)"
bin="$(resolve_binary "$bin")"
stage "$bin" "$context" "$epoch"
if [ "$cmd" = stage ]; then
  say "build it with: docker build -f Containerfile -t istio-csr-rs:$version $context"
  exit 0
fi

ensure_buildah
buildah=(buildah)
if [ -n "$storage_root" ]; then
  mkdir -p "$storage_root"
  storage_root="$(cd "$storage_root" && pwd -P)"
  buildah+=(--root "$storage_root/storage" --runroot "$storage_root/run")
fi

build_args=(--format oci --isolation chroot -f "$context/Containerfile" -t "$tag"
  --build-arg "VERSION=$version" --build-arg "REVISION=$(revision)")
[ -z "$epoch" ] || build_args+=(--timestamp "$epoch")

old_id="$("${buildah[@]}" images --noheading --no-trunc --format '{{.ID}}' "$tag" 2>/dev/null || true)"
say "buildah build -t $tag"
"${buildah[@]}" build --quiet "${build_args[@]}" "$context" >/dev/null
new_id="$("${buildah[@]}" images --noheading --no-trunc --format '{{.ID}}' "$tag")"
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
  # The previous build of this tag is now untagged: drop it rather than let them pile up.
  "${buildah[@]}" rmi "$old_id" >/dev/null 2>&1 || true
fi
say "built $tag (image ID $new_id)"

if [ -n "$archive" ]; then
  case "$archive" in /*) ;; *) archive="$PWD/$archive" ;; esac
  mkdir -p "$(dirname "$archive")"
  ref="${tag##*/}"
  rm -f "$archive.partial"
  "${buildah[@]}" push --quiet "$tag" "oci-archive:$archive.partial:$ref" >/dev/null
  mv -f "$archive.partial" "$archive"
  say "exported $tag to $archive (OCI archive, reference $ref)"
fi
echo "$tag"

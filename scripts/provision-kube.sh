#!/usr/bin/env bash
# Provides etcd and kube-apiserver for the Kubernetes test tier, idempotently, cached outside
# the checkout by version: etcd from Debian's etcd-server, kube-apiserver built from Debian's
# `kubernetes` source package (it carries its vendor/ tree, so it builds offline with Debian's
# Go). Prints the directory holding both binaries on its last line.
#
# Known trap (architecture.md): built with Go >= 1.18, the vendored modern-go/reflect2 1.0.1
# makes the apiserver crash on the first custom-resource request; it is replaced by Debian's
# golang-github-modern-go-reflect2-dev (1.0.2, same API) before building.
set -euo pipefail

cache="${ISTIO_CSR_CACHE:-$HOME/.cache/istio-csr-rs}"
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
log() { echo "provision-kube: $*" >&2; }

# A deb-src entry derived from the machine's own Debian sources (no host name written here).
src_list=/etc/apt/sources.list.d/istio-csr-rs-deb-src.sources
if [ ! -f "$src_list" ]; then
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources | as_root tee "$src_list" >/dev/null
  elif [ -f /etc/apt/sources.list ]; then
    grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' \
      | as_root tee "${src_list%.sources}.list" >/dev/null
    src_list="${src_list%.sources}.list"
  else
    log "no Debian sources file found to derive a deb-src entry from"; exit 1
  fi
  as_root apt-get update -qq
fi

version="$(apt-cache showsrc kubernetes 2>/dev/null | awk '/^Version:/ {print $2; exit}')"
if [ -z "$version" ]; then
  as_root apt-get update -qq
  version="$(apt-cache showsrc kubernetes | awk '/^Version:/ {print $2; exit}')"
fi
[ -n "$version" ] || { log "Debian has no kubernetes source package here"; exit 1; }
out="$cache/kube/$version"

if ! command -v etcd >/dev/null 2>&1; then
  log "installing etcd-server"
  as_root apt-get install -y -qq etcd-server >/dev/null
  # The package starts a system etcd on 2379; tests run their own on free ports.
  as_root systemctl disable --now etcd >/dev/null 2>&1 || true
  as_root pkill -x etcd >/dev/null 2>&1 || true
fi

if [ ! -x "$out/kube-apiserver" ]; then
  log "building kube-apiserver $version from Debian's source package (a few minutes, once)"
  as_root apt-get install -y -qq golang-go rsync jq make dpkg-dev \
    golang-github-modern-go-reflect2-dev >/dev/null
  work="$cache/kube/build-$version"
  rm -rf "$work" && mkdir -p "$work"
  (cd "$work" && apt-get source -qq --download-only "kubernetes=$version" >/dev/null \
     && dpkg-source -x --skip-patches ./*.dsc src >/dev/null 2>&1 || dpkg-source -x ./*.dsc src >/dev/null)
  tree="$work/src"
  reflect2_src=/usr/share/gocode/src/github.com/modern-go/reflect2
  reflect2_dst="$tree/vendor/github.com/modern-go/reflect2"
  [ -d "$reflect2_src" ] && [ -d "$reflect2_dst" ] || { log "reflect2 sources not where expected"; exit 1; }
  find "$reflect2_dst" -maxdepth 1 -type f -name '*.go' -delete
  cp "$reflect2_src"/*.go "$reflect2_dst"/
  (cd "$tree" && GOFLAGS=-mod=vendor GOPROXY=off GO111MODULE=on \
     make WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1) \
    || { tail -40 "$work/build.log" >&2; log "kube-apiserver build failed"; exit 1; }
  mkdir -p "$out"
  cp "$tree/_output/bin/kube-apiserver" "$out/kube-apiserver.tmp"
  mv "$out/kube-apiserver.tmp" "$out/kube-apiserver"
  rm -rf "$work"
fi
ln -sf "$(command -v etcd)" "$out/etcd"
"$out/kube-apiserver" --version >&2
echo "$out"

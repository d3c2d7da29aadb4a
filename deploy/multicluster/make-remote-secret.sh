#!/usr/bin/env bash
# Prints the multi-cluster Secret for one remote cluster, to apply in the PRIMARY cluster.
#   deploy/multicluster/make-remote-secret.sh --context remote-1 --cluster-id remote-1 \
#     [--server https://remote-1.example:6443] [--namespace istio-csr-rs-remotes] \
#     [--wait 30] | kubectl --context primary apply -f -
# Needs kubectl and remote-rbac.yaml applied in the remote cluster. The kubeconfig it writes has
# only inline data (token and CA), as istio-csr-rs requires. --namespace is the primary's
# namespace for these Secrets (istio-csr-rs's --multicluster-secret-namespace, the chart's
# app.multicluster.secretNamespace); it must exist there. Kubernetes' token controller fills
# the token Secret a moment after remote-rbac.yaml is applied: the script waits for it up to
# --wait seconds.
set -euo pipefail
context="" cluster_id="" server="" namespace="istio-csr-rs-remotes" wait_seconds=30
while [ $# -gt 0 ]; do
  case "$1" in
    --context) context="$2"; shift 2 ;;
    --cluster-id) cluster_id="$2"; shift 2 ;;
    --server) server="$2"; shift 2 ;;
    --namespace) namespace="$2"; shift 2 ;;
    --wait) wait_seconds="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ -n "$context" ] && [ -n "$cluster_id" ] || {
  echo "usage: $0 --context KUBECONTEXT --cluster-id ID [--server URL] [--namespace NS] [--wait SECONDS]" >&2
  exit 2
}
case "$wait_seconds" in
  '' | *[!0-9]*) echo "--wait takes a whole number of seconds, not: $wait_seconds" >&2; exit 2 ;;
esac
k() { kubectl --context "$context" "$@"; }
if [ -z "$server" ]; then
  cluster="$(k config view --minify -o jsonpath='{.contexts[0].context.cluster}')"
  server="$(k config view -o jsonpath="{.clusters[?(@.name==\"$cluster\")].cluster.server}")"
fi
secret=istio-csr-rs-remote-token
if ! out="$(k -n istio-system get secret "$secret" -o name 2>&1)"; then
  case "$out" in
    *NotFound* | *"not found"*)
      echo "no Secret istio-system/$secret in $context: apply deploy/multicluster/remote-rbac.yaml there first" >&2 ;;
    *) echo "reading Secret istio-system/$secret in $context failed: $out" >&2 ;;
  esac
  exit 1
fi
# The token controller fills the Secret about a second after it is created: poll, bounded.
deadline=$((SECONDS + wait_seconds))
while :; do
  token="$(k -n istio-system get secret "$secret" -o jsonpath='{.data.token}')"
  ca="$(k -n istio-system get secret "$secret" -o jsonpath='{.data.ca\.crt}')"
  [ -n "$token" ] && [ -n "$ca" ] && break
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "Secret istio-system/$secret in $context has no token after ${wait_seconds}s: is the" \
      "controller-manager (its token controller) running there? Retry in a moment, or with a" \
      "longer --wait." >&2
    exit 1
  fi
  sleep 1
done
token="$(printf '%s' "$token" | base64 -d)"
cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: istio-remote-secret-${cluster_id}
  namespace: ${namespace}
  labels:
    istio/multiCluster: "true"
  annotations:
    networking.istio.io/cluster: ${cluster_id}
stringData:
  ${cluster_id}: |
    apiVersion: v1
    kind: Config
    clusters:
    - name: ${cluster_id}
      cluster:
        server: ${server}
        certificate-authority-data: ${ca}
    users:
    - name: istio-csr-rs-remote
      user:
        token: ${token}
    contexts:
    - name: ${cluster_id}
      context:
        cluster: ${cluster_id}
        user: istio-csr-rs-remote
    current-context: ${cluster_id}
YAML

#!/usr/bin/env bash
# Prints the multi-cluster Secret for one remote cluster, to apply in the PRIMARY cluster.
#   deploy/multicluster/make-remote-secret.sh --context remote-1 --cluster-id remote-1 \
#     [--server https://remote-1.example:6443] | kubectl --context primary apply -f -
# Needs kubectl and remote-rbac.yaml applied in the remote cluster. The kubeconfig it writes has
# only inline data (token and CA), as istio-csr-rs requires.
set -euo pipefail
context="" cluster_id="" server="" namespace="istio-system"
while [ $# -gt 0 ]; do
  case "$1" in
    --context) context="$2"; shift 2 ;;
    --cluster-id) cluster_id="$2"; shift 2 ;;
    --server) server="$2"; shift 2 ;;
    --namespace) namespace="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ -n "$context" ] && [ -n "$cluster_id" ] || {
  echo "usage: $0 --context KUBECONTEXT --cluster-id ID [--server URL] [--namespace NS]" >&2
  exit 2
}
k() { kubectl --context "$context" "$@"; }
if [ -z "$server" ]; then
  cluster="$(k config view --minify -o jsonpath='{.contexts[0].context.cluster}')"
  server="$(k config view -o jsonpath="{.clusters[?(@.name==\"$cluster\")].cluster.server}")"
fi
token="$(k -n istio-system get secret istio-csr-rs-remote-token -o jsonpath='{.data.token}' | base64 -d)"
ca="$(k -n istio-system get secret istio-csr-rs-remote-token -o jsonpath='{.data.ca\.crt}')"
[ -n "$token" ] && [ -n "$ca" ] || { echo "no token yet: apply remote-rbac.yaml in $context" >&2; exit 1; }
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

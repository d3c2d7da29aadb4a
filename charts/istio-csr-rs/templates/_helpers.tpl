{{/* The chart's name, or nameOverride. */}}
{{- define "istio-csr-rs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The name of every object this release owns. Cluster-scoped objects (ClusterRole and its
binding) carry it too, so two releases never overwrite each other's.
*/}}
{{- define "istio-csr-rs.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "istio-csr-rs.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The selector: stable for the life of a release (a Deployment's selector is immutable). */}}
{{- define "istio-csr-rs.selector" -}}
app.kubernetes.io/name: {{ include "istio-csr-rs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object: the selector, the chart's bookkeeping and commonLabels. */}}
{{- define "istio-csr-rs.labels" -}}
{{ include "istio-csr-rs.selector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The subject every binding names: the release's ServiceAccount. */}}
{{- define "istio-csr-rs.subject" -}}
- kind: ServiceAccount
  name: {{ include "istio-csr-rs.fullname" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}

{{- define "istio-csr-rs.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* host:port, with an IPv6 host in brackets. */}}
{{- define "istio-csr-rs.hostPort" -}}
{{- $host := index . 0 -}}
{{- $port := index . 1 -}}
{{- if contains ":" $host -}}
[{{ $host }}]:{{ $port }}
{{- else -}}
{{ $host }}:{{ $port }}
{{- end -}}
{{- end -}}

{{/* Where the remote-cluster Secrets live: a namespace of their own (the binary's default too). */}}
{{- define "istio-csr-rs.secretNamespace" -}}
{{- required "app.multicluster.secretNamespace is required with app.multicluster.enabled" .Values.app.multicluster.secretNamespace -}}
{{- end -}}

{{/*
Whether the binary issues istiod's certificate. istio-csr's "dynamic" (issued by the running
agent) is what this binary always does, so it means on as well.
*/}}
{{- define "istio-csr-rs.istiodCert" -}}
{{- $v := .Values.app.tls.istiodCertificateEnable -}}
{{- if or (eq (toString $v) "true") (eq (toString $v) "dynamic") -}}true{{- end -}}
{{- end -}}

{{/* The trusted node accounts as one comma-separated string (a list or istio-csr's string). */}}
{{- define "istio-csr-rs.trustedNodeAccounts" -}}
{{- $accounts := .Values.app.server.caTrustedNodeAccounts -}}
{{- if kindIs "slice" $accounts -}}
{{- join "," $accounts -}}
{{- else -}}
{{- $accounts | default "" | replace " " "" -}}
{{- end -}}
{{- end -}}

{{/* The runtime issuance ConfigMap's name, when one is followed. */}}
{{- define "istio-csr-rs.runtimeConfigurationName" -}}
{{- if .Values.app.runtimeConfiguration.name -}}
{{- .Values.app.runtimeConfiguration.name -}}
{{- else if .Values.app.runtimeConfiguration.create -}}
{{- printf "%s-issuer" (include "istio-csr-rs.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Where the root bundle is read from: app.tls.rootCAFile, or the mounted app.tls.rootCA. */}}
{{- define "istio-csr-rs.rootCAFile" -}}
{{- if .Values.app.tls.rootCAFile -}}
{{- .Values.app.tls.rootCAFile -}}
{{- else if or .Values.app.tls.rootCA.secretName .Values.app.tls.rootCA.configMapName -}}
{{- printf "%s/%s" (.Values.app.tls.rootCA.mountPath | trimSuffix "/") "root-cert.pem" -}}
{{- end -}}
{{- end -}}

{{/* An annotation list entry: istio-csr's {name, value} or a "key=value" string. */}}
{{- define "istio-csr-rs.annotation" -}}
{{- if kindIs "map" . -}}
{{- printf "%s=%s" .name .value -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{- define "istio-csr-rs.name" -}}istio-csr-rs{{- end -}}

{{- define "istio-csr-rs.labels" -}}
app.kubernetes.io/name: istio-csr-rs
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "istio-csr-rs.selector" -}}
app.kubernetes.io/name: istio-csr-rs
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "istio-csr-rs.secretNamespace" -}}
{{- .Values.app.multicluster.secretNamespace | default .Values.app.leaderElection.namespace -}}
{{- end -}}

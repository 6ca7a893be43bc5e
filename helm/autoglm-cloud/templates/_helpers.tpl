{{- define "autoglm-cloud.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "autoglm-cloud.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "autoglm-cloud.labels" -}}
app.kubernetes.io/name: {{ include "autoglm-cloud.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "autoglm-cloud.selector" -}}
app.kubernetes.io/name: {{ include "autoglm-cloud.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "autoglm-cloud.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-keys" (include "autoglm-cloud.fullname" .)) -}}
{{- end -}}

{{/* Values that render but could not run: say so at render time. */}}
{{- define "autoglm-cloud.validate" -}}
{{- if not .Values.secrets.existingSecret -}}
{{- range $key := list "caCert" "caKey" "serverCert" "serverKey" "signingKey" -}}
{{- if not (index $.Values.secrets $key) -}}
{{- fail (printf "secrets.%s is required (or set secrets.existingSecret to a Secret holding ca.crt, ca.key, server.crt, server.key and signing.key from `autoglm cloud init`)" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not (or .Values.database.url .Values.database.existingSecret) -}}
{{- fail "database.url or database.existingSecret is required: the control plane runs on PostgreSQL in Kubernetes (replicas share it)" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" -}}
{{- end -}}
{{- end -}}

{{/* Names and labels, as kubenurse's chart makes them, so an upgrade from it keeps the
DaemonSet's (immutable) selector. */}}

{{- define "kubenurse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubenurse.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kubenurse.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubenurse.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubenurse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kubenurse.labels" -}}
helm.sh/chart: {{ include "kubenurse.chart" . }}
{{ include "kubenurse.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubenurse-otel
{{- end -}}

{{- define "kubenurse.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubenurse.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "true" when a boolean value (a YAML bool or kubenurse's quoted string) is on. */}}
{{- define "kubenurse.on" -}}
{{- if eq (toString .) "true" }}true{{ end -}}
{{- end -}}

{{/* One env entry, only when the value is given and differs from the probe's own default:
(list NAME value default). A blank value means unset, as in the probe. */}}
{{- define "kubenurse.env" -}}
{{- $name := index . 0 -}}
{{- $value := index . 1 -}}
{{- $default := index . 2 -}}
{{- if and (not (kindIs "invalid" $value)) (ne (toString $value) "") (ne (toString $value) (toString $default)) }}
- name: {{ $name }}
  value: {{ toString $value | quote }}
{{- end -}}
{{- end -}}

{{/* me_ingress: on unless either spelling (check_me_ingress, or check_api_me_ingress before
kubenurse 1.14.1) says false. Same for me_service. */}}
{{- define "kubenurse.checkMeIngress" -}}
{{- if and (ne (toString .Values.check_me_ingress) "false") (ne (toString .Values.check_api_me_ingress) "false") }}true{{ end -}}
{{- end -}}
{{- define "kubenurse.checkMeService" -}}
{{- if and (ne (toString .Values.check_me_service) "false") (ne (toString .Values.check_api_me_service) "false") }}true{{ end -}}
{{- end -}}

{{/* KUBENURSE_INGRESS_URL as kubenurse's chart builds it: https://<ingress.url>. Empty (no
check) while no URL is given. */}}
{{- define "kubenurse.ingressURL" -}}
{{- with .Values.ingress.url }}https://{{ . }}{{ end -}}
{{- end -}}

{{- define "kubenurse.tlsOn" -}}
{{- include "kubenurse.on" .Values.use_tls -}}
{{- end -}}

{{/* The OTLP endpoint the probe gets, or empty. */}}
{{- define "kubenurse.otlpEndpoint" -}}
{{- if .Values.otel.nodeAgent -}}
http://$(HOST_IP):{{ ternary 4317 4318 (eq .Values.otel.protocol "grpc") }}
{{- else -}}
{{- .Values.otel.endpoint -}}
{{- end -}}
{{- end -}}

{{/* The port a URL goes to: its own, else the scheme's (http 80, https 443, dns 53). */}}
{{- define "kubenurse.urlPort" -}}
{{- $u := urlParse . -}}
{{- $host := get $u "host" -}}
{{- if regexMatch ":[0-9]+$" $host -}}
{{- regexFind "[0-9]+$" $host -}}
{{- else -}}
{{- get (dict "http" "80" "https" "443" "dns" "53") (get $u "scheme") -}}
{{- end -}}
{{- end -}}

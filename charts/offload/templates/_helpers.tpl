{{/*
Names. Kubernetes names are at most 63 characters (DNS labels), so every name is cut
there and a trailing "-" dropped.
*/}}
{{- define "offload.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release-derived prefix: "<release>-<chart>", or the release alone when it already
holds the chart name (release "offload" gives "offload", hence "offload-webhook"). */}}
{{- define "offload.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the webhook's Deployment, Service, PodDisruptionBudget, ConfigMap and ClusterRole. */}}
{{- define "offload.webhook.name" -}}
{{- printf "%s-webhook" (include "offload.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/* The webhook's serving-certificate Secret: the one the chart generates, or the user's own. */}}
{{- define "offload.webhook.tlsSecretName" -}}
{{- if .Values.webhook.certs.existingSecret }}
{{- .Values.webhook.certs.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "offload.webhook.name" . | trunc 59 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{- define "offload.webhook.serviceAccountName" -}}
{{- if .Values.webhook.serviceAccount.create }}
{{- default (include "offload.webhook.name" .) .Values.webhook.serviceAccount.name }}
{{- else }}
{{- .Values.webhook.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The ClusterRole a workload's service account is bound to, so its injected sidecar can
read what it needs (files/sidecar-role.yaml). */}}
{{- define "offload.sidecar.clusterRoleName" -}}
{{- printf "%s-sidecar" (include "offload.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/* The controller's leader Lease (created by the chart, so that uninstalling removes it). */}}
{{- define "offload.controller.leaseName" -}}
{{- printf "%s-controller" (include "offload.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}

{{/* The leader-election Role and RoleBinding. */}}
{{- define "offload.controller.roleName" -}}
{{- printf "%s-leader-election" (include "offload.webhook.name" . | trunc 46 | trimSuffix "-") }}
{{- end }}

{{/* The PodMonitor of the sidecars, the PrometheusRule and the dashboard's ConfigMap. */}}
{{- define "offload.sidecar.podMonitorName" -}}
{{- printf "%s-sidecars" (include "offload.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "offload.prometheusRuleName" -}}
{{- include "offload.fullname" . }}
{{- end }}

{{- define "offload.dashboardName" -}}
{{- printf "%s-dashboard" (include "offload.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}

{{/* Name of the gateway's Deployment, PodDisruptionBudget, ServiceAccount and ClusterRole. */}}
{{- define "offload.gateway.name" -}}
{{- printf "%s-gateway" (include "offload.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "offload.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "offload.gateway.name" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The gateway runs only beside the controller, which points Services at it. */}}
{{- define "offload.gateway.enabled" -}}
{{- if and .Values.gateway.enabled .Values.webhook.mutating.enabled .Values.controller.enabled }}true{{ end }}
{{- end }}

{{/* Labels that select the gateway's pods (the controller's --gateway-selector too). */}}
{{- define "offload.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "offload.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* The same labels as a label selector string (key=value,...). */}}
{{- define "offload.gateway.selector" -}}
{{- $labels := include "offload.gateway.selectorLabels" . | fromYaml }}
{{- $pairs := list }}
{{- range $key := keys $labels | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $key (get $labels $key)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{- define "offload.gateway.labels" -}}
{{ include "offload.labels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "offload.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "offload.labels" -}}
helm.sh/chart: {{ include "offload.chart" . }}
app.kubernetes.io/name: {{ include "offload.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: offload
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the webhook's pods; they never change across upgrades. */}}
{{- define "offload.webhook.selectorLabels" -}}
app.kubernetes.io/name: {{ include "offload.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end }}

{{- define "offload.webhook.labels" -}}
{{ include "offload.labels" . }}
app.kubernetes.io/component: webhook
{{- end }}

{{/* The product image (webhook and sidecar): a digest pins it, else the tag, else appVersion. */}}
{{- define "offload.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "offload.sidecar.image" -}}
{{- if and (not .Values.sidecar.imageRepository) (not .Values.sidecar.imageTag) }}
{{- include "offload.image" . }}
{{- else }}
{{- printf "%s:%s" (default .Values.image.repository .Values.sidecar.imageRepository) (default (default .Chart.AppVersion .Values.image.tag) .Values.sidecar.imageTag) }}
{{- end }}
{{- end }}

{{/* The DNS names the webhook's Service answers to, which its certificate must carry. */}}
{{- define "offload.webhook.dnsNames" -}}
{{- $svc := include "offload.webhook.name" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.webhook.clusterDomain) | toJson }}
{{- end }}

{{/* Values that contradict each other fail the render with the field at fault named.
The schema catches types and ranges; these are the rules across fields (and they still
hold under --skip-schema-validation). */}}
{{- define "offload.validateValues" -}}
{{- if lt (int .Values.webhook.replicaCount) 1 }}
{{- fail (printf "webhook.replicaCount: must be at least 1, got %v" .Values.webhook.replicaCount) }}
{{- end }}
{{- if and .Values.webhook.podDisruptionBudget.enabled (gt (int .Values.webhook.replicaCount) 1) (ge (int .Values.webhook.podDisruptionBudget.minAvailable) (int .Values.webhook.replicaCount)) }}
{{- fail (printf "webhook.podDisruptionBudget.minAvailable: %v would block every node drain with webhook.replicaCount %v; make it lower than replicaCount" .Values.webhook.podDisruptionBudget.minAvailable .Values.webhook.replicaCount) }}
{{- end }}
{{- if and (ne .Values.webhook.mutating.failurePolicy "Ignore") (not .Values.webhook.mutating.failurePolicyAcknowledged) }}
{{- fail (printf "webhook.mutating.failurePolicy: %s blocks every pod creation in the selected namespaces while no webhook pod answers; set webhook.mutating.failurePolicyAcknowledged=true to confirm, or keep Ignore" .Values.webhook.mutating.failurePolicy) }}
{{- end }}
{{- if eq (int .Values.sidecar.proxyPort) (int .Values.sidecar.adminPort) }}
{{- fail (printf "sidecar.adminPort: must differ from sidecar.proxyPort (%v)" .Values.sidecar.proxyPort) }}
{{- end }}
{{- $sidecarResources := .Values.sidecar.resources | default dict }}
{{- $sidecarRequests := get $sidecarResources "requests" | default dict }}
{{- $sidecarLimits := get $sidecarResources "limits" | default dict }}
{{- if and (not (get $sidecarRequests "cpu")) (not (get $sidecarLimits "cpu")) }}
{{- fail "sidecar.resources.requests.cpu: required: a sidecar without a cpu request makes every cpu Utilization metric of its pod invalid (the HPA's rule), for offloading and for an HPA on the same workload" }}
{{- end }}
{{- if include "offload.gateway.enabled" . }}
{{- $range := splitList "-" .Values.gateway.portRange }}
{{- if or (ne (len $range) 2) (lt (int (index $range 0)) 1) (gt (int (index $range 1)) 65535) (gt (int (index $range 0)) (int (index $range 1))) }}
{{- fail (printf "gateway.portRange: must be FIRST-LAST with 1 <= FIRST <= LAST <= 65535, got %q" .Values.gateway.portRange) }}
{{- end }}
{{- if and (ge (int .Values.gateway.adminPort) (int (index $range 0))) (le (int .Values.gateway.adminPort) (int (index $range 1))) }}
{{- fail (printf "gateway.adminPort: %v is inside gateway.portRange %s, where ModelDeployments get their ports" .Values.gateway.adminPort .Values.gateway.portRange) }}
{{- end }}
{{- if and .Values.gateway.podDisruptionBudget.enabled (gt (int .Values.gateway.replicaCount) 1) (ge (int .Values.gateway.podDisruptionBudget.minAvailable) (int .Values.gateway.replicaCount)) }}
{{- fail (printf "gateway.podDisruptionBudget.minAvailable: %v would block every node drain with gateway.replicaCount %v; make it lower than replicaCount" .Values.gateway.podDisruptionBudget.minAvailable .Values.gateway.replicaCount) }}
{{- end }}
{{- if and (not .Values.gateway.serviceAccount.create) (not .Values.gateway.serviceAccount.name) }}
{{- fail "gateway.serviceAccount.name: required when gateway.serviceAccount.create is false" }}
{{- end }}
{{- end }}
{{- if and (not .Values.webhook.serviceAccount.create) (not .Values.webhook.serviceAccount.name) }}
{{- fail "webhook.serviceAccount.name: required when webhook.serviceAccount.create is false" }}
{{- end }}
{{- if .Values.webhook.certs.existingSecret }}
{{- if and (not .Values.webhook.certs.caBundle) (not .Values.webhook.certs.certManagerInjectCAFrom) }}
{{- fail "webhook.certs.existingSecret: also give webhook.certs.caBundle (base64 PEM of the CA that signed it) or webhook.certs.certManagerInjectCAFrom (<namespace>/<Certificate>)" }}
{{- end }}
{{- if and .Values.webhook.certs.caBundle .Values.webhook.certs.certManagerInjectCAFrom }}
{{- fail "webhook.certs.caBundle: give either caBundle or certManagerInjectCAFrom, not both (cert-manager's cainjector would overwrite caBundle)" }}
{{- end }}
{{- if .Values.webhook.certs.regenerate }}
{{- fail "webhook.certs.regenerate: the chart generates no certificate when webhook.certs.existingSecret is set; renew that Secret where it is issued" }}
{{- end }}
{{- else }}
{{- if or .Values.webhook.certs.caBundle .Values.webhook.certs.certManagerInjectCAFrom }}
{{- fail "webhook.certs.caBundle/certManagerInjectCAFrom: only apply with webhook.certs.existingSecret; without it the chart generates the CA and sets caBundle itself" }}
{{- end }}
{{- if lt (int .Values.webhook.certs.caDurationDays) (int .Values.webhook.certs.durationDays) }}
{{- fail (printf "webhook.certs.caDurationDays: %v is shorter than webhook.certs.durationDays %v; the CA must outlive the certificate it signs" .Values.webhook.certs.caDurationDays .Values.webhook.certs.durationDays) }}
{{- end }}
{{- if ge (int .Values.webhook.certs.renewBeforeDays) (int .Values.webhook.certs.durationDays) }}
{{- fail (printf "webhook.certs.renewBeforeDays: %v must be lower than webhook.certs.durationDays %v, or every upgrade replaces the certificate" .Values.webhook.certs.renewBeforeDays .Values.webhook.certs.durationDays) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The webhook's serving certificate, computed once per render and shared by the Secret, both
webhook configurations (caBundle) and the Deployment (checksum annotation): every template
that needs it includes "offload.webhook.tls" first, then reads .offloadWebhookTLS, a dict of
  secretName, generated (bool), tlsCrt, tlsKey, caCrt (base64 PEM, when generated),
  caBundle (base64 PEM for the webhook configurations), notAfter (RFC 3339), dnsNames,
  checksum (changes when the certificate does, so the pods restart).

Generated certificates are kept across `helm upgrade` by reading the existing Secret with
`lookup`; they are replaced when that Secret is missing or incomplete, was made for other DNS
names, expires within certs.renewBeforeDays, or certs.regenerate turned true (the Secret records
it, so a true kept in the release's values does not regenerate on every later upgrade).
A renewal carries the previous CA in caBundle for that one upgrade, so webhook pods still
serving the old certificate keep being trusted until the rollout replaces them; `regenerate`
does not (it is for when the old key must stop being trusted). The CA's private key is never
stored: every renewal makes a new CA.

`lookup` answers nothing under `helm template`, `helm lint` and client-side dry runs, so those
always show freshly generated certificates; only install/upgrade against a cluster reuses them.
*/}}
{{- define "offload.webhook.tls" -}}
{{- if not (hasKey . "offloadWebhookTLS") }}
{{- $prefix := include "offload.annotationPrefix" . }}
{{- $name := include "offload.webhook.tlsSecretName" . }}
{{- $dnsNames := include "offload.webhook.dnsNames" . | fromJsonArray }}
{{- $tls := dict "secretName" $name "dnsNames" $dnsNames "generated" false }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $name }}
{{- if .Values.webhook.certs.existingSecret }}
{{- $_ := set $tls "caBundle" .Values.webhook.certs.caBundle }}
{{- $data := dig "data" (dict) $existing }}
{{- $_ := set $tls "checksum" (printf "%s/%s" $name (get $data "tls.crt") | sha256sum) }}
{{- else }}
{{- $_ := set $tls "generated" true }}
{{- $reuse := false }}
{{- $data := dig "data" (dict) $existing }}
{{- $annotations := dig "metadata" "annotations" (dict) $existing }}
{{- $notAfter := get $annotations (printf "%s/not-after" $prefix) }}
{{- /* Regenerate on the render where regenerate turns true, not on every later upgrade
that reuses the last values (helm upgrade without values does): the Secret remembers. */}}
{{- $regenerate := and .Values.webhook.certs.regenerate (ne (get $annotations (printf "%s/regenerate" $prefix)) "true") }}
{{- $_ := set $tls "regenerateLatch" (ternary "true" "false" .Values.webhook.certs.regenerate) }}
{{- if and $existing (not $regenerate) (get $data "tls.crt") (get $data "tls.key") (get $data "ca.crt") $notAfter (eq (get $annotations (printf "%s/dns-names" $prefix)) (join "," $dnsNames)) }}
{{- $renewAt := now | dateModify (printf "+%dh" (mul (int .Values.webhook.certs.renewBeforeDays) 24)) }}
{{- if gt (atoi (toDate "2006-01-02T15:04:05Z07:00" $notAfter | unixEpoch)) (atoi ($renewAt | unixEpoch)) }}
{{- $reuse = true }}
{{- end }}
{{- end }}
{{- if $reuse }}
{{- $_ := set $tls "tlsCrt" (get $data "tls.crt") }}
{{- $_ := set $tls "tlsKey" (get $data "tls.key") }}
{{- $_ := set $tls "caCrt" (get $data "ca.crt") }}
{{- $_ := set $tls "caBundle" (get $data "ca.crt") }}
{{- $_ := set $tls "notAfter" $notAfter }}
{{- else }}
{{- $ca := genCA (printf "%s-ca" (include "offload.webhook.name" .)) (int .Values.webhook.certs.caDurationDays) }}
{{- $cert := genSignedCert (index $dnsNames 2) nil $dnsNames (int .Values.webhook.certs.durationDays) $ca }}
{{- $_ := set $tls "tlsCrt" ($cert.Cert | b64enc) }}
{{- $_ := set $tls "tlsKey" ($cert.Key | b64enc) }}
{{- $_ := set $tls "caCrt" ($ca.Cert | b64enc) }}
{{- $bundle := $ca.Cert }}
{{- if and (get $data "ca.crt") (not $regenerate) }}
{{- $bundle = printf "%s\n%s" (trimSuffix "\n" $ca.Cert) (get $data "ca.crt" | b64dec) }}
{{- end }}
{{- $_ := set $tls "caBundle" ($bundle | b64enc) }}
{{- $_ := set $tls "notAfter" (dateInZone "2006-01-02T15:04:05Z07:00" (now | dateModify (printf "+%dh" (mul (int .Values.webhook.certs.durationDays) 24))) "UTC") }}
{{- end }}
{{- $_ := set $tls "checksum" (printf "%s%s" (get $tls "tlsCrt") (get $tls "tlsKey") | sha256sum) }}
{{- end }}
{{- $_ := set . "offloadWebhookTLS" $tls }}
{{- end }}
{{- end }}

{{/* Prefix of the annotations this chart reads back (on its own Secret). */}}
{{- define "offload.annotationPrefix" -}}
offload.beamlit.com
{{- end }}

{{/* The MutatingWebhookConfiguration's and ValidatingWebhookConfiguration's caBundle /
cainjector annotation, shared by both. */}}
{{- define "offload.webhook.caInjectionAnnotations" -}}
{{- with .Values.webhook.certs.certManagerInjectCAFrom }}
cert-manager.io/inject-ca-from: {{ . | quote }}
{{- end }}
{{- end }}

{{/* The injector's configuration file (offload-webhook --injector-config), from .Values.sidecar. */}}
{{- define "offload.injectorConfig" -}}
configVersion: {{ default .Chart.Version .Values.sidecar.configVersion | quote }}
image: {{ include "offload.sidecar.image" . }}
imagePullPolicy: {{ .Values.sidecar.imagePullPolicy }}
proxyPort: {{ .Values.sidecar.proxyPort }}
adminPort: {{ .Values.sidecar.adminPort }}
nativeSidecar: {{ .Values.sidecar.nativeSidecar }}
{{- if .Values.sidecar.prometheusAnnotations }}
prometheusAnnotations: true
{{- end }}
resources:
  {{- toYaml .Values.sidecar.resources | nindent 2 }}
{{- end }}

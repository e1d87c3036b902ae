{{/*
Names, labels, images and the per-tier facts (ports, roles) every template shares.
*/}}

{{- define "specdec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Tier objects are named <fullname>-<tier>, so fullname stays short enough for the longest suffix. */}}
{{- define "specdec.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "specdec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "specdec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: specdec
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "tier" "verifier"). Never change: selectors are immutable. */}}
{{- define "specdec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specdec.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .tier }}
{{- end -}}

{{- define "specdec.tierLabels" -}}
{{ include "specdec.labels" .root }}
app.kubernetes.io/component: {{ .tier }}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest pins it: (dict "root" $ "image" .Values.router.image). */}}
{{- define "specdec.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* gRPC port of each tier: the contract's 50051 / 50052 / 50053. */}}
{{- define "specdec.grpcPort" -}}
{{- get (dict "router" 50051 "drafter" 50052 "verifier" 50053) . -}}
{{- end -}}

{{/* The locality store URL the router and verifiers get; empty means none. */}}
{{- define "specdec.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis.%s.svc:6379/0" (include "specdec.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* The target SPEC a tier uses: its own model, else model.target. */}}
{{- define "specdec.targetModel" -}}
{{- default .root.Values.model.target .values.model -}}
{{- end -}}

{{- define "specdec.routerServiceAccount" -}}
{{- printf "%s-router" (include "specdec.fullname" .) -}}
{{- end -}}

{{/* Drafters, verifiers, Redis and the test pod: a service account with no API access and no token mounted. */}}
{{- define "specdec.workloadServiceAccount" -}}
{{- include "specdec.fullname" . -}}
{{- end -}}

{{/* Peers allowed to reach the metrics port (networkPolicy.metricsFrom). */}}
{{- define "specdec.metricsIngress" -}}
- ports:
    - {port: metrics, protocol: TCP}
  {{- with .Values.networkPolicy.metricsFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Environment every specdec container gets: (dict "root" $ "tier" "drafter"). */}}
{{- define "specdec.commonEnv" -}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: SPECDEC_CACHE_DIR
  value: {{ .root.Values.cache.mountPath | quote }}
# Everything Hugging Face writes goes to the cache volume; nothing is fetched from a hub at run time.
- name: HF_HOME
  value: {{ printf "%s/huggingface" .root.Values.cache.mountPath | quote }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: HOME
  value: /tmp
- name: OTEL_SERVICE_NAME
  value: {{ printf "specdec-%s" .tier | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)"
{{- end -}}

{{/* Writable mounts under a read-only root: (dict "root" $ "gpu" true). */}}
{{- define "specdec.volumeMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: cache, mountPath: {{ .root.Values.cache.mountPath }}}
{{- if ne .root.Values.modelStore.type "none" }}
- {name: models, mountPath: {{ .root.Values.modelStore.mountPath }}, readOnly: true}
{{- end }}
{{- if .gpu }}
- {name: dshm, mountPath: /dev/shm}
{{- end }}
{{- end -}}

{{/*
checkov suppressions of a workload, each with its reason, as checkov.io/skipN annotations. Only the ones the
values make true are emitted: (dict "image" .Values.router.image "extra" (list "CKV_K8S_38=why")).
  CKV_K8S_43 (image by digest): digests are a value (image.digest); tags are the default so that an image built
    with a plain `docker build -t` installs as is. Pinned when a digest is set.
  CKV_K8S_15 (pull policy Always): only when a user chooses another pullPolicy, e.g. IfNotPresent for images
    side-loaded into a local cluster (kind load), where Always would fail.
*/}}
{{- define "specdec.checkovSkips" -}}
{{- $skips := list -}}
{{- if not .image.digest -}}
{{- $skips = append $skips "CKV_K8S_43=image digests are optional values (image.digest); tags are the default" -}}
{{- end -}}
{{- if ne .image.pullPolicy "Always" -}}
{{- $skips = append $skips (printf "CKV_K8S_15=pullPolicy %s chosen in values (side-loaded images in local clusters)" .image.pullPolicy) -}}
{{- end -}}
{{- $skips = concat $skips (default (list) .extra) -}}
{{- $lines := list -}}
{{- range $n, $skip := $skips -}}
{{- $lines = append $lines (printf "checkov.io/skip%d: %s" (add1 $n) ($skip | quote)) -}}
{{- end -}}
{{- join "\n" $lines -}}
{{- end -}}

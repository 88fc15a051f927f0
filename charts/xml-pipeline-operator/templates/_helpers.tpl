{{/* Names, labels and shared snippets. */}}

{{- define "xpo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name of the objects: the release name when it contains the chart name; the chart name when the
release name is a prefix of it (`helm install xml-pipeline ...` gives `xml-pipeline-operator`, not
`xml-pipeline-xml-pipeline-operator`); otherwise "<release>-<chart>".
*/}}
{{- define "xpo.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else if hasPrefix (printf "%s-" .Release.Name) $name -}}
{{- $name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "xpo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels common to every object of the release; $component names the part. */}}
{{- define "xpo.labels" -}}
helm.sh/chart: {{ include "xpo.chart" .root }}
{{ include "xpo.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: xml-pipeline
{{- end -}}

{{- define "xpo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xpo.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "xpo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "xpo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The project's image: repository@digest when a digest is given, else repository:tag. */}}
{{- define "xpo.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "xpo.sharedRedis.fullname" -}}
{{- printf "%s-shared-redis" (include "xpo.fullname" . | trunc 49 | trimSuffix "-") -}}
{{- end -}}

{{/* Pod-level security context of the "restricted" Pod Security Standard. With podUserIds
`platform` the user ids are left to the platform (OpenShift assigns them per namespace). */}}
{{- define "xpo.podSecurityContext" -}}
runAsNonRoot: true
{{- if eq .root.Values.podUserIds "fixed" }}
runAsUser: {{ .uid }}
runAsGroup: {{ .gid }}
fsGroup: {{ .gid }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security context of the "restricted" Pod Security Standard, plus a read-only
root filesystem (writes go to emptyDir volumes). */}}
{{- define "xpo.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
The operator's RBAC rules, split by scope. Together they are exactly RULES from
operator/xml_pipeline_operator/rbac.py (tests/packaging asserts it): change both together.
*/}}
{{- define "xpo.rules.namespaced" -}}
- apiGroups: ["xml-pipeline.dev"]
  resources: ["organisms"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["xml-pipeline.dev"]
  resources: ["organisms/status"]
  verbs: ["get", "patch"]
- apiGroups: ["xml-pipeline.dev"]
  resources: ["organisms/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["configmaps", "secrets"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects", "triggerauthentications"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* kopf peering (replicaCount > 1): rbac.py PEERING_RULES. */}}
{{- define "xpo.rules.peering" -}}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings", "kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end -}}

{{/* Cluster-scoped resources: kopf's namespace observer and CRD observer, read-only. */}}
{{- define "xpo.rules.clusterScoped" -}}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end -}}

{{/*
The chart's name, as the `app.kubernetes.io/name` label and the default names carry it.
*/}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object's name, as `helm create` makes it: fullnameOverride, or the
release name where it already holds the chart's name (release `kubetune` names its
operator `kubetune-operator`), or <release>-<name>.
*/}}
{{- define "kubetune.fullname" -}}
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

{{/*
The name of an object outside the release namespace (cluster-scoped, or a Role in a
watched namespace), from (list $ "what"): release names are unique only within a
namespace, so two releases named alike in two namespaces would otherwise claim the same
ClusterRole. The release namespace goes last, as Istio names its cluster roles.
*/}}
{{- define "kubetune.clusterName" -}}
{{- $ := index . 0 -}}
{{- printf "%s-%s-%s" (include "kubetune.fullname" $) (index . 1) $.Release.Namespace -}}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The labels every object of the chart carries (Kubernetes' recommended labels and
helm.sh/chart); each template adds its app.kubernetes.io/component.
*/}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kubetune.operatorSelectorLabels" -}}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
The operator's ServiceAccount. Without one of the chart's, a name is required: the
namespace's `default` account, which the convention falls back to, would hand the
operator's rights to every pod in the namespace that names no account.
*/}}
{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "kubetune.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: name the operator's ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The ConfigMap that carries the platform policy to the operator (its environment) and to
the admission policies (their params).
*/}}
{{- define "kubetune.policyName" -}}
{{- printf "%s-policy" (include "kubetune.fullname" .) -}}
{{- end -}}

{{/*
The ConfigMap of the platform's defaults that users may read (templates/defaults.yaml):
its name is fixed by the release, so that clients find it from the release's name and
namespace alone.
*/}}
{{- define "kubetune.defaultsName" -}}
{{- printf "%s-defaults" (include "kubetune.fullname" .) -}}
{{- end -}}

{{- define "kubetune.adminKeySecret" -}}
{{- .Values.adminKey.existingSecret | default (printf "%s-admin-key" (include "kubetune.fullname" .)) -}}
{{- end -}}

{{/*
The plural names of kubetune's kinds, as a JSON list, read from the generated CRDs so
that the user roles cover a new kind without an edit here.
*/}}
{{- define "kubetune.plurals" -}}
{{- $plurals := list -}}
{{- range $path, $_ := .Files.Glob "files/crds/*.yaml" -}}
{{- $plurals = append $plurals ($.Files.Get $path | fromYaml).spec.names.plural -}}
{{- end -}}
{{- toJson $plurals -}}
{{- end -}}

{{/*
The image patterns of a list as one anchored regular expression (RE2, as CEL reads it):
`*` matches any characters but '/', `**` any characters. Empty for an empty list, which
allows no image. resources/policy.py image_regex builds the same for the operator.
*/}}
{{- define "kubetune.imageRegex" -}}
{{- $alternatives := list -}}
{{- range . -}}
{{- $alternatives = append $alternatives (regexQuoteMeta . | replace "\\*\\*" ".*" | replace "\\*" "[^/]*") -}}
{{- end -}}
{{- if $alternatives -}}^(?:{{ join "|" $alternatives }})${{- end -}}
{{- end -}}

{{/*
Refuse to render a policy the operator would refuse to start with (resources/policy.py
Policy): patterns with characters no image reference has, flags not in vLLM's own
spelling, and flags that no policy may allow.
*/}}
{{- define "kubetune.checkPolicy" -}}
{{- $reserved := .Files.Get "files/reserved-server-flags.yaml" | fromYaml -}}
{{- range concat .Values.policy.trainerImages .Values.policy.serverImages -}}
{{- if not (regexMatch "^[A-Za-z0-9._/:@*-]+$" .) -}}
{{- fail (printf "policy: image pattern %q: only letters, digits and ._/:@-* may appear" .) -}}
{{- end -}}
{{- end -}}
{{- range .Values.policy.serverFlags -}}
{{- if not (regexMatch "^--[a-z0-9]+(-[a-z0-9]+)*$" .) -}}
{{- fail (printf "policy.serverFlags: %q: list flags as --lower-case-words" .) -}}
{{- end -}}
{{- if hasKey $reserved . -}}
{{- fail (printf "policy.serverFlags: %s cannot be allowed: %s" . (get $reserved .)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The variables of an admission policy that check a vLLM runtime, found in the variable
`runtime` (empty where the spec has none) and named in messages by the path given: its
image where it names one (without one, a server runs defaults.serverImage, which the
policy does not bind), then each element of its extraArgs that starts with '-' (a
flag, with any `=value`; the others are values), which must be listed in the params'
serverFlags and not be a reserved flag in any spelling vLLM reads (it takes `_` for
`-`). Sets `runtimeRefusal`: the first refusal's message, as resources/policy.py
runtime_refusal writes it, or ''.
*/}}
{{- define "kubetune.runtimeVariables" -}}
- name: serverImage
  expression: "variables.runtime.?image.orValue('')"
- name: args
  expression: "variables.runtime.?extraArgs.orValue([])"
- name: allowedFlags
  expression: "params.data.serverFlags.split(',')"
- name: reservedFlags
  expression: {{ .reserved | toJson | quote }}
- name: refusedArgs
  expression: |-
    variables.args.filter(a, a.startsWith('-') && (
      a.split('=', 2)[0].replace('_', '-') in variables.reservedFlags
      || !(a.split('=', 2)[0] in variables.allowedFlags)))
- name: runtimeRefusal
  expression: |-
    variables.serverImage != '' && !(params.data.serverImageRegex != ''
      && variables.serverImage.matches(params.data.serverImageRegex))
    ? '{{ .path }}.image "' + variables.serverImage + '" is not an allowed server image (allowed: '
      + (params.data.serverImages == '' ? 'none' : params.data.serverImages.replace(',', ', ')) + ')'
    : size(variables.refusedArgs) == 0 ? ''
    : '{{ .path }}.extraArgs[' + string(variables.args.indexOf(variables.refusedArgs[0])) + '] "'
      + variables.refusedArgs[0] + '" is not an allowed server flag'
      + (variables.refusedArgs[0].split('=', 2)[0].replace('_', '-') in variables.reservedFlags
        ? ': ' + variables.reservedFlags[variables.refusedArgs[0].split('=', 2)[0].replace('_', '-')]
        : ' (allowed: ' + (params.data.serverFlags == '' ? 'none' : params.data.serverFlags.replace(',', ', ')) + ')')
{{- end -}}

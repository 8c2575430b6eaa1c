-- Health of a kubetune.io ModelDeployment from the phase its operator writes: the
-- vLLM server starting (Progressing), serving (Available), or failed. A server
-- scaled to 0 replicas is Pending for good and, like a Deployment scaled to 0,
-- Healthy. It runs without Lua's standard libraries, as argocd-cm installs it.
local hs = {}
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. generation
  return hs
end
local health = {
  Pending = "Progressing",
  Progressing = "Progressing",
  Available = "Healthy",
  Failed = "Degraded",
}
local message = obj.status.message or ""
hs.status = health[obj.status.phase]
if hs.status == nil then
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. obj.status.phase .. ": " .. message
  return hs
end
if obj.status.phase == "Pending" and obj.spec.replicas == 0 then
  hs.status = "Healthy"
end
hs.message = message
return hs

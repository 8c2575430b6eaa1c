-- Health of a kubetune.io Dataset from the phase its operator writes: validation
-- under way, the file valid (Ready), or not (Invalid), or not checked (Failed).
-- It runs without Lua's standard libraries, as argocd-cm installs it.
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
  Validating = "Progressing",
  Ready = "Healthy",
  Invalid = "Degraded",
  Failed = "Degraded",
}
local message = obj.status.message or ""
hs.status = health[obj.status.phase]
if hs.status == nil then
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. obj.status.phase .. ": " .. message
  return hs
end
hs.message = message
return hs

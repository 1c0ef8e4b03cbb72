-- Create, update, read, delete cycles over nine resource types; one connection per thread, so each
-- thread's requests run in order. (wrk may drop the very first request it generates on a connection;
-- the update that follows creates the resource then, so the cycle still sees no 4xx.)
-- wrk -t N -c N -s crud.lua URL -- BASE_PATH RUN_ID [create-only]
package.path = package.path .. ";" .. debug.getinfo(1, "S").source:match("@?(.*/)") .. "?.lua"
local common = require("common")

local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

local base, run, create_only
local i = 0
local json, plain
local templates = {
  { "Patient", '{"resourceType":"Patient","id":"%s","name":[{"family":"Bench","given":["Cycle"]}],"gender":"other","birthDate":"1980-01-01"}' },
  { "Observation", '{"resourceType":"Observation","id":"%s","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/pat-000001"},"effectiveDateTime":"2024-01-01T10:00:00Z","valueQuantity":{"value":72,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}' },
  { "Encounter", '{"resourceType":"Encounter","id":"%s","status":"finished","class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"AMB"},"subject":{"reference":"Patient/pat-000001"}}' },
  { "Condition", '{"resourceType":"Condition","id":"%s","code":{"coding":[{"system":"http://snomed.info/sct","code":"38341003"}]},"subject":{"reference":"Patient/pat-000001"}}' },
  { "MedicationRequest", '{"resourceType":"MedicationRequest","id":"%s","status":"active","intent":"order","medicationCodeableConcept":{"coding":[{"system":"http://www.nlm.nih.gov/research/umls/rxnorm","code":"860975"}]},"subject":{"reference":"Patient/pat-000001"}}' },
  { "Procedure", '{"resourceType":"Procedure","id":"%s","status":"completed","code":{"coding":[{"system":"http://snomed.info/sct","code":"73761001"}]},"subject":{"reference":"Patient/pat-000001"}}' },
  { "Immunization", '{"resourceType":"Immunization","id":"%s","status":"completed","vaccineCode":{"coding":[{"system":"http://hl7.org/fhir/sid/cvx","code":"140"}]},"patient":{"reference":"Patient/pat-000001"},"occurrenceDateTime":"2024-01-01"}' },
  { "DiagnosticReport", '{"resourceType":"DiagnosticReport","id":"%s","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"24323-8"}]},"subject":{"reference":"Patient/pat-000001"}}' },
  { "AllergyIntolerance", '{"resourceType":"AllergyIntolerance","id":"%s","code":{"coding":[{"system":"http://snomed.info/sct","code":"91936005"}]},"patient":{"reference":"Patient/pat-000001"}}' },
}

function init(args)
  base, run, create_only = args[1], args[2], args[3] == "create-only"
  json = common.headers({ ["Content-Type"] = "application/fhir+json" })
  plain = common.headers()
end

function request()
  local n, op
  if create_only then
    n, op = i, 0
  else
    n, op = math.floor(i / 4), i % 4
  end
  i = i + 1
  local t = templates[(n % #templates) + 1]
  local id = string.format("w-%s-%d-%d", run, tid, n)
  local path = base .. t[1] .. "/" .. id
  if op == 0 or op == 1 then
    return wrk.format("PUT", path, json, string.format(t[2], id))
  elseif op == 2 then
    return wrk.format("GET", path, plain)
  end
  return wrk.format("DELETE", path, plain)
end

done = common.done

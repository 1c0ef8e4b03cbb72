-- Shared by the benchmark scripts: one JSON line with wrk's own numbers when a run ends.
local M = {}

function M.done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d,'
      .. '"mean_us":%.1f,"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, latency.mean,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end

function M.read_lines(path)
  local lines = {}
  local f = assert(io.open(path, "r"))
  for line in f:lines() do
    if #line > 0 then lines[#lines + 1] = line end
  end
  f:close()
  return lines
end

-- The headers every request carries (the access token, the proxy's X-Forwarded-Proto), given by the harness
-- in BENCH_HEADERS ("Name: value" lines), added to ``base``.
function M.headers(base)
  local h = {}
  for k, v in pairs(base or {}) do h[k] = v end
  local extra = os.getenv("BENCH_HEADERS")
  if extra then
    for line in extra:gmatch("[^\n]+") do
      local name, value = line:match("^([^:]+):%s*(.*)$")
      if name then h[name] = value end
    end
  end
  return h
end

return M

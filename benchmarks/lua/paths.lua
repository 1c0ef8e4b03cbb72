-- GET a random path from a file (one absolute path per line): reads by id, and search mixes.
-- wrk -s paths.lua URL -- FILE   (headers from BENCH_HEADERS, see common.lua)
package.path = package.path .. ";" .. debug.getinfo(1, "S").source:match("@?(.*/)") .. "?.lua"
local common = require("common")
local paths
local headers = {}

function init(args)
  paths = common.read_lines(args[1])
  headers = common.headers()
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16) % 100000)
end

function request()
  return wrk.format("GET", paths[math.random(#paths)], headers)
end

done = common.done

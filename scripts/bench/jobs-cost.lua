-- The job runner's cost per job in load-independent units, for
-- scripts/bench/jobs-cost: one worker (the documented defaults unless
-- BENCH_PREFETCH / BENCH_FLUSH are set) works down JOBS no-op jobs of
-- GROUP already scheduled, CONCURRENCY runners; this process's statements
-- to the server are counted as round trips (each send waits for one
-- reply).  Prints "round_trips=N sends=..." once the group is empty.
--   jobs-cost.lua GROUP JOBS CONCURRENCY LOG
-- Statements are sent by core's send_register and prepared_register (which
-- db.lua takes as it loads: wrapped before it is required, so this runs
-- under a stock lua5.4, not pgcoord-run, which has loaded it already) and
-- by the connection's methods.
local core = require "pgcoord.core"
local counts, counting = {}, false
local function counted(name, f)
  return function(...)
    if counting then counts[name] = (counts[name] or 0) + 1 end
    return f(...)
  end
end
for _, name in ipairs({ "send_register", "prepared_register" }) do
  core[name] = counted(name, assert(core[name], name))
end
local pgcoord = require "pgcoord"
require("pgcoord.log").set_level("warn")

package.path = (arg[0]:match("^(.*/)") or "./") .. "?.lua;" .. package.path
local bench = require "benchlib"

local args = bench.args("jobs-cost.lua", "run", ...)
local group, n = args[2], args:integer(3, "JOBS")
local concurrency, log_runs = args:integer(4, "CONCURRENCY"), args[5] or "all"

local db = pgcoord.connect(nil, { size = 10 })
local methods = getmetatable(debug.getregistry()["pgcoord.pgconn"] and
  setmetatable({}, debug.getregistry()["pgcoord.pgconn"]) or {}).__index
for _, name in ipairs({ "send", "send_prepared", "prepare", "send_script", "send_begun" }) do
  if methods[name] then methods[name] = counted(name, methods[name]) end
end

local function env_integer(name)
  local v = os.getenv(name)
  return v and v ~= "" and math.tointeger(tonumber(v)) or nil
end

local jobs = pgcoord.jobs(db)
local done = 0
jobs:define("noop", function() done = done + 1 end, { group = group })
local function empty()
  return db:one("SELECT count(*)::int AS n FROM pgcoord.jobs WHERE group_name = $1", group).n == 0
end
assert(not empty(), "no jobs in group " .. group) -- (and the count is prepared now)
counting = true
local w = jobs:worker({ group = group, concurrency = concurrency,
  prefetch = env_integer("BENCH_PREFETCH"), flush_count = env_integer("BENCH_FLUSH"),
  should_log_run = log_runs == "none" and function() return false end or nil })
bench.wait_for(function() return done >= n end, 600, "last handler")
-- (the polls of the count are not the worker's: left out of the count)
local polls = 0
bench.wait_for(function()
  polls = polls + 1
  return empty()
end, 60, "empty group")
counting = false
counts.prepared_register = counts.prepared_register - polls
w:shutdown()
local total, parts = 0, {}
for name, c in pairs(counts) do
  total = total + c
  parts[#parts + 1] = ("%s=%d"):format(name, c)
end
table.sort(parts)
bench.say(("round_trips=%d %s"):format(total, table.concat(parts, " ")))

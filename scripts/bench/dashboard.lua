-- The EXPLAIN side of scripts/bench/dashboard, run by pgcoord-run:
--   dashboard.lua explain GROUP JOB_ID
-- runs every statement of lua/pgcoord/dashboard/sql.lua under EXPLAIN
-- ANALYZE, as a custom and as a generic plan (what a statement cached
-- after five runs gets), and prints one line each: its time, the indexes
-- it read, and "SCAN" where it read pgcoord.jobs or job_runs whole.
local pgcoord = require "pgcoord"
local sql = require "pgcoord.dashboard.sql"

package.path = (arg[0]:match("^(.*/)") or "./") .. "?.lua;" .. package.path
local bench = require "benchlib"
local say = bench.say

local args = bench.args("dashboard.lua", ...)
local group = args[2]
local job_id = args:integer(3, "JOB_ID")

local statements = {
  { "groups", sql.GROUPS, { 100, 1000 } },
  { "group", sql.GROUP, { group, sql.CAP } },
  { "chart", sql.CHART, { group } },
  { "subscriptions", sql.SUBSCRIPTIONS, { 100, sql.CAP } },
  { "locks", sql.LOCKS, { 100 } },
  { "periodic", sql.PERIODIC, { 500 } },
  { "outbox counts", sql.outbox_counts('"outbox_messages"'), { sql.CAP } },
}
for _, state in ipairs(sql.STATES) do
  statements[#statements + 1] = { "list " .. state, sql.LIST[state], { group, pgcoord.null,
    pgcoord.null, pgcoord.null, 51 } }
  statements[#statements + 1] = { "list " .. state .. " by type", sql.LIST[state],
    { group, "type2", pgcoord.null, pgcoord.null, 51 } }
end
statements[#statements + 1] = { "list failed, a later page", sql.LIST.failed,
  { group, pgcoord.null, job_id, job_id, 51 } }
statements[#statements + 1] = { "job", require("pgcoord.jobs.sql").GET, { job_id } }
statements[#statements + 1] = { "job runs", require("pgcoord.jobs.sql").RUNS, { job_id, 1000 } }

local db = pgcoord.connect(nil, { size = 1 })
local scans = 0
for _, mode in ipairs({ "auto", "force_generic_plan" }) do
  db:exec("SET plan_cache_mode = " .. mode)
  for _, s in ipairs(statements) do
    local rows = db:query("EXPLAIN (ANALYZE, COSTS off) " .. s[2], table.unpack(s[3]))
    local plan, indexes, seen = {}, {}, {}
    for i, r in ipairs(rows) do plan[i] = r["QUERY PLAN"] end
    local text = table.concat(plan, "\n")
    for _, pattern in ipairs({ "[Ss]can using ([%w_]+)", "Bitmap Index Scan on ([%w_]+)" }) do
      for name in text:gmatch(pattern) do
        if not seen[name] then indexes[#indexes + 1], seen[name] = name, true end
      end
    end
    local scan = text:match("Seq Scan on (jobs)") or text:match("Seq Scan on (job_runs)")
    if scan then scans = scans + 1 end
    local ms = tonumber(text:match("Execution Time: ([%d%.]+) ms"))
    say(("%-30s %-8s %8.2f ms  %s%s"):format(s[1], mode == "auto" and "custom" or "generic", ms,
      table.concat(indexes, ","), scan and ("  SCAN of " .. scan) or ""))
    if scan and os.getenv("BENCH_VERBOSE") then say(text) end
  end
end
db:close()
say(("full scans of jobs or job_runs: %d"):format(scans))

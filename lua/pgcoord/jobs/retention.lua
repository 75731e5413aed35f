-- Retention of what the job runner keeps: logged runs, failed jobs and
-- cancelled jobs.  jobs:prune deletes those older than given times, now;
-- a worker's retention option deletes those of its group older than given
-- ages, now and on an interval, in one process at a time (each batch takes
-- a transaction-scoped advisory lock of the group; a pass that finds it
-- taken leaves the group to the process that holds it).  Deletes go in
-- small batches, each its own statement: short transactions, and rows the
-- workers write meanwhile are never waited for.
local options = require "pgcoord.options"
local tables = require "pgcoord.tables"
local sql = require "pgcoord.jobs.sql"

local retention = {}

retention.BATCH = 500

-- What can be pruned: the name of its count, of its prune option, of its
-- retention option, and its statement.
local KINDS = {
  { "runs", "runs_before", sql.PRUNE_RUNS },
  { "failed", "failed_before", sql.PRUNE_FAILED },
  { "cancelled", "cancelled_before", sql.PRUNE_CANCELLED },
}

-- Times from year 1 to 9999, as jobs:schedule takes them; ages up to ~31
-- years.
local MIN_TIME, MAX_TIME, MAX_AGE = -62135596800, 253402300799, 1000000000

local function locked_batch(tx, statement, age, group, batch)
  if not tx:one(sql.PRUNE_TRY_LOCK, sql.PRUNE_LOCK, group).ok then return nil end
  return tx:exec(statement, nil, age, group, batch)
end

-- Deletes rows of one kind in batches until a batch comes back short;
-- returns how many.  With at (epoch seconds) the cutoff is a time; else
-- age (seconds) by the server's clock, under the group's lock: nil, total
-- when another process holds it.
local function prune_kind(pool, statement, at, age, group)
  local total, batch = 0, retention.BATCH
  while true do
    local n
    if at then
      n = pool:exec(statement, at, nil, group, batch)
    else
      n = pool:tx(locked_batch, statement, age, group, batch)
      if n == nil then return nil, total end
    end
    total = total + n
    if n < batch then return total end
  end
end

local check_prune = options.spec("jobs:prune", {
  runs_before = { "number", min = MIN_TIME, max = MAX_TIME },
  failed_before = { "number", min = MIN_TIME, max = MAX_TIME },
  cancelled_before = { "number", min = MIN_TIME, max = MAX_TIME },
  group = { "string" },
})

-- jobs:prune{ runs_before =, failed_before =, cancelled_before =, group = }
-- -> { runs = n, failed = n, cancelled = n }: what was deleted.
function retention.prune(pool, opts)
  local o = check_prune(opts)
  if not (o.runs_before or o.failed_before or o.cancelled_before) then
    options.raise("jobs:prune: give at least one of runs_before, failed_before,"
      .. " cancelled_before (epoch seconds)")
  end
  local counts = {}
  for _, kind in ipairs(KINDS) do
    local name, before, statement = kind[1], kind[2], kind[3]
    local at = o[before]
    counts[name] = at and prune_kind(pool, statement, at, nil, o.group) or 0
  end
  return counts
end

local AGE = { "number", above = 0, max = MAX_AGE }
local RULES = {
  runs = AGE, failed = AGE, cancelled = AGE,
  interval = { "number", default = 60, min = 0.01, max = 1000000 },
}

-- The worker option retention = { runs = s, failed = s, cancelled = s,
-- interval = 60 }, checked naming where; a new table.
function retention.check(where, t)
  if type(t) ~= "table" then
    options.raise("%s: option retention must be a table, got %s", where, options.show(t))
  end
  local out = {}
  for k in pairs(t) do
    if not RULES[k] then
      options.raise("unknown option %s for %s", options.show("retention." .. tostring(k)), where)
    end
  end
  for name, rule in pairs(RULES) do
    local v = t[name]
    if v == nil then
      out[name] = rule.default
    else
      out[name] = options.check(where, "retention." .. name, rule, v)
    end
  end
  if not (out.runs or out.failed or out.cancelled) then
    options.raise("%s: option retention needs at least one of runs, failed, cancelled (seconds)",
      where)
  end
  return out
end

-- Starts the retention of group's rows (o from retention.check): a
-- service with state and stop([timeout]), and stats() -> { runs, deleted }.
function retention.start(pool, group, o)
  local shortest = math.huge
  for _, kind in ipairs(KINDS) do
    local age = o[kind[1]]
    if age and age < shortest then shortest = age end
  end
  local function purge()
    local total = 0
    for _, kind in ipairs(KINDS) do
      local age = o[kind[1]]
      if age then
        local n, partial = prune_kind(pool, kind[3], nil, age, group)
        if n == nil then return total + partial end -- another process prunes the group
        total = total + n
      end
    end
    return total
  end
  return tables.cleanup(shortest, o.interval, purge, { what = "jobs", group = group })
end

return retention

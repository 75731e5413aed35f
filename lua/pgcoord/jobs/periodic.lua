-- Periodic jobs: declarations (jobs:periodic) and the scheduler, a
-- service that enqueues each due slot of every declaration as a job with
-- run_at = the slot time.
--
-- One scheduler in the fleet: every process that runs one competes for
-- the job lock "pgcoord:periodic", and only the holder enqueues, its own
-- declarations (so every process should declare the same ones).  A slot
-- is enqueued at most once, ever: in the transaction that moves the name's
-- last_slot (pgcoord.job_periodic) past it, with the row locked, so two
-- schedulers at once (a lock taken over from a paused holder) cannot both
-- enqueue it.  The holder's writes are fenced too.
--
-- Slots that came due while this scheduler watched are enqueued however
-- late it is; those that came due before (the fleet ran no scheduler, or
-- the declaration is new or changed) are "missed": enqueued only when no
-- older than the declaration's backfill (seconds, default 0: skipped).  A
-- name seen for the first time starts with the slots after that.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local lifecycle = require "pgcoord.lifecycle"
local options = require "pgcoord.options"
local backoff = require "pgcoord.backoff"
local joblock = require "pgcoord.joblock"
local json = require "pgcoord.json"
local metrics = require "pgcoord.metrics"
local cron = require "pgcoord.jobs.cron"
local sql = require "pgcoord.jobs.periodic_sql"

local periodic = {}

local Scheduler = {}
Scheduler.__index = Scheduler

-- Slots enqueued per transaction: a long backfill goes in several.
local MAX_BATCH = 1000
-- The longest sleep between looks (a clock that drifts is caught up).
local MAX_WAIT = 60
local MAX_BACKFILL = 1000000000

local last_run = metrics.gauge("pgcoord_jobs_periodic_last_run_timestamp_seconds",
  "The last slot of a periodic job enqueued (by this process's scheduler, while it holds"
  .. " the lock).", { "name" })
local next_run = metrics.gauge("pgcoord_jobs_periodic_next_run_timestamp_seconds",
  "The next slot of a periodic job (by this process's scheduler, while it holds the lock).",
  { "name" })
local enqueued_total = metrics.counter("pgcoord_jobs_periodic_enqueued_total",
  "Slots of periodic jobs enqueued by this process's scheduler.", { "name" })

metrics.collect(function()
  last_run:reset()
  next_run:reset()
  for s in metrics.each("periodic") do
    for name, st in pairs(s.status) do
      if st.last_run then last_run:set(st.last_run, name) end
      if st.next_run then next_run:set(st.next_run, name) end
    end
  end
end)

-- ---- declarations ---------------------------------------------------------------

local check_options = options.spec("jobs:periodic", {
  group = { "string" },
  timezone = { { "UTC", "local" }, default = "UTC" },
  backfill = { "number", min = 0, max = MAX_BACKFILL, default = 0 },
})

-- A declaration of name and spec with its options checked (raising at
-- the caller's line); the caller adds type, group and params (JSON text).
function periodic.declaration(name, spec, opts)
  if type(name) ~= "string" or name == "" then
    options.raise("jobs:periodic: name must be a non-empty string, got %s", options.show(name))
  end
  json.check_text("jobs:periodic", "name", name)
  local schedule, why = cron.parse(spec)
  if not schedule then
    options.raise("jobs:periodic %q: bad spec %s: %s", name, options.show(spec), why)
  end
  json.check_text(("jobs:periodic %q"):format(name), "spec", spec)
  local o = check_options(opts)
  return { name = name, spec = spec, schedule = schedule, group = o.group,
           timezone = o.timezone, backfill = o.backfill }
end

-- ---- one visit of a declaration ---------------------------------------------------

-- Enqueues decl's due slots in a transaction of pool (fenced by fence(tx)
-- when given).  watch_from: since when (database time) this scheduler has
-- watched decl; nil: from now.  Returns { now =, next_due =, enqueued =,
-- last = } (epoch seconds; next_due nil when no slot comes).
function periodic.visit(pool, decl, watch_from, fence)
  return pool:tx(function(tx)
    if fence then fence(tx) end
    local row = tx:one(sql.VISIT, decl.name, decl.spec, decl.group, decl.type, decl.timezone)
    local now, schedule, tz = row.now, decl.schedule, decl.timezone
    local lo = math.min(watch_from or now, now - decl.backfill)
    local after = math.max(row.last_slot or row.created_at, math.ceil(lo) - 1)
    local slots, s = {}, schedule:next(after, tz)
    while s and s <= now and #slots < MAX_BATCH do
      slots[#slots + 1] = s
      s = schedule:next(s, tz)
    end
    local n = 0
    if #slots > 0 then
      n = tx:one(sql.ENQUEUE, decl.name, slots[#slots], s, slots[1], decl.group, decl.type,
        decl.params, slots).enqueued
    elseif s ~= row.next_slot then
      tx:exec(sql.SET_NEXT, decl.name, s)
    end
    return { now = now, next_due = s, enqueued = n,
             last = n > 0 and slots[#slots] or row.last_slot }
  end)
end

-- ---- the scheduler -------------------------------------------------------------

-- decls: name -> declaration, the caller's table (read at every look).
-- opts: subscriber (the lock hears of releases through it); lock = false
-- runs without the fleet's lock (only for tests of the slot guard).
function periodic.new(pool, decls, opts)
  opts = opts or {}
  local s = setmetatable({
    pool = pool, decls = decls, state = "running",
    wake = task.signal(),      -- a declaration changed, or stop
    status = {},               -- name -> { last_run =, next_run = } while holding
    dirty = true,              -- look at every declaration
    ended = task.cond(),
    enqueued = 0, failures = 0, -- slots enqueued, visits that failed
    lock = opts.lock ~= false, subscriber = opts.subscriber,
  }, Scheduler)
  s.unregister = lifecycle.on_stop(function() s:stop() end, "periodic scheduler")
  metrics.track("periodic", s)
  s:_compete()
  return s
end

-- Competes for the lock once something is declared: a scheduler with
-- nothing to schedule must not keep the lock from one that has.
function Scheduler:_compete()
  if self.runner or self.task or not next(self.decls) then return end
  if self.lock then
    self.runner = joblock.run_in_job_lock(self.pool, "pgcoord", "periodic",
      { subscriber = self.subscriber }, function(ctx) return self:_hold(ctx) end)
  else
    self.task = task.spawn(self._hold, self, nil)
  end
end

-- One holding of the lock (ctx nil: no lock): looks at each declaration
-- when its next slot is due, until stopped or the lock is lost.
function Scheduler:_hold(ctx)
  local fence = ctx and ctx.fence
  local _ <close> = setmetatable({}, { __close = function() self.status = {} end })
  log.info("periodic scheduler is scheduling", { token = ctx and ctx.token })
  local watch = setmetatable({}, { __mode = "k" }) -- declaration -> watched since
  local due = {}                                    -- name -> next look (database time)
  local skew = 0                                    -- database clock - ours
  local retries = {}                                -- name -> backoff, while failing
  while self.state == "running" do
    if self.dirty then
      self.dirty, due = false, {}
    end
    local soonest = math.huge
    for name, decl in pairs(self.decls) do
      local at = due[name]
      if not at or at <= core.time() + skew then
        local ok, r = pcall(periodic.visit, self.pool, decl, watch[decl], fence)
        if ok then
          retries[name] = nil
          skew = r.now - core.time()
          watch[decl] = watch[decl] or r.now
          at = r.next_due or math.huge
          self.status[name] = { last_run = r.last, next_run = r.next_due }
          if r.enqueued > 0 then
            enqueued_total:inc(r.enqueued, name)
            self.enqueued = self.enqueued + r.enqueued
            log.info("periodic job enqueued", { name = name, slots = r.enqueued,
              last = r.last })
          end
        else
          if task.is_cancelled(r) then error(r, 0) end
          -- (backing off for this name only: the others keep their slots)
          retries[name] = retries[name] or backoff.new({ base = 0.1, cap = 10 })
          at = core.time() + skew + retries[name]:next()
          self.failures = self.failures + 1
          log.warn("periodic scheduling failed", { name = name, error = r })
        end
        due[name] = at
      end
      if at < soonest then soonest = at end
    end
    local timeout = math.min(MAX_WAIT, soonest - (core.time() + skew))
    if timeout > 0 then self.wake:wait(timeout) end
  end
end

-- A declaration was added or changed: look at every one now.
function Scheduler:changed()
  if self.state ~= "running" then return end
  self.dirty = true
  self.wake:notify()
  self:_compete()
end

-- Stops scheduling (a visit on its way rolls back) and releases the lock;
-- unregisters its stop handler.  Returns once stopped, whoever stops it.
function Scheduler:stop(timeout)
  options.timeout("scheduler:stop", timeout)
  if self.state ~= "running" then
    while self.state ~= "stopped" do self.ended:wait() end
    return
  end
  self.state = "stopping"
  self.unregister()
  if self.runner then
    self.runner:stop(timeout) -- (cancels the holding where it is)
  elseif self.task then
    self.wake:notify()
    if not self.task:wait(timeout) then self.task:cancel() end
  end
  self.status = {}
  self.state = "stopped"
  log.info("periodic scheduler stopped", { enqueued = self.enqueued, failed = self.failures })
  self.ended:signal()
end

-- ---- listing ---------------------------------------------------------------------

-- The declarations of decls, by name, with last_run from the database and
-- next_run the first slot after now (and after last_run); with none
-- declared, every name the database knows, as its scheduler last wrote it.
function periodic.list(pool, decls)
  local names = {}
  for name in pairs(decls) do names[#names + 1] = name end
  table.sort(names)
  local result = pool:one(sql.LIST, #names > 0 and names or nil)
  for _, r in ipairs(result.rows) do
    if r.last_run == json.null then r.last_run = nil end
    if r.next_run == json.null then r.next_run = nil end
  end
  if #names == 0 then return result.rows end
  local known = {}
  for _, r in ipairs(result.rows) do known[r.name] = r end
  local list = {}
  for i, name in ipairs(names) do
    local d, r = decls[name], known[name]
    local last = r and r.last_run
    list[i] = { name = name, spec = d.spec, group = d.group, type = d.type,
                timezone = d.timezone, backfill = d.backfill, last_run = last,
                next_run = d.schedule:next(math.max(result.now, last or result.now), d.timezone) }
  end
  return list
end

return periodic

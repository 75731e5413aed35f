-- The worker, a service: a fetch loop that claims batches of a group's
-- ready jobs into a local queue, runners (concurrency of them) that take
-- jobs from it and run their handlers, a completer that writes the
-- results back in batches, and the maintenance of the worker's lease.
--
-- A job is at least once: a worker claims jobs (state 'running',
-- locked_by = its id) and deletes each when its handler returned.  A worker
-- that dies stops heartbeating, and the others hand its jobs back.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local json = require "pgcoord.json"
local fifo = require "pgcoord.fifo"
local log = require "pgcoord.log"
local db = require "pgcoord.db"
local lifecycle = require "pgcoord.lifecycle"
local backoff = require "pgcoord.backoff"
local retry = require "pgcoord.retry"
local metrics = require "pgcoord.metrics"
local subscriber = require "pgcoord.subscriber"
local sql = require "pgcoord.jobs.sql"
local completer = require "pgcoord.jobs.completer"
local vacuum = require "pgcoord.jobs.vacuum"
local maintenance = require "pgcoord.jobs.maintenance"
local retention = require "pgcoord.jobs.retention"
local limits = require "pgcoord.jobs.limits"
local control = require "pgcoord.jobs.control"

local worker = {}

local completed = metrics.counter("pgcoord_jobs_completed_total",
  "Job runs that succeeded.", { "group", "type" })
local failed_total = metrics.counter("pgcoord_jobs_failed_total",
  "Jobs that failed their last attempt and were kept as failed.", { "group", "type" })
local retried = metrics.counter("pgcoord_jobs_retried_total",
  "Job runs that failed and were scheduled again.", { "group", "type" })
local snoozed = metrics.counter("pgcoord_jobs_snoozed_total",
  "Job runs that ended in pgcoord.snooze.", { "group", "type" })
local timed_out = metrics.counter("pgcoord_jobs_timed_out_total",
  "Job runs cancelled for running past their type's timeout.", { "group", "type" })
local duration = metrics.histogram("pgcoord_job_duration_seconds",
  "Job run duration.", { "group", "type" })

worker.DEFAULT_RETRY = { max = 3, base_delay = 10 }
-- The longest retry delay (about 31 years), base_delay x attempt included.
worker.MAX_DELAY = 1000000000

local DEFAULT_RETRY, MAX_DELAY, MAX_ERROR =
  worker.DEFAULT_RETRY, worker.MAX_DELAY, completer.MAX_ERROR

-- The error of pgcoord.retry_at: the job runs again at an exact time.
local RetryAt = {}
RetryAt.__index = RetryAt
RetryAt.__tostring = function(e) return ("retry at %.3f: %s"):format(e.at, e.message) end

function worker.retry_at(t, reason)
  return setmetatable({ at = t, message = tostring(reason or "retry requested") }, RetryAt)
end

local Worker = {}
Worker.__index = Worker

local now_time, is_cancelled, is_snooze = core.time, task.is_cancelled, control.is_snooze

local function micros(t)
  return math.floor(t * 1e6 + 0.5)
end

-- ---- the local queue (fifo.lua): claimed, not started; _claim appends ----

local pop, push, count = fifo.pop, fifo.push, fifo.count

-- ---- recording a run's outcome ----

-- The failed run of a job, as the completer writes it: when it runs
-- again (linear retry policy, or pgcoord.retry_at), or that it is final.
local function failure_of(job, err, attempt, retryable, def)
  local policy = def and def.retry or DEFAULT_RETRY
  local failure = { id = job.id, error = tostring(err),
                    delay = math.min(retry.linear(policy.base_delay, attempt), MAX_DELAY),
                    final = not retryable and attempt > policy.max }
  if getmetatable(err) == RetryAt then
    failure.at, failure.error = err.at, err.message
  elseif is_snooze(err) then
    failure.delay, failure.error, failure.snooze, failure.final = err.seconds, tostring(err), true,
      false
  end
  -- (a NUL byte or broken UTF-8 in the text would make the server refuse it)
  failure.error = json.clean_text(failure.error, MAX_ERROR)
  return failure
end

-- Whether should_log_run keeps the run (it may wait; an error keeps it).
local function keeps_run(should_log, job, ok, failure, attempt, started, finished)
  local lok, keep = pcall(should_log, job, { ok = ok, error = failure and failure.error,
    final = failure and failure.final, attempt = attempt, started_at = started,
    finished_at = finished })
  return not lok or keep ~= false
end

-- The metric series of a job type, made on its first run.  Its runs that
-- succeeded are counted in `ok` first, an increment where a metrics call
-- per job would cost more than the job: publish_counts adds them to the
-- counter as each batch of results is written and before each scrape.
local function new_series(self, jtype)
  local group = self.o.group
  local series = { duration = duration:with(group, jtype), completed = completed:with(group, jtype),
                   failed = failed_total:with(group, jtype), retried = retried:with(group, jtype),
                   snoozed = snoozed:with(group, jtype), timed_out = timed_out:with(group, jtype),
                   ok = 0 }
  self.series[jtype] = series
  return series
end

local function publish_counts(self)
  for _, series in pairs(self.series) do
    local n = series.ok
    if n > 0 then
      series.ok = 0
      series.completed:inc(n)
    end
  end
end

metrics.collect(function()
  for w in metrics.each("job_worker") do publish_counts(w) end
end)

-- Records the outcome of a run (def: the job type's definition, if any).
local function finish(self, job, ok, err, started, retryable, def)
  local finished = now_time()
  local jtype, attempt = job.type, job.error_count + 1
  local failure = not ok and failure_of(job, err, attempt, retryable, def) or nil
  local log_run = true
  local should_log = self.o.should_log_run
  if should_log then
    log_run = keeps_run(should_log, job, ok, failure, attempt, started, finished)
  end
  local series = self.series[jtype] or new_series(self, jtype)
  series.duration:observe(finished - started)
  self.handled = self.handled + 1
  if not ok and not failure.snooze then self.failed = self.failed + 1 end
  if ok then
    series.ok = series.ok + 1
  elseif failure.final then
    series.failed:inc()
  elseif failure.snooze then
    series.snoozed:inc()
  else
    series.retried:inc()
  end
  -- (recorded only now: should_log_run may have waited, and the completer
  -- taken the batch that was current before)
  if self.completer:record(job.id, jtype, attempt, ok, failure, log_run, started, finished) then
    self.handoff = true
  end
end

local function handler_error(err)
  if getmetatable(err) == RetryAt or is_cancelled(err) or is_snooze(err) then return err end
  -- (debug.traceback would cut the message at a NUL byte)
  local message = tostring(err):gsub("%z", "\\0")
  return debug.traceback(message, 2)
end

local function run_one(self, job, types, started, slot)
  local def = types[job.type]
  if not def then
    finish(self, job, false, ("no handler for job type %q in this worker"):format(job.type),
      started)
    return
  end
  local ok, err
  if def.timeout then
    -- (a timer only for types with a timeout; disarmed as the handler
    -- ends, however it ends, a cancel of the runner included)
    local _ <close> = self:_arm_timeout(slot, job, def, started)
    ok, err = xpcall(def.fn, handler_error, job)
  else
    ok, err = xpcall(def.fn, handler_error, job)
  end
  if not ok and not is_cancelled(err) and getmetatable(err) ~= RetryAt and not is_snooze(err) then
    log.error("job failed", { job = job.id, type = job.type, error = err })
  end
  finish(self, job, ok, ok and nil or err, started, nil, def)
end

-- ---- the service ----

-- types: job type -> definition; o: the options, checked (jobs:worker).
function worker.new(types, pool, o)
  local w = setmetatable({
    types = types, pool = pool, o = o,
    state = "starting", changed = task.cond(), -- (signalled at each change of state)
    start_given_up = false,           -- stopped before it started
    queue = fifo.new(),               -- claimed, not started
    running = 0,                      -- handlers in progress
    in_flight = {},                   -- runner number -> the job it runs
    wake = task.signal(),             -- the fetch loop waits here
    retry_now = task.cond(),          -- a backoff after a failure waits here
    work = task.cond(),               -- runners wait here
    claims = {},                      -- claim task on its way -> jobs it asks for
    claim_tag = 0,                    -- the last claim's tag (_claim_plain)
    wakes = 0, drained = false,       -- wake-ups so far; group found empty
    handoff = false,                  -- a fetch or flush asked for has not run yet
    alive_until = -math.huge,         -- the lease (maintenance.lua)
    taken = nil,                      -- the id the worker was last taken for dead under
    series = {},                      -- job type -> metric series
    handled = 0, failed = 0,          -- runs ended, and those that failed (snoozes aside)
    paused = false, limited = false,  -- the group's settings (limits.lua)
    settings_version = 0,             -- bumped at each change of them
  }, Worker)
  w.job_meta = control.job_meta(pool, function() return w.maintenance:worker_id() end)
  w.completer = completer.new(pool, o.group, o.flush_count, o.flush_age, {
    on_error = function(what, err) w:_infra_error(what, err) end,
    on_retry_due = function(at)
      w.maintenance:due(at)
      w:_wake()
    end,
    on_flushing = function() w.handoff = false end,
    on_written = function(n)
      publish_counts(w)
      w.vacuum:written(n)
    end,
  })
  w.vacuum = vacuum.new(pool, o.group, o.vacuum_every,
    function(what, err) w:_infra_error(what, err) end)
  w.maintenance = maintenance.new(pool, o.group, o.heartbeat_interval, o.reclaim_after, {
    on_error = function(what, err) w:_infra_error(what, err) end,
    on_lease = function(alive_until) w.alive_until = alive_until end,
    on_taken = function(old) return w:_drop_claimed(old) end,
    on_registered = function(id) w.completer:set_owner(id) end,
    on_wake = function() w:_wake() end,
    running = function() return w.running end,
  })
  w.limiter = limits.watcher(pool, o.group, o.poll_interval, o.reclaim_after, {
    on_change = function() w:_settings_changed() end,
    on_wake = function() w:_wake() end,
    on_error = function(what, err) w:_infra_error(what, err) end,
  })
  metrics.track("job_worker", w) -- (publish_counts before a scrape)
  w.main = task.spawn(w._main, w)
  return w
end

function Worker:_infra_error(what, err)
  local handle_error = self.o.handle_error
  if handle_error then
    local ok, herr = pcall(handle_error, err, what)
    if ok then return end
    log.error("handle_error failed", { error = tostring(herr) })
  end
  log[db.failure_level(self, err, "error")]("job worker: " .. what,
    { group = self.o.group, error = tostring(err) })
end

-- Wakes the fetch loop because ready jobs may have appeared (a NOTIFY,
-- signal(), a reconnect): a group found empty is worth a claim again.
function Worker:_wake()
  self.wakes = self.wakes + 1
  self.drained = false
  self.retry_now:signal()
  return self.wake:notify()
end

-- Runs fn until it succeeds, backing off while the database is away (a
-- wake-up cuts a wait short: the database may be back).  Gives up (nil)
-- once the worker is stopped, or its start given up (_give_up_start).
function Worker:_persist(what, fn, ...)
  local delay = backoff.new({ base = 0.1, cap = 10 })
  repeat
    local ok, a, b = pcall(fn, ...)
    if ok then return a, b end
    self:_infra_error(what, a)
    if self.state == "stopped" or self.start_given_up then return nil end
    self.retry_now:wait(delay:next())
  until self.start_given_up
end

-- ---- fetching ----

-- A claimed job whose params cannot be decoded fails its run (retries
-- apply, then it stays as failed) without holding up the others.
function Worker:_undecodable(job, err)
  local message = "job params cannot be decoded: " .. tostring(err)
  log.error("job failed", { job = job.id, type = job.type, error = message })
  job.params = nil
  finish(self, job, false, message, core.time(), nil, self.types[job.type])
end

local function hand_back(pool, ids, id)
  return pool:query(sql.HAND_BACK, ids, id)
end

local function unclaim(pool, id, tag)
  return pool:query(sql.UNCLAIM, id, tag)
end

-- The plain claim: one statement, one round trip.  It commits before its
-- rows are read, so a claim whose rows cannot be read (out of memory) or
-- whose outcome is lost with the link would leave them 'running' under
-- this worker's id and in no runner's hands: they go back by the claim's
-- tag (sql.lua).  A statement the server refused (severity ERROR) took
-- nothing, nor one that found no connection (08001: never sent).
function Worker:_claim_plain(id, want)
  local tag = math.max(micros(now_time()), self.claim_tag + 1)
  self.claim_tag = tag
  local ok, rows = pcall(self.pool.query, self.pool, sql.CLAIM, self.o.group, id, want, tag)
  if ok then return rows end
  if not (db.is_error(rows) and (rows.severity == "ERROR" or rows.sqlstate == "08001")) then
    self:_persist("handing back an unread claim failed", unclaim, self.pool, id, tag)
  end
  error(rows, 0)
end

function Worker:_claim(want)
  local id, version = self.maintenance:worker_id(), self.settings_version
  local rows
  if self.limited then
    -- (in a transaction: it locks the group's row; one that fails rolls back)
    rows = self.pool:tx(limits.claim, self.limiter, id, want, self.running + count(self.queue))
  else
    rows = self:_claim_plain(id, want)
  end
  local n = #rows
  if n == 0 then return 0 end
  if self.state ~= "running" or self.maintenance:worker_id() ~= id or self.taken == id
     or self.settings_version ~= version then
    -- a stop began while the claim was on its way (its hand-back is over,
    -- and the runners may be gone), or the worker was taken for dead and
    -- starts over under a new id (which it may not have yet), or the
    -- group was paused or limited meanwhile: hand these back too
    local ids = {}
    for i = 1, n do ids[i] = rows[i].id end
    self:_persist("handing back jobs failed", hand_back, self.pool, ids, id)
    return n
  end
  local decode, q = json.decode, self.queue
  core.set_metatables(rows, self.job_meta) -- (job:progress)
  for i = 1, n do
    local job = rows[i]
    local params = job.params
    local ok, value = true, nil
    if params == "{}" then
      value = {} -- (the params of most jobs: no decoder, no pcall)
    elseif params then
      ok, value = pcall(decode, params)
    end
    if ok then
      job.params = value
      push(q, job)
    else
      self:_undecodable(job, value)
    end
  end
  self.work:signal()
  return n
end

-- One claim, in a task of its own.  A claim that comes back short found
-- the group empty: no more claims until something wakes the worker.
function Worker:_claim_task(want)
  local wakes = self.wakes
  local n = self:_persist("claim failed", self._claim, self, want) or 0
  self.claims[task.current()] = nil
  if n < want and self.wakes == wakes then self.drained = true end
  self.wake:notify()
end

-- Starts claims while what is in hand or on its way is at refill_at or
-- below: up to MAX_CLAIMS at once, so that one is on its way while the
-- server works on another and the runners on what came back before.
local MAX_CLAIMS = 2

function Worker:_start_claims()
  local o, q = self.o, self.queue
  if self.limited then return self:_start_limited_claim() end
  local on_way, claiming = 0, 0
  for _, want in pairs(self.claims) do
    on_way, claiming = on_way + 1, claiming + want
  end
  while not self.drained and self.state == "running" and on_way < MAX_CLAIMS do
    local held = count(q) + claiming
    if held > o.refill_at then return end
    local want = math.min(o.prefetch - held, o.claim_max)
    claiming = claiming + want
    self.claims[task.spawn(self._claim_task, self, want)] = want
    on_way = on_way + 1
  end
end

-- A paused or limited group: one claim at a time, of no more than the
-- runners can start now (what is claimed takes the group's slots and
-- tokens), none while paused.
function Worker:_start_limited_claim()
  if self.paused or self.drained or self.state ~= "running" or next(self.claims) then return end
  local want = self.o.concurrency - self.running - count(self.queue)
  if want > 0 then self.claims[task.spawn(self._claim_task, self, want)] = want end
end

-- The group was paused, resumed or its limits changed (limits.lua).
-- Paused or limited, the jobs claimed and not started go back: none of
-- them starts now, and the others (and this worker) claim them again under
-- the new settings.
function Worker:_settings_changed()
  local l = self.limiter
  self.settings_version = self.settings_version + 1
  self.paused, self.limited = l:paused(), l:limited()
  log.info("job group settings changed", { group = self.o.group, paused = self.paused,
    limited = self.limited })
  if self.limited and self.state == "running" then
    local back = {}
    for job in pop, self.queue do back[#back + 1] = job.id end
    if #back > 0 then
      local id = self.maintenance:worker_id()
      task.spawn(self._persist, self, "handing back jobs failed", hand_back, self.pool, back, id)
    end
  end
  self:_wake()
end

-- The worker was taken for dead: drops the claimed jobs not started (the
-- others run them now) and gives back any a claim under the old id took
-- after the hand-back (they are nobody's; any others are not ours and
-- stay).  Returns how many it dropped.
function Worker:_drop_claimed(old)
  self.taken = old -- (a claim that lands before the new id does is not ours either)
  local dropped = {}
  for job in pop, self.queue do dropped[#dropped + 1] = job.id end
  if #dropped > 0 then
    local ok, err = pcall(hand_back, self.pool, dropped, old)
    if not ok then self:_infra_error("handing back jobs failed", err) end
  end
  return #dropped
end

-- The fetch loop: claims while there is room, promotes due jobs on each
-- poll and when the earliest comes due, else waits for a wake-up.  What a
-- promotion readies is claimed on the next round.  (Reclaiming the jobs of
-- dead workers is the maintenance's.)
function Worker:_fetch_loop()
  local poll_interval, m = self.o.poll_interval, self.maintenance
  -- the first round polls: jobs may have come due while no worker ran
  local last_poll = core.now() - poll_interval
  while self.state == "running" do
    local now = core.now()
    local polling = now - last_poll >= poll_interval
    if polling then
      last_poll = now
      self.drained = false
    end
    self:_start_claims()
    local promoted = 0
    local due = m:next_due()
    if polling or (due and now >= due) then
      promoted = self:_persist("promote failed", m.promote, m) or 0
      if promoted > 0 then
        -- a wake-up: a claim on its way whose snapshot came before the
        -- promotion's commit comes back short, and must not take the
        -- group for empty (_claim_task)
        self.wakes = self.wakes + 1
        self.drained = false
      end
    end
    if promoted == 0 then
      local timeout = poll_interval - (core.now() - last_poll)
      due = m:next_due()
      if due then timeout = math.min(timeout, due - core.now()) end
      if timeout > 0 then
        self.wake:wait(timeout)
        self.handoff = false
      end
    end
  end
end

-- ---- running ----

-- Handlers that never wait would keep the fetch and flush loops from
-- running until the local queue is empty.  So a runner passes after
-- PASS_EVERY jobs in a row, and every runner passes while a fetch or flush
-- it asked for (self.handoff) has not started: with many runners ready, a
-- loop that waited behind all of them would start too late.
local PASS_EVERY = 32

function Worker:_runner(slot)
  local streak = 0
  local q, in_flight, types, refill_at = self.queue, self.in_flight, self.types, self.o.refill_at
  local wake, results = self.wake, self.completer
  while true do
    if self.handoff or streak >= PASS_EVERY then
      streak = 0
      task.pass()
    end
    if results.full and count(q) > 0 then results:make_room() end
    local started = now_time()
    if started >= self.alive_until and count(q) > 0 then
      if not self.maintenance:renew_lease() then return end
      started = now_time()
    end
    local job = pop(q)
    if job then
      self.running = self.running + 1
      -- (wake.kept: the fetch loop has a wake-up it has not taken yet)
      if count(q) <= refill_at and not self.drained and not wake.kept
         and wake:notify() then
        self.handoff = true
      end
      in_flight[slot] = job
      run_one(self, job, types, started, slot)
      in_flight[slot] = nil
      local running = self.running - 1
      self.running = running
      streak = streak + 1
      -- (limited: the claim that follows gives the slot back)
      if self.limited then self:_wake() end
      if running == 0 and count(q) == 0 then
        -- nothing left in hand: no reason to hold results back
        results:flush()
      end
    elseif self.state ~= "running" then
      return
    else
      self.work:wait()
    end
  end
end

-- ---- interrupting a handler: cancel and timeout ----

-- Stops the handler running in slot (its task is cancelled: to-be-closed
-- variables run) and puts a fresh runner in the slot.  Returns the job it
-- ran, or nil when the slot runs no job now.
function Worker:_interrupt(slot)
  local job, runner = self.in_flight[slot], self.runners[slot]
  if not job or runner == task.current() then return nil end
  self.in_flight[slot] = nil
  runner:cancel()
  self.running = self.running - 1
  self.runners[slot] = task.spawn(self._runner, self, slot)
  if self.running == 0 and count(self.queue) == 0 then self.completer:flush() end
  return job
end

local DISARM = { __close = function(armed) armed.timer:cancel() end }

-- A timer that, past def.timeout, fails the job's run as timed out
-- (retried by the type's retry rule); closing the value returned disarms it.
function Worker:_arm_timeout(slot, job, def, started)
  local seconds = def.timeout
  return setmetatable({ timer = core.timer(seconds, function()
    if self.in_flight[slot] ~= job or not self:_interrupt(slot) then return end
    local message = ("timed out after %g s"):format(seconds)
    log.warn("job timed out", { group = self.o.group, job = job.id, type = job.type,
                                timeout = seconds })
    local series = self.series[job.type] or new_series(self, job.type)
    series.timed_out:inc()
    -- (in a task: should_log_run may wait, and this is a timer callback)
    task.spawn(finish, self, job, false, message, started, nil, def)
  end) }, DISARM)
end

-- The jobs among ids that this worker holds were cancelled (jobs:cancel
-- took them from it and logged their runs): running handlers are
-- cancelled, claimed jobs not started are dropped.  No result is
-- recorded: the rows are no longer this worker's.
function Worker:cancel_jobs(ids)
  local wanted = {}
  for _, id in ipairs(ids) do wanted[id] = true end
  for slot, job in pairs(self.in_flight) do
    if wanted[job.id] and self:_interrupt(slot) then
      log.info("job cancelled", { group = self.o.group, job = job.id, type = job.type,
                                  worker = self.maintenance:worker_id() })
    end
  end
  fifo.keep(self.queue, function(job)
    if not wanted[job.id] then return true end
    log.info("job cancelled before it started", { group = self.o.group, job = job.id,
                                                   type = job.type })
    return false
  end)
end

-- Cancels the jobs in hand that were cancelled while the worker was not
-- listening (after a reconnect: their NOTIFY may be lost).
function Worker:_recheck_cancels()
  local ids, q = {}, self.queue
  for _, job in pairs(self.in_flight) do ids[#ids + 1] = job.id end
  for i = q.head, q.tail do ids[#ids + 1] = q[i].id end
  if #ids == 0 then return end
  local ok, rows = pcall(self.pool.query, self.pool, sql.CANCELLED_AMONG, core.int_array(ids))
  if not ok then
    self:_infra_error("looking for cancelled jobs failed", rows)
    return
  end
  local cancelled = {}
  for i, row in ipairs(rows) do cancelled[i] = row.id end
  if #cancelled > 0 then self:cancel_jobs(cancelled) end
end

-- ---- life cycle ----

function Worker:_listen()
  local sub, own = self.o.subscriber, false
  if not sub then
    sub, own = subscriber.new(self.pool), true
  end
  local m = self.maintenance
  -- (re)connected: notifications may have been missed, so claim and
  -- promote at once
  local unhook = sub:hook_reconnect(function()
    m:due(core.now())
    self:_wake()
    -- a cancel sent while not listening was missed: ask about the jobs in hand
    if next(self.in_flight) or count(self.queue) > 0 then
      task.spawn(self._recheck_cancels, self)
    end
  end)
  local group = self.o.group
  self.limiter:listen(sub)
  local listener = sub:channel(sql.CHANNEL):on(function(msg)
    local due = msg.due_in
    if type(due) == "number" and due > 0 then m:due(core.now() + due) end
    self:_wake()
  end, { filter = function(msg) return type(msg) == "table" and msg.group == group end })
  -- jobs:cancel names the worker that holds the jobs (its current id)
  local cancels = sub:channel(sql.CHANNEL):on(function(msg) self:cancel_jobs(msg.cancel) end,
    { filter = function(msg)
        return type(msg) == "table" and msg.worker ~= nil and msg.worker == m:worker_id()
          and type(msg.cancel) == "table"
      end })
  if own then sub:start() end
  self.unlisten = function()
    cancels:close()
    listener:close()
    unhook()
    if own then sub:stop() end
  end
end

function Worker:_main()
  local m, o = self.maintenance, self.o
  local id = self:_persist("registering the worker failed", m.register, m)
  if self.start_given_up then return end
  self.completer:set_owner(id)
  self:_listen()
  -- (paused or limited from the first claim on)
  self:_persist("reading the group's settings failed", self.limiter.load, self.limiter)
  if self.start_given_up then return end
  self.state = "running"
  self.unregister = lifecycle.on_stop(function() self:stop() end,
    "job worker " .. self.o.group)
  self.completer:start()
  m:start()
  if o.retention then self.pruner = retention.start(self.pool, o.group, o.retention) end
  self.limiter:start()
  self.runners = {}
  for i = 1, o.concurrency do self.runners[i] = task.spawn(self._runner, self, i) end
  log.info("job worker started", { group = o.group, worker = id, concurrency = o.concurrency })
  self.changed:signal()
  self:_fetch_loop()
end

-- Waits until the worker is registered and listening.
function Worker:ready()
  while self.state == "starting" do self.changed:wait() end
  return self.state == "running"
end

-- Wakes the worker to look for jobs at once.
function Worker:signal()
  self:_wake()
end

local FETCH_GRACE = 1

-- Stops fetching, hands back claimed jobs not yet started, waits for
-- running handlers (up to timeout, then cancels them as failed and
-- retryable), writes every result, deregisters, and unregisters its stop
-- handler.  Returns once the worker is stopped, whoever stops it.  One
-- not started yet gives its start up (_give_up_start).
function Worker:stop(timeout)
  if self.state == "starting" then return self:_give_up_start() end
  if self.state ~= "running" then
    while self.state ~= "stopped" do self.changed:wait() end
    return
  end
  self.state = "stopping"
  self.changed:signal()
  self.unregister()
  self:_wake()
  self.work:signal()
  self.maintenance:stop()
  -- (a pass may have many batches to go: the one on its way is given a
  -- moment, then rolled back; the next pass, anywhere, takes it up)
  if self.pruner then self.pruner:stop(FETCH_GRACE) end
  self.limiter:stop()
  self.unlisten()
  -- A claim or promotion on its way gets a moment to land (a claim that
  -- lands then hands its jobs back itself); one held up longer, by a lock
  -- say, is cancelled and its transaction rolls back.
  local grace = core.now() + math.min(timeout or FETCH_GRACE, FETCH_GRACE)
  local function left(deadline) return deadline and math.max(0, deadline - core.now()) end
  for t in pairs(self.claims) do
    if not t:wait(left(grace)) then t:cancel() end
  end
  if not self.main:wait(left(grace)) then self.main:cancel() end
  local back, id = {}, self.maintenance:worker_id()
  for job in pop, self.queue do back[#back + 1] = job.id end
  if #back > 0 then
    self:_persist("handing back jobs failed", hand_back, self.pool, back, id)
  end
  local deadline = timeout and core.now() + timeout
  for _, r in ipairs(self.runners) do
    if not r:wait(left(deadline)) then r:cancel() end
  end
  -- runners cancelled mid-job leave no result: record them as retryable
  for slot, job in pairs(self.in_flight) do
    self.in_flight[slot] = nil
    finish(self, job, false, "cancelled at shutdown", core.time(), true, self.types[job.type])
  end
  self.completer:stop()
  publish_counts(self)
  self.vacuum:stop(FETCH_GRACE)
  self.maintenance:deregister()
  if self.limited and not self.paused then self.limiter:slots_freed() end
  self.state = "stopped"
  log.info("job worker stopped", { group = self.o.group, worker = id, handled = self.handled,
    failed = self.failed })
  self.changed:signal()
end

-- A stop before the worker started: it is still registering, or failing
-- to (the database away or not migrated), and would wait for that.  The
-- start ends at its next step instead; a statement on its way gets a
-- moment to land, then is cancelled (its backend ended: db.lua).  What the
-- start set up is undone.
function Worker:_give_up_start()
  self.state, self.start_given_up = "stopping", true
  self.changed:signal() -- (ready() returns false)
  self.retry_now:signal() -- (no more tries: the backoff ends now)
  if not self.main:wait(FETCH_GRACE) then self.main:cancel() end
  self.limiter:stop()
  if self.unlisten then self.unlisten() end
  local id = self.maintenance:worker_id()
  if id then self.maintenance:deregister() end
  self.state = "stopped"
  log.info("job worker stopped before it started", { group = self.o.group, worker = id })
  self.changed:signal()
end

-- The name README and DESIGN give stop().
Worker.shutdown = Worker.stop

function Worker:stats()
  return { group = self.o.group, id = self.maintenance:worker_id(), state = self.state,
           queued = count(self.queue), running = self.running, handled = self.handled,
           failed = self.failed,
           unflushed = self.completer:unwritten(), paused = self.paused, limited = self.limited,
           retention = self.pruner and self.pruner:stats() or nil,
           vacuums = self.vacuum:count() }
end

return worker

-- A worker's standing in the database and the upkeep of its group: its
-- row in job_workers and the heartbeat that keeps it (the lease), the
-- hand-back of jobs of workers that stopped beating (reclaim), and the
-- promotion of scheduled jobs that came due.
--
-- The lease.  Others take the worker for dead once its heartbeat is
-- reclaim_after old, and run its jobs.  The lease is when that can first
-- happen by this process's clock: reclaim_after past the sending of the
-- last heartbeat that found the worker's row.  (Wall-clock time, which
-- runners read anyway for each run's start; a clock jump forward costs an
-- early heartbeat.)  Past it (the process was stopped, paused or cut off
-- from the server) no runner starts a job until a heartbeat tells whether
-- the jobs in hand are still the worker's.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local lifecycle = require "pgcoord.lifecycle"
local sql = require "pgcoord.jobs.sql"

local maintenance = {}

local now_time = core.time

local Maintenance = {}
Maintenance.__index = Maintenance

-- hooks: on_error(what, err); on_lease(alive_until); on_taken(old_id) ->
-- how many jobs in hand it dropped (the worker was taken for dead);
-- on_registered(id); on_wake() (jobs may be ready); running() -> the
-- handlers in progress, which each heartbeat records.
function maintenance.new(pool, group, heartbeat_interval, reclaim_after, hooks)
  return setmetatable({
    pool = pool, group = group, hooks = hooks, id = nil,
    name = lifecycle.process_name(),
    heartbeat_interval = heartbeat_interval, reclaim_after = reclaim_after,
    alive = task.cond(),          -- a heartbeat renewed the lease
    beat_now = task.cond(),       -- runners past the lease ask for a beat
    alive_until = -math.huge,     -- the lease (see the header)
    swept_at = nil, earliest = nil, past_lease = false, stopped = false, beater = nil,
  }, Maintenance)
end

-- The worker's id in job_workers.
function Maintenance:worker_id()
  return self.id
end

function Maintenance:_lease(sent)
  self.alive_until = sent + self.reclaim_after
  self.hooks.on_lease(self.alive_until)
end

-- Registers the worker (raises when the database says no).
function Maintenance:register()
  local sent = now_time()
  local row = self.pool:one(sql.REGISTER, self.group, self.name)
  self.id = row.id
  self:_lease(sent)
  return row.id
end

function Maintenance:deregister()
  return pcall(self.pool.exec, self.pool, sql.DEREGISTER, self.id)
end

-- Others took us for dead and handed our jobs back: they run the claimed
-- jobs not started, and results of the others will be refused.  So the
-- worker drops the claimed ones and starts over under a new id.
function Maintenance:_register_again()
  local old = self.id
  local dropped = self.hooks.on_taken(old)
  local ok, row = pcall(self.pool.one, self.pool, sql.REGISTER, self.group, self.name)
  if not ok then
    self.hooks.on_error("registering the worker again failed", row)
    return false
  end
  self.id = row.id
  self.hooks.on_registered(row.id)
  log.warn("job worker was taken for dead, registered again",
    { group = self.group, old = old, worker = row.id, dropped = dropped })
  self.hooks.on_wake()
  return true
end

-- Beats; when the worker's row is gone (taken for dead, its jobs handed
-- back), registers again.
function Maintenance:_beat()
  local sent = now_time()
  local ok, beat = pcall(self.pool.exec, self.pool, sql.HEARTBEAT, self.id, self.hooks.running())
  if not ok then
    self.hooks.on_error("heartbeat failed", beat)
    return
  end
  if beat == 0 and not self:_register_again() then return end
  self:_lease(sent)
  self.past_lease = false
  self.alive:signal()
end

-- A runner about to start a job past the lease: asks for a heartbeat now
-- and waits for it.  Returns false when the worker stops meanwhile.
function Maintenance:renew_lease()
  if not self.past_lease then
    self.past_lease = true
    log.warn("job worker is past its lease: no job starts until a heartbeat",
      { group = self.group, worker = self.id, late = now_time() - self.alive_until })
  end
  while now_time() >= self.alive_until do
    if self.stopped then return false end
    self.beat_now:signal()
    self.alive:wait(self.heartbeat_interval)
  end
  return true
end

function Maintenance:_reclaim()
  local now = core.now()
  local sweep = not self.swept_at or now - self.swept_at >= self.reclaim_after
  local row = self.pool:one(sql.RECLAIM, self.reclaim_after, sweep, self.id)
  if sweep then self.swept_at = now end
  if row.reclaimed > 0 then
    log.warn("reclaimed jobs of workers that stopped heartbeating",
      { group = self.group, jobs = row.reclaimed })
  end
end

-- Beats, and hands back the jobs of workers that stopped beating: at
-- start-up (they may have died while no worker ran) and after each beat.
function Maintenance:_heartbeat_loop()
  while not self.stopped do
    local ok, err = pcall(self._reclaim, self)
    if not ok then self.hooks.on_error("reclaim failed", err) end
    self.beat_now:wait(self.heartbeat_interval)
    if self.stopped then break end
    self:_beat()
  end
end

function Maintenance:start()
  self.beater = task.spawn(self._heartbeat_loop, self)
end

-- Stops beating.  Nothing of the heartbeat loop's needs finishing, and a
-- reclaim of its may wait on a lock: it is stopped where it is.
function Maintenance:stop()
  self.stopped = true
  self.alive:signal() -- (runners waiting for a heartbeat: none comes now)
  if self.beater then self.beater:cancel() end
end

-- ---- due jobs ----

-- Keeps at (core.now() time) if it is the earliest known due time.
function Maintenance:due(at)
  if not self.earliest or at < self.earliest then self.earliest = at end
end

function Maintenance:next_due()
  return self.earliest
end

-- Promotes the group's due jobs; returns how many.  The next due time
-- becomes the earliest of the server's and those learnt meanwhile (a
-- retry written or a NOTIFY while the promotion was on its way, which its
-- snapshot may not see).
function Maintenance:promote()
  self.earliest = nil
  local row = self.pool:one(sql.PROMOTE, self.group)
  if row.next_in then self:due(core.now() + math.max(0, row.next_in)) end
  return row.promoted
end

return maintenance

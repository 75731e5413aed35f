-- Job lock: leader election through a row of pgcoord.job_locks.
--
-- The holder renews the row every ping_interval; a row not renewed for
-- stale_after (by the database's clock) may be taken over.  The holder
-- must stop before that can happen, so it counts from the moment it *sent*
-- its last successful renewal and declares the lock lost once
-- stale_after - timeout has passed without another: its work is cancelled
-- while the row still protects it.  That protects only work that runs: a
-- process paused (SIGSTOP, a VM freeze, a long GC) past stale_after
-- resumes with writes on the wire before its keeper can notice.  Those
-- writes are safe only when fenced: ctx.fence(tx) checks, in the work's
-- transaction, that the row still carries this token, and locks it FOR
-- SHARE until that transaction ends, so a takeover (an UPDATE of the row)
-- waits for the commit, and a write after a takeover is refused.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local db = require "pgcoord.db"
local lifecycle = require "pgcoord.lifecycle"
local options = require "pgcoord.options"

local joblock = {}

local Lock = {}
Lock.__index = Lock
local Runner = {}
Runner.__index = Runner

local ACQUIRE = [[
INSERT INTO pgcoord.job_locks AS l (name, holder, token, acquired_at, renewed_at)
VALUES ($1, $2, 1, now(), now())
ON CONFLICT (name) DO UPDATE
   SET holder = excluded.holder, token = l.token + 1, acquired_at = now(),
       renewed_at = now(), released_at = NULL
 WHERE l.holder IS NULL OR l.renewed_at < now() - make_interval(secs => $3)
RETURNING token]]

local RENEW = [[
UPDATE pgcoord.job_locks SET renewed_at = now()
 WHERE name = $1 AND holder = $2 AND token = $3]]

local RELEASE = [[
WITH released AS (
  UPDATE pgcoord.job_locks SET holder = NULL, released_at = now()
   WHERE name = $1 AND holder = $2 AND token = $3
  RETURNING name)
SELECT pg_notify('pgcoord_job_lock_released', name) FROM released]]

-- The fence: this holder and token still hold the row, locked until the
-- caller's transaction ends.
local FENCE = [[
SELECT token FROM pgcoord.job_locks
 WHERE name = $1 AND holder = $2 AND token = $3
   FOR SHARE]]

local nonce_counter = 0

local function identity()
  nonce_counter = nonce_counter + 1
  return ("%s:%x%x"):format(lifecycle.process_name(), math.random(0, 0xffffff), nonce_counter)
end

-- Below these floors the keeper or a waiter would spin (a renewal every
-- ping_interval, retried after at most timeout; a look every
-- check_interval); above a year, now() - stale_after leaves PostgreSQL's
-- range, and nothing waits that long.
local MAX_SECONDS = 365 * 86400

local RULES = {
  ping_interval = { "number", default = 10, min = 0.1, max = MAX_SECONDS },
  stale_after = { "number", min = 0.1, max = MAX_SECONDS },     -- default 4 * ping_interval
  check_interval = { "number", min = 0.05, max = MAX_SECONDS }, -- default 2 * ping_interval
  timeout = { "number", min = 0.02, max = MAX_SECONDS },        -- default ping_interval / 2
  subscriber = { "table" },
}
local checkers = {}   -- where -> options.spec of RULES

local function lock_options(where, opts)
  checkers[where] = checkers[where] or options.spec(where, RULES)
  local o = checkers[where](opts)
  local ping = o.ping_interval
  o.stale_after = o.stale_after or 4 * ping
  o.check_interval = o.check_interval or 2 * ping
  o.timeout = o.timeout or ping / 2
  if o.stale_after <= ping then
    options.raise("%s: stale_after (%s) must exceed ping_interval (%s)", where,
      options.show(o.stale_after), options.show(ping))
  end
  if o.timeout >= ping then
    options.raise("%s: timeout (%s) must be less than ping_interval (%s)", where,
      options.show(o.timeout), options.show(ping))
  end
  return o
end

local function check_name(where, what, name)
  if type(name) ~= "string" or name == "" then
    options.raise("%s: %s must be a non-empty string, got %s", where, what, options.show(name))
  end
end

local function new_lock(where, pool, name, opts)
  if type(pool) ~= "table" or type(pool.query) ~= "function" or type(pool.tx) ~= "function"
     or not pool.size then
    options.raise("%s: expected a pool from pgcoord.connect, got %s", where, type(pool))
  end
  check_name(where, "name", name)
  local self = setmetatable(lock_options(where, opts), Lock)
  self.pool, self.name, self.holder = pool, name, identity()
  self.current = ""          -- "", "held", "lost", "released"
  self.wake = task.signal()  -- the keeper and the waiter sleep here
  self.halted = false        -- stopped by its runner: run no more
  require("pgcoord.metrics").track("joblock", self)
  return self
end

function joblock.new(pool, name, opts)
  return new_lock("pgcoord.joblock", pool, name, opts)
end

function Lock:state()
  return self.current
end

-- ---- acquiring ---------------------------------------------------------------

-- Wakes waiters when any lock is released, if a subscriber was given.
local function release_listener(self)
  local sub = self.subscriber
  if not sub then return nil end
  local channel = "pgcoord_job_lock_released"
  local fan = sub:channel(channel)
  local name = self.name
  return fan:listen({ buffer = 4, filter = function(msg) return msg == name end })
end

function Lock:_try_acquire()
  local sent = core.now()
  local row = task.with_timeout(self.timeout, self.pool.one, self.pool, ACQUIRE,
    self.name, self.holder, self.stale_after)
  if row then return row.token, sent end
  return nil
end

-- A graceful stop, or a stop of the runner, ends waiting and running.
function Lock:_halted()
  return self.halted or lifecycle.stopping()
end

-- Waits for the lock; nil when the process is stopping first.
function Lock:_acquire()
  local listener = release_listener(self)
  self.listener = listener
  local _ <close> = setmetatable({}, { __close = function()
    if listener then listener:close() end
    self.listener = nil
  end })
  while not self:_halted() do
    local ok, token, sent = pcall(self._try_acquire, self)
    if ok and token then return token, sent end
    if not ok then
      log[db.failure_level(self, token, "warn")]("job lock acquire failed",
        { lock = self.name, error = tostring(token) })
    end
    if listener then
      listener:receive(self.check_interval)
    else
      self.wake:wait(self.check_interval)
    end
  end
  return nil
end

-- ---- holding -----------------------------------------------------------------

function Lock:_renew(deadline)
  local budget = math.min(self.timeout, deadline - core.now())
  if budget <= 0 then return nil, "no time left" end
  local ok, affected = pcall(task.with_timeout, budget, self.pool.exec, self.pool, RENEW,
    self.name, self.holder, self.token)
  if not ok then return nil, tostring(affected) end
  return affected == 1, "another process holds the lock"
end

-- Renews until the work ends or the lock is lost (then cancels the work).
function Lock:_keep(work, acquired_sent)
  local last_ok = acquired_sent
  local retry = false
  while self.current == "held" and (work.state == "ready" or work.state == "running") do
    local deadline = last_ok + self.stale_after - self.timeout
    local pause = retry and math.min(self.ping_interval / 4, self.timeout) or self.ping_interval
    local wake_at = math.min((retry and core.now() or last_ok) + pause, deadline)
    self.wake:wait(math.max(0, wake_at - core.now()))
    if self.current ~= "held" or not (work.state == "ready" or work.state == "running") then
      break
    end
    if core.now() >= deadline then
      return self:_lose(work, "not renewed within stale_after")
    end
    local sent = core.now()
    local renewed, why = self:_renew(deadline)
    if renewed then
      last_ok, retry = sent, false
    elseif renewed == false then
      return self:_lose(work, why)
    else
      retry = true
      log.warn("job lock renewal failed", { lock = self.name, error = why })
    end
  end
end

function Lock:_lose(work, why)
  self.current = "lost"
  self.lost_reason = why
  log.error("job lock lost, cancelling its work", { lock = self.name, token = self.token,
    reason = why })
  work:cancel()
end

function Lock:_release()
  local ok, err = pcall(task.with_timeout, self.timeout, self.pool.query, self.pool, RELEASE,
    self.name, self.holder, self.token)
  if not ok then
    log.warn("job lock release failed; others take over once it is stale",
      { lock = self.name, error = tostring(err) })
  end
  self.current = "released"
end

local function lost_error(self)
  return core.error("55P03", ("pgcoord.joblock: lock %q was lost (%s)")
    :format(self.name, self.lost_reason or "?"))
end

local function fence_error(self, token, why)
  return core.error("55P03", ("ctx.fence: lock %q, token %d: %s; the transaction must not commit")
    :format(self.name, token, why))
end

-- ctx.fence(tx) for the holding with this token: see the top of the file.
function Lock:_fence(tx, token)
  if type(tx) ~= "table" or type(tx.query) ~= "function" or tx.size ~= nil then
    local got = type(tx) == "table" and tx.size ~= nil and "a pool" or type(tx)
    error(("ctx.fence: expected a transaction (the tx of db:tx), got %s: a fence holds only"
      .. " until its transaction ends"):format(got), 2)
  end
  if token ~= self.token or self.current ~= "held" then
    error(fence_error(self, token, token ~= self.token and "that holding has ended"
      or ("the lock is %s"):format(self.current)), 0)
  end
  if tx:one(FENCE, self.name, self.holder, token) then return end
  -- taken over (or its row changed) while this process did not look
  self.current, self.lost_reason = "lost", "a fence found the lock taken over"
  log.error("job lock lost: a fence refused a write", { lock = self.name, token = token })
  local work = self.work
  if work and work ~= task.current() and (work.state == "ready" or work.state == "running") then
    work:cancel()
  end
  self.wake:notify()
  error(fence_error(self, token, "another process took the lock over"), 0)
end

-- Stops waiting, cancels the work; run() then releases at once.
function Lock:_interrupt()
  if self.listener then self.listener:close() end
  local work = self.work
  if work and (work.state == "ready" or work.state == "running") then work:cancel() end
  self.wake:notify()
end

-- Waits for the lock, runs fn(ctx) in a task while holding it, releases
-- it when fn ends; returns fn's results.  fn is cancelled if the lock is
-- lost (then run raises) or at a graceful stop (then run returns nil).
-- The stop handler lives as long as the call.
function Lock:run(fn)
  if type(fn) ~= "function" then
    options.raise("lock:run: expected a function, got %s", type(fn))
  end
  local remove_stop = lifecycle.on_stop(function() self:_interrupt() end,
    "job lock " .. self.name)
  local _ <close> = setmetatable({}, { __close = function() remove_stop() end })
  self.wake:clear()
  local token, sent = self:_acquire()
  if not token then return nil end
  self.token, self.current, self.lost_reason = token, "held", nil
  log.info("job lock acquired", { lock = self.name, token = token })
  local ctx = { name = self.name, token = token, lock = self }
  function ctx.lost() return self.current == "lost" end
  function ctx.fence(tx) return self:_fence(tx, token) end
  local work = task.spawn(fn, ctx)
  self.work = work
  local keeper = task.spawn(self._keep, self, work, sent)
  local r = table.pack(pcall(work.join, work))
  self.work = nil
  self.wake:notify()
  keeper:wait()
  if self.current == "held" then
    self:_release()
    log.info("job lock released", { lock = self.name, token = token })
  end
  -- (fn may have caught the error of a fence that found the lock lost)
  if self.current == "lost" then error(lost_error(self), 0) end
  if r[1] then return table.unpack(r, 2, r.n) end
  if task.is_cancelled(r[2]) and self:_halted() then return nil end
  error(r[2], 0)
end

-- ---- the runner of run_in_job_lock ---------------------------------------------

-- Keeps competing for service:name and running fn while holding it, until
-- the process stops or runner:stop([timeout]).  Returns the runner.
function joblock.run_in_job_lock(pool, service, name, opts, fn)
  local where = "pgcoord.run_in_job_lock"
  check_name(where, "service", service)
  if type(fn) ~= "function" then
    options.raise("%s: expected a function, got %s", where, type(fn))
  end
  local lock = new_lock(where, pool, service .. ":" .. tostring(name), opts)
  local self = setmetatable({ lock = lock, state = "running" }, Runner)
  self.task = task.spawn(self._loop, self, fn)
  return self
end

function Runner:_loop(fn)
  local lock = self.lock
  while not lock:_halted() do
    local ok, err = pcall(lock.run, lock, fn)
    if not ok then
      log.warn("job lock run ended", { lock = lock.name, error = tostring(err) })
      if not lock:_halted() then lock.wake:wait(lock.check_interval) end
    end
  end
  self.state = "stopped"
end

-- "running", "stopping" or "stopped".
function Runner:status()
  return self.state
end

-- Waits until the runner ends (at most timeout seconds); true if it did.
function Runner:wait(timeout)
  return self.task:wait(timeout)
end

local stop_timeout_rule = { "number", min = 0, max = math.huge }

-- Stops competing: the work is cancelled, the lock released; waits for
-- that (cancelling the loop after timeout seconds, if given).
function Runner:stop(timeout)
  if timeout ~= nil then options.check("runner:stop", "timeout", stop_timeout_rule, timeout) end
  if self.state == "running" then
    self.state = "stopping"
    self.lock.halted = true
    self.lock:_interrupt()
  end
  if task.current() == self.task then return end
  if not self.task:wait(timeout) then self.task:cancel() end
  self.state = "stopped"
end

return joblock

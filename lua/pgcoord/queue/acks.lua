-- The outcomes of one consumer's deliveries, written back: acks in
-- batches, most of them with the unordered consumer's next claim (one
-- statement for both, see take()), the rest by one writer task once the
-- oldest has waited ACK_AGE with no claim to take it (whatever accumulated
-- meanwhile goes in the same batch, so batches grow with the load),
-- requeues and the ordered head's ack-and-claim at once, and, when the
-- consumer stops, the hand-back of deliveries whose handlers were
-- cancelled.  Every write names its rows by delivery count, the lease's
-- fencing token: an outcome for a lease lost meanwhile changes nothing,
-- and is counted as lost.  Part of the primitives layer.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local json = require "pgcoord.json"
local backoff = require "pgcoord.backoff"
local sql = require "pgcoord.queue.sql"

local acks = {}

local Acks = {}
Acks.__index = Acks

local ACK_BATCH = 1000
-- How long an ack waits for a claim to carry it before the writer writes
-- it alone: short beside any lease (visibility_timeout is at least 0.1 s;
-- a lease is not renewed once its handler has returned).  A field, read
-- at each use, so that a spec can make the claims the only writers.
acks.ACK_AGE = 0.02
local ERROR_LIMIT = 2000 -- bytes of an error kept in last_error
local TRIES = 5          -- of a write that cannot wait for the next batch

local error_text = task.error_text

local clean_text = json.clean_text

-- ctx: the consumer's context (pool, ids, names, counters, count(), fields()).
function acks.start(ctx)
  local self = setmetatable({
    ctx = ctx,
    state = "running",        -- running, stopping, stopped
    list = {},                -- { message id, delivery count } to ack
    since = 0,                -- core.now() when the oldest of them came
    abandoned = {},           -- the same, to hand back at the stop
    wake = task.signal(),     -- the writer sleeps here
  }, Acks)
  self.task = task.spawn(self._loop, self)
  -- past a stop's deadline, the acks of handlers that did finish still go
  self.task.cleanup = true
  return self
end

-- Acks a delivery in the next batch.
function Acks:push(id, n)
  local list = self.list
  local k = #list + 1
  list[k] = { id, n }
  -- (the writer times the oldest, and writes at once a full batch)
  if k == 1 then
    self.since = core.now()
    self.wake:notify()
  elseif k == ACK_BATCH then
    self.wake:notify()
  end
end

-- The acks waiting, at most ACK_BATCH, taken for a claim to write (and
-- settle(), or give_back() if it failed).
function Acks:take()
  local list = self.list
  if #list <= ACK_BATCH then
    self.list = {}
    return list
  end
  self.list = table.move(list, ACK_BATCH + 1, #list, 1, {})
  self.since = core.now()
  return table.move(list, 1, ACK_BATCH, 1, {})
end

-- Acks taken whose claim failed: first in the next batch.
function Acks:give_back(batch)
  if #batch == 0 then return end
  if #self.list == 0 then self.since = core.now() end
  table.move(self.list, 1, #self.list, #batch + 1, batch)
  self.list = batch
  self.wake:notify()
end

-- Counts a batch written: acked of them went through; lost, when some did
-- not, is an iterator of the message ids that did not (their leases ran
-- out meanwhile).
function Acks:settle(batch, acked, lost)
  local ctx = self.ctx
  ctx:count("acked", acked)
  if acked < #batch then
    local gone = {}
    for id in lost do gone[tonumber(id)] = true end
    for _, a in ipairs(batch) do
      if gone[a[1]] then self:_lost(a[1], a[2], "ack") end
    end
  end
end

-- Acks waiting for the writer.
function Acks:count()
  return #self.list
end

-- Keeps a delivery whose handler never finished, to hand back at the stop.
function Acks:abandon(id, n)
  local list = self.abandoned
  list[#list + 1] = { id, n }
end

-- Retries fn(...) while the database fails, up to TRIES times.
function Acks:_persist(what, fn, ...)
  local delay = backoff.new({ base = 0.05, cap = 2 })
  for attempt = 1, TRIES do
    local ok, a = pcall(fn, ...)
    if ok then return true, a end
    log.warn("queue " .. what .. " failed", self.ctx:fields({ error = error_text(a),
      attempt = attempt }))
    if attempt < TRIES then task.sleep(delay:next()) end
  end
  return false
end

function Acks:_lost(id, n, before)
  local ctx = self.ctx
  ctx.counters.lost = ctx.counters.lost + 1
  log.warn("queue lease lost before the " .. before .. "; the message may be handled again",
    ctx:fields({ message = id, deliveries = n }))
end

-- Acks a batch now; raises when the database fails.
function Acks:_write(batch)
  local ctx = self.ctx
  local rows = ctx.pool:query(sql.ack, sql.token_arrays(ctx.subscription_id, batch))
  ctx:count("acked", #rows)
  if #rows < #batch then
    local done = {}
    for _, r in ipairs(rows) do done[r.id] = true end
    for _, a in ipairs(batch) do
      if not done[a[1]] then self:_lost(a[1], a[2], "ack") end
    end
  end
end

-- Acks one delivery now (an ordered one, at a stop).
function Acks:ack_one(id, n)
  self:_persist("ack", self._write, self, { { id, n } })
end

local function ack_claim_head(self, id, n)
  local ctx = self.ctx
  local r = ctx.pool:one(sql.ack_claim_head, ctx.subscription_id, 1, ctx.max_deliveries,
    ctx.visibility_timeout, id, n)
  if r.acked == 0 then
    self:_lost(id, n, "ack")
    return nil
  end
  ctx:count("acked")
  return r.id and r or nil
end

-- Acks the ordered head now and claims the next one in the same
-- statement; returns the claimed row, if any.
function Acks:ack_head(id, n)
  local _, row = self:_persist("ack", ack_claim_head, self, id, n)
  return row
end

-- Requeues a failed delivery, visible again after delay seconds (or dead,
-- past max_deliveries).
function Acks:requeue(id, n, reason, delay)
  local ctx = self.ctx
  local ok, rows = self:_persist("requeue", ctx.pool.query, ctx.pool, sql.requeue,
    ctx.subscription_id, id, n, ctx.max_deliveries, delay, clean_text(reason, ERROR_LIMIT))
  if not ok then return end
  local row = rows[1]
  if not row then
    self:_lost(id, n, "requeue")
  elseif row.state == "dead" then
    ctx:count("dead")
    log.warn("queue message moved to the dead letters", ctx:fields({ message = id,
      deliveries = n, reason = reason }))
  else
    ctx:count("requeued")
  end
end

-- The writer: batches of at most ACK_BATCH that no claim took within
-- ACK_AGE, retried with backoff; at a stop, at once.
function Acks:_loop()
  local ctx = self.ctx
  local delay, failures = backoff.new({ base = 0.1, cap = 2 }), 0
  while true do
    local due = self.since + acks.ACK_AGE
    if #self.list == 0 then
      if self.state ~= "running" then return end
      self.wake:wait()
    elseif self.state == "running" and #self.list < ACK_BATCH and core.now() < due then
      self.wake:wait(due - core.now())
    else
      local batch = self.list
      if #batch > ACK_BATCH then
        batch = table.move(self.list, 1, ACK_BATCH, 1, {})
        self.list = table.move(self.list, ACK_BATCH + 1, #self.list, 1, {})
      else
        self.list = {}
      end
      local ok, err = pcall(self._write, self, batch)
      if ok then
        failures = 0
        delay:reset()
      else
        failures = failures + 1
        table.move(self.list, 1, #self.list, #batch + 1, batch)
        self.list = batch
        log.warn("queue ack failed", ctx:fields({ error = error_text(err), attempt = failures,
          acks = #batch }))
        if self.state ~= "running" and failures >= TRIES then
          log.error("queue acks not written; their messages will be delivered again",
            ctx:fields({ acks = #batch }))
          self.list = {}
          return
        end
        self.wake:wait(delay:next())
      end
    end
  end
end

-- Hands back the deliveries abandoned so far, for others at once.
function Acks:release()
  local list, ctx = self.abandoned, self.ctx
  self.abandoned = {}
  if #list == 0 then return end
  local sids, ids, ns = sql.token_arrays(ctx.subscription_id, list)
  local ok, err = pcall(ctx.pool.one, ctx.pool, sql.release, sids, ids, ns,
    "handed back unfinished when the consumer stopped", ctx.queue_id)
  if not ok then
    log.warn("queue could not hand back cancelled messages; they return when their leases end",
      ctx:fields({ error = error_text(err), messages = #list }))
  end
end

-- Hands back what was abandoned, writes the acks left, and ends the
-- writer.  Called once the consumer's handlers are done.
function Acks:stop()
  if self.state ~= "running" then return end
  self.state = "stopping"
  self:release()
  self.wake:notify()
  self.task:wait()
  self.state = "stopped"
end

return acks

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

-- Deliveries go in batches: { ids = message ids, ns = their delivery
-- counts }, two lists of one length (a table per delivery would cost more
-- than a no-op handler).
local function new_batch()
  return { ids = {}, ns = {} }
end

-- The first n deliveries of batch b, taken out of it.
local function take_first(b, n)
  local ids, ns, len = b.ids, b.ns, #b.ids
  local head = { ids = table.move(ids, 1, n, 1, {}), ns = table.move(ns, 1, n, 1, {}) }
  b.ids, b.ns = table.move(ids, n + 1, len, 1, {}), table.move(ns, n + 1, len, 1, {})
  return head
end

-- Batch b with the deliveries of batch rest after its own.
local function append(b, rest)
  local k = #b.ids
  table.move(rest.ids, 1, #rest.ids, k + 1, b.ids)
  table.move(rest.ns, 1, #rest.ns, k + 1, b.ns)
  return b
end
acks.new_batch = new_batch

-- ctx: the consumer's context (pool, ids, names, counters, count(), fields()).
function acks.start(ctx)
  local self = setmetatable({
    ctx = ctx,
    state = "running",        -- running, stopping, stopped
    list = new_batch(),       -- the deliveries to ack
    since = 0,                -- core.now() when the oldest of them came
    writer_idle = false,      -- the writer waits for a first ack (no timer)
    abandoned = new_batch(),  -- deliveries to hand back at the stop
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
  local ids = list.ids
  local k = #ids + 1
  ids[k], list.ns[k] = id, n
  -- (the writer times the oldest, and writes at once a full batch; one
  -- already timing an older ack sees the new oldest when its timer ends)
  if k == 1 then
    self.since = core.now()
    if self.writer_idle then self.wake:notify() end
  elseif k == ACK_BATCH then
    self.wake:notify()
  end
end

-- The acks waiting, at most ACK_BATCH, taken for a claim to write (and
-- settle(), or give_back() if it failed).
function Acks:take()
  local list = self.list
  if #list.ids <= ACK_BATCH then
    self.list = new_batch()
    return list
  end
  self.since = core.now()
  return take_first(list, ACK_BATCH)
end

-- Acks taken whose claim failed: first in the next batch.
function Acks:give_back(batch)
  if #batch.ids == 0 then return end
  if #self.list.ids == 0 then self.since = core.now() end
  self.list = append(batch, self.list)
  self.wake:notify()
end

-- Counts a batch written: acked of them went through; lost, when some did
-- not, is an iterator of the message ids that did not (their leases ran
-- out meanwhile).
function Acks:settle(batch, acked, lost)
  local ctx = self.ctx
  local ids = batch.ids
  if acked > 0 then ctx:count("acked", acked) end
  if acked < #ids then
    local gone = {}
    for id in lost do gone[tonumber(id)] = true end
    for i, id in ipairs(ids) do
      if gone[id] then self:_lost(id, batch.ns[i], "ack") end
    end
  end
end

-- Acks waiting for the writer.
function Acks:count()
  return #self.list.ids
end

-- Keeps a delivery whose handler never finished, to hand back at the stop.
function Acks:abandon(id, n)
  local list = self.abandoned
  local k = #list.ids + 1
  list.ids[k], list.ns[k] = id, n
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
  local ids = batch.ids
  if #rows < #ids then
    local done = {}
    for _, r in ipairs(rows) do done[r.id] = true end
    for i, id in ipairs(ids) do
      if not done[id] then self:_lost(id, batch.ns[i], "ack") end
    end
  end
end

-- Acks one delivery now (an ordered one, at a stop).
function Acks:ack_one(id, n)
  self:_persist("ack", self._write, self, { ids = { id }, ns = { n } })
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
    local waiting = #self.list.ids
    if waiting == 0 then
      if self.state ~= "running" then return end
      self.writer_idle = true
      self.wake:wait()
      self.writer_idle = false
    elseif self.state == "running" and waiting < ACK_BATCH and core.now() < due then
      self.wake:wait(due - core.now())
    else
      local batch = self.list
      if waiting > ACK_BATCH then
        batch = take_first(self.list, ACK_BATCH)
      else
        self.list = new_batch()
      end
      local ok, err = pcall(self._write, self, batch)
      if ok then
        failures = 0
        delay:reset()
      else
        failures = failures + 1
        self.list = append(batch, self.list)
        log.warn("queue ack failed", ctx:fields({ error = error_text(err), attempt = failures,
          acks = #batch.ids }))
        if self.state ~= "running" and failures >= TRIES then
          log.error("queue acks not written; their messages will be delivered again",
            ctx:fields({ acks = #batch.ids }))
          self.list = new_batch()
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
  self.abandoned = new_batch()
  if #list.ids == 0 then return end
  local sids, ids, ns = sql.token_arrays(ctx.subscription_id, list)
  local ok, err = pcall(ctx.pool.one, ctx.pool, sql.release, sids, ids, ns,
    "handed back unfinished when the consumer stopped", ctx.queue_id)
  if not ok then
    log.warn("queue could not hand back cancelled messages; they return when their leases end",
      ctx:fields({ error = error_text(err), messages = #list.ids }))
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

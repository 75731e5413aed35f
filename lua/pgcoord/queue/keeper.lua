-- The lease keeper of one consumer: renews the leases of its running
-- handlers every visibility_timeout / 3, and now and then sweeps its
-- queue's acked deliveries past retention.  It runs until the consumer's
-- handlers are done, a graceful stop included.  Part of the primitives
-- layer.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local db = require "pgcoord.db"
local sql = require "pgcoord.queue.sql"

local keeper = {}

local Keeper = {}
Keeper.__index = Keeper

local SWEEP_BATCH = 5000
keeper.SWEEP_BATCH = SWEEP_BATCH

local error_text = task.error_text

-- Deletes acked deliveries older than retention seconds, and the messages
-- no subscription holds any longer, for one queue; skips if another
-- process is sweeping it.  Returns the number of deliveries deleted.
function keeper.sweep(pool, queue_id, retention)
  local total = 0
  for _ = 1, 20 do
    local n = pool:tx(function(tx)
      if not tx:one(sql.sweep_try_lock, sql.SWEEP_LOCK, queue_id).ok then return 0 end
      local gone = tx:query(sql.sweep_acked, queue_id, retention, SWEEP_BATCH)
      if #gone == 0 then return 0 end
      local ids = {}
      for i, r in ipairs(gone) do ids[i] = r.id end
      tx:exec(sql.drop_messages, db.int_array(ids), queue_id)
      return #gone
    end)
    total = total + n
    if n < SWEEP_BATCH then break end
  end
  return total
end

-- ctx: the consumer's context; leases() gives { ids = message ids, ns =
-- delivery counts } of the handlers running now.
function keeper.start(ctx, leases)
  local self = setmetatable({ ctx = ctx, leases = leases, state = "running",
                              wake = task.signal() }, Keeper)
  self.task = task.spawn(self._loop, self)
  return self
end

function Keeper:_renew()
  local ctx = self.ctx
  local list = self.leases()
  local count = #list.ids
  if count == 0 then return end
  local sids, ids, ns = sql.token_arrays(ctx.subscription_id, list)
  local ok, row = pcall(ctx.pool.one, ctx.pool, sql.renew, sids, ids, ns, ctx.visibility_timeout)
  if not ok then
    log.warn("queue lease renewal failed", ctx:fields({ error = error_text(row) }))
  elseif row.current < count then
    log.warn("queue leases lost while their handlers run; the messages may be handled twice",
      ctx:fields({ lost = count - row.current }))
  end
end

function Keeper:_loop()
  local ctx = self.ctx
  local renew_every = ctx.visibility_timeout / 3
  local sweep_every = math.min(60, math.max(1, ctx.retention / 2))
  local next_renew = core.now() + renew_every
  local next_sweep = core.now() + math.random() * sweep_every
  while self.state == "running" do
    self.wake:wait(math.max(0, math.min(next_renew, next_sweep) - core.now()))
    if self.state ~= "running" then break end
    if core.now() >= next_renew then
      next_renew = core.now() + renew_every
      self:_renew()
    end
    if core.now() >= next_sweep then
      next_sweep = core.now() + sweep_every
      local ok, err = pcall(keeper.sweep, ctx.pool, ctx.queue_id, ctx.retention)
      if not ok then log.warn("queue sweep failed", ctx:fields({ error = error_text(err) })) end
    end
  end
end

-- Ends the keeper and waits for it.
function Keeper:stop()
  if self.state ~= "running" then return end
  self.state = "stopping"
  self.wake:notify()
  self.task:wait()
  self.state = "stopped"
end

return keeper

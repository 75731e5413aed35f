-- Wake-ups for the consumers of one queue handle: a NOTIFY on a queue's
-- channel, and every (re)connection of the LISTEN connection (a
-- notification may have been missed meanwhile).  They come through one
-- subscriber: the one given to pgcoord.queue, or one of the handle's own,
-- started with its first consumer and stopped with its last.  Part of
-- the primitives layer.
local task = require "pgcoord.task"
local subscriber = require "pgcoord.subscriber"
local sql = require "pgcoord.queue.sql"

local wakeups = {}

local Wakeups = {}
Wakeups.__index = Wakeups

function wakeups.new(pool, shared_subscriber)
  return setmetatable({
    pool = pool,
    shared = shared_subscriber,
    sub = shared_subscriber,  -- the subscriber in use (nil until a consumer runs)
    consumers = {},           -- consumer -> queue id, while running
    readers = {},             -- channel -> listener
    unhook = nil,             -- removes the reconnect hook
  }, Wakeups)
end

-- The subscriber the consumers listen through, once one runs.
function Wakeups:subscriber()
  return self.sub
end

-- One reader per queue channel and handle wakes the consumers that have
-- a free handler.  A notification is only a wake-up: the listener keeps at
-- most one (its filter turns the others away), so a burst of publishes
-- costs one wake-up of each consumer, not one per message.
local function read(self, channel, fan, queue_id)
  local listener
  listener = fan:listen({ buffer = 1, filter = function() return listener:pending() == 0 end })
  self.readers[channel] = listener
  task.spawn(function()
    while listener:receive() ~= nil do
      for c, id in pairs(self.consumers) do
        if id == queue_id and c:has_room() then c:wake() end
      end
    end
  end)
end

-- Wakes consumer c (c:wake(), c:has_room()) for queue queue_id from now
-- on; returns the channel's fan-out (fan:polled counts what polls found).
function Wakeups:add(c, queue_id)
  if not self.sub then self.sub = subscriber.new(self.pool) end
  local sub, own = self.sub, self.shared == nil
  self.unhook = self.unhook or sub:hook_reconnect(function()
    for each in pairs(self.consumers) do each:wake() end
  end)
  local channel = sql.channel(queue_id)
  local fan = sub:channel(channel)
  if own then fan:enable_recovery(sub) end
  self.consumers[c] = queue_id
  if not self.readers[channel] then read(self, channel, fan, queue_id) end
  if own then sub:start() end
  return fan
end

-- No more wake-ups for c; the last consumer of a channel closes its
-- reader, the last of all stops the handle's own subscriber.
function Wakeups:remove(c)
  local queue_id = self.consumers[c]
  if queue_id == nil then return end
  self.consumers[c] = nil
  for _, id in pairs(self.consumers) do
    if id == queue_id then queue_id = nil break end
  end
  local channel = queue_id and sql.channel(queue_id)
  if channel and self.readers[channel] then
    self.readers[channel]:close()
    self.readers[channel] = nil
  end
  if next(self.consumers) == nil then
    if self.unhook then self.unhook() end
    self.unhook = nil
    if self.shared == nil and self.sub then self.sub:stop() end
  end
end

return wakeups

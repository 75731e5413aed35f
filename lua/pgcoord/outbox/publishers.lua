-- Ready-made publish functions for a relay: to the NOTIFY channel or the
-- pgcoord queue named by the message's topic.  Both send the message with
-- its id, so that consumers can use the processed-messages store.
local options = require "pgcoord.options"
local notify = require "pgcoord.notify"

local publishers = {}

local RULES = {
  db = { "conn" },
  prefix = { "string", default = "", empty = true },
}
local check_notify = options.spec("ob:notify_publisher", RULES)
local check_queue = options.spec("ob:queue_publisher", {
  db = RULES.db, prefix = RULES.prefix, queue_options = { "table" },
})

-- What the publishers send.
local function envelope(msg)
  return { id = msg.id, topic = msg.topic, key = msg.key, payload = msg.payload,
           headers = msg.headers, created_at = msg.created_at }
end

-- NOTIFYs channel prefix .. msg.topic with the envelope (JSON); a message
-- whose channel or payload NOTIFY would refuse fails with the reason.
function publishers.notify(ob, opts)
  local o = check_notify(opts)
  local target, prefix = o.db or ob.db, o.prefix
  return function(msg)
    notify.publish(target, prefix .. msg.topic, envelope(msg), "ob:notify_publisher")
    return true
  end
end

-- Publishes the envelope to the pgcoord queue named prefix .. msg.topic
-- (made on first use, with queue_options).
function publishers.queue(ob, opts)
  local o = check_queue(opts)
  local target, prefix = o.db or ob.db, o.prefix
  -- a sibling primitive, loaded only by those who bridge to it
  local ok, queue = pcall(require, "pgcoord.queue")
  if not ok then
    options.raise("ob:queue_publisher: pgcoord.queue is not available: %s", tostring(queue))
  end
  local queues = {}
  return function(msg)
    local name = prefix .. msg.topic
    local q = queues[name]
    if not q then
      q = queue.new(target, name, o.queue_options)
      queues[name] = q
    end
    q:publish(target, envelope(msg))
    return true
  end
end

return publishers

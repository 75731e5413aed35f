-- A queue consumer: prints every message of one subscription.
--
--   pgcoord-run --migrate examples/queue_consumer.lua [QUEUE [SUBSCRIPTION]]
--       consumes until Ctrl-C (the first stops it gracefully: the running
--       handlers finish and their acks are written)
--   pgcoord-run --migrate examples/queue_consumer.lua orders billing --publish 5
--       also publishes 5 messages (one of which fails once), and stops once
--       they are all acknowledged
--
-- Publishing from anywhere else, in your own transaction:
--   pgcoord.queue(db, "orders"):publish(tx, { order = 42 })
local pgcoord = require "pgcoord"

local queue_name, subscription = arg[1] or "orders", arg[2] or "billing"
local publish = arg[3] == "--publish" and (tonumber(arg[4]) or 5) or 0

local db = pgcoord.connect(nil, { size = 4, params = { application_name = "queue-consumer" } })
local q = pgcoord.queue(db, queue_name)

-- Idempotent.  A subscription is durable: messages published while no
-- consumer runs wait for it; only those published before it existed are
-- not copied to it.
q:subscribe(subscription)

local consumer = q:consume(subscription, function(msg)
  print(("%s/%s: message %d, delivery %d: %s"):format(queue_name, subscription, msg.id,
    msg.deliveries, pgcoord.json.encode(msg.payload)))
  if type(msg.payload) == "table" and msg.payload.flaky and msg.deliveries == 1 then
    -- Raising (or returning false) requeues the message: it comes back
    -- after retry_delay, doubling on each failure; after max_deliveries it
    -- goes to the dead letters (q:dead, q:requeue_dead).
    error("a flaky message fails on its first delivery")
  end
  -- Returning normally acknowledges it.
end, { concurrency = 4, max_deliveries = 5, retry_delay = 0.5 })

if publish > 0 then
  -- Published in one transaction: nothing is delivered before it commits.
  db:tx(function(tx)
    for i = 1, publish do q:publish(tx, { order = i, flaky = i == 2 or nil }) end
  end)
  local deadline = pgcoord.now() + 30
  while consumer:stats().acked < publish and pgcoord.now() < deadline do pgcoord.sleep(0.05) end
  consumer:stop()
  local st = q:stats(subscription)
  print(("acked %d, pending %d, dead %d"):format(consumer:stats().acked, st.pending, st.dead))
  db:close()
end
-- Otherwise the consumer keeps pgcoord-run running until it is stopped.

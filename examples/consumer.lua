-- A LISTEN/NOTIFY consumer that cannot miss work for long.
--
-- Producers insert a row into example_tasks and publish on its channel in
-- the same transaction.  The consumer reloads everything pending whenever
-- its LISTEN connection is (re)established, handles each notification as
-- it arrives, and also polls: a poll that finds work no notification
-- announced is counted, and a streak of them bounces the subscriber.
--
--   pgcoord-run examples/consumer.lua [seconds]
local db = pgcoord.connect()
local log = pgcoord.log
local run_for = tonumber(arg and arg[1]) or 5

db:exec([[CREATE TABLE IF NOT EXISTS example_tasks (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  body text NOT NULL,
  done_at timestamptz)]])

-- Takes every pending task; returns how many.
local function drain(source)
  local rows = db:query([[UPDATE example_tasks SET done_at = now()
                           WHERE done_at IS NULL RETURNING id, body]])
  for _, row in ipairs(rows) do
    print(("[%s] task %d: %s"):format(source, row.id, row.body))
  end
  return #rows
end

local fan = pgcoord.fanout("example_tasks")
local sub = pgcoord.subscriber(db, {
  ping_interval = 1, ping_grace = 3,
  -- before resuming after any (re)connect: whatever was missed is in the table
  on_reconnect = function() drain("reload") end,
})
sub:add(fan)
fan:enable_recovery(sub, { threshold = 3 })
fan:on(function() drain("notify") end)
sub:start()

-- The fallback poll.
local poller = pgcoord.spawn(function()
  while not pgcoord.stopping() do
    pgcoord.sleep(1)
    fan:polled(drain("poll"))
  end
end)

-- A producer, to have something to consume.
pgcoord.spawn(function()
  for i = 1, 5 do
    db:tx(function(tx)
      tx:exec("INSERT INTO example_tasks (body) VALUES ($1)", "hello " .. i)
      fan:publish(tx, { n = i })
    end)
    pgcoord.sleep(0.2)
  end
end)

pgcoord.sleep(run_for)
log.info("consumer done", fan:stats())
pgcoord.stop()
poller:join()

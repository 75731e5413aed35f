-- A first tour of pgcoord: a pool, transactions, LISTEN/NOTIFY and tasks.
--
--   make demo                                   (a throwaway PostgreSQL)
--   pgcoord-run --migrate && pgcoord-run examples/demo.lua   (your own)
--
-- pgcoord-run runs this file as a task, so every call that waits on the
-- database (query, tx, join, sleep) lets other tasks run meanwhile.
local pgcoord = require "pgcoord"

-- Waits (up to `timeout` seconds) until ready() is true, else raises `what`.
local function wait_until(what, timeout, ready)
  local deadline = pgcoord.now() + timeout
  while not ready() do
    if pgcoord.now() > deadline then error(what .. " within " .. timeout .. " s", 2) end
    pgcoord.sleep(0.01)
  end
end

-- 1. A pool of up to 5 connections.  With no conninfo, pgcoord reads
--    PGCOORD_DATABASE_URL, then DATABASE_URL, then libpq's PG* variables.
local db = pgcoord.connect(nil, { size = 5, params = { application_name = "pgcoord-demo" } })
print("1. connected: " .. db:one("SELECT version() AS v").v:match("^%S+ %S+"))

-- A table of our own, fresh on every run.
db:exec("DROP TABLE IF EXISTS demo_orders")
db:exec([[
  CREATE TABLE demo_orders (
    id       bigserial PRIMARY KEY,
    customer text NOT NULL,
    amount   numeric(10, 2) NOT NULL CHECK (amount > 0)
  )]])
print("   created table demo_orders")

-- 2. One subscriber (a dedicated LISTEN connection) feeds fan-outs, one per
--    channel; each fan-out hands every notification to its listeners.
local received = {}
local sub = pgcoord.subscriber(db)
local orders = sub:add(pgcoord.fanout("demo_orders"))
local printer = orders:on(function(msg)   -- runs in a task of its own
  received[#received + 1] = msg
  print(("   <- notification: order #%d, %s, %.2f"):format(msg.id, msg.customer, msg.amount))
end)
sub:start()
wait_until("the subscriber did not connect", 10, function() return sub:connected() end)
print("2. subscriber listening on channel demo_orders")

-- 3. Insert orders.  The notification is published inside the transaction,
--    so PostgreSQL delivers it at COMMIT: listeners never hear of an order
--    that is not in the table yet.
print("3. placing three orders")
for _, o in ipairs({ { "alice", 19.90 }, { "bob", 5.00 }, { "carol", 120.00 } }) do
  db:tx(function(tx)
    local row = tx:one("INSERT INTO demo_orders (customer, amount) VALUES ($1, $2)"
      .. " RETURNING id, customer, amount", o[1], o[2])
    orders:publish(tx, row)            -- a JSON payload: {"id":1,"customer":...}
    print(("   -> committed order #%d for %s"):format(row.id, row.customer))
  end)
end
wait_until("3 notifications did not arrive", 5, function() return #received == 3 end)

-- 4. A transaction that fails rolls back: no row, and no notification.
print("4. a transaction that raises after publishing")
local ok, err = pcall(db.tx, db, function(tx)
  local row = tx:one("INSERT INTO demo_orders (customer, amount) VALUES ($1, $2)"
    .. " RETURNING id, customer, amount", "mallory", 999.99)
  orders:publish(tx, row)
  error("payment declined")           -- db:tx rolls back and re-raises
end)
assert(not ok, "the transaction should have failed")
print("   rolled back: " .. tostring(err):gsub("^.-:%d+: ", ""))
pgcoord.sleep(0.3)                    -- give a stray notification time to show up
print(("   orders in table: %d, notifications received: %d")
  :format(db:one("SELECT count(*) AS n FROM demo_orders").n, #received))

-- 5. 50 tasks share the pool of 5: each waits for a free connection, runs
--    its query and gives the connection back.
print("5. 50 concurrent tasks on a pool of 5")
local started = pgcoord.now()
local tasks, backends = {}, {}
for i = 1, 50 do
  tasks[i] = pgcoord.spawn(function()
    local row = db:one("SELECT pg_backend_pid() AS pid, $1::int * 2 AS doubled, pg_sleep(0.01)", i)
    backends[row.pid] = true
    return row.doubled
  end)
end
local done, sum = 0, 0
for _, t in ipairs(tasks) do
  sum = sum + t:join()                -- join returns the task's results (or raises its error)
  done = done + 1
end
local n_backends = 0
for _ in pairs(backends) do n_backends = n_backends + 1 end
local stats = db:stats()
print(("   %d tasks finished in %.2f s (sum of results %d), using %d server connections;"
  .. " pool: %d open, %d idle"):format(done, pgcoord.now() - started, sum, n_backends,
  stats.open, stats.idle))

-- 6. Tidy up: stop the subscriber, end the listener's task, close the pool.
--    With nothing left running, pgcoord-run exits.
sub:stop()
printer:close()
db:exec("DROP TABLE demo_orders")
db:close()
print("6. done")

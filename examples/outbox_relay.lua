-- The transactional outbox, a relay and an exactly-once consumer.
--
--   scripts/pg-tmp run sh -c './pgcoord-run --migrate && ./pgcoord-run examples/outbox_relay.lua'
--   pgcoord-run --migrate && pgcoord-run examples/outbox_relay.lua   (your own database)
--
-- An order and the message announcing it are written in one transaction;
-- a relay publishes the message to the pgcoord queue named by its topic;
-- a billing consumer writes one invoice per order, however many times
-- the message is delivered, by marking it in the processed-messages store
-- inside the transaction that writes the invoice.
local pgcoord = require "pgcoord"

local db = pgcoord.connect(nil, { size = 5, params = { application_name = "outbox-example" } })

-- Tables: the outbox (outbox_messages) and the processed store
-- (processed_messages) are created once; the domain tables afresh.
local ob = pgcoord.outbox(db)
local done = pgcoord.processed(db)
ob:migrate()
done:migrate()
db:exec("DROP TABLE IF EXISTS example_orders, example_invoices")
db:exec("CREATE TABLE example_orders (id bigserial PRIMARY KEY, customer text NOT NULL,"
  .. " amount numeric(10, 2) NOT NULL)")
db:exec("CREATE TABLE example_invoices (order_id bigint NOT NULL, amount numeric(10, 2) NOT NULL)")

-- 1. The relay: every outbox message goes to the queue named by its topic.
local orders = pgcoord.queue(db, "example_orders")
orders:subscribe("billing")
local relay = ob:relay(ob:queue_publisher(), { poll_interval = 1, batch_size = 100 })

-- 2. The consumer.  Delivery is at least once; the mark makes the effect
--    exactly once: it is new only the first time, and it commits or rolls
--    back with the invoice.
local invoices = 0
local function bill(m) -- m: the outbox message (id, topic, key, payload, headers)
  local applied = db:tx(function(tx)
    if not done:mark(tx, "billing", m.id, { order = m.payload.order_id }) then
      return false -- seen before: its invoice exists already
    end
    tx:exec("INSERT INTO example_invoices (order_id, amount) VALUES ($1, $2)",
      m.payload.order_id, m.payload.amount)
    return true
  end)
  if applied then
    invoices = invoices + 1
    print(("   billing: invoice for order #%d (%.2f)"):format(m.payload.order_id,
      m.payload.amount))
  else
    print(("   billing: message %s seen before, skipped"):format(m.id))
  end
end
local consumer = orders:consume("billing", function(msg) bill(msg.payload) end,
  { poll_interval = 1 })

-- 3. Place orders: the row and its message commit together, or neither does.
local last
for _, o in ipairs({ { "alice", 19.90 }, { "bob", 5.00 }, { "carol", 120.00 } }) do
  db:tx(function(tx)
    local row = tx:one("INSERT INTO example_orders (customer, amount) VALUES ($1, $2)"
      .. " RETURNING id", o[1], o[2])
    local id = ob:save(tx, { topic = "example_orders", key = row.id,
      payload = { order_id = row.id, customer = o[1], amount = o[2] } })
    last = { id = id, payload = { order_id = row.id, amount = o[2] } }
    print(("placed order #%d for %s, message %s"):format(row.id, o[1], id))
  end)
end
-- A transaction that fails leaves neither an order nor a message.
pcall(db.tx, db, function(tx)
  tx:exec("INSERT INTO example_orders (customer, amount) VALUES ('mallory', 1)")
  ob:save(tx, { topic = "example_orders", payload = { order_id = -1, amount = 1 } })
  error("payment declined")
end)
print("a failed transaction: rolled back with its message")

local deadline = pgcoord.now() + 10
while invoices < 3 and pgcoord.now() < deadline do pgcoord.sleep(0.02) end

-- 4. A redelivery of the last message (as after a consumer crash) is skipped.
bill(last)

local count = db:one("SELECT count(*) AS n FROM example_invoices").n
print(("%d orders, %d invoices, %d messages pending in the outbox"):format(
  db:one("SELECT count(*) AS n FROM example_orders").n, count,
  db:one("SELECT count(*) AS n FROM outbox_messages WHERE status = 'pending'").n))

-- Stop gracefully: the relay finishes its batch, the consumer its handlers.
relay:stop()
consumer:stop()
db:close()
if count ~= 3 then os.exit(1) end

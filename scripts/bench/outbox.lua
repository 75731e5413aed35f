-- The pgcoord side of scripts/bench/outbox, run by pgcoord-run:
--   outbox.lua setup DIR
--       (re)creates bench_orders and the outboxes bench_outbox (NOTIFY on
--       save) and bench_outbox_quiet (no NOTIFY), and writes to DIR the
--       pgbench scripts running the very SQL pgcoord sends:
--       domain.sql, outbox.sql, outbox_quiet.sql, relay.sql
--   outbox.lua save SECONDS CLIENTS MODE
--       MODE domain: transactions of one INSERT into bench_orders;
--       outbox / outbox_quiet: the same plus ob:save of one message.
--       Prints "tx=N seconds=S tps=R"
--   outbox.lua fill N
--       saves N pending messages into bench_outbox (1000 per statement)
--   outbox.lua relay N BATCH PUBLISHER
--       relays the N pending messages of bench_outbox with a no-op
--       publish_fn (PUBLISHER noop) or ob:notify_publisher() (notify);
--       prints "messages=N seconds=S rate=R"
local pgcoord = require "pgcoord"
local outbox_sql = require "pgcoord.outbox.sql"

package.path = (arg[0]:match("^(.*/)") or "./") .. "?.lua;" .. package.path
local bench = require "benchlib"
local say = bench.say

local args = bench.args("outbox.lua", ...)
local mode = args.mode

local DOMAIN_SQL = "INSERT INTO bench_orders (customer, amount) VALUES ($1, $2)"
local CUSTOMER = "alice"


local function payload(n)
  return { order = n, customer = CUSTOMER }
end

-- A pgbench command: one line, $n parameters as pgbench variables :pn.
local function pgbench_sql(sql)
  return (sql:gsub("%s+", " "):gsub("%$(%d+)", ":p%1"))
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

if mode == "setup" then
  local dir = assert(args[2], "outbox.lua setup DIR")
  local db = pgcoord.connect(nil, { size = 1 })
  db:exec("DROP TABLE IF EXISTS bench_orders, bench_outbox, bench_outbox_quiet")
  db:exec("CREATE TABLE bench_orders (id bigserial PRIMARY KEY, customer text NOT NULL,"
    .. " amount numeric(12, 2) NOT NULL)")
  local ob = pgcoord.outbox(db, { table = "bench_outbox" })
  local quiet = pgcoord.outbox(db, { table = "bench_outbox_quiet", notify = false })
  ob:migrate()
  quiet:migrate()
  -- pgbench: -D p_customer=alice -D topic=orders -D payload=... -D headers={}
  -- -D channel=bench_outbox; :n is the order number, as in the pgcoord runs.
  local domain = DOMAIN_SQL:gsub("%$1", ":customer"):gsub("%$2", ":n")
  local function save_line(o, with_channel)
    local sql = pgbench_sql(o.sql.save_one)
      :gsub(":p1", ":topic"):gsub(":p2", ":n"):gsub(":p3", ":payload"):gsub(":p4", ":headers")
    if with_channel then sql = sql:gsub(":p5", ":channel") end
    return sql
  end
  local head = "\\set n random(1, 1000000)\nBEGIN;\n" .. domain .. ";\n"
  write(dir .. "/domain.sql", head .. "END;\n")
  write(dir .. "/outbox.sql", head .. save_line(ob, true) .. ";\nEND;\n")
  write(dir .. "/outbox_quiet.sql", head .. save_line(quiet, false) .. ";\nEND;\n")
  -- The relay's two statements per batch: the claim (here aggregating the
  -- ids it claims, for the mark) and the mark.  :p1 batch, :p2 timeout.
  local claim = pgbench_sql(outbox_sql.claim(ob.quoted,
    "SELECT jsonb_agg(id ORDER BY seq) AS ids FROM claimed"))
  local mark = pgbench_sql(ob.sql.processed):gsub(":p1", ":ids")
  write(dir .. "/relay.sql", claim .. " \\gset\n" .. mark .. ";\n")
  write(dir .. "/payload.json", pgcoord.json.encode(payload(1)))
  db:close()

elseif mode == "save" then
  local seconds, clients = args:integer(2, "SECONDS", 0), args:integer(3, "CLIENTS", 0)
  local kind = args[4]
  local db = pgcoord.connect(nil, { size = clients })
  local ob
  if kind == "outbox" then
    ob = pgcoord.outbox(db, { table = "bench_outbox" })
  elseif kind == "outbox_quiet" then
    ob = pgcoord.outbox(db, { table = "bench_outbox_quiet", notify = false })
  elseif kind ~= "domain" then
    error("outbox.lua save: MODE must be domain, outbox or outbox_quiet")
  end
  bench.warm(db, clients)
  local total, elapsed = bench.clients(clients, seconds, function()
    local order = math.random(1, 1000000)
    db:tx(function(tx)
      tx:exec(DOMAIN_SQL, CUSTOMER, order)
      if ob then ob:save(tx, { topic = "orders", key = order, payload = payload(order) }) end
    end)
  end)
  db:close()
  say(("tx=%d seconds=%.3f tps=%.1f"):format(total, elapsed, total / elapsed))

elseif mode == "fill" then
  local n = args:integer(2, "N", 0)
  local db = pgcoord.connect(nil, { size = 1 })
  local ob = pgcoord.outbox(db, { table = "bench_outbox", notify = false })
  local chunk = {}
  for i = 1, n do
    chunk[#chunk + 1] = { topic = "orders", key = i, payload = payload(i) }
    if #chunk == 1000 or i == n then
      ob:save(nil, table.unpack(chunk))
      chunk = {}
    end
  end
  db:close()

elseif mode == "relay" then
  local n, batch, kind = args:integer(2, "N", 0), args:integer(3, "BATCH", 0), args[4]
  local db = pgcoord.connect(nil, { size = 3 })
  local ob = pgcoord.outbox(db, { table = "bench_outbox" })
  local publish
  if kind == "noop" then
    publish = function() return true end
  elseif kind == "notify" then
    publish = ob:notify_publisher({ prefix = "bench_" })
  else
    error("outbox.lua relay: PUBLISHER must be noop or notify")
  end
  db:query("SELECT 1")
  local started = pgcoord.now()
  local relay = ob:relay(publish, { batch_size = batch, poll_interval = 1, listen = false })
  while relay:stats().published < n do
    if relay:stats().failed > 0 then error("outbox.lua relay: a publish failed") end
    pgcoord.sleep(0.001)
  end
  local elapsed = pgcoord.now() - started
  relay:stop()
  db:close()
  say(("messages=%d seconds=%.3f rate=%.1f"):format(n, elapsed, n / elapsed))

else
  error(("outbox.lua: unknown mode %s (setup, save, fill or relay)"):format(tostring(mode)))
end

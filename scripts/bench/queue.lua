-- The pgcoord side of scripts/bench/queue, run by pgcoord-run:
--   queue.lua setup QUEUE SUBSCRIPTIONS ORDERED
--       creates QUEUE with subscriptions s1..sN (ORDERED: 0 or 1); prints
--       "sids=ID,ID,... channel=C" (C: the channel its publishes notify)
--   queue.lua sql DIR QUEUE SIDS
--       writes pgbench scripts doing the module's own statements (its SQL
--       text, $n parameters turned into pgbench variables) to DIR:
--       publish.sql, drain-N.sql for subscription sN (unordered: claim
--       up to :batch, acking the batch claimed before in the same
--       statement, as consumers do) and consume-ordered.sql (ack the head
--       and claim the next, as ordered consumers do)
--   queue.lua publish QUEUE SECONDS CLIENTS
--       CLIENTS tasks publish one message per statement for SECONDS;
--       prints "published=N seconds=S rate=R"
--   queue.lua fill QUEUE MESSAGES
--       publishes MESSAGES messages with publish_many, 10,000 a statement
--   queue.lua drain QUEUE MESSAGES CONCURRENCY
--       the backlog of MESSAGES messages of subscription s1 drained by one
--       consumer of CONCURRENCY (its other options its defaults), nothing
--       published meanwhile: t0 just before q:consume, t1 the first moment,
--       after the last handler returned, at which a count of the
--       subscription's pending deliveries reads 0 (every ack written),
--       polled every ms; prints "messages=N seconds=S rate=R ... cpu=C"
--   queue.lua consume QUEUE SUBSCRIPTIONS CONCURRENCY SECONDS WAIT
--       a consumer per subscription, no-op handlers; prints "ready", then
--       counts the messages handled in a window of SECONDS that opens with
--       the first one (waiting at most WAIT seconds for it); prints
--       "handled=N seconds=S rate=R acked=A"
--   queue.lua publish-n QUEUE MESSAGES CLIENTS
--       CLIENTS tasks publish MESSAGES messages in all, one per statement
--   queue.lua consume-n QUEUE SUBSCRIPTIONS CONCURRENCY DELIVERIES
--       a consumer per subscription, no-op handlers, until DELIVERIES are
--       handled, then stopped (every ack written); for scripts/bench/queue-cost,
--       which counts statements, WAL and instructions of a fixed amount of
--       work, so it sends no statement of its own while it consumes
local pgcoord = require "pgcoord"
local queue = require "pgcoord.queue"

package.path = (arg[0]:match("^(.*/)") or "./") .. "?.lua;" .. package.path
local bench = require "benchlib"
local say = bench.say

local args = bench.args("queue.lua", ...)
local mode = args.mode


local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- The module's SQL with $n replaced as `params` says (a table n -> text).
local function pgbench_sql(sql, params)
  return (sql:gsub("%$(%d)", function(n)
    return assert(params[tonumber(n)], "no replacement for $" .. n)
  end)) .. ";\n"
end

if mode == "setup" then
  local name, subs, ordered = args[2], args:integer(3, "SUBSCRIPTIONS", 0), args[4] == "1"
  local db = pgcoord.connect(nil, { size = 1 })
  pgcoord.migrate(db)
  local q = pgcoord.queue(db, name, { ordered = ordered })
  local sids, queue_id = {}, nil
  for i = 1, subs do
    q:subscribe("s" .. i)
    local row = db:one([[SELECT s.id, s.queue_id FROM pgcoord.queue_subscriptions s
      JOIN pgcoord.queues q ON q.id = s.queue_id WHERE q.name = $1 AND s.name = $2]],
      name, "s" .. i)
    sids[i], queue_id = row.id, row.queue_id
  end
  db:close()
  say(("sids=%s channel=%s"):format(table.concat(sids, ","),
    queue_id and queue.sql.channel(queue_id) or ""))

elseif mode == "sql" then
  local dir, sids = args[2], {}
  for sid in tostring(args[4]):gmatch("%d+") do sids[#sids + 1] = sid end
  local s = queue.sql
  write(dir .. "/publish.sql", pgbench_sql(s.publish, { ":qname", ":payload" }))
  -- The unordered claim acks what the last one claimed ($5-$7) as it
  -- claims; pgbench holds nothing else in hand ($8).  It looks from the
  -- highest id it claimed ($9) after a claim that came back full, from the
  -- first id after one that came back short, as the consumer does (its
  -- look from the first id at least every FULL_SCAN_INTERVAL aside,
  -- which pgbench cannot time): a client that looked from the first id
  -- all along walked the entries that its acks leave in the pending index
  -- until a vacuum, the longer the further it fell behind the
  -- publishers (2,202 acks/s in one run while 13,155 a second were
  -- published, against 10,311 for the consumer).  Its last SELECT becomes
  -- the arrays of what it claimed, for the next transaction's acks
  -- (pgbench needs values, not NULL, for "none"), the highest id and the
  -- count.
  local final = "SELECT o.acked, o.lost, c.* FROM outcome o LEFT JOIN claimed c ON true"
  assert(s.claim:find(final, 1, true), "the claim no longer ends with " .. final)
  local function claim_script(sid, limit)
    return pgbench_sql(s.claim:gsub(final:gsub("%p", "%%%0"), ([[
SELECT o.acked, COALESCE((SELECT array_agg(%s::bigint) FROM claimed), '{}')::text AS sids,
       COALESCE((SELECT array_agg(id) FROM claimed), '{}')::text AS ids,
       COALESCE((SELECT array_agg(deliveries) FROM claimed), '{}')::text AS ns,
       COALESCE((SELECT max(id) FROM claimed), 0) AS top,
       (SELECT count(*) FROM claimed) AS got
  FROM outcome o]]):format(sid)),
      { sid, limit, "NULL", "30", ":sids", ":ids", ":ns", "'{}'", ":from" })
      :gsub(";\n$", " \\gset\n")
  end
  -- (a full claim: got = batch; every client starts with -D got=0 -D top=0)
  local from = "\\if :got = :batch\n\\set from :top\n\\else\n\\set from 0\n\\endif\n"
  -- Drain, and publish -> ack (unordered): claim up to :batch, acking the
  -- batch before, as the consumer does once its handlers have ended; past
  -- :claims transactions (:n counts them, from -D n=0), a claim of none,
  -- which acks the last batch.  A script per subscription, each run by a
  -- pgbench process of its own.
  for i, sid in ipairs(sids) do
    write(("%s/drain-%d.sql"):format(dir, i),
      from .. "\\set n :n + 1\n"
      .. "\\if :n > :claims\n\\set limit 0\n\\else\n\\set limit :batch\n\\endif\n"
      .. claim_script(sid, ":limit"))
  end
  -- Ordered: claim the head when holding nothing, else ack it and claim
  -- the next in one statement (pgbench needs 0, not NULL, for "none").
  local head = s.ack_claim_head:gsub("SELECT %(SELECT count%(%*%) FROM acked%) AS acked, c%.%*",
    "SELECT (SELECT count(*) FROM acked) AS acked, coalesce(c.id, 0) AS id,"
    .. " coalesce(c.deliveries, 0) AS deliveries")
  write(dir .. "/consume-ordered.sql",
    "\\if :id = 0\n"
    .. pgbench_sql(s.claim_head, { sids[1], "1", "NULL", "30" }):gsub(";\n$", " \\aset\n")
    .. "\\else\n"
    .. pgbench_sql(head, { sids[1], "1", "NULL", "30", ":id", ":deliveries" })
      :gsub(";\n$", " \\gset\n")
    .. "\\endif\n")
  say("written")

elseif mode == "fill" then
  local name, n = args[2], args:integer(3, "MESSAGES")
  local db = pgcoord.connect(nil, { size = 1 })
  local q = pgcoord.queue(db, name)
  local chunk = 10000
  for first = 1, n, chunk do
    local values = {}
    for i = first, math.min(n, first + chunk - 1) do values[#values + 1] = { n = i } end
    q:publish_many(db, values)
  end
  db:close()
  say(("published=%d"):format(n))

elseif mode == "drain" then
  local name, n = args[2], args:integer(3, "MESSAGES")
  local concurrency = args:integer(4, "CONCURRENCY")
  local db = pgcoord.connect(nil, { size = math.min(20, concurrency + 2) })
  local q = pgcoord.queue(db, name)
  local sid = db:one([[SELECT s.id FROM pgcoord.queue_subscriptions s
    JOIN pgcoord.queues q ON q.id = s.queue_id WHERE q.name = $1 AND s.name = 's1']], name).id
  local function pending()
    return db:one([[SELECT count(*)::int AS n FROM pgcoord.queue_deliveries
                     WHERE subscription_id = $1 AND state = 'pending']], sid).n
  end
  assert(pending() == n, "the backlog is not " .. n .. " messages")
  bench.warm(db, math.min(20, concurrency + 2))
  local handled = 0
  local cpu0 = os.clock()
  local t0 = pgcoord.now()
  local c = q:consume("s1", function() handled = handled + 1 end, { concurrency = concurrency })
  bench.wait_for(function() return handled >= n end, 600, "last handler")
  local t_handlers = pgcoord.now()
  bench.wait_for(function() return pending() == 0 end, 60, "empty backlog")
  local t1 = pgcoord.now()
  local cpu = os.clock() - cpu0
  c:stop(0)
  local acked = c:stats().acked
  db:close()
  say(("messages=%d seconds=%.4f rate=%.1f handlers_done_at=%.4f acked=%d cpu=%.3f")
    :format(n, t1 - t0, n / (t1 - t0), t_handlers - t0, acked, cpu))

elseif mode == "publish" then
  local name = args[2]
  local seconds, clients = args:integer(3, "SECONDS", 0), args:integer(4, "CLIENTS", 0)
  local db = pgcoord.connect(nil, { size = clients })
  local q = pgcoord.queue(db, name)
  bench.warm(db, clients)
  local total, elapsed = bench.clients(clients, seconds, function(_, n)
    q:publish(db, { n = n })
  end)
  db:close()
  say(("published=%d seconds=%.3f rate=%.1f"):format(total, elapsed, total / elapsed))

elseif mode == "consume" then
  local name, subs = args[2], args:integer(3, "SUBSCRIPTIONS", 0)
  local concurrency, window = args:integer(4, "CONCURRENCY", 0), args:integer(5, "SECONDS", 0)
  local wait = args:integer(6, "WAIT", 0)
  local db = pgcoord.connect(nil, { size = math.min(20, subs * concurrency + 2) })
  local q = pgcoord.queue(db, name)
  local handled, started = 0, nil
  local function handler()
    handled = handled + 1
    if not started then started = pgcoord.now() end
  end
  local consumers = {}
  for i = 1, subs do
    consumers[i] = q:consume("s" .. i, handler, { concurrency = concurrency, poll_interval = 1 })
  end
  local deadline = pgcoord.now() + 10
  while not (q.sub and q.sub:connected()) do
    if pgcoord.now() > deadline then error("the subscriber did not connect within 10 s") end
    pgcoord.sleep(0.01)
  end
  say("ready")
  local give_up = pgcoord.now() + wait
  while not started do
    if pgcoord.now() > give_up then error(("no message within %d s"):format(wait)) end
    pgcoord.sleep(0.01)
  end
  pgcoord.sleep(started + window - pgcoord.now())
  local counted = handled
  local acked = 0
  for _, c in ipairs(consumers) do
    c:stop(0)
    acked = acked + c:stats().acked
  end
  db:close()
  say(("handled=%d seconds=%d rate=%.1f acked=%d"):format(counted, window, counted / window,
    acked))

elseif mode == "publish-n" then
  local name, n, clients = args[2], args:integer(3, "MESSAGES"), args:integer(4, "CLIENTS")
  local db = pgcoord.connect(nil, { size = clients })
  local q = pgcoord.queue(db, name)
  local next_n, tasks = 0, {}
  for c = 1, clients do
    tasks[c] = pgcoord.spawn(function()
      while next_n < n do
        next_n = next_n + 1
        q:publish(db, { n = next_n })
      end
    end)
  end
  for _, t in ipairs(tasks) do t:join() end
  db:close()
  say(("published=%d"):format(n))

elseif mode == "consume-n" then
  local name, subs = args[2], args:integer(3, "SUBSCRIPTIONS")
  local concurrency, total = args:integer(4, "CONCURRENCY"), args:integer(5, "DELIVERIES", 0)
  local db = pgcoord.connect(nil, { size = math.min(20, subs * concurrency + 2) })
  local q = pgcoord.queue(db, name)
  local handled, all_handled = 0, require("pgcoord.task").cond()
  local function handler()
    handled = handled + 1
    if handled == total then all_handled:signal() end
  end
  local consumers = {}
  for i = 1, subs do
    consumers[i] = q:consume("s" .. i, handler, { concurrency = concurrency })
  end
  say("ready")
  -- (a wait, not a poll: the process does nothing but consume meanwhile)
  while handled < total do all_handled:wait() end
  local acked = 0
  for _, c in ipairs(consumers) do
    c:stop()
    acked = acked + c:stats().acked
  end
  db:close()
  say(("handled=%d acked=%d"):format(handled, acked))

else
  error(("queue.lua: unknown mode %s (setup, sql, fill, drain, publish, consume, publish-n"
    .. " or consume-n)")
    :format(tostring(mode)))
end

-- Durable queues against the real server: copies per subscription,
-- transactions, ordered delivery under requeues, three consumer processes
-- sharing 10,000 messages (and one of them SIGKILLed mid-handler),
-- dead letters, bad payloads, unsubscribe, graceful stop and wake-ups.
local pgcoord = require "pgcoord"
local helper = require "helper"

local pools, consumers = {}, {}

local function pool(size)
  local p = helper.connect({ size = size or 4 })
  pools[#pools + 1] = p
  return p
end

-- q:consume, stopped after the test.
local function consume(q, name, fn, opts)
  local c = q:consume(name, fn, opts)
  consumers[#consumers + 1] = c
  return c
end

local function cleanup()
  for _, c in ipairs(consumers) do pcall(c.stop, c, 0) end
  consumers = {}
  for _, p in ipairs(pools) do pcall(p.close, p) end
  pools = {}
  helper.cleanup()
end

local function messages_of(db, qname)
  return db:one([[SELECT count(*) AS n FROM pgcoord.queue_messages m
    JOIN pgcoord.queues q ON q.id = m.queue_id WHERE q.name = $1]], qname).n
end

-- Delivery rows of a subscription, by message id: { state, deliveries, ... }.
local function deliveries(db, qname, sub)
  local rows = db:query([[
    SELECT d.message_id AS id, d.state, d.deliveries, d.last_error,
           extract(epoch FROM d.last_delivered_at) AS delivered
      FROM pgcoord.queue_deliveries d
      JOIN pgcoord.queue_subscriptions s ON s.id = d.subscription_id
      JOIN pgcoord.queues q ON q.id = s.queue_id
     WHERE q.name = $1 AND s.name = $2 ORDER BY d.message_id]], qname, sub)
  local by_id = {}
  for _, r in ipairs(rows) do by_id[r.id] = r end
  return rows, by_id
end

local errors = helper.error_of

-- Whether the lease of message id (a 0.3 s visibility_timeout, renewed
-- every 0.1 s) was renewed past the first lease and a renewal more.
local function renewed(qname, id)
  return helper.admin():one([[SELECT visible_at > last_delivered_at + interval '0.6 s' AS renewed
    FROM pgcoord.queue_deliveries d JOIN pgcoord.queue_subscriptions s
      ON s.id = d.subscription_id JOIN pgcoord.queues q ON q.id = s.queue_id
    WHERE q.name = $1 AND d.message_id = $2]], qname, id).renewed
end

-- A queue of pool p with a subscription "s" and the messages 1..n
-- published; returns it and its name.
local function backlog(p, n)
  local qname = helper.unique("q")
  local q = pgcoord.queue(p, qname)
  q:subscribe("s")
  local values = {}
  for i = 1, n do values[i] = i end
  q:publish_many(p, values)
  return q, qname
end

-- Counts the unordered claims pool p sends: { on_way = now, most = at
-- once, asked = the rows each asked for, in sending order, from = the
-- highest message id one looked from }.  on_send(claims), if given, runs
-- as each claim goes out, once it is counted.
local function count_claims(p, on_send)
  local claim = require("pgcoord.queue").sql.claim
  local claims, query = { on_way = 0, most = 0, asked = {}, from = 0 }, p.query
  p.query = function(self, text, ...)
    if text ~= claim then return query(self, text, ...) end
    claims.asked[#claims.asked + 1] = select(2, ...)
    claims.from = math.max(claims.from, (select(9, ...)))
    claims.on_way = claims.on_way + 1
    claims.most = math.max(claims.most, claims.on_way)
    if on_send then on_send(claims) end
    local ok, rows = pcall(query, self, text, ...)
    claims.on_way = claims.on_way - 1
    if not ok then error(rows, 0) end
    return rows
  end
  return claims
end

-- A handler that counts the times each payload reached it, and the counts.
local function tally()
  local seen = {}
  return seen, function(msg) seen[msg.payload] = (seen[msg.payload] or 0) + 1 end
end

-- Asserts that payloads 1 to n each reached the handler once.
local function each_once(seen, n)
  for i = 1, n do assert.are.equal(1, seen[i], ("message %d"):format(i)) end
end

describe("pgcoord.queue", function()
  local db

  setup(function()
    db = pgcoord.connect(nil, { size = 4, params = { application_name = "queue_spec" } })
    pgcoord.migrate(db)
  end)

  teardown(function()
    db:close()
  end)

  after_each(cleanup)

  it("copies a message to the subscriptions present at publish time, not to later ones", function()
    local qname = helper.unique("q")
    local q = pgcoord.queue(pool(), qname)
    assert.is_true(q:subscribe("a"))
    assert.is_false(q:subscribe("a"))       -- idempotent
    assert.is_true(q:subscribe("b"))
    local id1, copies1 = q:publish(db, { n = 1 })
    assert.is_true(q:subscribe("c"))
    local id2, copies2 = q:publish(db, { n = 2 })
    assert.are.equal(2, copies1)
    assert.are.equal(3, copies2)
    for _, name in ipairs({ "a", "b" }) do
      local rows = deliveries(db, qname, name)
      assert.are.same({ id1, id2 }, { rows[1].id, rows[2].id })
    end
    local rows = deliveries(db, qname, "c")
    assert.are.equal(1, #rows)
    assert.are.equal(id2, rows[1].id)
    -- and consuming c hands over message 2 only; the other copies stay
    local got = {}
    consume(q, "c", function(msg) got[#got + 1] = msg end)
    helper.wait_until(function() return q:stats("c").acked == 1 end, 10, "c's ack")
    assert.are.equal(1, #got)
    assert.are.same({ n = 2 }, got[1].payload)
    assert.are.equal(id2, got[1].id)
    assert.are.equal(1, got[1].deliveries)
    assert.are.equal("number", type(got[1].published_at))
    assert.are.equal(2, q:stats("a").pending)
    assert.are.equal(2, messages_of(db, qname))
    -- no subscription at all: nothing is stored
    local lonely = pgcoord.queue(db, helper.unique("q"))
    local id, copies = lonely:publish(db, "nobody listens")
    assert.is_nil(id)
    assert.are.equal(0, copies)
  end)

  it("publishes in the caller's transaction: a rollback delivers nothing", function()
    local qname = helper.unique("q")
    local q = pgcoord.queue(pool(), qname)
    q:subscribe("s")
    local got = {}
    consume(q, "s", function(msg) got[#got + 1] = msg.payload end, { poll_interval = 0.2 })
    local ok, err = pcall(db.tx, db, function(tx)
      q:publish(tx, "rolled back")
      q:publish_many(tx, { "also", "rolled back" })
      error("abort")
    end)
    assert.is_false(ok)
    assert.matches("abort", tostring(err), 1, true)
    assert.are.equal(0, messages_of(db, qname))
    -- a later committed message is the first and only one delivered
    db:tx(function(tx)
      q:publish(tx, "committed")
      -- invisible to the consumer until commit
      assert.are.equal(0, q:stats("s").pending)
    end)
    helper.wait_until(function() return q:stats("s").acked == 1 end, 10, "the ack")
    assert.are.same({ "committed" }, got)
    assert.are.equal(0, q:stats("s").pending)
  end)

  it("publish_many writes a batch in one statement, ids in order", function()
    local qname = helper.unique("q")
    local q = pgcoord.queue(pool(), qname)
    q:subscribe("a")
    q:subscribe("b")
    local values = {}
    for i = 1, 500 do values[i] = { i = i, big = (1 << 53) + i } end
    local ids, copies = q:publish_many(db, values)
    assert.are.equal(500, #ids)
    assert.are.equal(2, copies)
    for i = 2, #ids do assert.is_true(ids[i] > ids[i - 1]) end
    local row = db:one("SELECT payload::text AS p FROM pgcoord.queue_messages WHERE id = $1",
      ids[7])
    assert.matches('"big":' .. ((1 << 53) + 7), row.p, 1, true) -- integers stay exact
    assert.are.equal(500, q:stats("b").pending)
    assert.are.same({}, (q:publish_many(db, {})))
  end)

  it("refuses values that cannot be encoded, before writing anything", function()
    local qname = helper.unique("q")
    local q = pgcoord.queue(pool(), qname)
    q:subscribe("s")
    local cycle = { name = "loop" }
    cycle.self = cycle
    local err = errors(q.publish, q, db, function() end)
    assert.matches('q:publish: the value for queue "' .. qname
      .. '" cannot be encoded as JSON: cannot encode a function', err, 1, true)
    err = errors(q.publish, q, db, cycle)
    assert.matches("cannot be encoded as JSON", err, 1, true)
    assert.matches("cycle", err, 1, true)
    err = errors(q.publish, q, db, { x = 0 / 0 })
    assert.matches("cannot be encoded as JSON", err, 1, true)
    err = errors(q.publish, q, db, nil)
    assert.matches("is nil", err, 1, true)
    err = errors(q.publish_many, q, db, { 1, 2, { f = print }, 4 })
    assert.matches("value #3", err, 1, true)
    assert.matches("cannot encode a function", err, 1, true)
    err = errors(q.publish_many, q, db, { 1, cycle })
    assert.matches("value #2", err, 1, true)
    assert.are.equal(0, messages_of(db, qname))
    -- inside a transaction the refusal leaves the transaction usable
    db:tx(function(tx)
      assert.is_false(pcall(q.publish, q, tx, cycle))
      q:publish(tx, "fine")
    end)
    assert.are.equal(1, messages_of(db, qname))
    -- and the error points at the caller
    assert.matches("queue_spec.lua:%d+:", errors(function() q:publish(db, print) end))
    assert.matches("expected a pool or a transaction", errors(q.publish, q, "db", 1), 1, true)
  end)

  it("delivers an ordered subscription strictly in publish order under requeues", function()
    local qname = helper.unique("q")
    local p = pool(6)
    local q = pgcoord.queue(p, qname, { ordered = true })
    assert.is_true(q:subscribe("o"))
    -- the subscription keeps its mode: an unordered handle is refused
    local unordered = pgcoord.queue(p, qname, { ordered = false })
    assert.matches("is ordered", errors(unordered.consume, unordered, "o", print), 1, true)
    assert.matches("concurrency must be 1", errors(q.consume, q, "o", function() end,
      { concurrency = 2 }), 1, true)
    for i = 1, 10 do q:publish(db, { n = i }) end
    local more = {}
    for i = 11, 20 do more[#more + 1] = { n = i } end
    q:publish_many(db, more)

    local calls, active, max_active = {}, 0, 0
    local function handler(msg)
      active = active + 1
      if active > max_active then max_active = active end
      local n = msg.payload.n
      calls[#calls + 1] = n
      pgcoord.sleep(0.002)
      active = active - 1
      if n == 5 and msg.deliveries < 3 then return false end
      if n == 12 and msg.deliveries == 1 then error("twelve fails once") end
    end
    -- two consumers on the same subscription, on two pools
    local opts = { retry_delay = 0.05, poll_interval = 0.5 }
    consume(q, "o", handler, opts)
    consume(pgcoord.queue(pool(), qname), "o", handler, opts)
    helper.wait_until(function() return q:stats("o").acked == 20 end, 20, "20 acks")
    local want = {}
    for i = 1, 20 do
      want[#want + 1] = i
      if i == 5 then want[#want + 1] = 5 want[#want + 1] = 5 end
      if i == 12 then want[#want + 1] = 12 end
    end
    assert.are.same(want, calls)
    assert.are.equal(1, max_active)
    local _, by_id = deliveries(db, qname, "o")
    local ids = db:query([[SELECT id FROM pgcoord.queue_messages m WHERE m.queue_id =
      (SELECT id FROM pgcoord.queues WHERE name = $1) ORDER BY id]], qname)
    assert.are.equal(3, by_id[ids[5].id].deliveries)
    assert.are.equal(2, by_id[ids[12].id].deliveries)
    assert.matches("twelve fails once", by_id[ids[12].id].last_error, 1, true)
  end)

  it("requeues after an error whose text the database cannot take as it is", function()
    -- a NUL byte, and a two-byte character that the length limit would cut
    local qname = helper.unique("q")
    local q = pgcoord.queue(pool(), qname)
    q:subscribe("s")
    q:publish(db, { n = 1 })
    local tries = 0
    helper.capture_log(function()
      consume(q, "s", function()
        tries = tries + 1
        if tries == 1 then error(("a"):rep(1999) .. "\u{e9}\0tail", 0) end
      end, { retry_delay = 0.05, poll_interval = 0.5, visibility_timeout = 60 })
      -- (a requeue that failed would leave the message leased for 60 s)
      helper.wait_until(function() return q:stats("s").acked == 1 end, 10, "the retry's ack")
    end)
    assert.are.equal(2, tries)
  end)

  it("orders concurrent publishers by commit, and keeps one message in flight", function()
    local qname = helper.unique("q")
    local p = pool(8)
    local q = pgcoord.queue(p, qname, { ordered = true })
    q:subscribe("o")
    local seen = {}
    consume(q, "o", function(msg) seen[#seen + 1] = { id = msg.id, p = msg.payload } end,
      { poll_interval = 0.5 })
    -- publishers whose transactions overlap: each holds its transaction
    -- open a moment after publishing
    local publishers = {}
    for w = 1, 4 do
      publishers[w] = helper.spawn(function()
        for i = 1, 8 do
          p:tx(function(tx)
            q:publish(tx, { w = w, i = i })
            pgcoord.sleep(0.001 * ((w + i) % 3))
          end)
        end
      end)
    end
    for _, t in ipairs(publishers) do t:join() end
    helper.wait_until(function() return #seen == 32 end, 20, "32 messages")
    local last_i = {}
    for k = 2, #seen do
      assert.is_true(seen[k].id > seen[k - 1].id, "delivered out of id order")
    end
    for _, s in ipairs(seen) do
      assert.is_true(s.p.i > (last_i[s.p.w] or 0), "a publisher's messages out of order")
      last_i[s.p.w] = s.p.i
    end
  end)

  it("dead-letters a message after max_deliveries; it can be listed and requeued", function()
    local qname = helper.unique("q")
    local q = pgcoord.queue(pool(), qname)
    q:subscribe("s")
    local ids = q:publish_many(db, { "ok-1", "poison", "ok-2" })
    local cured = false
    local calls = {}
    local c = consume(q, "s", function(msg)
      calls[msg.payload] = (calls[msg.payload] or 0) + 1
      if msg.payload == "poison" and not cured then error("poisoned: " .. msg.deliveries) end
    end, { max_deliveries = 3, retry_delay = 0.02, concurrency = 2, poll_interval = 0.5 })
    helper.wait_until(function() return #q:dead("s") == 1 end, 10, "a dead letter")
    local dead = q:dead("s")
    assert.are.equal(ids[2], dead[1].id)
    assert.are.equal("poison", dead[1].payload)
    assert.are.equal(3, dead[1].deliveries)
    assert.matches("poisoned: 3", dead[1].last_error, 1, true)
    assert.are.equal("number", type(dead[1].published_at))
    assert.are.equal(3, calls.poison)
    local st = q:stats("s")
    assert.are.equal(2, st.acked)
    assert.are.equal(0, st.pending)
    assert.are.equal(1, st.dead)
    -- by hand: requeue; it is delivered afresh and acked
    cured = true
    assert.are.equal(0, q:requeue_dead("s", { ids[1] }))  -- not dead: nothing to do
    assert.are.equal(1, q:requeue_dead("s", { ids[2] }))
    helper.wait_until(function() return q:stats("s").acked == 3 end, 10, "the requeued ack")
    assert.are.equal(4, calls.poison)
    assert.are.same({}, q:dead("s"))
    local _, by_id = deliveries(db, qname, "s")
    assert.are.equal(1, by_id[ids[2]].deliveries) -- the count started again
    assert.are.equal(1, c:stats().dead)
  end)

  it("dead-letters a message whose deliveries all ended without an outcome", function()
    local qname = helper.unique("q")
    local q = pgcoord.queue(pool(), qname)
    q:subscribe("s")
    local id = q:publish(db, "hangs")
    -- a consumer whose handler hangs, stopped without renewing: the lease runs out
    local hang = pgcoord.queue(pool(), qname):consume("s", function() pgcoord.sleep(3600) end,
      { visibility_timeout = 0.3 })
    helper.wait_until(function() return q:stats("s").delayed == 1 end, 10, "the claim")
    hang:stop(0)   -- cancelled: handed back at once, the delivery still counts
    local _, by_id = deliveries(db, qname, "s")
    assert.are.equal(1, by_id[id].deliveries)
    assert.matches("handed back unfinished", by_id[id].last_error, 1, true)
    consume(q, "s", function() error("never called") end, { max_deliveries = 1 })
    helper.wait_until(function() return #q:dead("s") == 1 end, 10, "a dead letter")
    assert.matches("ended without an outcome", q:dead("s")[1].last_error, 1, true)
  end)

  it("unsubscribe drops the subscription and its deliveries; its consumer stops", function()
    local qname = helper.unique("q")
    local q = pgcoord.queue(pool(), qname)
    q:subscribe("a")
    q:subscribe("b")
    local ids = q:publish_many(db, { 1, 2, 3 })
    local c = consume(q, "a", function(msg) return msg.payload ~= 3 end,
      { poll_interval = 0.2, retry_delay = 60 })
    helper.wait_until(function() return q:stats("a").acked == 2 end, 10, "two acks")
    assert.is_true(q:unsubscribe("a"))
    assert.is_false(q:unsubscribe("a"))
    assert.are.equal(0, #deliveries(db, qname, "a"))
    helper.wait_until(function() return c:stats().state == "stopped" end, 10,
      "the consumer to stop")
    assert.matches("has no subscription", errors(q.stats, q, "a"), 1, true)
    -- b still holds all three
    assert.are.equal(3, q:stats("b").pending)
    assert.are.equal(3, messages_of(db, qname))
    assert.is_true(q:unsubscribe("b"))
    assert.are.equal(0, messages_of(db, qname))
    -- subscribing again starts empty
    assert.is_true(q:subscribe("a"))
    assert.are.equal(0, q:stats("a").pending)
    assert.are.equal(3, #ids)
  end)

  it("sweeps acked deliveries after retention, and messages nobody holds", function()
    local qname = helper.unique("q")
    local q = pgcoord.queue(pool(), qname, { retention = 0 })
    q:subscribe("a")
    q:subscribe("b")
    q:publish_many(db, { 1, 2, 3 })
    consume(q, "a", function() end, { poll_interval = 0.2 })
    helper.wait_until(function() return q:stats("a").acked == 0 and q:stats("a").pending == 0
      and #deliveries(db, qname, "a") == 0 end, 10, "a's acked rows to be swept")
    assert.are.equal(3, messages_of(db, qname))   -- b still holds them
    consume(q, "b", function() end, { poll_interval = 0.2 })
    helper.wait_until(function() return messages_of(db, qname) == 0 end, 10, "the messages to go")
  end)

  it("stops gracefully: finishes the running handler, takes nothing new", function()
    local qname = helper.unique("q")
    local q = pgcoord.queue(pool(), qname)
    q:subscribe("s")
    local release = false
    local started = {}
    local c = consume(q, "s", function(msg)
      started[#started + 1] = msg.payload
      helper.wait_until(function() return release end, 20, "release")
    end)
    q:publish(db, "first")
    helper.wait_until(function() return #started == 1 end, 10, "the handler to start")
    local stopper = helper.spawn(function() c:stop() return "stopped" end)
    helper.wait_until(function() return c:stats().state == "stopping" end, 5, "stopping")
    q:publish(db, "second")
    assert.are.equal("running", stopper:status())
    release = true
    assert.are.equal("stopped", stopper:join())
    assert.are.same({ "first" }, started)
    local st = q:stats("s")
    assert.are.equal(1, st.acked)
    assert.are.equal(1, st.pending)
    assert.are.equal(0, st.delayed)  -- "second" was never claimed
  end)

  it("past pgcoord-run's stop deadline, a handler that never ends is cancelled and its"
    .. " message handed back at once, not after its lease", function()
    local qname = helper.unique("q")
    local q = pgcoord.queue(db, qname)
    q:subscribe("s")
    local id = q:publish(db, "stuck")
    local path = helper.write_file(helper.tmpname("script") .. ".lua", ([[
      io.stdout:setvbuf("no")
      local db = pgcoord.connect(nil, { size = 2 })
      pgcoord.queue(db, %q):consume("s", function()
        print("handling")
        while true do pgcoord.sleep(0.05) end   -- never looks at pgcoord.stopping()
      end, { visibility_timeout = 600 })
    ]]):format(qname))
    local p = helper.start({ "pgcoord-run", "--stop-timeout", "0.5", path })
    p:wait_output("handling", 10)
    p:kill("TERM")
    assert.are.equal(1, p:wait(10), p:output())   -- the deadline passed
    local _, by_id = deliveries(db, qname, "s")
    assert.are.equal("pending", by_id[id].state)
    assert.are.equal("handed back unfinished when the consumer stopped", by_id[id].last_error)
    assert.is_true(db:one([[SELECT visible_at <= now() AS due FROM pgcoord.queue_deliveries
      WHERE message_id = $1]], id).due)
  end)

  it("fetches what is pending at start and wakes on NOTIFY, not on the poll", function()
    local qname = helper.unique("q")
    local q = pgcoord.queue(pool(), qname)
    q:subscribe("s")
    q:publish(db, "before start")
    local got = {}
    local t0 = pgcoord.now()
    consume(q, "s", function(msg) got[#got + 1] = msg.payload end, { poll_interval = 30 })
    helper.wait_until(function() return #got == 1 end, 5, "the pending message")
    helper.wait_until(function() return q.sub and q.sub:connected() end, 5, "LISTEN")
    q:publish(db, "after start")
    helper.wait_until(function() return #got == 2 end, 5, "the notified message")
    assert.is_true(pgcoord.now() - t0 < 5)
    -- published while the LISTEN connection is down: fetched on reconnect
    local channel = "pgcoord_queue_" .. db:one("SELECT id FROM pgcoord.queues WHERE name = $1",
      qname).id
    local pid = helper.wait_until(function()
      local row = db:one([[SELECT pid FROM pg_stat_activity
        WHERE query LIKE 'LISTEN %' AND query LIKE '%' || $1 || '"%']], channel)
      return row and row.pid
    end, 5, "the LISTEN backend")
    db:query("SELECT pg_terminate_backend($1)", pid)
    helper.wait_until(function() return not q.sub:connected() end, 5, "the drop")
    q:publish(db, "while down")
    helper.wait_until(function() return #got == 3 end, 10, "the message after reconnecting")
    assert.are.same({ "before start", "after start", "while down" }, got)
    assert.is_true(pgcoord.now() - t0 < 15)
  end)

  it("sends at most three statements per notified message: claim, ack on the next claim, a look",
    function()
    local qname = helper.unique("q")
    -- the pool, counting the consumer's statements
    local real, claims, asking = pool(), 0, false
    local counting = setmetatable({}, { __index = function(_, k)
      local v = real[k]
      if type(v) ~= "function" then return v end
      return function(_, sql, ...)
        if type(sql) == "string" and not asking then claims = claims + 1 end
        return v(real, sql, ...)
      end
    end })
    local q = pgcoord.queue(counting, qname)
    q:subscribe("s")
    local handled = 0
    consume(q, "s", function() handled = handled + 1 end, { concurrency = 4, poll_interval = 30 })
    helper.wait_until(function() return q.sub and q.sub:connected() and claims >= 1 end, 5,
      "LISTEN and the first claim")
    pgcoord.sleep(0.2) -- (the claim of the connection's wake-up, if any, is done)
    local before = claims
    for i = 1, 5 do
      q:publish(db, { n = i })
      helper.wait_until(function() return handled == i end, 5, "message " .. i)
      helper.wait_until(function()
        asking = true -- (the spec's own q:stats is not the consumer's)
        local acked = q:stats("s").acked
        asking = false
        return acked == i
      end, 5, "ack " .. i)
    end
    -- (an ack of its own, an empty claim and a look after each made 20)
    assert.is_true(claims - before <= 15, ("%d statements for 5 messages"):format(claims - before))
  end)

  it("refuses bad arguments and options clearly", function()
    local q = pgcoord.queue(db, helper.unique("q"))
    q:subscribe("s")
    assert.matches("name must be a non-empty string", errors(pgcoord.queue, db, ""), 1, true)
    assert.matches("expected a pool", errors(pgcoord.queue, {}, "x"), 1, true)
    assert.matches('unknown option "order"', errors(pgcoord.queue, db, "x", { order = true }),
      1, true)
    assert.matches("retention must be a number >= 0 and <= 31536000, got -1",
      errors(pgcoord.queue, db, "x", { retention = -1 }), 1, true)
    assert.matches("handler must be a function", errors(q.consume, q, "s", 42), 1, true)
    assert.matches("q:consume: option concurrency must be an integer >= 1 and <= 10000, got 0",
      errors(q.consume, q, "s", print, { concurrency = 0 }), 1, true)
    assert.matches("visibility_timeout must be a number >= 0.1 and <= 31536000, got 0",
      errors(q.consume, q, "s", print, { visibility_timeout = 0 }), 1, true)
    assert.matches('unknown option "timeout"', errors(q.consume, q, "s", print, { timeout = 1 }),
      1, true)
    assert.matches('has no subscription "nope"', errors(q.consume, q, "nope", print), 1, true)
    assert.matches("ids must be integers", errors(q.requeue_dead, q, "s", { "x" }), 1, true)
    local qo = pgcoord.queue(db, q.name, { ordered = true })
    assert.matches("exists and is unordered", errors(qo.subscribe, qo, "s"), 1, true)
  end)

  it("refuses unknown options in every function that takes them, at the caller's line",
    function()
    local q = pgcoord.queue(db, helper.unique("q"))
    q:subscribe("s")
    local function refused(fn, text)
      local err = errors(fn)
      assert.matches(text, err, 1, true)
      assert.matches("^spec/queue_spec.lua:%d+: ", err)   -- the line below, not pgcoord's
    end
    refused(function() pgcoord.queue(db, "x", { orderd = true }) end,
      'unknown option "orderd" for pgcoord.queue')
    refused(function() q:consume("s", print, { concurency = 2 }) end,
      'unknown option "concurency" for q:consume')
    refused(function() q:publish(db, "v", { dealy = 3 }) end,
      'unknown option "dealy" for q:publish')
    refused(function() q:dead("s", { limt = 1 }) end, 'unknown option "limt" for q:dead')
    refused(function() q:consume("s", print, { concurrency = "2" }) end,
      'q:consume: option concurrency must be an integer >= 1 and <= 10000, got "2"')
    refused(function() q:publish("db", "v") end, "q:publish: expected a pool or a transaction")
    refused(function() q:publish(db, nil) end, "q:publish: the value for queue")
    refused(function() q:stats("") end, "q:stats: subscription name must be a non-empty string")
    local c = consume(q, "s", function() end)
    refused(function() c:stop(-1) end, "consumer:stop: option timeout must be a number >= 0")
    assert.are.equal(0, messages_of(db, q.name))   -- the refused publish sent nothing
  end)

  it("consumer:stop() unregisters its stop handler: a later pgcoord.stop() does not run it",
    function()
    local qname = helper.unique("q")
    pgcoord.queue(db, qname):subscribe("s")
    -- every stop handler a consumer registers prints when it runs
    local path = helper.write_file(helper.tmpname("script") .. ".lua", ([[
      io.stdout:setvbuf("no")
      local pgcoord = require "pgcoord"
      local lifecycle = require "pgcoord.lifecycle"
      local on_stop = lifecycle.on_stop
      function lifecycle.on_stop(fn)
        if not debug.getinfo(2, "S").source:find("queue/consumer.lua", 1, true) then
          return on_stop(fn)
        end
        return on_stop(function() print("consumer stop handler ran") fn() end)
      end
      local db = pgcoord.connect(nil, { size = 2 })
      local q = pgcoord.queue(db, %q)
      local c = q:consume("s", function() end)
      c:stop()
      print("stopped by hand")
      local kept = q:consume("s", function() end)
      pgcoord.stop()
      kept:stop()
      print("done", kept:stats().state)
    ]]):format(qname))
    local code, out = helper.run({ "pgcoord-run", path })
    assert.are.equal(0, code, out)
    assert.matches("stopped by hand", out, 1, true)
    assert.matches("done\tstopped", out, 1, true)
    -- one ran: the one of the consumer still running at the stop
    local _, runs = out:gsub("consumer stop handler ran", "")
    assert.are.equal(1, runs, out)
  end)

  it("refuses options that would make a consumer spin or its statements fail", function()
    local q = pgcoord.queue(db, helper.unique("q"))
    q:subscribe("s")
    local function refused(opts, text)
      local err = errors(function() q:consume("s", print, opts) end)
      assert.matches("q:consume: option " .. text, err, 1, true)
      assert.matches("queue_spec.lua:%d+:", err)   -- raised at the caller
    end
    -- each of these burned a core (a poll, a renewal or a retry per loop turn)
    refused({ visibility_timeout = 1e-9 }, "visibility_timeout must be a number"
      .. " >= 0.1 and <= 31536000, got 1e-09")
    refused({ poll_interval = 1e-9 }, "poll_interval must be a number >= 0.01")
    refused({ retry_delay = 1e-9 }, "retry_delay must be a number >= 0.01")
    refused({ retry_delay = 0 }, "retry_delay must be a number >= 0.01")
    refused({ max_retry_delay = 1e-9 }, "max_retry_delay must be a number >= 0.01")
    -- one claim and a million handlers at once would hold the loop
    refused({ concurrency = 1000000 }, "concurrency must be an integer >= 1 and <= 10000,"
      .. " got 1000000")
    refused({ concurrency = 1e6 }, "concurrency must be an integer >= 1 and <= 10000")
    -- the database would refuse these in every claim or requeue
    refused({ visibility_timeout = 1e300 }, "visibility_timeout must be a number")
    refused({ visibility_timeout = math.huge }, "visibility_timeout must be a number")
    refused({ poll_interval = 0 / 0 }, "poll_interval must be a number")
    refused({ max_retry_delay = 1e300 }, "max_retry_delay must be a number")
    refused({ max_deliveries = 1 << 40 },
      "max_deliveries must be an integer >= 1 and <= 2147483647")
    assert.matches("option retention must be a number >= 0 and <= 31536000, got inf",
      errors(pgcoord.queue, db, "x", { retention = math.huge }), 1, true)
    assert.matches("option limit must be an integer >= 1 and <= 100000",
      errors(q.dead, q, "s", { limit = 1 << 40 }), 1, true)
    -- the bounds themselves are accepted, and the largest concurrency runs
    local c = consume(q, "s", function() end, { concurrency = 10000, poll_interval = 0.01,
      visibility_timeout = 0.1, retry_delay = 0.01, max_deliveries = 0x7fffffff })
    q:publish(db, "one")
    helper.wait_until(function() return q:stats("s").acked == 1 end, 10, "the ack")
    -- the consumer counts the ack when it reads the reply, which can come
    -- after another session already sees the commit
    helper.wait_until(function() return c:stats().acked == 1 end, 10, "the consumer's count")
    assert.are.equal(1, q:stats("s").acked)
  end)

  it("fails only the delivery of a payload it cannot decode; the rest flow", function()
    -- nested 200 deep: the server takes it, pgcoord's decoder (128 levels)
    -- does not.  Published by the statement any other client would run.
    local deep = ("["):rep(200) .. ("]"):rep(200)
    for _, ordered in ipairs({ false, true }) do
      local qname = helper.unique("q")
      local q = pgcoord.queue(pool(), qname, { ordered = ordered })
      q:subscribe("s")
      q:publish(db, { n = 1 })
      local poison = db:one(require("pgcoord.queue").sql.publish, qname, deep).id
      q:publish(db, { n = 2 })
      local got = {}
      local lines = helper.capture_log(function()
        consume(q, "s", function(msg) got[#got + 1] = msg.payload.n end, { max_deliveries = 2,
          retry_delay = 0.02, poll_interval = 0.2, concurrency = ordered and 1 or 4 })
        helper.wait_until(function() return #q:dead("s") == 1 and #got == 2 end, 10,
          "the poison message dead-lettered and the others handled")
      end)
      table.sort(got)
      assert.are.same({ 1, 2 }, got)
      local dead = q:dead("s")[1]
      assert.are.equal(poison, dead.id)
      assert.are.equal(2, dead.deliveries)   -- each failed decoding was a delivery
      assert.matches("the payload cannot be decoded: .*nested too deep", dead.last_error)
      assert.is_nil(dead.payload)
      assert.matches("nested too deep", dead.payload_error, 1, true)
      assert.matches("queue message payload cannot be decoded", table.concat(lines, "\n"), 1, true)
      -- and the consumer goes on consuming
      q:publish(db, { n = 3 })
      helper.wait_until(function() return #got == 3 end, 10, "a later message")
      -- (acks are written in batches, after the handler returns)
      helper.wait_until(function() return q:stats("s").acked == 3 end, 10, "its ack")
    end
  end)

  it("msg:fence: a handler's writes commit only while its delivery is current", function()
    local qname, effects = helper.unique("q"), helper.unique("effects")
    db:exec(("CREATE TABLE %s (n int, deliveries int)"):format(effects))
    local p = pool(4)
    local q = pgcoord.queue(p, qname)
    q:subscribe("s")
    local id = q:publish(db, { n = 1 })
    local insert = ("INSERT INTO %s (n, deliveries) VALUES ($1, $2)"):format(effects)
    local refused, misuse, held, last
    local c = consume(q, "s", function(msg)
      last = msg
      misuse = errors(msg.fence, msg, p)
      if msg.deliveries == 1 then
        -- another consumer takes the message, as it would after a lost lease
        p:exec([[UPDATE pgcoord.queue_deliveries SET deliveries = deliveries + 1,
          visible_at = now() WHERE message_id = $1]], msg.id)
        local ok, err = pcall(p.tx, p, function(tx)
          tx:exec(insert, msg.payload.n, msg.deliveries)
          msg:fence(tx)
        end)
        refused = not ok and err
        error(err, 0)
      end
      p:tx(function(tx)
        msg:fence(tx)
        tx:exec(insert, msg.payload.n, msg.deliveries)
        -- the row stays locked until commit: nobody can claim it meanwhile
        held = errors(p.query, p, [[SELECT 1 FROM pgcoord.queue_deliveries
          WHERE message_id = $1 FOR UPDATE NOWAIT]], msg.id)
      end)
    end, { poll_interval = 0.2, retry_delay = 0.02 })
    helper.wait_until(function() return q:stats("s").acked == 1 end, 10, "the ack")
    assert.are.equal("55P03", refused.sqlstate)
    assert.matches(("msg:fence: message %d (delivery 1) of queue %q, subscription \"s\": its"
      .. " lease was lost"):format(id, qname), tostring(refused), 1, true)
    assert.matches("expected a transaction (the tx of db:tx), got a pool", misuse, 1, true)
    assert.matches("could not obtain lock", held, 1, true)
    -- the refused write was rolled back; the one of the current delivery holds
    local rows = db:query(("SELECT n, deliveries FROM %s"):format(effects))
    assert.are.equal(1, #rows)
    assert.are.same({ n = 1, deliveries = 3 }, rows[1])
    assert.are.equal(1, c:stats().fenced)
    -- a fence after the handler ended, or on a table that was never handed out
    local after = errors(db.tx, db, function(tx) last:fence(tx) end)
    assert.matches("its handler has ended", after, 1, true)
    assert.matches("expected a message given to a queue handler",
      errors(function() setmetatable({ id = id }, getmetatable(last)):fence(db) end), 1, true)
    -- nor does getmetatable hand the delivery itself to the handler
    assert.is_nil(rawget(getmetatable(last), "consumer"))
  end)

  it("renews the other leases while a handler's fenced transaction is open", function()
    local qname = helper.unique("q")
    local p = pool(6)
    local q = pgcoord.queue(p, qname)
    q:subscribe("s")
    local ids = q:publish_many(db, { "fenced", "plain" })
    local started, release = {}, false
    consume(q, "s", function(msg)
      if msg.payload == "fenced" then
        p:tx(function(tx)
          msg:fence(tx)
          started.fenced = true
          helper.wait_until(function() return release end, 10, "the release")
        end)
      else
        started.plain = true
        helper.wait_until(function() return release end, 10, "the release")
      end
    end, { concurrency = 2, visibility_timeout = 3 })
    helper.wait_until(function() return started.fenced and started.plain end, 10, "both handlers")
    helper.wait_until(function() return renewed(qname, ids[2]) end, 2.5,
      "the plain message's lease to be renewed")
    release = true
    helper.wait_until(function() return q:stats("s").acked == 2 end, 10, "two acks")
    local _, by_id = deliveries(db, qname, "s")
    assert.are.same({ 1, 1 }, { by_id[ids[1]].deliveries, by_id[ids[2]].deliveries })
  end)

  it("writes the acks of handlers that ended with the claim that refills their slots",
    function()
    local acks, sql = require "pgcoord.queue.acks", require("pgcoord.queue").sql
    local p = pool()
    local sent, query = {}, p.query
    p.query = function(self, text, ...)
      sent[text] = (sent[text] or 0) + 1
      return query(self, text, ...)
    end
    local age = acks.ACK_AGE
    acks.ACK_AGE = 600   -- no ack of its own: only a claim (or the stop) writes one
    finally(function() acks.ACK_AGE = age end)
    local qname = helper.unique("q")
    local q = pgcoord.queue(p, qname)
    q:subscribe("s")
    q:publish_many(db, { 1, 2, 3, 4, 5, 6, 7 })
    local handled = 0
    consume(q, "s", function() handled = handled + 1 end, { concurrency = 2 })
    helper.wait_until(function() return q:stats("s").acked == 7 end, 10, "seven acks")
    assert.are.equal(7, handled)
    assert.is_nil(sent[sql.ack])
    assert.is_true(sent[sql.claim] >= 2)
  end)

  it("keeps two claims on their way while a backlog lasts, each message handled once",
    function()
    local p = pool(6)
    local claims = count_claims(p)
    local q = backlog(p, 500)
    local seen, count = tally()
    consume(q, "s", count, { concurrency = 24 })
    helper.wait_until(function() return q:stats("s").acked == 500 end, 20, "500 acks")
    assert.are.equal(2, claims.most)
    each_once(seen, 500)
  end)

  -- Handlers that never wait end before the loop sizes its next claim.
  -- The first claim finds one message, and a wake-up (as a publisher's
  -- notification) comes while each claim is on its way: had the loop
  -- claimed again at once, the message in hand would leave room for one,
  -- and every claim after would find the one it asked for.
  it("claims its whole room at a time when its handlers never wait", function()
    local p, q, c = pool(3), nil, nil
    local claims = count_claims(p, function(claims)
      c:wake()
      if #claims.asked == 2 then   -- the backlog comes after the first claim
        local values = {}
        for i = 2, 41 do values[#values + 1] = i end
        q:publish_many(p, values)
      end
    end)
    q = backlog(p, 1)
    local seen, count = tally()
    c = consume(q, "s", count, { concurrency = 1 })
    helper.wait_until(function() return q:stats("s").acked == 41 end, 20, "41 acks")
    each_once(seen, 41)
    assert.is_true(#claims.asked >= 21, ("%d claims"):format(#claims.asked))
    for i, asked in ipairs(claims.asked) do
      assert.are.equal(2, asked, ("claim %d asked for %d"):format(i, asked))
    end
  end)

  -- The other side of sizing claims by the room the runners leave: a
  -- handler that waits keeps its slot, and the claim for the slot its
  -- neighbour freed goes out while it runs, not after it.
  it("claims the room freed while a handler that waits still runs", function()
    local p, running, overlapped = pool(3), 0, 0
    local claims = count_claims(p, function()
      if running > 0 then overlapped = overlapped + 1 end
    end)
    local q = backlog(p, 10)
    local seen, count = tally()
    consume(q, "s", function(msg)
      running = running + 1
      pgcoord.sleep(0.02)
      running = running - 1
      count(msg)
    end, { concurrency = 1 })
    helper.wait_until(function() return q:stats("s").acked == 10 end, 20, "10 acks")
    each_once(seen, 10)
    assert.are.equal(2, claims.asked[1])
    assert.is_true(overlapped >= 4, ("%d of %d claims went out while a handler ran")
      :format(overlapped, #claims.asked))
  end)

  -- The handlers free room while the loop's claim waits on the server (a
  -- table lock holds it there): the consumer sends a second claim beside
  -- it rather than waiting for the first to come back.
  it("during a backlog, sends a second claim while the first is on the server, never over-claims",
    function()
    local sql = require("pgcoord.queue").sql
    local p, app = helper.connect({ size = 8 })
    pools[#pools + 1] = p
    local claims = count_claims(p)
    -- the consumer's claims waiting on a lock in the server
    local function claims_waiting()
      return helper.admin():one([[SELECT count(*) AS n FROM pg_stat_activity
        WHERE application_name = $1 AND wait_event_type = 'Lock'
          AND left(query, 60) = left($2, 60)]], app, sql.claim).n
    end
    local q, qname = backlog(p, 40)
    -- claims take ids in order: handler i ends once opened reaches i
    local opened = 0
    local seen, count = tally()
    local c = consume(q, "s", function(msg)
      helper.wait_until(function() return opened >= msg.payload end, 20, "the gate")
      count(msg)
    end, { concurrency = 8, prefetch = 8 })
    -- the first claim came back full (16 of 16): a backlog
    helper.wait_until(function()
      local st = c:stats()
      return st.running == 8 and st.held == 8
    end, 10, "8 handlers running and 8 messages held")
    local locker = pool(1)
    locker:tx(function(tx)
      tx:exec("LOCK TABLE pgcoord.queue_deliveries IN EXCLUSIVE MODE")
      opened = 8   -- room for 8: one claim of 8 goes out, and waits
      helper.wait_until(function() return claims_waiting() == 1 end, 10, "a claim on the server")
      assert.are.equal(1, claims.on_way)
      opened = 16  -- room for 8 more while it waits: a second claim goes beside it
      helper.wait_until(function() return claims_waiting() == 2 end, 10,
        "two claims on the server")
      opened = math.huge
    end)
    -- each claim asked only for the room the other left
    assert.are.same({ 16, 8, 8 }, { table.unpack(claims.asked, 1, 3) })
    helper.wait_until(function() return q:stats("s").acked == 40 end, 20, "40 acks")
    assert.are.equal(2, claims.most)
    each_once(seen, 40)
    local rows = deliveries(db, qname, "s")
    assert.are.equal(40, #rows)
    for _, r in ipairs(rows) do assert.are.same({ "acked", 1 }, { r.state, r.deliveries }) end
  end)

  -- The late message's id is below the floor the claims look from once it
  -- commits; the backlog, topped up, never ends, so only the claim from
  -- the first id that goes out every FULL_SCAN_INTERVAL can find it.
  it("during a backlog, claims look from the highest id claimed, yet find a row committed below it",
    function()
    local p = pool(8)
    local claims = count_claims(p)
    local q = backlog(p, 0)
    local late_id, commit = nil, false
    local publisher = helper.spawn(function()
      db:tx(function(tx)
        late_id = q:publish(tx, "late")
        helper.wait_until(function() return commit end, 30, "the commit")
      end)
    end)
    helper.wait_until(function() return late_id end, 10, "the late message's id")
    local published = 0
    local function top_up()
      if published - q:stats("s").acked > 2000 then return end
      local values = {}
      for i = 1, 2000 do values[i] = published + i end
      q:publish_many(p, values)
      published = published + 2000
    end
    top_up()
    local seen, count = tally()
    consume(q, "s", count, { concurrency = 24 })
    helper.wait_until(function() top_up() return claims.from > late_id end, 10,
      "a claim to look from past the late message")
    commit = true
    publisher:join()
    helper.wait_until(function() top_up() return seen.late end, 20, "the late message")
    helper.wait_until(function() return q:stats("s").acked == published + 1 end, 30,
      "every message acked")
    assert.are.equal(1, seen.late)
    each_once(seen, published)
  end)

  it("holds prefetch messages for busy handlers, keeps their leases, hands them back on stop",
    function()
    local qname = helper.unique("q")
    local q = pgcoord.queue(pool(), qname)
    q:subscribe("s")
    local ids = q:publish_many(db, { "a", "b", "c", "d" })
    local release, started = false, {}
    local c = consume(q, "s", function(msg)
      started[#started + 1] = msg.payload
      helper.wait_until(function() return release end, 20, "the release")
    end, { concurrency = 1, prefetch = 2, visibility_timeout = 0.3 })
    helper.wait_until(function() return c:stats().held == 2 end, 10, "two messages held")
    local rows = deliveries(db, qname, "s")
    assert.are.same({ 1, 1, 1, 0 }, { rows[1].deliveries, rows[2].deliveries,
      rows[3].deliveries, rows[4].deliveries })
    assert.are.same({ "a" }, started)
    -- the held messages' leases are renewed like the running one's
    helper.wait_until(function() return renewed(qname, ids[3]) end, 5,
      "the held message's lease to be renewed")
    -- a stop hands them back at once, while the running handler finishes
    local stopper = helper.spawn(function() c:stop() return "stopped" end)
    helper.wait_until(function()
      local _, by_id = deliveries(db, qname, "s")
      return by_id[ids[2]].last_error == "handed back unfinished when the consumer stopped"
        and by_id[ids[3]].last_error == by_id[ids[2]].last_error
    end, 5, "the held messages to be handed back")
    assert.are.equal("running", stopper:status())
    release = true
    assert.are.equal("stopped", stopper:join())
    assert.are.same({ "a" }, started)
    local st = q:stats("s")
    assert.are.same({ 1, 3, 0 }, { st.acked, st.pending, st.delayed })
  end)

  it("publishers to ordered queues in opposite orders never deadlock (100 rounds)", function()
    local p = pool(4)
    local qa = pgcoord.queue(p, helper.unique("qa"), { ordered = true })
    local qb = pgcoord.queue(p, helper.unique("qb"), { ordered = true })
    qa:subscribe("s")
    qb:subscribe("s")
    local failures = {}
    for _ = 1, 100 do
      local first_done = false
      -- A publishes to qa, then (once B is on its way) to qb; B to qb, then qa
      local a = helper.spawn(function()
        return pcall(p.tx, p, function(tx)
          qa:publish(tx, "a1")
          first_done = true
          pgcoord.sleep(0.002) -- B's first publish reaches the server meanwhile
          qb:publish(tx, "a2")
        end)
      end)
      local b = helper.spawn(function()
        while not first_done do pgcoord.sleep(0.0005) end
        return pcall(p.tx, p, function(tx)
          qb:publish(tx, "b1")
          qa:publish(tx, "b2")
        end)
      end)
      for _, t in ipairs({ a, b }) do
        local ok, err = t:join()
        if not ok then failures[#failures + 1] = tostring(err) end
      end
    end
    assert.are.same({}, failures)
    assert.are.equal(200, qa:stats("s").pending)
    assert.are.equal(200, qb:stats("s").pending)
  end)

  it("a deadlock between the publish lock and a lock of the caller's says what to do",
    function()
    local p = pool(4)
    local q = pgcoord.queue(p, helper.unique("q"), { ordered = true })
    q:subscribe("s")
    local t = helper.unique("rows")
    db:exec(("CREATE TABLE %s (id int PRIMARY KEY)"):format(t))
    db:exec(("INSERT INTO %s VALUES (1)"):format(t))
    local step = 0
    -- A locks the row, then publishes; B publishes, then locks the row
    local a = helper.spawn(function()
      return pcall(p.tx, p, function(tx)
        tx:exec(("UPDATE %s SET id = 1 WHERE id = 1"):format(t))
        step = 1
        helper.wait_until(function() return step == 2 end, 10, "B's publish")
        q:publish(tx, "a")
      end)
    end)
    local b = helper.spawn(function()
      helper.wait_until(function() return step == 1 end, 10, "A's row lock")
      return pcall(p.tx, p, function(tx)
        q:publish(tx, "b")
        step = 2
        pgcoord.sleep(0.05) -- A's publish waits on the server meanwhile
        tx:exec(("UPDATE %s SET id = 1 WHERE id = 1"):format(t))
      end)
    end)
    local ok1, err1 = a:join()
    local ok2, err2 = b:join()
    -- A waited first, so its deadlock check (deadlock_timeout) runs first
    assert.is_true(ok2, tostring(err2))
    assert.is_false(ok1, "A's transaction must fail")
    assert.are.equal("40P01", err1.sqlstate)
    local text = tostring(err1)
    assert.matches(("deadlock publishing to ordered queue %q"):format(q.name), text, 1, true)
    assert.matches("Publish to ordered queues before taking other locks", text, 1, true)
    assert.are.equal(1, q:stats("s").pending)
  end)
end)

-- ---- three consumer processes ---------------------------------------------------

-- A consumer process: records each message in table SEEN (a second
-- handling of the same message counts in dups).  With STALL > 0, after
-- STALL messages its handlers hang (recorded in SEEN_stalled) until killed.
local CONSUMER = [[
local qname, sub, seen, stall, vt = arg[1], arg[2], arg[3], tonumber(arg[4]), tonumber(arg[5])
local pid = require("pgcoord.core").getpid()
local db = pgcoord.connect(nil, { size = 6 })
local q = pgcoord.queue(db, qname)
local handled = 0
local record = ("INSERT INTO %s (n, id, pid, deliveries) VALUES ($1, $2, $3, $4)"
  .. " ON CONFLICT (n) DO UPDATE SET dups = %s.dups + 1"):format(seen, seen)
q:consume(sub, function(msg)
  handled = handled + 1
  if stall > 0 and handled > stall then
    db:exec(("INSERT INTO %s_stalled (id, pid) VALUES ($1, $2)"):format(seen), msg.id, pid)
    pgcoord.sleep(3600)
  end
  db:exec(record, msg.payload.n, msg.id, pid, msg.deliveries)
end, { concurrency = 8, visibility_timeout = vt, poll_interval = 1 })
io.stdout:write("ready\n")
io.stdout:flush()
]]

describe("pgcoord.queue with three consumer processes", function()
  local db
  local N = 10000
  local CONCURRENCY = 8

  setup(function()
    db = pgcoord.connect(nil, { size = 4, params = { application_name = "queue_spec_procs" } })
    pgcoord.migrate(db)
  end)

  teardown(function()
    db:close()
  end)

  after_each(cleanup)

  local function prepare()
    local qname, seen = helper.unique("q"), helper.unique("seen")
    db:exec(("CREATE TABLE %s (n int PRIMARY KEY, id bigint, pid int, deliveries int,"
      .. " dups int NOT NULL DEFAULT 0)"):format(seen))
    db:exec(("CREATE TABLE %s_stalled (id bigint, pid int, at timestamptz DEFAULT now())")
      :format(seen))
    local q = pgcoord.queue(db, qname)
    q:subscribe("work")
    return q, qname, seen
  end

  local function start(qname, seen, stalls, vt)
    local script = helper.write_file(helper.tmpname("consumer") .. ".lua", CONSUMER)
    local procs = {}
    for i, stall in ipairs(stalls) do
      procs[i] = helper.start({ "pgcoord-run", script, qname, "work", seen, tostring(stall),
        tostring(vt) })
    end
    for _, p in ipairs(procs) do p:wait_output("ready", 20) end
    return procs
  end

  local function publish_all(q)
    for base = 0, N - 1, 1000 do
      local batch = {}
      for i = 1, 1000 do batch[i] = { n = base + i } end
      q:publish_many(db, batch)
    end
  end

  local function count(seen)
    return db:one(("SELECT count(*) AS n, coalesce(sum(dups), 0)::int AS dups,"
      .. " count(DISTINCT pid) AS pids FROM %s"):format(seen))
  end

  it("share 10,000 messages, each handled and acked exactly once", function()
    local q, qname, seen = prepare()
    local procs = start(qname, seen, { 0, 0, 0 }, 30)
    publish_all(q)
    helper.wait_until(function() return count(seen).n == N end, 60, "10,000 messages")
    helper.wait_until(function() return q:stats("work").acked == N end, 20, "10,000 acks")
    local c = count(seen)
    assert.are.equal(0, c.dups)
    assert.are.equal(3, c.pids)   -- all three took part
    local row = db:one([[SELECT count(*) AS n, max(deliveries) AS most, min(deliveries) AS least
      FROM pgcoord.queue_deliveries d JOIN pgcoord.queue_subscriptions s ON s.id = d.subscription_id
      JOIN pgcoord.queues q ON q.id = s.queue_id
      WHERE q.name = $1 AND d.state = 'acked']], qname)
    assert.are.same({ n = N, most = 1, least = 1 }, row)
    -- SIGTERM: a graceful stop, exit status 0
    for _, p in ipairs(procs) do p:kill("TERM") end
    for _, p in ipairs(procs) do assert.are.equal(0, p:wait(20), p:output()) end
  end)

  it("lose nothing when one is SIGKILLed mid-handler; its messages return within the lease",
    function()
    local VT = 2
    local q, qname, seen = prepare()
    local procs = start(qname, seen, { 300, 0, 0 }, VT)
    publish_all(q)
    -- the victim handled 300, then every handler slot hangs
    helper.wait_until(function()
      return db:one(("SELECT count(*) AS n FROM %s_stalled"):format(seen)).n == CONCURRENCY
    end, 30, "the victim's handlers to hang")
    local stalled = db:query(("SELECT id FROM %s_stalled ORDER BY id"):format(seen))
    procs[1]:kill("KILL")
    assert.are.equal(137, procs[1]:wait(10))
    local killed_at = db:one("SELECT extract(epoch FROM clock_timestamp()) AS t").t
    helper.wait_until(function() return count(seen).n == N end, 60, "all 10,000 messages")
    helper.wait_until(function() return q:stats("work").acked == N end, 20, "10,000 acks")
    local _, by_id = deliveries(db, qname, "work")
    for _, s in ipairs(stalled) do
      local d = by_id[s.id]
      assert.are.equal("acked", d.state)
      assert.are.equal(2, d.deliveries)
      -- redelivered once the lease (renewed every VT/3 until the kill) ran out
      local after = d.delivered - killed_at
      assert.is_true(after <= VT + 1.5, ("redelivered %.2fs after the kill"):format(after))
    end
    local handled_by = db:query(("SELECT DISTINCT pid FROM %s WHERE id = ANY ($1::bigint[])")
      :format(seen), "{" .. table.concat((function()
        local ids = {}
        for i, s in ipairs(stalled) do ids[i] = s.id end
        return ids
      end)(), ",") .. "}")
    for _, r in ipairs(handled_by) do assert.are_not.equal(procs[1].pid, r.pid) end
    for i = 2, 3 do procs[i]:kill("TERM") end
    for i = 2, 3 do assert.are.equal(0, procs[i]:wait(20), procs[i]:output()) end
  end)
end)

-- ---- a consumer paused past its lease --------------------------------------------

-- An ordered consumer whose handler writes (n, pid) into table EFFECTS in
-- a fenced transaction, after PAUSE seconds of pg_sleep in it (the spec
-- stops the process there).
local FENCED_CONSUMER = [[
local qname, effects, pause = arg[1], arg[2], tonumber(arg[3])
local pid = require("pgcoord.core").getpid()
local db = pgcoord.connect(nil, { size = 4, params = { application_name = os.getenv("APP") } })
local q = pgcoord.queue(db, qname, { ordered = true })
q:consume("o", function(msg)
  db:tx(function(tx)
    tx:exec("SELECT pg_sleep($1)", pause)
    tx:exec(("INSERT INTO %s (n, pid) VALUES ($1, $2)"):format(effects), msg.payload.n, pid)
    msg:fence(tx)
  end)
end, { visibility_timeout = 1, poll_interval = 0.5 })
io.stdout:write("ready\n")
io.stdout:flush()
]]

-- A consumer whose handler returns once the file GATE exists.
local GATED_CONSUMER = [[
local qname, gate = arg[1], arg[2]
local db = pgcoord.connect(nil, { size = 4, params = { application_name = os.getenv("APP") } })
pgcoord.queue(db, qname):consume("s", function(msg)
  io.stdout:write("handling ", msg.id, "\n")
  io.stdout:flush()
  while not io.open(gate) do pgcoord.sleep(0.01) end
end, { visibility_timeout = 1, poll_interval = 0.5 })
io.stdout:write("ready\n")
io.stdout:flush()
]]

describe("pgcoord.queue with a consumer paused past its lease", function()
  local db

  setup(function()
    db = pgcoord.connect(nil, { size = 4, params = { application_name = "queue_spec_pause" } })
    pgcoord.migrate(db)
  end)

  teardown(function()
    db:close()
  end)

  after_each(cleanup)

  it("refuses its fenced write on resume; handled messages keep publish order", function()
    local qname, effects = helper.unique("q"), helper.unique("effects")
    db:exec(("CREATE TABLE %s (seq bigserial PRIMARY KEY, n int NOT NULL, pid int NOT NULL)")
      :format(effects))
    local q = pgcoord.queue(db, qname, { ordered = true })
    q:subscribe("o")
    q:publish_many(db, { { n = 1 }, { n = 2 }, { n = 3 }, { n = 4 }, { n = 5 } })
    local app = helper.unique("paused")
    local script = helper.write_file(helper.tmpname("fenced") .. ".lua", FENCED_CONSUMER)
    local paused = helper.start({ "pgcoord-run", script, qname, effects, "2" },
      { env = { APP = app } })
    -- stop it inside the handler of message 1, well before its pg_sleep ends
    helper.wait_until(function()
      return db:one([[SELECT 1 AS yes FROM pg_stat_activity WHERE application_name = $1
        AND state = 'active' AND query LIKE 'SELECT pg_sleep%' AND now() - query_start < '0.5 s']],
        app)
    end, 20, "the handler of message 1 to be sleeping")
    assert.is_true(paused:kill("STOP"))
    -- another consumer takes message 1 once the lease (1 s) runs out, and the rest
    local pid = tonumber(helper.pid)
    local insert = ("INSERT INTO %s (n, pid) VALUES ($1, $2)"):format(effects)
    local p = pool(4)
    consume(pgcoord.queue(p, qname), "o", function(msg)
      p:tx(function(tx)
        tx:exec(insert, msg.payload.n, pid)
        msg:fence(tx)
      end)
    end, { poll_interval = 0.2 })
    helper.wait_until(function() return q:stats("o").acked == 5 end, 20, "5 acks")
    assert.is_true(paused:kill("CONT"))
    paused:wait_output("queue fence refused a write", 10)
    local rows = db:query(("SELECT n, pid FROM %s ORDER BY seq"):format(effects))
    local ns = {}
    for i, r in ipairs(rows) do
      ns[i] = r.n
      assert.are.equal(pid, r.pid, "a write of the paused consumer committed")
    end
    assert.are.same({ 1, 2, 3, 4, 5 }, ns)
    local _, by_id = deliveries(db, qname, "o")
    for _, d in pairs(by_id) do assert.are.equal("acked", d.state) end
    paused:kill("TERM")
    assert.are.equal(0, paused:wait(20), paused:output())
  end)

  it("delivers the message again once the lease ends: the lost ack loses no message", function()
    local qname, app = helper.unique("q"), helper.unique("app")
    local q = pgcoord.queue(db, qname)
    q:subscribe("s")
    local id = q:publish(db, "a")
    local gate = helper.tmpname("gate")
    local script = helper.write_file(helper.tmpname("consumer") .. ".lua", GATED_CONSUMER)
    local p = helper.start({ "pgcoord-run", script, qname, gate }, { env = { APP = app } })
    p:wait_output("handling " .. id, 20)
    -- the ack (alone or with a claim) waits for this row lock until the kill
    local locked, killed = false, false
    local holder = helper.spawn(function()
      db:tx(function(tx)
        tx:exec("SELECT 1 FROM pgcoord.queue_deliveries WHERE message_id = $1 FOR UPDATE", id)
        locked = true
        helper.wait_until(function() return killed end, 30, "the kill")
      end)
    end)
    helper.wait_until(function() return locked end, 10, "the row lock")
    helper.write_file(gate, "")
    helper.wait_until(function()
      return helper.admin():one([[SELECT count(*) AS n FROM pg_stat_activity
        WHERE application_name = $1 AND wait_event_type = 'Lock']], app).n == 1
    end, 10, "the ack to wait for the lock")
    p:kill("KILL")
    assert.are.equal(137, p:wait(10))
    -- as when its host dies: its connections go too
    helper.admin():exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
      .. " WHERE application_name = $1", app)
    killed = true
    holder:join()
    local _, by_id = deliveries(db, qname, "s")
    assert.are.same({ "pending", 1 }, { by_id[id].state, by_id[id].deliveries })
    local seen = {}
    consume(q, "s", function(msg) seen[#seen + 1] = msg.deliveries end,
      { visibility_timeout = 1, poll_interval = 0.1 })
    helper.wait_until(function() return q:stats("s").acked == 1 end, 10, "the second ack")
    assert.are.same({ 2 }, seen)
  end)
end)

describe("pgcoord.queue's statements by token", function()
  after_each(cleanup)

  -- Statistics taken before a burst of publishes say a subscription has a
  -- row or two pending; the planner then hash-joined the batch's arrays
  -- against every pending row (a claim's acks read 42,513 entries of the
  -- pending index for 16 rows while a backlog grew, and the backlog grew
  -- the faster for it).  The batch's subscription and range of ids bound
  -- what any plan reads: with nested loops priced out, each scan of the
  -- deliveries has both as index conditions.
  it("read only their batch's range of ids, whichever join the planner picks", function()
    local sql = require("pgcoord.queue").sql
    local one = pool(1)
    local q = pgcoord.queue(one, helper.unique("q"))
    q:subscribe("s")
    local sid = one:one([[SELECT s.id, s.queue_id FROM pgcoord.queue_subscriptions s
      JOIN pgcoord.queues q ON q.id = s.queue_id WHERE q.name = $1]], q.name)
    local sids, ids, ns = sql.token_arrays(sid.id, { ids = { 5, 9, 7 }, ns = { 1, 2, 1 } })
    one:exec("SET enable_nestloop = off")
    local function plan_of(text, ...)
      local lines = {}
      for i, r in ipairs(one:query("EXPLAIN " .. text, ...)) do lines[i] = r["QUERY PLAN"] end
      return lines
    end
    local function check(name, lines)
      local plan = table.concat(lines, "\n")
      assert.is_nil(plan:find("Seq Scan", 1, true), name .. ":\n" .. plan)
      local scans = 0
      for i, line in ipairs(lines) do
        if line:find("Index Scan", 1, true) or line:find("Index Only Scan", 1, true) then
          scans = scans + 1
          local cond = lines[i + 1] or ""
          assert(cond:find("Index Cond:", 1, true) and cond:find("subscription_id =", 1, true)
            and cond:find("message_id >=", 1, true) and cond:find("message_id <=", 1, true),
            name .. ": a scan not bounded by the batch:\n" .. plan)
        end
      end
      assert(scans > 0, name .. ": no index scan:\n" .. plan)
    end
    check("ack", plan_of(sql.ack, sids, ids, ns))
    check("release", plan_of(sql.release, sids, ids, ns, "why", sid.queue_id))
    check("renew", plan_of(sql.renew, sids, ids, ns, 30))
    -- the claim's acks: its CTE, up to the claim's own
    local claim = plan_of(sql.claim, sid.id, 10, pgcoord.null, 30, sids, ids, ns, "{}", 0)
    local acked = {}
    for _, line in ipairs(claim) do
      if line:find("CTE picked", 1, true) then break end
      acked[#acked + 1] = line
    end
    check("claim's acks", acked)
  end)
end)

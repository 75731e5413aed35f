-- The transactional outbox and its relay, against the real server.
-- Busted runs in Lua's main thread, so waiting calls here drive the loop
-- (and with it the relays' tasks) themselves.  Every test has its own
-- tables; waits are for conditions, with deadlines.
local pgcoord = require "pgcoord"
local helper = require "helper"

local q = pgcoord.quote_ident
local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

local db
local relays = {}

local function relay(ob, fn, opts)
  local r = ob:relay(fn, opts)
  relays[#relays + 1] = r
  return r
end

-- A fresh outbox with its table.
local function new_outbox(opts, pool)
  opts = opts or {}
  opts.table = opts.table or helper.unique("outbox")
  local ob = pgcoord.outbox(pool or db, opts)
  assert.is_true(ob:migrate())
  return ob
end

local function count(ob, where, ...)
  return db:one(("SELECT count(*) AS n FROM %s%s"):format(ob.quoted,
    where and (" WHERE " .. where) or ""), ...).n
end

local function statuses(ob)
  local s = { pending = 0, processing = 0, processed = 0, failed = 0 }
  for _, r in ipairs(db:query(("SELECT status, count(*) AS n FROM %s GROUP BY status")
    :format(ob.quoted))) do
    s[r.status] = r.n
  end
  return s
end

local function server_now()
  return db:one("SELECT extract(epoch FROM now())::float8 AS t").t
end

local function messages(n, topic)
  local list = {}
  for i = 1, n do
    list[i] = { topic = topic or "orders", key = tostring(i), payload = { n = i } }
  end
  return list
end

local error_of = helper.error_of

-- A sink table: what a publisher "published" (duplicates show as extra rows).
local function new_sink()
  local name = helper.unique("sink")
  db:exec(("CREATE TABLE %s (id bigserial PRIMARY KEY, message_id text NOT NULL,"
    .. " amount integer NOT NULL)"):format(q(name)))
  return name
end

local lines

describe("outbox", function()
  setup(function()
    db = helper.connect({ size = 8 })
  end)

  teardown(function()
    db:close()
  end)

  before_each(function()
    lines = {}
    pgcoord.log.set_sink(function(line) lines[#lines + 1] = line end)
  end)

  after_each(function()
    for _, r in ipairs(relays) do r:stop() end
    relays = {}
    pgcoord.log.set_sink(nil)
    helper.cleanup()
  end)

  local function logged(text)
    for _, line in ipairs(lines) do
      if line:find(text, 1, true) then return line end
    end
    return nil
  end

  -- ---- the table ------------------------------------------------------------------

  describe("table", function()
    it("create_table_sql returns the DDL: quoted table, columns and the relay's indexes",
      function()
      local ob = pgcoord.outbox(db, { table = "My Outbox" })
      local sql = ob:create_table_sql()
      assert.matches('CREATE TABLE "My Outbox" (', sql, 1, true)
      for _, col in ipairs({ "id uuid", "topic text", "key text", "payload jsonb",
        "headers jsonb", "status text", "retries integer", "last_error text",
        "created_at timestamptz", "processed_at timestamptz" }) do
        assert.matches(col, sql, 1, true)
      end
      local _, indexes = sql:gsub("CREATE INDEX ", "")
      assert.are.equal(4, indexes)
      -- runs as is
      local name = helper.unique("ddl")
      db:tx(function(tx)
        for stmt in pgcoord.outbox(db, { table = name }):create_table_sql():gmatch("[^;]+;") do
          tx:exec(stmt)
        end
      end)
      assert.is_not_nil(db:one("SELECT to_regclass($1) AS r", q(name)).r)
    end)

    it("migrate creates the table once, then only looks it up", function()
      local name = helper.unique("outbox")
      local ob = pgcoord.outbox(db, { table = name })
      assert.is_true(ob:migrate())
      assert.is_false(ob:migrate())
      local cols = db:query("SELECT column_name FROM information_schema.columns"
        .. " WHERE table_name = $1 ORDER BY ordinal_position", name)
      local names = {}
      for _, c in ipairs(cols) do names[#names + 1] = c.column_name end
      for _, want in ipairs({ "id", "topic", "key", "payload", "headers", "status", "retries",
        "last_error", "created_at", "processed_at" }) do
        assert.is_truthy(table.concat(names, ","):find(want, 1, true), want)
      end
      assert.are.equal(4, db:one("SELECT count(*) AS n FROM pg_indexes WHERE tablename = $1"
        .. " AND indexdef LIKE '%WHERE%'", name).n)
    end)

    it("migrate on an up-to-date table touches nothing, even with it and the DDL lock held",
      function()
      local name = helper.unique("outbox")
      db:tx(function(tx)
        for stmt in pgcoord.outbox(db, { table = name }):create_table_sql():gmatch("[^;]+;") do
          tx:exec(stmt)
        end
      end)
      local held = false
      local gate = require("pgcoord.task").cond()
      local holder = pgcoord.spawn(function()
        db:tx(function(tx)
          tx:exec(("LOCK TABLE %s IN ACCESS EXCLUSIVE MODE"):format(q(name)))
          tx:query("SELECT pg_advisory_xact_lock($1)", 0x7067636f6f7264)
          held = true
          gate:wait(30)
        end)
      end)
      helper.wait_until(function() return held end, 10, "the locks to be held")
      -- lock_timeout makes a wait for either lock an error instead of a hang
      local pool = helper.connect({ size = 1, params = { options = "-c lock_timeout=2000" } })
      local ob = pgcoord.outbox(pool, { table = name })
      local ok, created = pcall(ob.migrate, ob)
      gate:signal()
      holder:join()
      pool:close()
      assert.is_true(ok, tostring(created))
      assert.is_false(created)
    end)

    it("migrate adds the failed messages' index to a table made before it", function()
      local name = helper.unique("outbox")
      local ob = pgcoord.outbox(db, { table = name })
      assert.is_true(ob:migrate())
      local function failed_index()
        return db:one([[SELECT count(*) AS n FROM pg_indexes WHERE tablename = $1
          AND indexdef LIKE '%(seq) WHERE (status = ''failed''::text)']], name).n
      end
      assert.are.equal(1, failed_index())
      local index = db:one([[SELECT indexname FROM pg_indexes WHERE tablename = $1
        AND indexdef LIKE '%''failed''%']], name).indexname
      db:exec(("DROP INDEX %s"):format(q(index)))
      assert.is_false(ob:migrate())
      assert.are.equal(1, failed_index())
      assert.is_false(ob:migrate())
      assert.are.equal(1, failed_index())
    end)

    it("takes its schema from the connection's search_path", function()
      local schema = helper.unique("schema")
      db:exec(("CREATE SCHEMA %s"):format(q(schema)))
      local pool = helper.connect({ size = 2,
        params = { options = "-c search_path=" .. schema } })
      local ob = pgcoord.outbox(pool, { table = "outbox_messages" })
      assert.is_true(ob:migrate())
      assert.is_not_nil(db:one("SELECT to_regclass($1) AS r",
        q(schema) .. ".outbox_messages").r)
      ob:save(nil, { topic = "t" })
      assert.are.equal(1, #ob:fetch_pending(10))
      pool:close()
    end)

    it("refuses bad options and table names with clear errors", function()
      local function refuses(opts, text)
        assert.matches(text, error_of(pgcoord.outbox, db, opts), 1, true)
      end
      refuses({ table = "" }, "option table must be a non-empty string")
      refuses({ table = 42 }, "option table must be a string")
      refuses({ table = ("x"):rep(64) }, "at most 63")
      refuses({ table = "public.outbox" }, "unqualified")
      refuses({ table = "a\0b" }, "NUL")
      refuses({ tabel = "x" }, 'unknown option "tabel"')
      refuses({ max_retries = -1 }, "max_retries must be an integer >= 0")
      refuses({ max_retries = 2.5 }, "max_retries must be an integer >= 0")
      refuses({ visibility_timeout = 0 }, "visibility_timeout must be a number > 0")
      refuses({ retry_delay = -1 }, "retry_delay must be a number >= 0")
      refuses({ notify = "yes" }, "notify must be a boolean")
      refuses({ channel = ("c"):rep(64) }, "channel must be a non-empty string")
      assert.matches("expected a pool", error_of(pgcoord.outbox, nil), 1, true)
      assert.matches("expected a pool", error_of(pgcoord.outbox, {}), 1, true)
    end)
  end)

  -- ---- saving ------------------------------------------------------------------------

  describe("save", function()
    it("writes in the caller's transaction: a rollback leaves no message", function()
      local ob = new_outbox()
      local ok, err = pcall(db.tx, db, function(tx)
        local id = ob:save(tx, { topic = "orders", payload = { n = 1 } })
        assert.matches(UUID, id)
        -- visible inside the transaction
        assert.are.equal(1, tx:one(("SELECT count(*) AS n FROM %s"):format(ob.quoted)).n)
        error("domain failure")
      end)
      assert.is_false(ok)
      assert.matches("domain failure", tostring(err), 1, true)
      assert.are.equal(0, count(ob))
      assert.are.same({}, ob:fetch_pending(10))
      -- and a commit keeps it, together with the domain change
      local domain = helper.unique("orders")
      db:exec(("CREATE TABLE %s (id integer)"):format(q(domain)))
      db:tx(function(tx)
        tx:exec(("INSERT INTO %s VALUES (1)"):format(q(domain)))
        ob:save(tx, { topic = "orders", payload = { n = 2 } })
      end)
      assert.are.equal(1, count(ob))
      assert.are.equal(1, db:one(("SELECT count(*) AS n FROM %s"):format(q(domain))).n)
    end)

    it("round-trips topic, key, payload and headers; ids are UUIDs in order", function()
      local ob = new_outbox()
      local a, b, c, d = ob:save(nil,
        { topic = "orders", key = "k1", payload = { id = 42, items = { "x", "y" }, ok = true },
          headers = { trace = "abc", ["content-type"] = "application/json" } },
        { topic = "orders", key = 7, payload = "just a string" },
        { topic = "audit" },
        { topic = "audit", payload = pgcoord.null, headers = {} })
      for _, id in ipairs({ a, b, c, d }) do assert.matches(UUID, id) end
      local batch = ob:fetch_pending(10)
      assert.are.equal(4, #batch)
      assert.are.same({ a, b, c, d }, { batch[1].id, batch[2].id, batch[3].id, batch[4].id })
      local m = batch[1]
      assert.are.equal("orders", m.topic)
      assert.are.equal("k1", m.key)
      assert.are.same({ id = 42, items = { "x", "y" }, ok = true }, m.payload)
      assert.are.equal(42, m.payload.id)
      assert.are.equal("integer", math.type(m.payload.id))
      assert.are.same({ trace = "abc", ["content-type"] = "application/json" }, m.headers)
      assert.are.equal(0, m.retries)
      assert.are.equal("number", type(m.created_at))
      assert.are.equal("7", batch[2].key)
      assert.are.equal("just a string", batch[2].payload)
      assert.is_nil(batch[3].key)
      assert.is_nil(batch[3].payload)
      assert.are.same({}, batch[3].headers)
      assert.is_nil(batch[4].payload)
      -- one message: one id
      assert.are.equal(1, select("#", ob:save(nil, { topic = "x" })))
    end)

    it("refuses invalid messages before anything is written", function()
      local ob = new_outbox()
      local good = { topic = "orders", payload = { n = 1 } }
      local cases = {
        { {}, "message 2: topic must be a non-empty string" },
        { { topic = "" }, "topic must be a non-empty string" },
        { { topic = 5 }, "topic must be a non-empty string" },
        { { topic = "t", payload = print }, "payload cannot be encoded as JSON" },
        { { topic = "t", payload = { f = print } }, "payload cannot be encoded as JSON" },
        { { topic = "t", payload = { bad = 0 / 0 } }, "payload cannot be encoded as JSON" },
        { { topic = "t", payload = "a\0b" }, "payload contains a NUL character" },
        { { topic = "t", payload = "\255\254" }, "not valid UTF-8" },
        { { topic = "t", headers = { n = 1 } }, "headers must map strings to strings" },
        { { topic = "t", headers = { "x" } }, "headers must map strings to strings" },
        { { topic = "t", headers = "a=b" }, "headers must be a table" },
        { { topic = "t", key = {} }, "key must be a string or an integer" },
        { { topic = "t", key = 1.5 }, "key must be a string or an integer" },
        { { topic = "t\0" }, "topic contains a NUL byte" },
        { { topic = "t", paylaod = 1 }, 'unknown field "paylaod"' },
        { "orders", "message 2 must be a table" },
      }
      local cyclic = {}
      cyclic.self = cyclic
      cases[#cases + 1] = { { topic = "t", payload = cyclic }, "payload cannot be encoded" }
      db:tx(function(tx)
        for _, case in ipairs(cases) do
          local err = error_of(ob.save, ob, tx, good, case[1])
          assert.matches(case[2], err, 1, true)
          assert.matches("ob:save", err, 1, true)
          -- no statement failed: the caller's transaction is still usable
          assert.are.equal(1, tx:one("SELECT 1 AS one").one)
        end
        assert.are.equal(0, tx:one(("SELECT count(*) AS n FROM %s"):format(ob.quoted)).n)
      end)
      assert.matches("no message given", error_of(ob.save, ob, nil), 1, true)
      assert.matches("expected a pool or a transaction", error_of(ob.save, ob, "tx", good), 1, true)
      assert.are.equal(0, count(ob))
    end)
  end)

  -- ---- claiming and marking ----------------------------------------------------------------

  describe("fetch_pending and marks", function()
    it("claims in creation order, marks processing, never hands a message out twice", function()
      local ob = new_outbox()
      local ids = { ob:save(nil, table.unpack(messages(5))) }
      local first = ob:fetch_pending(2)
      assert.are.same({ ids[1], ids[2] }, { first[1].id, first[2].id })
      local rest = ob:fetch_pending(10)
      assert.are.same({ ids[3], ids[4], ids[5] }, { rest[1].id, rest[2].id, rest[3].id })
      assert.are.same({}, ob:fetch_pending(10))
      assert.are.same({ pending = 0, processing = 5, processed = 0, failed = 0 }, statuses(ob))
      assert.matches("limit must be a positive integer", error_of(ob.fetch_pending, ob, 0),
        1, true)
    end)

    it("claims again, after the visibility timeout, what a dead relay left in processing",
      function()
      local ob = new_outbox({ visibility_timeout = 0.3 })
      local id = ob:save(nil, { topic = "t" })
      assert.are.equal(id, ob:fetch_pending(10)[1].id)
      -- the claim holds for now (the timeout is compared with the server's now())
      assert.are.same({}, ob:fetch_pending(10))
      local again = helper.wait_until(function()
        local batch = ob:fetch_pending(10)
        return #batch > 0 and batch
      end, 10, "the expired claim to be claimed again")
      assert.are.equal(id, again[1].id)
      assert.are.equal(0, again[1].retries)
      assert.are.equal(1, ob:mark_processed(id))
      assert.are.same({ pending = 0, processing = 0, processed = 1, failed = 0 }, statuses(ob))
    end)

    it("mark_failed counts retries, keeps the error, and fails after max_retries", function()
      local ob = new_outbox({ max_retries = 2, retry_delay = 0 })
      local id = ob:save(nil, { topic = "t" })
      for attempt = 1, 3 do
        local batch = ob:fetch_pending(10)
        assert.are.equal(1, #batch)
        assert.are.equal(attempt - 1, batch[1].retries)
        local status, retries = ob:mark_failed(id, "webhook said 503 (" .. attempt .. ")")
        assert.are.equal(attempt < 3 and "pending" or "failed", status)
        assert.are.equal(attempt, retries)
      end
      assert.are.same({}, ob:fetch_pending(10))
      local row = db:one(("SELECT status, retries, last_error FROM %s"):format(ob.quoted))
      assert.are.same({ status = "failed", retries = 3, last_error = "webhook said 503 (3)" }, row)
      -- a failed message is not marked again
      assert.is_nil(ob:mark_failed(id, "again"))
      assert.matches("not a message id", error_of(ob.mark_failed, ob, "nope", "x"), 1, true)
    end)

    it("waits a growing retry delay before handing a failed message out again", function()
      local ob = new_outbox({ retry_delay = 100, retry_delay_max = 150 })
      local id = ob:save(nil, { topic = "t" })
      ob:fetch_pending(1)
      assert.are.equal("pending", (ob:mark_failed(id, "x")))
      assert.are.same({}, ob:fetch_pending(10))
      local function delay()
        return db:one(("SELECT extract(epoch FROM visible_at - now())::float8 AS d FROM %s")
          :format(ob.quoted)).d
      end
      local d1 = delay()
      assert.is_true(d1 > 90 and d1 <= 100, tostring(d1))
      -- the second failure doubles it, up to retry_delay_max
      db:exec(("UPDATE %s SET status = 'processing'"):format(ob.quoted))
      ob:mark_failed(id, "y")
      local d2 = delay()
      assert.is_true(d2 > 140 and d2 <= 150, tostring(d2))
    end)

    it("the retry delay doubles per failure up to retry_delay_max, then stays there", function()
      local ob = new_outbox({ retry_delay = 10, retry_delay_max = 35, max_retries = 10 })
      local id = ob:save(nil, { topic = "t" })
      local delays = {}
      for i = 1, 5 do
        db:exec(("UPDATE %s SET status = 'processing'"):format(ob.quoted))
        assert.are.equal("pending", (ob:mark_failed(id, "x")))
        delays[i] = db:one(("SELECT extract(epoch FROM visible_at - now())::float8 AS d FROM %s")
          :format(ob.quoted)).d
      end
      for i, want in ipairs({ 10, 20, 35, 35, 35 }) do
        assert.is_true(delays[i] > want - 5 and delays[i] <= want,
          ("failure %d: %s, not %d"):format(i, tostring(delays[i]), want))
      end
    end)

    it("mark_processed takes ids or a list and checks them", function()
      local ob = new_outbox()
      local a, b, c = ob:save(nil, table.unpack(messages(3)))
      ob:fetch_pending(10)
      assert.are.equal(2, ob:mark_processed(a, b))
      assert.are.equal(1, ob:mark_processed({ c }))
      assert.are.equal(0, ob:mark_processed({ a, b, c })) -- already processed
      assert.are.equal(0, ob:mark_processed({}))
      assert.matches("id 2 is not a message id", error_of(ob.mark_processed, ob, a, 42), 1, true)
      assert.are.equal(3, count(ob, "status = 'processed' AND processed_at IS NOT NULL"))
    end)

    it("delete_processed_before deletes processed messages only, by processed_at", function()
      local ob = new_outbox({ max_retries = 0 })
      local old, recent, failed, pending = ob:save(nil, table.unpack(messages(4)))
      ob:fetch_pending(3)
      ob:mark_processed(old, recent)
      assert.are.equal("failed", (ob:mark_failed(failed, "gone")))
      db:exec(("UPDATE %s SET processed_at = now() - interval '1 hour', created_at = now()"
        .. " - interval '2 hours' WHERE id = $1"):format(ob.quoted), old)
      db:exec(("UPDATE %s SET created_at = now() - interval '2 hours' WHERE id IN ($1, $2)")
        :format(ob.quoted), failed, pending)
      assert.are.equal(1, ob:delete_processed_before(server_now() - 60))
      assert.are.equal(0, count(ob, "id = $1", old))
      assert.are.equal(1, ob:delete_processed_before(server_now() + 60))
      assert.are.same({ pending = 1, processing = 0, processed = 0, failed = 1 }, statuses(ob))
      assert.matches("epoch seconds", error_of(ob.delete_processed_before, ob, "yesterday"),
        1, true)
    end)
  end)

  -- ---- the relay ---------------------------------------------------------------------------

  describe("relay", function()
    it("publishes pending messages and is woken by the NOTIFY a save sends", function()
      local ob = new_outbox()
      local got = {}
      local r = relay(ob, function(msg)
        pgcoord.sleep(0) -- publish_fn may yield
        got[#got + 1] = msg
      end, { poll_interval = 60 })
      local first = ob:save(nil, { topic = "t", payload = { n = 1 } })
      helper.wait_until(function() return #got == 1 end, 10, "the first message")
      assert.are.equal(first, got[1].id)
      helper.wait_until(function() return r:stats().listening end, 10, "the relay to listen")
      -- polls are 60 s apart: only the notification can bring this one in time
      local second
      db:tx(function(tx) second = ob:save(tx, { topic = "t", payload = { n = 2 } }) end)
      helper.wait_until(function() return #got == 2 end, 10, "the second message")
      assert.are.equal(second, got[2].id)
      assert.are.same({ n = 2 }, got[2].payload)
      helper.wait_until(function() return count(ob, "status = 'processed'") == 2 end, 10,
        "both messages processed")
      assert.are.equal(2, r:stats().published)
    end)

    it("polls every poll_interval when told not to listen", function()
      local ob = new_outbox({ notify = false })
      local got = 0
      local r = relay(ob, function() got = got + 1 end, { poll_interval = 0.05 })
      ob:save(nil, table.unpack(messages(3)))
      helper.wait_until(function() return count(ob, "status = 'processed'") == 3 end, 10,
        "the messages processed")
      assert.are.equal(3, got)
      assert.is_false(r:stats().listening)
    end)

    it("retries what fails (an error or false) and gives up after max_retries", function()
      local ob = new_outbox({ max_retries = 2, retry_delay = 0 })
      local attempts = {}
      relay(ob, function(msg)
        attempts[msg.topic] = (attempts[msg.topic] or 0) + 1
        if msg.topic == "raises" then error("broker unreachable") end
        if msg.topic == "refuses" then return false, "rejected by broker" end
        if msg.topic == "silent" then return false end
        return true
      end, { poll_interval = 0.05, batch_size = 2 })
      local raises, refuses, silent, fine = ob:save(nil, { topic = "raises" },
        { topic = "refuses" }, { topic = "silent" }, { topic = "fine" })
      helper.wait_until(function() return count(ob, "status = 'failed'") == 3 end, 20,
        "three messages failed")
      local function row(id)
        return db:one(("SELECT status, retries, last_error FROM %s WHERE id = $1")
          :format(ob.quoted), id)
      end
      local r1 = row(raises)
      assert.are.equal(3, r1.retries)
      assert.matches("broker unreachable", r1.last_error, 1, true)
      assert.are.same({ status = "failed", retries = 3, last_error = "rejected by broker" },
        row(refuses))
      assert.are.same({ status = "failed", retries = 3, last_error = "publish_fn returned false" },
        row(silent))
      assert.are.equal("processed", row(fine).status)
      assert.are.same({ raises = 3, refuses = 3, silent = 3, fine = 1 }, attempts)
      assert.is_truthy(logged("outbox publish failed, will retry"))
      local final = logged("failed for good")
      assert.is_truthy(final)
      assert.matches("level=error", final, 1, true)
      -- the one that raised: its error's first line, the traceback only at debug
      assert.matches('error="spec/outbox_spec.lua:%d+: broker unreachable"',
        logged("broker unreachable"))
      assert.is_nil(logged("stack traceback"))
    end)

    it("deletes processed messages older than retention every cleanup_interval", function()
      local ob = new_outbox()
      local r = relay(ob, function() return true end,
        { poll_interval = 0.05, retention = 3600, cleanup_interval = 0.05 })
      local ids = { ob:save(nil, table.unpack(messages(4))) }
      helper.wait_until(function() return count(ob, "status = 'processed'") == 4 end, 10,
        "the messages processed")
      local pending = ob:save(nil, { topic = "later" })
      db:exec(("UPDATE %s SET created_at = now() - interval '1 day' WHERE id = $1")
        :format(ob.quoted), pending)
      -- two of them processed two hours ago: past the retention
      db:exec(("UPDATE %s SET processed_at = now() - interval '2 hours' WHERE id IN ($1, $2)")
        :format(ob.quoted), ids[1], ids[2])
      helper.wait_until(function() return count(ob) == 3 end, 10, "the cleanup")
      assert.are.equal(0, count(ob, "id IN ($1, $2)", ids[1], ids[2]))
      assert.are.equal(1, count(ob, "id = $1", pending)) -- whatever its age, until processed
      helper.wait_until(function() return r:stats().cleaned == 2 end, 10, "the stats")
      assert.is_truthy(logged("retention cleanup"))
    end)

    it("a non-positive retention disables the cleanup and says so", function()
      local ob = new_outbox()
      local relays_made = { relay(ob, function() return true end, { retention = 0 }),
                            relay(ob, function() return true end, { retention = -5 }) }
      local line = logged("retention cleanup disabled")
      assert.is_truthy(line)
      assert.matches(ob.name, line, 1, true)
      for _, r in ipairs(relays_made) do
        -- no cleanup task was started, so nothing can ever be purged
        assert.is_nil(r.cleanup.task)
        assert.is_false(r.cleanup:running())
        assert.are.equal(0, r:stats().cleaned)
      end
    end)

    it("two relays on 5,000 messages publish each exactly once", function()
      local N = 5000
      local name = helper.unique("outbox")
      local pools = { (helper.connect({ size = 3 })), (helper.connect({ size = 3 })) }
      local obs = { pgcoord.outbox(pools[1], { table = name }),
                    pgcoord.outbox(pools[2], { table = name }) }
      obs[1]:migrate()
      local list = messages(N)
      for i = 1, N, 1000 do obs[1]:save(nil, table.unpack(list, i, i + 999)) end
      assert.are.equal(N, count(obs[1], "status = 'pending'"))
      local seen, by, started = {}, { 0, 0 }, {}
      local function publisher(k)
        return function(msg)
          if not started[k] then
            -- each relay holds its first batch until the other has one too
            started[k] = true
            helper.wait_until(function() return started[1] and started[2] end, 30,
              "both relays to hold a batch")
          end
          seen[msg.id] = (seen[msg.id] or 0) + 1
          by[k] = by[k] + 1
          if by[k] % 25 == 0 then pgcoord.sleep(0) end
          return true
        end
      end
      local r1 = relay(obs[1], publisher(1), { batch_size = 100, poll_interval = 0.05 })
      local r2 = relay(obs[2], publisher(2), { batch_size = 100, poll_interval = 0.05,
                                               listen = false })
      helper.wait_until(function() return count(obs[1], "status = 'processed'") == N end, 120,
        "all messages processed")
      r1:stop()
      r2:stop()
      local distinct, twice = 0, 0
      for _, n in pairs(seen) do
        distinct = distinct + 1
        if n > 1 then twice = twice + 1 end
      end
      assert.are.equal(N, distinct)
      assert.are.equal(0, twice)
      assert.are.equal(N, by[1] + by[2])
      assert.is_true(by[1] > 0 and by[2] > 0)
      assert.are.equal(N, r1:stats().published + r2:stats().published)
      assert.are.equal(0, r1:stats().failed + r2:stats().failed)
      for _, p in ipairs(pools) do p:close() end
    end)

    it("a batch that outlasts the visibility timeout keeps its claim", function()
      -- 20 messages at 0.1 s each take 2 s; the claim is for 1 s at a time
      local ob = new_outbox({ visibility_timeout = 1 })
      ob:save(nil, table.unpack(messages(20)))
      local seen, holding = {}, false
      local slow = relay(ob, function(msg)
        holding = true
        seen[msg.id] = (seen[msg.id] or 0) + 1
        pgcoord.sleep(0.1) -- a slow broker
      end, { batch_size = 20, poll_interval = 0.05 })
      helper.wait_until(function() return holding end, 10, "the slow relay to hold its batch")
      -- a second relay keeps polling for claims that expired
      local stolen = 0
      relay(pgcoord.outbox(db, { table = ob.name }), function(msg)
        stolen = stolen + 1
        seen[msg.id] = (seen[msg.id] or 0) + 1
      end, { poll_interval = 0.05, listen = false })
      helper.wait_until(function() return count(ob, "status = 'processed'") == 20 end, 30,
        "the batch processed")
      assert.are.equal(0, stolen)
      for _, n in pairs(seen) do assert.are.equal(1, n) end
      assert.are.equal(20, slow:stats().published)
    end)

    it("stop finishes the batch in hand, then returns", function()
      local ob = new_outbox()
      ob:save(nil, table.unpack(messages(25)))
      local gate = require("pgcoord.task").cond()
      local published, holding = 0, false
      local r = relay(ob, function(msg)
        if msg.key == "3" then
          holding = true
          gate:wait(30)
        end
        published = published + 1
      end, { batch_size = 10, poll_interval = 0.05 })
      helper.wait_until(function() return holding end, 10, "the relay to hold message 3")
      local stopper = pgcoord.spawn(function() r:stop() end)
      helper.wait_until(function() return not r:running() end, 10, "stop to begin")
      assert.are.equal("running", r.task:status())
      gate:signal()
      stopper:join()
      assert.are.equal(10, published)
      assert.are.same({ pending = 15, processing = 0, processed = 10, failed = 0 }, statuses(ob))
      assert.are.equal("done", r.task:status())
    end)

    it("SIGTERM (pgcoord.stop) lets a pgcoord-run relay finish its batch and exit", function()
      local ob = new_outbox()
      local sink = new_sink()
      local list = messages(120)
      for i, m in ipairs(list) do m.payload = { amount = i } end
      ob:save(nil, table.unpack(list))
      local script = helper.write_file(helper.tmpname("relay") .. ".lua", [[
        local pgcoord = require "pgcoord"
        local tbl, sink, stall_at = ...
        stall_at = tonumber(stall_at)
        local db = pgcoord.connect(nil, { size = 3 })
        local ob = pgcoord.outbox(db, { table = tbl, visibility_timeout = 2 })
        local insert = "INSERT INTO " .. pgcoord.quote_ident(sink)
          .. " (message_id, amount) VALUES ($1, $2)"
        local n = 0
        ob:relay(function(msg)
          db:exec(insert, msg.id, msg.payload.amount)
          n = n + 1
          if n == stall_at then
            io.stdout:write("stalled\n")
            io.stdout:flush()
            while not pgcoord.stopping() do pgcoord.sleep(0.01) end
          end
        end, { batch_size = 50, poll_interval = 0.2 })
      ]])
      local p = helper.start({ "pgcoord-run", script, ob.name, sink, "75" })
      p:wait_output("stalled", 30)
      assert.is_true(p:kill("TERM"))
      assert.are.equal(0, p:wait(30), p:output())
      -- the second batch (51..100) was finished; nothing after it was taken
      assert.are.same({ pending = 20, processing = 0, processed = 100, failed = 0 }, statuses(ob))
      assert.are.equal(100, db:one(("SELECT count(DISTINCT message_id) AS n FROM %s")
        :format(q(sink))).n)
      assert.matches("outbox relay stopped", p:output(), 1, true)
    end)

    it("SIGKILL mid-batch, then a second relay: every message published at least once,"
      .. " and a consumer using the processed store applies each exactly once", function()
      local N, STALL = 200, 75
      local ob = new_outbox()
      local sink = new_sink()
      local list = messages(N)
      for i, m in ipairs(list) do m.payload = { amount = i } end
      ob:save(nil, table.unpack(list))
      local script = helper.write_file(helper.tmpname("relay") .. ".lua", [[
        local pgcoord = require "pgcoord"
        local tbl, sink, stall_at = ...
        stall_at = tonumber(stall_at)
        local db = pgcoord.connect(nil, { size = 3 })
        local ob = pgcoord.outbox(db, { table = tbl, visibility_timeout = 2 })
        local insert = "INSERT INTO " .. pgcoord.quote_ident(sink)
          .. " (message_id, amount) VALUES ($1, $2)"
        local n = 0
        ob:relay(function(msg)
          db:exec(insert, msg.id, msg.payload.amount)
          n = n + 1
          if n == stall_at then
            io.stdout:write("stalled\n")
            io.stdout:flush()
            pgcoord.sleep(3600)
          end
        end, { batch_size = 50, poll_interval = 0.2 })
      ]])
      local p = helper.start({ "pgcoord-run", script, ob.name, sink, tostring(STALL) })
      p:wait_output("stalled", 30)
      assert.is_true(p:kill("KILL"))
      assert.are.equal(137, p:wait(30))
      local before = statuses(ob)
      assert.is_true(before.processing > 0, "the killed relay left messages in processing")
      assert.are.equal(STALL, db:one(("SELECT count(*) AS n FROM %s"):format(q(sink))).n)

      -- a second relay claims the stranded batch once its visibility timeout passes
      local insert = ("INSERT INTO %s (message_id, amount) VALUES ($1, $2)"):format(q(sink))
      relay(pgcoord.outbox(db, { table = ob.name }), function(msg)
        db:exec(insert, msg.id, msg.payload.amount)
      end, { batch_size = 50, poll_interval = 0.1 })
      helper.wait_until(function() return count(ob, "status = 'processed'") == N end, 60,
        "every message processed")
      local s = db:one(("SELECT count(*) AS total, count(DISTINCT message_id) AS distinct_ids"
        .. " FROM %s"):format(q(sink)))
      assert.are.equal(N, s.distinct_ids)         -- every message at least once
      assert.is_true(s.total > N, "the killed batch was published again") -- so, duplicates

      -- the consumer: each delivery applied in a transaction that marks it first;
      -- every delivery is made twice, by four concurrent workers
      local done = pgcoord.processed(db, { table = helper.unique("processed") })
      done:migrate()
      local applied, ledger = helper.unique("applied"), helper.unique("ledger")
      db:exec(("CREATE TABLE %s (message_id text NOT NULL, amount integer NOT NULL)")
        :format(q(applied)))
      db:exec(("CREATE TABLE %s (balance bigint NOT NULL)"):format(q(ledger)))
      db:exec(("INSERT INTO %s VALUES (0)"):format(q(ledger)))
      local deliveries = db:query(("SELECT message_id, amount FROM %s ORDER BY id")
        :format(q(sink)))
      local total = #deliveries
      for i = 1, total do deliveries[total + i] = deliveries[i] end
      local skipped = 0
      local workers = {}
      for w = 1, 4 do
        workers[w] = pgcoord.spawn(function()
          for i = w, #deliveries, 4 do
            local d = deliveries[i]
            db:tx(function(tx)
              if not done:mark(tx, "ledger", d.message_id, { amount = d.amount }) then
                skipped = skipped + 1
                return
              end
              tx:exec(("INSERT INTO %s VALUES ($1, $2)"):format(q(applied)), d.message_id,
                d.amount)
              tx:exec(("UPDATE %s SET balance = balance + $1"):format(q(ledger)), d.amount)
            end)
          end
        end)
      end
      for _, w in ipairs(workers) do w:join() end
      local a = db:one(("SELECT count(*) AS total, count(DISTINCT message_id) AS distinct_ids"
        .. " FROM %s"):format(q(applied)))
      assert.are.equal(N, a.total)
      assert.are.equal(N, a.distinct_ids)
      assert.are.equal(N * (N + 1) // 2, db:one(("SELECT balance FROM %s"):format(q(ledger)))
        .balance)
      assert.are.equal(#deliveries - N, skipped)
      assert.are.equal(N, db:one(("SELECT count(*) AS n FROM %s"):format(done.quoted)).n)
    end)

    it("refuses bad arguments", function()
      local ob = new_outbox()
      assert.matches("publish_fn must be a function", error_of(ob.relay, ob, nil), 1, true)
      local fn = function() end
      assert.matches('unknown option "batch"', error_of(ob.relay, ob, fn, { batch = 1 }), 1, true)
      assert.matches("batch_size must be an integer >= 1",
        error_of(ob.relay, ob, fn, { batch_size = 0 }), 1, true)
      assert.matches("poll_interval must be a number > 0",
        error_of(ob.relay, ob, fn, { poll_interval = 0 }), 1, true)
      assert.matches("subscriber must be a subscriber",
        error_of(ob.relay, ob, fn, { subscriber = {} }), 1, true)
    end)
  end)

  -- ---- custom table names ----------------------------------------------------------------

  describe("custom table names", function()
    local names = { "Out Box", 'out"box', "MixedCase", "select", "ünïcode outbox" }
    for _, base in ipairs(names) do
      it(("work end to end, quoted: %q"):format(base), function()
        local name = (base .. " " .. helper.unique("x")):sub(1, 63)
        local ob = pgcoord.outbox(db, { table = name, retry_delay = 0, max_retries = 0 })
        assert.is_true(ob:migrate())
        assert.is_false(ob:migrate())
        assert.are.equal(1, db:one("SELECT count(*) AS n FROM pg_class WHERE relname = $1"
          .. " AND relkind = 'r'", name).n)
        local got = {}
        local r = relay(ob, function(msg)
          got[#got + 1] = msg.topic
          return msg.topic ~= "bad"
        end, { poll_interval = 0.05, retention = 3600, cleanup_interval = 0.05 })
        db:tx(function(tx) ob:save(tx, { topic = "good" }, { topic = "bad" }) end)
        helper.wait_until(function() return #got == 2 end, 10, "both messages published")
        helper.wait_until(function() return count(ob, "status <> 'processing'") == 2 end, 10,
          "both messages marked")
        assert.are.same({ pending = 0, processing = 0, processed = 1, failed = 1 },
          statuses(ob))
        db:exec(("UPDATE %s SET processed_at = now() - interval '2 hours'"
          .. " WHERE status = 'processed'"):format(ob.quoted))
        helper.wait_until(function() return count(ob) == 1 end, 10, "the cleanup")
        r:stop()
        assert.are.equal(0, ob:delete_processed_before(server_now() + 60))
      end)
    end

    it("a 63-byte name works and a 64-byte one is refused", function()
      local name = (helper.unique("n") .. ("x"):rep(63)):sub(1, 63)
      local ob = pgcoord.outbox(db, { table = name })
      assert.is_true(ob:migrate())
      ob:save(nil, { topic = "t" })
      assert.are.equal(1, #ob:fetch_pending(5))
      assert.matches("at most 63", error_of(pgcoord.outbox, db, { table = name .. "y" }), 1, true)
    end)
  end)

  -- ---- ready-made publishers -----------------------------------------------------------------

  describe("ready-made publishers", function()
    it("notify_publisher sends each message to the NOTIFY channel named by its topic",
      function()
      local ob = new_outbox()
      local topic = helper.unique("orders")
      local sub = pgcoord.subscriber(db)
      local fan = sub:add(pgcoord.fanout(topic))
      local l = fan:listen()
      sub:start()
      helper.wait_until(function() return sub:connected() end, 10, "the subscriber")
      relay(ob, ob:notify_publisher(), { poll_interval = 0.05 })
      local a, b = ob:save(nil, { topic = topic, key = "k", payload = { n = 1 },
                                  headers = { h = "v" } },
                                { topic = topic, payload = { n = 2 } })
      local m1 = assert(l:receive(10))
      local m2 = assert(l:receive(10))
      sub:stop()
      assert.are.equal(a, m1.id)
      assert.are.equal(topic, m1.topic)
      assert.are.equal("k", m1.key)
      assert.are.same({ n = 1 }, m1.payload)
      assert.are.same({ h = "v" }, m1.headers)
      assert.are.equal(b, m2.id)
      assert.are.same({ n = 2 }, m2.payload)
      helper.wait_until(function() return count(ob, "status = 'processed'") == 2 end, 10,
        "both processed")
    end)

    it("notify_publisher: a payload over NOTIFY's limit fails the message with the reason",
      function()
      local ob = new_outbox({ max_retries = 0 })
      relay(ob, ob:notify_publisher({ prefix = "big_" }), { poll_interval = 0.05 })
      local id = ob:save(nil, { topic = "t", payload = ("x"):rep(9000) })
      helper.wait_until(function() return count(ob, "status = 'failed'") == 1 end, 10,
        "the message to fail")
      local row = db:one(("SELECT last_error FROM %s WHERE id = $1"):format(ob.quoted), id)
      assert.matches("8000", row.last_error, 1, true)
      assert.matches("big_t", row.last_error, 1, true)
    end)

    it("queue_publisher publishes each message to the pgcoord queue named by its topic",
      function()
      pgcoord.migrate(db) -- the queue's tables
      local ob = new_outbox()
      local topic = helper.unique("events")
      local queue = pgcoord.queue(db, topic)
      queue:subscribe("billing")
      relay(ob, ob:queue_publisher(), { poll_interval = 0.05 })
      local a, b = ob:save(nil, { topic = topic, key = "k", payload = { n = 1 },
                                  headers = { h = "v" } },
                                { topic = topic, payload = { n = 2 } })
      local got = {}
      local consumer = queue:consume("billing", function(msg)
        got[#got + 1] = msg.payload
      end, { poll_interval = 0.05 })
      helper.wait_until(function() return #got == 2 end, 20, "both messages from the queue")
      consumer:stop()
      table.sort(got, function(x, y) return x.payload.n < y.payload.n end)
      assert.are.equal(a, got[1].id)
      assert.are.equal(topic, got[1].topic)
      assert.are.equal("k", got[1].key)
      assert.are.same({ n = 1 }, got[1].payload)
      assert.are.same({ h = "v" }, got[1].headers)
      assert.are.equal(b, got[2].id)
      helper.wait_until(function() return count(ob, "status = 'processed'") == 2 end, 10,
        "both processed")
    end)

    it("refuse bad options", function()
      local ob = new_outbox()
      assert.matches('unknown option "x"', error_of(ob.notify_publisher, ob, { x = 1 }), 1, true)
      assert.matches("prefix must be a string",
        error_of(ob.notify_publisher, ob, { prefix = 1 }), 1, true)
    end)
  end)

  -- ---- errors and services -------------------------------------------------------------

  describe("errors and services", function()
    -- fn marks the line to blame with here()
    local here, raises_here = helper.here, helper.raises_here

    it("every option error names the function, the option and the value at the caller's line",
      function()
      local ob = new_outbox()
      local fn = function() end
      raises_here('unknown option "tabel" for pgcoord.outbox',
        function() here(); pgcoord.outbox(db, { tabel = "x" }) end)
      raises_here("pgcoord.outbox: option max_retries must be an integer >= 0 and"
        .. " <= 2147483647, got 2.5",
        function() here(); pgcoord.outbox(db, { max_retries = 2.5 }) end)
      raises_here('pgcoord.outbox: option table contains a dot',
        function() here(); pgcoord.outbox(db, { table = "a.b" }) end)
      raises_here("pgcoord.outbox: expected a pool from pgcoord.connect, got nil",
        function() here(); pgcoord.outbox(nil) end)
      raises_here('unknown option "batch" for ob:relay',
        function() here(); ob:relay(fn, { batch = 1 }) end)
      raises_here("ob:relay: option poll_interval must be a number > 0, got 0",
        function() here(); ob:relay(fn, { poll_interval = 0 }) end)
      raises_here("ob:relay: publish_fn must be a function, got nil",
        function() here(); ob:relay(nil) end)
      raises_here('unknown option "x" for ob:notify_publisher',
        function() here(); ob:notify_publisher({ x = 1 }) end)
      raises_here('unknown option "x" for ob:queue_publisher',
        function() here(); ob:queue_publisher({ x = 1 }) end)
      raises_here("ob:queue_publisher: option queue_options must be a table, got 1",
        function() here(); ob:queue_publisher({ queue_options = 1 }) end)
      raises_here("ob:queue_publisher: option db must be a pool or a transaction",
        function() here(); ob:queue_publisher({ db = "x" }) end)
    end)

    it("argument errors point at the caller's line too", function()
      local ob = new_outbox()
      raises_here("ob:save: message 1: payload cannot be encoded as JSON",
        function() here(); ob:save(nil, { topic = "t", payload = print }) end)
      raises_here("ob:save: message 2: headers must map strings to strings",
        function() here(); ob:save(nil, { topic = "t" }, { topic = "t", headers = { 1 } }) end)
      raises_here('ob:save: message 1: header "h" contains a NUL byte',
        function() here(); ob:save(nil, { topic = "t", headers = { h = "a\0" } }) end)
      raises_here("ob:save: expected a pool or a transaction, got string",
        function() here(); ob:save("tx", { topic = "t" }) end)
      raises_here("ob:fetch_pending: limit must be a positive integer",
        function() here(); ob:fetch_pending(0) end)
      raises_here("ob:mark_processed: id 1 is not a message id",
        function() here(); ob:mark_processed("nope") end)
      raises_here("ob:delete_processed_before: time must be epoch seconds",
        function() here(); ob:delete_processed_before("yesterday") end)
      local r = relay(ob, function() end, { listen = false })
      raises_here("relay:stop: timeout must be a number of seconds > 0, got -1",
        function() here(); r:stop(-1) end)
      assert.are.equal(0, count(ob))
    end)

    it("a poke that comes while the relay is busy is kept: it looks again at once", function()
      local ob = new_outbox({ notify = false })
      local gate = require("pgcoord.task").cond()
      local got, holding = {}, false
      local r = relay(ob, function(msg)
        if msg.key == "first" then
          holding = true
          gate:wait(30)
        end
        got[#got + 1] = msg.key
      end, { poll_interval = 60 })
      ob:save(nil, { topic = "t", key = "first" })
      r:poke()
      helper.wait_until(function() return holding end, 10, "the relay to hold the first")
      ob:save(nil, { topic = "t", key = "second" })
      r:poke() -- nobody waits for it now
      gate:signal()
      -- polls are 60 s apart: only the kept poke brings the second in time
      helper.wait_until(function() return #got == 2 end, 10, "the second message")
      assert.are.same({ "first", "second" }, got)
    end)

    it("stop(timeout) cancels a batch that outlasts it; its messages are claimed again",
      function()
      local ob = new_outbox({ visibility_timeout = 0.5 })
      local holding = false
      local r = relay(ob, function()
        holding = true
        pgcoord.sleep(3600) -- a broker that never answers
      end, { poll_interval = 0.05 })
      local id = ob:save(nil, { topic = "t" })
      helper.wait_until(function() return holding end, 10, "the relay to hold the message")
      local took, finished = helper.timed(r.stop, r, 0.2)
      assert.is_false(finished)
      assert.is_true(took < 5, tostring(took))
      assert.are_not.equal("running", r.task:status())
      assert.is_false(r:running())
      assert.is_truthy(logged("outbox relay stopped"))
      assert.are.same({ pending = 0, processing = 1, processed = 0, failed = 0 }, statuses(ob))
      local again = helper.wait_until(function()
        local batch = ob:fetch_pending(10)
        return #batch > 0 and batch
      end, 10, "the message claimed again")
      assert.are.equal(id, again[1].id)
    end)

    it("a stopped relay keeps nothing alive: its stop handlers are unregistered", function()
      local gone = setmetatable({}, { __mode = "k" })
      -- in a function of its own, so that no register of this one holds them
      local function run_and_stop(opts)
        local ob = new_outbox()
        local r = ob:relay(function() end, opts)
        ob:save(nil, { topic = "t" })
        helper.wait_until(function() return r:stats().published == 1 end, 10, "the message")
        r:stop()
        gone[r], gone[r.cleanup] = true, true
      end
      run_and_stop({ poll_interval = 0.05, retention = 3600, cleanup_interval = 60 })
      run_and_stop({ poll_interval = 0.05, listen = false })
      collectgarbage()
      collectgarbage()
      assert.is_nil(next(gone))
    end)

    it("past --stop-timeout a relay stuck in publish_fn is cancelled, the process exits 1,"
      .. " and its batch is claimed again", function()
      local ob = new_outbox({ visibility_timeout = 1 })
      ob:save(nil, table.unpack(messages(3)))
      local script = helper.write_file(helper.tmpname("relay") .. ".lua", [[
        local pgcoord = require "pgcoord"
        local db = pgcoord.connect(nil, { size = 2 })
        local ob = pgcoord.outbox(db, { table = ..., visibility_timeout = 1 })
        ob:relay(function()
          io.stdout:write("stuck\n")
          io.stdout:flush()
          pgcoord.sleep(3600) -- never looks at pgcoord.stopping()
        end, { poll_interval = 0.05 })
      ]])
      local p = helper.start({ "pgcoord-run", "--stop-timeout", "0.5", script, ob.name })
      p:wait_output("stuck", 30)
      assert.is_true(p:kill("TERM"))
      assert.are.equal(1, p:wait(30), p:output())
      assert.matches("stop deadline passed", p:output(), 1, true)
      local published = 0
      relay(pgcoord.outbox(db, { table = ob.name }), function() published = published + 1 end,
        { poll_interval = 0.05, listen = false })
      helper.wait_until(function() return count(ob, "status = 'processed'") == 3 end, 20,
        "the batch published by another relay")
      assert.are.equal(3, published)
    end)
  end)
end)

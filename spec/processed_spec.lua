-- The processed-messages store, against the real server: marks that are
-- new once, in the caller's transaction, under concurrency; purging and
-- the retention cleanup; custom table names.
local pgcoord = require "pgcoord"
local helper = require "helper"

local q = pgcoord.quote_ident

local db

local function new_store(name)
  local done = pgcoord.processed(db, { table = name or helper.unique("processed") })
  assert.is_true(done:migrate())
  return done
end

local function count(done, where, ...)
  return db:one(("SELECT count(*) AS n FROM %s%s"):format(done.quoted,
    where and (" WHERE " .. where) or ""), ...).n
end

local error_of = helper.error_of

local function server_now()
  return db:one("SELECT extract(epoch FROM now())::float8 AS t").t
end

local lines

describe("processed-messages store", function()
  setup(function()
    db = helper.connect({ size = 12 })
  end)

  teardown(function()
    db:close()
  end)

  before_each(function()
    lines = {}
    pgcoord.log.set_sink(function(line) lines[#lines + 1] = line end)
  end)

  after_each(function()
    pgcoord.log.set_sink(nil)
    helper.cleanup()
  end)

  local function logged(text)
    for _, line in ipairs(lines) do
      if line:find(text, 1, true) then return line end
    end
    return nil
  end

  describe("table", function()
    it("create_table_sql returns the DDL; migrate creates it once", function()
      local name = helper.unique("processed")
      local done = pgcoord.processed(db, { table = name })
      local sql = done:create_table_sql()
      assert.matches(("CREATE TABLE %s ("):format(q(name)), sql, 1, true)
      assert.matches("PRIMARY KEY (consumer_group, message_id)", sql, 1, true)
      assert.matches("metadata jsonb", sql, 1, true)
      assert.matches("processed_at timestamptz", sql, 1, true)
      assert.is_true(done:migrate())
      assert.is_false(done:migrate())
      assert.are.equal(2, db:one("SELECT count(*) AS n FROM pg_indexes WHERE tablename = $1",
        name).n)
      -- the default name
      assert.matches('CREATE TABLE "processed_messages" (',
        pgcoord.processed(db):create_table_sql(), 1, true)
    end)

    it("migrate leaves an existing table alone", function()
      local name = helper.unique("processed")
      db:exec(("CREATE TABLE %s (x integer)"):format(q(name)))
      assert.is_false(pgcoord.processed(db, { table = name }):migrate())
      assert.are.equal(1, db:one("SELECT count(*) AS n FROM information_schema.columns"
        .. " WHERE table_name = $1", name).n)
    end)

    for _, base in ipairs({ "Pro Cessed", 'pro"cessed', "Group", "order" }) do
      it(("works with a table name that needs quoting: %q"):format(base), function()
        local name = (base .. " " .. helper.unique("x")):sub(1, 63)
        local done = new_store(name)
        assert.are.equal(1, db:one("SELECT count(*) AS n FROM pg_class WHERE relname = $1",
          name).n)
        assert.is_true(done:mark(nil, "g", "m1"))
        assert.is_false(done:mark(nil, "g", "m1"))
        assert.is_true(done:is_processed(db, "g", "m1"))
        assert.are.equal(1, done:purge_before(server_now() + 60))
        local h = done:start_cleanup({ retention = 3600, interval = 0.05 })
        done:mark(nil, "g", "m2")
        db:exec(("UPDATE %s SET processed_at = now() - interval '2 hours'"):format(done.quoted))
        helper.wait_until(function() return count(done) == 0 end, 10, "the cleanup")
        h:stop()
      end)
    end

    it("refuses bad options", function()
      assert.matches("at most 63", error_of(pgcoord.processed, db, { table = ("x"):rep(64) }),
        1, true)
      assert.matches("unqualified", error_of(pgcoord.processed, db, { table = "a.b" }), 1, true)
      assert.matches('unknown option "name"', error_of(pgcoord.processed, db, { name = "x" }),
        1, true)
      assert.matches("expected a pool", error_of(pgcoord.processed, "db"), 1, true)
    end)
  end)

  describe("mark", function()
    it("is true the first time and false after; is_processed tells", function()
      local done = new_store()
      assert.is_false(done:is_processed(db, "billing", "m1"))
      assert.is_true(done:mark(db, "billing", "m1"))
      assert.is_false(done:mark(db, "billing", "m1"))
      assert.is_false(done:mark(nil, "billing", "m1"))
      assert.is_true(done:is_processed(db, "billing", "m1"))
      assert.is_true(done:is_processed(nil, "billing", "m1"))
      -- groups are independent
      assert.is_false(done:is_processed(db, "shipping", "m1"))
      assert.is_true(done:mark(db, "shipping", "m1"))
      -- an integer id is its decimal string
      assert.is_true(done:mark(db, "billing", 42))
      assert.is_false(done:mark(db, "billing", "42"))
      assert.is_true(done:is_processed(db, "billing", 42))
    end)

    it("keeps metadata: a table, or a string of JSON text", function()
      local done = new_store()
      done:mark(nil, "g", "a", { amount = 12, tags = { "x" } })
      done:mark(nil, "g", "b", '{"from": "json text", "n": [1, 2.5]}')
      done:mark(nil, "g", "c")
      done:mark(nil, "g", "d", 7)
      local function meta(id)
        return db:one(("SELECT metadata FROM %s WHERE message_id = $1"):format(done.quoted),
          id).metadata
      end
      assert.are.same({ amount = 12, tags = { "x" } }, meta("a"))
      assert.are.same({ from = "json text", n = { 1, 2.5 } }, meta("b"))
      assert.is_nil(meta("c"))
      assert.are.equal(7, meta("d"))
    end)

    it("refuses metadata that is not valid JSON before the INSERT", function()
      local done = new_store()
      local bad = { "{oops", "", "{\"a\": 1,}", "[1 2]", "nan", "01", "'single'",
                    '"\\u0000"', '{"a": 1} trailing', "\255" }
      db:tx(function(tx)
        for _, s in ipairs(bad) do
          local err = error_of(done.mark, done, tx, "g", "m", s)
          assert.matches("done:mark: metadata is a string, so it must be JSON text", err, 1, true)
          -- nothing was sent: the transaction is still usable
          assert.are.equal(1, tx:one("SELECT 1 AS one").one)
        end
        assert.matches("metadata cannot be encoded as JSON",
          error_of(done.mark, done, tx, "g", "m", { f = print }), 1, true)
        assert.matches("metadata must be a table",
          error_of(done.mark, done, tx, "g", "m", print), 1, true)
        assert.is_true(done:mark(tx, "g", "m", '{"ok": true}'))
      end)
      assert.are.equal(1, count(done))
    end)

    it("refuses bad groups and ids", function()
      local done = new_store()
      assert.matches("group must be a non-empty string", error_of(done.mark, done, nil, "", "m"),
        1, true)
      assert.matches("group must be a non-empty string", error_of(done.mark, done, nil, 1, "m"),
        1, true)
      assert.matches("id must be a non-empty string or an integer",
        error_of(done.mark, done, nil, "g", nil), 1, true)
      assert.matches("id must be a non-empty string or an integer",
        error_of(done.mark, done, nil, "g", 1.5), 1, true)
      assert.matches("id contains a NUL byte", error_of(done.mark, done, nil, "g", "a\0"), 1, true)
      assert.matches("expected a pool or a transaction",
        error_of(done.is_processed, done, "g", "m", "x"), 1, true)
      assert.are.equal(0, count(done))
    end)

    it("is undone with the domain transaction it was made in", function()
      local done = new_store()
      local ok = pcall(db.tx, db, function(tx)
        assert.is_true(done:mark(tx, "g", "m1"))
        assert.is_true(done:is_processed(tx, "g", "m1"))
        error("the effect failed")
      end)
      assert.is_false(ok)
      assert.is_false(done:is_processed(db, "g", "m1"))
      -- so the redelivery is new, and applied
      assert.is_true(db:tx(function(tx) return done:mark(tx, "g", "m1") end))
    end)

    it("mark inside the domain transaction, skip if not new: each effect once", function()
      local done = new_store()
      local account = helper.unique("account")
      db:exec(("CREATE TABLE %s (balance integer NOT NULL)"):format(q(account)))
      db:exec(("INSERT INTO %s VALUES (0)"):format(q(account)))
      local function consume(msg)
        db:tx(function(tx)
          if not done:mark(tx, "billing", msg.id) then return end
          tx:exec(("UPDATE %s SET balance = balance + $1"):format(q(account)), msg.amount)
        end)
      end
      -- at-least-once delivery: every message two or three times
      for _ = 1, 3 do
        for i = 1, 5 do consume({ id = "m" .. i, amount = i }) end
        consume({ id = "m1", amount = 1 })
      end
      assert.are.equal(15, db:one(("SELECT balance FROM %s"):format(q(account))).balance)
    end)

    it("concurrent marks of one message: exactly one is new", function()
      local done = new_store()
      local n, inside, results = 10, 0, {}
      local tasks = {}
      for i = 1, n do
        tasks[i] = pgcoord.spawn(function()
          db:tx(function(tx)
            tx:one("SELECT 1 AS one")
            inside = inside + 1
            -- all ten transactions are open before anyone marks
            helper.wait_until(function() return inside == n end, 10, "all transactions open")
            results[i] = done:mark(tx, "g", "same-message")
          end)
        end)
      end
      for _, t in ipairs(tasks) do t:join() end
      local new = 0
      for i = 1, n do if results[i] then new = new + 1 end end
      assert.are.equal(1, new)
      assert.are.equal(1, count(done))
    end)

    it("a mark waiting on one that rolls back becomes the new one", function()
      local done = new_store()
      local pool, app = helper.connect({ size = 1 })
      local gate = require("pgcoord.task").cond()
      local first_marked = false
      local first = pgcoord.spawn(function()
        return pcall(db.tx, db, function(tx)
          assert(done:mark(tx, "g", "m"))
          first_marked = true
          gate:wait(30)
          error("roll back")
        end)
      end)
      helper.wait_until(function() return first_marked end, 10, "the first mark")
      local second = pgcoord.spawn(function()
        return pool:tx(function(tx) return done:mark(tx, "g", "m") end)
      end)
      -- the second INSERT waits for the first transaction's outcome
      helper.wait_until(function()
        local r = helper.admin():one("SELECT count(*) AS n FROM pg_stat_activity"
          .. " WHERE application_name = $1 AND wait_event_type = 'Lock'", app)
        return r.n == 1
      end, 10, "the second mark to wait")
      gate:signal()
      assert.is_false((first:join()))
      assert.is_true(second:join())
      assert.are.equal(1, count(done))
      pool:close()
    end)
  end)

  describe("purging", function()
    it("purge_before(t) and purge_before(db, t) delete marks made before t", function()
      local done = new_store()
      for i = 1, 5 do done:mark(nil, "g", "m" .. i) end
      db:exec(("UPDATE %s SET processed_at = now() - interval '1 hour'"
        .. " WHERE message_id IN ('m1', 'm2')"):format(done.quoted))
      assert.are.equal(2, done:purge_before(server_now() - 60))
      assert.is_false(done:is_processed(db, "g", "m1"))
      assert.is_true(done:is_processed(db, "g", "m3"))
      assert.are.equal(3, done:purge_before(db, server_now() + 60))
      assert.are.equal(0, count(done))
      assert.matches("epoch seconds", error_of(done.purge_before, done, db, "now"), 1, true)
    end)

    it("the cleanup loop deletes marks older than retention every interval", function()
      local done = new_store()
      local h = done:start_cleanup({ retention = 3600, interval = 0.05 })
      assert.is_true(h:running())
      for i = 1, 4 do done:mark(nil, "g", "m" .. i) end
      db:exec(("UPDATE %s SET processed_at = now() - interval '2 hours'"
        .. " WHERE message_id IN ('m1', 'm2', 'm3')"):format(done.quoted))
      helper.wait_until(function() return count(done) == 1 end, 10, "the cleanup")
      assert.is_true(done:is_processed(db, "g", "m4"))
      helper.wait_until(function() return h:stats().deleted == 3 end, 10, "the stats")
      h:stop()
      assert.is_false(h:running())
      assert.is_truthy(logged("retention cleanup"))
    end)

    it("a non-positive retention disables the cleanup and says so", function()
      local done = new_store()
      local h = done:start_cleanup({ retention = 0 })
      assert.is_false(h:running())
      local line = logged("retention cleanup disabled")
      assert.is_truthy(line)
      assert.matches("processed messages", line, 1, true)
      h:stop()
      assert.matches('unknown option "every"', error_of(done.start_cleanup, done, { every = 1 }),
        1, true)
      assert.matches("interval must be a number > 0",
        error_of(done.start_cleanup, done, { interval = 0 }), 1, true)
    end)
  end)

  describe("errors and services", function()
    -- fn marks the line to blame with here()
    local here, raises_here = helper.here, helper.raises_here

    it("errors name the function, the option or argument and the value at the caller's line",
      function()
      local done = new_store()
      raises_here('unknown option "name" for pgcoord.processed',
        function() here(); pgcoord.processed(db, { name = "x" }) end)
      raises_here("pgcoord.processed: option table is 64 bytes",
        function() here(); pgcoord.processed(db, { table = ("x"):rep(64) }) end)
      raises_here("pgcoord.processed: expected a pool from pgcoord.connect, got string",
        function() here(); pgcoord.processed("db") end)
      raises_here('unknown option "every" for done:start_cleanup',
        function() here(); done:start_cleanup({ every = 1 }) end)
      raises_here("done:start_cleanup: option interval must be a number > 0, got 0",
        function() here(); done:start_cleanup({ interval = 0 }) end)
      raises_here("done:mark: metadata is a string, so it must be JSON text",
        function() here(); done:mark(nil, "g", "m", "{oops") end)
      raises_here("done:mark: metadata cannot be encoded as JSON",
        function() here(); done:mark(nil, "g", "m", { f = print }) end)
      raises_here("done:mark: group must be a non-empty string",
        function() here(); done:mark(nil, "", "m") end)
      raises_here("done:mark: id contains a NUL byte",
        function() here(); done:mark(nil, "g", "a\0") end)
      raises_here("done:is_processed: expected a pool or a transaction, got string",
        function() here(); done:is_processed("x", "g", "m") end)
      raises_here("done:purge_before: time must be epoch seconds",
        function() here(); done:purge_before(db, "now") end)
      local h = done:start_cleanup({ retention = 3600, interval = 60 })
      raises_here("cleanup:stop: timeout must be a number of seconds > 0, got 0",
        function() here(); h:stop(0) end)
      h:stop()
      assert.are.equal(0, count(done))
    end)

    it("refuses, before the INSERT, JSON text the C decoder reads but jsonb refuses", function()
      local done = new_store()
      local bad = { '"\\ud800"', '"\\udc00"', '["\\ud83d x"]', '"\\ud83d\\ud83d"', "1.",
                    ".5", "-01", '{"a": [1, 00]}', '"\\\\\\u0000"' }
      db:tx(function(tx)
        for _, s in ipairs(bad) do
          local err = error_of(done.mark, done, tx, "g", "m", s)
          assert.matches("done:mark: metadata is a string, so it must be JSON text", err, 1, true)
          assert.are.equal(1, tx:one("SELECT 1 AS one").one)
        end
        -- what looks like them inside strings, or escaped, is fine
        local good = { '"\\ud83d\\ude00"', '"\\\\ud800"', '"\\\\u0000"', '{"01": ".5 1."}',
                       "-0.5e-3", "[0, 10, 1E+2]" }
        for i, s in ipairs(good) do assert.is_true(done:mark(tx, "g", "ok" .. i, s), s) end
      end)
      assert.are.equal(6, count(done))
      assert.are.same({ ["01"] = ".5 1." }, db:one(("SELECT metadata FROM %s"
        .. " WHERE message_id = 'ok4'"):format(done.quoted)).metadata)
    end)

    it("a stopped cleanup keeps nothing alive: its stop handler is unregistered", function()
      local gone = setmetatable({}, { __mode = "k" })
      -- in a function of its own, so that no register of this one holds it
      local function run_and_stop()
        local done = new_store()
        local h = done:start_cleanup({ retention = 3600, interval = 60 })
        helper.wait_until(function() return h:stats().runs == 1 end, 10, "the first cleanup")
        h:stop()
        assert.is_false(h:running())
        gone[h] = true
      end
      run_and_stop()
      collectgarbage()
      collectgarbage()
      assert.is_nil(next(gone))
    end)
  end)
end)

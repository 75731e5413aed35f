-- The pool through a real PgBouncer in transaction mode (started by
-- scripts/pg-tmp with fewer server connections than the tasks here): a
-- server connection serves many clients one transaction at a time, so a
-- statement prepared by one client may be found, or missed, by another.
-- No query may ever get another query's rows.
local pgcoord = require "pgcoord"
local helper = require "helper"

local function bouncer_dsn(dbname)
  local dsn = os.getenv("PGCOORD_TEST_PGBOUNCER_DSN")
  if not dsn or dsn == "" then
    error("PGCOORD_TEST_PGBOUNCER_DSN is not set: scripts/pg-tmp starts PgBouncer"
      .. " when it is installed (scripts/install-deps)", 2)
  end
  return dbname and dsn:gsub("/[^/?]*$", "/" .. dbname) or dsn
end

-- Ten statements of different shapes: column names and types, parameter
-- counts, row counts.  Each result depends on k, so another query's rows
-- (of any shape) fail the check.
local BYTES = "\\x41\\\255'" -- a bytea sent as text would come back as "A..."
local SHAPES = {
  { "SELECT $1::int + 1 AS a",
    function(k) return k end,
    function(rows, k) return #rows == 1 and rows[1].a == k + 1 end },
  { "SELECT $1::text || 'x' AS b, $2::int AS c",
    function(k) return tostring(k), k end,
    function(rows, k) return #rows == 1 and rows[1].b == k .. "x" and rows[1].c == k end },
  { "SELECT $1::bigint * 2 AS d, $2::bigint AS e, $3::bool AS f",
    function(k) return k, -k, k % 2 == 0 end,
    function(rows, k)
      local r = rows[1]
      return #rows == 1 and r.d == 2 * k and r.e == -k and r.f == (k % 2 == 0)
    end },
  { "SELECT 'shape four' AS g",
    function() end,
    function(rows) return #rows == 1 and rows[1].g == "shape four" end },
  { "SELECT $1::float8 / 4 AS h",
    function(k) return k end,
    function(rows, k) return #rows == 1 and rows[1].h == k / 4 end },
  { "SELECT json_build_object('k', $1::int, 's', $2::text) AS j",
    function(k) return k, "s" .. k end,
    function(rows, k)
      local j = rows[1] and rows[1].j
      return #rows == 1 and type(j) == "table" and j.k == k and j.s == "s" .. k
    end },
  { "SELECT $1::int AS k1, $2::int AS k2, $3::int AS k3, $4::int AS k4",
    function(k) return k, k + 1, k + 2, k + 3 end,
    function(rows, k)
      local r = rows[1]
      return #rows == 1 and r.k1 == k and r.k2 == k + 1 and r.k3 == k + 2 and r.k4 == k + 3
    end },
  { "SELECT g AS n, $2::int AS m FROM generate_series(1, $1::int) g ORDER BY g",
    function(k) return k % 5 + 1, k end,
    function(rows, k)
      if #rows ~= k % 5 + 1 then return false end
      for i, r in ipairs(rows) do
        if r.n ~= i or r.m ~= k then return false end
      end
      return true
    end },
  { "SELECT $1::bytea AS bin, $2::int AS o",
    function(k) return BYTES .. k, k end,
    function(rows, k) return #rows == 1 and rows[1].bin == BYTES .. k and rows[1].o == k end },
  { "SELECT upper($1) AS u, length($1) AS l",
    function(k) return "u" .. k end,
    function(rows, k)
      local s = "U" .. k
      return #rows == 1 and rows[1].u == s and rows[1].l == #s
    end },
}

-- Runs `per_task` queries in each of `tasks` tasks, shapes interleaved;
-- with in_tx, three at a time in a transaction.  Returns { wrong, errors,
-- first_wrong, first_error, states = { [sqlstate] = count }, failed_tx }.
local function hammer(db, tasks, per_task, in_tx)
  local r = { wrong = 0, errors = 0, states = {}, failed_tx = 0 }
  local function failed(err)
    r.errors = r.errors + 1
    r.first_error = r.first_error or tostring(err)
    local state = type(err) == "table" and err.sqlstate or "?"
    r.states[state] = (r.states[state] or 0) + 1
  end
  local function one(q, t, i)
    local shape = SHAPES[(i - 1) % #SHAPES + 1]
    local k = t * 100000 + i
    local ok, rows = pcall(q.query, q, shape[1], shape[2](k))
    if not ok then
      failed(rows)
    elseif not shape[3](rows, k) then
      r.wrong = r.wrong + 1
      r.first_wrong = r.first_wrong or ("%s for %q"):format(pgcoord.json.encode(rows), shape[1])
    end
  end
  local workers = {}
  for t = 1, tasks do
    workers[t] = helper.spawn(function()
      local i = t -- each task starts at another shape
      while i < t + per_task do
        if in_tx then
          local ok, err = pcall(db.tx, db, function(tx)
            for j = i, i + 2 do one(tx, t, j) end
          end)
          if not ok then
            failed(err)
            r.failed_tx = r.failed_tx + 1
          end
          i = i + 3
        else
          one(db, t, i)
          i = i + 1
        end
      end
    end)
  end
  for _, w in ipairs(workers) do w:join() end
  return r
end

describe("through PgBouncer in transaction mode", function()
  local pools = {}
  -- A pool through PgBouncer, and the log lines of its connecting.
  local function pool(dbname, opts)
    local db
    local lines = helper.capture_log(function()
      db = pgcoord.connect(bouncer_dsn(dbname), opts)
    end)
    pools[#pools + 1] = db
    return db, table.concat(lines, "\n")
  end

  after_each(function()
    for _, db in ipairs(pools) do pcall(db.close, db) end
    pools = {}
    helper.cleanup()
  end)

  it("10,000 queries of ten shapes from 50 tasks, default options: 0 wrong rows, 0 errors",
    function()
    local db, log = pool(helper.create_database("bouncer"))
    assert.matches("connection pooler detected", log, 1, true)
    assert.matches("statements=unnamed", log, 1, true)
    local r = hammer(db, 50, 200, false)
    assert.are.equal(0, r.wrong, r.first_wrong)
    assert.are.equal(0, r.errors, r.first_error)
    -- the pool named no statement on the shared server connections
    assert.are.equal(0, db:one(
      "SELECT count(*)::int AS n FROM pg_prepared_statements WHERE name LIKE 'pgc%'").n)
  end)

  it("inside transactions too: 0 wrong rows, 0 errors", function()
    local db = pool(helper.create_database("bouncer"))
    local r = hammer(db, 50, 60, true)
    assert.are.equal(0, r.wrong, r.first_wrong)
    assert.are.equal(0, r.errors, r.first_error)
  end)

  it("a task cancelled mid-query terminates no backend by the pid PgBouncer made up", function()
    local db = pool(helper.create_database("bouncer"), { size = 1 })
    local fake_pid = db:tx(function(tx) return tx.conn:backend_pid() end)
    local terminated = {}
    local exec = db.exec
    db.exec = function(self, sql, ...) -- the pool's own statements go through exec
      if sql:find("pg_terminate_backend", 1, true) then terminated[#terminated + 1] = ... end
      return exec(self, sql, ...)
    end
    local t = helper.spawn(function() return db:one("SELECT pg_sleep(30) AS x") end)
    helper.wait_until(function() return db:stats().in_use == 1 end, 10, "the query to start")
    t:cancel()
    -- a terminating daemon would have run before these come back
    for i = 1, 3 do assert.are.equal(i, db:one("SELECT $1::int AS x", i).x) end
    assert.are.same({}, terminated, "pg_terminate_backend of " .. tostring(fake_pid))
  end)

  it("prepare = true forced through PgBouncer never returns a wrong row", function()
    local db = pool(helper.create_database("bouncer"), { prepare = true })
    local r = hammer(db, 50, 40, false)
    assert.are.equal(0, r.wrong, r.first_wrong)
    -- outside a transaction a statement missing on the server runs unnamed
    assert.are.equal(0, r.errors, r.first_error)
    -- inside one it cannot (fresh servers, where nothing is prepared
    -- yet): the transaction fails, saying why
    db = pool(helper.create_database("bouncer"), { prepare = true })
    r = hammer(db, 50, 30, true)
    assert.are.equal(0, r.wrong, r.first_wrong)
    for state in pairs(r.states) do
      assert.is_truthy(({ ["26000"] = true, ["42P05"] = true, ["25P02"] = true })[state], state)
    end
    if r.errors > 0 then
      assert.matches("leave the pool's prepare option unset", r.first_error, 1, true)
    end
    print(("\nprepare = true through PgBouncer: %d of %d transactions failed")
      :format(r.failed_tx, 50 * 10))
  end)
end)


-- Each primitive's core scenario through PgBouncer (transaction mode, a
-- pool of PGCOORD_TEST_PGBOUNCER_POOL_SIZE server connections).  LISTEN
-- needs a session, so each gets a subscriber on a direct pool that pings
-- through PgBouncer (ping_db): the only connection that goes direct.
describe("each primitive through PgBouncer", function()
  local pools, subs = {}, {}
  local dbname, bouncer, direct, sub

  local function track(db)
    pools[#pools + 1] = db
    return db
  end

  before_each(function()
    dbname = helper.create_database("bouncer")
    bouncer = track(pgcoord.connect(bouncer_dsn(dbname), { size = 8 }))
    direct = track(pgcoord.connect(helper.conninfo_for(dbname), { size = 2 }))
    sub = pgcoord.subscriber(direct, { ping_db = bouncer }):start()
    subs[#subs + 1] = sub
    pgcoord.migrate(bouncer)
    assert.is_true(sub:ready(10))
  end)

  after_each(function()
    for _, s in ipairs(subs) do pcall(s.stop, s, 5) end
    for _, db in ipairs(pools) do pcall(db.close, db) end
    pools, subs = {}, {}
    helper.cleanup()
  end)

  it("migrations: concurrent runs through PgBouncer serialise on a transaction lock", function()
    local fresh = helper.create_database("bouncer")
    local db = track(pgcoord.connect(bouncer_dsn(fresh), { size = 4 }))
    local runs = {}
    for i = 1, 4 do runs[i] = helper.spawn(pgcoord.migrate, db) end
    for _, t in ipairs(runs) do t:join() end
    pgcoord.migrate(db) -- and again: nothing to do
    assert.is_truthy(db:one("SELECT to_regclass('pgcoord.job_locks') AS t").t)
    -- no advisory lock outlives its transaction on a shared server connection
    assert.are.equal(0, db:one("SELECT count(*)::int AS n FROM pg_locks"
      .. " WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database"
      .. " WHERE datname = current_database())").n)
  end)

  it("the job runner: jobs scheduled through PgBouncer all run once", function()
    local jobs = pgcoord.jobs(bouncer, { subscriber = sub })
    local group = helper.unique("g")
    local ran = {}
    jobs:define("bounced", function(job) ran[job.params.n] = (ran[job.params.n] or 0) + 1 end,
      { group = group })
    local w = jobs:worker({ group = group, concurrency = 10 })
    w:ready()
    for n = 1, 60 do
      if n % 2 == 0 then
        bouncer:tx(function(tx) jobs:schedule_now(tx, "bounced", { n = n }) end)
      else
        jobs:schedule_now(bouncer, "bounced", { n = n })
      end
    end
    helper.wait_until(function()
      for n = 1, 60 do if not ran[n] then return false end end
      return true
    end, 20, "60 jobs to run")
    w:shutdown(5)
    for n = 1, 60 do assert.are.equal(1, ran[n], "job " .. n) end
  end)

  it("the queue: messages published through PgBouncer are all consumed", function()
    local q = pgcoord.queue(bouncer, helper.unique("q"), { subscriber = sub })
    q:subscribe("billing")
    local got = {}
    local c = q:consume("billing", function(msg) got[msg.payload.n] = true end,
      { concurrency = 4 })
    for n = 1, 40 do
      bouncer:tx(function(tx) q:publish(tx, { n = n }) end)
    end
    helper.wait_until(function()
      for n = 1, 40 do if not got[n] then return false end end
      return true
    end, 20, "40 messages")
    c:stop()
  end)

  it("the outbox relay: saved messages are published through PgBouncer", function()
    local ob = pgcoord.outbox(bouncer, { table = helper.unique("outbox") })
    ob:migrate()
    local published = {}
    local relay = ob:relay(function(msg) published[msg.payload.n] = true end,
      { subscriber = sub, poll_interval = 5 })
    for n = 1, 30 do
      bouncer:tx(function(tx) ob:save(tx, { topic = "orders", key = n, payload = { n = n } }) end)
    end
    -- woken by NOTIFY through the direct subscriber, not the 5 s poll
    helper.wait_until(function()
      for n = 1, 30 do if not published[n] then return false end end
      return true
    end, 4, "30 relayed messages")
    relay:stop()
  end)

  it("the processed store: a message is marked once, racing marks included", function()
    local done = pgcoord.processed(bouncer, { table = helper.unique("processed") })
    done:migrate()
    assert.is_true(bouncer:tx(function(tx) return done:mark(tx, "billing", "m1") end))
    assert.is_false(bouncer:tx(function(tx) return done:mark(tx, "billing", "m1") end))
    local firsts = 0
    local racers = {}
    for i = 1, 6 do
      racers[i] = helper.spawn(function()
        if bouncer:tx(function(tx) return done:mark(tx, "billing", "m2") end) then
          firsts = firsts + 1
        end
      end)
    end
    for _, t in ipairs(racers) do t:join() end
    assert.are.equal(1, firsts)
  end)

  it("the job lock: one holder at a time, tokens increase, fenced writes commit", function()
    local name = helper.unique("lock")
    bouncer:exec("CREATE TABLE fenced (token bigint)")
    local opts = { ping_interval = 0.2, subscriber = sub }
    local holding, overlap, tokens = 0, false, {}
    local function hold(lock)
      return lock:run(function(ctx)
        holding = holding + 1
        overlap = overlap or holding > 1
        tokens[#tokens + 1] = ctx.token
        bouncer:tx(function(tx)
          ctx.fence(tx)
          tx:exec("INSERT INTO fenced VALUES ($1)", ctx.token)
        end)
        pgcoord.sleep(0.3) -- renewals through PgBouncer meanwhile
        holding = holding - 1
        return ctx.token
      end)
    end
    local holders = {}
    for i = 1, 3 do holders[i] = helper.spawn(hold, pgcoord.joblock(bouncer, name, opts)) end
    for _, t in ipairs(holders) do t:join() end
    assert.is_false(overlap)
    assert.are.equal(3, #tokens)
    for i = 2, 3 do assert.is_true(tokens[i] > tokens[i - 1]) end
    assert.are.equal(3, bouncer:one("SELECT count(*)::int AS n FROM fenced").n)
  end)

  it("pgcoord-run --status reads the database through PgBouncer", function()
    local jobs = pgcoord.jobs(bouncer, { subscriber = sub })
    jobs:define("waiting", function() end, { group = "status_group" })
    jobs:schedule(bouncer, "waiting", {}, { run_at = pgcoord.time() + 3600 })
    local code, out = helper.run({ "pgcoord-run", "--db", bouncer_dsn(dbname), "--status" })
    assert.are.equal(0, code, out)
    assert.matches("status_group", out, 1, true)
  end)

  it("pings go through PgBouncer while the subscriber listens directly", function()
    local s = pgcoord.subscriber(direct, { ping_db = bouncer, ping_interval = 0.1 }):start()
    subs[#subs + 1] = s
    assert.is_true(s:ready(10))
    helper.wait_until(function()
      local st = s:stats()
      return st.pings >= 3 and st.notifications >= 3
    end, 10, "three pings to come back")
    assert.are.equal(0, s:stats().reconnects)
  end)

  it("a subscriber on PgBouncer in transaction mode fails within seconds, naming the cause",
    function()
    local s = pgcoord.subscriber(bouncer):start()
    subs[#subs + 1] = s
    local elapsed, ok, err = helper.timed(pcall, s.ready, s, 30)
    assert.is_false(ok, "ready() returned " .. tostring(err))
    assert.is_true(elapsed < 6, "failed after " .. elapsed)
    assert.matches("connection pooler", tostring(err), 1, true)
    assert.matches("transaction mode", tostring(err), 1, true)
    assert.matches("directly", tostring(err), 1, true)
    assert.are.equal("stopped", s:status())
    assert.are.same(tostring(err), s:stats().error)
  end)
end)

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

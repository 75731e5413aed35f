-- The database layer against a real server: the pool, conversions both
-- ways, errors, failures of the server and the network, transactions,
-- publish and migrations.
local pgcoord = require "pgcoord"
local helper = require "helper"
local fifo = require "pgcoord.fifo"

local pools = {}

-- A pool closed after the test; returns pool, application_name.
local function pool(opts, conninfo)
  local p, app = helper.connect(opts, conninfo)
  pools[#pools + 1] = p
  return p, app
end

local function close_pools()
  for _, p in ipairs(pools) do pcall(p.close, p) end
  pools = {}
end

local function count_backends(app)
  return helper.admin():one(
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = $1", app).n
end

-- The pid of the backend of `app` running a query that contains `text`.
local function active_backend(app, text)
  return helper.wait_until(function()
    for _, r in ipairs(helper.backends(app)) do
      if r.state == "active" and r.query and r.query:find(text, 1, true) then return r.pid end
    end
  end, 10, "the query to show up in pg_stat_activity")
end

local function assert_consistent(db)
  local s = db:stats()
  assert.are.equal(s.open, s.idle + s.in_use)
  assert.is_true(s.open >= 0 and s.open <= s.size, "open = " .. s.open)
  assert.are.equal(0, s.in_use)
  assert.are.equal(0, s.waiting)
end

local function errors(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return err
end

-- Takes the connection of a pool of one in a task of its own, until the
-- function returned is called (it waits for the task to give it back).
local function hold_connection(db)
  local released = false
  local holder = helper.spawn(function()
    return db:tx(function(tx)
      tx:one("SELECT 1")
      while not released do pgcoord.sleep(0.005) end
    end)
  end)
  helper.wait_until(function() return db:stats().in_use == 1 end, 5, "the holder")
  return function()
    released = true
    assert.is_true(holder:wait(10))
    holder:join()
  end
end

describe("the pool", function()
  after_each(function()
    close_pools()
    helper.cleanup()
  end)

  it("runs 200 tasks on 5 connections, never opening more", function()
    local db, app = pool({ size = 5 })
    local max_open, max_server, saw_waiting = 0, 0, false
    local done = false
    local monitor = helper.spawn(function()
      while not done do
        max_server = math.max(max_server, count_backends(app))
        pgcoord.sleep(0.002)
      end
    end)
    local tasks = {}
    for i = 1, 200 do
      tasks[i] = helper.spawn(function()
        local row = db:one("SELECT $1::int * 2 AS v FROM pg_sleep(0.002)", i)
        local s = db:stats()
        max_open = math.max(max_open, s.open)
        if s.waiting > 0 then saw_waiting = true end
        return row.v
      end)
    end
    for i = 1, 200 do assert.are.equal(i * 2, tasks[i]:join()) end
    done = true
    monitor:join()
    assert.is_true(max_open <= 5, "pool opened " .. max_open)
    assert.is_true(max_server <= 5, "server saw " .. max_server)
    assert.is_true(max_server >= 1)
    assert.is_true(saw_waiting, "tasks never had to wait for a connection")
    assert_consistent(db)
    assert.are.equal(5, db:stats().size)
  end)

  it("opens one connection at connect time and the others lazily", function()
    local db, app = pool({ size = 4 })
    assert.are.equal(1, db:stats().open)
    assert.are.equal(1, count_backends(app))
    db:query("SELECT 1")
    assert.are.equal(1, db:stats().open)
  end)

  it("a query error leaves the connection usable", function()
    local db = pool({ size = 1 })
    for _ = 1, 5 do errors(db.query, db, "SELECT 1/0") end
    assert.are.equal(1, db:one("SELECT 1 AS x").x)
    assert_consistent(db)
    assert.are.equal(1, db:stats().open)
  end)

  it("a task waiting for a connection can be cancelled", function()
    local db = pool({ size = 1 })
    local release = hold_connection(db)
    local waiter = helper.spawn(function() return db:one("SELECT 2 AS x").x end)
    helper.wait_until(function() return db:stats().waiting == 1 end, 5, "a waiter")
    waiter:cancel()
    assert.are.equal("cancelled", waiter:status())
    assert.are.equal(0, db:stats().waiting)
    release()
    assert.are.equal(3, db:one("SELECT 3 AS x").x)
    assert_consistent(db)
  end)

  it("serves waiters first come, first served, passing over those that gave up", function()
    local db = pool({ size = 1 })
    local release = hold_connection(db)
    local order, waiters = {}, {}
    for i = 1, 200 do
      waiters[i] = helper.spawn(function()
        local got = db:one("SELECT $1::int AS i", i).i
        order[#order + 1] = got
      end)
    end
    helper.wait_until(function() return db:stats().waiting == 200 end, 5, "200 waiters")
    -- three in four give up (enough for the gone ones to be swept out)
    local kept = {}
    for i = 1, 200 do
      if i % 4 == 0 then kept[#kept + 1] = i else waiters[i]:cancel() end
    end
    assert.are.equal(50, db:stats().waiting)
    -- (and are swept out of the queue, not kept there for good)
    assert.is_true(fifo.count(db.waiters) <= 2 * 50 + 16, fifo.count(db.waiters))
    release()
    for i = 4, 200, 4 do assert.is_true(waiters[i]:wait(10)) end
    assert.are.same(kept, order)
    assert.are.equal(0, db:stats().waiting)
    assert_consistent(db)
  end)

  it("close() ends the pool: later queries fail clearly", function()
    local db, app = pool({ size = 2 })
    db:close()
    helper.wait_until(function() return count_backends(app) == 0 end, 5, "the connections to close")
    local err = errors(db.query, db, "SELECT 1")
    assert.matches("closed", tostring(err), 1, true)
  end)

  it("returns many rows", function()
    local db = pool({ size = 1 })
    local rows = db:query("SELECT g AS n, 'row ' || g AS label FROM generate_series(1, 20000) g")
    assert.are.equal(20000, #rows)
    assert.are.equal(20000, rows.affected)
    assert.are.equal(12345, rows[12345].n)
    assert.are.equal("row 20000", rows[20000].label)
  end)

  it("application_name from params is visible in pg_stat_activity", function()
    local name = helper.unique("visible_app")
    local db = pool({ size = 1, params = { application_name = name } })
    local row = db:one(
      "SELECT application_name AS a FROM pg_stat_activity WHERE pid = pg_backend_pid()")
    assert.are.equal(name, row.a)
    assert.are.equal(1, count_backends(name))
  end)

  it("other params reach the server as connection options", function()
    local db = pool({ size = 1, params = {
      options = "-c search_path=custom_path,public -c work_mem=7MB" } })
    local row = db:one(
      "SELECT current_setting('search_path') AS sp, current_setting('work_mem') AS wm")
    assert.are.equal("custom_path,public", (row.sp:gsub("%s", "")))
    assert.are.equal("7MB", row.wm)
  end)
end)

describe("conversions", function()
  local db
  setup(function() db = pgcoord.connect(nil, { size = 2 }) end)
  teardown(function() db:close() end)

  it("integers both ways, extremes included", function()
    local row = db:one("SELECT $1::int2 AS a, $2::int4 AS b, $3::int8 AS c, $4::int8 AS d,"
      .. " $5::int8 AS e,"
      .. " $3::int8 = 9223372036854775807 AS c_exact, $4::int8 = -9223372036854775808 AS d_exact",
      -32768, 2147483647, math.maxinteger, math.mininteger, -1)
    assert.are.equal(-32768, row.a)
    assert.are.equal(2147483647, row.b)
    assert.are.equal(math.maxinteger, row.c)
    assert.are.equal(math.mininteger, row.d)
    assert.are.equal(-1, row.e)
    assert.is_true(row.c_exact)
    assert.is_true(row.d_exact)
    for _, k in ipairs({ "a", "b", "c", "d", "e" }) do
      assert.are.equal("integer", math.type(row[k]))
    end
    row = db:one("SELECT 32767::int2 AS a, (-2147483648)::int4 AS b,"
      .. " 9223372036854775807::int8 AS c,"
      .. " (-9223372036854775808)::int8 AS d, 0::int8 AS z, 'pg_class'::regclass::oid AS o")
    assert.are.equal(32767, row.a)
    assert.are.equal(-2147483648, row.b)
    assert.are.equal(math.maxinteger, row.c)
    assert.are.equal(math.mininteger, row.d)
    assert.are.equal(0, row.z)
    assert.are.equal("integer", math.type(row.o))
  end)

  it("floats both ways: exact, NaN and infinities", function()
    for _, v in ipairs({ 0.1, 1 / 3, -2.5e-300, 1.7976931348623157e308, 0.1 + 0.2, -0.0, 2.0 }) do
      local row = db:one("SELECT $1::float8 AS f", v)
      assert.are.equal(v, row.f)
      assert.are.equal("float", math.type(row.f))
    end
    local row = db:one("SELECT $1::float8 AS n, $1::float8 = 'NaN'::float8 AS is_nan,"
      .. " $2::float8 = 'Infinity'::float8 AS is_inf, $3::float8 = '-Infinity'::float8 AS is_ninf,"
      .. " $2::float8 AS i, $3::float8 AS ni", 0 / 0, math.huge, -math.huge)
    assert.is_true(row.n ~= row.n)
    assert.is_true(row.is_nan)
    assert.is_true(row.is_inf)
    assert.is_true(row.is_ninf)
    assert.are.equal(math.huge, row.i)
    assert.are.equal(-math.huge, row.ni)
    row = db:one("SELECT 'NaN'::float8 AS n, 'Infinity'::float8 AS i, '-Infinity'::float8 AS ni,"
      .. " 1.5::float4 AS f4, 3::float8 AS three")
    assert.is_true(row.n ~= row.n)
    assert.are.equal(math.huge, row.i)
    assert.are.equal(-math.huge, row.ni)
    assert.are.equal(1.5, row.f4)
    assert.are.equal(3.0, row.three)
    assert.are.equal("float", math.type(row.three))
  end)

  it("numeric both ways", function()
    local row = db:one("SELECT 1.5::numeric AS a, 42::numeric AS b, 'NaN'::numeric AS c,"
      .. " 123456789012345678::numeric AS d, (-0.000001)::numeric AS e, 'Infinity'::numeric AS f,"
      .. " $1::numeric = 1.25 AS p1, $2::numeric = 9007199254740993 AS p2", 1.25, 9007199254740993)
    assert.are.equal(1.5, row.a)
    assert.are.equal(42, row.b)
    assert.is_true(row.c ~= row.c)
    assert.are.equal(123456789012345678, row.d)
    assert.are.equal("integer", math.type(row.d))
    assert.are.equal(-0.000001, row.e)
    assert.are.equal(math.huge, row.f)
    assert.is_true(row.p1)
    assert.is_true(row.p2)
  end)

  it("booleans both ways", function()
    local row = db:one("SELECT true AS t, false AS f, $1::bool AS p, $2::bool AS q,"
      .. " $1::bool IS TRUE AS pt", true, false)
    assert.are.equal(true, row.t)
    assert.are.equal(false, row.f)
    assert.are.equal(true, row.p)
    assert.are.equal(false, row.q)
    assert.are.equal(true, row.pt)
  end)

  it("text with unicode both ways", function()
    local s = "héllo wörld ✓ 😀 日本語 \"quoted\" 'single' \\ back\tslash\nnewline"
    local row = db:one("SELECT $1::text AS s, octet_length($1::text) AS n, $1::text = $2 AS same,"
      .. " 'ünïcødé ✓'::text AS lit", s, s)
    assert.are.equal(s, row.s)
    assert.are.equal(#s, row.n)
    assert.is_true(row.same)
    assert.are.equal("ünïcødé ✓", row.lit)
    -- numbers sent where text is expected
    row = db:one("SELECT $1::text AS i, $2::text AS f", 42, 1.5)
    assert.are.equal("42", row.i)
    assert.are.equal("1.5", row.f)
  end)

  it("NULL both ways: nil and pgcoord.null send NULL, NULL comes back absent", function()
    local row = db:one("SELECT $1::int AS a, $2::text AS b, $3::int AS c, NULL::int AS d,"
      .. " $1::int IS NULL AS a_null, $2::text IS NULL AS b_null", nil, pgcoord.null, 3)
    assert.is_nil(row.a)
    assert.is_nil(row.b)
    assert.are.equal(3, row.c)
    assert.is_nil(row.d)
    assert.is_true(row.a_null)
    assert.is_true(row.b_null)
    local keys = {}
    for k in pairs(row) do keys[#keys + 1] = k end
    table.sort(keys)
    assert.are.same({ "a_null", "b_null", "c" }, keys)
    -- a trailing nil is still a parameter
    assert.is_true(db:one("SELECT $1::int IS NULL AS n", nil).n)
  end)

  it("tables go as json, json and jsonb come back as tables", function()
    local v = { name = "x", list = { 1, 2, { deep = true, s = "é✓" } }, obj = { k = "v" },
      n = 1.5, neg = -3 }
    local row = db:one("SELECT $1::jsonb AS jb, $1::json AS j,"
      .. " jsonb_typeof($1::jsonb -> 'list') AS t,"
      .. " ($1::jsonb #>> '{list,2,s}') AS s", v)
    assert.are.same(v, row.jb)
    assert.are.same(v, row.j)
    assert.are.equal("array", row.t)
    assert.are.equal("é✓", row.s)
    assert.are.equal("integer", math.type(row.jb.neg))
    row = db:one([[SELECT '{"a": null, "b": [1, "two", false]}'::jsonb AS j, '42'::jsonb AS n,
      '"str"'::json AS s, '[]'::jsonb AS e, '{}'::json AS o]])
    assert.are.equal(pgcoord.null, row.j.a)
    assert.are.same({ 1, "two", false }, row.j.b)
    assert.are.equal(42, row.n)
    assert.are.equal("str", row.s)
    assert.are.same({}, row.e)
    assert.are.same({}, row.o)
  end)

  it("big integers in json are exact on the way in", function()
    local v = { big = 9007199254740993, max = math.maxinteger, min = math.mininteger,
      list = { 1234567890123456789 } }
    local row = db:one("SELECT $1::jsonb ->> 'big' AS big, $1::jsonb ->> 'max' AS max,"
      .. " $1::jsonb ->> 'min' AS min, $1::jsonb #>> '{list,0}' AS l", v)
    assert.are.equal("9007199254740993", row.big)
    assert.are.equal("9223372036854775807", row.max)
    assert.are.equal("-9223372036854775808", row.min)
    assert.are.equal("1234567890123456789", row.l)
  end)

  it("big integers in json are exact on the way out", function()
    local row = db:one([[SELECT '{"big": 9007199254740993, "max": 9223372036854775807,
      "list": [1234567890123456789]}'::jsonb AS j]])
    local function show(x) return ("%s %.17g"):format(math.type(x), x) end
    assert.are.equal(9007199254740993, row.j.big, "decoded as " .. show(row.j.big))
    assert.are.equal("integer", math.type(row.j.big))
    assert.are.equal(math.maxinteger, row.j.max)
    assert.are.equal(1234567890123456789, row.j.list[1])
    -- and a round trip keeps them
    local v = { id = 1234567890123456789 }
    assert.are.same(v, db:one("SELECT $1::jsonb AS j", v).j)
  end)

  it("bytea with NUL bytes both ways", function()
    local s = "a\0b\0\255\1\0"
    local row = db:one(
      "SELECT $1::bytea AS b, length($1::bytea) AS n, encode($1::bytea, 'hex') AS hex", s)
    assert.are.equal(s, row.b)
    assert.are.equal(#s, row.n)
    assert.are.equal("61006200ff0100", row.hex)
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    all = table.concat(all)
    row = db:one("SELECT $1::bytea AS b, md5($1::bytea) AS m", all)
    assert.are.equal(all, row.b)
    assert.are.equal(db:one("SELECT md5(decode($1, 'hex')) AS m",
      (all:gsub(".", function(c) return ("%02x"):format(c:byte()) end))).m, row.m)
    row = db:one([[SELECT '\x00ff41'::bytea AS b, ''::bytea AS e]])
    assert.are.equal("\0\255A", row.b)
    assert.are.equal("", row.e)
  end)

  it("bytea without NUL bytes but with non-UTF-8 bytes and backslashes both ways", function()
    for _, s in ipairs({ "\255\254\253", "a\\x41", "\\", "\200\\000" }) do
      local ok, row = pcall(db.one, db, "SELECT $1::bytea AS b, length($1::bytea) AS n", s)
      assert.is_true(ok, ("bytea parameter %q failed: %s"):format(s, tostring(row)))
      assert.are.equal(s, row.b)
      assert.are.equal(#s, row.n)
    end
  end)

  local function check_epochs(conn, literals, type_name)
    for _, lit in ipairs(literals) do
      local row = conn:one(
        ("SELECT $1::%s AS t, extract(epoch FROM $1::%s)::float8 AS e, $1::%s::text AS s")
        :format(type_name, type_name, type_name), lit)
      assert.are.equal("number", type(row.t),
        ("%s %s came back as %s"):format(type_name, lit, tostring(row.t)))
      assert.is_true(math.abs(row.t - row.e) < 1e-5,
        ("%s %q (%s): got %.6f, the server says %.6f"):format(type_name, lit, row.s, row.t, row.e))
    end
  end

  local LITERALS = {
    "2000-01-01 00:00:00+00", "1970-01-01 00:00:00.5+00", "1969-12-31 23:59:59.25+00",
    "2038-01-19 03:14:08.123456+00", "2024-02-29 12:34:56.789+05:30", "1900-01-01 00:00:00+00",
    "1850-06-01 12:00:00+00", "0044-03-15 12:00:00+00 BC", "9999-12-31 23:59:59.999999+00",
  }

  it("timestamptz and timestamp come back as epoch seconds", function()
    local row = db:one("SELECT now() AS t, extract(epoch FROM now())::float8 AS e")
    assert.are.equal("float", math.type(row.t))
    assert.is_true(math.abs(row.t - row.e) < 1e-5)
    check_epochs(db, LITERALS, "timestamptz")
    check_epochs(db, { "2021-06-01 12:34:56.789", "1960-03-04 05:06:07", "2000-01-01 00:00:00" },
      "timestamp")
  end)

  for _, zone in ipairs({ "America/St_Johns", "Asia/Kathmandu", "Europe/Amsterdam" }) do
    it("timestamps are right with TimeZone " .. zone .. " and a non-ISO DateStyle", function()
      local conn = pgcoord.connect(nil, { size = 1, params = {
        options = ("-c TimeZone=%s -c DateStyle=SQL,DMY"):format(zone) } })
      local ok, err = pcall(function()
        local s = conn:one("SELECT current_setting('TimeZone') AS tz")
        assert.are.equal(zone, s.tz)
        check_epochs(conn, LITERALS, "timestamptz")
        check_epochs(conn, { "2021-06-01 12:34:56.789", "1850-06-01 00:00:00" }, "timestamp")
        local row = conn:one("SELECT now() AS t, extract(epoch FROM now())::float8 AS e")
        assert.is_true(math.abs(row.t - row.e) < 1e-5)
      end)
      conn:close()
      if not ok then error(err, 0) end
    end)
  end

  it("every other type comes back as the server's text: a date in ISO form whatever DateStyle",
    function()
    -- (a date is a day, not an instant: no epoch seconds for it)
    local conn = pgcoord.connect(nil, { size = 1, params = {
      options = "-c DateStyle=SQL,DMY -c TimeZone=Asia/Kathmandu" } })
    local ok, err = pcall(function()
      local row = conn:one([[SELECT date '2026-12-03' AS d, date '0044-03-15 BC' AS bc,
        interval '1 day 2 hours' AS i, time '07:08:09.5' AS t, ARRAY[1, 2, NULL] AS a,
        uuid 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11' AS u, inet '10.0.0.1/8' AS n]])
      assert.are.same({ d = "2026-12-03", bc = "0044-03-15 BC", i = "1 day 02:00:00",
        t = "07:08:09.5", a = "{1,2,NULL}", u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        n = "10.0.0.1/8" }, row)
    end)
    conn:close()
    if not ok then error(err, 0) end
  end)

  it("array literals: integers, and strings with quotes, backslashes and NULLs", function()
    local arrays = require "pgcoord.db"
    local list = { 'plain', 'with "quotes"', [[back\slash]], "a,b", "{braces}", "NULL", "",
                   " spaced ", "ünïcode" }
    local strings = #list
    list[strings + 2] = "after a hole"   -- list[strings + 1] stays nil: a NULL
    local n = strings + 2
    local text = arrays.text_array(list, n)
    assert.are.equal(n, db:one("SELECT array_length($1::text[], 1) AS n", text).n)
    -- arrays come back as text: read the elements back one by one
    for i = 1, n do
      local e = db:one("SELECT ($1::text[])[$2] AS v", text, i)
      assert.are.equal(list[i], e.v, "element " .. i)
    end
    local ints = arrays.int_array({ 1, -2, 9007199254740993 })
    assert.are.equal(9007199254740993, db:one("SELECT ($1::bigint[])[3] AS v", ints).v)
    assert.are.equal(-2, db:one("SELECT ($1::bigint[])[2] AS v", ints).v)
  end)

  it("core.set_metatables gives each row of a result the metatable", function()
    local core = require "pgcoord.core"
    local rows = db:query("SELECT g AS n FROM generate_series(1, 3) g")
    local mt = { __index = { twice = function(row) return row.n * 2 end } }
    core.set_metatables(rows, mt)
    for i = 1, 3 do assert.are.equal(2 * i, rows[i]:twice()) end
    assert.has_error(function() core.set_metatables({ 1 }, mt) end,
      "pgcoord: list element 1 is a number, not a table")
  end)

  it("micros_array writes epoch seconds as rounded microseconds, as math.floor(t * 1e6 + 0.5)",
    function()
      local arrays = require "pgcoord.db"
      local times = { 1764700148.1234567, 0, -1.5, 1.0000004, 1.0000006, 0.0000005 }
      local list = arrays.micros_array(times)
      for i, t in ipairs(times) do
        local v = db:one("SELECT ($1::bigint[])[$2] AS v", list, i).v
        assert.are.equal(math.floor(t * 1e6 + 0.5), v, "element " .. i)
      end
      assert.are.equal("{1,NULL}", arrays.micros_array({ 0.000001 }, 2))
      assert.has_error(function() arrays.micros_array({ "1" }) end,
        "pgcoord: array element 1 is a string, not a time in epoch seconds")
      assert.has_error(function() arrays.micros_array({ math.huge }) end,
        "pgcoord: array element 1 is a number, not a time in epoch seconds")
    end)

  it("infinite timestamps are math.huge", function()
    local row = db:one("SELECT 'infinity'::timestamptz AS a, '-infinity'::timestamptz AS b,"
      .. " 'infinity'::timestamp AS c, '-infinity'::timestamp AS d")
    assert.are.equal(math.huge, row.a)
    assert.are.equal(-math.huge, row.b)
    assert.are.equal(math.huge, row.c)
    assert.are.equal(-math.huge, row.d)
  end)

  it("timestamps at the ends of the server's range are epoch seconds", function()
    -- (the last microsecond of 294276 AD is past 2^63 microseconds from 1970
    -- once counted in microseconds from its day: it has to be read without
    -- that product; 4713 BC is the first day the server takes)
    local row = db:one([[SELECT t AS t, extract(epoch FROM t)::float8 AS e,
                                b AS b, extract(epoch FROM b)::float8 AS be
                           FROM (SELECT '294276-12-31 23:59:59.999999+00'::timestamptz AS t,
                                        '4713-01-01 00:00:00+00 BC'::timestamptz AS b) s]])
    assert.is_number(row.t)
    assert.is_true(math.abs(row.t - row.e) < 0.01, ("%.6f vs %.6f"):format(row.t, row.e))
    assert.is_number(row.b)
    assert.are.equal(row.be, row.b)
  end)
end)

describe("query results", function()
  after_each(function()
    close_pools()
    helper.cleanup()
  end)

  it("rows.affected for INSERT, UPDATE, DELETE and SELECT; exec returns the count", function()
    local db = pool({ size = 1 })
    local t = helper.unique("affected")
    db:exec(("CREATE TABLE %s (id int PRIMARY KEY, v text)"):format(t))
    local rows = db:query(
      ("INSERT INTO %s SELECT g, 'v' || g FROM generate_series(1, 3) g"):format(t))
    assert.are.equal(3, rows.affected)
    assert.are.equal(0, #rows)
    rows = db:query(("UPDATE %s SET v = 'changed' WHERE id <= 2"):format(t))
    assert.are.equal(2, rows.affected)
    rows = db:query(("DELETE FROM %s WHERE id = 1"):format(t))
    assert.are.equal(1, rows.affected)
    rows = db:query(("INSERT INTO %s VALUES ($1, $2) RETURNING id, v"):format(t), 10, "ten")
    assert.are.equal(1, rows.affected)
    assert.are.same({ id = 10, v = "ten" }, rows[1])
    assert.are.equal(3, db:exec(("DELETE FROM %s WHERE id > 1"):format(t))) -- 2, 3 and 10
    assert.are.equal(0, db:exec(("UPDATE %s SET v = 'x' WHERE false"):format(t)))
    rows = db:query("SELECT g FROM generate_series(1, 4) g")
    assert.are.equal(4, rows.affected)
    db:exec(("DROP TABLE %s"):format(t))
  end)

  it("one() returns the first row, or nil when there is none", function()
    local db = pool({ size = 1 })
    assert.is_nil(db:one("SELECT 1 AS x WHERE false"))
    assert.are.equal(1, db:one("SELECT g AS x FROM generate_series(1, 3) g ORDER BY g").x)
  end)

  it("a result that cannot be decoded raises in the task and the connection goes back", function()
    local db = pool({ size = 2 })
    local deep = ("["):rep(200) .. ("]"):rep(200)
    for _ = 1, 5 do -- more than the pool holds: no connection may stay leased
      local err = errors(db.one, db, "SELECT $1::json AS j", deep)
      assert.are.equal("22000", err.sqlstate)
      assert.matches("cannot read the query's result: .*nested too deep", tostring(err))
    end
    assert.are.equal(1, db:one("SELECT 1 AS x").x)
    assert_consistent(db)
  end)

  it("running out of memory while building rows raises 53200; the pool goes on", function()
    local script = helper.tmpname("oom") .. ".lua"
    helper.write_file(script, [[
      local pgcoord = require "pgcoord"
      local db = pgcoord.connect(nil, { size = 1 })
      local ok, err = pcall(db.query, db,
        "SELECT g AS a, g AS b, g AS c FROM generate_series(1, 3000000) g")
      print(ok, type(err) == "table" and err.sqlstate)
      print(db:one("SELECT 41 + 1 AS x").x)
    ]])
    -- (AddressSanitizer reserves terabytes of address space: no ulimit -v)
    if os.getenv("SANITIZE") == "address" then return end
    local code, out = helper.run({ "sh", "-c", "ulimit -v 500000; exec "
      .. helper.quote(helper.run_bin) .. " " .. helper.quote(script) }, { timeout = 60 })
    assert.are.equal(0, code, out)
    assert.are.equal("false\t53200\n42\n", out)
  end)
end)

describe("errors", function()
  after_each(function()
    close_pools()
    helper.cleanup()
  end)

  it("a syntax error is an error table with sqlstate 42601 and a readable tostring", function()
    local db = pool({ size = 1 })
    local err = errors(db.query, db, "SELEC 1")
    assert.are.equal("table", type(err))
    assert.is_true(pgcoord.is_error(err))
    assert.are.equal("42601", err.sqlstate)
    assert.matches('syntax error at or near "SELEC"', err.message, 1, true)
    local s = tostring(err)
    assert.matches('syntax error at or near "SELEC"', s, 1, true)
    assert.matches("42601", s, 1, true)
    assert.is_nil(s:find("\n"), "tostring spans lines: " .. s)
    assert.is_false(pgcoord.is_constraint_error(err))
  end)

  it("detail and hint are kept and shown on one line", function()
    local db = pool({ size = 1 })
    local err = errors(db.query, db, [[DO $$ BEGIN RAISE EXCEPTION 'bad thing'
      USING DETAIL = 'first' || chr(10) || 'second', HINT = 'try again', ERRCODE = 'P0001';
      END $$]])
    assert.are.equal("P0001", err.sqlstate)
    assert.are.equal("bad thing", err.message)
    assert.are.equal("first\nsecond", err.detail)
    assert.are.equal("try again", err.hint)
    local s = tostring(err)
    assert.matches("bad thing", s, 1, true)
    assert.matches("first second", s, 1, true)
    assert.matches("try again", s, 1, true)
    assert.is_nil(s:find("\n"))
  end)

  it("a named constraint violation is recognised", function()
    local db = pool({ size = 1 })
    local t = helper.unique("cons")
    local uq, ck = t .. "_v_key", t .. "_positive"
    db:exec(("CREATE TABLE %s (id int, v text, CONSTRAINT %s UNIQUE (v),"
      .. " CONSTRAINT %s CHECK (id > 0))"):format(t, uq, ck))
    db:exec(("INSERT INTO %s VALUES (1, 'a')"):format(t))
    local err = errors(db.exec, db, ("INSERT INTO %s VALUES (2, 'a')"):format(t))
    assert.are.equal("23505", err.sqlstate)
    assert.are.equal(uq, err.constraint)
    assert.is_true(pgcoord.is_constraint_error(err, uq))
    assert.is_true(pgcoord.is_constraint_error(err))
    assert.is_false(pgcoord.is_constraint_error(err, ck))
    assert.are.equal(t, err.table)
    assert.matches("already exists", err.detail, 1, true)
    assert.matches("constraint " .. uq, tostring(err), 1, true)
    err = errors(db.exec, db, ("INSERT INTO %s VALUES (-1, 'b')"):format(t))
    assert.are.equal("23514", err.sqlstate)
    assert.is_true(pgcoord.is_constraint_error(err, ck))
    assert.is_false(pgcoord.is_constraint_error("duplicate key", uq))
    assert.is_false(pgcoord.is_constraint_error({ sqlstate = "23505", constraint = uq }, uq))
    db:exec(("DROP TABLE %s"):format(t))
  end)

  it("bad parameters and sql give clear errors", function()
    local db = pool({ size = 1 })
    local err = errors(db.query, db, "SELECT $1", function() end)
    assert.matches("parameter $1", tostring(err), 1, true)
    assert.matches("function", tostring(err), 1, true)
    err = errors(db.query, db, "SELECT $1::jsonb", { f = print })
    assert.matches("JSON", tostring(err), 1, true)
    err = errors(db.query, db, 42)
    assert.matches("sql must be a string", tostring(err), 1, true)
    err = errors(db.query, db, "SELECT $1::int", "not a number")
    assert.are.equal("22P02", err.sqlstate)
    assert.are.equal(1, db:one("SELECT 1 AS x").x)
    assert_consistent(db)
  end)
end)

describe("SQL text and parameters", function()
  after_each(function()
    close_pools()
    helper.cleanup()
  end)

  it("SQL text with a NUL byte is refused by every function, naming it, at the caller", function()
    local db = pool({ size = 1 })
    local sql = "SELECT 1 AS x\0; SELECT pg_sleep(5)"
    local calls = {
      -- (no tail calls: the caller's line is what the message must name)
      ["db:query"] = function() local r = db:query(sql) return r end,
      ["db:one"] = function() local r = db:one(sql) return r end,
      ["db:exec"] = function() local r = db:exec(sql) return r end,
      ["db:script"] = function() local r = db:script(sql) return r end,
      ["tx:query"] = function() db:tx(function(tx) local r = tx:query(sql) return r end) end,
      ["tx:one"] = function() db:tx(function(tx) local r = tx:one(sql) return r end) end,
      ["tx:exec"] = function() db:tx(function(tx) local r = tx:exec(sql) return r end) end,
    }
    for name, call in pairs(calls) do
      local elapsed, msg = helper.timed(helper.error_of, call)
      assert.matches("^spec/db_spec.lua:%d+: pgcoord: " .. name:gsub("%p", "%%%0")
        .. ": the SQL text contains a NUL byte %(byte 14%)", msg)
      assert.is_true(elapsed < 2, name .. " ran the text after the NUL byte")
    end
    assert.are.equal(1, db:one("SELECT 1 AS x").x)
    assert_consistent(db)
  end)

  it("a string with NUL bytes goes to a bytea parameter and nowhere else", function()
    for _, prepare in ipairs({ true, false }) do
      local db = pool({ size = 1, prepare = prepare })
      -- sent as binary, these would read as the int 34 and the boolean false
      for _, case in ipairs({ { "SELECT $1::int AS x", "\0\0\0\34" },
                              { "SELECT $1::bool AS x", "\0" },
                              { "SELECT $2::text AS x, $1::bytea AS b", "\0", "a\0b" } }) do
        local err = errors(db.one, db, case[1], table.unpack(case, 2))
        assert.matches("pgcoord: parameter $" .. (#case - 1)
          .. ": a string with NUL bytes can only go to a bytea parameter", tostring(err), 1, true)
      end
      assert.are.equal("a\0b", db:one("SELECT $1::bytea AS b", "a\0b").b)
      assert_consistent(db)
    end
  end)

  it("past the statements a connection keeps, strings still reach bytea as their bytes", function()
    local db = pool({ size = 1 })
    for i = 1, 300 do assert.are.equal(i, db:one(("SELECT %d AS x"):format(i)).x) end
    local err = errors(db.one, db, "SELECT $1::int AS x, 301", "\0\0\0\34")
    assert.matches("can only go to a bytea parameter", tostring(err), 1, true)
    assert.are.equal("a\0b", db:one("SELECT $1::bytea AS b, 302", "a\0b").b)
    assert.are.equal("\\x41", db:one("SELECT $1::bytea AS b, 303", "\\x41").b)
  end)

  it("bytea parameters keep backslashes and non-UTF-8 bytes without named statements", function()
    local db = pool({ size = 1, prepare = false })
    for _, s in ipairs({ "\255\254\253", "a\\x41", "\\", "\200\\000" }) do
      local ok, row = pcall(db.one, db, "SELECT $1::bytea AS b, length($1::bytea) AS n", s)
      assert.is_true(ok, ("bytea parameter %q failed: %s"):format(s, tostring(row)))
      assert.are.equal(s, row.b)
      assert.are.equal(#s, row.n)
    end
  end)
end)

describe("prepared statements", function()
  after_each(function()
    close_pools()
    helper.cleanup()
  end)

  local SQL = "SELECT $1::int + 1 AS x"
  local function named(db, sql)
    return db:query("SELECT name FROM pg_prepared_statements WHERE statement = $1", sql)
  end

  it("a direct pool prepares each text once, under a name derived from the text", function()
    local a, b = pool({ size = 1 }), pool({ size = 1 })
    assert.are.equal(2, a:one(SQL, 1).x)
    assert.are.equal(3, a:one(SQL, 2).x)
    assert.are.equal(4, b:one(SQL, 3).x)
    local in_a, in_b = named(a, SQL), named(b, SQL)
    assert.are.equal(1, #in_a)
    assert.matches("^pgc_%x+_%x+$", in_a[1].name)
    assert.are.same(in_a, in_b) -- another connection, the same name
    assert.are.equal(5, a:tx(function(tx) return tx:one(SQL, 4).x end))
    assert.are.equal(0, #named(a, "BEGIN"), "transaction control is not worth a statement")
    assert.are.equal(1, #named(a, SQL))
    local off = pool({ size = 1, prepare = false })
    assert.are.equal(2, off:one(SQL, 1).x)
    assert.are.equal(0, off:one("SELECT count(*)::int AS n FROM pg_prepared_statements").n)
  end)

  it("a statement gone from the server runs unnamed outside a transaction, then named again",
    function()
    local db = pool({ size = 1 })
    assert.are.equal(2, db:one(SQL, 1).x)
    db:exec("DEALLOCATE ALL")
    assert.are.equal(3, db:one(SQL, 2).x)
    assert.are.equal(4, db:one(SQL, 3).x)
    assert.are.equal(1, #named(db, SQL))
    -- inside a transaction the statement cannot be run again: the error says why
    db:exec("DEALLOCATE ALL")
    local err = errors(db.tx, db, function(tx) return tx:one(SQL, 4) end)
    assert.are.equal("26000", err.sqlstate)
    assert.matches("pooler in transaction mode", tostring(err), 1, true)
    assert.are.equal(5, db:tx(function(tx) return tx:one(SQL, 4).x end))
    assert_consistent(db)
  end)

  it("a table changed under a statement fails one transaction at most, then is prepared anew",
    function()
    local db = pool({ size = 1 })
    local t = helper.unique("changed")
    db:exec(("CREATE TABLE %s (a int)"):format(t))
    db:exec(("INSERT INTO %s VALUES (1)"):format(t))
    local sql = ("SELECT * FROM %s"):format(t)
    assert.are.same({ a = 1 }, db:one(sql))
    db:exec(("ALTER TABLE %s ADD COLUMN b int DEFAULT 2"):format(t))
    assert.are.same({ a = 1, b = 2 }, db:one(sql)) -- outside a transaction: at once
    assert.are.same({ a = 1, b = 2 }, db:one(sql)) -- prepared anew
    db:exec(("ALTER TABLE %s ADD COLUMN c int DEFAULT 3"):format(t))
    local err = errors(db.tx, db, function(tx) return tx:one(sql) end)
    assert.are.equal("0A000", err.sqlstate)
    for _ = 1, 2 do
      assert.are.same({ a = 1, b = 2, c = 3 }, db:tx(function(tx) return tx:one(sql) end))
    end
    assert.are.equal(1, #named(db, sql))
    db:exec(("DROP TABLE %s"):format(t))
  end)
end)

describe("connecting", function()
  after_each(function()
    close_pools()
    helper.cleanup()
  end)

  it("a closed port on 127.0.0.1 fails fast with a clear message", function()
    local relay = helper.relay("127.0.0.1", 0)
    local port = relay.port
    relay.stop() -- nothing listens there any more
    local dsn = ("postgresql://pgcoord@127.0.0.1:%d/pgcoord"):format(port)
    local elapsed, ok, err = helper.timed(pcall, pgcoord.connect, dsn, { connect_timeout = 10 })
    assert.is_false(ok)
    assert.is_true(elapsed < 3, "took " .. elapsed)
    assert.is_true(pgcoord.is_error(err))
    assert.are.equal("08001", err.sqlstate)
    local s = tostring(err)
    assert.matches("cannot connect", s, 1, true)
    assert.matches(tostring(port), s, 1, true)
    assert.matches("refused", s, 1, true)
  end)

  it("a server that never answers fails within connect_timeout", function()
    local relay = helper.relay("127.0.0.1", 0)
    local dsn = relay.dsn()
    local password = helper.tcp_parts().password
    local elapsed, ok, err = helper.timed(pcall, pgcoord.connect, dsn, { connect_timeout = 1 })
    assert.is_false(ok)
    assert.is_true(elapsed >= 0.9, "gave up after " .. elapsed)
    assert.is_true(elapsed < 2.5, "gave up after " .. elapsed)
    local s = tostring(err)
    assert.matches("timeout", s, 1, true)
    assert.are.equal("08001", err.sqlstate)
    if password and password ~= "" then
      assert.is_nil(s:find(password, 1, true), "the password leaked: " .. s)
    end
    relay.stop()
  end)

  it("a wrong password fails with a clear message that does not show the password", function()
    local t = helper.tcp_parts()
    assert.truthy(t.user, "cannot parse the TCP DSN " .. helper.tcp_dsn())
    local secret = "wrong-Secret-pw-" .. helper.pid
    local dsn = ("postgresql://%s:%s@%s:%d/%s"):format(t.user, secret, t.host, t.port, t.dbname)
    local ok, err = pcall(pgcoord.connect, dsn, { connect_timeout = 5 })
    assert.is_false(ok)
    local s = tostring(err)
    assert.matches("password authentication failed", s, 1, true)
    assert.is_nil(s:find(secret, 1, true), "the password leaked: " .. s)
    assert.is_nil(tostring(err.message):find(secret, 1, true))
    -- in key=value form too
    local kv = ("host=%s port=%d user=%s dbname=%s password=%s")
      :format(t.host, t.port, t.user, t.dbname, secret)
    ok, err = pcall(pgcoord.connect, kv, { connect_timeout = 5 })
    assert.is_false(ok)
    s = tostring(err)
    assert.matches("password authentication failed", s, 1, true)
    assert.is_nil(s:find(secret, 1, true), "the password leaked: " .. s)
  end)

  it("connects over TCP with the right password", function()
    local db = pool({ size = 1 }, helper.tcp_dsn())
    local row = db:one("SELECT inet_server_addr() IS NOT NULL AS tcp, current_user AS u")
    assert.is_true(row.tcp)
    assert.are.equal(helper.tcp_parts().user, row.u)
  end)

  it("bad option names and values give clear errors", function()
    local cases = {
      { { sise = 5 }, 'unknown option "sise"' },
      { { size = 0 }, "option size must be an integer >= 1" },
      { { size = 2.5 }, "option size must be an integer >= 1" },
      { { size = "5" }, "option size must be an integer" },
      { { connect_timeout = 0 }, "connect_timeout must be a number > 0" },
      { { params = "application_name=x" }, "option params must be a table" },
      { { params = { application_name = {} } }, "params.application_name must be a string" },
      { "size=5", "options must be a table" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(function()
        local p = pgcoord.connect(nil, c[1]) -- not a tail call: the error blames this line
        return p
      end)
      assert.is_false(ok)
      assert.matches(c[2], tostring(err), 1, true)
      assert.matches("db_spec.lua", tostring(err), 1, true) -- blames the caller
    end
    local ok, err = pcall(pgcoord.connect, 42)
    assert.is_false(ok)
    assert.matches("conninfo must be a string", tostring(err), 1, true)
  end)

  it("bad connection parameters and conninfo give clear errors", function()
    local ok, err = pcall(pgcoord.connect, nil, { params = { bogus_option = "1" } })
    assert.is_false(ok)
    assert.matches("bogus_option", tostring(err), 1, true)
    ok, err = pcall(pgcoord.connect, "postgresql://127.0.0.1:notaport/db")
    assert.is_false(ok)
    assert.matches("notaport", tostring(err), 1, true)
    ok, err = pcall(pgcoord.connect, "host=127.0.0.1 nonsense")
    assert.is_false(ok)
    assert.matches("nonsense", tostring(err), 1, true)
  end)

  local function conninfo_child(env, unset)
    local code, out = helper.run({ "pgcoord-run", "-e", [[
      local db = pgcoord.connect(nil, { size = 1 })
      local row = db:one("SELECT current_setting('application_name') AS a")
      print("APP=" .. row.a)
      db:close()
    ]] }, { env = env, unset = unset })
    return code, out
  end

  local function with_param(dsn, k, v)
    return dsn .. (dsn:find("?", 1, true) and "&" or "?") .. k .. "=" .. v
  end

  it("takes the conninfo from PGCOORD_DATABASE_URL first", function()
    local code, out = conninfo_child({
      PGCOORD_DATABASE_URL = with_param(helper.tcp_dsn(), "application_name", "from_pgcoord_url"),
      DATABASE_URL = "postgresql://nobody@127.0.0.1:1/nothing",
      PGHOST = "/nonexistent", PGPORT = "1",
    })
    assert.are.equal(0, code, out)
    assert.matches("APP=from_pgcoord_url", out, 1, true)
  end)

  it("then from DATABASE_URL, then from libpq's PG* environment", function()
    local code, out = conninfo_child({
      DATABASE_URL = with_param(helper.tcp_dsn(), "application_name", "from_database_url"),
      PGHOST = "/nonexistent", PGPORT = "1",
    }, { "PGCOORD_DATABASE_URL" })
    assert.are.equal(0, code, out)
    assert.matches("APP=from_database_url", out, 1, true)
    code, out = conninfo_child({ PGAPPNAME = "from_pg_env" },
      { "PGCOORD_DATABASE_URL", "DATABASE_URL" })
    assert.are.equal(0, code, out)
    assert.matches("APP=from_pg_env", out, 1, true)
  end)
end)

describe("failures", function()
  after_each(function()
    close_pools()
    helper.cleanup()
  end)

  it("the test relay forwards, and holds traffic while its link is dead", function()
    local t = helper.tcp_parts()
    local relay = helper.relay(t.host, t.port)
    local db, app = pool({ size = 1 }, relay.dsn())
    assert.are.equal(1, db:one("SELECT 1 AS x").x)
    relay.blackhole()
    local q = helper.spawn(function() return db:one("SELECT 'through the relay' AS s").s end)
    helper.wait_until(function() return db:stats().in_use == 1 end, 5, "the query to be sent")
    -- the server never sees the query while the link is dead
    for _ = 1, 3 do
      local b = helper.backends(app)
      assert.are.equal(1, #b)
      assert.are.equal("idle", b[1].state)
      assert.is_nil(b[1].query:find("through the relay", 1, true))
      assert.are.equal("running", q:status())
    end
    relay.resume()
    assert.are.equal("through the relay", q:join())
    relay.blackhole()
    relay.resume()
    assert.are.equal(2, db:one("SELECT 2 AS x").x)
    db:close()
    relay.stop()
  end)

  it("a backend terminated mid-query fails the task with 08006 and the pool heals", function()
    local db, app = pool({ size = 2 })
    local t = helper.spawn(function() return db:query("SELECT pg_sleep(30)") end)
    local pid = active_backend(app, "pg_sleep(30)")
    assert.is_true(helper.admin():one("SELECT pg_terminate_backend($1) AS ok", pid).ok)
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.is_true(pgcoord.is_error(err), tostring(err))
    assert.are.equal("08006", err.sqlstate)
    assert_consistent(db)
    -- the next queries work, also in parallel
    local tasks = {}
    for i = 1, 4 do
      tasks[i] = helper.spawn(function() return db:one("SELECT $1::int AS x", i).x end)
    end
    for i = 1, 4 do assert.are.equal(i, tasks[i]:join()) end
    assert_consistent(db)
    helper.wait_until(function() return count_backends(app) == db:stats().open end, 5,
      "the server and the pool to agree")
  end)

  it("idle connections killed on the server are noticed and replaced", function()
    local db, app = pool({ size = 3 })
    local tasks = {}
    for i = 1, 3 do
      tasks[i] = helper.spawn(function()
        return db:one("SELECT $1::int AS x FROM pg_sleep(0.05)", i).x
      end)
    end
    for i = 1, 3 do tasks[i]:join() end
    assert.are.equal(3, db:stats().idle)
    helper.wait_until(function() return count_backends(app) == 3 end, 5, "three backends")
    local lines = helper.capture_log(function()
      helper.admin():query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        .. " WHERE application_name = $1", app)
      helper.wait_until(function() return db:stats().open == 0 end, 5, "the pool to notice")
    end)
    assert.matches("idle connection lost", table.concat(lines, "\n"), 1, true)
    assert.are.equal(7, db:one("SELECT 7 AS x").x)
    assert_consistent(db)
    assert.are.equal(1, db:stats().open)
  end)

  it("cancelling a task mid-query drops the connection and the query on the server", function()
    local db, app = pool({ size = 2 })
    local t = helper.spawn(function() return db:query("SELECT pg_sleep(30)") end)
    local pid = active_backend(app, "pg_sleep(30)")
    local t0 = pgcoord.now()
    t:cancel()
    assert.are.equal("cancelled", t:status())
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.is_true(pgcoord.is_cancelled(err))
    helper.wait_until(function()
      return helper.admin():one(
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE pid = $1", pid).n == 0
    end, 5, "the server-side query to go away")
    assert.is_true(pgcoord.now() - t0 < 5)
    -- the pool stops the abandoned query from a task of its own
    helper.wait_until(function() return db:stats().in_use == 0 end, 5, "the pool to settle")
    assert_consistent(db)
    assert.are.equal(1, db:one("SELECT 1 AS x").x)
  end)
end)

-- A query inside a task parks the task in C (core.wait_prepared and
-- wait_send): the outcome resumes it without task.await's Lua.  These are
-- the rules task.await keeps that the C wait must keep too.
describe("a task waiting on a query", function()
  after_each(function()
    close_pools()
    helper.cleanup()
  end)

  it("gets its rows, and a task its query ends finishes: join has its results", function()
    local db = pool({ size = 3 })
    local tasks = {}
    for i = 1, 30 do
      tasks[i] = helper.spawn(function()
        local sum = 0
        for j = 1, 20 do sum = sum + db:one("SELECT $1::int * $2::int AS v", i, j).v end
        return sum, db:one("SELECT $1::text AS s", "last of " .. i).s
      end)
    end
    for i = 1, 30 do
      assert.is_true(tasks[i]:wait(10), "task " .. i .. " did not end")
      local sum, last = tasks[i]:join()
      assert.are.equal(i * 210, sum)
      assert.are.equal("last of " .. i, last)
    end
    assert_consistent(db)
  end)

  it("a task failing right after its query is resumed ends as failed and is logged", function()
    local db = pool({ size = 1 })
    local lines = helper.capture_log(function()
      local t = helper.spawn(function()
        local v = db:one("SELECT 5 AS v").v
        error("failed after the query: " .. v)
      end)
      helper.wait_until(function() return t:status() == "failed" end, 5, "the task to fail")
    end)
    local all = table.concat(lines, "\n")
    assert.matches("failed after the query: 5", all, 1, true)
    assert.matches("task failed", all, 1, true)
    assert_consistent(db)
  end)

  it("in a plain coroutine is a clear error, and nothing is sent", function()
    local db = pool({ size = 1 })
    local err = helper.spawn(function()
      local co = coroutine.wrap(function() return select(2, pcall(db.one, db, "SELECT 1")) end)
      return co()
    end):join()
    assert.matches("plain coroutine", tostring(err), 1, true)
    assert_consistent(db)
    assert.are.equal(1, db:one("SELECT 1 AS x").x)
  end)

  it("a cancel that came while the task ran raises at its next query, which is not sent", function()
    local db = pool({ size = 1 })
    local tbl = helper.unique("parked")
    db:exec(("CREATE TABLE %s (x int)"):format(tbl))
    local insert = ("INSERT INTO %s VALUES ($1)"):format(tbl)
    db:exec(insert, 0) -- (prepared now: the task's run of it is a plain wait)
    local reached = false
    local t
    t = helper.spawn(function()
      -- (a cancel from a coroutine this task resumed: the task is running
      -- then, so the cancel waits for the task's next wait)
      coroutine.wrap(function() t:cancel() end)()
      db:exec(insert, 1)
      reached = true
    end)
    t:wait()
    assert.are.equal("cancelled", t:status())
    assert.is_false(reached)
    assert.are.equal(0, db:one(("SELECT count(*)::int AS n FROM %s WHERE x = 1"):format(tbl)).n)
    db:exec(("DROP TABLE %s"):format(tbl))
    assert_consistent(db)
  end)

  it("a connection closed by another task fails the waiter with 08003, after the closer's step",
    function()
    local db, app = pool({ size = 1 })
    local conn = require("pgcoord.db").open(db)
    local order = {}
    local waiter = helper.spawn(function()
      local ok, err = pcall(require("pgcoord.db").run, conn, "SELECT pg_sleep(3)")
      order[#order + 1] = "waiter"
      return ok, err
    end)
    active_backend(app, "pg_sleep(3)")
    helper.spawn(function()
      conn:close()
      -- (the waiter's resume waits in the queue: it never runs inside this task)
      order[#order + 1] = "closer"
    end):join()
    local ok, err = waiter:join()
    assert.is_false(ok)
    assert.are.equal("08003", err.sqlstate)
    assert.are.same({ "closer", "waiter" }, order)
  end)
end)

describe("transactions", function()
  local db, t
  before_each(function()
    db = pool({ size = 2 })
    t = helper.unique("tx")
    db:exec(("CREATE TABLE %s (id int PRIMARY KEY, v text)"):format(t))
  end)
  after_each(function()
    pcall(db.exec, db, ("DROP TABLE IF EXISTS %s"):format(t))
    close_pools()
    helper.cleanup()
  end)

  local function ids()
    local out = {}
    for _, r in ipairs(db:query(("SELECT id FROM %s ORDER BY id"):format(t))) do
      out[#out + 1] = r.id
    end
    return out
  end

  it("commits and returns fn's results", function()
    local a, b, c = db:tx(function(tx, x)
      tx:exec(("INSERT INTO %s VALUES (1, 'one')"):format(t))
      local row = tx:one(("SELECT v FROM %s WHERE id = 1"):format(t))
      return row.v, x, nil
    end, "arg")
    assert.are.equal("one", a)
    assert.are.equal("arg", b)
    assert.is_nil(c)
    assert.are.same({ 1 }, ids())
    assert_consistent(db)
  end)

  it("rolls back on error and re-raises the same error", function()
    local e = { code = "mine" }
    local ok, err = pcall(db.tx, db, function(tx)
      tx:exec(("INSERT INTO %s VALUES (1, 'one')"):format(t))
      error(e)
    end)
    assert.is_false(ok)
    assert.are.equal(e, err)
    assert.are.same({}, ids())
    -- a database error inside is re-raised as such
    ok, err = pcall(db.tx, db, function(tx)
      tx:exec(("INSERT INTO %s VALUES (1, 'one')"):format(t))
      tx:exec(("INSERT INTO %s VALUES (1, 'again')"):format(t))
    end)
    assert.is_false(ok)
    assert.is_true(pgcoord.is_constraint_error(err, t .. "_pkey"))
    assert.are.same({}, ids())
    assert_consistent(db)
  end)

  it("a statement error that fn caught: nothing is committed and tx raises 25P02", function()
    local ok, err = pcall(db.tx, db, function(tx)
      tx:exec(("INSERT INTO %s VALUES (1, 'one')"):format(t))
      pcall(tx.exec, tx, "SELECT 1 / 0")
      return "done"
    end)
    assert.is_false(ok, "db:tx returned as if committed")
    assert.are.equal("25P02", err.sqlstate)
    assert.matches("fn caught its error: rolled back, nothing committed", tostring(err), 1, true)
    assert.are.same({}, ids())
    -- a savepoint that took the error leaves the transaction fit to commit
    assert.are.equal("kept", db:tx(function(tx)
      tx:exec(("INSERT INTO %s VALUES (2, 'two')"):format(t))
      pcall(tx.tx, tx, function(sp) sp:exec("SELECT 1 / 0") end)
      return "kept"
    end))
    assert.are.same({ 2 }, ids())
    assert_consistent(db)
  end)

  it("a nested tx is a savepoint: its failure undoes only its own work", function()
    db:tx(function(tx)
      tx:exec(("INSERT INTO %s VALUES (1, 'outer')"):format(t))
      local ok, err = pcall(tx.tx, tx, function(inner)
        inner:exec(("INSERT INTO %s VALUES (2, 'inner')"):format(t))
        error("inner fails")
      end)
      assert.is_false(ok)
      assert.matches("inner fails", err, 1, true)
      local r = tx:tx(function(inner)
        inner:exec(("INSERT INTO %s VALUES (3, 'inner ok')"):format(t))
        return "kept"
      end)
      assert.are.equal("kept", r)
      tx:exec(("INSERT INTO %s VALUES (4, 'outer again')"):format(t))
    end)
    assert.are.same({ 1, 3, 4 }, ids())
  end)

  it("an error at COMMIT (a deferred constraint) is raised and nothing is kept", function()
    local d = helper.unique("deferred")
    db:exec(("CREATE TABLE %s (v int, CONSTRAINT %s_u UNIQUE (v) DEFERRABLE INITIALLY DEFERRED)")
      :format(d, d))
    local ok, err = pcall(db.tx, db, function(tx)
      tx:exec(("INSERT INTO %s VALUES (1), (1)"):format(d))
    end)
    assert.is_false(ok)
    assert.is_true(pgcoord.is_constraint_error(err, d .. "_u"), tostring(err))
    assert.are.equal(0, db:one(("SELECT count(*)::int AS n FROM %s"):format(d)).n)
    assert_consistent(db)
    db:exec(("DROP TABLE %s"):format(d))
  end)

  it("using a transaction after it ended is a clear error", function()
    local saved
    db:tx(function(tx) saved = tx end)
    local ok, err = pcall(saved.query, saved, "SELECT 1")
    assert.is_false(ok)
    assert.matches("already ended", tostring(err), 1, true)
  end)

  it("rolls back when the task is cancelled inside the transaction", function()
    local tdb, app = pool({ size = 1 })
    local inserted = false
    local task = helper.spawn(function()
      tdb:tx(function(tx)
        tx:exec(("INSERT INTO %s VALUES (1, 'doomed')"):format(t))
        inserted = true
        pgcoord.sleep(30)
      end)
    end)
    helper.wait_until(function() return inserted end, 5, "the insert")
    helper.wait_until(function()
      local b = helper.backends(app)
      return #b == 1 and b[1].state == "idle in transaction"
    end, 5, "the transaction to be open on the server")
    task:cancel()
    assert.are.equal("cancelled", task:status())
    assert_consistent(tdb)
    helper.wait_until(function()
      for _, r in ipairs(helper.backends(app)) do
        if r.state ~= "idle" then return false end
      end
      return true
    end, 5, "no transaction left open on the server")
    assert.are.same({}, ids())
    -- the pool goes on
    tdb:exec(("INSERT INTO %s VALUES (2, 'fine')"):format(t))
    assert.are.same({ 2 }, ids())
  end)
end)

describe("publish", function()
  after_each(function()
    close_pools()
    helper.cleanup()
  end)

  it("sends payloads up to PostgreSQL's limit, in a pool or a transaction", function()
    local db = pool({ size = 1 })
    local chan = helper.unique("chan")
    local sub = pgcoord.subscriber((pool({ size = 1 })))
    local fan = sub:add(pgcoord.fanout(chan))
    local got = fan:listen()
    sub:start()
    helper.wait_until(function() return sub:connected() end, 5, "the subscriber to connect")
    pgcoord.publish(db, chan, { hello = "world", n = 1 })
    pgcoord.publish(db, chan, string.rep("x", 7997)) -- 7999 bytes of JSON
    assert.are.same({ hello = "world", n = 1 }, got:receive(5))
    assert.are.equal(string.rep("x", 7997), got:receive(5))
    db:tx(function(tx)
      pgcoord.publish(tx, chan, { in_tx = true })
      assert.are.same({ nil, "timeout" }, { got:receive(0.1) })  -- not before the commit
    end)
    assert.are.same({ in_tx = true }, got:receive(5))
    sub:stop()
    got:close()
  end)

  it("rejects a payload over 8000 bytes with a clear error", function()
    local db = pool({ size = 1 })
    local chan = helper.unique("chan")
    local ok, err = pcall(pgcoord.publish, db, chan, { data = string.rep("y", 9000) })
    assert.is_false(ok)
    local s = tostring(err)
    assert.matches("8000", s, 1, true)
    assert.matches(chan, s, 1, true)
    ok, err = pcall(pgcoord.publish, db, chan, string.rep("x", 7998)) -- exactly 8000 bytes
    assert.is_false(ok)
    assert.matches("8000", tostring(err), 1, true)
    assert.are.equal(1, db:one("SELECT 1 AS x").x)
  end)

  it("rejects values that JSON cannot carry", function()
    local db = pool({ size = 1 })
    local chan = helper.unique("chan")
    local bad = { function() end, { f = function() end }, 0 / 0, coroutine.create(print) }
    for _, v in ipairs(bad) do
      local ok, err = pcall(pgcoord.publish, db, chan, v)
      assert.is_false(ok)
      assert.matches("cannot encode", tostring(err), 1, true)
      assert.matches(chan, tostring(err), 1, true)
    end
    local ok, err = pcall(pgcoord.publish, db, "", 1)
    assert.is_false(ok)
    assert.matches("channel", tostring(err), 1, true)
  end)
end)

describe("migrations", function()
  after_each(function()
    close_pools()
    helper.cleanup()
  end)

  local function sql_files()
    return require("pgcoord.migrate").files()
  end

  it("applies the schema once and is idempotent", function()
    local name = helper.create_database("mig")
    local db = pool({ size = 2 }, helper.conninfo_for(name))
    local files = sql_files()
    assert.is_true(#files >= 1)
    local applied = pgcoord.migrate(db)
    assert.are.equal(#files, #applied)
    assert.are.same({}, pgcoord.migrate(db))
    local row = db:one(
      "SELECT count(*)::int AS n, min(version) AS lo FROM pgcoord.schema_migrations")
    assert.are.equal(#files, row.n)
    assert.are.equal(files[1].version, row.lo)
  end)

  it("two concurrent migrations both succeed and apply each file once", function()
    local name = helper.create_database("mig")
    local a = pool({ size = 1 }, helper.conninfo_for(name))
    local b = pool({ size = 1 }, helper.conninfo_for(name))
    local ta = helper.spawn(pgcoord.migrate, a)
    local tb = helper.spawn(pgcoord.migrate, b)
    local ra, rb = ta:join(), tb:join()
    local files = sql_files()
    assert.are.equal(#files, #ra + #rb)
    assert.is_true(#ra == 0 or #rb == 0, "both applied migrations")
    assert.are.equal(#files, a:one("SELECT count(*)::int AS n FROM pgcoord.schema_migrations").n)
  end)

  it("pgcoord-run --print-sql prints the same schema", function()
    local code, out = helper.run({ "pgcoord-run", "--print-sql" })
    assert.are.equal(0, code, out)
    assert.matches("CREATE SCHEMA IF NOT EXISTS pgcoord", out, 1, true)
    assert.matches("pgcoord.schema_migrations", out, 1, true)
    for _, f in ipairs(sql_files()) do assert.matches(f.name, out, 1, true) end
    -- applying it by hand leaves nothing for migrate to do
    local name = helper.create_database("mig")
    local db = pool({ size = 1 }, helper.conninfo_for(name))
    db:script(out)
    assert.are.same({}, pgcoord.migrate(db))
  end)
end)

describe("a server restart", function()
  before_each(function()
    if not helper.can_pgctl() then
      pending("needs PGCOORD_TEST_PGCTL (run under scripts/pg-tmp)")
    end
  end)
  after_each(function()
    close_pools()
    helper.cleanup()
  end)

  it("fails the query in flight with 08006; the pool then works", function()
    local db, app = pool({ size = 2 })
    local t = helper.spawn(function() return db:query("SELECT pg_sleep(30)") end)
    active_backend(app, "pg_sleep(30)")
    helper.pgctl("restart")
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.are.equal("08006", err.sqlstate, tostring(err))
    helper.wait_until(function() return db:stats().open == 0 end, 5,
      "the pool to drop its connections")
    assert.are.equal(1, db:one("SELECT 1 AS x").x)
    assert_consistent(db)
  end)

  it("does not hand out idle connections the restart killed", function()
    local db = pool({ size = 2 })
    local tasks = {}
    for i = 1, 2 do
      tasks[i] = helper.spawn(function() return db:one("SELECT 1 AS x FROM pg_sleep(0.02)").x end)
    end
    for i = 1, 2 do tasks[i]:join() end
    assert.are.equal(2, db:stats().idle)
    helper.pgctl("restart")
    -- no loop iteration in between: the pool must check what it hands out
    local ok, row = pcall(db.one, db, "SELECT 2 AS x")
    assert.is_true(ok, "first query after the restart failed: " .. tostring(row))
    assert.are.equal(2, row.x)
    assert_consistent(db)
  end)

  it("while the server is down, connecting fails clearly; once up, the pool works", function()
    local db = pool({ size = 1 })
    helper.pgctl("stop")
    local ok, err = pcall(function()
      helper.wait_until(function() return db:stats().open == 0 end, 5, "the pool to notice")
      local cok, cerr = pcall(db.one, db, "SELECT 1 AS x")
      assert.is_false(cok)
      assert.are.equal("08001", cerr.sqlstate, tostring(cerr))
      assert.matches("cannot connect", tostring(cerr), 1, true)
      assert_consistent(db)
    end)
    helper.pgctl("start")
    if not ok then error(err, 0) end
    assert.are.equal(1, db:one("SELECT 1 AS x").x)
  end)
end)

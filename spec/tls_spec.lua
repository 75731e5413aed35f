-- The pool, the subscriber and cancellation over TLS (sslmode=require to
-- the test cluster, which scripts/pg-tmp starts with ssl = on and a
-- self-signed certificate).  With TLS, libpq can hold decrypted data that
-- the socket no longer signals: every case here would hang on it, so each
-- runs under a deadline.
local pgcoord = require "pgcoord"
local helper = require "helper"

local function env(name)
  local v = os.getenv(name)
  if not v or v == "" then
    error(name .. " is not set: run the specs under scripts/pg-tmp, which starts the"
      .. " cluster with ssl = on", 2)
  end
  return v
end

local function tls_dsn(extra)
  local dsn = env("PGCOORD_TEST_TLS_DSN")
  for k, v in pairs(extra or {}) do
    dsn = dsn:gsub("([?&])" .. k .. "=[^&]*&?", "%1")
    dsn = dsn .. (dsn:find("[?&]$") and "" or "&") .. k .. "=" .. v
  end
  return dsn
end

local function tls_pool(opts, extra)
  local db, app = helper.connect(opts or { size = 2 }, tls_dsn(extra))
  return db, app
end

-- fn() in a task of its own, which must end within seconds; its results.
local function within(seconds, what, fn)
  local t = helper.spawn(fn)
  if not t:wait(seconds) then
    t:cancel()
    error(("%s: still running after %gs (stuck on TLS-buffered data?)"):format(what, seconds), 2)
  end
  return t:join()
end

-- The pool's backends run over TLS.
local function assert_tls(db, app)
  local row = db:one([[SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
    WHERE a.application_name = $1 AND s.pid = pg_backend_pid()]], app)
  assert.is_true(row and row.ssl, "the connection does not use TLS")
end

describe("TLS (sslmode=require)", function()
  after_each(function()
    helper.cleanup()
  end)

  it("connects over TLS", function()
    local db, app = tls_pool()
    assert_tls(db, app)
    db:close()
  end)

  it("delivers a flood of 50,000 notifications, the last one included", function()
    local db = tls_pool({ size = 3 })
    -- no pings: nothing else arrives that could push out a stuck tail
    local sub = pgcoord.subscriber(db, { ping_interval = 300, ping_grace = 420 })
    local fan = pgcoord.fanout(helper.unique("tls_flood"))
    sub:add(fan)
    local got, last = 0, nil
    fan:on(function(msg)
      got = got + 1
      last = msg
    end)
    sub:start()
    helper.wait_until(function() return sub:connected() end, 10, "the subscriber to listen")
    local n = 50000
    -- payloads of varied length, so the stream's TLS records end anywhere
    within(60, "publishing", function()
      for first = 1, n, 5000 do
        db:query([[SELECT pg_notify($1, json_build_object('n', g, 'pad', repeat('p', g % 97))::text)
          FROM generate_series($2::int, $3::int) g]], fan.channel, first, first + 4999)
      end
    end)
    helper.wait_until(function() return got == n end, 60,
      "50,000 notifications (got them so far: a stall shows as a count stuck below)")
    assert.are.equal(n, last.n)
    sub:stop()
    db:close()
  end)

  it("reads results of 20 MB, in many rows and in one value", function()
    local db = tls_pool()
    local rows = within(60, "20,000 rows of 1,000 bytes", function()
      return db:query("SELECT g, repeat('x', 1000) AS s FROM generate_series(1, 20000) g")
    end)
    assert.are.equal(20000, #rows)
    assert.are.equal(20000, rows[20000].g)
    assert.are.equal(1000, #rows[20000].s)
    local one = within(60, "one value of 20 MB", function()
      return db:one("SELECT repeat('y', 20 * 1024 * 1024) AS s")
    end)
    assert.are.equal(20 * 1024 * 1024, #one.s)
    -- and the connection is fine for what follows
    assert.are.equal(3, db:one("SELECT 3 AS x").x)
    db:close()
  end)

  it("reads every result through a TLS proxy writing 16 KB records, none stuck", function()
    -- PostgreSQL 15 writes TLS records of 8 KB, which always fit the free
    -- space libpq reads into; a proxy (or a newer server) writes 16 KB
    -- ones, and the part that did not fit stays inside OpenSSL, where the
    -- socket no longer signals it.  Results whose end lands there: 200-byte
    -- rows make a response's last record end at every offset in turn.
    local bin = helper.root .. "/build/tls-relay"
    if not io.open(bin, "rb") then
      assert(helper.sh("make -s -C " .. helper.quote(helper.root) .. " build/tls-relay") == 0,
        "cannot build build/tls-relay")
    end
    local relay = helper.start({ bin, env("PGCOORD_TEST_TLS_CA"), env("PGCOORD_TEST_TLS_KEY"),
      tostring(helper.tcp_parts().port) })
    local port = helper.wait_until(function()
      return tonumber(relay:output():match("^(%d+)\n"))
    end, 10, "the TLS relay's port")
    local dsn = tls_dsn():gsub("@localhost:%d+/", ("@localhost:%d/"):format(port))
    local db = helper.connect({ size = 1 }, dsn)
    -- (the relay speaks plain TCP to the server: ask the client side)
    assert.are.equal(1, db:one("SELECT 1 AS x").x)
    for n = 60, 400 do
      local rows = within(5, ("%d rows of 200 bytes through the proxy"):format(n), function()
        return db:query("SELECT repeat('x', 200) AS s FROM generate_series(1, $1::int)", n)
      end)
      assert.are.equal(n, #rows)
      assert.are.equal(200, #rows[n].s)
    end
    db:close()
  end)

  it("sends 50 MB of text as one parameter", function()
    local db = tls_pool()
    local s = string.rep("0123456789abcdef", 50 * 1024 * 1024 / 16)
    local row = within(60, "a 50 MB parameter", function()
      return db:one("SELECT length($1) AS n, md5($1) AS h", s)
    end)
    assert.are.equal(#s, row.n)
    local expected = db:one("SELECT md5(repeat('0123456789abcdef', $1)) AS h", #s // 16).h
    assert.are.equal(expected, row.h)
    db:close()
  end)

  it("cancels a query mid-flight: the task ends at once and the server query goes", function()
    local db, app = tls_pool()
    local t = helper.spawn(function() return db:query("SELECT pg_sleep(30)") end)
    local pid = helper.wait_until(function()
      local r = helper.admin():one([[SELECT pid FROM pg_stat_activity
        WHERE application_name = $1 AND query = 'SELECT pg_sleep(30)' AND state = 'active']], app)
      return r and r.pid
    end, 10, "the query to run")
    t:cancel()
    assert.are.equal("cancelled", t:status())
    helper.wait_until(function()
      return helper.admin():one(
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE pid = $1", pid).n == 0
    end, 5, "the server-side query to go away")
    assert.are.equal(1, within(10, "a query after the cancel", function()
      return db:one("SELECT 1 AS x").x
    end))
    db:close()
  end)

  it("a killed backend fails its query with a clear error, and the pool recovers", function()
    local db, app = tls_pool({ size = 1 })
    assert_tls(db, app)
    local t = helper.spawn(function() return db:query("SELECT pg_sleep(30)") end)
    helper.wait_until(function()
      return helper.admin():one([[SELECT pid FROM pg_stat_activity
        WHERE application_name = $1 AND state = 'active']], app)
    end, 10, "the query to run")
    helper.admin():query([[SELECT pg_terminate_backend(pid) FROM pg_stat_activity
      WHERE application_name = $1]], app)
    local ended = t:wait(10)
    assert.is_true(ended, "the query's task is stuck after its backend was killed")
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.matches("terminat", tostring(err))
    -- an idle connection killed too: found dead, replaced
    assert.are.equal(2, within(10, "a query after the kill", function()
      return db:one("SELECT 2 AS x").x
    end))
    helper.admin():query([[SELECT pg_terminate_backend(pid) FROM pg_stat_activity
      WHERE application_name = $1]], app)
    -- (a query sent before the pool has seen the close fails: the idle
    -- check skips connections used a moment ago, over TCP alike)
    helper.wait_until(function() return db:stats().open == 0 end, 5, "the pool to notice")
    assert.are.equal(4, within(10, "a query after an idle kill", function()
      return db:one("SELECT 4 AS x").x
    end))
    assert_tls(db, app)
    db:close()
  end)

  it("verifies the server against the right CA, and refuses a wrong CA clearly", function()
    local db = tls_pool(nil, { sslmode = "verify-full", sslrootcert = env("PGCOORD_TEST_TLS_CA") })
    assert.are.equal(1, db:one("SELECT 1 AS x").x)
    db:close()
    local elapsed, ok, err = helper.timed(pcall, within, 10, "a wrong-CA connect", function()
      return tls_pool({ size = 1, connect_timeout = 5 },
        { sslmode = "verify-ca", sslrootcert = env("PGCOORD_TEST_TLS_WRONG_CA") })
    end)
    assert.is_false(ok)
    assert.matches("certificate verify failed", tostring(err), 1, true)
    assert.is_true(elapsed < 5, "the error took " .. elapsed .. "s")
  end)

  it("sslmode=verify-full against a host name the certificate does not name is a clear error",
    function()
      local dsn = tls_dsn({ sslmode = "verify-full", sslrootcert = env("PGCOORD_TEST_TLS_CA") })
        :gsub("@localhost:", "@127.0.0.1:")
      local elapsed, ok, err = helper.timed(pcall, within, 10, "a mismatched-name connect",
        function() return helper.connect({ size = 1, connect_timeout = 5 }, dsn) end)
      assert.is_false(ok)
      assert.matches('does not match host name "127.0.0.1"', tostring(err), 1, true)
      assert.is_true(elapsed < 5, "the error took " .. elapsed .. "s")
    end)
end)

-- Host names are resolved on the loop (evdns), never by libpq's blocking
-- getaddrinfo.  Each test runs a stock lua5.4 whose resolver is pointed
-- (PGCOORD_RESOLV_CONF) at a UDP socket of this process that takes every
-- query and never answers: a DNS server that hangs.
local helper = require "helper"

local function lua_env(resolv_conf)
  return helper.lua_env({ PGCOORD_RESOLV_CONF = resolv_conf })
end

-- A resolv.conf naming a server that swallows queries (kept open here).
local silent_socket
local function silent_resolver()
  local uv = require "luv"
  if not silent_socket then
    silent_socket = uv.new_udp()
    assert(silent_socket:bind("127.0.0.1", 0))
  end
  local path = helper.tmpname("resolv")
  helper.write_file(path, ("nameserver 127.0.0.1:%d\noptions timeout:30 attempts:1\n")
    :format(silent_socket:getsockname().port))
  return path
end

-- Connects to `dsn` in a child while a ticker task counts 50 ms ticks;
-- prints "RESULT ok|err <elapsed> <ticks> <message>".
local CHILD = [[
  local pgcoord = require "pgcoord"
  local ticks = 0
  pgcoord.spawn(function() while true do pgcoord.sleep(0.05); ticks = ticks + 1 end end)
  local t0 = pgcoord.now()
  local ok, r = pcall(pgcoord.connect, os.getenv("DNS_TEST_DSN"),
    { connect_timeout = tonumber(os.getenv("DNS_TEST_TIMEOUT")) })
  if ok then r = r:one("SELECT 'connected' AS s").s end
  print(("RESULT %s %.3f %d %s"):format(ok and "ok" or "err", pgcoord.now() - t0, ticks,
    tostring(r)))
  os.exit(0)
]]

local function connect_in_child(dsn, connect_timeout)
  local env = lua_env(silent_resolver())
  env.DNS_TEST_DSN, env.DNS_TEST_TIMEOUT = dsn, tostring(connect_timeout)
  local code, out = helper.run({ "lua5.4", "-e", CHILD }, { env = env })
  assert.are.equal(0, code, out)
  local status, elapsed, ticks, message = out:match("RESULT (%a+) ([%d.]+) (%d+) ([^\n]*)")
  assert.is_truthy(status, out)
  return status, tonumber(elapsed), tonumber(ticks), message
end

local function dsn_with_host(host)
  local p = helper.tcp_parts()
  return ("postgresql://%s:%s@%s:%d/%s"):format(p.user, p.password, host, p.port, p.dbname)
end

describe("resolving host names", function()
  after_each(helper.cleanup)

  it("a DNS server that never answers: other tasks keep running, the connect fails"
    .. " at connect_timeout naming the host", function()
    local status, elapsed, ticks, message =
      connect_in_child(dsn_with_host("nowhere.pgcoord.test"), 1)
    assert.are.equal("err", status, message)
    assert.is_true(elapsed >= 0.9 and elapsed < 3, "failed after " .. elapsed)
    -- 1 s of 50 ms ticks: the loop was never blocked
    assert.is_true(ticks >= 10, "ticks " .. ticks)
    assert.matches('timeout expired while resolving host name "nowhere.pgcoord.test"',
      message, 1, true)
  end)

  it("a multi-host conninfo waits for the names, not for the loop", function()
    local p = helper.tcp_parts()
    local dsn = ("postgresql://%s:%s@nowhere.pgcoord.test:%d,%s:%d/%s?target_session_attrs=any")
      :format(p.user, p.password, p.port, p.host, p.port, p.dbname)
    local status, elapsed, ticks, message = connect_in_child(dsn, 1)
    assert.are.equal("err", status, message)
    assert.is_true(ticks >= 10, "ticks " .. ticks)
    assert.is_true(elapsed < 3, "failed after " .. elapsed)
    assert.matches("nowhere.pgcoord.test", message, 1, true)
  end)

  it("a name in /etc/hosts (localhost) needs no DNS server", function()
    local status, elapsed, _, message = connect_in_child(dsn_with_host("localhost"), 5)
    assert.are.equal("ok", status, message)
    assert.are.equal("connected", message)
    assert.is_true(elapsed < 3, "took " .. elapsed)
  end)

  it("an IP address skips DNS", function()
    local status, _, _, message = connect_in_child(dsn_with_host("127.0.0.1"), 5)
    assert.are.equal("ok", status, message)
    assert.are.equal("connected", message)
  end)
end)

-- Subscriber and fan-out against the real server: delivery, filters,
-- overflow, and the ways a LISTEN connection dies (terminated backend,
-- server restart, a link that goes silent without closing).
local pgcoord = require "pgcoord"
local helper = require "helper"

local FAST = { ping_interval = 0.2, ping_grace = 0.6, reconnect_min = 0.05, reconnect_max = 0.5 }

local function options(extra)
  local o = {}
  for k, v in pairs(FAST) do o[k] = v end
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

-- A started subscriber with one fan-out; waits until it listens.
local function subscribed(db, channel, opts, fan_opts)
  local connects = 0
  opts = options(opts)
  local user_cb = opts.on_reconnect
  opts.on_reconnect = function(s)
    connects = connects + 1
    if user_cb then user_cb(s) end
  end
  local sub = pgcoord.subscriber(db, opts)
  local fan = pgcoord.fanout(channel or helper.unique("ch"), fan_opts)
  sub:add(fan)
  sub:start()
  helper.wait_until(function() return connects > 0 end, 10, "the subscriber to listen")
  return sub, fan, function() return connects end
end

-- Counts the stop handlers registered through pgcoord.lifecycle and not
-- yet removed, while fn(live) runs.
local function counting_stop_handlers(fn)
  local lifecycle = require "pgcoord.lifecycle"
  local real, live = lifecycle.on_stop, 0
  lifecycle.on_stop = function(handler)
    live = live + 1
    local remove, removed = real(handler), false
    return function()
      if not removed then removed, live = true, live - 1 end
      remove()
    end
  end
  local ok, err = pcall(fn, function() return live end)
  lifecycle.on_stop = real
  if not ok then error(err, 0) end
end

-- The error fn raises, which must point at the line after the caller's.
local function error_at_next_line(fn)
  local line = debug.getinfo(2, "l").currentline + 1
  local err = helper.error_of(fn)
  assert.matches("subscriber_spec.lua:" .. line .. ": ", err, 1, true)
  return err
end

local function listen_pid(db, channel)
  return helper.wait_until(function()
    local row = db:one([[SELECT pid FROM pg_stat_activity
      WHERE query LIKE 'LISTEN %' AND query LIKE '%' || $1 || '%' ORDER BY backend_start DESC]],
      channel)
    return row and row.pid
  end, 10, "the LISTEN backend")
end

describe("pgcoord.subscriber and pgcoord.fanout", function()
  local db

  setup(function()
    db = pgcoord.connect(nil, { size = 4 })
  end)

  teardown(function()
    helper.cleanup()
  end)

  it("delivers in publish order, JSON decoded, raw strings as they are", function()
    local sub, fan = subscribed(db)
    local l = fan:listen({ buffer = 500 })
    for i = 1, 300 do fan:publish(db, { n = i, tag = "x" }) end
    db:query("SELECT pg_notify($1, 'not json {')", fan.channel)
    for i = 1, 300 do
      local msg = assert(l:receive(5), "message " .. i)
      assert.are.equal(i, msg.n)
      assert.are.equal("integer", math.type(msg.n))
    end
    assert.are.equal("not json {", l:receive(5))
    assert.are.same({ nil, "timeout" }, { l:receive(0.05) })
    sub:stop()
  end)

  it("delivers a notification only once its transaction commits", function()
    local sub, fan = subscribed(db)
    local l = fan:listen()
    pcall(db.tx, db, function(tx)
      fan:publish(tx, "rolled back")
      error("abort")
    end)
    db:tx(function(tx)
      fan:publish(tx, "committed")
      assert.are.same({ nil, "timeout" }, { l:receive(0.1) })
    end)
    assert.are.equal("committed", l:receive(5))
    assert.are.same({ nil, "timeout" }, { l:receive(0.1) })
    sub:stop()
  end)

  it("feeds many listeners, each through its own filter", function()
    local sub, fan = subscribed(db)
    local listeners = {}
    for k = 1, 50 do
      listeners[k] = fan:listen({ buffer = 200, filter = function(m) return m.n % k == 0 end })
    end
    local got = {}
    fan:on(function(m) got[#got + 1] = m.n end, { filter = function(m) return m.n > 90 end })
    for i = 1, 100 do fan:publish(db, { n = i }) end
    helper.wait_until(function() return #got == 10 end, 10, "the callback listener")
    for k = 1, 50 do
      helper.wait_until(function() return listeners[k]:pending() == 100 // k end, 10,
        "listener " .. k)
      local first = listeners[k]:receive(1)
      assert.are.equal(k, first.n)
    end
    assert.are.same({ 91, 92, 93, 94, 95, 96, 97, 98, 99, 100 }, got)
    for k = 1, 50 do listeners[k]:close() end
    assert.are.equal(1, fan:stats().listeners)
    sub:stop()
  end)

  it("sorts a burst that interleaves channels to their own fan-outs; a filter that raises"
    .. " is logged and keeps nothing", function()
    local sub, fan_a = subscribed(db)
    local fan_b = sub:add(pgcoord.fanout(helper.unique("ch"))) -- (listening once it returns)
    local a, b = fan_a:listen({ buffer = 100 }), fan_b:listen({ buffer = 100 })
    local picky = fan_b:listen({ buffer = 100, filter = function(m)
      if m.n % 4 == 0 then error("no fours: " .. m.n) end
      return true
    end })
    local lines = helper.capture_log(function()
      -- one transaction: the listener reads them as one burst, a, b, a, b...
      db:tx(function(tx)
        for i = 1, 40 do
          tx:query("SELECT pg_notify($1, $2)", (i % 2 == 1 and fan_a or fan_b).channel,
            ('{"n":%d}'):format(i))
        end
      end)
      helper.wait_until(function() return a:pending() == 20 and b:pending() == 20 end, 10,
        "both fan-outs' listeners")
    end)
    for i = 1, 40, 2 do assert.are.equal(i, a:receive(1).n) end
    for i = 2, 40, 2 do assert.are.equal(i, b:receive(1).n) end
    local kept = {}
    while picky:pending() > 0 do kept[#kept + 1] = picky:receive(1).n end
    assert.are.same({ 2, 6, 10, 14, 18, 22, 26, 30, 34, 38 }, kept)
    local failed = 0
    for _, line in ipairs(lines) do
      if line:find("listener filter failed", 1, true) and line:find("no fours", 1, true) then
        failed = failed + 1
      end
    end
    assert.are.equal(10, failed)
    sub:stop()
  end)

  it("closes listeners in any order, mid-delivery too, and delivers to the open ones only",
    function()
    local fan = pgcoord.fanout(helper.unique("ch"))
    local ls = {}
    for i = 1, 1000 do ls[i] = fan:listen() end
    for i = 1, 1000, 2 do ls[i]:close() end
    assert.are.equal(500, fan:stats().listeners)
    -- (closed ones leave the array once they are half of it)
    assert.are.equal(500, #fan.listeners)
    fan:notify("a")
    for i = 1, 1000 do
      if i % 2 == 0 then
        assert.are.equal("a", ls[i]:receive(0))
      else
        assert.are.same({ nil, "closed" }, { ls[i]:receive(0) })
      end
    end
    -- a filter halfway down the walk closes every listener before it and
    -- the one just after it (the array is rebuilt under the walk): the
    -- rest still get the message, the closed ones nothing
    local before, after = {}, nil
    for i = 2, 1000, 2 do before[#before + 1] = ls[i] end
    local closer = fan:listen({ filter = function()
      for _, l in ipairs(before) do l:close() end
      after:close()
      return true
    end })
    after = fan:listen()
    local rest = {}
    for i = 1, 499 do rest[i] = fan:listen() end
    fan:notify("b")
    assert.are.equal("b", closer:receive(0))
    assert.are.same({ nil, "closed" }, { before[1]:receive(0) })
    assert.are.same({ nil, "closed" }, { after:receive(0) })
    for i = 1, 499 do assert.are.equal("b", rest[i]:receive(0)) end
    assert.are.equal(500, fan:stats().listeners)
    closer:close()
    for i = 1, 499 do rest[i]:close() end
    assert.are.equal(0, fan:stats().listeners)
    assert.are.equal(0, #fan.listeners)
    fan:notify("c")
    assert.are.equal(3, fan:stats().notifications)
  end)

  it("drops for a full listener only, and counts it (overflow = drop)", function()
    local sub, fan = subscribed(db, nil, nil, { overflow = "drop" })
    local slow = fan:listen({ buffer = 2 })
    local fast = fan:listen({ buffer = 100 })
    for i = 1, 10 do fan:publish(db, { n = i }) end
    helper.wait_until(function() return fast:pending() == 10 end, 10, "the fast listener")
    assert.are.equal(2, slow:pending())
    assert.are.equal(8, fan:stats().drops)
    assert.are.equal(1, slow:receive(0).n)
    fan:notify({ n = 11 })
    assert.are.equal(2, slow:receive(0).n)
    assert.are.equal(11, slow:receive(0).n)
    sub:stop()
  end)

  it("logs and counts what a full listener misses over the wire (overflow = error)", function()
    local sub, fan = subscribed(db, nil, nil, { overflow = "error" })
    local slow = fan:listen({ buffer = 2 })
    local fast = fan:listen({ buffer = 100 })
    local lines = helper.capture_log(function()
      for i = 1, 10 do fan:publish(db, { n = i }) end
      helper.wait_until(function() return fast:pending() == 10 end, 10, "the fast listener")
    end)
    -- (one line for each burst the connection heard: however the ten
    -- came in, the lines count the eight that missed)
    local missed = 0
    for _, line in ipairs(lines) do
      if line:find("listener buffer full", 1, true) and line:find(fan.channel, 1, true) then
        missed = missed + assert(tonumber(line:match(" undelivered=(%d+)")), line)
      end
    end
    assert.are.equal(8, missed)
    local stats = fan:stats()
    assert.are.same({ 8, 0, 10, 0 }, { stats.overflows, stats.drops, stats.notifications,
      stats.streak })
    assert.are.same({ 1, 2 }, { slow:receive(0).n, slow:receive(0).n })
    sub:stop()
  end)

  it("raises on a local notify into a full buffer (overflow = error)", function()
    local fan = pgcoord.fanout(helper.unique("ch"), { overflow = "error" })
    local l = fan:listen({ buffer = 1 })
    local other = fan:listen({ buffer = 10 })
    fan:notify("a")
    local ok, err = pcall(fan.notify, fan, "b")
    assert.is_false(ok)
    assert.matches("full", err)
    assert.matches(fan.channel, err, 1, true)
    assert.are.equal(2, other:pending())
    assert.are.equal("a", l:receive(0))
    local closed = fan:listen()
    closed:close()
    assert.are.same({ nil, "closed" }, { closed:receive(1) })
    local bad = pcall(pgcoord.fanout, "x", { overflow = "block" })
    assert.is_false(bad)
  end)

  it("wakes a waiting receiver at once and ends messages() on close", function()
    local fan = pgcoord.fanout(helper.unique("ch"))
    local l = fan:listen()
    local seen = {}
    local t = pgcoord.spawn(function()
      for m in l:messages() do seen[#seen + 1] = m end
      return "ended"
    end)
    pgcoord.sleep(0)
    fan:notify(1)
    fan:notify(2)
    helper.wait_until(function() return #seen == 2 end, 5, "the messages")
    l:close()
    assert.are.equal("ended", t:join())
  end)

  it("wakes receivers that wait together, and one that waits after another timed out", function()
    local fan = pgcoord.fanout(helper.unique("ch"))
    local l = fan:listen({ buffer = 8 })
    assert.are.same({ nil, "timeout" }, { l:receive(0.01) }) -- (waited, and left)
    -- (a reader that missed its wake-up would take its message only at
    -- its timeout, long after the deadline here)
    local got = {}
    local function reader()
      local m = l:receive(60)
      got[#got + 1] = m
    end
    local t1, t2 = pgcoord.spawn(reader), pgcoord.spawn(reader)
    pgcoord.sleep(0)
    fan:notify("a")
    pgcoord.sleep(0)
    fan:notify("b")
    helper.wait_until(function() return #got == 2 end, 5, "both readers")
    t1:join()
    t2:join()
    table.sort(got)
    assert.are.same({ "a", "b" }, got)
    -- a wake-up still goes out once the burst before it was read
    local t3 = pgcoord.spawn(reader)
    pgcoord.sleep(0)
    fan:notify("c")
    helper.wait_until(function() return #got == 3 end, 5, "the third reader")
    t3:join()
    assert.are.equal("c", got[3])
  end)

  it("reconnects after pg_terminate_backend, calls on_reconnect, keeps delivering", function()
    local sub, fan, connects = subscribed(db)
    local l = fan:listen()
    fan:publish(db, "before")
    assert.are.equal("before", l:receive(5))
    local pid = listen_pid(db, fan.channel)
    db:query("SELECT pg_terminate_backend($1)", pid)
    helper.wait_until(function() return connects() == 2 end, 10, "on_reconnect")
    assert.are.equal(1, sub:stats().reconnects)
    fan:publish(db, "after")
    assert.are.equal("after", l:receive(5))
    sub:stop()
  end)

  it("counts what every connection heard: a reconnect keeps the count", function()
    local sub, fan, connects = subscribed(db)
    local l = fan:listen({ buffer = 100 })
    for i = 1, 5 do fan:publish(db, i) end
    for i = 1, 5 do assert.are.equal(i, l:receive(5)) end
    local before = sub:stats().notifications
    assert.is_true(before >= 5, "notifications " .. before)
    db:query("SELECT pg_terminate_backend($1)", listen_pid(db, fan.channel))
    helper.wait_until(function() return connects() == 2 end, 10, "on_reconnect")
    for i = 6, 10 do fan:publish(db, i) end
    for i = 6, 10 do assert.are.equal(i, l:receive(5)) end
    assert.is_true(sub:stats().notifications >= before + 5,
      ("notifications %d, %d before the reconnect"):format(sub:stats().notifications, before))
    sub:stop()
  end)

  it("a connection routes the channels its routes table has, read live, the rest to on_notify",
    function()
    local dbmod = require "pgcoord.db"
    local conn = dbmod.open(db)
    local a, b = helper.unique("route_a"), helper.unique("route_b")
    dbmod.run_script(conn, ('LISTEN "%s"; LISTEN "%s"'):format(a, b))
    local heard, lent = {}, nil -- (in the order heard, routed or not)
    local routes = { [a] = "to a" }
    conn:on_notify(function(channel, payload, pid)
      assert.are.equal("integer", math.type(pid))
      heard[#heard + 1] = { channel, payload }
    end, "json")
    conn:route_notify(routes, function(route, payloads, n)
      assert.is_true(n >= 1 and #payloads == n, "a run of " .. n)
      for i = 1, n do
        heard[#heard + 1] = { route, payloads[i] }
        if payloads[i] == 9 then routes[b] = nil end
      end
      lent = payloads
    end)
    local function send(...)
      local calls = {}
      for i = 1, select("#", ...), 2 do
        calls[#calls + 1] = ("pg_notify('%s', '%s')"):format(select(i, ...), select(i + 1, ...))
      end
      db:query("SELECT " .. table.concat(calls, ", "))
    end
    send(a, '{"n":1}')
    send(b, "2")
    helper.wait_until(function() return #heard == 2 end, 5, "two notifications")
    assert.are.same({ { "to a", { n = 1 } }, { b, 2 } }, heard)
    assert.is_nil(lent[1], "the run's table is emptied after its call")
    routes[b] = "to b" -- (read for each run)
    -- one transaction: the runs a connection makes of them keep their order
    send(a, "3", a, "4", b, "5", a, "6", b, "7")
    helper.wait_until(function() return #heard == 7 end, 5, "the five in one transaction")
    assert.are.same({ { "to a", 3 }, { "to a", 4 }, { "to b", 5 }, { "to a", 6 }, { "to b", 7 } },
      { table.unpack(heard, 3) })
    -- a run's call that removes a route: the next channel is looked up after it
    send(a, "9", b, "10")
    helper.wait_until(function() return #heard == 9 end, 5, "the two after a route went")
    assert.are.same({ { "to a", 9 }, { b, 10 } }, { table.unpack(heard, 8) })
    conn:route_notify(nil)
    send(a, "11")
    helper.wait_until(function() return #heard == 10 end, 5, "on_notify's")
    assert.are.same({ a, 11 }, heard[10])
    assert.are.equal(10, conn:notifications())
    assert.matches("bad argument #1 to 'route_notify' %(table expected, got string%)",
      helper.error_of(function() conn:route_notify("x", print) end))
    assert.matches("bad argument #2 to 'route_notify' %(function expected, got no value%)",
      helper.error_of(function() conn:route_notify({}) end))
    conn:close()
  end)

  it("calls every reconnect hook after a reconnect, and no hook once removed", function()
    local sub, fan, connects = subscribed(db)
    local calls = { a = 0, b = 0 }
    sub:hook_reconnect(function() calls.a = calls.a + 1 end)
    local remove_b = sub:hook_reconnect(function() calls.b = calls.b + 1 end)
    assert.are.equal(fan, sub:channel(fan.channel))   -- the fan-out it has
    db:query("SELECT pg_terminate_backend($1)", listen_pid(db, fan.channel))
    helper.wait_until(function() return connects() == 2 end, 10, "the first reconnect")
    assert.are.same({ a = 1, b = 1 }, calls)
    remove_b()
    db:query("SELECT pg_terminate_backend($1)", listen_pid(db, fan.channel))
    helper.wait_until(function() return connects() == 3 end, 10, "the second reconnect")
    assert.are.same({ a = 2, b = 1 }, calls)
    sub:stop()
  end)

  it("survives a server restart", function()
    if not helper.can_pgctl() then pending("needs scripts/pg-tmp") return end
    local own = pgcoord.connect(nil, { size = 2 })
    local sub, fan, connects = subscribed(own)
    local l = fan:listen()
    helper.pgctl("restart")
    helper.wait_until(function() return connects() >= 2 end, 20, "a reconnect after restart")
    helper.wait_until(function()
      local ok = pcall(fan.publish, fan, own, "after restart")
      return ok
    end, 10, "publishing again")
    assert.are.equal("after restart", l:receive(5))
    sub:stop()
    own:close()
  end)

  it("notices a silently dead link within ping_grace and reconnects", function()
    local relay = helper.relay("127.0.0.1", helper.tcp_parts().port)
    local through = pgcoord.connect(relay.dsn(), { size = 1, connect_timeout = 0.5 })
    local sub, fan, connects = subscribed(through, nil, { ping_db = db })
    local l = fan:listen()
    fan:publish(db, "one")
    assert.are.equal("one", l:receive(5))
    relay.blackhole()
    local t0 = pgcoord.now()
    helper.wait_until(function() return not sub:connected() end, 5, "the dead link noticed")
    local noticed = pgcoord.now() - t0
    -- silence is measured from the last ping before the cut, and the check
    -- runs every (grace - interval) / 2; allow a little for a loaded machine
    assert.is_true(noticed <= FAST.ping_grace + FAST.ping_interval + 0.3,
      ("noticed after %.3fs"):format(noticed))
    relay.resume()
    helper.wait_until(function() return connects() >= 2 end, 10, "the reconnect")
    fan:publish(db, "two")
    assert.are.equal("two", l:receive(5))
    sub:stop()
    relay.stop()
  end)

  it("bounces after `threshold` polls that found work, and counts", function()
    local sub, fan, connects = subscribed(db)
    fan:enable_recovery(sub, { threshold = 3 })
    fan:polled(0)
    fan:polled(-1)
    assert.are.equal(0, fan:stats().streak)
    fan:polled(5)
    fan:polled(1)
    assert.are.equal(2, fan:stats().streak)
    fan:publish(db, "wire")
    helper.wait_until(function() return fan:stats().streak == 0 end, 5, "the streak reset")
    fan:polled(2)
    fan:polled(2)
    fan:polled(2)
    assert.are.equal(0, fan:stats().streak)
    assert.are.equal(12, fan:stats().poll_saved)
    helper.wait_until(function() return connects() == 2 end, 10, "the bounce")
    helper.wait_until(function() return sub:connected() end, 10, "connected again")
    -- threshold <= 0 keeps counting but never bounces (a bounce drops the
    -- connection at once, so connected() would turn false)
    local other = pgcoord.fanout(helper.unique("ch"))
    other:enable_recovery(sub, { threshold = 0 })
    for _ = 1, 10 do other:polled(1) end
    assert.are.equal(10, other:stats().streak)
    assert.is_true(sub:connected())
    -- without recovery, polled does nothing
    local plain = pgcoord.fanout(helper.unique("ch"))
    plain:polled(3)
    assert.are.equal(0, plain:stats().poll_saved)
    sub:stop()
  end)

  it("coalesces bounces and never tears down a fresh connection", function()
    local sub, _, connects = subscribed(db)
    assert.is_true(sub:bounce())
    assert.is_false(sub:bounce())
    assert.is_false(sub:bounce())
    helper.wait_until(function() return connects() == 2 end, 10, "one reconnect")
    helper.wait_until(function() return sub:connected() end, 10, "connected")
    pgcoord.sleep(FAST.ping_interval)
    assert.are.equal(2, connects())
    sub:stop()
  end)

  it("pings through ping_db, or not at all with ping_db = false", function()
    local sub = subscribed(db, nil, { ping_db = false, ping_grace = 0.5 })
    -- nothing pings: the subscriber must take the silence for a dead link
    helper.wait_until(function() return sub:stats().reconnects >= 1 end, 10, "a reconnect")
    assert.are.equal(0, sub:stats().pings)
    sub:stop()
    local sub2 = subscribed(db)
    helper.wait_until(function() return sub2:stats().pings >= 2 end, 10, "pings")
    assert.are.equal(0, sub2:stats().reconnects)
    sub2:stop()
    -- with ping_db = false, pings sent from elsewhere keep the link alive
    local sub3 = subscribed(db, nil, { ping_db = false, ping_grace = 0.5 })
    local t0 = pgcoord.now()
    while pgcoord.now() - t0 < 1.5 do   -- three times ping_grace
      pgcoord.send_listener_ping(db)
      pgcoord.sleep(0.1)
    end
    assert.are.equal(0, sub3:stats().reconnects)
    sub3:stop()
  end)

  it("listens on channels added by two tasks at once, the second while the first's LISTEN runs",
    function()
    local sub = subscribed(db)
    local names = { helper.unique("ch"), helper.unique("ch") }
    local listeners = {}
    local adders = {}
    for i, name in ipairs(names) do
      adders[i] = pgcoord.spawn(function() listeners[i] = sub:channel(name):listen() end)
    end
    for _, t in ipairs(adders) do t:join() end
    for i, name in ipairs(names) do
      pgcoord.publish(db, name, { i = i })
      local msg = listeners[i]:receive(5)
      assert.is_truthy(msg, "nothing heard on the channel added " .. (i == 1 and "first" or
        "second"))
      assert.are.equal(i, msg.i)
    end
    sub:stop()
  end)

  it("listens on channel names with quotes, spaces and non-ASCII letters", function()
    for _, name in ipairs({ 'it"s', "with space", "Größe_é", "'; DROP TABLE x; --" }) do
      local sub, fan = subscribed(db, name .. helper.unique(""))
      local l = fan:listen()
      fan:publish(db, { name = name })
      assert.are.equal(name, l:receive(5).name)
      sub:stop()
    end
  end)

  it("refuses a channel name with a NUL byte, over 63 bytes or not UTF-8 where it is given",
    function()
    local sub, fan = subscribed(db)
    local l = fan:listen()
    local long = helper.unique("ch") .. ("x"):rep(64)
    local bad = {
      { "bad\0ch", "contains a NUL byte" },
      { long:sub(1, 64), "is 64 bytes long; PostgreSQL takes names of at most 63 bytes" },
      { "bad\xffch", "is not valid UTF-8" },
    }
    for _, case in ipairs(bad) do
      local name, problem = case[1], case[2]
      -- raised at the caller's line, naming the function and the problem
      local err = helper.error_of(function() pgcoord.fanout(name) end)
      assert.matches("subscriber_spec.lua:%d+: pgcoord.fanout: channel ", err)
      assert.matches(problem, err, 1, true)
      err = helper.error_of(function() sub:channel(name) end)
      assert.matches("subscriber_spec.lua:%d+: sub:channel: channel ", err)
      assert.matches(problem, err, 1, true)
      err = helper.error_of(function() pgcoord.publish(db, name, { n = 1 }) end)
      assert.matches("subscriber_spec.lua:%d+: pgcoord.publish: channel ", err)
      assert.matches(problem, err, 1, true)
    end
    -- the subscriber's other channels were never disturbed
    fan:publish(db, { n = 2 })
    assert.are.equal(2, l:receive(5).n)
    assert.are.equal(0, sub:stats().reconnects)
    -- 63 bytes is PostgreSQL's limit, and works end to end
    local at_limit = sub:channel(long:sub(1, 63))
    local l63 = at_limit:listen()
    pgcoord.publish(db, long:sub(1, 63), { n = 63 })
    assert.are.equal(63, l63:receive(5).n)
    sub:stop()
  end)

  it("refuses payloads over NOTIFY's limit and bad options, clearly", function()
    local ok, err = pcall(pgcoord.publish, db, "c", string.rep("x", 8000))
    assert.is_false(ok)
    assert.matches("8000", err)
    ok, err = pcall(pgcoord.subscriber, db, { ping_interval = 10, ping_grace = 5 })
    assert.is_false(ok)
    assert.matches("ping_grace", err)
    ok, err = pcall(pgcoord.subscriber, db, { ping_intervall = 10 })
    assert.is_false(ok)
    assert.matches("unknown option", err)
    ok = pcall(pgcoord.fanout, "")
    assert.is_false(ok)
  end)

  it("refuses unknown options and bad values, naming the function, at the caller's line",
    function()
    local fan = pgcoord.fanout(helper.unique("ch"))
    local sub = pgcoord.subscriber(db, options())
    local cases = {
      { function() pgcoord.subscriber(db, { ping_intervall = 1 }) end,
        'unknown option "ping_intervall" for pgcoord.subscriber' },
      { function() pgcoord.fanout("x", { overflo = "drop" }) end,
        'unknown option "overflo" for pgcoord.fanout' },
      { function() fan:listen({ bufer = 2 }) end, 'unknown option "bufer" for fan:listen' },
      { function() fan:on(print, { filtre = print }) end,
        'unknown option "filtre" for fan:on' },
      { function() fan:enable_recovery(sub, { treshold = 2 }) end,
        'unknown option "treshold" for fan:enable_recovery' },
      { function() pgcoord.fanout("x", { overflow = "block" }) end,
        'pgcoord.fanout: option overflow must be one of "drop", "error", got "block"' },
      { function() fan:listen({ buffer = 0 }) end,
        "fan:listen: option buffer must be an integer >= 1, got 0" },
      { function() fan:on(print, { filter = 1 }) end,
        "fan:on: option filter must be a function, got 1" },
      { function() fan:enable_recovery(sub, { threshold = 1.5 }) end,
        "fan:enable_recovery: option threshold must be an integer, got 1.5" },
      { function() pgcoord.subscriber(db, { ping_db = "x" }) end,
        'pgcoord.subscriber: option ping_db must be a pool from pgcoord.connect, got "x"' },
      { function() pgcoord.subscriber(db, { reconnect_min = 0 }) end,
        "pgcoord.subscriber: option reconnect_min must be a number > 0, got 0" },
      { function() pgcoord.subscriber("db") end,
        "pgcoord.subscriber: expected a pool from pgcoord.connect, got string" },
      { function() fan:on("print") end, "fan:on: expected a function, got string" },
      { function() sub:add({ channel = "x" }) end,
        "sub:add: expected a fan-out from pgcoord.fanout, got table" },
      { function() sub:stop(-1) end,
        "sub:stop: timeout must be a number of seconds >= 0, got -1" },
    }
    for _, case in ipairs(cases) do
      local fn, message = case[1], case[2]
      local info = debug.getinfo(fn, "S")
      local ok, err = pcall(fn)
      assert.is_false(ok, message)
      err = tostring(err)
      -- the caller's line is the one the case's function is on
      assert.are.equal(("%s:%d: %s"):format(info.short_src, info.linedefined, message), err)
    end
    assert.are.equal(0, fan:stats().listeners) -- the refused ones were never added
    error_at_next_line(function()
      pgcoord.publish(db, "c", string.rep("x", 8000))
    end)
  end)

  it("is a service: start, stop and start again, one stop handler at a time", function()
    counting_stop_handlers(function(live)
      local sub = pgcoord.subscriber(db, options())
      local fan = sub:channel(helper.unique("ch"))
      local l = fan:listen()
      assert.are.equal("stopped", sub:status())
      assert.are.equal(sub, sub:start())
      assert.are.equal("starting", sub:status())
      assert.are.equal(1, live())
      sub:start()                                  -- already started: nothing more
      assert.are.equal(1, live())
      assert.is_true(sub:ready(10))
      assert.are.equal("running", sub:status())
      local tasks = { sub.task, sub.ping_task }
      assert.is_true(sub:stop())
      assert.are.equal("stopped", sub:status())
      assert.are.equal(0, live())                  -- pgcoord.stop() no longer runs it
      for _, t in ipairs(tasks) do assert.are.equal("done", t:status()) end
      assert.is_true(sub:stop())                   -- a second stop is a no-op
      for _ = 1, 3 do
        sub:start()
        assert.is_true(sub:ready(10))
        assert.are.equal(1, live())
        fan:publish(db, "again")
        assert.are.equal("again", l:receive(5))
        sub:stop()
        assert.are.equal(0, live())
      end
      assert.are.equal("stopped", sub:stats().state)
    end)
  end)

  it("stop(timeout) cancels what does not end in time, and a stop from a hook ends it too",
    function()
    local in_hook, hook_closed = false, false
    local sub = pgcoord.subscriber(db, options({ on_reconnect = function()
      local _ <close> = setmetatable({}, { __close = function() hook_closed = true end })
      in_hook = true
      pgcoord.sleep(30)
    end }))
    sub:add(pgcoord.fanout(helper.unique("ch")))
    sub:start()
    helper.wait_until(function() return in_hook end, 10, "the hook to run")
    local elapsed, clean = helper.timed(sub.stop, sub, 0.2)
    assert.is_false(clean)
    assert.is_true(elapsed < 5, "stopped after " .. elapsed)
    assert.is_true(hook_closed)
    assert.are.equal("stopped", sub:status())
    -- a hook may stop its own subscriber; its task then ends by itself
    local own = pgcoord.subscriber(db, options())
    own:add(pgcoord.fanout(helper.unique("ch")))
    own:hook_reconnect(function(s) s:stop() end)
    own:start()
    local t = own.task
    helper.wait_until(function() return t:status() == "done" end, 10, "the stopped task")
    assert.are.equal("stopped", own:status())
  end)

  it("a graceful stop runs the stop handlers of started subscribers and open listeners only",
    function()
    local path = helper.write_file(helper.tmpname("script") .. ".lua", [[
      io.stdout:setvbuf("no")
      local db = pgcoord.connect(nil, { size = 2 })
      local function traced(name)
        local sub = pgcoord.subscriber(db, { ping_interval = 0.2, ping_grace = 0.6 })
        local stop = sub.stop
        sub.stop = function(...) print("stop " .. name) return stop(...) end
        return sub
      end
      local kept, stopped = traced("kept"), traced("stopped")
      kept:start(); kept:stop(); kept:start()
      stopped:start(); stopped:stop()
      local fan = kept:channel("c")
      local open, closed = fan:on(function() end), fan:on(function() end)
      closed:close()
      closed.close = function() print("closed again") end
      open.close = function(l) print("open closed") getmetatable(l).close(l) end
      assert(kept:ready(10))
      print("stopping")
      pgcoord.stop()
    ]])
    local code, out = helper.run({ "pgcoord-run", path })
    assert.are.equal(0, code, out)
    local after = out:match("stopping\n(.*)$")
    assert.is_truthy(after, out)
    assert.are.equal(1, select(2, after:gsub("stop kept", "")), out)
    assert.are.equal(1, select(2, after:gsub("open closed", "")), out)
    assert.is_nil(after:find("stop stopped", 1, true), out)
    assert.is_nil(after:find("closed again", 1, true), out)
  end)

  it("fan:on runs a burst in order; a callback that raises is logged and the rest still run",
    function()
    local fan = pgcoord.fanout(helper.unique("ch"))
    local got = {}
    local lines = helper.capture_log(function()
      local on = fan:on(function(m)
        if m % 3 == 0 then error("no threes: " .. m) end
        got[#got + 1] = m
      end)
      -- one burst: all ten are in hand when the task first runs
      for i = 1, 10 do fan:notify(i) end
      helper.wait_until(function() return #got == 7 end, 5, "the callbacks")
      on:close()
    end)
    assert.are.same({ 1, 2, 4, 5, 7, 8, 10 }, got)
    local failed = {}
    for _, line in ipairs(lines) do
      if line:find("listener failed", 1, true) then
        failed[#failed + 1] = line:match("no threes: (%d+)")
      end
    end
    assert.are.same({ "3", "6", "9" }, failed)
  end)

  it("fan:on's task ends when its listener closes; poll and push take and give without waiting",
    function()
    local fan = pgcoord.fanout(helper.unique("ch"))
    local got = {}
    local on = fan:on(function(m) got[#got + 1] = m end)
    fan:notify(1)
    helper.wait_until(function() return #got == 1 end, 5, "the callback")
    assert.is_false(on:is_closed())
    on:close()
    assert.is_true(on:is_closed())
    helper.wait_until(function() return on.task:status() == "done" end, 5, "the task to end")
    local l = fan:listen({ buffer = 2 })
    assert.is_nil(l:poll())
    fan:notify("a")
    assert.is_true(l:push("mine"))
    assert.is_false(l:push("full"))
    assert.are.equal("a", l:poll())
    assert.are.equal("mine", l:poll())
    assert.is_nil(l:poll())
    -- a push wakes a waiting reader, and only that listener hears it
    local other = fan:listen()
    local t = pgcoord.spawn(function() return l:receive(5) end)
    pgcoord.sleep(0)
    l:push("wake")
    assert.are.equal("wake", t:join())
    assert.are.equal(0, other:pending())
    l:close()
    assert.is_false(l:push("closed"))
    assert.are.same({ nil, "closed" }, { l:receive(0) })
  end)
end)

-- Options checked the same way everywhere: every public function that
-- takes an options table refuses an unknown key with one message,
-- `unknown option "<key>" for <function>`, at the caller's line; limits
-- agree across modules (0 retries is allowed wherever retries are
-- counted); and q:publish's delay/visible_at delay a message.
local pgcoord = require "pgcoord"
local helper = require "helper"

local here, raises_here = helper.here, helper.raises_here

describe("options", function()
  local db, jobs, q, ob
  local consumers = {}

  setup(function()
    db = helper.connect({ size = 4 })
    pgcoord.migrate(db)
    jobs = pgcoord.jobs(db)
    jobs:define(helper.unique("opt_type"), function() end, { group = helper.unique("og") })
    q = pgcoord.queue(db, helper.unique("opt_q"))
    ob = pgcoord.outbox(db, { table = helper.unique("opt_outbox") })
    ob:migrate()
  end)

  after_each(function()
    for _, c in ipairs(consumers) do pcall(c.stop, c, 0) end
    consumers = {}
  end)

  teardown(function()
    pcall(db.exec, db, ("DROP TABLE IF EXISTS %s"):format(ob.quoted))
    db:close()
    helper.cleanup()
  end)

  it("refuses an unknown key in every function that takes options, in one shape", function()
    local jtype = helper.unique("t")
    jobs:define(jtype, function() end)
    local fn = function() end
    local cases = {
      { 'unknown option "retries" for jobs:define',
        function() here(); jobs:define("x", fn, { retries = 3 }) end },
      { 'unknown option "retry.maxx" for jobs:define',
        function() here(); jobs:define("x", fn, { retry = { maxx = 3 } }) end },
      { 'unknown option "delay" for jobs:schedule',
        function() here(); jobs:schedule(db, jtype, {}, { delay = 5 }) end },
      { 'unknown option "run_at" for jobs:schedule_now',
        function() here(); jobs:schedule_now(db, jtype, {}, { run_at = 0 }) end },
      { 'unknown option "delay" for jobs:schedule_now',
        function() here(); jobs:schedule_now(db, jtype, {}, { delay = 5 }) end },
      { 'unknown option "overflo" for pgcoord.fanout',
        function() here(); pgcoord.fanout("c", { overflo = "drop" }) end },
      { 'unknown option "foo" for pgcoord.jobs',
        function() here(); pgcoord.jobs(db, { foo = 1 }) end },
      { 'unknown option "concurency" for jobs:worker',
        function() here(); jobs:worker({ concurency = 2 }) end },
      { 'unknown option "delai" for q:publish',
        function() here(); q:publish(db, { a = 1 }, { delai = 3 }) end },
      { 'unknown option "delai" for q:publish_many',
        function() here(); q:publish_many(db, { { a = 1 } }, { delai = 3 }) end },
      { 'unknown option "bogus" for pgcoord.queue',
        function() here(); pgcoord.queue(db, "x", { bogus = 1 }) end },
      { 'unknown option "max_deliverys" for q:consume',
        function() here(); q:consume("s", fn, { max_deliverys = 1 }) end },
      { 'unknown option "bogus" for q:dead', function() here(); q:dead("s", { bogus = 1 }) end },
      { 'unknown option "max_retry" for pgcoord.outbox',
        function() here(); pgcoord.outbox(db, { max_retry = 0 }) end },
      { 'unknown option "max_retries" for ob:relay',
        function() here(); ob:relay(fn, { max_retries = 0 }) end },
      { 'unknown option "bogus" for ob:failed', function() here(); ob:failed({ bogus = 1 }) end },
      { 'unknown option "bogus" for pgcoord.connect',
        function() here(); pgcoord.connect(nil, { bogus = 1 }) end },
      { 'unknown option "bogus" for pgcoord.subscriber',
        function() here(); pgcoord.subscriber(db, { bogus = 1 }) end },
      { 'unknown option "bogus" for pgcoord.joblock',
        function() here(); pgcoord.joblock(db, "n", { bogus = 1 }) end },
      { 'unknown option "timout" for pgcoord.stop',
        function() here(); pgcoord.stop({ timout = 1 }) end },
      { 'unknown option "bogus" for pgcoord.http.serve',
        function() here(); pgcoord.http.serve("127.0.0.1:0", { bogus = 1 }) end },
      { 'unknown option "bogus" for pgcoord.processed',
        function() here(); pgcoord.processed(db, { bogus = 1 }) end },
      { 'unknown option "bogus" for jobs:list', function() here(); jobs:list({ bogus = 1 }) end },
      { 'unknown option "bogus" for jobs:failed',
        function() here(); jobs:failed({ bogus = 1 }) end },
      { 'unknown option "bogus" for jobs:limit',
        function() here(); jobs:limit("default", { bogus = 1 }) end },
      { 'unknown option "bogus" for jobs:prune', function() here(); jobs:prune({ bogus = 1 }) end },
      { 'unknown option "bogus" for jobs:periodic',
        function() here(); jobs:periodic("n", "@every 1m", jtype, {}, { bogus = 1 }) end },
    }
    for _, case in ipairs(cases) do
      raises_here(case[1], case[2])
      local _, err = pcall(case[2])
      -- the message is the whole error, after the position
      assert.matches(": " .. case[1]:gsub("%p", "%%%0") .. "$", tostring(err))
    end
  end)

  it("jobs:schedule_now takes group, priority and key (it ignored them)", function()
    local g = helper.unique("og")
    local jtype = helper.unique("t")
    jobs:define(jtype, function() end, { group = g })
    local key = helper.unique("k")
    local id = jobs:schedule_now(db, jtype, {}, { priority = 7, key = key })
    local row = db:one("SELECT priority, group_name FROM pgcoord.jobs WHERE id = $1", id)
    assert.are.same({ 7, g }, { row.priority, row.group_name })
    assert.is_nil((jobs:schedule_now(db, jtype, {}, { key = key })))
    raises_here('jobs:schedule_now: unknown group "elsewhere"',
      function() here(); jobs:schedule_now(db, jtype, {}, { group = "elsewhere" }) end)
    db:exec("DELETE FROM pgcoord.jobs WHERE group_name = $1", g)
  end)

  it("q:publish with delay or visible_at refuses bad values, naming the option", function()
    raises_here("q:publish: option delay must be a number >= 0 and <= 31536000, got -1",
      function() here(); q:publish(db, 1, { delay = -1 }) end)
    raises_here('q:publish: option delay must be a number >= 0 and <= 31536000, got "3"',
      function() here(); q:publish(db, 1, { delay = "3" }) end)
    raises_here("q:publish: option visible_at must be a number >= -62135596800 and"
      .. " <= 253402300799, got 1e+20",
      function() here(); q:publish(db, 1, { visible_at = 1e20 }) end)
    raises_here("q:publish: give delay or visible_at, not both",
      function() here(); q:publish(db, 1, { delay = 1, visible_at = 1 }) end)
    raises_here("q:publish_many: give delay or visible_at, not both",
      function() here(); q:publish_many(db, { 1 }, { delay = 1, visible_at = 1 }) end)
  end)

  -- A consumer of a new queue's subscription that notes each payload and
  -- when it came; polls too seldom to matter: wake-ups and due times count.
  local function arrivals(qopts)
    local dq = pgcoord.queue(db, helper.unique("delayed"), qopts)
    dq:subscribe("s")
    local got = {}
    consumers[#consumers + 1] = dq:consume("s", function(msg)
      got[#got + 1] = { payload = msg.payload, at = pgcoord.now() }
    end, { poll_interval = 30 })
    return dq, got
  end

  it("q:publish with delay or visible_at delivers the message no earlier", function()
    local dq, got = arrivals()
    local t0 = pgcoord.now()
    dq:publish(db, "late", { delay = 1.5 })
    local server_now = db:one("SELECT extract(epoch FROM now())::float8 AS t").t
    dq:publish(db, "at", { visible_at = server_now + 0.8 })
    dq:publish_many(db, { "many" }, { delay = 1.2 })
    dq:publish(db, "now")
    helper.wait_until(function() return #got == 4 end, 10, "the four messages")
    local order = {}
    for i, g in ipairs(got) do order[i] = g.payload end
    assert.are.same({ "now", "at", "many", "late" }, order)
    assert.is_true(got[2].at - t0 >= 0.7, "visible_at is kept")
    assert.is_true(got[4].at - t0 >= 1.4, "delay is kept")
  end)

  it("on an ordered subscription, the messages after a delayed one wait for it", function()
    local oq, got = arrivals({ ordered = true })
    local t0 = pgcoord.now()
    oq:publish(db, "first", { delay = 0.6 })
    oq:publish(db, "second")
    helper.wait_until(function() return #got == 2 end, 10, "both messages")
    assert.are.same({ "first", "second" }, { got[1].payload, got[2].payload })
    assert.is_true(got[2].at - t0 >= 0.5, "the second waited for the first")
  end)

  it("limits agree: zero retries in jobs and the outbox, one delivery in a queue", function()
    -- jobs: retry.max = 0 is one attempt
    jobs:define(helper.unique("t"), function() end, { retry = { max = 0 } })
    -- outbox: max_retries = 0 fails a message at its first failed attempt
    local ob0 = pgcoord.outbox(db, { table = ob.name, max_retries = 0, retry_delay = 0 })
    local id = ob0:save(nil, { topic = "t" })
    assert.are.equal(1, #ob0:fetch_pending(10))
    assert.are.same({ "failed", 1 }, { ob0:mark_failed(id, "refused") })
    -- max_retries = 1: one retry, then failed
    local ob1 = pgcoord.outbox(db, { table = ob.name, max_retries = 1, retry_delay = 0 })
    id = ob1:save(nil, { topic = "t" })
    ob1:fetch_pending(10)
    assert.are.same({ "pending", 1 }, { ob1:mark_failed(id, "refused") })
    ob1:fetch_pending(10)
    assert.are.same({ "failed", 2 }, { ob1:mark_failed(id, "refused again") })
    raises_here("pgcoord.outbox: option max_retries must be an integer >= 0 and <= 2147483647,"
      .. " got -1", function() here(); pgcoord.outbox(db, { max_retries = -1 }) end)
    -- queue: max_deliveries counts deliveries, the first included: 1 is no retry
    raises_here("q:consume: option max_deliveries must be an integer >= 1 and <= 2147483647,"
      .. " got 0", function() here(); q:consume("s", function() end, { max_deliveries = 0 }) end)
  end)
end)

-- The interactive prompt (pgcoord-run -i): plain lines from a pipe or a
-- file, and on a terminal (through tmux) Ctrl-C in every state, completion
-- and a history kept across sessions.
local helper = require "helper"

describe("the prompt on a pipe or a file", function()
  after_each(helper.cleanup)

  local function piped(lines)
    local input = helper.write_file(helper.tmpname("input"), lines)
    return helper.run({ "sh", "-c", ("cat %s | %s -i"):format(helper.quote(input),
      helper.quote(helper.run_bin)) }, { timeout = 20 })
  end

  it("prints values like lua -i and exits 0 at the end of input", function()
    local code, out = piped("40 + 2\n'a', nil, 3\n")
    assert.are.equal(0, code, out)
    assert.matches("> 42\n> a\tnil\t3\n> \n$", out)
  end)

  it("shows a returned table as a short literal, plain values and print as before", function()
    local code, out = piped(table.concat({
      "return {1,2,a={b=1}}",
      "t = { name = 'x', deep = { a = { b = { c = 1 } } } }; t.me = t; return t",
      "{ 'tab', n = pgcoord.null }, 'plain', 3, nil",
      "print({} == nil, 'printed')", "" }, "\n"))
    assert.are.equal(0, code, out)
    assert.matches("> { 1, 2, a = { b = 1 } }\n"
      .. '> { deep = { a = { b = {...} } }, me = <cycle>, name = "x" }\n'
      .. '> { "tab", n = pgcoord.null }\tplain\t3\tnil\n'
      .. "> false\tprinted\n", out, 1, true)
  end)

  it("keeps the loop running between lines", function()
    local code, out = piped(table.concat({
      "pgcoord.spawn(function() pgcoord.sleep(0.1) print('from the task') end)",
      "pgcoord.sleep(0.4)",
      "'after the sleep'",
      "for i = 1, 2 do",
      "  print('loop ' .. i)",
      "end", "" }, "\n"))
    assert.are.equal(0, code, out)
    local task_at = out:find("from the task", 1, true)
    local after_at = out:find("after the sleep", 1, true)
    assert.is_truthy(task_at and after_at and task_at < after_at, out)
    assert.matches("loop 1\nloop 2\n", out, 1, true)
  end)

  it("reads a regular file too, and reports errors without stopping", function()
    local input = helper.write_file(helper.tmpname("input"), "error('oops')\n1 + 1")
    local code, out = helper.run({ "pgcoord-run", "-i" }, { stdin = input, timeout = 20 })
    assert.are.equal(0, code, out)
    assert.matches("oops", out, 1, true)
    assert.matches("> 2\n", out, 1, true) -- the last line has no newline
  end)
end)

describe("the prompt on a terminal", function()
  after_each(helper.cleanup)

  local function session(env)
    local rc = helper.tmpname("rc")
    local t = helper.tmux(("cd %s && %s ./pgcoord-run -i; echo $? > %s")
      :format(helper.quote(helper.root), env or "", rc))
    t.rc_file = rc
    t:wait_for("\n>$", 10, "the first prompt")
    return t
  end

  local function interrupted(t, what)
    t:send("C-c")
    t:wait_for("interrupted\n>$", 10, "the prompt back after Ctrl-C " .. what)
    assert.is_true(t:running())
  end

  local function still_evaluates(t, n)
    t:line(("%d + 1"):format(n))
    t:wait_for(("\n%d\n>$"):format(n + 1), 10, "the prompt to evaluate again")
  end

  it("Ctrl-C interrupts a chunk that waits on a timer", function()
    local t = session()
    t:line("pgcoord.sleep(30)")
    helper.wait_until(function() return t:capture():match("sleep%(30%)$") end, 5)
    interrupted(t, "during pgcoord.sleep")
    still_evaluates(t, 1)
  end)

  it("Ctrl-C interrupts a chunk that never waits", function()
    local t = session()
    t:line("while true do end")
    t:wait_for("while true do end$", 5, "the loop to start")
    interrupted(t, "during a busy loop")
    still_evaluates(t, 2)
  end)

  it("Ctrl-C cancels a query on the server", function()
    local app = helper.unique("prompt")
    local t = session(("PGAPPNAME=%s"):format(app))
    t:line("db = pgcoord.connect()")
    t:wait_for("connect%(%)\n>$", 10, "the pool")
    t:line("db:one('SELECT pg_sleep(30)')")
    helper.wait_until(function()
      for _, r in ipairs(helper.backends(app)) do
        if r.state == "active" and (r.query or ""):find("pg_sleep", 1, true) then return true end
      end
    end, 10, "the query to run")
    interrupted(t, "during a query")
    helper.wait_until(function()
      for _, r in ipairs(helper.backends(app)) do
        if r.state == "active" and (r.query or ""):find("pg_sleep", 1, true) then return false end
      end
      return true
    end, 10, "the query to be gone from the server")
    t:line("db:one('SELECT 6 * 7 AS x').x")
    t:wait_for("\n42\n>$", 10, "the pool to work after the interrupt")
  end)

  it("Ctrl-C clears a continuation, a half-typed line and an empty prompt", function()
    local t = session()
    t:line("x = 1")
    t:wait_for("x = 1\n>$", 10)
    t:line("for i = 1, 3 do")
    t:wait_for(">>$", 10, "the continuation prompt")
    t:send("C-c")
    t:wait_for("\n>$", 10, "a fresh prompt")
    t:send("-l", "half a li")
    t:wait_for("half a li$", 10)
    t:send("C-c")
    t:wait_for("\n>$", 10, "a cleared line")
    t:send("C-c") -- at an empty prompt, after lines have run
    t:wait_for("\n>$", 10)
    assert.is_true(t:running())
    still_evaluates(t, 3)
  end)

  it("completes globals and fields with Tab", function()
    local t = session()
    t:line("my_table = { alpha = 1, beta = function() end }")
    t:wait_for("end }\n>$", 10)
    t:send("-l", "string.for")
    t:send("Tab")
    t:wait_for("string%.format%($", 10, "string.format( completed")
    t:send("C-c")
    t:send("-l", "my_ta")
    t:send("Tab")
    t:wait_for("> my_table$", 10, "a global completed")
    t:send("-l", ".be")
    t:send("Tab")
    t:wait_for("> my_table%.beta%($", 10, "a field completed")
  end)

  it("keeps its history across sessions", function()
    local file = helper.tmpname("history")
    local env = "PGCOORD_HISTORY=" .. helper.quote(file)
    local t = session(env)
    t:line("remembered = 'yes'")
    t:wait_for("'yes'\n>$", 10)
    t:send("C-d")
    helper.wait_until(function() return helper.read_file(t.rc_file) end, 10,
      "the first session to end")
    t = session(env)
    t:send("Up")
    t:wait_for("> remembered = 'yes'$", 10, "the line from the last session")
  end)
end)

describe("how the prompt shows a table", function()
  local show = require("pgcoord.inspect").show

  it("lists the sequence, then the other keys sorted: numbers, strings, the rest", function()
    assert.are.equal('{ 10, 20, [-1] = 0, [2.5] = 1, ["a b"] = 2, ["end"] = 3, x = 4, [true] = 5 }',
      show({ 10, 20, x = 4, ["a b"] = 2, ["end"] = 3, [-1] = 0, [2.5] = 1, [true] = 5 }))
    assert.are.equal("{}", show({}))
    assert.are.equal("{ 1, 2, [4] = 4 }", show({ 1, 2, nil, 4 }))
  end)

  it("quotes strings, escapes what is not printable and cuts long ones at a character", function()
    assert.are.equal('{ "a\\"b\\\\c\\n\\t\\0012" }', show({ 'a"b\\c\n\t\1' .. "2" }))
    local s = show({ ("é"):rep(150) })
    assert.are.equal('{ "' .. ("é"):rep(100) .. '"...(300 bytes) }', (s:gsub("%s+", " ")))
  end)

  it("marks cycles, stops below three levels and counts what it leaves out", function()
    local t = { 1 }
    t.self, t.list = t, { t }
    assert.are.equal("{ 1, list = { <cycle> }, self = <cycle> }", show(t))
    local shared = { 1 }
    assert.are.equal("{ { 1 }, { 1 } }", show({ shared, shared })) -- no cycle: shown twice
    assert.are.equal("{ a = { b = { c = {...}, d = {} } } }",
      show({ a = { b = { c = { 1 }, d = {} } } }))
    local long = {}
    for i = 1, 50 do long[i] = i end
    long.name = "n"
    local text = show(long)
    assert.matches("^{\n  1, 2, 3, .*, 20,\n  %.%.%. %(31 more%)\n}$", text)
  end)

  it("goes one entry a line past 80 columns", function()
    local rows = { affected = 2 }
    for i = 1, 2 do
      rows[i] = { id = i, email = ("customer%d@example.com"):format(i), name = "c" }
    end
    assert.are.equal(table.concat({
      "{",
      '  { email = "customer1@example.com", id = 1, name = "c" },',
      '  { email = "customer2@example.com", id = 2, name = "c" },',
      "  affected = 2",
      "}" }, "\n"), show(rows))
  end)

  it("shows functions and objects by kind or tostring, plain values as tostring", function()
    local object = setmetatable({}, { __tostring = function() return "an object" end })
    assert.are.equal("{ f = <function>, o = <an object> }", show({ f = print, o = object }))
    assert.are.equal("an object", show(object))
    assert.are.equal("plain", show("plain"))
    assert.are.equal("42", show(42))
    assert.are.equal("nil", show(nil))
  end)
end)

-- pgcoord-run: scripts, options, signals, migrations, a stock lua5.4
-- program, and the interactive prompt (driven through tmux).
local pgcoord = require "pgcoord"
local helper = require "helper"

local function script(text)
  return helper.write_file(helper.tmpname("script") .. ".lua", text)
end

local lua_env = helper.lua_env

describe("pgcoord-run", function()
  after_each(helper.cleanup)

  it("runs a script with arg and ... like the stock lua", function()
    local path = script([[
      print("ARG0=" .. arg[0], "ARG1=" .. arg[1], "ARG2=" .. arg[2], "N=" .. select("#", ...))
      print("DOTS=" .. table.concat({ ... }, ","), "ARGM1=" .. tostring(arg[-1]))
      print("TASK=" .. tostring(pgcoord.current_task() ~= nil),
        "GLOBAL=" .. tostring(pgcoord == require("pgcoord")))
    ]])
    local code, out = helper.run({ "pgcoord-run", path, "a b", "c" })
    assert.are.equal(0, code, out)
    assert.matches("ARG0=" .. path, out, 1, true)
    assert.matches("ARG1=a b\tARG2=c\tN=2", out, 1, true)
    assert.matches("DOTS=a b,c", out, 1, true)
    assert.matches("ARGM1=[^\n]*pgcoord%-run", out)
    assert.matches("TASK=true\tGLOBAL=true", out, 1, true)
  end)

  it("-e runs chunks, before the script", function()
    local code, out = helper.run({ "pgcoord-run", "-e", "print(1 + 1)" })
    assert.are.equal(0, code, out)
    assert.are.equal("2\n", out)
    local path = script("print('x is ' .. x)")
    code, out = helper.run({ "pgcoord-run", "-e", "x = 5", path })
    assert.are.equal(0, code, out)
    assert.matches("x is 5", out, 1, true)
    code, out = helper.run({ "pgcoord-run", "-l", "cjson", "-e", "print(cjson.encode({1}))" })
    assert.are.equal(0, code, out)
    assert.matches("[1]", out, 1, true)
  end)

  it("runs standard input as the script", function()
    local path = script("print('from stdin', ...)")
    local code, out = helper.run({ "pgcoord-run", "-", "z" }, { stdin = path })
    assert.are.equal(0, code, out)
    assert.matches("from stdin\tz", out, 1, true)
    code, out = helper.run({ "pgcoord-run" }, { stdin = path })
    assert.are.equal(0, code, out)
    assert.matches("from stdin", out, 1, true)
  end)

  it("--version and --help", function()
    local code, out = helper.run({ "pgcoord-run", "--version" })
    assert.are.equal(0, code, out)
    assert.matches("^pgcoord%-run %d+%.%d+%.%d+", out)
    assert.matches(pgcoord.version, out, 1, true)
    code, out = helper.run({ "pgcoord-run", "-v" })
    assert.are.equal(0, code, out)
    assert.matches("^pgcoord%-run", out)
    code, out = helper.run({ "pgcoord-run", "--help" })
    assert.are.equal(0, code, out)
    assert.matches("usage: pgcoord-run", out, 1, true)
    assert.matches("--migrate", out, 1, true)
    assert.matches("--print-sql", out, 1, true)
  end)

  it("an unknown option or a missing value exits non-zero with a message", function()
    local code, out = helper.run({ "pgcoord-run", "--bogus" })
    assert.are_not.equal(0, code)
    assert.matches("unknown option --bogus", out, 1, true)
    code, out = helper.run({ "pgcoord-run", "-e" })
    assert.are_not.equal(0, code)
    assert.matches("-e needs a value", out, 1, true)
    code, out = helper.run({ "pgcoord-run", "--log-level", "chatty", "-e", "print(1)" })
    assert.are_not.equal(0, code)
    assert.matches("chatty", out, 1, true)
  end)

  it("a missing script or a syntax error exits 1 with a message", function()
    local code, out = helper.run({ "pgcoord-run", "/nonexistent/script.lua" })
    assert.are.equal(1, code)
    assert.matches("/nonexistent/script.lua", out, 1, true)
    code, out = helper.run({ "pgcoord-run", script("local x = = 1") })
    assert.are.equal(1, code)
    assert.matches("unexpected symbol", out, 1, true)
  end)

  it("a script error exits 1 with the error and a stack traceback", function()
    local path = script([[
      local function deep_function() error("kaboom in script") end
      deep_function()
    ]])
    local code, out = helper.run({ "pgcoord-run", path })
    assert.are.equal(1, code)
    assert.matches("kaboom in script", out, 1, true)
    assert.matches("stack traceback", out, 1, true)
    assert.matches("deep_function", out, 1, true)
    -- a database error shows its readable form
    code, out = helper.run({ "pgcoord-run", "-e",
      "pgcoord.connect(nil, { size = 1 }):query('SELEC 1')" })
    assert.are.equal(1, code)
    assert.matches('syntax error at or near "SELEC"', out, 1, true)
    assert.matches("42601", out, 1, true)
  end)

  it("masks passwords in a script's top-level error and in its traceback lines", function()
    local function run_masked(argv, shown)
      local code, out = helper.run(argv)
      assert.are.equal(1, code, out)
      assert.matches(shown, out, 1, true)
      assert.is_nil(out:find("Secret", 1, true), out)
      return out
    end
    local out = run_masked({ "pgcoord-run", "-e", 'error("postgresql://u:TopSecret@h/d")' },
      "postgresql://u:***@h/d")
    assert.matches("stack traceback", out, 1, true)
    -- a traceback line: the chunk's name is a URI with a password
    run_masked({ "pgcoord-run", "-e",
      [[load("error('deep')", "=postgresql://u:TopSecret@h/d")()]] },
      "postgresql://u:***@h/d:1: in main chunk")
    -- libpq quoting, from a script file
    run_masked({ "pgcoord-run", script([[error("host=h password='Top\\'Secret word'")]]) },
      "host=h password=***")
    -- a chunk that does not compile
    run_masked({ "pgcoord-run", "-e", "local x = {} 'postgresql://u:TopSecret@h/d'" },
      "unexpected symbol near ''postgresql://u:***@h/d''")
    -- an error that escapes the command line handling itself
    run_masked({ "pgcoord-run", "-l", "postgresql://u:TopSecret@h/d", "-e", "" },
      "module 'postgresql://u:***@h/d' not found")
  end)

  it("keeps running until the script's tasks finish, then exits 0", function()
    local path = script([[
      for _, d in ipairs({ 0.15, 0.05, 0.1 }) do
        pgcoord.spawn(function()
          pgcoord.sleep(d)
          print("done " .. d)
        end)
      end
      print("main end")
    ]])
    local code, out = helper.run({ "pgcoord-run", path })
    assert.are.equal(0, code, out)
    assert.are.equal("main end\ndone 0.05\ndone 0.1\ndone 0.15\n", out)
  end)

  it("an error in a task the script spawned is logged and does not stop the others", function()
    local path = script([[
      pgcoord.spawn(function() error("task blew up") end)
      pgcoord.spawn(function()
        pgcoord.sleep(0.05)
        print("other task finished")
      end)
    ]])
    local code, out = helper.run({ "pgcoord-run", path })
    assert.are.equal(0, code, out)
    assert.matches('msg="task failed" error="[^"]*%.lua:1: task blew up" task=%d+\n', out)
    assert.is_nil(out:find("stack traceback", 1, true), out) -- (at debug only)
    assert.matches("other task finished", out, 1, true)
    code, out = helper.run({ "pgcoord-run", "--log-level", "debug", path })
    assert.are.equal(0, code, out)
    assert.matches(' traceback="[^"]*task blew up\\nstack traceback:', out)
  end)

  it("on SIGTERM runs on_stop, lets an in-flight query finish and exits 0", function()
    local key = math.random(1, 1 << 30)
    local app = helper.unique("sigterm")
    local admin = helper.admin()
    local release = false
    -- Hold an advisory lock so that the child's query blocks until we let go.
    local holder_ready = false
    local holder = helper.spawn(function()
      admin:tx(function(tx)
        tx:exec("SELECT pg_advisory_xact_lock($1)", key)
        holder_ready = true
        while not release do pgcoord.sleep(0.01) end
      end)
    end)
    helper.wait_until(function() return holder_ready end, 5, "the advisory lock")
    local path = script(([[
      io.stdout:setvbuf("no")
      local db = pgcoord.connect(nil, { size = 2, params = { application_name = %q } })
      pgcoord.on_stop(function() print("on_stop ran") end)
      pgcoord.spawn(function()
        db:exec("SELECT pg_advisory_lock($1)", %d)
        print("in-flight done")
      end)
      print("ready")
    ]]):format(app, key))
    local p = helper.start({ "pgcoord-run", path })
    p:wait_output("ready")
    helper.wait_until(function()
      local rows = admin:query(
        "SELECT wait_event_type FROM pg_stat_activity WHERE application_name = $1", app)
      for _, r in ipairs(rows) do
        if r.wait_event_type == "Lock" then return true end
      end
    end, 10, "the child's query to wait on the lock")
    assert.is_true(p:kill("TERM"))
    p:wait_output("on_stop ran")
    assert.is_true(p:alive(), "exited before its in-flight query finished:\n" .. p:output())
    release = true
    holder:join()
    local code = p:wait(10)
    local out = p:output()
    assert.are.equal(0, code, out)
    assert.matches("stopping gracefully", out, 1, true)
    assert.matches("in-flight done", out, 1, true)
    assert.is_true(out:find("on_stop ran", 1, true) < out:find("in-flight done", 1, true))
  end)

  it("SIGINT stops gracefully too", function()
    local path = script([[
      io.stdout:setvbuf("no")
      pgcoord.on_stop(function() print("on_stop ran") end)
      pgcoord.spawn(function()
        while not pgcoord.stopping() do pgcoord.sleep(0.01) end
        print("worker saw the stop")
      end)
      print("ready")
    ]])
    local p = helper.start({ "pgcoord-run", path })
    p:wait_output("ready")
    p:kill("INT")
    assert.are.equal(0, p:wait(10), p:output())
    assert.matches("on_stop ran", p:output(), 1, true)
    assert.matches("worker saw the stop", p:output(), 1, true)
  end)

  it("a second SIGTERM exits at once", function()
    local path = script([[
      io.stdout:setvbuf("no")
      pgcoord.spawn(function() pgcoord.sleep(60) end)
      print("ready")
    ]])
    local p = helper.start({ "pgcoord-run", path })
    p:wait_output("ready")
    p:kill("TERM")
    p:wait_output("stopping gracefully")
    assert.is_true(p:alive())
    local t0 = pgcoord.now()
    p:kill("TERM")
    local code = p:wait(10)
    assert.is_true(pgcoord.now() - t0 < 5)
    assert.are.equal(128 + 15, code, p:output())
    assert.matches("second signal", p:output(), 1, true)
  end)

  it("--migrate applies the schema, then runs the script", function()
    local name = helper.create_database("climig")
    local code, out = helper.run({ "pgcoord-run", "--db", "dbname=" .. name, "--migrate",
      "-e", "print('after migrate')" })
    assert.are.equal(0, code, out)
    assert.matches("schema up to date", out, 1, true)
    assert.matches("after migrate", out, 1, true)
    local db = pgcoord.connect("dbname=" .. name, { size = 1 })
    local n = db:one("SELECT count(*)::int AS n FROM pgcoord.schema_migrations").n
    db:close()
    assert.are.equal(#require("pgcoord.migrate").files(), n)
    -- again: nothing to do, still fine
    code, out = helper.run({ "pgcoord-run", "--db", "dbname=" .. name, "--migrate" })
    assert.are.equal(0, code, out)
    assert.matches("applied=0", out, 1, true)
  end)

  it("--migrate against an unreachable server exits 1 with a message", function()
    local code, out = helper.run({ "pgcoord-run", "--db", "host=/nonexistent port=1", "--migrate" })
    assert.are.equal(1, code)
    assert.matches("cannot connect", out, 1, true)
  end)

  it("--log-format json writes JSON log lines", function()
    local code, out = helper.run({ "pgcoord-run", "--log-format", "json", "-e",
      "pgcoord.log.info('hello log', { n = 1, password = 'hunter2' })" })
    assert.are.equal(0, code, out)
    local line = out:match("{[^\n]*}")
    assert.truthy(line, out)
    local v = pgcoord.json.decode(line)
    assert.are.equal("hello log", v.msg)
    assert.are.equal("info", v.level)
    assert.are.equal(1, v.n)
    assert.is_nil(out:find("hunter2", 1, true))
  end)
end)

describe("a stock lua5.4 program", function()
  after_each(helper.cleanup)

  it("requires pgcoord and runs a query", function()
    local code, out = helper.run({ "lua5.4", "-e", [[
      local pgcoord = require "pgcoord"
      local db = pgcoord.connect(nil, { size = 2 })
      print("RESULT=" .. db:one("SELECT 40 + $1::int AS v", 2).v)
      local t = pgcoord.spawn(function() return db:one("SELECT 'from a task' AS s").s end)
      print(t:join())
      db:close()
    ]] }, { env = lua_env() })
    assert.are.equal(0, code, out)
    assert.matches("RESULT=42", out, 1, true)
    assert.matches("from a task", out, 1, true)
  end)

  it("can host the loop in its own main loop with step()", function()
    local code, out = helper.run({ "lua5.4", "-e", [[
      local pgcoord = require "pgcoord"
      local db = pgcoord.connect(nil, { size = 1 })
      local result
      pgcoord.spawn(function() result = db:one("SELECT 7 AS v FROM pg_sleep(0.05)").v end)
      local spins = 0
      while result == nil do
        pgcoord.step(0.01)   -- the host loop's own work would go here
        spins = spins + 1
      end
      print("RESULT=" .. result, spins > 1)
    ]] }, { env = lua_env() })
    assert.are.equal(0, code, out)
    assert.matches("RESULT=7\ttrue", out, 1, true)
  end)
end)

describe("the interactive prompt", function()
  after_each(helper.cleanup)

  local function prompt_session()
    local rc = helper.tmpname("rc")
    local t = helper.tmux(("cd %s && ./pgcoord-run -i; echo $? > %s")
      :format(helper.quote(helper.root), rc))
    t.rc_file = rc
    t:wait_for("\n>$", 10, "the first prompt")
    return t
  end

  it("prints an expression's value", function()
    local t = prompt_session()
    t:line("1 + 41")
    t:wait_for("\n42\n>", 10, "the value 42")
    t:line("'a', 2, nil")
    t:wait_for("\na%s+2%s+nil\n>", 10, "the values a 2 nil") -- tmux shows tabs as spaces
    t:line("error('oops at prompt')")
    t:wait_for("oops at prompt", 10, "the error")
    t:line("2 * 21 + 1")
    t:wait_for("\n43\n>", 10, "the prompt to survive an error")
  end)

  it("masks passwords in an error shown at the prompt", function()
    local t = prompt_session()
    t:line([[error("postgresql://u:TopSecret@h/d")]])
    t:wait_for("postgresql://u:%*%*%*@h/d\n", 10, "the masked error")
    local screen = t:capture()
    local _, n = screen:gsub("TopSecret", "")
    assert.are.equal(1, n, "only the typed line shows the password:\n" .. screen)
  end)

  it("runs a multi-line for loop", function()
    local t = prompt_session()
    t:line("for i = 1, 3 do")
    t:line("print('line' .. i * 10)")
    t:line("end")
    t:wait_for("line10\nline20\nline30\n>", 10, "the loop's output")
  end)

  it("shows the continuation prompt after an incomplete line", function()
    local t = prompt_session()
    t:line("for i = 1, 2 do")
    t:wait_for("for i = 1, 2 do\n>>$", 5, "the >> prompt")
    t:line("print('in loop ' .. i)")
    t:line("end")
    t:wait_for("in loop 2\n>", 10, "the loop's output")
    -- each line typed shows once
    local screen = t:capture()
    local _, n = screen:gsub("print%('in loop ' %.%. i%)", "")
    assert.are.equal(1, n, "the line shows " .. n .. " times:\n" .. screen)
  end)

  it("shows a fresh prompt after a syntax error", function()
    local t = prompt_session()
    t:line("1 +* 2")
    t:wait_for("unexpected symbol", 10, "the syntax error")
    -- the rejected line is not shown again as if still being edited
    t:wait_for("unexpected symbol[^\n]*\n>$", 5, "an empty prompt after the error")
    t:line("3 + 4")
    t:wait_for("\n7\n>$", 10, "the value 7")
  end)

  it("a task spawned at the prompt keeps printing while the prompt waits", function()
    local t = prompt_session()
    t:line("ticks = true; pgcoord.spawn(function() local i = 0 while ticks do i = i + 1"
      .. " print('tick ' .. i) pgcoord.sleep(0.05) end print('ticker off') end)")
    t:wait_for("\ntick 3\n", 10, "tick 3")
    -- the prompt is redrawn below what the task prints
    t:wait_for("\ntick %d+\n>$", 10, "the prompt under the ticks")
    t:line("6 * 7")
    t:wait_for("\n42\n", 10, "the value typed while the task prints")
    local screen = t:capture()
    local before = tonumber(screen:match(".*tick (%d+)"))
    t:wait_for("tick " .. (before + 3) .. "\n", 10, "more ticks after the expression")
    t:line("ticks = false")
    t:wait_for("ticker off\n>$", 10, "the ticker to stop under the prompt")
  end)

  it("Ctrl-D leaves with status 0", function()
    local t = prompt_session()
    t:line("x = 1")
    t:wait_for("x = 1\n>$", 10, "the prompt after x = 1")
    t:send("C-d")
    local rc = helper.wait_until(function()
      local s = helper.read_file(t.rc_file)
      return s and tonumber(s:match("%d+"))
    end, 10, "pgcoord-run to exit")
    assert.are.equal(0, rc)
  end)
end)

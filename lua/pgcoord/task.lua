-- Tasks: coroutines scheduled on the one event loop.
--
-- Everything that waits goes through await(register): register(resume)
-- starts the operation and arranges for resume(...) to be called once with
-- its outcome.  Inside a task, await yields; in the main thread (a stock
-- lua5.4 program) it drives the loop until resume is called.  A resume
-- that arrives while some task is running is queued and run from the
-- loop, so tasks never resume each other directly.  (A query's wait is
-- the one exception to await: it parks the task in C, under the same
-- rules, given to C by core.set_tasks below.)
local core = require "pgcoord.core"

local task = {}

local Task = {}
Task.__index = Task

local by_co = setmetatable({}, { __mode = "k" })
local ready = {}          -- FIFO of { t, n, ... } waiting to be resumed
local ready_head, ready_tail = 1, 0
local live = 0            -- tasks not yet finished, daemons excepted
local alive = {}          -- those tasks, for a stop past its deadline
local next_id = 0
local reporter = function(t, err, trace)
  io.stderr:write(("level=error msg=\"task failed\" task=%d error=%q\n%s\n")
    :format(t.id, tostring(err), trace or ""))
end

-- The error raised inside a task that is being cancelled.
local CANCELLED = setmetatable({ message = "task cancelled", sqlstate = "57014" }, {
  __tostring = function() return "task cancelled" end,
})
task.CANCELLED = CANCELLED

-- One readable line for any error value: strings, tables with __tostring
-- (pgcoord's errors), tables with a message, anything else by its type.
function task.error_text(err)
  if type(err) == "string" then return err end
  local mt = getmetatable(err)
  if mt and mt.__tostring then return tostring(err) end
  if type(err) == "table" and err.message then return tostring(err.message) end
  return ("(error object is a %s value)"):format(type(err))
end

-- An xpcall handler for the callbacks a task runs (job handlers, publish
-- functions): a cancellation passes through as it is, any other error
-- comes back as { err =, trace = }.
function task.traced(err)
  if err == CANCELLED then return err end
  return { err = err, trace = debug.traceback(task.error_text(err), 2) }
end

local function on_error(err)
  if err == CANCELLED then return { err = err } end
  return { err = err, trace = debug.traceback(task.error_text(err), 2) }
end

local function finish(t, ok, ...)
  if t.daemon then t.daemon = false else live = live - 1 end
  alive[t] = nil
  if ok then
    t.state, t.results = "done", table.pack(...)
  else
    local e = ...
    if e.err == CANCELLED then
      t.state, t.error = "cancelled", CANCELLED
    else
      t.state, t.error = "failed", e.err
      if t.joining == 0 then reporter(t, e.err, e.trace) end
    end
  end
  local joiners, joins = t.joiners, t.joins
  t.joiners, t.joins, t.joining = {}, 0, 0
  for i = 1, joins do
    local done = joiners[i]
    if done then
      joiners[i] = nil
      done()
    end
  end
end

local co_resume = coroutine.resume
local co_yield = coroutine.yield

-- After a resume of t returned (ok false only on a bug in this file: the
-- body catches errors): the body stores its outcome in t.outcome as it ends.
local function resumed(t, ok, err)
  if not ok then reporter(t, err, debug.traceback(t.co)) end
  local outcome = t.outcome
  if outcome and (t.state == "running" or t.state == "ready") then
    finish(t, table.unpack(outcome, 1, outcome.n))
  end
end

local function resume_task(t, ...)
  resumed(t, co_resume(t.co, ...))
end

local function drain()
  local last = ready_tail
  while ready_head <= last do
    local item = ready[ready_head]
    ready[ready_head] = nil
    ready_head = ready_head + 1
    if type(item) == "function" then
      local ok, err = xpcall(item, debug.traceback)
      if not ok then reporter({ id = 0 }, err, nil) end
    else
      local t = item[1]
      if coroutine.status(t.co) == "suspended" then
        if t.state == "ready" then t.state = "running" end
        resume_task(t, table.unpack(item, 2, item.n))
      end
    end
  end
  if ready_head <= ready_tail then core.defer() end
end
core.set_defer(drain)

-- Runs fn from the loop soon, after the events in hand: a burst of
-- events then costs one run of fn, not one each.
function task.defer(fn)
  ready_tail = ready_tail + 1
  ready[ready_tail] = fn
  core.defer()
end

local function enqueue(t, ...)
  ready_tail = ready_tail + 1
  ready[ready_tail] = table.pack(t, ...)
  core.defer()
end

-- A wait that C ends by itself (a query's: core.wait_prepared) parks the
-- task in C, which resumes it there (loop.c); these are the rules it
-- keeps: which coroutines are tasks (a cancel pending is read there too),
-- the queue for a resume from inside a task, and the end of a task.
core.set_tasks(by_co,
  function(co, ...) enqueue(by_co[co], ...) end,
  function(co, ok, err) resumed(by_co[co], ok, err) end)

local function current()
  local co, main = coroutine.running()
  if main then return nil, true end
  return by_co[co], false
end

local co_running = coroutine.running

-- The function that ends t's wait number token with its arguments, the
-- values await returns; a call for another wait, or after the wait ended,
-- does nothing.  Without a token, it ends whichever wait is on: the one
-- each task has, for register functions that call back once (below).
-- It resumes the task at once from the main thread (an event callback),
-- else queues it, so that a task never runs inside another.
local function resumer(t, token)
  return function(...)
    local current_token = t.wait_token
    if not current_token or (token and current_token ~= token) then return end
    t.wait_token, t.cancel_wait = false, false
    if not t.parked then -- resumed before the task yielded
      t.early = table.pack(...)
      return
    end
    local _, main = co_running()
    if main then resume_task(t, ...) else enqueue(t, ...) end
  end
end

-- Register functions that call resume exactly once, never after their
-- wait ended otherwise: a wait ends only by that call, or by a cancel,
-- which ends the task.  Their waits take the task's own resume function
-- instead of a new closure each (a query's wait runs for every statement).
local calls_once = setmetatable({}, { __mode = "k" })

function task.calls_back_once(register)
  calls_once[register] = true
  return register
end

function task.spawn(fn, ...)
  if type(fn) ~= "function" then
    error(("pgcoord.spawn: expected a function, got %s"):format(type(fn)), 2)
  end
  next_id = next_id + 1
  -- (fields read on every wait are present, so their reads stay off Task)
  local t = setmetatable({ id = next_id, state = "ready", joiners = {}, joins = 0, joining = 0,
                           waits = 0, fn = fn,
                           cancel_requested = false, outcome = false, wait_token = false,
                           cancel_wait = false, parked = false, early = false }, Task)
  t.resume = resumer(t, nil)
  t.co = coroutine.create(function(...)
    t.outcome = table.pack(xpcall(fn, on_error, ...))
  end)
  by_co[t.co] = t
  live = live + 1
  alive[t] = true
  enqueue(t, ...)
  return t
end

-- A daemon task does not keep pgcoord.run() or pgcoord-run alive.
function task.spawn_daemon(fn, ...)
  local t = task.spawn(fn, ...)
  t.daemon = true
  live = live - 1
  alive[t] = nil
  return t
end

local function raise_if_cancelled(t, ...)
  if t.cancel_requested then
    t.cancel_requested = false
    error(CANCELLED, 0)
  end
  return ...
end

-- Runs the loop in the main thread until done() is true.
local function drive(done)
  while not done() do
    if not core.step() then
      error("pgcoord: waiting for something that can never happen (nothing is pending)", 3)
    end
  end
end

-- Waits for the outcome that register(resume, ...) arranges; returns the
-- arguments given to resume.  register may return a function that undoes
-- the registration, run if the task is cancelled while it waits.
function task.await(register, ...)
  local co, main = co_running()
  if main then
    local result
    local cancel = register(function(...)
      if not result then result = table.pack(...) end
    end, ...)
    local ok, err = pcall(drive, function() return result ~= nil end)
    if not ok then
      if type(cancel) == "function" then cancel() end
      error(err, 0)
    end
    return table.unpack(result, 1, result.n)
  end
  local t = by_co[co]
  if t == nil then
    error("pgcoord: cannot wait inside a plain coroutine; use pgcoord.spawn", 2)
  end
  if t.cancel_requested then raise_if_cancelled(t) end
  -- a resume meant for an earlier wait (a timer that fired late) must not
  -- end this one: each wait has its own number.  (parked: the task has
  -- yielded for this wait; a resume before that leaves its values in early)
  local token = t.waits + 1
  t.waits, t.wait_token, t.parked = token, token, false
  local cancel = register(calls_once[register] and t.resume or resumer(t, token), ...)
  local early = t.early
  if early then -- resumed before we yielded
    t.early = false
    return table.unpack(early, 1, early.n)
  end
  t.parked = true
  t.cancel_wait = cancel or false
  return raise_if_cancelled(t, co_yield())
end

local sleep_register = task.calls_back_once(function(resume, seconds)
  local timer = core.timer(seconds, resume)
  return function() timer:cancel() end
end)

function task.sleep(seconds)
  if type(seconds) ~= "number" or seconds ~= seconds then
    error(("pgcoord.sleep: seconds must be a number, got %s"):format(tostring(seconds)), 2)
  end
  task.await(sleep_register, seconds)
end

-- Lets the other ready tasks and the loop's pending events run, then goes
-- on: a task that works through many items without waiting calls this so
-- that it does not starve the rest (a signal it sent is acted on at once).
local defer_register = task.calls_back_once(function(resume)
  task.defer(resume)
end)

function task.pass()
  task.await(defer_register)
end

function task.current()
  return (current())
end

Task.__tostring = function(t)
  return ("task %d (%s)"):format(t.id, t.state)
end

function Task:status()
  return self.state
end

-- t.joiners[i] wakes the i-th wait for t (t.joins of them so far, t.joining
-- of them still there): one that gives up (a timeout, a cancel) leaves a
-- hole, so that leaving costs the same with one joiner or thousands (a
-- task polled with t:wait(0.01) in a loop), and finish wakes the rest in
-- the order they came.
local join_register = task.calls_back_once(function(resume, t, timeout)
  local joiners, timer = t.joiners, nil
  local slot = t.joins + 1
  t.joins, t.joining = slot, t.joining + 1
  local function leave()
    if joiners[slot] then
      joiners[slot] = nil
      t.joining = t.joining - 1
    end
  end
  joiners[slot] = function()
    if timer then timer:cancel() end
    resume(true)
  end
  if timeout then
    timer = core.timer(timeout, function()
      leave()
      resume(false)
    end)
  end
  return function()
    if timer then timer:cancel() end
    leave()
  end
end)

-- Waits until the task has ended; false when timeout seconds pass first.
function Task:wait(timeout)
  if self.state == "ready" or self.state == "running" then
    if current() == self then error("pgcoord: a task cannot wait for itself", 2) end
    return task.await(join_register, self, timeout)
  end
  return true
end

-- Waits for the task and returns its results, or raises its error.
function Task:join()
  self:wait()
  if self.state == "done" then
    return table.unpack(self.results, 1, self.results.n)
  end
  error(self.error, 0)
end

-- Runs fn(...) in a task of its own; if it has not ended within seconds,
-- cancels it and raises an error with SQLSTATE 57014.
function task.with_timeout(seconds, fn, ...)
  local child = task.spawn(fn, ...)
  -- if this task is cancelled while it waits, the child goes too
  local _ <close> = setmetatable({}, { __close = function() child:cancel() end })
  if not child:wait(seconds) then
    child:cancel()
    error(core.error("57014", ("timed out after %gs"):format(seconds)), 0)
  end
  return child:join()
end

-- Cancels the task: a waiting task is unwound now (its to-be-closed
-- variables run), a running one raises at its next wait.
function Task:cancel()
  if self.state ~= "ready" and self.state ~= "running" then return false end
  local co_status = coroutine.status(self.co)
  if co_status == "running" or co_status == "normal" then
    self.cancel_requested = true
    if co_status == "running" then error(CANCELLED, 0) end
    return true
  end
  self.wait_token = false
  if self.cancel_wait then
    pcall(self.cancel_wait)
    self.cancel_wait = false
  end
  local ok, err = coroutine.close(self.co)
  if not ok then reporter(self, err, "error while cancelling") end
  finish(self, false, { err = CANCELLED })
  return true
end

-- ---- conditions --------------------------------------------------------------

-- A condition: tasks wait on it (with an optional timeout) until signalled.
local Cond = {}
Cond.__index = Cond

function task.cond()
  return setmetatable({ waiters = {} }, Cond)
end

local cond_register = task.calls_back_once(function(resume, cond, timeout)
  if not timeout then
    -- resume is the task's own (calls_back_once): the waiter itself
    cond.waiters[resume] = true
    return function() cond.waiters[resume] = nil end
  end
  local timer
  local function done(value, err)
    timer:cancel()
    cond.waiters[done] = nil
    resume(value, err)
  end
  cond.waiters[done] = true
  timer = core.timer(timeout, function() done(nil, "timeout") end)
  return function()
    timer:cancel()
    cond.waiters[done] = nil
  end
end)

-- Waits for signal(value); returns value, or nil, "timeout".
function Cond:wait(timeout)
  return task.await(cond_register, self, timeout)
end

-- Wakes every waiting task with value (true when nil); returns whether
-- any task was waiting.
function Cond:signal(value)
  local waiters = self.waiters
  if next(waiters) == nil then return false end
  self.waiters = self.spare or {}
  self.spare = nil
  if value == nil then value = true end
  for done in pairs(waiters) do
    waiters[done] = nil
    done(value)
  end
  self.spare = waiters -- empty now: reused by the next signal
  return true
end

-- ---- signals ---------------------------------------------------------------

-- A wake-up kept until a waiter takes it: notify() while nobody waits
-- makes the next wait() return at once.  Loops that wait for "something
-- to do" use this, so a notification that comes while they are busy is
-- never lost (a Cond drops it).  s.kept, read-only, is true while a
-- wake-up waits to be taken: notify() would do nothing then, and a loop
-- that notifies for every item tests it instead of making the call.
local Signal = {}
Signal.__index = Signal

function task.signal()
  return setmetatable({ cond = task.cond(), kept = false }, Signal)
end

-- Returns whether a task was waiting (and is woken now).
function Signal:notify()
  -- (kept: nobody waits, so nothing to signal; cheap for loops that
  -- notify on every item)
  if self.kept then return false end
  if self.cond:signal() then return true end
  self.kept = true
  return false
end

-- Returns true when notified (now or before), false when timeout passed.
function Signal:wait(timeout)
  if self.kept then
    self.kept = false
    return true
  end
  return self.cond:wait(timeout) ~= nil
end

-- Drops a kept wake-up (the waiter found the work itself).
function Signal:clear()
  self.kept = false
end

function task.is_cancelled(err)
  return err == CANCELLED
end

-- Number of tasks still to finish (daemons excepted).
function task.live()
  return live
end

-- Those tasks, oldest first.
function task.alive()
  local list = {}
  for t in pairs(alive) do list[#list + 1] = t end
  table.sort(list, function(a, b) return a.id < b.id end)
  return list
end

function task.set_reporter(fn)
  reporter = fn
end

return task

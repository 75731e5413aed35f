-- `pgcoord-run --workers N`: one process per core.  The supervisor forks
-- N children that each run the script with a loop of their own, restarts
-- a child that dies (with backoff, so a script that crashes at start does
-- not spin), forwards SIGTERM/SIGINT for a graceful stop of all, and
-- exits once every child has stopped: 0 when each stopped cleanly, 1 when
-- one did not (ran past its stop deadline, or had to be killed).  It
-- opens no connection itself.  Its logs call a process a child, in its
-- slot (1..N): "worker" means a job worker's database id elsewhere.
local core = require "pgcoord.core"
local log = require "pgcoord.log"
local lifecycle = require "pgcoord.lifecycle"

local supervisor = {}

local SIGINT, SIGTERM, SIGKILL, SIGCHLD = 2, 15, 9, 17
local BACKOFF_MIN, BACKOFF_MAX = 0.1, 10
local STABLE_AFTER = 10 -- a child that lived this long resets its backoff

-- A child past its own stop deadline (and its handlers' grace) is killed
-- this long after it.
local KILL_AFTER = 5

-- run_child() runs the script in a child and returns its exit status;
-- stop_timeout is the children's stop deadline.
function supervisor.run(n, run_child, stop_timeout)
  local slots = {}        -- slot -> { pid, started, backoff }
  local by_pid = {}
  local stopping = false
  local status = 0
  local watchers, killer, reporter

  local function n_alive()
    local count = 0
    for _ in pairs(by_pid) do count = count + 1 end
    return count
  end

  local function start(slot)
    local s = slots[slot]
    local pid = core.fork()
    if pid == 0 then
      -- the child: none of the supervisor's business is ours
      for _, w in ipairs(watchers) do w:close() end
      local ok, code = xpcall(run_child, debug.traceback, slot)
      if not ok then log.error("child failed", { slot = slot, error = code }) end
      io.stdout:flush()
      io.stderr:flush()
      core.exit(ok and (code or 0) or 1)
    end
    s.pid, s.started = pid, core.now()
    by_pid[pid] = slot
    log.info("child started", { slot = slot, pid = pid })
  end

  local function schedule_restart(slot)
    local s = slots[slot]
    if core.now() - s.started >= STABLE_AFTER then s.backoff = BACKOFF_MIN end
    local delay = s.backoff
    s.backoff = math.min(BACKOFF_MAX, s.backoff * 2)
    log.warn("restarting child", { slot = slot, delay = delay })
    -- forked from the main loop below, never inside an event callback
    s.timer = core.timer(delay, function()
      s.timer = nil
      s.due = true
    end)
  end

  local function reap()
    while true do
      local pid, how, code = core.wait_child()
      if not pid then return end
      local slot = by_pid[pid]
      by_pid[pid] = nil
      if slot then
        slots[slot].pid = nil
        local fields = { slot = slot, pid = pid }
        if how == "killed" then fields.signal = log.signal_name(code) else fields.status = code end
        if stopping then
          if how ~= "exited" or code ~= 0 then status = 1 end
          log.info("child stopped", fields)
        else
          log.warn("child died", fields)
          schedule_restart(slot)
        end
      end
    end
  end

  -- Every lifecycle.WAIT_REPORT_EVERY seconds of a stop, while children
  -- run: one line naming them, as a single process names what it waits for.
  local function report_waiting(started)
    reporter = core.timer(lifecycle.WAIT_REPORT_EVERY, function()
      reporter = nil
      local running, pids = {}, {}
      for slot, s in ipairs(slots) do
        if s.pid then
          running[#running + 1] = slot
          pids[#pids + 1] = s.pid
        end
      end
      if #running == 0 then return end
      local elapsed = core.now() - started
      local deadline = stop_timeout and stop_timeout < math.huge and stop_timeout + KILL_AFTER
      log.info("stop waiting", { children = #running, slots = table.concat(running, " "),
        pids = table.concat(pids, " "), elapsed = ("%.1f"):format(elapsed),
        kill_in = deadline and ("%.1f"):format(math.max(0, deadline - elapsed)) or nil })
      report_waiting(started)
    end)
  end

  local function forward(signum)
    if stopping then
      log.warn("second signal: killing the children", { signal = log.signal_name(signum) })
      for pid in pairs(by_pid) do core.kill(pid, SIGKILL) end
      return
    end
    stopping = true
    log.info("stopping the children", { signal = log.signal_name(signum),
      children = n_alive() })
    for _, s in ipairs(slots) do
      if s.timer then s.timer:cancel() end
    end
    for pid in pairs(by_pid) do core.kill(pid, SIGTERM) end
    report_waiting(core.now())
    if stop_timeout and stop_timeout < math.huge then
      killer = core.timer(stop_timeout + KILL_AFTER, function()
        for pid, slot in pairs(by_pid) do
          log.error("child did not stop in time: killing it", { slot = slot, pid = pid,
            signal = "SIGKILL" })
          core.kill(pid, SIGKILL)
        end
      end)
    end
  end

  watchers = {
    core.signal(SIGCHLD, reap),
    core.signal(SIGTERM, forward),
    core.signal(SIGINT, forward),
  }
  for slot = 1, n do
    slots[slot] = { backoff = BACKOFF_MIN }
    start(slot)
  end
  while next(by_pid) ~= nil or not stopping do
    core.step(1)
    reap() -- a SIGCHLD can cover several children
    for slot, s in ipairs(slots) do
      if s.due then
        s.due = false
        if not stopping then start(slot) end
      end
    end
  end
  for _, w in ipairs(watchers) do w:close() end
  if killer then killer:cancel() end
  if reporter then reporter:cancel() end
  return status
end

return supervisor

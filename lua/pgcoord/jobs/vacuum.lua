-- A worker's own VACUUM of pgcoord.jobs, between autovacuum's visits.
-- Each job leaves two dead row versions behind (its claim's update and
-- its delete), and claims walk their index entries until a vacuum clears
-- them.  Autovacuum looks at a database once per autovacuum_naptime (a
-- minute by default), and a busy group makes dead rows faster than that:
-- ten runs of 200,000 jobs in a minute left pgcoord.jobs 9.8 times its
-- size after the first, and the tenth run at half the first's speed
-- (scripts/bench/jobs-big).  So a worker that wrote `every` results runs
-- VACUUM itself: one at a time in a worker, and SKIP_LOCKED, so that none
-- waits behind another worker's or autovacuum's (whoever holds the
-- table's lock is at it already).  A role that does not own the table
-- gets a warning from the server, and nothing is vacuumed.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local sql = require "pgcoord.jobs.sql"

local vacuum = {}

local Vacuum = {}
Vacuum.__index = Vacuum

-- every: results written between vacuums (0: never); on_error(what, err).
function vacuum.new(pool, group, every, on_error)
  return setmetatable({ pool = pool, group = group, every = every, on_error = on_error,
                        results = 0, done = 0, running = nil }, Vacuum)
end

-- The worker wrote n results.
function Vacuum:written(n)
  if self.every == 0 then return end
  self.results = self.results + n
  if self.results >= self.every and not self.running then
    self.results = 0
    self.running = task.spawn(self._run, self)
  end
end

function Vacuum:_run()
  local started = core.now()
  local ok, err = pcall(self.pool.exec, self.pool, sql.VACUUM)
  self.running = nil
  if not ok then return self.on_error("vacuuming pgcoord.jobs failed", err) end
  self.done = self.done + 1
  log.info("jobs table vacuumed", { group = self.group,
    seconds = ("%.3f"):format(core.now() - started) })
end

-- Vacuums done.
function Vacuum:count()
  return self.done
end

-- Gives a vacuum on its way up to grace seconds, then cancels it (the
-- server stops it; the next one, anywhere, takes it up).
function Vacuum:stop(grace)
  local t = self.running
  if t and not t:wait(grace) then t:cancel() end
end

return vacuum

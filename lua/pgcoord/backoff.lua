-- Backoff for every loop that retries: reconnects, claims and writes
-- while the database is away, failed work.  Capped exponential with
-- "equal jitter": each delay is half the current step plus a random half,
-- so a fleet that lost the database at once does not come back at once.
-- Part of the runtime layer.
--
--   local b = backoff.new({ base = 0.1, cap = 10 })
--   b:next()   -- 0.05..0.1, then 0.1..0.2, ... up to cap/2..cap
--   b:reset()  -- after a success
local backoff = {}

local Backoff = {}
Backoff.__index = Backoff

-- The step after attempt n (1-based): base * factor^(n-1), at most cap.
function backoff.step(base, cap, n, factor)
  return math.min(cap, base * (factor or 2) ^ (n - 1))
end

function backoff.new(opts)
  opts = opts or {}
  return setmetatable({ base = opts.base or 0.1, cap = opts.cap or 10, factor = opts.factor or 2,
                        jitter = opts.jitter ~= false, attempts = 0 }, Backoff)
end

-- The delay before the next try.
function Backoff:next()
  self.attempts = self.attempts + 1
  local step = backoff.step(self.base, self.cap, self.attempts, self.factor)
  if not self.jitter then return step end
  return step / 2 + math.random() * step / 2
end

function Backoff:reset()
  self.attempts = 0
end

return backoff

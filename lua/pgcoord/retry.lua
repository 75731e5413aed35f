-- Retry policies for failed work, computed here and handed to SQL as a
-- delay in seconds, so that the rule lives in one place:
--   jobs            linear: base_delay * attempt, up to max retries
--   queue, outbox   exponential: delay * 2^(n-1), capped
-- Part of the runtime layer.
local backoff = require "pgcoord.backoff"

local retry = {}

-- Seconds before attempt + 1 of a job whose attempt-th run failed.
function retry.linear(base_delay, attempt)
  return base_delay * attempt
end

-- Seconds before the next delivery after the n-th failed one.
function retry.exponential(delay, cap, n)
  return backoff.step(delay, cap, math.max(1, n))
end

return retry

-- The POST actions: action(d, form) -> where to go back to, the notice.
-- Each goes through the primitives' public calls (the same the admin
-- commands use); form is checked (CSRF, token) before any runs.
local jobs_module = require "pgcoord.jobs"
local html = require "pgcoord.dashboard.html"
local pages = require "pgcoord.dashboard.pages"

local actions = {}

local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

local function plural(n, one)
  return ("%d %s%s"):format(n, one, n == 1 and "" or "s")
end

local function unknown_action(d, action, allowed)
  d.problem(400, ("action must be one of %s, got %q"):format(allowed, tostring(action)))
end

-- POST /jobs/ID: retry, cancel or delete one job.
function actions.job(d, form)
  local id = d.id(form.id)
  local job = d.jobs:get(id)
  if not job then d.problem(404, ("no job %d"):format(id)) end
  local back = "/jobs/" .. id
  local action = form.action
  if action == "retry" then
    local n = d.jobs:retry(id)
    return back, n == 1 and ("job %d retried"):format(id)
      or ("job %d is %s: only failed jobs are retried"):format(id, job.state)
  elseif action == "cancel" then
    local n = d.jobs:cancel(id)
    return back, n == 1 and ("job %d cancelled"):format(id)
      or ("job %d is %s: nothing to cancel"):format(id, job.state)
  elseif action == "delete" then
    local n = d.jobs:delete(id)
    if n == 1 then
      return "/jobs" .. html.query({ { "group", job.group }, { "state", job.state } }),
        ("job %d deleted"):format(id)
    end
    return back, ("job %d is %s: only failed or cancelled jobs are deleted"):format(id, job.state)
  end
  unknown_action(d, action, "retry, cancel, delete")
end

-- POST /group: pause, resume, or retry every failed job of a group.
function actions.group(d, form)
  local name = d.required(form, "name")
  local back = "/group" .. html.query({ { "name", name } })
  local action = form.action
  if action == "pause" or action == "resume" then
    jobs_module.set_paused(d.db, name, action == "pause", "dashboard " .. action)
    return back, ("group %s %s"):format(name, action == "pause" and "paused" or "resumed")
  elseif action == "retry-failed" then
    local n = d.jobs:retry_failed(name)
    return back, ("%s of group %s retried"):format(plural(n, "failed job"), name)
  end
  unknown_action(d, action, "pause, resume, retry-failed")
end

-- POST /queues/dead: requeue one dead letter (id) or all of a subscription.
function actions.requeue(d, form)
  if form.action ~= "requeue" then unknown_action(d, form.action, "requeue") end
  local q, name, sub = pages.subscription(d, form)
  local id = form.id and d.id(form.id)
  local n = q:requeue_dead(sub, id and { id } or nil)
  return "/queues/dead" .. html.query({ { "queue", name }, { "subscription", sub } }),
    ("%s requeued"):format(plural(n, "dead letter"))
end

-- POST /outbox/failed: retry one failed message.
function actions.outbox_retry(d, form)
  if form.action ~= "retry" then unknown_action(d, form.action, "retry") end
  local ob, name = pages.outbox(d, form)
  local id = d.required(form, "id")
  if not id:match(UUID) then
    d.problem(400, ("id must be a message id (a UUID), got %q"):format(id))
  end
  local n = ob:retry(id)
  return "/outbox/failed" .. html.query({ { "table", name } }),
    n == 1 and ("message %s retried"):format(id)
      or ("message %s is not failed: nothing retried"):format(id)
end

return actions

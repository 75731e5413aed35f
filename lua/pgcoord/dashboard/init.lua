-- The dashboard: server-rendered pages under / of the --http server.
-- This file is routing, authentication, CSRF and the answer's headers;
-- pages.lua reads, actions.lua acts, views.lua and html.lua write HTML,
-- sql.lua holds every statement, static.lua the assets.
--
-- Who may do what: with a token (--http-token, PGCOORD_HTTP_TOKEN), every
-- action needs it, as `Authorization: Bearer T` or the session cookie the
-- login form sets (HttpOnly, SameSite=Strict); on an address that is not
-- loopback the pages need it too, and without a token there the dashboard
-- is not served at all.  Every POST carries the CSRF field of a page this
-- process served: without it, 403 and nothing done.
--
-- A page waits on the database, so the request is deferred: a task reads,
-- renders and replies, and the loop goes on meanwhile.
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local db_module = require "pgcoord.db"
local jobs_module = require "pgcoord.jobs"
local html = require "pgcoord.dashboard.html"
local views = require "pgcoord.dashboard.views"
local pages = require "pgcoord.dashboard.pages"
local actions = require "pgcoord.dashboard.actions"
local static = require "pgcoord.dashboard.static"

local dashboard = {}

local Dashboard = {}
Dashboard.__index = Dashboard

local MAX_QUERY = 4096
local PAGE_TIMEOUT = 10
local COOKIE = "pgcoord_session"

dashboard.HEADERS = {
  ["Content-Security-Policy"] = "default-src 'self'",
  ["X-Frame-Options"] = "DENY",
  ["X-Content-Type-Options"] = "nosniff",
  ["Referrer-Policy"] = "same-origin",
}

-- ---- problems: a page with a status, never a traceback -------------------------

local Problem = {}
Problem.__tostring = function(p) return p.message end

function dashboard.problem(status, message)
  error(setmetatable({ status = status, message = message }, Problem), 0)
end
local problem = dashboard.problem

-- ---- reading the request -------------------------------------------------------

local function random_hex(bytes)
  local f = io.open("/dev/urandom", "rb")
  local data = f and f:read(bytes)
  if f then f:close() end
  if not data or #data ~= bytes then error("pgcoord.dashboard: cannot read /dev/urandom") end
  return (data:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

-- Equal strings, in a time that does not tell how much of a guess was right.
local function same(a, b)
  if type(a) ~= "string" or type(b) ~= "string" or #a ~= #b then return false end
  local diff = 0
  for i = 1, #a do diff = diff | (a:byte(i) ~ b:byte(i)) end
  return diff == 0
end

local function decode(s, what)
  s = s:gsub("+", " ")
  local bad = false
  s = s:gsub("%%(..)", function(hex)
    local n = tonumber(hex, 16)
    if not n or not hex:match("^%x%x$") then bad = true return "" end
    return string.char(n)
  end)
  if bad or s:find("%%") then problem(400, ("the %s is not well percent-encoded"):format(what)) end
  if not utf8.len(s) or s:find("%z") then
    problem(400, ("the %s holds bytes that are not UTF-8 text"):format(what))
  end
  return s
end

-- "a=1&b=2" -> { a = "1", b = "2" } (the last of a repeated name).
local function parse_form(s, what)
  local out = {}
  for pair in (s or ""):gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    out[decode(k, what)] = decode(v, what)
  end
  return out
end

local function cookies(header)
  local out = {}
  for k, v in (header or ""):gmatch("([^=;%s]+)=([^;]*)") do out[k] = v end
  return out
end

-- args.name, present and not empty, else a 400 naming it.
function dashboard.required(args, name)
  local v = args[name]
  if v == nil or v == "" then problem(400, ("missing parameter %s"):format(name)) end
  return v
end

-- A job id from the URL or a form: a positive integer, else a 400.
function dashboard.id(s)
  local n = type(s) == "string" and s:match("^%d+$") and math.tointeger(tonumber(s))
  if not n or n < 1 then
    problem(400, ("a job id must be a positive integer, got %q"):format(tostring(s)))
  end
  return n
end

-- ---- the dashboard ---------------------------------------------------------------

-- opts: db (a pool), token (nil: none), exposed (true when the address is
-- not loopback), health (fn -> ok, why), outbox_tables.
function dashboard.new(opts)
  return setmetatable({
    db = opts.db,
    jobs = jobs_module.new(opts.db),
    token = opts.token,
    exposed = opts.exposed,
    health_fn = opts.health,
    outbox_tables = opts.outbox_tables or { "outbox_messages" },
    csrf = random_hex(16),
    session = random_hex(24),
    problem = problem, required = dashboard.required, id = dashboard.id,
  }, Dashboard)
end

function Dashboard:health()
  return self.health_fn()
end

function Dashboard:authorized(req)
  if not self.token then return false end
  local auth = req:header("Authorization")
  local bearer = auth and auth:match("^Bearer%s+(.-)%s*$")
  if bearer and same(bearer, self.token) then return true end
  return same(cookies(req:header("Cookie"))[COOKIE], self.session)
end

-- GET routes: path pattern -> page; POST routes: -> action.
local GETS = {
  { "^/$", pages.overview },
  { "^/group$", pages.group },
  { "^/jobs$", pages.jobs },
  { "^/jobs/([^/]+)$", pages.job, "id" },
  { "^/periodic$", pages.periodic },
  { "^/queues/dead$", pages.dead },
  { "^/outbox/failed$", pages.outbox_failed },
}
local POSTS = {
  { "^/jobs/([^/]+)$", actions.job, "id" },
  { "^/group$", actions.group },
  { "^/queues/dead$", actions.requeue },
  { "^/outbox/failed$", actions.outbox_retry },
}

local function match(routes, path)
  for _, r in ipairs(routes) do
    local capture = path:match(r[1])
    if capture then return r, capture end
  end
  return nil
end

local function headers(extra)
  local h = {}
  for k, v in pairs(dashboard.HEADERS) do h[k] = v end
  h["Cache-Control"] = "no-store"
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end

local function page(status, title, body, ctx, extra)
  return status, "text/html; charset=utf-8", html.text(views.layout(title, body, ctx)),
    headers(extra)
end

local function redirect(location, extra)
  local h = { Location = location }
  for k, v in pairs(extra or {}) do h[k] = v end
  return 303, "text/plain; charset=utf-8", "see " .. location .. "\n", headers(h)
end

local function with_notice(location, notice)
  return location .. (location:find("?", 1, true) and "&" or "?")
    .. html.query({ { "notice", notice } }):sub(2)
end

local TITLES = { [400] = "Bad request", [401] = "Log in", [403] = "Forbidden",
  [404] = "Not found", [405] = "Method not allowed", [413] = "Too large",
  [500] = "Internal error", [503] = "Database unavailable" }

local function problem_page(status, message, ctx)
  return page(status, TITLES[status] or "Error", views.problem(message), ctx)
end

-- What a failure inside a page or an action becomes.
local function failure_page(err, ctx, where)
  if getmetatable(err) == Problem then return problem_page(err.status, err.message, ctx) end
  if db_module.schema_missing(err) then
    return problem_page(503, "the pgcoord schema is missing: run pgcoord-run --migrate", ctx)
  end
  if type(err) == "table" and err.sqlstate == "57014" then
    return problem_page(503, ("the database did not answer within %ds"):format(PAGE_TIMEOUT), ctx)
  end
  if type(err) == "table" and err.sqlstate then
    return problem_page(503, "the database refused: "
      .. log.redact(tostring(err):match("^[^\n]*")), ctx)
  end
  log.error("dashboard request failed", { path = where, error = task.error_text(err) })
  return problem_page(500, "the dashboard failed on this request (the log says why)", ctx)
end

-- Runs fn(...) for a deferred request and replies with what it returns,
-- or the page of its failure.
local function answer_later(req, ctx, where, fn, ...)
  req:defer()
  task.spawn_daemon(function(...)
    local r = table.pack(pcall(task.with_timeout, PAGE_TIMEOUT, fn, ...))
    if r[1] then
      req:reply(table.unpack(r, 2, r.n))
    else
      local ok, status, ctype, body, h = pcall(failure_page, r[2], ctx, where)
      if not ok then
        status, ctype, body, h = 500, "text/plain; charset=utf-8", "internal error\n", headers()
      end
      req:reply(status, ctype, body, h)
    end
  end, ...)
end

-- The page of GET route r (capture: its path part).
function Dashboard:_get(r, capture, args, ctx)
  if r[3] then args[r[3]] = capture end
  local title, body, refresh = r[2](self, args, ctx)
  -- (?refresh=0: a page that stays, for a script driving a browser)
  ctx.refresh = args.refresh ~= "0" and refresh or nil
  return page(200, title, body, ctx)
end

function Dashboard:_post(r, capture, form)
  if r[3] then form[r[3]] = capture end
  local back, notice = r[2](self, form)
  log.info("dashboard action", { path = back, notice = notice })
  return redirect(with_notice(back, notice))
end

function Dashboard:_login(method, form, ctx)
  if not self.token then
    return problem_page(404, "there is nothing to log in to: the server has no --http-token", ctx)
  end
  if method ~= "POST" then return page(200, "Log in", views.login(ctx), ctx) end
  if not same(form.csrf, self.csrf) then
    return page(403, "Log in", views.login(ctx, "the form is stale: try again"), ctx)
  end
  if not same(form.token, self.token) then
    return page(403, "Log in", views.login(ctx, "wrong token"), ctx)
  end
  return redirect("/", { ["Set-Cookie"] = ("%s=%s; Path=/; HttpOnly; SameSite=Strict")
    :format(COOKIE, self.session) })
end

-- handler(method, path, req) of the HTTP server for every path it does not
-- serve itself.
function Dashboard:handle(method, path, req)
  local ctx = { csrf = self.csrf }
  local ok, a, b, c, d = pcall(self._route, self, method, path, req, ctx)
  if ok then return a, b, c, d end
  return failure_page(a, ctx, path)
end

function Dashboard:_route(method, path, req, ctx)
  local asset = static[path]
  if asset then
    if method ~= "GET" and method ~= "HEAD" then
      return problem_page(405, "method not allowed: use GET", ctx)
    end
    return 200, asset[1], asset[2], headers({ ["Cache-Control"] = "max-age=300" })
  end
  if self.exposed and not self.token then
    return problem_page(404, "the dashboard is not served on an address that is not loopback"
      .. " without --http-token (/metrics and /healthz are)", ctx)
  end
  local query = req:query()
  if query and #query > MAX_QUERY then
    return problem_page(413, ("the query string is longer than %d bytes"):format(MAX_QUERY), ctx)
  end
  local args = parse_form(query, "query string")
  local authorized = self:authorized(req)
  ctx.session = authorized and self.token ~= nil
  ctx.can_act = authorized
  ctx.login_link = self.token ~= nil and not authorized
  ctx.notice = args.notice
  local form = {}
  local function read_form()
    local ctype = req:header("Content-Type") or ""
    if not ctype:find("^application/x%-www%-form%-urlencoded") then
      problem(400, "a POST must be a form (application/x-www-form-urlencoded)")
    end
    form = parse_form(req:body(), "form")
  end
  if path == "/login" then
    if method == "POST" then read_form() end
    return self:_login(method, form, ctx)
  end
  if path == "/logout" and method == "POST" then
    read_form()
    if not same(form.csrf, self.csrf) then
      return problem_page(403, "the form is stale: reload the page and try again", ctx)
    end
    return redirect("/", { ["Set-Cookie"] = ("%s=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
      :format(COOKIE) })
  end
  if self.exposed and not authorized then
    return page(401, "Log in", views.login(ctx, "this dashboard needs the token"), ctx,
      { ["WWW-Authenticate"] = 'Bearer realm="pgcoord"' })
  end
  local get, gcap = match(GETS, path)
  local post, pcap = match(POSTS, path)
  if not get and not post then return problem_page(404, "no such page: " .. path, ctx) end
  if method == "GET" or method == "HEAD" then
    if not get then return problem_page(405, "method not allowed: use POST", ctx) end
    return answer_later(req, ctx, path, self._get, self, get, gcap, args, ctx)
  end
  if method ~= "POST" or not post then
    local allow = post and (get and "GET, HEAD, POST" or "POST") or "GET, HEAD"
    local status, ctype, body, h = problem_page(405, "method not allowed: use " .. allow, ctx)
    h.Allow = allow
    return status, ctype, body, h
  end
  read_form()
  if not self.token then
    return problem_page(403, "actions need the server started with --http-token", ctx)
  end
  if not authorized then
    return page(401, "Log in", views.login(ctx, "actions need the token"), ctx,
      { ["WWW-Authenticate"] = 'Bearer realm="pgcoord"' })
  end
  if not same(form.csrf, self.csrf) then
    return problem_page(403, "the form is stale or forged (no valid CSRF field): reload the"
      .. " page and try again; nothing was done", ctx)
  end
  return answer_later(req, ctx, path, self._post, self, post, pcap, form)
end

-- Whether host is a loopback address (the pages are open there).
function dashboard.loopback(host)
  return host == "localhost" or host == "::1" or host:match("^127%.%d+%.%d+%.%d+$") ~= nil
end

return dashboard

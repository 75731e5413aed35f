-- A small DevTools-protocol driver for the specs: Debian's headless
-- chromium, spoken to over --remote-debugging-pipe (NUL-terminated JSON
-- commands on the browser's fd 3, replies and events on its fd 4), through
-- libuv (lua-luv), so no WebSocket is needed.
--
--   local browser = require "tools.browser"
--   if not browser.path() then pending("chromium is not installed") end
--   local b = browser.start({ width = 1200, height = 800 })
--   local page = b:open("http://127.0.0.1:9400/")   -- loaded
--   page:eval("document.title"); page:click("button[name=retry]")
--   page:screenshot("build/screenshots/overview.png")
--   page:problems()   -- console errors, exceptions, failed requests
--   b:close()         -- always: it kills the browser's process group
--
-- Every wait has a deadline.  While the driver waits, only libuv's loop
-- runs (pgcoord's does not): the server under test is another process.
local uv = require "luv"
local json = require "pgcoord.json"

local browser = {}

-- The chromium on PATH, or nil.
function browser.path()
  local p = io.popen("command -v chromium 2>/dev/null")
  local path = p:read("l")
  p:close()
  return path ~= "" and path or nil
end

-- ---- base64 (for Page.captureScreenshot) -------------------------------------

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local b64_value = {}
for i = 1, #B64 do b64_value[B64:byte(i)] = i - 1 end

local function base64_decode(s)
  s = s:gsub("[^%w%+/]", "")
  local out = {}
  for i = 1, #s, 4 do
    local a, b, c, d = s:byte(i, i + 3)
    local n = (b64_value[a] << 18) | (b64_value[b] << 12)
      | ((c and b64_value[c] or 0) << 6) | (d and b64_value[d] or 0)
    local bytes = string.char(n >> 16, (n >> 8) & 0xFF, n & 0xFF)
    out[#out + 1] = bytes:sub(1, d and 3 or c and 2 or 1)
  end
  return table.concat(out)
end
browser.base64_decode = base64_decode

-- ---- the browser process -----------------------------------------------------

local Browser = {}
Browser.__index = Browser
local Page = {}
Page.__index = Page

-- Hermetic flags: a fresh profile, no first-run UI, and no traffic off this
-- machine (every host name resolves to nothing, every non-loopback
-- request goes to a closed local port).
local FLAGS = {
  "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
  "--no-first-run", "--no-default-browser-check", "--disable-extensions",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-default-apps", "--disable-domain-reliability", "--no-pings",
  "--disable-client-side-phishing-detection", "--metrics-recording-only",
  "--disable-features=Translate,OptimizationHints,MediaRouter,InterestFeedContentSuggestions",
  "--password-store=basic", "--use-mock-keychain", "--mute-audio", "--hide-scrollbars",
  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
  "--proxy-server=http://127.0.0.1:9", -- loopback bypasses a proxy by default
}

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- Starts chromium; opts: width, height (the pages' viewport, default
-- 1280x800), timeout (seconds each wait may take, default 15), log (where
-- the browser's stdout and stderr go; default a file in its profile
-- directory, which close() removes).
function browser.start(opts)
  opts = opts or {}
  local exe = browser.path()
  if not exe then error("tools.browser: chromium is not installed (scripts/install-deps)", 2) end
  local p = io.popen("mktemp -d /tmp/pgcoord-chromium.XXXXXX")
  local profile = p:read("l")
  p:close()
  local b = setmetatable({
    profile = profile,
    log = opts.log or (profile .. "/browser.log"),
    width = opts.width or 1280,
    height = opts.height or 800,
    timeout = opts.timeout or 15,
    next_id = 0,
    replies = {},
    sessions = {}, -- sessionId -> page
    buffer = "",
  }, Browser)

  local args = { "--user-data-dir=" .. profile,
    ("--window-size=%d,%d"):format(b.width, b.height) }
  for _, f in ipairs(FLAGS) do args[#args + 1] = f end
  args[#args + 1] = "about:blank"

  local null_fd = assert(uv.fs_open("/dev/null", "r", 0))
  local log_fd = assert(uv.fs_open(b.log, "w", tonumber("644", 8)))
  b.commands = uv.new_pipe(false)  -- the browser's fd 3
  b.events = uv.new_pipe(false)    -- the browser's fd 4
  -- detached: its own process group, so that close() ends its renderers too
  local handle, pid = uv.spawn(exe, {
    args = args,
    stdio = { null_fd, log_fd, log_fd, b.commands, b.events },
    detached = true,
  }, function(code, signal)
    b.exit_status = signal ~= 0 and ("signal " .. signal) or ("exit " .. code)
  end)
  uv.fs_close(null_fd)
  uv.fs_close(log_fd)
  if not handle then
    b.commands:close()
    b.events:close()
    os.execute("rm -rf " .. shell_quote(profile))
    error("tools.browser: cannot start chromium: " .. tostring(pid), 2)
  end
  b.process, b.pid = handle, pid
  b.events:read_start(function(err, data)
    if err or not data then
      b.disconnected = err or "the browser closed its pipe"
      return
    end
    b:receive(data)
  end)
  -- wakes uv.run("once") so that every wait checks its deadline
  b.ticker = uv.new_timer()
  b.ticker:start(50, 50, function() end)
  local ok, version = pcall(b.send, b, "Browser.getVersion")
  if not ok then
    b:close()
    error(version, 2)
  end
  b.version = version.product
  return b
end

-- Splits what arrived into messages: replies by id, events to their page.
function Browser:receive(data)
  self.buffer = self.buffer .. data
  while true do
    local nul = self.buffer:find("\0", 1, true)
    if not nul then return end
    local text = self.buffer:sub(1, nul - 1)
    self.buffer = self.buffer:sub(nul + 1)
    local ok, msg = pcall(json.decode, text)
    if not ok then
      -- an error raised in a libuv callback would end the process
      self.disconnected = "an unreadable message: " .. tostring(msg)
      return
    end
    if msg.id then
      self.replies[msg.id] = msg
    elseif msg.sessionId and self.sessions[msg.sessionId] then
      self.sessions[msg.sessionId]:on_event(msg.method, msg.params)
    end
  end
end

-- Runs libuv's loop until fn() returns a true value (returned) or
-- `seconds` pass (nil).
local function run_until(fn, seconds)
  local deadline = uv.hrtime() + seconds * 1e9
  while true do
    local v = fn()
    if v or uv.hrtime() > deadline then return v end
    uv.run("once")
  end
end

-- Runs libuv's loop until fn() returns a true value (returned); raises
-- after timeout seconds (default the browser's), or when the browser is
-- gone, naming `what`.
function Browser:wait(fn, timeout, what)
  timeout = timeout or self.timeout
  local gone
  local v = run_until(function()
    gone = self.exit_status or self.disconnected
    return fn() or gone
  end, timeout)
  if v and not gone then return v end
  what = what or "a condition"
  if gone then
    error(("tools.browser: the browser went away (%s) while waiting for %s; the end of its log"
      .. " (%s):\n%s"):format(gone, what, self.log, self:log_tail()), 2)
  end
  error(("tools.browser: timed out after %gs waiting for %s"):format(timeout, what), 2)
end

-- The last lines the browser wrote to its stdout and stderr.
function Browser:log_tail()
  local f = io.open(self.log, "rb")
  if not f then return "" end
  local text = f:read("a")
  f:close()
  local lines = {}
  for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
  return table.concat(lines, "\n", math.max(1, #lines - 19))
end

-- Lets libuv's loop run for `seconds` (the browser's events arrive).
function Browser:sleep(seconds)
  local woke = false
  local timer = uv.new_timer()
  timer:start(math.floor(seconds * 1000), 0, function() woke = true end)
  local ok, err = pcall(self.wait, self, function() return woke end, seconds + 5, "a pause")
  timer:close()
  if not ok then error(err, 2) end
end

-- Sends a command (to a page's session, if given) and waits for its reply;
-- returns the result, raises the protocol's error naming the method.
function Browser:send(method, params, session)
  self.next_id = self.next_id + 1
  local id = self.next_id
  local msg = { id = id, method = method, params = params or {}, sessionId = session }
  self.commands:write(json.encode(msg) .. "\0")
  local reply = self:wait(function() return self.replies[id] end, nil, "the reply to " .. method)
  self.replies[id] = nil
  if reply.error then
    error(("tools.browser: %s failed: %s"):format(method, tostring(reply.error.message)), 2)
  end
  return reply.result
end

-- A new tab, its events enabled, at url (loaded; nil: about:blank).
function Browser:open(url)
  local target = self:send("Target.createTarget", { url = "about:blank" })
  local attached = self:send("Target.attachToTarget",
    { targetId = target.targetId, flatten = true })
  local page = setmetatable({
    browser = self,
    target = target.targetId,
    session = attached.sessionId,
    loads = 0,
    found = {},
  }, Page)
  self.sessions[page.session] = page
  for _, domain in ipairs({ "Page", "Runtime", "Log", "Network" }) do
    page:send(domain .. ".enable")
  end
  page:send("Emulation.setDeviceMetricsOverride",
    { width = self.width, height = self.height, deviceScaleFactor = 1, mobile = false })
  if url then page:navigate(url) end
  return page
end

-- Ends the browser and everything it started, and removes its profile.
-- Safe to call twice, and after the browser died.
function Browser:close()
  if self.closed then return end
  self.closed = true
  if not self.exit_status and not self.disconnected then
    self.next_id = self.next_id + 1
    self.commands:write(json.encode({ id = self.next_id, method = "Browser.close", params = {} })
      .. "\0")
    run_until(function() return self.exit_status end, 5)
  end
  -- the whole group: renderers and zygotes may outlive the browser
  uv.kill(-self.pid, "sigkill")
  run_until(function() return self.exit_status and not uv.kill(-self.pid, 0) end, 5)
  for _, h in ipairs({ self.ticker, self.commands, self.events, self.process }) do
    if not h:is_closing() then h:close() end
  end
  uv.run("nowait")
  os.execute("rm -rf " .. shell_quote(self.profile))
end

-- ---- pages -------------------------------------------------------------------

function Page:send(method, params)
  return self.browser:send(method, params, self.session)
end

-- What went wrong on the page so far (a list of lines): console errors,
-- uncaught exceptions, browser log errors (CSP refusals among them),
-- requests that failed and responses with a status >= 400.
function Page:problems()
  return self.found
end

local function console_text(args)
  local parts = {}
  for _, a in ipairs(args or {}) do
    parts[#parts + 1] = tostring(a.value ~= nil and a.value or a.description or a.type)
  end
  return table.concat(parts, " ")
end

function Page:on_event(method, p)
  local found = self.found
  if method == "Page.loadEventFired" then
    self.loads = self.loads + 1
  elseif method == "Runtime.consoleAPICalled" and (p.type == "error" or p.type == "assert") then
    found[#found + 1] = "console." .. p.type .. ": " .. console_text(p.args)
  elseif method == "Runtime.exceptionThrown" then
    local d = p.exceptionDetails
    found[#found + 1] = "exception: " .. tostring(d.exception and d.exception.description or d.text)
  elseif method == "Log.entryAdded" and p.entry.level == "error" then
    found[#found + 1] = ("log %s: %s %s"):format(p.entry.source, p.entry.text, p.entry.url or "")
  elseif method == "Network.loadingFailed" and not p.canceled then
    found[#found + 1] = ("request failed: %s %s"):format(p.errorText,
      tostring(p.blockedReason or ""))
  elseif method == "Network.responseReceived" and p.response.status >= 400 then
    found[#found + 1] = ("HTTP %d: %s"):format(p.response.status, p.response.url)
  end
end

-- Waits for the load event after the one counted in `before`.
function Page:wait_load(before, timeout)
  self.browser:wait(function() return self.loads > before end, timeout, "the page to load")
end

-- Goes to url and waits for its load event; raises when it cannot load.
function Page:navigate(url, timeout)
  local before = self.loads
  local r = self:send("Page.navigate", { url = url })
  if r.errorText then
    error(("tools.browser: cannot load %s: %s"):format(url, r.errorText), 2)
  end
  self:wait_load(before, timeout)
end

-- The value of the JS expression (awaited when a promise; a JSON-able
-- value); raises with the page's exception.
function Page:eval(expression)
  local r = self:send("Runtime.evaluate",
    { expression = expression, returnByValue = true, awaitPromise = true })
  if r.exceptionDetails then
    local d = r.exceptionDetails
    error(("tools.browser: %s raised %s"):format(expression,
      tostring(d.exception and d.exception.description or d.text)), 2)
  end
  local v = r.result.value
  if v == json.null then return nil end
  return v
end

-- Polls the JS expression until it is truthy (its value returned); raises
-- after timeout seconds (default the browser's), naming `what`.
function Page:wait_for(expression, timeout, what)
  timeout = timeout or self.browser.timeout
  local deadline = uv.hrtime() + timeout * 1e9
  while true do
    local v = self:eval(expression)
    if v then return v end
    if uv.hrtime() > deadline then
      error(("tools.browser: timed out after %gs waiting for %s"):format(timeout,
        what or expression), 2)
    end
    self.browser:sleep(0.1)
  end
end

-- Clicks the first element matching the CSS selector as a person would:
-- scrolled into view, a mouse press and release at its centre.  opts.navigate:
-- wait for the page that the click loads (a form's POST and its redirect).
function Page:click(selector, opts)
  local before = self.loads
  local box = self:eval(([[(() => {
    const el = document.querySelector(%s);
    if (!el) return null;
    el.scrollIntoView({ block: "center" });
    const r = el.getBoundingClientRect();
    return { x: r.left + r.width / 2, y: r.top + r.height / 2, w: r.width, h: r.height };
  })()]]):format(json.encode(selector)))
  if not box then error(("tools.browser: no element matches %s"):format(selector), 2) end
  if box.w == 0 or box.h == 0 then
    error(("tools.browser: the element %s is not visible"):format(selector), 2)
  end
  for _, kind in ipairs({ "mousePressed", "mouseReleased" }) do
    self:send("Input.dispatchMouseEvent",
      { type = kind, x = box.x, y = box.y, button = "left", clickCount = 1 })
  end
  if opts and opts.navigate then self:wait_load(before, opts.timeout) end
end

-- Types text into the first element matching the CSS selector, as a
-- keyboard would (focused, then the text inserted).
function Page:type(selector, text)
  local found = self:eval(([[(() => {
    const el = document.querySelector(%s);
    if (!el) return false;
    el.focus();
    return true;
  })()]]):format(json.encode(selector)))
  if not found then error(("tools.browser: no element matches %s"):format(selector), 2) end
  self:send("Input.insertText", { text = text })
end

-- Writes a PNG of the viewport (opts.full_page: the whole page) to path,
-- creating its directory; returns the number of bytes written.
function Page:screenshot(path, opts)
  local params = { format = "png" }
  if opts and opts.full_page then
    local m = self:send("Page.getLayoutMetrics")
    local size = m.cssContentSize or m.contentSize
    params.captureBeyondViewport = true
    params.clip = { x = 0, y = 0, width = size.width, height = size.height, scale = 1 }
  end
  local png = base64_decode(self:send("Page.captureScreenshot", params).data)
  local dir = path:match("^(.*)/[^/]*$")
  if dir then os.execute("mkdir -p " .. shell_quote(dir)) end
  local f = assert(io.open(path, "wb"))
  f:write(png)
  f:close()
  return #png
end

return browser

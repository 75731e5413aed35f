-- The dashboard in a real browser: Debian's headless chromium, driven
-- through the DevTools protocol (spec/tools/browser.lua), against a real
-- `pgcoord-run --http`.  Pending, saying so, where chromium is not
-- installed (scripts/install-deps installs it).
local helper = require "helper"
local browser = require "tools.browser"

local SCREENSHOTS = helper.root .. "/build/screenshots"
local BROWSER_LOG = helper.root .. "/build/chromium.log" -- kept after a failed run

-- A running pgcoord-run --http on a free loopback port, and its base URL.
local function serve(argv_tail)
  local argv = { "pgcoord-run", "--http", "127.0.0.1:0" }
  for _, a in ipairs(argv_tail) do argv[#argv + 1] = a end
  local p = helper.start(argv)
  local out = p:wait_output("http endpoint listening", 10)
  return p, ("http://127.0.0.1:%d"):format(tonumber(out:match("address=[%d%.]+:(%d+)")))
end

-- Runs fn(b) with a started browser, which is closed afterwards, also
-- when fn fails; pending when chromium is absent.
local function with_browser(fn, opts)
  if not browser.path() then
    pending("chromium is not installed (scripts/install-deps installs it)")
    return
  end
  opts = opts or {}
  opts.log = BROWSER_LOG
  local b = browser.start(opts)
  local ok, err = xpcall(fn, debug.traceback, b)
  b:close()
  if not ok then error(err, 0) end
end

describe("the browser driver (spec/tools/browser.lua)", function()
  after_each(helper.cleanup)

  it("loads a page, evaluates JS, clicks and writes a PNG screenshot", function()
    with_browser(function(b)
      local _, base = serve({ "-e", "pgcoord.sleep(300)" })
      local page = b:open(base .. "/healthz")
      assert.are.equal("ok", page:eval("document.body.innerText.trim()"))
      assert.are.same({ 1, 2 }, page:eval("[1, 2]"))
      page:eval([[document.body.innerHTML =
        '<button id="b" onclick="window.clicked = (window.clicked || 0) + 1">press</button>']])
      page:click("#b")
      assert.are.equal(1, page:wait_for("window.clicked", 5, "the click"))
      local err = helper.error_of(page.click, page, "#missing")
      assert.matches("no element matches #missing", err, 1, true)
      local path = SCREENSHOTS .. "/driver-healthz.png"
      assert.is_true(page:screenshot(path) > 100)
      assert.are.equal("\137PNG\r\n\26\n", helper.read_file(path):sub(1, 8))
      assert.matches("timed out after 0.2s waiting for never",
        helper.error_of(page.wait_for, page, "false", 0.2, "never"), 1, true)
    end, { width = 400, height = 300 })
  end)

  it("reports console errors, exceptions and failed requests", function()
    with_browser(function(b)
      local _, base = serve({ "-e", "pgcoord.sleep(300)" })
      local page = b:open(base .. "/healthz")
      local before = #page:problems()
      page:eval("console.error('spec says', 42)")
      page:eval("setTimeout(() => { throw new Error('thrown later') }, 0)")
      page:eval("fetch('/no-such-page').catch(() => {})")
      local found = b:wait(function()
        local text = table.concat(page:problems(), "\n", before + 1)
        return text:find("thrown later", 1, true) and text:find("/no-such-page", 1, true)
          and text:find("spec says 42", 1, true) and text
      end, 10, "the page's problems to be reported")
      assert.matches("console.error: spec says 42", found, 1, true)
      assert.matches("exception: Error: thrown later", found, 1, true)
      assert.matches("HTTP 404: " .. base .. "/no-such-page", found, 1, true)
      local err = helper.error_of(page.navigate, page, "http://127.0.0.1:9/")
      assert.matches("cannot load http://127.0.0.1:9/", err, 1, true)
    end)
  end)
end)

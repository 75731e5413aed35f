-- Schedules of periodic jobs: standard 5-field cron specs, the @hourly
-- family and "@every 90s", and the next time each comes due.  Pure Lua:
-- no database, no loop.
--
--   local sched, why = cron.parse("*/15 9-17 * * mon-fri")
--   sched:next(after, "UTC" | "local") -> the first slot strictly after
--                                         `after` (epoch seconds, integer)
--
-- Cron fields: minute 0-59, hour 0-23, day-of-month 1-31, month 1-12 or
-- jan-dec, day-of-week 0-7 or sun-sat (0 and 7 are Sunday); each a list of
-- `*`, a value or a range, with an optional /step (`5/15` means 5-59/15).
-- A day matches both day fields, or either of them when both are
-- restricted (neither starts with `*`), as in every cron.
--
-- "local" is the process's time zone (TZ, through os.date).  Daylight
-- saving is handled as Vixie cron does: a job at a fixed time (minute and
-- hour both without `*`) whose local time is skipped runs once, when the
-- clock jumps; one whose local time repeats runs once, the first time.  A
-- job whose minute or hour is `*` follows the clock: nothing to catch up
-- in a skipped hour, and it runs again in a repeated one.
--
-- "@every" slots are whole multiples of the interval since the epoch, the
-- same in every process and every time zone.
local cron = {}

local Schedule = {}
Schedule.__index = Schedule

-- ---- civil dates (proleptic Gregorian, days since 1970-01-01) ----------------

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = y // 400
  local yoe = y - era * 400
  local doy = (153 * ((m + 9) % 12) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = z // 146097
  local doe = z - era * 146097
  local yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
  local doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
  local mp = (5 * doy + 2) // 153
  local d = doy - (153 * mp + 2) // 5 + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function is_leap(y)
  return y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0)
end

local MONTH_DAYS = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }

local function month_days(y, m)
  if m == 2 and is_leap(y) then return 29 end
  return MONTH_DAYS[m]
end

cron.days_from_civil, cron.civil_from_days = days_from_civil, civil_from_days

-- ---- parsing ------------------------------------------------------------------

local FIELDS = {
  { name = "minute", lo = 0, hi = 59 },
  { name = "hour", lo = 0, hi = 23 },
  { name = "day-of-month", lo = 1, hi = 31 },
  { name = "month", lo = 1, hi = 12, names = { jan = 1, feb = 2, mar = 3, apr = 4, may = 5,
    jun = 6, jul = 7, aug = 8, sep = 9, oct = 10, nov = 11, dec = 12 } },
  { name = "day-of-week", lo = 0, hi = 7, names = { sun = 0, mon = 1, tue = 2, wed = 3,
    thu = 4, fri = 5, sat = 6 } },
}

local MACROS = {
  ["@yearly"] = "0 0 1 1 *", ["@annually"] = "0 0 1 1 *", ["@monthly"] = "0 0 1 * *",
  ["@weekly"] = "0 0 * * 0", ["@daily"] = "0 0 * * *", ["@midnight"] = "0 0 * * *",
  ["@hourly"] = "0 * * * *",
}

local UNITS = { s = 1, m = 60, h = 3600, d = 86400 }
-- (about 31 years: as far as a retry can be put off)
local MAX_EVERY = 1000000000

local function value_of(field, text)
  local n = tonumber(text:match("^%d+$"))
  if not n and field.names then n = field.names[text:lower()] end
  if not n then
    error(("%s %q is not a number%s"):format(field.name, text,
      field.names and " or a name" or ""), 0)
  end
  if n < field.lo or n > field.hi then
    error(("%s %s out of range %d-%d"):format(field.name, text, field.lo, field.hi), 0)
  end
  return math.tointeger(n)
end

-- The set (value -> true) of one field's text; raises a message.
local function parse_field(field, text)
  local set = {}
  for item in (text .. ","):gmatch("([^,]*),") do
    if item == "" then error(("%s %q has an empty list item"):format(field.name, text), 0) end
    local range, step = item:match("^([^/]*)/(.*)$")
    range = range or item
    local lo, hi
    if range == "*" then
      lo, hi = field.lo, field.hi
    else
      local a, b = range:match("^([^-]+)-([^-]+)$")
      if a then
        lo, hi = value_of(field, a), value_of(field, b)
        if lo > hi then error(("%s range %s is backwards"):format(field.name, range), 0) end
      else
        lo = value_of(field, range)
        hi = step and field.hi or lo
      end
    end
    local by = 1
    if step then
      by = tonumber(step:match("^%d+$"))
      if not by then error(("%s step %q is not a number"):format(field.name, step), 0) end
      if by < 1 then error(("%s step %s must be at least 1"):format(field.name, step), 0) end
      by = math.tointeger(by)
    end
    for v = lo, hi, by do set[v] = true end
  end
  return set
end

local function parse_every(text)
  local total, rest = 0, text
  if rest == "" then error("@every needs a duration like 90s, 5m or 2h", 0) end
  while rest ~= "" do
    local n, unit, tail = rest:match("^(%d+)([smhd])(.*)$")
    if not n then
      error(("@every %q is not a duration like 90s, 5m, 2h or 1h30m"):format(text), 0)
    end
    total, rest = total + tonumber(n) * UNITS[unit], tail
  end
  if total < 1 or total > MAX_EVERY then
    error(("@every %s must be from 1s to %ds"):format(text, MAX_EVERY), 0)
  end
  return math.tointeger(total)
end

local function parse(spec)
  if type(spec) ~= "string" then error(("spec must be a string, got %s"):format(type(spec)), 0) end
  local text = spec:match("^%s*(.-)%s*$")
  if text == "" then error("spec is empty", 0) end
  local every = text:match("^@every%s+(.*)$")
  if every then return setmetatable({ spec = spec, every = parse_every(every) }, Schedule) end
  if text:sub(1, 1) == "@" then
    local macro = MACROS[text:lower()]
    if not macro then
      error(("unknown %s (known: @yearly @monthly @weekly @daily @hourly @every)")
        :format(text), 0)
    end
    text = macro
  end
  local words = {}
  for w in text:gmatch("%S+") do words[#words + 1] = w end
  if #words ~= 5 then
    error(("expected 5 fields (minute hour day-of-month month day-of-week), got %d")
      :format(#words), 0)
  end
  local sets = {}
  for i, field in ipairs(FIELDS) do sets[i] = parse_field(field, words[i]) end
  local dow = sets[5]
  if dow[7] then dow[0], dow[7] = true, nil end
  local star = {}
  for i = 1, 5 do star[i] = words[i]:sub(1, 1) == "*" end
  local s = setmetatable({ spec = spec, minute = sets[1], hour = sets[2], dom = sets[3],
    month = sets[4], dow = dow, dom_star = star[3], dow_star = star[5],
    wild = star[1] or star[2] }, Schedule)
  if s.dom_star or s.dow_star then
    -- a day must match day-of-month (and day-of-week): some month must have one
    local possible = false
    for m in pairs(s.month) do
      for d in pairs(s.dom) do
        if d <= (m == 2 and 29 or MONTH_DAYS[m]) then possible = true end
      end
    end
    if not possible then
      error(("no date matches: day-of-month %s never falls in month %s"):format(words[3],
        words[4]), 0)
    end
  end
  return s
end

-- The schedule of spec, or nil and why it is refused
-- ("minute 61 out of range 0-59").
function cron.parse(spec)
  local ok, s = pcall(parse, spec)
  if ok then return s end
  return nil, s
end

-- ---- the next matching local time -------------------------------------------------

function Schedule:_day_ok(d, days)
  local by_dom, by_dow = self.dom[d], self.dow[(days + 4) % 7] -- (1970-01-01: a Thursday)
  if self.dom_star or self.dow_star then return by_dom and by_dow end
  return by_dom or by_dow
end

-- Far enough for any possible date (29 February on a leap year is at
-- most 8 years away), with room: nil past it.
local MAX_STEPS = 40000

-- The first matching civil time (seconds, as if in UTC) at or after c.
function Schedule:_match(c)
  local m = -(-c // 60) * 60 -- (up to a whole minute)
  local days = m // 86400
  local hour, minute = m % 86400 // 3600, m % 3600 // 60
  local y, mo, d = civil_from_days(days)
  for _ = 1, MAX_STEPS do
    if not self.month[mo] then
      if mo == 12 then y, mo = y + 1, 1 else mo = mo + 1 end
      d, hour, minute = 1, 0, 0
      days = days_from_civil(y, mo, d)
    else
      if self:_day_ok(d, days) then
        for h = hour, 23 do
          if self.hour[h] then
            for mi = (h == hour and minute or 0), 59 do
              if self.minute[mi] then return days * 86400 + h * 3600 + mi * 60 end
            end
          end
        end
      end
      days, hour, minute = days + 1, 0, 0
      if d < month_days(y, mo) then
        d = d + 1
      else
        y, mo, d = civil_from_days(days)
      end
    end
  end
  return nil
end

-- ---- local time -------------------------------------------------------------------

-- The local clock's lead over UTC at instant t (seconds).
local function offset(t)
  local c = os.date("*t", t)
  return days_from_civil(c.year, c.month, c.day) * 86400 + c.hour * 3600 + c.min * 60 + c.sec - t
end

-- The first instant in (lo, hi] whose offset is not o (offset(lo) is o,
-- offset(hi) is not).
local function first_change(lo, hi, o)
  while hi - lo > 1 do
    local mid = (lo + hi) // 2
    if offset(mid) == o then lo = mid else hi = mid end
  end
  return hi
end

-- The latest local time the clock has shown up to instant t: after the
-- clock went back, the hour before the change.
local function high_water(t)
  local o = offset(t)
  local shown = t + o
  local before = offset(t - 86400)
  if before > o then
    local change = first_change(t - 86400, t, before)
    shown = math.max(shown, change - 1 + before)
  end
  return shown
end

-- Wild jobs: the first instant from s on whose local time matches.
function Schedule:_next_wild(s)
  for _ = 1, 100 do
    local o = offset(s)
    local c = self:_match(s + o)
    if not c then return nil end
    local t = c - o
    if offset(t) == o then return t end
    s = first_change(s, t, o) -- the clock changed before c: go on from there
  end
  return nil
end

-- Fixed jobs: the first instant from s on at which the local clock
-- reaches c (the change, when c is skipped).
local function reaches(s, c)
  for _ = 1, 100 do
    local o = offset(s)
    if s + o >= c then return s end
    local t = c - o
    if offset(t) == o then return t end
    s = first_change(s, t, o)
  end
  return nil
end

-- The first slot strictly after `after` (epoch seconds), in tz ("UTC",
-- the default, or "local"); nil if none comes (never, for a parsed spec).
function Schedule:next(after, tz)
  after = math.floor(after)
  local every = self.every
  if every then return (after // every + 1) * every end
  if tz ~= "local" then return self:_match(after + 1) end
  if self.wild then return self:_next_wild(after + 1) end
  local c = self:_match(high_water(after) + 1)
  return c and reaches(after + 1, c)
end

return cron

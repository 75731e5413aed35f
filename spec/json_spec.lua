-- JSON decoding at its edges, through pgcoord.json.decode and through json
-- and jsonb columns of a real query: surrogate escapes, integers beyond 64
-- bits, numbers beyond a double's range.
local pgcoord = require "pgcoord"
local helper = require "helper"

local REPLACEMENT = "\u{FFFD}"

-- True when s is valid UTF-8 (utf8.len refuses encoded surrogates too).
local function valid_utf8(s)
  return utf8.len(s) ~= nil
end

describe("JSON decoding", function()
  local db
  setup(function() db = pgcoord.connect(nil, { size = 1 }) end)
  teardown(function() db:close() end)

  it("a lone surrogate escape becomes U+FFFD, a pair one code point", function()
    local cases = {
      { [["\ud800"]], REPLACEMENT },                     -- a high half alone
      { [["a\udc00b"]], "a" .. REPLACEMENT .. "b" },     -- a low half alone
      { [["\ud800\u0041"]], REPLACEMENT .. "A" },        -- a high half, then no low one
      { [["\ud800\ud83d\ude00"]], REPLACEMENT .. "😀" }, -- a high half, then a pair
      { [["\udfff\ud800"]], REPLACEMENT .. REPLACEMENT },
      { [["\ud83d\ude00 \u00e9"]], "😀 é" },
    }
    for _, c in ipairs(cases) do
      local s = pgcoord.json.decode(c[1])
      assert.is_true(valid_utf8(s), c[1] .. " decoded to invalid UTF-8")
      assert.are.equal(c[2], s, c[1])
      -- the json type keeps the escape as written; the column decodes alike
      local col = db:one("SELECT ('{\"v\": ' || $1 || '}')::json AS j", c[1]).j.v
      assert.are.equal(c[2], col, c[1] .. " from a json column")
    end
    -- jsonb itself refuses a lone half, with the server's error
    local err = select(2, pcall(db.one, db, [[SELECT '"\ud800"'::jsonb AS j]]))
    assert.matches("surrogate", tostring(err))
  end)

  it("integers beyond 64 bits become floats; numbers beyond a double raise naming the byte",
    function()
    local v = pgcoord.json.decode("123456789012345678901234567890")
    assert.are.equal("float", math.type(v))
    assert.are.equal(1.2345678901234568e29, v)
    assert.are.equal(math.mininteger, pgcoord.json.decode("-9223372036854775808"))
    assert.are.equal("integer", math.type(pgcoord.json.decode("9223372036854775807")))
    assert.are.equal("float", math.type(pgcoord.json.decode("9223372036854775808")))
    -- a long fraction is a float, not a "bad number"
    assert.are.equal(0.1, pgcoord.json.decode("0.1" .. ("0"):rep(100)))
    assert.are.equal(0.0, pgcoord.json.decode("1e-400"))
    for _, text in ipairs({ "1e400", "-1e400", ("9"):rep(400) }) do
      local err = helper.error_of(pgcoord.json.decode, '{"a": [1, ' .. text .. ']}')
      assert.matches("invalid JSON at byte 11: number too large for a double", err, 1, true)
    end
    -- through a column: numeric holds 1e400, so jsonb does; the query raises
    local row = db:one([[SELECT '{"big": 123456789012345678901234567890}'::jsonb AS j]])
    assert.are.equal(1.2345678901234568e29, row.j.big)
    local err = select(2, pcall(db.one, db, [[SELECT '{"x": 1e400}'::jsonb AS j]]))
    assert.are.equal("22000", err.sqlstate)
    assert.matches("number too large for a double", tostring(err), 1, true)
    assert.are.equal(1, db:one("SELECT 1 AS x").x)   -- the connection went back clean
  end)

  it("refuses what is not JSON's number grammar", function()
    for text, why in pairs({ ["01"] = "a leading zero", ["1."] = "no digits after '.'",
      ["1e+"] = "no digits in the exponent", ["-"] = "bad number", [".5"] = "bad number",
      ["+1"] = "bad number" }) do
      assert.matches(why, helper.error_of(pgcoord.json.decode, text), 1, true)
    end
    assert.are.same({ 1, 2500.0, -0.5, 100.0 }, pgcoord.json.decode("[1, 2.5e3, -0.5, 1E2]"))
  end)

  it("a notification's payload decodes to its value, or stays the string it is", function()
    local decode_payload = pgcoord.json.decode_payload
    assert.are.same({ n = 1, tags = { "a" } }, decode_payload(' {"n": 1, "tags": ["a"]}'))
    assert.are.equal(42, decode_payload("42"))
    assert.are.equal("quoted", decode_payload('"quoted"'))
    assert.are.equal(pgcoord.json.null, decode_payload("null"))
    -- not JSON: refused at the first byte, or by the decoder further on
    for _, raw in ipairs({ "job 17 done", "+1", "{half", "[1, 2", "01", "tru", "\0{}" }) do
      assert.are.equal(raw, decode_payload(raw))
    end
    assert.are.equal("", decode_payload(""))
    assert.is_nil(decode_payload(nil))
    -- refused deep inside: nested containers, and a string long enough
    -- that its escapes went to a buffer of its own, then unterminated
    local deep = ('{"a": ['):rep(40) .. '1, 2, x'
    local long = '{"k": "' .. ('\\n'):rep(6000)
    for round = 1, 200 do
      assert.are.equal(deep, decode_payload(deep), "round " .. round)
      assert.are.equal(long, decode_payload(long), "round " .. round)
    end
    assert.are.equal(6000, #decode_payload(long .. '"}').k)
  end)

  it("the encoder refuses NaN and infinities", function()
    for _, x in ipairs({ math.huge, -math.huge, 0 / 0 }) do
      assert.matches("cannot encode .* as JSON", helper.error_of(pgcoord.json.encode, { x = x }))
    end
  end)
end)

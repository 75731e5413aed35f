-- NOTIFY: channel names and publishing a JSON payload, in the caller's
-- transaction if it has one.  Layer 2, beside db: the subscriber, the
-- fan-out and the primitives above all publish and name channels here.
local json = require "pgcoord.json"
local options = require "pgcoord.options"

local notify = {}

-- PostgreSQL's names are at most NAMEDATALEN - 1 bytes: LISTEN cuts a
-- longer channel name (then hears nothing its publishers send), pg_notify
-- refuses it.
local MAX_CHANNEL = 63
-- NOTIFY refuses a payload of 8000 bytes or more.
local PAYLOAD_LIMIT = 8000

-- Why channel cannot be LISTENed to and notified as it is, or nil.
function notify.channel_problem(channel)
  if type(channel) ~= "string" or channel == "" then
    return ("channel must be a non-empty string, got %s"):format(tostring(channel))
  end
  local shown = #channel > MAX_CHANNEL and ("%q…"):format(channel:sub(1, MAX_CHANNEL))
    or ("%q"):format(channel)
  -- a NUL cuts the name short on its way to the server; a name the server
  -- refuses fails the subscriber's one LISTEN batch for every channel
  if channel:find("\0", 1, true) then return ("channel %s contains a NUL byte"):format(shown) end
  if #channel > MAX_CHANNEL then
    return ("channel %s is %d bytes long; PostgreSQL takes names of at most %d bytes")
      :format(shown, #channel, MAX_CHANNEL)
  end
  if not utf8.len(channel) then return ("channel %s is not valid UTF-8"):format(shown) end
  return nil
end

-- Raises, naming `where`, at the caller's line, unless channel is usable.
function notify.check_channel(where, channel)
  local problem = notify.channel_problem(channel)
  if problem then options.raise("%s: %s", where, problem) end
  return channel
end

-- pg_notify(channel, value as JSON) in db_or_tx's transaction, if any.
function notify.publish(db_or_tx, channel, value, where)
  where = where or "pgcoord.publish"
  notify.check_channel(where, channel)
  local ok, payload = pcall(json.encode, value)
  if not ok then
    options.raise("%s: cannot encode the value for channel %q: %s", where, channel, payload)
  end
  if #payload >= PAYLOAD_LIMIT then
    options.raise("%s: the payload for channel %q is %d bytes; PostgreSQL's NOTIFY takes less"
      .. " than %d", where, channel, #payload, PAYLOAD_LIMIT)
  end
  db_or_tx:query("SELECT pg_notify($1, $2)", channel, payload)
end

return notify

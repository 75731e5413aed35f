-- Schema migrations: the numbered files of sql/, applied once each, in
-- order, in one transaction serialised by an advisory lock, and recorded
-- in pgcoord.schema_migrations.
local core = require "pgcoord.core"
local db = require "pgcoord.db"
local log = require "pgcoord.log"

local migrate = {}

-- pg_advisory_xact_lock key: "pgcoord" as a 56-bit integer.
local LOCK_KEY = 0x7067636f6f7264

local BOOTSTRAP = [[
CREATE SCHEMA IF NOT EXISTS pgcoord;
CREATE TABLE IF NOT EXISTS pgcoord.schema_migrations (
  version integer PRIMARY KEY,
  name text NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
);
]]

local function here()
  local src = debug.getinfo(1, "S").source
  return (src:sub(1, 1) == "@" and src:sub(2) or ""):match("^(.*)/[^/]*$") or "."
end

-- Where `make install` (and so luarocks) put sql/, or nil: the file it
-- writes beside this one.
local function installed_dir(dir)
  local chunk = loadfile(dir .. "/install_dirs.lua", "t", {})
  if not chunk then return nil end
  local ok, dirs = pcall(chunk)
  return ok and type(dirs) == "table" and dirs.sql or nil
end

-- sql/ beside lua/ in the build tree; when installed, the folder install
-- recorded, else share/pgcoord/sql (an installed tree moved as a whole).
function migrate.sql_dir()
  local env = os.getenv("PGCOORD_SQL_DIR")
  if env and env ~= "" then return env end
  local dir = here()
  for _, candidate in ipairs({ dir .. "/../../sql", installed_dir(dir) or false,
                               dir .. "/../../../pgcoord/sql" }) do
    if candidate and core.listdir(candidate) then return candidate end
  end
  error("pgcoord: cannot find the sql/ directory of migrations (set PGCOORD_SQL_DIR)")
end

-- { { version = 1, name = "001_schema.sql", sql = "..." }, ... } in order.
function migrate.files()
  local dir = migrate.sql_dir()
  local names = assert(core.listdir(dir))
  local files = {}
  for _, name in ipairs(names) do
    local version = name:match("^(%d+)_.*%.sql$")
    if version then
      local f = assert(io.open(dir .. "/" .. name, "rb"))
      local sql = f:read("a")
      f:close()
      files[#files + 1] = { version = tonumber(version), name = name, sql = sql }
    end
  end
  table.sort(files, function(a, b) return a.version < b.version end)
  for i = 2, #files do
    if files[i].version == files[i - 1].version then
      error(("pgcoord: two migrations share version %d: %s and %s")
        :format(files[i].version, files[i - 1].name, files[i].name))
    end
  end
  return files
end

-- All the DDL, for teams that apply schema with their own tool.
function migrate.sql()
  local parts = { "-- pgcoord schema\n", BOOTSTRAP }
  for _, f in ipairs(migrate.files()) do
    parts[#parts + 1] = ("\n-- %s\n%s"):format(f.name, f.sql)
    parts[#parts + 1] = ("INSERT INTO pgcoord.schema_migrations (version, name) VALUES (%d, '%s')"
      .. " ON CONFLICT DO NOTHING;\n"):format(f.version, f.name:gsub("'", "''"))
  end
  return table.concat(parts)
end

-- Applies what is missing; returns the names applied (empty when none).
function migrate.run(pool)
  local files = migrate.files()
  return pool:tx(function(tx)
    tx:query("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
    db.run_script(tx.conn, BOOTSTRAP)
    local done = {}
    for _, row in ipairs(tx:query("SELECT version FROM pgcoord.schema_migrations")) do
      done[row.version] = true
    end
    local applied = {}
    for _, f in ipairs(files) do
      if not done[f.version] then
        local ok, err = pcall(db.run_script, tx.conn, f.sql)
        if not ok then
          if type(err) == "table" then
            err.message = ("migration %s failed: %s"):format(f.name, err.message or "?")
          end
          error(err, 0)
        end
        tx:exec("INSERT INTO pgcoord.schema_migrations (version, name) VALUES ($1, $2)",
          f.version, f.name)
        applied[#applied + 1] = f.name
        log.info("migration applied", { migration = f.name })
      end
    end
    return applied
  end)
end

return migrate

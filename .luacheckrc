-- luacheck configuration (make lint)
std = "lua54"
max_line_length = 100

files["spec"] = { std = "+busted" }
files["examples"] = { read_globals = { "pgcoord" } }
files["scripts"] = { read_globals = { "pgcoord" } }
-- HTML templates: a table row is one line
files["lua/pgcoord/dashboard/views.lua"] = { max_line_length = false }
files["lua/pgcoord/dashboard/charts.lua"] = { max_line_length = false }
files["lua/pgcoord/dashboard/static.lua"] = { max_line_length = false }

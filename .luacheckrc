-- luacheck configuration (make lint)
std = "lua54"
max_line_length = 100

files["spec"] = { std = "+busted" }
files["examples"] = { read_globals = { "pgcoord" } }
files["scripts"] = { read_globals = { "pgcoord" } }

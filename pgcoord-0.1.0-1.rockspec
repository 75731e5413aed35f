-- Builds with the project's Makefile; needs the C libraries libpq,
-- libevent and libedit (Debian: libpq-dev libevent-dev libedit-dev).
-- The Makefile finds their headers with pkg-config (Debian keeps libpq-fe.h
-- in /usr/include/postgresql), so luarocks checks only that the libraries
-- exist.  Debian's lua-cjson package is not a rock: with it installed, build
-- with --deps-mode=none (scripts/check-luarocks does).
rockspec_format = "3.0"
package = "pgcoord"
version = "0.1.0-1"
source = {
  url = "git+https://example.invalid/pgcoord.git",
  tag = "v0.1.0",
}
description = {
  summary = "Coordinate services through PostgreSQL from Lua",
  detailed = [[
    An embedded Lua 5.4 host with one libevent loop and non-blocking libpq
    connections, and Lua modules for the coordination primitives: a
    LISTEN/NOTIFY subscriber with fan-out, a job lock, a durable queue, a
    job runner and a transactional outbox.
  ]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4, < 5.5",
  "lua-cjson",
}
external_dependencies = {
  PQ = { library = "pq" },
  EVENT = { library = "event" },
}
build = {
  type = "make",
  build_variables = { CC = "$(CC)" },
  install_variables = {
    PREFIX = "$(PREFIX)", BINDIR = "$(BINDIR)", LUADIR = "$(LUADIR)", LIBDIR = "$(LIBDIR)",
  },
}

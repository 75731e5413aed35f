# pgcoord — build, test and install.
#   make [all]                  lua/pgcoord/core.so and ./pgcoord-run
#   make test [SPEC=spec/x_spec.lua] [SANITIZE=address]
#   make demo | lint | bench [BENCH_QUICK=1] | deps | install [PREFIX=... DESTDIR=...] | clean

CC ?= cc
PKG_CONFIG ?= pkg-config
PREFIX ?= /usr/local
DESTDIR ?=
LUA_VERSION = 5.4
PKGS = lua5.4 libpq libevent libssl
SANITIZE ?=
export SANITIZE

SAN_FLAGS = $(if $(filter address,$(SANITIZE)),-fsanitize=address -fno-omit-frame-pointer)

# pkg-config is consulted lazily (recursive variables), so that `make test`
# on a fresh machine can install it first via the deps target.
CFLAGS += -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE \
          -Wall -Wextra -Werror -O2 -g -fPIC $(SAN_FLAGS)
LDFLAGS += $(SAN_FLAGS)
PKG_CFLAGS = $(shell $(PKG_CONFIG) --cflags $(PKGS))
CORE_LIBS = $(shell $(PKG_CONFIG) --libs libpq libevent libssl)
HOST_LIBS = $(shell $(PKG_CONFIG) --libs $(PKGS) libedit) -lm -ldl

BUILD = build
CORE_SRCS = src/loop.c src/pgconn.c src/pgvalue.c src/json.c src/http.c src/process.c src/core.c
HOST_SRCS = src/host.c src/prompt.c src/alloc.c
CORE_OBJS = $(CORE_SRCS:src/%.c=$(BUILD)/%.o)
HOST_OBJS = $(HOST_SRCS:src/%.c=$(BUILD)/%.o)
CORE_SO = lua/pgcoord/core.so
HOST_BIN = pgcoord-run

# Rebuild everything when the compiler or flags (e.g. SANITIZE) change.
FLAGS_STAMP = $(BUILD)/flags
STAMP_TEXT = $(CC) | $(CPPFLAGS) $(CFLAGS) | $(LDFLAGS) $(LDLIBS)

.PHONY: all deps test demo lint bench install clean FORCE

all: $(CORE_SO) $(HOST_BIN)

$(FLAGS_STAMP): FORCE
	@mkdir -p $(@D)
	@echo '$(STAMP_TEXT)' | cmp -s - $@ || echo '$(STAMP_TEXT)' > $@

$(BUILD)/%.o: src/%.c src/pgcoord.h $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(PKG_CFLAGS) $(EXTRA_CFLAGS) -MMD -MP -c -o $@ $<

$(HOST_OBJS): EXTRA_CFLAGS = $(shell $(PKG_CONFIG) --cflags libedit)

# The module is not linked with liblua: it uses the interpreter's symbols.
$(CORE_SO): $(CORE_OBJS) $(FLAGS_STAMP)
	$(CC) -shared $(LDFLAGS) -o $@ $(CORE_OBJS) $(CORE_LIBS) $(LDLIBS)

$(HOST_BIN): $(HOST_OBJS) $(CORE_OBJS) $(FLAGS_STAMP)
	$(CC) $(LDFLAGS) -o $@ $(HOST_OBJS) $(CORE_OBJS) $(HOST_LIBS) $(LDLIBS)

-include $(wildcard $(BUILD)/*.d)

# A TCP forwarder that can play dead, for the failure specs.
$(BUILD)/tcp-relay: spec/tools/tcp-relay.c $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $<

# A TLS-terminating forwarder writing 16 KB TLS records, for the TLS specs.
$(BUILD)/tls-relay: spec/tools/tls-relay.c $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(shell $(PKG_CONFIG) --libs libssl libcrypto)

# Holds many idle or slowly dribbling connections, for the HTTP specs.
$(BUILD)/tcp-hold: spec/tools/tcp-hold.c $(FLAGS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $<

deps:
	scripts/install-deps

# `all` is made after `deps` (not beside it) so that -j is safe on a fresh machine.
test: deps
	@$(MAKE) --no-print-directory all $(BUILD)/tcp-relay $(BUILD)/tcp-hold $(BUILD)/tls-relay
	scripts/pg-tmp run scripts/test $(SPEC)

demo: deps
	@$(MAKE) --no-print-directory all
	scripts/pg-tmp run sh -c './pgcoord-run --migrate && ./pgcoord-run examples/demo.lua'

LUA_DIRS = $(wildcard lua spec examples scripts/bench scripts/soak)
CPPCHECK_FLAGS = --error-exitcode=1 --enable=warning,performance,portability --inline-suppr --quiet
# every shell script (by its #! line; -x follows what they source)
SHELL_SCRIPTS = $(shell grep -lE '^\#!(/usr/bin/env bash|/bin/(ba)?sh)' -r --exclude-dir=.scratch \
  scripts .ci 2>/dev/null | sort)
lint:
	$(if $(LUA_DIRS),luacheck $(LUA_DIRS))
	$(if $(wildcard src),cppcheck $(CPPCHECK_FLAGS) -I src src)
	$(if $(SHELL_SCRIPTS),shellcheck -x -S warning $(SHELL_SCRIPTS))

bench: deps
	@$(MAKE) --no-print-directory all
	scripts/pg-tmp run scripts/bench/run-all

# Conventional places under PREFIX; luarocks sets LUADIR, LIBDIR and BINDIR.
BINDIR ?= $(PREFIX)/bin
LUADIR ?= $(PREFIX)/share/lua/$(LUA_VERSION)
LIBDIR ?= $(PREFIX)/lib/lua/$(LUA_VERSION)
DATADIR ?= $(PREFIX)/share/pgcoord
MANDIR ?= $(PREFIX)/share/man

# The primitives that are folders (jobs/, queue/, outbox/, ...).
LUA_FOLDERS = $(notdir $(patsubst %/,%,$(wildcard lua/pgcoord/*/)))

# install_dirs.lua tells pgcoord.migrate where sql/ went: luarocks keeps
# DATADIR in its rock folder, which no path relative to LUADIR reaches.
install: all
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR)/pgcoord $(DESTDIR)$(LUADIR)/pgcoord \
	    $(DESTDIR)$(DATADIR)/sql $(DESTDIR)$(DATADIR)/examples $(DESTDIR)$(MANDIR)/man1
	install -m 755 $(HOST_BIN) $(DESTDIR)$(BINDIR)/pgcoord-run
	install -m 755 $(CORE_SO) $(DESTDIR)$(LIBDIR)/pgcoord/core.so
	install -m 644 lua/pgcoord/*.lua $(DESTDIR)$(LUADIR)/pgcoord/
	for d in $(LUA_FOLDERS); do \
	    install -d $(DESTDIR)$(LUADIR)/pgcoord/$$d && \
	    install -m 644 lua/pgcoord/$$d/*.lua $(DESTDIR)$(LUADIR)/pgcoord/$$d/ || exit 1; \
	done
	install -m 644 sql/*.sql $(DESTDIR)$(DATADIR)/sql/
	printf 'return { sql = [==[%s]==] }\n' '$(DATADIR)/sql' > $(DESTDIR)$(LUADIR)/pgcoord/install_dirs.lua
	install -m 644 examples/* $(DESTDIR)$(DATADIR)/examples/
	install -m 644 doc/pgcoord-run.1 $(DESTDIR)$(MANDIR)/man1/

clean:
	rm -rf $(BUILD) $(HOST_BIN) $(CORE_SO)

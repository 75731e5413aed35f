/*
 * host.c -- pgcoord-run: a Lua 5.4 state with pgcoord built in.
 *
 * It finds its Lua modules beside the executable (build tree) or under
 * its install prefix, then hands argv to lua/pgcoord/cli.lua, which does
 * everything else.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lualib.h>

#include "pgcoord.h"

int luaopen_pgcoord_core(lua_State *L);
int luaopen_pgcoord_prompt(lua_State *L);

static int file_exists(const char *dir, const char *rel)
{
	char path[PATH_MAX];
	if (snprintf(path, sizeof path, "%s/%s", dir, rel) >= (int)sizeof path)
		return 0;
	return access(path, R_OK) == 0;
}

/* Prepends "<dir>/?.lua;<dir>/?/init.lua;" to package.path. */
static void prepend_path(lua_State *L, const char *field, const char *patterns)
{
	lua_getglobal(L, "package");
	lua_getfield(L, -1, field);
	lua_pushfstring(L, "%s;%s", patterns, lua_tostring(L, -1));
	lua_setfield(L, -3, field);
	lua_pop(L, 2);
}

static void set_module_paths(lua_State *L)
{
	char exe[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (n <= 0)
		return;	/* the stock package.path still applies */
	exe[n] = '\0';
	char *slash = strrchr(exe, '/');
	if (slash == NULL)
		return;
	*slash = '\0';
	const char *dir = exe;
	if (file_exists(dir, "lua/pgcoord/init.lua")) {
		lua_pushfstring(L, "%s/lua/?.lua;%s/lua/?/init.lua", dir, dir);
		prepend_path(L, "path", lua_tostring(L, -1));
		lua_pushfstring(L, "%s/lua/?.so", dir);
		prepend_path(L, "cpath", lua_tostring(L, -1));
		lua_pop(L, 2);
	} else if (file_exists(dir, "../share/lua/5.4/pgcoord/init.lua")) {
		lua_pushfstring(L, "%s/../share/lua/5.4/?.lua;%s/../share/lua/5.4/?/init.lua", dir, dir);
		prepend_path(L, "path", lua_tostring(L, -1));
		lua_pushfstring(L, "%s/../lib/lua/5.4/?.so", dir);
		prepend_path(L, "cpath", lua_tostring(L, -1));
		lua_pop(L, 2);
	}
}

static void preload(lua_State *L, const char *name, lua_CFunction open)
{
	luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
	lua_pushcfunction(L, open);
	lua_setfield(L, -2, name);
	lua_pop(L, 1);
}

/* require("pgcoord.cli").main(argv) -> exit status */
static int run_cli(lua_State *L)
{
	int argc = (int)lua_tointeger(L, 1);
	char **argv = lua_touserdata(L, 2);
	lua_getglobal(L, "require");
	lua_pushliteral(L, "pgcoord.cli");
	lua_call(L, 1, 1);
	lua_getfield(L, -1, "main");
	lua_createtable(L, argc, 0);
	for (int i = 0; i < argc; i++) {
		lua_pushstring(L, argv[i]);
		lua_rawseti(L, -2, i);
	}
	lua_call(L, 1, 1);
	return 1;
}

/* pgcoord.log.redact(msg): a top-level error may quote a conninfo. */
static int redact_message(lua_State *L)
{
	lua_getglobal(L, "require");
	lua_pushliteral(L, "pgcoord.log");
	lua_call(L, 1, 1);
	lua_getfield(L, -1, "redact");
	lua_pushvalue(L, 1);
	lua_call(L, 1, 1);
	return 1;
}

/* Prints the error on top of the stack, its passwords masked. */
static void report_error(lua_State *L)
{
	lua_pushcfunction(L, redact_message);
	lua_insert(L, -2);
	if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_type(L, -1) == LUA_TSTRING) {
		fprintf(stderr, "pgcoord-run: %s\n", lua_tostring(L, -1));
	} else {
		/* unmasked, the message might show a password: not printed */
		const char *why = lua_tostring(L, -1);
		fprintf(stderr, "pgcoord-run: an error escaped, and masking its passwords failed: %s\n",
			why ? why : "?");
	}
	lua_pop(L, 1);
}

int main(int argc, char **argv)
{
	lua_State *L = pgc_new_state();
	if (L == NULL) {
		fputs("pgcoord-run: cannot create a Lua state\n", stderr);
		return 1;
	}
	luaL_openlibs(L);
	set_module_paths(L);
	preload(L, "pgcoord.core", luaopen_pgcoord_core);
	preload(L, "pgcoord.prompt", luaopen_pgcoord_prompt);
	lua_pushcfunction(L, pgc_traceback);
	lua_pushcfunction(L, run_cli);
	lua_pushinteger(L, argc);
	lua_pushlightuserdata(L, argv);
	int status;
	if (lua_pcall(L, 2, 1, 1) != LUA_OK) {
		report_error(L);
		status = 1;
	} else {
		status = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 0;
	}
	pgc_close_state(L);
	return status;
}

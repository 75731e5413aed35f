/*
 * core.c -- the pgcoord.core module: the loop and the PostgreSQL handle.
 * Everything with a policy is in lua/pgcoord; this is the mechanism.
 */
#include <dirent.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "pgcoord.h"

int luaopen_pgcoord_core(lua_State *L);

static int l_getpid(lua_State *L)
{
	lua_pushinteger(L, (lua_Integer)getpid());
	return 1;
}

/* core.hostname() -> the kernel's host name (gethostname(2)) | nil, err */
static int l_hostname(lua_State *L)
{
	char name[256];
	if (gethostname(name, sizeof name) != 0) {
		luaL_pushfail(L);
		lua_pushfstring(L, "gethostname: %s", strerror(errno));
		return 2;
	}
	name[sizeof name - 1] = '\0';	/* (POSIX leaves a truncated one unterminated) */
	lua_pushstring(L, name);
	return 1;
}

/* core.isatty(fd) -> boolean */
static int l_isatty(lua_State *L)
{
	lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
	return 1;
}

/*
 * core.sysconf() -> { clock_ticks =, page_size = } | nil, err: the units
 * of /proc/self/stat's times (ticks) and sizes (pages), for process_*
 * metrics.
 */
static int l_sysconf(lua_State *L)
{
	errno = 0;
	long ticks = sysconf(_SC_CLK_TCK);
	long page = sysconf(_SC_PAGESIZE);
	if (ticks <= 0 || page <= 0) {
		luaL_pushfail(L);
		lua_pushfstring(L, "sysconf: %s",
				errno ? strerror(errno) : "no value");
		return 2;
	}
	lua_createtable(L, 0, 2);
	lua_pushinteger(L, (lua_Integer)ticks);
	lua_setfield(L, -2, "clock_ticks");
	lua_pushinteger(L, (lua_Integer)page);
	lua_setfield(L, -2, "page_size");
	return 1;
}

/* core.listdir(path) -> { names... } | nil, err  (for sql/ migrations) */
static int l_listdir(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	DIR *dir = opendir(path);
	if (dir == NULL) {
		luaL_pushfail(L);
		lua_pushfstring(L, "%s: %s", path, strerror(errno));
		return 2;
	}
	lua_newtable(L);
	struct dirent *e;
	int n = 0;
	while ((e = readdir(dir)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		lua_pushstring(L, e->d_name);
		lua_rawseti(L, -2, ++n);
	}
	closedir(dir);
	return 1;
}

int luaopen_pgcoord_core(lua_State *L)
{
	lua_newtable(L);
	pgc_open_loop(L);
	pgc_open_pgconn(L);
	pgc_open_pgvalue(L);
	pgc_open_json(L);
	pgc_open_http(L);
	pgc_open_process(L);
	lua_pushcfunction(L, l_getpid);
	lua_setfield(L, -2, "getpid");
	lua_pushcfunction(L, l_hostname);
	lua_setfield(L, -2, "hostname");
	lua_pushcfunction(L, l_isatty);
	lua_setfield(L, -2, "isatty");
	lua_pushcfunction(L, l_sysconf);
	lua_setfield(L, -2, "sysconf");
	lua_pushcfunction(L, l_listdir);
	lua_setfield(L, -2, "listdir");
	lua_pushliteral(L, PGCOORD_VERSION);
	lua_setfield(L, -2, "version");
	lua_pushinteger(L, PQlibVersion());
	lua_setfield(L, -2, "libpq_version");
	return 1;
}

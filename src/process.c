/*
 * process.c -- fork, wait and signal child processes, for the supervisor
 * of `pgcoord-run --workers N` (the policy is in lua/pgcoord/supervisor.lua).
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif
#include <unistd.h>

#include "pgcoord.h"

/*
 * core.fork() -> pid in the parent, 0 in the child.  The child's event
 * loop is reinitialised, since it shares nothing with the parent's.
 */
static int l_fork(lua_State *L)
{
	fflush(NULL);
	pid_t pid = fork();
	if (pid < 0)
		return luaL_error(L, "pgcoord: fork failed: %s", strerror(errno));
	if (pid == 0) {
#ifdef __linux__
		/* a supervisor killed outright takes its workers with it */
		prctl(PR_SET_PDEATHSIG, SIGTERM);
#endif
		if (event_reinit(pgc_base(L)) != 0)
			return luaL_error(L, "pgcoord: cannot reinitialise the event loop after fork");
	}
	lua_pushinteger(L, pid);
	return 1;
}

/*
 * core.wait_child() -> pid, "exited"|"killed", code | nil when no child
 * has ended (never blocks).
 */
static int l_wait_child(lua_State *L)
{
	int status;
	pid_t pid = waitpid(-1, &status, WNOHANG);
	if (pid <= 0)
		return 0;
	lua_pushinteger(L, pid);
	if (WIFSIGNALED(status)) {
		lua_pushliteral(L, "killed");
		lua_pushinteger(L, WTERMSIG(status));
	} else {
		lua_pushliteral(L, "exited");
		lua_pushinteger(L, WEXITSTATUS(status));
	}
	return 3;
}

/* core.kill(pid, signum) -> true | nil, err */
static int l_kill(lua_State *L)
{
	pid_t pid = (pid_t)luaL_checkinteger(L, 1);
	int sig = (int)luaL_checkinteger(L, 2);
	if (kill(pid, sig) != 0) {
		luaL_pushfail(L);
		lua_pushstring(L, strerror(errno));
		return 2;
	}
	lua_pushboolean(L, 1);
	return 1;
}

/* core.exit(code): leaves at once, without running Lua's or C's cleanups. */
static int l_exit(lua_State *L)
{
	_exit((int)luaL_optinteger(L, 1, 0));
	return 0;
}

static const luaL_Reg process_funcs[] = {
	{"fork", l_fork},
	{"wait_child", l_wait_child},
	{"kill", l_kill},
	{"exit", l_exit},
	{NULL, NULL}
};

void pgc_open_process(lua_State *L)
{
	luaL_setfuncs(L, process_funcs, 0);
}

/*
 * loop.c -- the event loop, timers, signals, the deferred-run hook and
 * tasks parked in C.
 *
 * The loop is driven one iteration at a time from Lua (core.step), so the
 * scheduler in lua/pgcoord/task.lua decides when to keep going.  Handles
 * anchor themselves in the registry while they are armed, so a timer nobody
 * holds still fires.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <event2/dns.h>

#include "pgcoord.h"

struct pgc_loop {
	struct event_base *base;
	lua_State *main;
	struct event *ev_defer;	/* activated by core.defer(), runs defer_ref */
	struct event *ev_step;	/* bounds one core.step(timeout) */
	int defer_ref;
	int report_ref;		/* Lua function(message) for callback errors */
	int tasks_ref;		/* task.lua's coroutine -> task table (core.set_tasks) */
	int wake_ref;		/* function(co, ...): queues co's resume */
	int ended_ref;		/* function(co, ok, err): a task resumed here ended */
	int defer_armed;
	int stepping;
	int pollfd;		/* libevent's epoll descriptor, once looked up */
	struct evdns_base *dns;	/* made on the first host name to resolve */
};

static const char LOOP_KEY = 'L';

/*
 * The loop, from the registry: a hash lookup.  A handle that runs on every
 * query (a connection) keeps the pointer instead; the userdata lives in
 * the registry until the state closes.
 */
pgc_loop *pgc_loop_of(lua_State *L)
{
	lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
	pgc_loop *loop = lua_touserdata(L, -1);
	lua_pop(L, 1);
	if (loop == NULL || loop->base == NULL)
		luaL_error(L, "pgcoord: the event loop is not open");
	return loop;
}

/* The loop in the functions of loop_funcs, which hold it as upvalue 1. */
static pgc_loop *loop_up(lua_State *L)
{
	pgc_loop *loop = lua_touserdata(L, lua_upvalueindex(1));
	if (loop->base == NULL)
		luaL_error(L, "pgcoord: the event loop is not open");
	return loop;
}

struct event_base *pgc_base(lua_State *L)
{
	return pgc_loop_of(L)->base;
}

/*
 * The resolver, on the loop: /etc/resolv.conf and /etc/hosts, or the
 * resolv.conf named by PGCOORD_RESOLV_CONF (a test points it at a server
 * that never answers; evdns reads "nameserver IP:PORT").  It keeps no
 * event registered while no lookup runs, so an idle loop stays idle.
 */
struct evdns_base *pgc_dns(lua_State *L)
{
	pgc_loop *loop = pgc_loop_of(L);
	if (loop->dns == NULL) {
		const char *conf = getenv("PGCOORD_RESOLV_CONF");
		if (conf == NULL || *conf == '\0')
			conf = "/etc/resolv.conf";
		loop->dns = evdns_base_new(loop->base, EVDNS_BASE_DISABLE_WHEN_INACTIVE);
		if (loop->dns == NULL)
			luaL_error(L, "pgcoord: cannot create the DNS resolver");
		/* 1: no such file, and evdns falls back to its defaults */
		if (evdns_base_resolv_conf_parse(loop->dns, DNS_OPTIONS_ALL, conf) > 1)
			luaL_error(L, "pgcoord: cannot read %s", conf);
	}
	return loop->dns;
}

lua_State *pgc_main_state(lua_State *L)
{
	return pgc_loop_of(L)->main;
}

int pgc_ref(lua_State *L, int idx)
{
	lua_pushvalue(L, idx);
	return luaL_ref(L, LUA_REGISTRYINDEX);
}

void pgc_unref(lua_State *L, int *ref)
{
	if (*ref != LUA_NOREF) {
		luaL_unref(L, LUA_REGISTRYINDEX, *ref);
		*ref = LUA_NOREF;
	}
}

/* Errors escaping a callback end here: Lua's reporter if set, else stderr. */
void pgc_report(lua_State *L, const char *what)
{
	pgc_loop *loop = lua_touserdata(L, (lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY), -1));
	lua_pop(L, 1);
	if (loop && loop->report_ref != LUA_NOREF) {
		lua_rawgeti(L, LUA_REGISTRYINDEX, loop->report_ref);
		lua_pushstring(L, what);
		if (lua_pcall(L, 1, 0, 0) == LUA_OK)
			return;
		what = lua_tostring(L, -1);
		lua_pop(L, 1);
	}
	fprintf(stderr, "level=error msg=\"callback failed\" error=\"%s\"\n",
		what ? what : "?");
}

/* A message handler for lua_pcall: the error, readable, with a traceback. */
int pgc_traceback(lua_State *L)
{
	const char *msg = lua_tostring(L, 1);
	if (msg == NULL && luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
		msg = lua_tostring(L, -1);
	if (msg == NULL)
		msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
	luaL_traceback(L, L, msg, 1);
	return 1;
}

/*
 * Runs fn(ud) in protected mode on the main state: event callbacks are
 * entered from libevent, where a Lua error must not unwind.
 */
int pgc_invoke(lua_State *L, lua_CFunction fn, void *ud)
{
	int top = lua_gettop(L);
	lua_pushcfunction(L, pgc_traceback);
	lua_pushcfunction(L, fn);
	lua_pushlightuserdata(L, ud);
	int rc = lua_pcall(L, 1, 0, top + 1);
	if (rc != LUA_OK)
		pgc_report(L, lua_tostring(L, -1));
	lua_settop(L, top);
	return rc;
}

/* ---- timers -------------------------------------------------------- */

#define TIMER_META "pgcoord.timer"

typedef struct pgc_timer {
	struct event *ev;
	lua_State *L;
	double due;		/* CLOCK_MONOTONIC seconds, as core.now() */
	int cb_ref;
	int self_ref;
} pgc_timer;

double pgc_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* seconds as a timeval for libevent: negative and NaN are 0, capped. */
struct timeval pgc_timeval(double seconds)
{
	struct timeval tv;
	if (!(seconds > 0))
		seconds = 0;
	if (seconds > 1e9)
		seconds = 1e9;
	tv.tv_sec = (time_t)seconds;
	tv.tv_usec = (suseconds_t)((seconds - (double)tv.tv_sec) * 1e6);
	return tv;
}

static int timer_fire(lua_State *L)
{
	pgc_timer *t = lua_touserdata(L, 1);
	lua_rawgeti(L, LUA_REGISTRYINDEX, t->self_ref);	/* anchored while cb runs */
	lua_rawgeti(L, LUA_REGISTRYINDEX, t->cb_ref);
	pgc_unref(L, &t->self_ref);
	pgc_unref(L, &t->cb_ref);
	lua_call(L, 0, 0);
	return 0;
}

/*
 * libevent keeps time by the coarse monotonic clock (precise timers would
 * cost a timerfd syscall every loop step), which lags core.now() by up to
 * a tick: a timer can come due that much early.  Such a timer waits out
 * the rest, so none fires before core.now() reaches its deadline (a rate
 * limit's timer relies on it: woken early, its bucket has no token yet).
 */
static void on_timer(evutil_socket_t fd, short what, void *arg)
{
	pgc_timer *t = arg;
	(void)fd, (void)what;
	double left = t->due - pgc_now();
	if (left > 0) {
		struct timeval tv = pgc_timeval(left);
		if (tv.tv_sec == 0 && tv.tv_usec == 0)
			tv.tv_usec = 1;
		if (evtimer_add(t->ev, &tv) == 0)
			return;
		fputs("level=error msg=\"cannot re-arm an early timer\"\n", stderr);
	}
	pgc_invoke(t->L, timer_fire, t);
}

static int l_timer(lua_State *L)
{
	double seconds = luaL_checknumber(L, 1);
	luaL_checktype(L, 2, LUA_TFUNCTION);
	pgc_timer *t = lua_newuserdatauv(L, sizeof *t, 0);
	t->ev = NULL;
	t->cb_ref = t->self_ref = LUA_NOREF;
	t->L = pgc_main_state(L);
	luaL_setmetatable(L, TIMER_META);
	t->ev = evtimer_new(pgc_base(L), on_timer, t);
	if (t->ev == NULL)
		return luaL_error(L, "pgcoord: cannot create a timer");
	struct timeval tv = pgc_timeval(seconds);
	t->due = pgc_now() + (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
	if (evtimer_add(t->ev, &tv) != 0)
		return luaL_error(L, "pgcoord: cannot arm a timer");
	t->cb_ref = pgc_ref(L, 2);
	t->self_ref = pgc_ref(L, -1);
	return 1;
}

static int timer_cancel(lua_State *L)
{
	pgc_timer *t = luaL_checkudata(L, 1, TIMER_META);
	if (t->ev)
		evtimer_del(t->ev);
	pgc_unref(L, &t->cb_ref);
	pgc_unref(L, &t->self_ref);
	return 0;
}

static int timer_gc(lua_State *L)
{
	pgc_timer *t = luaL_checkudata(L, 1, TIMER_META);
	if (t->ev) {
		event_free(t->ev);
		t->ev = NULL;
	}
	return 0;
}

/* ---- signals ------------------------------------------------------- */

#define SIGNAL_META "pgcoord.signal"

typedef struct pgc_signal {
	struct event *ev;
	lua_State *L;
	int cb_ref;
	int signum;
} pgc_signal;

static int signal_fire(lua_State *L)
{
	pgc_signal *s = lua_touserdata(L, 1);
	lua_rawgeti(L, LUA_REGISTRYINDEX, s->cb_ref);
	lua_pushinteger(L, s->signum);
	lua_call(L, 1, 0);
	return 0;
}

static void on_signal(evutil_socket_t fd, short what, void *arg)
{
	pgc_signal *s = arg;
	(void)fd, (void)what;
	pgc_invoke(s->L, signal_fire, s);
}

static int l_signal(lua_State *L)
{
	int signum = (int)luaL_checkinteger(L, 1);
	luaL_checktype(L, 2, LUA_TFUNCTION);
	luaL_argcheck(L, signum > 0 && signum < NSIG, 1, "not a signal number");
	pgc_signal *s = lua_newuserdatauv(L, sizeof *s, 1);
	s->ev = NULL;
	s->L = pgc_main_state(L);
	s->signum = signum;
	s->cb_ref = LUA_NOREF;
	luaL_setmetatable(L, SIGNAL_META);
	s->ev = evsignal_new(pgc_base(L), signum, on_signal, s);
	if (s->ev == NULL || evsignal_add(s->ev, NULL) != 0)
		return luaL_error(L, "pgcoord: cannot watch signal %d", signum);
	s->cb_ref = pgc_ref(L, 2);
	return 1;
}

static int signal_close(lua_State *L)
{
	pgc_signal *s = luaL_checkudata(L, 1, SIGNAL_META);
	if (s->ev) {
		event_free(s->ev);
		s->ev = NULL;
	}
	pgc_unref(L, &s->cb_ref);
	return 0;
}

/* ---- tasks parked in C ------------------------------------------------ */

/*
 * A wait that C can end by itself (a query's outcome) parks the running
 * task in C: the C function yields the task's coroutine, and the outcome
 * resumes it with lua_resume, so between the event and the task's next
 * line no Lua function runs (task.await's resume closure and its
 * bookkeeping cost a query more than the rest of its Lua path).
 * task.lua keeps the policy: which coroutines are tasks, when a task may
 * not park (a cancel pending), the queue a resume waits in when it comes
 * from inside another task, and what ends a task.
 */

/* core.set_tasks(tasks, wake, ended): task.lua's coroutine -> task table,
 * wake(co, ...) to queue co's resume, ended(co, ok, err) after a resume
 * here ended the task's function (or failed). */
static int l_set_tasks(lua_State *L)
{
	pgc_loop *loop = loop_up(L);
	luaL_checktype(L, 1, LUA_TTABLE);
	luaL_checktype(L, 2, LUA_TFUNCTION);
	luaL_checktype(L, 3, LUA_TFUNCTION);
	pgc_unref(L, &loop->tasks_ref);
	pgc_unref(L, &loop->wake_ref);
	pgc_unref(L, &loop->ended_ref);
	loop->tasks_ref = pgc_ref(L, 1);
	loop->wake_ref = pgc_ref(L, 2);
	loop->ended_ref = pgc_ref(L, 3);
	return 0;
}

/*
 * Whether the running coroutine may park in C now: it is a task's, it can
 * yield, and no cancel waits for its next wait to raise.  0 in the main
 * thread (a stock lua5.4 program drives the loop there instead) and in a
 * plain coroutine: task.await handles those, and says what is wrong.
 */
int pgc_can_park(pgc_loop *loop, lua_State *L)
{
	if (loop->base == NULL || loop->tasks_ref == LUA_NOREF || !lua_isyieldable(L))
		return 0;
	int top = lua_gettop(L);
	lua_rawgeti(L, LUA_REGISTRYINDEX, loop->tasks_ref);
	lua_pushthread(L);
	int parks = lua_rawget(L, -2) == LUA_TTABLE;
	if (parks) {
		lua_getfield(L, -1, "cancel_requested");
		parks = !lua_toboolean(L, -1);
	}
	lua_settop(L, top);
	return parks;
}

/*
 * Resumes co, parked in C, with the nargs values on top of L's stack;
 * pops them and co's thread below them.  From the main thread (an event)
 * it runs now; from inside a task it waits in task.lua's queue, as every
 * resume there does, so that a task never runs inside another.  A co
 * that is no longer suspended (a cancel closed it) is left alone.
 */
void pgc_resume(pgc_loop *loop, lua_State *L, lua_State *co, int nargs)
{
	int thread = lua_gettop(L) - nargs;
	if (lua_status(co) != LUA_YIELD) {
		lua_settop(L, thread - 1);
		return;
	}
	if (!lua_pushthread(L)) {
		lua_pop(L, 1);
		lua_rawgeti(L, LUA_REGISTRYINDEX, loop->wake_ref);
		lua_insert(L, thread);
		lua_call(L, nargs + 1, 0);
		return;
	}
	lua_pop(L, 1);
	lua_xmove(L, co, nargs);
	int nres;
	int rc = lua_resume(co, L, nargs, &nres);
	if (rc == LUA_YIELD) {
		lua_pop(co, nres);
		lua_settop(L, thread - 1);
		return;
	}
	/* the task's function returned (its outcome is in the task) or, on a
	 * bug in task.lua, the coroutine failed: the thread is still at thread */
	lua_rawgeti(L, LUA_REGISTRYINDEX, loop->ended_ref);
	lua_insert(L, thread);
	lua_pushboolean(L, rc == LUA_OK);
	if (rc == LUA_OK)
		lua_pushnil(L);
	else
		lua_xmove(co, L, 1);
	lua_call(L, 3, 0);
}

/* ---- the loop ------------------------------------------------------ */

static int defer_fire(lua_State *L)
{
	pgc_loop *loop = lua_touserdata(L, 1);
	loop->defer_armed = 0;
	if (loop->defer_ref == LUA_NOREF)
		return 0;
	lua_rawgeti(L, LUA_REGISTRYINDEX, loop->defer_ref);
	lua_call(L, 0, 0);
	return 0;
}

static void on_defer(evutil_socket_t fd, short what, void *arg)
{
	pgc_loop *loop = arg;
	(void)fd, (void)what;
	pgc_invoke(loop->main, defer_fire, loop);
	/*
	 * Tasks that keep one another ready re-arm the deferred run at once;
	 * libevent would then run it again without polling, and a query result
	 * waiting on a socket (or core.step's caller) would wait until the
	 * burst ends.  End this step instead: the next one polls first, with
	 * no timeout while a callback is active.
	 */
	if (loop->defer_armed && event_base_loopbreak(loop->base) != 0)
		fputs("level=error msg=\"event_base_loopbreak failed\"\n", stderr);
}

static void on_step_timeout(evutil_socket_t fd, short what, void *arg)
{
	(void)fd, (void)what, (void)arg;
}

/* core.set_defer(fn): fn runs once after each core.defer() burst. */
static int l_set_defer(lua_State *L)
{
	pgc_loop *loop = loop_up(L);
	luaL_checktype(L, 1, LUA_TFUNCTION);
	pgc_unref(L, &loop->defer_ref);
	loop->defer_ref = pgc_ref(L, 1);
	return 0;
}

static int l_defer(lua_State *L)
{
	pgc_loop *loop = loop_up(L);
	if (!loop->defer_armed) {
		loop->defer_armed = 1;
		event_active(loop->ev_defer, EV_TIMEOUT, 1);
	}
	return 0;
}

static int l_set_reporter(lua_State *L)
{
	pgc_loop *loop = loop_up(L);
	pgc_unref(L, &loop->report_ref);
	if (!lua_isnoneornil(L, 1)) {
		luaL_checktype(L, 1, LUA_TFUNCTION);
		loop->report_ref = pgc_ref(L, 1);
	}
	return 0;
}

/*
 * core.step([timeout]) runs one loop iteration: it waits for at least one
 * event (at most timeout seconds; 0 polls) and runs the callbacks that are
 * ready.  Returns false when nothing at all is registered.
 */
static int l_step(lua_State *L)
{
	pgc_loop *loop = loop_up(L);
	if (!lua_pushthread(L))
		return luaL_error(L, "pgcoord: the loop can only be stepped from the main thread"
				  " (inside a task, wait instead)");
	lua_pop(L, 1);
	if (loop->stepping)
		return luaL_error(L, "pgcoord: cannot wait here: the loop is already running"
				  " (wait inside a task, not in a callback)");
	int flags = EVLOOP_ONCE;
	int timed = 0;
	if (!lua_isnoneornil(L, 1)) {
		double timeout = luaL_checknumber(L, 1);
		if (timeout <= 0) {
			flags |= EVLOOP_NONBLOCK;
		} else {
			struct timeval tv = pgc_timeval(timeout);
			if (evtimer_add(loop->ev_step, &tv) != 0)
				return luaL_error(L, "pgcoord: cannot arm the step timer");
			timed = 1;
		}
	}
	loop->stepping = 1;
	int rc = event_base_loop(loop->base, flags);
	loop->stepping = 0;
	if (timed)
		evtimer_del(loop->ev_step);
	if (rc < 0)
		return luaL_error(L, "pgcoord: event loop failed: %s", strerror(errno));
	lua_pushboolean(L, rc == 0);
	return 1;
}

static int l_now(lua_State *L)
{
	lua_pushnumber(L, pgc_now());
	return 1;
}

static int l_time(lua_State *L)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
	return 1;
}

/* ---- embedding in another loop ------------------------------------ */

/*
 * libevent has no public call for its backend descriptor.  Its epoll
 * backend applies each event_add at once (no changelist: the base is made
 * with EVENT_BASE_FLAG_IGNORE_ENV), so the epoll descriptor is the one
 * that lists a probe pipe right after the probe is added, and not after
 * it is removed: /proc/self/fdinfo shows what each epoll watches.
 */
static int epoll_watches(int epfd, int fd)
{
	char path[64], line[256];
	snprintf(path, sizeof path, "/proc/self/fdinfo/%d", epfd);
	FILE *f = fopen(path, "r");
	if (f == NULL)
		return 0;
	int found = 0;
	while (!found && fgets(line, sizeof line, f)) {
		int tfd;
		found = sscanf(line, "tfd: %d ", &tfd) == 1 && tfd == fd;
	}
	fclose(f);
	return found;
}

/* Every epoll descriptor of the process that watches fd, in out[] (max n). */
static int epolls_watching(int fd, int *out, int n)
{
	DIR *dir = opendir("/proc/self/fd");
	if (dir == NULL)
		return -1;
	int found = 0;
	struct dirent *e;
	while ((e = readdir(dir)) != NULL) {
		char *end, path[64], target[64];
		long epfd = strtol(e->d_name, &end, 10);
		if (*end != '\0' || end == e->d_name)
			continue;
		snprintf(path, sizeof path, "/proc/self/fd/%ld", epfd);
		ssize_t len = readlink(path, target, sizeof target - 1);
		if (len <= 0)
			continue;
		target[len] = '\0';
		if (strcmp(target, "anon_inode:[eventpoll]") == 0 && epoll_watches((int)epfd, fd)
		    && found < n)
			out[found++] = (int)epfd;
	}
	closedir(dir);
	return found;
}

static void on_probe(evutil_socket_t fd, short what, void *arg)
{
	(void)fd, (void)what, (void)arg;
}

static int find_backend_fd(pgc_loop *loop)
{
	if (strcmp(event_base_get_method(loop->base), "epoll") != 0)
		return -1;
	int p[2];
	if (pipe(p) != 0)
		return -1;
	int epfd = -1, with[4], n = 0;
	struct event *probe = event_new(loop->base, p[0], EV_READ, on_probe, NULL);
	if (probe != NULL && event_add(probe, NULL) == 0) {
		n = epolls_watching(p[0], with, 4);
		if (event_del(probe) != 0)
			n = 0;
	}
	/* the one that watched the probe and forgot it with the event */
	for (int i = 0; i < n; i++) {
		if (!epoll_watches(with[i], p[0])) {
			if (epfd >= 0) {
				epfd = -1;
				break;
			}
			epfd = with[i];
		}
	}
	if (probe)
		event_free(probe);
	close(p[0]);
	close(p[1]);
	return epfd;
}

/*
 * core.pollfd() -> fd: readable whenever a descriptor the loop watches is
 * ready (libevent's epoll descriptor; a host loop polls it for reading).
 */
static int l_pollfd(lua_State *L)
{
	pgc_loop *loop = loop_up(L);
	if (loop->pollfd < 0)
		loop->pollfd = find_backend_fd(loop);
	if (loop->pollfd < 0)
		return luaL_error(L, "pgcoord.pollfd: cannot find the event loop's descriptor"
				  " (libevent backend %s; only epoll has one)",
				  event_base_get_method(loop->base));
	lua_pushinteger(L, loop->pollfd);
	return 1;
}

/* The earliest deadline of the events with a timeout, libevent's own too. */
static int earliest_deadline(const struct event_base *base, const struct event *ev, void *arg)
{
	struct timeval *best = arg, tv;
	(void)base;
	if ((event_pending(ev, EV_TIMEOUT, &tv) & EV_TIMEOUT) &&
	    (best->tv_sec < 0 || tv.tv_sec < best->tv_sec ||
	     (tv.tv_sec == best->tv_sec && tv.tv_usec < best->tv_usec)))
		*best = tv;
	return 0;
}

/*
 * core.next_timeout() -> seconds | nil: how long a host loop may wait on
 * core.pollfd() before it must call core.step(0); 0 when callbacks are
 * ready now, nil when nothing is timed.  (libevent reports deadlines in
 * wall-clock time, so the distance is taken from gettimeofday.)
 */
static int l_next_timeout(lua_State *L)
{
	pgc_loop *loop = loop_up(L);
	if (loop->defer_armed || event_base_get_num_events(loop->base, EVENT_BASE_COUNT_ACTIVE) > 0) {
		lua_pushnumber(L, 0);
		return 1;
	}
	struct timeval best = {-1, 0}, now;
	if (event_base_foreach_event(loop->base, earliest_deadline, &best) != 0)
		return luaL_error(L, "pgcoord.next_timeout: cannot walk the event loop's events");
	if (best.tv_sec < 0) {
		lua_pushnil(L);
		return 1;
	}
	evutil_gettimeofday(&now, NULL);
	double left = (double)(best.tv_sec - now.tv_sec) + (double)(best.tv_usec - now.tv_usec) / 1e6;
	lua_pushnumber(L, left > 0 ? left : 0);
	return 1;
}

static int loop_gc(lua_State *L)
{
	pgc_loop *loop = lua_touserdata(L, 1);
	if (loop->dns)	/* lookups still running call back nobody */
		evdns_base_free(loop->dns, 0);
	loop->dns = NULL;
	if (loop->ev_defer)
		event_free(loop->ev_defer);
	if (loop->ev_step)
		event_free(loop->ev_step);
	if (loop->base)
		event_base_free(loop->base);
	loop->ev_defer = loop->ev_step = NULL;
	loop->base = NULL;
	return 0;
}

/* Pushes the loop, made on the first call. */
static void open_loop_state(lua_State *L)
{
	if (lua_rawgetp(L, LUA_REGISTRYINDEX, &LOOP_KEY) != LUA_TNIL)
		return;
	lua_pop(L, 1);
	pgc_loop *loop = lua_newuserdatauv(L, sizeof *loop, 0);
	memset(loop, 0, sizeof *loop);
	loop->defer_ref = loop->report_ref = LUA_NOREF;
	loop->tasks_ref = loop->wake_ref = loop->ended_ref = LUA_NOREF;
	lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
	loop->main = lua_tothread(L, -1);
	lua_pop(L, 1);
	lua_newtable(L);
	lua_pushcfunction(L, loop_gc);
	lua_setfield(L, -2, "__gc");
	lua_setmetatable(L, -2);
	loop->pollfd = -1;
	/*
	 * No precise timers: libevent would arm a timerfd (a syscall) at every
	 * loop step, a fifth of a notification's CPU; on_timer keeps timers
	 * from firing early by its coarse clock instead.  Ignoring EVENT_*
	 * variables keeps the epoll backend without a changelist, which
	 * core.pollfd() relies on.
	 */
	struct event_config *cfg = event_config_new();
	if (cfg == NULL || event_config_set_flag(cfg, EVENT_BASE_FLAG_IGNORE_ENV) != 0)
		luaL_error(L, "pgcoord: cannot configure the event loop");
	loop->base = event_base_new_with_config(cfg);
	event_config_free(cfg);
	if (loop->base == NULL)
		luaL_error(L, "pgcoord: cannot create the event loop");
	loop->ev_defer = event_new(loop->base, -1, 0, on_defer, loop);
	loop->ev_step = evtimer_new(loop->base, on_step_timeout, NULL);
	if (loop->ev_defer == NULL || loop->ev_step == NULL)
		luaL_error(L, "pgcoord: cannot create the loop's events");
	/* A dead peer must surface as an error on its socket, not kill us. */
	signal(SIGPIPE, SIG_IGN);
	lua_pushvalue(L, -1);
	lua_rawsetp(L, LUA_REGISTRYINDEX, &LOOP_KEY);
}

static const luaL_Reg timer_methods[] = {
	{"cancel", timer_cancel},
	{NULL, NULL}
};

static const luaL_Reg signal_methods[] = {
	{"close", signal_close},
	{NULL, NULL}
};

static const luaL_Reg loop_funcs[] = {
	{"timer", l_timer},
	{"signal", l_signal},
	{"set_defer", l_set_defer},
	{"defer", l_defer},
	{"set_reporter", l_set_reporter},
	{"set_tasks", l_set_tasks},
	{"step", l_step},
	{"pollfd", l_pollfd},
	{"next_timeout", l_next_timeout},
	{"now", l_now},
	{"time", l_time},
	{NULL, NULL}
};

/* Registers metatable `name` with `methods` as __index and `gc` as __gc. */
void pgc_new_meta(lua_State *L, const char *name, const luaL_Reg *methods,
		  lua_CFunction gc)
{
	luaL_newmetatable(L, name);
	lua_newtable(L);
	luaL_setfuncs(L, methods, 0);
	lua_setfield(L, -2, "__index");
	lua_pushcfunction(L, gc);
	lua_setfield(L, -2, "__gc");
	lua_pop(L, 1);
}

/* Adds the loop functions to the table on top of the stack. */
void pgc_open_loop(lua_State *L)
{
	pgc_new_meta(L, TIMER_META, timer_methods, timer_gc);
	pgc_new_meta(L, SIGNAL_META, signal_methods, signal_close);
	open_loop_state(L);
	luaL_setfuncs(L, loop_funcs, 1);	/* (the loop as their upvalue) */
}

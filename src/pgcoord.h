/*
 * pgcoord.h -- what the C files of the core share.
 *
 * One process runs one event_base and one Lua state.  Every handle (timer,
 * signal, connection) keeps its Lua callbacks as registry references and
 * runs them through pgc_invoke, so a Lua error inside an event callback is
 * reported instead of unwinding through libevent.
 */
#ifndef PGCOORD_H
#define PGCOORD_H

#include <lua.h>
#include <lauxlib.h>
#include <libpq-fe.h>
#include <event2/event.h>

#define PGCOORD_VERSION "0.1.0"

/* alloc.c (pgcoord-run only) */
lua_State *pgc_new_state(void);
void pgc_close_state(lua_State *L);

/* loop.c */
typedef struct pgc_loop pgc_loop;
pgc_loop *pgc_loop_of(lua_State *L);
struct event_base *pgc_base(lua_State *L);
struct evdns_base *pgc_dns(lua_State *L);
lua_State *pgc_main_state(lua_State *L);
int pgc_invoke(lua_State *L, lua_CFunction fn, void *ud);
void pgc_report(lua_State *L, const char *what);
int pgc_traceback(lua_State *L);
int pgc_ref(lua_State *L, int idx);
void pgc_unref(lua_State *L, int *ref);
void pgc_open_loop(lua_State *L);
void pgc_new_meta(lua_State *L, const char *name, const luaL_Reg *methods,
		  lua_CFunction gc);
struct timeval pgc_timeval(double seconds);
double pgc_now(void);	/* CLOCK_MONOTONIC seconds, as core.now() */
int pgc_can_park(pgc_loop *loop, lua_State *L);
void pgc_resume(pgc_loop *loop, lua_State *L, lua_State *co, int nargs);

/* pgconn.c */
void pgc_open_pgconn(lua_State *L);

/* pgvalue.c */
#define PGC_ERROR_META "pgcoord.error"

#define PGC_INLINE_PARAMS 16

/* Most statements take few parameters: those fit in the struct itself. */
typedef struct pgc_params {
	int n;
	const char **values;
	int *lengths;
	int *formats;
	const char *values_buf[PGC_INLINE_PARAMS];
	int lengths_buf[PGC_INLINE_PARAMS];
	int formats_buf[PGC_INLINE_PARAMS];
} pgc_params;

void pgc_params_from_stack(lua_State *L, int first, int last, const char *binary,
			   pgc_params *p);
void pgc_format_double(double d, char *buf, size_t size);
#define PGC_INTEGER_BUF 24
char *pgc_format_integer(lua_Integer v, char *buf, size_t size);
void pgc_push_result(lua_State *L, const PGresult *res);
void pgc_push_result_error(lua_State *L, const PGresult *res);
void pgc_push_error(lua_State *L, const char *sqlstate, const char *message);
void pgc_open_pgvalue(lua_State *L);

/* json.c: lua_CFunctions, also core.json_encode and core.json_decode */
int pgc_json_encode(lua_State *L);
int pgc_json_decode(lua_State *L);
int pgc_json_push_payload(lua_State *L, const char *s, size_t len);
void pgc_open_json(lua_State *L);

/* http.c */
void pgc_open_http(lua_State *L);

/* process.c */
void pgc_open_process(lua_State *L);

#endif

/*
 * pgconn.c -- one non-blocking libpq connection as a small state machine.
 *
 *   CONNECTING --PQconnectPoll ok--> READY <--result--> BUSY
 *        \                             |                 |
 *         `--- failure / timeout ------+-- socket lost --+--> CLOSED
 *
 * A read event stays on the socket in every state but CLOSED, so
 * notifications and a server that hangs up are seen at once, idle or not.
 * Each outcome is handed to a Lua callback; the policy (pooling, waiting,
 * retrying) lives in lua/pgcoord/db.lua.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/ssl.h>

#include "pgcoord.h"

#define CONN_META "pgcoord.pgconn"

enum conn_state { CONNECTING, READY, BUSY, CLOSED };

typedef struct pgc_conn {
	PGconn *pg;
	lua_State *L;
	struct event *ev_read;
	struct event *ev_write;
	struct event *ev_timeout;
	enum conn_state state;
	int sock;
	int self_ref;		/* anchors the userdata while it is not CLOSED */
	int cb_ref;		/* connect or query callback awaiting an outcome */
	int notify_ref;		/* function(channel, payload, pid) */
	int close_ref;		/* function(message) when the link is lost */
	int notice_ref;		/* function(severity, message) for NOTICE etc. */
	PGresult *result;	/* what the current query returned so far */
	int failed_connecting;	/* the link was lost before it was ready */
	int describing;		/* the result wanted is parameter types */
	int pipelined;		/* results end at a pipeline sync, not at NULL */
	char *lost;		/* why the connection closed, for the callbacks */
} pgc_conn;

static void on_read(evutil_socket_t fd, short what, void *arg);
static void on_write(evutil_socket_t fd, short what, void *arg);

static pgc_conn *check_conn(lua_State *L)
{
	return luaL_checkudata(L, 1, CONN_META);
}

/* libpq's messages span lines; a log line and an error want one. */
static char *trimmed_copy(const char *msg)
{
	char *s = strdup(msg && *msg ? msg : "connection lost");
	if (s == NULL)
		return NULL;
	size_t n = 0;
	for (const char *p = s; *p; p++) {
		if (*p == '\n' || *p == '\t') {
			if (n > 0 && s[n - 1] != ' ')
				s[n++] = ' ';
		} else {
			s[n++] = *p;
		}
	}
	while (n > 0 && s[n - 1] == ' ')
		n--;
	s[n] = '\0';
	return s;
}

static void drop_events(pgc_conn *c)
{
	if (c->ev_read)
		event_free(c->ev_read);
	if (c->ev_write)
		event_free(c->ev_write);
	c->ev_read = c->ev_write = NULL;
	c->sock = -1;
}

/* (Re)binds the events to the current socket: PQsocket can change. */
static int watch_socket(pgc_conn *c, struct event_base *base)
{
	int sock = PQsocket(c->pg);
	if (sock < 0)
		return -1;
	if (sock == c->sock && c->ev_read)
		return 0;
	drop_events(c);
	c->sock = sock;
	c->ev_read = event_new(base, sock, EV_READ | EV_PERSIST, on_read, c);
	c->ev_write = event_new(base, sock, EV_WRITE, on_write, c);
	if (c->ev_read == NULL || c->ev_write == NULL)
		return -1;
	return 0;
}

/* Moves to CLOSED and frees libpq's side; the userdata lives on. */
static void shut(pgc_conn *c, const char *why)
{
	if (c->state == CLOSED)
		return;
	c->state = CLOSED;
	if (c->lost == NULL)
		c->lost = trimmed_copy(why);
	drop_events(c);
	if (c->ev_timeout)
		event_del(c->ev_timeout);
	if (c->result) {
		PQclear(c->result);
		c->result = NULL;
	}
	if (c->pg) {
		PQfinish(c->pg);
		c->pg = NULL;
	}
}

static const char *lost_message(pgc_conn *c)
{
	return c->lost ? c->lost : "connection closed";
}

/* A connection that is gone keeps no callback, and nothing anchors it. */
static void drop_refs(lua_State *L, pgc_conn *c)
{
	pgc_unref(L, &c->notify_ref);
	pgc_unref(L, &c->close_ref);
	pgc_unref(L, &c->notice_ref);
	pgc_unref(L, &c->self_ref);
}

/*
 * Tells Lua that the link is gone: the waiting callback gets an error,
 * then the close callback runs.  Called in protected mode.
 */
static int deliver_lost(lua_State *L)
{
	pgc_conn *c = lua_touserdata(L, 1);
	int cb = c->cb_ref, onclose = c->close_ref;
	c->cb_ref = LUA_NOREF;
	c->close_ref = LUA_NOREF;
	lua_rawgeti(L, LUA_REGISTRYINDEX, c->self_ref);	/* anchor */
	drop_refs(L, c);
	if (cb != LUA_NOREF) {
		lua_rawgeti(L, LUA_REGISTRYINDEX, cb);
		luaL_unref(L, LUA_REGISTRYINDEX, cb);
		lua_pushnil(L);
		pgc_push_error(L, c->failed_connecting ? "08001" : "08006", lost_message(c));
		lua_call(L, 2, 0);
	}
	if (onclose != LUA_NOREF) {
		lua_rawgeti(L, LUA_REGISTRYINDEX, onclose);
		luaL_unref(L, LUA_REGISTRYINDEX, onclose);
		lua_pushstring(L, lost_message(c));
		lua_call(L, 1, 0);
	}
	return 0;
}

static void fail(pgc_conn *c, const char *why)
{
	c->failed_connecting = c->state == CONNECTING;
	char *msg = trimmed_copy(why);
	if (c->lost == NULL)
		c->lost = msg;
	else
		free(msg);
	shut(c, why);
	pgc_invoke(c->L, deliver_lost, c);
}

/* ---- notices ------------------------------------------------------- */

static int deliver_notice(lua_State *L)
{
	void **args = lua_touserdata(L, 1);
	pgc_conn *c = args[0];
	const PGresult *res = args[1];
	const char *severity = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
	const char *message = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
	lua_rawgeti(L, LUA_REGISTRYINDEX, c->notice_ref);
	lua_pushstring(L, severity ? severity : "NOTICE");
	lua_pushstring(L, message ? message : "");
	lua_call(L, 2, 0);
	return 0;
}

/* Server notices go to Lua (the log) instead of libpq's stderr default. */
static void on_notice(void *arg, const PGresult *res)
{
	pgc_conn *c = arg;
	if (c->notice_ref == LUA_NOREF)
		return;
	void *args[2] = {c, (void *)res};
	pgc_invoke(c->L, deliver_notice, args);
}

/* ---- connecting ---------------------------------------------------- */

static int deliver_connected(lua_State *L)
{
	pgc_conn *c = lua_touserdata(L, 1);
	lua_rawgeti(L, LUA_REGISTRYINDEX, c->self_ref);
	lua_rawgeti(L, LUA_REGISTRYINDEX, c->cb_ref);
	pgc_unref(L, &c->cb_ref);
	lua_pushvalue(L, -2);
	lua_call(L, 1, 0);
	return 0;
}

static void connect_step(pgc_conn *c)
{
	PostgresPollingStatusType st = PQconnectPoll(c->pg);
	if (st == PGRES_POLLING_FAILED) {
		fail(c, PQerrorMessage(c->pg));
		return;
	}
	if (watch_socket(c, event_get_base(c->ev_timeout)) != 0) {
		fail(c, "cannot watch the connection's socket");
		return;
	}
	event_del(c->ev_read);
	event_del(c->ev_write);
	if (st == PGRES_POLLING_OK) {
		event_del(c->ev_timeout);
		if (PQsetnonblocking(c->pg, 1) != 0 || event_add(c->ev_read, NULL) != 0) {
			fail(c, "cannot make the connection non-blocking");
			return;
		}
		c->state = READY;
		pgc_invoke(c->L, deliver_connected, c);
		return;
	}
	struct event *ev = st == PGRES_POLLING_READING ? c->ev_read : c->ev_write;
	if (event_add(ev, NULL) != 0)
		fail(c, "cannot wait on the connection's socket");
}

static void on_connect_timeout(evutil_socket_t fd, short what, void *arg)
{
	pgc_conn *c = arg;
	(void)fd, (void)what;
	if (c->state == CONNECTING)
		fail(c, "timeout expired while connecting");
}

/*
 * core.connect(conninfo|nil, params, timeout, callback) -> conn
 * conninfo is expanded (URI or key=value); params override it.  The
 * callback gets (conn) when ready, or (nil, err) on failure.
 */
static int l_connect(lua_State *L)
{
	const char *conninfo = luaL_optstring(L, 1, NULL);
	luaL_checktype(L, 2, LUA_TTABLE);
	double timeout = luaL_checknumber(L, 3);
	luaL_checktype(L, 4, LUA_TFUNCTION);

	int nparams = 0;
	lua_pushnil(L);
	while (lua_next(L, 2)) {
		if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
			return luaL_error(L, "pgcoord: connection params must map names to strings");
		nparams++;
		lua_pop(L, 1);
	}
	size_t size = sizeof(char *) * (size_t)(nparams + 2);
	const char **keys = lua_newuserdatauv(L, size, 0);
	const char **vals = lua_newuserdatauv(L, size, 0);
	int n = 0;
	if (conninfo && *conninfo) {
		keys[n] = "dbname";
		vals[n++] = conninfo;
	}
	/* The table holds the strings, so their pointers outlive the loop. */
	lua_pushnil(L);
	while (lua_next(L, 2)) {
		keys[n] = lua_tostring(L, -2);
		vals[n++] = lua_tostring(L, -1);
		lua_pop(L, 1);
	}
	keys[n] = vals[n] = NULL;

	pgc_conn *c = lua_newuserdatauv(L, sizeof *c, 0);
	memset(c, 0, sizeof *c);
	c->sock = -1;
	c->self_ref = c->cb_ref = c->notify_ref = c->close_ref = c->notice_ref = LUA_NOREF;
	c->L = pgc_main_state(L);
	c->state = CONNECTING;
	luaL_setmetatable(L, CONN_META);

	c->ev_timeout = evtimer_new(pgc_base(L), on_connect_timeout, c);
	if (c->ev_timeout == NULL)
		return luaL_error(L, "pgcoord: cannot create the connect timer");
	c->pg = PQconnectStartParams(keys, vals, 1);
	if (c->pg == NULL)
		return luaL_error(L, "pgcoord: out of memory starting a connection");
	PQsetNoticeReceiver(c->pg, on_notice, c);
	if (PQstatus(c->pg) == CONNECTION_BAD) {
		char *msg = trimmed_copy(PQerrorMessage(c->pg));
		shut(c, msg);
		lua_pushnil(L);
		pgc_push_error(L, "08001", msg ? msg : "cannot connect");
		free(msg);
		return 2;
	}
	if (timeout > 0) {
		struct timeval tv = pgc_timeval(timeout);
		if (evtimer_add(c->ev_timeout, &tv) != 0)
			return luaL_error(L, "pgcoord: cannot arm the connect timer");
	}
	if (watch_socket(c, pgc_base(L)) != 0 || event_add(c->ev_write, NULL) != 0)
		return luaL_error(L, "pgcoord: cannot watch the connection's socket");
	c->self_ref = pgc_ref(L, -1);
	c->cb_ref = pgc_ref(L, 4);
	return 1;
}

/* ---- queries ------------------------------------------------------- */

#define RESULT_BOX_META "pgcoord.result_box"

/* Frees a PGresult even when building its rows raises. */
static int result_box_gc(lua_State *L)
{
	PGresult **box = lua_touserdata(L, 1);
	if (*box)
		PQclear(*box);
	*box = NULL;
	return 0;
}

/* Builds what the query's callback gets; runs in protected mode, because
 * decoding a value can raise (JSON nested too deep, out of memory). */
static int build_result(lua_State *L)
{
	const PGresult *res = lua_touserdata(L, 1);
	int describing = lua_toboolean(L, 2);
	if (describing) {
		int n = PQnparams(res);
		lua_createtable(L, n, 0);
		for (int i = 0; i < n; i++) {
			lua_pushinteger(L, (lua_Integer)PQparamtype(res, i));
			lua_rawseti(L, -2, i + 1);
		}
	} else {
		pgc_push_result(L, res);
	}
	return 1;
}

/*
 * Hands the outcome to the callback: (rows) or (nil, err).  A result that
 * cannot be built is an error for the task that waits, never one for the
 * loop's log: the query's rows were all read, so the connection is clean
 * and goes back to its pool.
 */
static int deliver_result(lua_State *L)
{
	pgc_conn *c = lua_touserdata(L, 1);
	PGresult **box = lua_newuserdatauv(L, sizeof *box, 0);
	*box = c->result;
	c->result = NULL;
	luaL_setmetatable(L, RESULT_BOX_META);
	lua_rawgeti(L, LUA_REGISTRYINDEX, c->cb_ref);
	pgc_unref(L, &c->cb_ref);
	int cb = lua_gettop(L);
	ExecStatusType st = *box ? PQresultStatus(*box) : PGRES_FATAL_ERROR;
	int describing = c->describing;
	c->describing = 0;
	int nargs = 1;
	if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK || st == PGRES_EMPTY_QUERY) {
		lua_pushcfunction(L, build_result);
		lua_pushlightuserdata(L, *box);
		lua_pushboolean(L, describing && st == PGRES_COMMAND_OK);
		int rc = lua_pcall(L, 2, 1, 0);
		if (rc != LUA_OK) {
			const char *why = rc == LUA_ERRMEM ? "out of memory" : lua_tostring(L, -1);
			char msg[512];
			snprintf(msg, sizeof msg, "pgcoord: cannot read the query's result: %s",
				 why ? why : "(error object is not a string)");
			lua_settop(L, cb);
			PQclear(*box);
			*box = NULL;
			if (rc == LUA_ERRMEM)	/* what was built is garbage now */
				lua_gc(L, LUA_GCCOLLECT);
			lua_pushnil(L);
			pgc_push_error(L, rc == LUA_ERRMEM ? "53200" : "22000", msg);
			nargs = 2;
		}
	} else {
		lua_pushnil(L);
		if (*box)
			pgc_push_result_error(L, *box);
		else
			pgc_push_error(L, "08006", "the query returned no result");
		nargs = 2;
	}
	PQclear(*box);
	*box = NULL;
	lua_call(L, nargs, 0);
	return 0;
}

static int deliver_notify(lua_State *L)
{
	pgc_conn *c = lua_touserdata(L, 1);
	PGnotify *n;
	while (c->pg && c->notify_ref != LUA_NOREF && (n = PQnotifies(c->pg)) != NULL) {
		lua_rawgeti(L, LUA_REGISTRYINDEX, c->notify_ref);
		lua_pushstring(L, n->relname);
		lua_pushstring(L, n->extra);
		lua_pushinteger(L, n->be_pid);
		PQfreemem(n);
		lua_call(L, 3, 0);
	}
	return 0;
}

/*
 * Collects results while libpq has them without blocking; 1 when done.
 * A pipeline's statements each end with a NULL; the whole ends at its sync.
 */
static int collect_results(pgc_conn *c)
{
	int ended = 0;	/* NULLs in a row: two mean nothing more will come */
	while (!PQisBusy(c->pg)) {
		PGresult *r = PQgetResult(c->pg);
		if (r == NULL) {
			if (!c->pipelined)
				return 1;
			if (++ended == 2) {
				fail(c, "the pipeline ended without its sync");
				return 0;
			}
			continue;
		}
		ended = 0;
		ExecStatusType st = PQresultStatus(r);
		if (st == PGRES_PIPELINE_SYNC) {
			PQclear(r);
			c->pipelined = 0;
			if (!PQexitPipelineMode(c->pg)) {
				fail(c, PQerrorMessage(c->pg));
				return 0;
			}
			return 1;
		}
		if (st == PGRES_PIPELINE_ABORTED) {	/* skipped after an earlier error */
			PQclear(r);
			continue;
		}
		if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
			PQclear(r);
			fail(c, "COPY is not supported on pgcoord connections");
			return 0;
		}
		/* Keep the first error, else the last result (multi-statement SQL). */
		if (c->result && PQresultStatus(c->result) == PGRES_FATAL_ERROR) {
			PQclear(r);
		} else {
			PQclear(c->result);
			c->result = r;
		}
	}
	return 0;
}

/* Keeps the userdata alive while a callback may drop the last reference. */
static int anchor(pgc_conn *c)
{
	int top = lua_gettop(c->L);
	if (c->self_ref != LUA_NOREF)
		lua_rawgeti(c->L, LUA_REGISTRYINDEX, c->self_ref);
	return top;
}

/*
 * PQconsumeInput, until nothing waits inside TLS.  libpq reads at most its
 * free buffer space per call (8 KB or more), and a TLS record can hold
 * 16 KB: the rest stays decrypted in OpenSSL, where the socket does not
 * signal it, so a result or notification ending there would wait for the
 * next bytes from the server, maybe forever.  0 when the link broke.
 */
static int consume_input(pgc_conn *c)
{
	if (!PQconsumeInput(c->pg))
		return 0;
	SSL *ssl = PQsslInUse(c->pg) ? PQsslStruct(c->pg, "OpenSSL") : NULL;
	while (ssl != NULL && SSL_pending(ssl) > 0) {
		/* each call takes some of what is pending, and reads no socket */
		if (!PQconsumeInput(c->pg))
			return 0;
	}
	return 1;
}

static void read_ready(pgc_conn *c)
{
	if (c->state == CONNECTING) {
		connect_step(c);
		return;
	}
	if (c->state == CLOSED)
		return;
	if (!consume_input(c)) {
		fail(c, PQerrorMessage(c->pg));
		return;
	}
	if (c->state == BUSY && collect_results(c)) {
		c->state = READY;
		pgc_invoke(c->L, deliver_result, c);
	}
	if (c->state == CLOSED)
		return;
	if (c->notify_ref != LUA_NOREF) {
		pgc_invoke(c->L, deliver_notify, c);
	} else {
		/* nobody listens here: don't let libpq hoard them */
		PGnotify *n;
		while ((n = PQnotifies(c->pg)) != NULL)
			PQfreemem(n);
	}
}

static void on_read(evutil_socket_t fd, short what, void *arg)
{
	pgc_conn *c = arg;
	(void)fd, (void)what;
	int top = anchor(c);
	read_ready(c);
	lua_settop(c->L, top);
}

/* 0 when all is sent or the write event is armed, -1 when the link broke. */
static int flush(pgc_conn *c)
{
	int rc = PQflush(c->pg);
	if (rc == 1 && event_add(c->ev_write, NULL) != 0)
		rc = -1;
	return rc < 0 ? -1 : 0;
}

static void on_write(evutil_socket_t fd, short what, void *arg)
{
	pgc_conn *c = arg;
	(void)fd, (void)what;
	int top = anchor(c);
	if (c->state == CONNECTING)
		connect_step(c);
	else if (c->state == BUSY && flush(c) != 0)
		fail(c, PQerrorMessage(c->pg));
	lua_settop(c->L, top);
}

static void check_ready(lua_State *L, pgc_conn *c)
{
	if (c->state == CLOSED)
		luaL_error(L, "pgcoord: connection is closed (%s)", lost_message(c));
	if (c->state != READY)
		luaL_error(L, "pgcoord: connection is busy");
}

/* Closes without callbacks and returns (nil, err) to the caller. */
static int send_failed(lua_State *L, pgc_conn *c)
{
	shut(c, PQerrorMessage(c->pg));
	drop_refs(L, c);
	lua_pushnil(L);
	pgc_push_error(L, "08006", lost_message(c));
	return 2;
}

/* After a send: wait for the result, or report why the send failed. */
static int sent(lua_State *L, pgc_conn *c, int ok)
{
	if (!ok || flush(c) != 0)
		return send_failed(L, c);
	c->state = BUSY;
	c->cb_ref = pgc_ref(L, 3);
	lua_pushboolean(L, 1);
	return 1;
}

/* The SQL text at idx: libpq takes a C string, which a NUL byte would cut. */
static const char *check_sql(lua_State *L, int idx)
{
	size_t len;
	const char *sql = luaL_checklstring(L, idx, &len);
	if (memchr(sql, '\0', len) != NULL)
		luaL_error(L, "pgcoord: the SQL text contains a NUL byte");
	return sql;
}

/*
 * conn:send(sql, callback, binary|nil, params...) -> true | nil, err
 * The callback gets (rows) or (nil, err) once the query is done; binary
 * is as for send_prepared.
 */
static int conn_send(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	const char *sql = check_sql(L, 2);
	luaL_checktype(L, 3, LUA_TFUNCTION);
	const char *binary = luaL_optstring(L, 4, NULL);
	check_ready(L, c);
	pgc_params p;
	pgc_params_from_stack(L, 5, lua_gettop(L), binary, &p);
	int ok = PQsendQueryParams(c->pg, sql, p.n, NULL, p.values, p.lengths,
				   p.formats, 0);
	return sent(L, c, ok);
}

/*
 * conn:prepare(name, sql, callback): parses sql as the statement `name`
 * ("" for the unnamed one) and describes it; the callback gets its
 * parameter type OIDs, { oid, ... }.  Parse and describe go in one
 * pipeline with one sync, so a pooler in transaction mode keeps both on
 * the same server connection.
 */
static int conn_prepare(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	const char *name = luaL_checkstring(L, 2);
	const char *sql = check_sql(L, 3);
	luaL_checktype(L, 4, LUA_TFUNCTION);
	check_ready(L, c);
	int ok = PQenterPipelineMode(c->pg) && PQsendPrepare(c->pg, name, sql, 0, NULL) &&
		 PQsendDescribePrepared(c->pg, name) && PQpipelineSync(c->pg);
	lua_settop(L, 4);
	lua_replace(L, 3);	/* sent() takes the callback from slot 3 */
	int r = sent(L, c, ok);
	if (c->state == BUSY)
		c->describing = c->pipelined = 1;
	return r;
}

/*
 * conn:send_prepared(name, callback, binary|nil, params...): runs a
 * prepared statement.  binary, when given, has a character per parameter
 * of the statement, '1' where it is bytea (see pgvalue.c).
 */
static int conn_send_prepared(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	const char *name = luaL_checkstring(L, 2);
	luaL_checktype(L, 3, LUA_TFUNCTION);
	const char *binary = luaL_optstring(L, 4, NULL);
	check_ready(L, c);
	pgc_params p;
	pgc_params_from_stack(L, 5, lua_gettop(L), binary, &p);
	int ok = PQsendQueryPrepared(c->pg, name, p.n, p.values, p.lengths, p.formats, 0);
	return sent(L, c, ok);
}

/* conn:send_script(sql, callback): several statements, no parameters. */
static int conn_send_script(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	const char *sql = check_sql(L, 2);
	luaL_checktype(L, 3, LUA_TFUNCTION);
	check_ready(L, c);
	return sent(L, c, PQsendQuery(c->pg, sql));
}

/* ---- the rest of the handle ---------------------------------------- */

static int conn_on_notify(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	pgc_unref(L, &c->notify_ref);
	if (!lua_isnoneornil(L, 2)) {
		luaL_checktype(L, 2, LUA_TFUNCTION);
		if (c->state != CLOSED)
			c->notify_ref = pgc_ref(L, 2);
	}
	return 0;
}

static int conn_on_close(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	pgc_unref(L, &c->close_ref);
	if (!lua_isnoneornil(L, 2)) {
		luaL_checktype(L, 2, LUA_TFUNCTION);
		if (c->state != CLOSED)
			c->close_ref = pgc_ref(L, 2);
	}
	return 0;
}

static int conn_on_notice(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	pgc_unref(L, &c->notice_ref);
	if (!lua_isnoneornil(L, 2)) {
		luaL_checktype(L, 2, LUA_TFUNCTION);
		c->notice_ref = pgc_ref(L, 2);
	}
	return 0;
}

/*
 * conn:close(): the close and notice callbacks do not run for a close the
 * owner asked for, but a query still waiting gets its error, or its task
 * would wait forever.
 */
static int conn_close(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	int cb = c->cb_ref;
	c->cb_ref = LUA_NOREF;
	shut(c, "connection closed");
	drop_refs(L, c);
	if (cb != LUA_NOREF) {
		lua_rawgeti(L, LUA_REGISTRYINDEX, cb);
		luaL_unref(L, LUA_REGISTRYINDEX, cb);
		lua_pushnil(L);
		pgc_push_error(L, "08003", "connection closed while a query was running");
		lua_call(L, 2, 0);
	}
	return 0;
}

static int conn_status(lua_State *L)
{
	static const char *const names[] = {"connecting", "ready", "busy", "closed"};
	pgc_conn *c = check_conn(L);
	lua_pushstring(L, names[c->state]);
	return 1;
}

static int conn_backend_pid(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	if (c->state == CLOSED || c->state == CONNECTING)
		return 0;
	lua_pushinteger(L, PQbackendPID(c->pg));
	return 1;
}

static int conn_parameter(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	const char *name = luaL_checkstring(L, 2);
	const char *v = c->pg ? PQparameterStatus(c->pg, name) : NULL;
	if (v == NULL)
		return 0;
	lua_pushstring(L, v);
	return 1;
}

/* conn:in_transaction() -> inside one, and whether an error aborted it */
static int conn_in_transaction(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	PGTransactionStatusType ts = c->pg ? PQtransactionStatus(c->pg) : PQTRANS_UNKNOWN;
	lua_pushboolean(L, ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR);
	lua_pushboolean(L, ts == PQTRANS_INERROR);
	return 2;
}

/*
 * conn:check() -> boolean: reads what an idle connection's socket holds
 * right now, so a connection the server closed (a restart, a terminated
 * backend) is found dead before it is handed out, even when the loop has
 * not run since.  A dead one is closed without callbacks.
 */
static int conn_check(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	for (int i = 0; i < 2 && c->state == READY; i++) {
		struct pollfd pfd = {PQsocket(c->pg), POLLIN, 0};
		if (poll(&pfd, 1, 0) <= 0)
			break;
		if (!consume_input(c) || PQstatus(c->pg) == CONNECTION_BAD) {
			shut(c, PQerrorMessage(c->pg));
			drop_refs(L, c);
		}
	}
	lua_pushboolean(L, c->state == READY);
	return 1;
}

/* conn:reusable(): idle, outside any transaction: fit to go back to a pool. */
static int conn_reusable(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	lua_pushboolean(L, c->state == READY && PQtransactionStatus(c->pg) == PQTRANS_IDLE);
	return 1;
}

static int conn_gc(lua_State *L)
{
	pgc_conn *c = luaL_checkudata(L, 1, CONN_META);
	shut(c, "connection closed");
	drop_refs(L, c);
	pgc_unref(L, &c->cb_ref);
	if (c->ev_timeout) {
		event_free(c->ev_timeout);
		c->ev_timeout = NULL;
	}
	free(c->lost);
	c->lost = NULL;
	return 0;
}

static const luaL_Reg conn_methods[] = {
	{"send", conn_send},
	{"send_script", conn_send_script},
	{"prepare", conn_prepare},
	{"send_prepared", conn_send_prepared},
	{"on_notify", conn_on_notify},
	{"on_close", conn_on_close},
	{"on_notice", conn_on_notice},
	{"close", conn_close},
	{"status", conn_status},
	{"backend_pid", conn_backend_pid},
	{"parameter", conn_parameter},
	{"in_transaction", conn_in_transaction},
	{"reusable", conn_reusable},
	{"check", conn_check},
	{NULL, NULL}
};

static const luaL_Reg conn_funcs[] = {
	{"connect", l_connect},
	{NULL, NULL}
};

void pgc_open_pgconn(lua_State *L)
{
	luaL_newmetatable(L, CONN_META);
	luaL_newlib(L, conn_methods);
	lua_setfield(L, -2, "__index");
	lua_pushcfunction(L, conn_gc);
	lua_setfield(L, -2, "__gc");
	lua_pop(L, 1);
	luaL_newmetatable(L, RESULT_BOX_META);
	lua_pushcfunction(L, result_box_gc);
	lua_setfield(L, -2, "__gc");
	lua_pop(L, 1);
	luaL_setfuncs(L, conn_funcs, 0);
}

/*
 * http.c -- a small HTTP server on the event loop (libevent's evhttp), for
 * /metrics, /healthz and the dashboard.  The Lua handler answers at once
 * from state it keeps up to date in the background, or defers the request
 * (req:defer()) and answers it later with req:reply() from a task that
 * waits on the database: either way the loop never blocks.  evhttp itself
 * refuses malformed requests and oversized headers and bodies.
 *
 * A deferred request may outlive its connection (the client goes, the
 * deadline closes it, the server closes): the connection's close callback
 * tells its waiting requests, and a reply to one whose request evhttp freed
 * does nothing.
 *
 * No client may tie the server up: a connection must complete each request
 * within idle_timeout of opening or of its previous request (evhttp's own
 * timeout is per read, so a client sending a header byte every few seconds
 * would otherwise stay forever), and at most max_connections are open; one
 * more is answered 503 and closed at once.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <netinet/in.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/http.h>

#include "pgcoord.h"

#define SERVER_META "pgcoord.http_server"
#define REQUEST_META "pgcoord.http_request"
/* room for a query string well past what the dashboard takes (4 kB), so
 * that a long one gets its 413 page rather than evhttp's bare 400 */
#define MAX_HEADERS 16384
#define MAX_BODY 65536

typedef struct conn conn;
typedef struct request request;

typedef struct pgc_http {
	struct evhttp *http;
	struct evhttp_bound_socket *bound;
	struct event *settle;	/* tracks what was accepted (see settle) */
	conn *pending;		/* accepted, not yet tracked */
	conn *live;		/* tracked: counted, with a deadline */
	lua_State *L;
	int cb_ref;
	int port;
	char address[INET6_ADDRSTRLEN + 8];
	struct timeval idle_timeout;
	int max_connections;
	int open;
	lua_Integer refused, timed_out;
} pgc_http;

/* One accepted connection. */
struct conn {
	conn *next, **pprev;
	pgc_http *server;
	struct bufferevent *bev;
	struct evhttp_connection *evcon;	/* once tracked */
	struct event *deadline;
	request *waiting;	/* deferred requests not answered yet */
};

/* The Lua side of one request (userdata REQUEST_META). */
struct request {
	request *next, **pprev;	/* in conn->waiting once deferred */
	struct evhttp_request *req;	/* NULL once answered or freed by evhttp */
	pgc_http *server;
	conn *conn;
	int deferred;
	int status;
};

static void conn_link(conn **head, conn *c)
{
	c->next = *head;
	if (*head)
		(*head)->pprev = &c->next;
	c->pprev = head;
	*head = c;
}

static void conn_unlink(conn *c)
{
	if (c->next)
		c->next->pprev = c->pprev;
	*c->pprev = c->next;
}

static void conn_free(conn *c)
{
	if (c->deadline)
		event_free(c->deadline);
	free(c);
}

/* evhttp closes a connection: the only place the count goes down. */
static void on_close(struct evhttp_connection *evcon, void *arg)
{
	(void)evcon;
	conn *c = arg;
	conn_unlink(c);
	c->server->open--;
	request *r;
	while ((r = c->waiting) != NULL) {
		c->waiting = r->next;
		r->conn = NULL;
		/* evhttp frees the connection's requests after this callback,
		 * except one it detached first (its client went away): that one
		 * is freed by the reply, which evhttp then does not send */
		if (evhttp_request_get_connection(r->req) != NULL)
			r->req = NULL;
	}
	conn_free(c);
}

/* No complete request within idle_timeout: closed (on_close runs). */
static void on_deadline(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	conn *c = arg;
	c->server->timed_out++;
	evhttp_connection_free(c->evcon);
}

/* Over the cap: a 503, best effort, on a socket about to be closed. */
static void refuse(struct bufferevent *bev)
{
	static const char busy[] = "HTTP/1.1 503 Service Unavailable\r\n"
		"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 21\r\n"
		"Retry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\n";
	evutil_socket_t fd = bufferevent_getfd(bev);
	char drain[4096];
	if (fd < 0)
		return;
	/* A request left unread would make the close a reset, which can
	 * discard the 503 before the client reads it. */
	for (int i = 0; i < 4 && recv(fd, drain, sizeof drain, MSG_DONTWAIT) > 0; i++)
		;
	if (send(fd, busy, sizeof busy - 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
		return;	/* the client is gone or not reading: closing is all there is */
}

/*
 * Tracks what was accepted.  libevent 2.1's evhttp has no hook for a new
 * connection and no cap on their number (evhttp_set_max_connections is
 * 2.2), so new_bufferevent hands evhttp each connection's bufferevent,
 * and evhttp then sets that bufferevent's callbacks with the new
 * evhttp_connection as their argument.  Here, once the accept callback has
 * returned (this event was activated from inside it, so it runs before any
 * event of the new sockets can), that argument is read back and checked,
 * and the connection gets its close callback, its deadline and its place
 * in the count.
 */
static void settle(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	pgc_http *s = arg;
	conn *c;
	while ((c = s->pending) != NULL) {
		conn_unlink(c);
		bufferevent_event_cb eventcb;
		void *cbarg = NULL;
		bufferevent_getcb(c->bev, NULL, NULL, &eventcb, &cbarg);
		struct evhttp_connection *evcon = cbarg;
		int ours = eventcb != NULL && evcon != NULL &&
			   evhttp_connection_get_bufferevent(evcon) == c->bev;
		/* evhttp owns it now (or, when it failed to set up the
		 * connection, has freed it: the reference kept it readable) */
		bufferevent_decref(c->bev);
		if (!ours) {
			conn_free(c);
			continue;
		}
		c->evcon = evcon;
		evhttp_connection_set_closecb(evcon, on_close, c);
		conn_link(&s->live, c);
		s->open++;
		if (s->open > s->max_connections) {
			s->refused++;
			refuse(c->bev);
			evhttp_connection_free(evcon);
		} else if (evtimer_add(c->deadline, &s->idle_timeout) != 0) {
			evhttp_connection_free(evcon);	/* unbounded otherwise */
		}
	}
}

/* evhttp's bufferevent factory: called for each accepted connection. */
static struct bufferevent *new_bufferevent(struct event_base *base, void *arg)
{
	pgc_http *s = arg;
	conn *c = calloc(1, sizeof *c);
	if (c == NULL)
		return NULL;	/* evhttp makes its own, and fails alike */
	c->server = s;
	c->deadline = evtimer_new(base, on_deadline, c);
	c->bev = bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE);
	if (c->deadline == NULL || c->bev == NULL) {
		if (c->bev)
			bufferevent_free(c->bev);
		conn_free(c);
		return NULL;
	}
	/* settle reads it after evhttp may have freed it */
	bufferevent_incref(c->bev);
	conn_link(&s->pending, c);
	event_active(s->settle, EV_TIMEOUT, 0);
	return c->bev;
}

/* A request arrived: the connection gets idle_timeout for the next one.
 * Returns the connection's record (NULL when it is not tracked). */
static conn *restart_deadline(pgc_http *s, struct evhttp_request *req)
{
	struct evhttp_connection *evcon = evhttp_request_get_connection(req);
	for (conn *c = s->live; c; c = c->next) {
		if (c->evcon == evcon) {
			if (evtimer_add(c->deadline, &s->idle_timeout) != 0)
				evhttp_connection_free_on_completion(evcon);
			return c;
		}
	}
	return NULL;
}

static const char *method_name(enum evhttp_cmd_type cmd)
{
	switch (cmd) {
	case EVHTTP_REQ_GET: return "GET";
	case EVHTTP_REQ_HEAD: return "HEAD";
	case EVHTTP_REQ_POST: return "POST";
	case EVHTTP_REQ_PUT: return "PUT";
	case EVHTTP_REQ_DELETE: return "DELETE";
	case EVHTTP_REQ_OPTIONS: return "OPTIONS";
	case EVHTTP_REQ_TRACE: return "TRACE";
	case EVHTTP_REQ_CONNECT: return "CONNECT";
	case EVHTTP_REQ_PATCH: return "PATCH";
	}
	return "?";
}

static void request_unlink(request *r)
{
	if (r->conn == NULL)
		return;
	if (r->next)
		r->next->pprev = r->pprev;
	*r->pprev = r->next;
	r->conn = NULL;
}

/* headers: a table name -> value at index idx, or nil. */
static int add_headers(lua_State *L, int idx, struct evkeyvalq *out)
{
	if (lua_isnoneornil(L, idx))
		return 0;
	luaL_checktype(L, idx, LUA_TTABLE);
	lua_pushnil(L);
	while (lua_next(L, idx) != 0) {
		/* (a number key converted in place would derail lua_next) */
		if (lua_type(L, -2) != LUA_TSTRING)
			return luaL_error(L, "pgcoord.http: a header name must be a string");
		const char *name = lua_tostring(L, -2);
		const char *value = luaL_checkstring(L, -1);
		if (evhttp_add_header(out, name, value) != 0)
			return -1;
		lua_pop(L, 1);
	}
	return 0;
}

/* Sends status, content type (at base), body (base + 1), headers (base + 2). */
static int send_reply(lua_State *L, request *r, int base)
{
	int status = (int)luaL_optinteger(L, base - 1, 200);
	const char *type = luaL_optstring(L, base, "text/plain; charset=utf-8");
	size_t len = 0;
	const char *body = luaL_optlstring(L, base + 1, "", &len);
	luaL_argcheck(L, status >= 100 && status <= 599, base - 1, "not an HTTP status");
	struct evkeyvalq *headers = evhttp_request_get_output_headers(r->req);
	/* the body goes straight into the request's own output buffer */
	if (evbuffer_add(evhttp_request_get_output_buffer(r->req), body, len) != 0 ||
	    evhttp_add_header(headers, "Content-Type", type) != 0 ||
	    add_headers(L, base + 2, headers) != 0)
		return luaL_error(L, "cannot build the response");
	evhttp_send_reply(r->req, status, status < 400 ? "OK" : "Error", NULL);
	r->req = NULL;
	r->status = status;
	return 0;
}

/*
 * handler(method, path, req) -> status, content_type, body, headers; runs
 * protected.  A handler that called req:defer() returns nothing and
 * answers later with req:reply(status, content_type, body, headers).
 */
static int call_handler(lua_State *L)
{
	request *r = lua_touserdata(L, 1);
	const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(r->req);
	const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
	lua_rawgeti(L, LUA_REGISTRYINDEX, r->server->cb_ref);
	lua_pushstring(L, method_name(evhttp_request_get_command(r->req)));
	lua_pushstring(L, path && *path ? path : "/");
	lua_pushvalue(L, 2);
	lua_call(L, 3, 4);
	if (r->deferred)
		return 0;
	return send_reply(L, r, lua_gettop(L) - 2);
}

/* Runs the handler with the request's userdata; on an error the userdata
 * lets go of the request (on_request answers 500) and the error goes on. */
static int handle_request(lua_State *L)
{
	request *r = lua_touserdata(L, 1);
	request *ud = lua_newuserdatauv(L, sizeof *ud, 0);
	*ud = *r;
	ud->conn = NULL;	/* set once linked in its waiting list */
	luaL_setmetatable(L, REQUEST_META);
	lua_pushcfunction(L, call_handler);
	lua_pushlightuserdata(L, ud);
	lua_pushvalue(L, -3);
	int rc = lua_pcall(L, 2, 0, 0);
	r->status = ud->status;
	r->deferred = rc == LUA_OK && ud->deferred;
	if (!r->deferred || ud->req == NULL) {
		ud->req = NULL;	/* answered, or to be: the userdata must not touch it */
	} else if (r->conn != NULL) {
		ud->conn = r->conn;
		ud->next = ud->conn->waiting;
		if (ud->next)
			ud->next->pprev = &ud->next;
		ud->pprev = &ud->conn->waiting;
		ud->conn->waiting = ud;
	}
	if (rc != LUA_OK)
		return lua_error(L);
	return 0;
}

static void on_request(struct evhttp_request *req, void *arg)
{
	pgc_http *server = arg;
	request r = {NULL, NULL, req, server, NULL, 0, 0};
	r.conn = restart_deadline(server, req);
	if (pgc_invoke(server->L, handle_request, &r) != LUA_OK ||
	    (r.status == 0 && !r.deferred))
		evhttp_send_error(req, 500, "Internal Server Error");
}

static request *check_request(lua_State *L)
{
	return luaL_checkudata(L, 1, REQUEST_META);
}

static int push_or_nil(lua_State *L, const char *s)
{
	if (s)
		lua_pushstring(L, s);
	else
		lua_pushnil(L);
	return 1;
}

/* req:header(name) -> value or nil */
static int request_header(lua_State *L)
{
	request *r = check_request(L);
	const char *name = luaL_checkstring(L, 2);
	return push_or_nil(L, r->req ? evhttp_find_header(evhttp_request_get_input_headers(r->req),
							  name) : NULL);
}

/* req:query() -> the raw query string or nil */
static int request_query(lua_State *L)
{
	request *r = check_request(L);
	const struct evhttp_uri *uri = r->req ? evhttp_request_get_evhttp_uri(r->req) : NULL;
	return push_or_nil(L, uri ? evhttp_uri_get_query(uri) : NULL);
}

/* req:body() -> the request body ("" when none) */
static int request_body(lua_State *L)
{
	request *r = check_request(L);
	struct evbuffer *in = r->req ? evhttp_request_get_input_buffer(r->req) : NULL;
	size_t len = in ? evbuffer_get_length(in) : 0;
	if (len == 0) {
		lua_pushliteral(L, "");
		return 1;
	}
	unsigned char *data = evbuffer_pullup(in, -1);
	if (data == NULL)
		return luaL_error(L, "cannot read the request body");
	lua_pushlstring(L, (const char *)data, len);
	return 1;
}

/* req:defer(): the handler answers later, with req:reply */
static int request_defer(lua_State *L)
{
	request *r = check_request(L);
	if (r->req == NULL || r->status != 0)
		return luaL_error(L, "pgcoord.http: the request was answered already");
	r->deferred = 1;
	return 0;
}

/* req:reply(status, content_type, body, headers) -> false when the
 * client is gone (nothing sent) */
static int request_reply(lua_State *L)
{
	request *r = check_request(L);
	if (!r->deferred || r->status != 0)
		return luaL_error(L, "pgcoord.http: reply to a request that was not deferred,"
				  " or twice");
	request_unlink(r);
	if (r->req == NULL) {
		r->status = -1;
		lua_pushboolean(L, 0);
		return 1;
	}
	send_reply(L, r, 3);
	lua_pushboolean(L, 1);
	return 1;
}

/* A deferred request nobody answered: a 500, so that evhttp frees it. */
static int request_gc(lua_State *L)
{
	request *r = check_request(L);
	request_unlink(r);
	if (r->deferred && r->req != NULL && r->status == 0) {
		evhttp_send_error(r->req, 500, "Internal Server Error");
		r->req = NULL;
	}
	return 0;
}

/* The address the socket is bound to, as host:port ([host]:port for IPv6). */
static void bound_address(pgc_http *s)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof ss;
	char host[INET6_ADDRSTRLEN] = "?";
	evutil_socket_t fd = evhttp_bound_socket_get_fd(s->bound);
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
		if (ss.ss_family == AF_INET) {
			struct sockaddr_in *in = (struct sockaddr_in *)&ss;
			s->port = ntohs(in->sin_port);
			if (inet_ntop(AF_INET, &in->sin_addr, host, sizeof host) == NULL)
				strcpy(host, "?");
		} else if (ss.ss_family == AF_INET6) {
			struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
			s->port = ntohs(in6->sin6_port);
			if (inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host) == NULL)
				strcpy(host, "?");
		}
		snprintf(s->address, sizeof s->address, ss.ss_family == AF_INET6 ? "[%s]:%d" : "%s:%d",
			 host, s->port);
	} else {
		snprintf(s->address, sizeof s->address, "?:%d", s->port);
	}
}

/*
 * core.http_listen(address, port, handler, idle_timeout, max_connections)
 * -> server; port 0 picks one.
 */
static int l_http_listen(lua_State *L)
{
	const char *address = luaL_checkstring(L, 1);
	lua_Integer port = luaL_checkinteger(L, 2);
	luaL_checktype(L, 3, LUA_TFUNCTION);
	double idle_timeout = luaL_checknumber(L, 4);
	lua_Integer max_connections = luaL_checkinteger(L, 5);
	luaL_argcheck(L, port >= 0 && port <= 65535, 2, "not a port number");
	luaL_argcheck(L, idle_timeout > 0, 4, "not a positive number of seconds");
	luaL_argcheck(L, max_connections >= 1 && max_connections <= 1000000, 5,
		      "not between 1 and 1000000");
	pgc_http *s = lua_newuserdatauv(L, sizeof *s, 0);
	memset(s, 0, sizeof *s);
	s->cb_ref = LUA_NOREF;
	s->L = pgc_main_state(L);
	s->idle_timeout = pgc_timeval(idle_timeout);
	s->max_connections = (int)max_connections;
	luaL_setmetatable(L, SERVER_META);
	s->settle = event_new(pgc_base(L), -1, 0, settle, s);
	if (s->settle == NULL)
		return luaL_error(L, "pgcoord.http: cannot create the server");
	s->http = evhttp_new(pgc_base(L));
	if (s->http == NULL)
		return luaL_error(L, "pgcoord.http: cannot create the server");
	evhttp_set_max_headers_size(s->http, MAX_HEADERS);
	evhttp_set_max_body_size(s->http, MAX_BODY);
	/* evhttp's timeout is per read or write; the deadline bounds a whole
	 * request and fires first, so that timed_out counts every idle close */
	struct timeval per_io = pgc_timeval(2 * idle_timeout);
	evhttp_set_timeout_tv(s->http, &per_io);
	evhttp_set_bevcb(s->http, new_bufferevent, s);
	s->bound = evhttp_bind_socket_with_handle(s->http, address, (ev_uint16_t)port);
	if (s->bound == NULL) {
		evhttp_free(s->http);
		s->http = NULL;
		return luaL_error(L, "pgcoord.http: cannot listen on %s:%d", address, (int)port);
	}
	s->port = (int)port;
	bound_address(s);
	s->cb_ref = pgc_ref(L, 3);
	evhttp_set_gencb(s->http, on_request, s);
	return 1;
}

static int server_port(lua_State *L)
{
	pgc_http *s = luaL_checkudata(L, 1, SERVER_META);
	lua_pushinteger(L, s->port);
	return 1;
}

static int server_address(lua_State *L)
{
	pgc_http *s = luaL_checkudata(L, 1, SERVER_META);
	lua_pushstring(L, s->address);
	return 1;
}

/* server:stats() -> { open, refused, timed_out } */
static int server_stats(lua_State *L)
{
	pgc_http *s = luaL_checkudata(L, 1, SERVER_META);
	lua_createtable(L, 0, 3);
	lua_pushinteger(L, s->open);
	lua_setfield(L, -2, "open");
	lua_pushinteger(L, s->refused);
	lua_setfield(L, -2, "refused");
	lua_pushinteger(L, s->timed_out);
	lua_setfield(L, -2, "timed_out");
	return 1;
}

static int server_close(lua_State *L)
{
	pgc_http *s = luaL_checkudata(L, 1, SERVER_META);
	if (s->http) {
		/* every connection must have its close callback before evhttp
		 * frees them all (on_close frees what tracks them) */
		settle(-1, 0, s);
		evhttp_free(s->http);
		s->http = NULL;
	}
	if (s->settle) {
		event_free(s->settle);
		s->settle = NULL;
	}
	pgc_unref(L, &s->cb_ref);
	return 0;
}

static const luaL_Reg server_methods[] = {
	{"port", server_port},
	{"address", server_address},
	{"stats", server_stats},
	{"close", server_close},
	{NULL, NULL}
};

static const luaL_Reg request_methods[] = {
	{"header", request_header},
	{"query", request_query},
	{"body", request_body},
	{"defer", request_defer},
	{"reply", request_reply},
	{NULL, NULL}
};

static const luaL_Reg http_funcs[] = {
	{"http_listen", l_http_listen},
	{NULL, NULL}
};

void pgc_open_http(lua_State *L)
{
	pgc_new_meta(L, SERVER_META, server_methods, server_close);
	pgc_new_meta(L, REQUEST_META, request_methods, request_gc);
	luaL_setfuncs(L, http_funcs, 0);
}

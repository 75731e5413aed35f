/*
 * http.c -- a small HTTP server on the event loop (libevent's evhttp), for
 * /metrics and /healthz.  The Lua handler answers at once from state it
 * keeps up to date in the background, so a request never waits on the
 * database and never blocks the loop.  evhttp itself refuses malformed
 * requests and oversized headers.
 */
#include <string.h>

#include <netinet/in.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/http.h>

#include "pgcoord.h"

#define SERVER_META "pgcoord.http_server"
#define MAX_HEADERS 8192
#define MAX_BODY 65536

typedef struct pgc_http {
	struct evhttp *http;
	struct evhttp_bound_socket *bound;
	lua_State *L;
	int cb_ref;
	int port;
} pgc_http;

typedef struct reply {
	struct evhttp_request *req;
	pgc_http *server;
	int status;
} reply;

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

/* handler(method, path) -> status, content_type, body; runs protected. */
static int call_handler(lua_State *L)
{
	reply *r = lua_touserdata(L, 1);
	const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(r->req);
	const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
	lua_rawgeti(L, LUA_REGISTRYINDEX, r->server->cb_ref);
	lua_pushstring(L, method_name(evhttp_request_get_command(r->req)));
	lua_pushstring(L, path && *path ? path : "/");
	lua_call(L, 2, 3);
	int status = (int)luaL_optinteger(L, -3, 200);
	const char *type = luaL_optstring(L, -2, "text/plain; charset=utf-8");
	size_t len = 0;
	const char *body = luaL_optlstring(L, -1, "", &len);
	/* the body goes straight into the request's own output buffer */
	if (evbuffer_add(evhttp_request_get_output_buffer(r->req), body, len) != 0 ||
	    evhttp_add_header(evhttp_request_get_output_headers(r->req), "Content-Type", type) != 0)
		return luaL_error(L, "cannot build the response");
	evhttp_send_reply(r->req, status, status < 400 ? "OK" : "Error", NULL);
	r->status = status;
	return 0;
}

static void on_request(struct evhttp_request *req, void *arg)
{
	pgc_http *server = arg;
	reply r = {req, server, 0};
	if (pgc_invoke(server->L, call_handler, &r) != LUA_OK || r.status == 0)
		evhttp_send_error(req, 500, "Internal Server Error");
}

/* core.http_listen(address, port, handler) -> server; port 0 picks one. */
static int l_http_listen(lua_State *L)
{
	const char *address = luaL_checkstring(L, 1);
	lua_Integer port = luaL_checkinteger(L, 2);
	luaL_checktype(L, 3, LUA_TFUNCTION);
	luaL_argcheck(L, port >= 0 && port <= 65535, 2, "not a port number");
	pgc_http *s = lua_newuserdatauv(L, sizeof *s, 0);
	memset(s, 0, sizeof *s);
	s->cb_ref = LUA_NOREF;
	s->L = pgc_main_state(L);
	luaL_setmetatable(L, SERVER_META);
	s->http = evhttp_new(pgc_base(L));
	if (s->http == NULL)
		return luaL_error(L, "pgcoord.http: cannot create the server");
	evhttp_set_max_headers_size(s->http, MAX_HEADERS);
	evhttp_set_max_body_size(s->http, MAX_BODY);
	evhttp_set_timeout(s->http, 10);
	s->bound = evhttp_bind_socket_with_handle(s->http, address, (ev_uint16_t)port);
	if (s->bound == NULL) {
		evhttp_free(s->http);
		s->http = NULL;
		return luaL_error(L, "pgcoord.http: cannot listen on %s:%d", address, (int)port);
	}
	evutil_socket_t fd = evhttp_bound_socket_get_fd(s->bound);
	struct sockaddr_storage ss;
	socklen_t sl = sizeof ss;
	s->port = (int)port;
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
		if (ss.ss_family == AF_INET)
			s->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
		else if (ss.ss_family == AF_INET6)
			s->port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
	}
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

static int server_close(lua_State *L)
{
	pgc_http *s = luaL_checkudata(L, 1, SERVER_META);
	if (s->http) {
		evhttp_free(s->http);
		s->http = NULL;
	}
	pgc_unref(L, &s->cb_ref);
	return 0;
}

static const luaL_Reg server_methods[] = {
	{"port", server_port},
	{"close", server_close},
	{NULL, NULL}
};

static const luaL_Reg http_funcs[] = {
	{"http_listen", l_http_listen},
	{NULL, NULL}
};

void pgc_open_http(lua_State *L)
{
	luaL_newmetatable(L, SERVER_META);
	lua_newtable(L);
	luaL_setfuncs(L, server_methods, 0);
	lua_setfield(L, -2, "__index");
	lua_pushcfunction(L, server_close);
	lua_setfield(L, -2, "__gc");
	lua_pop(L, 1);
	luaL_setfuncs(L, http_funcs, 0);
}

/*
 * pgconn.c -- one non-blocking libpq connection as a small state machine.
 *
 *   CONNECTING --PQconnectPoll ok--> READY <--result--> BUSY
 *        \                             |                 |
 *         `--- failure / timeout ------+-- socket lost --+--> CLOSED
 *
 * A read event stays on the socket in every state but CLOSED, so
 * notifications and a server that hangs up are seen at once, idle or not.
 * Each outcome is handed to a Lua callback, or resumes the task parked on
 * it (core.wait_prepared); the policy (pooling, waiting, retrying) lives
 * in lua/pgcoord/db.lua.
 */
#include <ctype.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/dns.h>
#include <event2/util.h>

#include <openssl/ssl.h>

#include "pgcoord.h"

#define CONN_META "pgcoord.pgconn"

enum conn_state { CONNECTING, READY, BUSY, CLOSED };

typedef struct pgc_conn {
	PGconn *pg;
	lua_State *L;
	pgc_loop *loop;		/* (looked up once: a query parks and resumes) */
	struct event *ev_read;
	struct event *ev_write;
	struct event *ev_timeout;
	enum conn_state state;
	int sock;
	int self_ref;		/* anchors the userdata while it is not CLOSED */
	int waiting;		/* a callback (the user value) awaits the connect or a query */
	int notify_ref;		/* function(channel, payload, pid) */
	int notify_json;	/* payloads go to it JSON-decoded where they are JSON */
	int routes_ref;		/* channel -> route: those go to routed_ref instead */
	int routed_ref;		/* function(route, payloads, n) */
	int run_ref;		/* the payloads table of a run, reused (see deliver_notify) */
	int run_lent;		/* ... and a run has it now */
	lua_Integer notifications;	/* heard so far, routed or not */
	int close_ref;		/* function(message) when the link is lost */
	int notice_ref;		/* function(severity, message) for NOTICE etc. */
	int channel_ref;	/* the last notification's channel, a Lua string */
	char channel[64];	/* ... as libpq gave it (NAMEDATALEN: 63 bytes) */
	PGresult *result;	/* what the current query returned so far */
	PGresult *delivering;	/* the result deliver_result is building from */
	int failed_connecting;	/* the link was lost before it was ready */
	int describing;		/* the result wanted is parameter types */
	int pipelined;		/* results end at a pipeline sync, not at NULL */
	double released;	/* pgc_now() at the last conn:release() */
	char *lost;		/* why the connection closed, for the callbacks */
	struct pgc_resolve *resolve;	/* host names being looked up first */
} pgc_conn;

static void stop_resolving(pgc_conn *c);

static void on_read(evutil_socket_t fd, short what, void *arg);
static void on_write(evutil_socket_t fd, short what, void *arg);

/*
 * The connection at idx.  Every function of a connection has its
 * metatable as upvalue 1: luaL_checkudata would look it up by name, a
 * string to intern at every call, and queries make several calls.
 */
static pgc_conn *conn_at(lua_State *L, int idx)
{
	pgc_conn *c = lua_touserdata(L, idx);
	if (c == NULL || !lua_getmetatable(L, idx) || !lua_rawequal(L, -1, lua_upvalueindex(1)))
		luaL_typeerror(L, idx, CONN_META);
	lua_pop(L, 1);
	return c;
}

static pgc_conn *check_conn(lua_State *L)
{
	return conn_at(L, 1);
}

/*
 * The callback awaiting the connect or the current query is the
 * userdata's user value, not a registry reference: it is set and taken at
 * every query, and there a user value costs less.  It is a function, or
 * the thread of a task parked in C by core.wait_send / wait_prepared
 * (call_waiter resumes it).  ud: the userdata's absolute index.
 */
static void hold_callback(lua_State *L, pgc_conn *c, int ud, int fn)
{
	lua_pushvalue(L, fn);
	lua_setiuservalue(L, ud, 1);
	c->waiting = 1;
}

/* Pushes the callback awaiting an outcome, or nil; 1 when it was one. */
static int take_callback(lua_State *L, pgc_conn *c, int ud)
{
	if (!c->waiting || lua_touserdata(L, ud) != c) {
		lua_pushnil(L);
		return 0;
	}
	c->waiting = 0;
	lua_getiuservalue(L, ud, 1);
	lua_pushnil(L);	/* let it go: it may hold a task that ends */
	lua_setiuservalue(L, ud, 1);
	return 1;
}

/* Calls the callback taken, under its nargs arguments on the stack top. */
static void call_waiter(lua_State *L, pgc_conn *c, int nargs)
{
	lua_State *co = lua_tothread(L, -nargs - 1);
	if (co != NULL)
		pgc_resume(c->loop, L, co, nargs);
	else
		lua_call(L, nargs, 0);
}

/*
 * libpq's messages span lines; a log line and an error want one.  A line
 * that starts a sentence ("Connection refused\n\tIs the server running")
 * gets the full stop libpq leaves to the line break, a line that starts
 * another message (one per host tried) a "; ", a continued sentence a space.
 */
static char *trimmed_copy(const char *msg)
{
	const char *in = msg && *msg ? msg : "connection lost";
	size_t len = strlen(in);
	char *s = malloc(2 * len + 1);	/* a break of one byte may become ". " */
	if (s == NULL)
		return NULL;
	size_t n = 0;
	for (size_t i = 0; i < len; i++) {
		if (in[i] != '\n' && in[i] != '\t') {
			s[n++] = in[i];
			continue;
		}
		int continued = in[i] == '\t';
		while (i + 1 < len && (in[i + 1] == '\n' || in[i + 1] == '\t'))
			continued |= in[++i] == '\t';
		if (i + 1 == len || n == 0 || s[n - 1] == ' ')
			continue;
		char last = s[n - 1];
		int ended = strchr(".?!:;", last) != NULL;
		if (!ended && continued && isupper((unsigned char)in[i + 1]))
			s[n++] = '.';
		else if (!ended && !continued)
			s[n++] = ';';
		s[n++] = ' ';
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
	stop_resolving(c);
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
	pgc_unref(L, &c->routes_ref);
	pgc_unref(L, &c->routed_ref);
	pgc_unref(L, &c->run_ref);
	pgc_unref(L, &c->close_ref);
	pgc_unref(L, &c->notice_ref);
	pgc_unref(L, &c->channel_ref);
	pgc_unref(L, &c->self_ref);
}

/*
 * Tells Lua that the link is gone: the waiting callback gets an error,
 * then the close callback runs.  Called in protected mode.
 */
static int deliver_lost(lua_State *L)
{
	pgc_conn *c = lua_touserdata(L, 1);
	int onclose = c->close_ref;
	c->close_ref = LUA_NOREF;
	lua_rawgeti(L, LUA_REGISTRYINDEX, c->self_ref);	/* anchor */
	int ud = lua_gettop(L);
	drop_refs(L, c);
	if (take_callback(L, c, ud)) {
		lua_pushnil(L);
		pgc_push_error(L, c->failed_connecting ? "08001" : "08006", lost_message(c));
		call_waiter(L, c, 2);
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
	take_callback(L, c, lua_gettop(L));
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

static void on_connect_timeout(evutil_socket_t fd, short what, void *arg);

/* ---- resolving host names -------------------------------------------- */

/*
 * libpq resolves a host name with getaddrinfo, which blocks the loop for
 * as long as DNS takes.  So names are looked up first with evdns, on the
 * loop, and libpq gets `hostaddr` beside `host` (kept for TLS's name check
 * and for its messages).  A name with several addresses becomes that many
 * entries of host, hostaddr (and port, when it is a list), which libpq
 * tries in order as it would have.
 */

#define PGC_MAX_HOSTS 64

typedef struct pgc_lookup {
	struct pgc_resolve *r;	/* NULL once the connection gave up on it */
	struct evdns_getaddrinfo_request *req;
	struct evutil_addrinfo *ai;
	int err;
	int done;
} pgc_lookup;

typedef struct pgc_resolve {
	pgc_conn *c;
	int nkw;		/* keywords and values for PQconnectStartParams */
	char **kw, **val;
	int nhosts, nports;
	char *hosts[PGC_MAX_HOSTS];
	char *ports[PGC_MAX_HOSTS];
	pgc_lookup *lookups[PGC_MAX_HOSTS];	/* NULL: no lookup for this entry */
	int pending;
	int launching;		/* answers that come at once are taken after the launch */
} pgc_resolve;

static void free_strings(char **v, int n)
{
	for (int i = 0; i < n; i++)
		free(v[i]);
}

static void free_resolve(pgc_resolve *r)
{
	free_strings(r->kw, r->nkw);
	free_strings(r->val, r->nkw);
	free(r->kw);
	free(r->val);
	free_strings(r->hosts, r->nhosts);
	free_strings(r->ports, r->nports);
	free(r);
}

/* Splits a comma-separated list as libpq does; -1 when too long. */
static int split_list(const char *s, char **out)
{
	int n = 0;
	while (s) {
		const char *comma = strchr(s, ',');
		size_t len = comma ? (size_t)(comma - s) : strlen(s);
		if (n == PGC_MAX_HOSTS || (out[n] = strndup(s, len)) == NULL) {
			free_strings(out, n);
			return -1;
		}
		n++;
		s = comma ? comma + 1 : NULL;
	}
	return n;
}

/* Unix socket paths and IP addresses need no lookup. */
static int needs_lookup(const char *host)
{
	unsigned char buf[sizeof(struct in6_addr)];
	if (host[0] == '\0' || host[0] == '/' || host[0] == '@')
		return 0;
	return evutil_inet_pton(AF_INET, host, buf) != 1 &&
	       evutil_inet_pton(AF_INET6, host, buf) != 1;
}

static void stop_resolving(pgc_conn *c)
{
	pgc_resolve *r = c->resolve;
	if (r == NULL)
		return;
	c->resolve = NULL;
	for (int i = 0; i < r->nhosts; i++) {
		pgc_lookup *l = r->lookups[i];
		if (l == NULL)
			continue;
		if (l->done) {
			if (l->ai)
				evutil_freeaddrinfo(l->ai);
			free(l);
		} else {
			/* evdns still calls back (with EVUTIL_EAI_CANCEL): it frees l */
			l->r = NULL;
			evdns_getaddrinfo_cancel(l->req);
		}
	}
	free_resolve(r);
}

static int append(char **buf, size_t *len, size_t *cap, const char *s, int comma)
{
	size_t need = strlen(s) + 2;
	if (*len + need > *cap) {
		size_t cap2 = (*cap + need) * 2;
		char *b = realloc(*buf, cap2);
		if (b == NULL)
			return -1;
		*buf = b;
		*cap = cap2;
	}
	if (comma)
		(*buf)[(*len)++] = ',';
	strcpy(*buf + *len, s);
	*len += strlen(s);
	return 0;
}

typedef struct host_lists {
	char *host, *hostaddr, *port;
	size_t lens[3], caps[3];
	int n;
} host_lists;

static int add_entry(host_lists *h, const char *host, const char *addr, const char *port)
{
	int comma = h->n++ > 0;
	if (append(&h->host, &h->lens[0], &h->caps[0], host, comma) != 0 ||
	    append(&h->hostaddr, &h->lens[1], &h->caps[1], addr, comma) != 0)
		return -1;
	return port ? append(&h->port, &h->lens[2], &h->caps[2], port, comma) : 0;
}

static void free_lists(host_lists *h)
{
	free(h->host);
	free(h->hostaddr);
	free(h->port);
}

static int start_libpq(pgc_conn *c, const char *const *keys, const char *const *vals);

/*
 * Every lookup answered: host, hostaddr and port lists in the order of the
 * conninfo, then libpq starts.  0, or -1 with the reason in *why.
 */
static int resolved(pgc_conn *c, char *why, size_t size)
{
	pgc_resolve *r = c->resolve;
	host_lists h = {0};
	int per_host_ports = r->nports > 1;
	const char *failed = NULL;
	int err = 0;
	for (int i = 0; i < r->nhosts; i++) {
		const char *port = per_host_ports ? r->ports[i] : NULL;
		pgc_lookup *l = r->lookups[i];
		if (l == NULL) {
			if (add_entry(&h, r->hosts[i], "", port) != 0)
				goto oom;
			continue;
		}
		if (l->err != 0 || l->ai == NULL) {	/* libpq too goes on to the next host */
			if (failed == NULL) {
				failed = r->hosts[i];
				err = l->err;
			}
			continue;
		}
		for (struct evutil_addrinfo *ai = l->ai; ai; ai = ai->ai_next) {
			char addr[64];
			const void *a = ai->ai_family == AF_INET6
				? (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr
				: (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr;
			if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
			    evutil_inet_ntop(ai->ai_family, a, addr, sizeof addr) == NULL)
				continue;
			if (add_entry(&h, r->hosts[i], addr, port) != 0)
				goto oom;
		}
	}
	if (h.n == 0) {
		snprintf(why, size, "could not translate host name \"%s\" to address: %s",
			 failed ? failed : "?", err ? evutil_gai_strerror(err) : "no address");
		free_lists(&h);
		return -1;
	}
	const char **keys = calloc((size_t)r->nkw + 4, sizeof *keys);
	const char **vals = calloc((size_t)r->nkw + 4, sizeof *vals);
	if (keys == NULL || vals == NULL) {
		free(keys);
		free(vals);
		goto oom;
	}
	int n = 0;
	for (int i = 0; i < r->nkw; i++) {
		keys[n] = r->kw[i];
		vals[n++] = r->val[i];
	}
	/* the last value of a keyword wins */
	keys[n] = "host", vals[n++] = h.host;
	keys[n] = "hostaddr", vals[n++] = h.hostaddr;
	if (h.port)
		keys[n] = "port", vals[n++] = h.port;
	keys[n] = vals[n] = NULL;
	int rc = start_libpq(c, keys, vals);
	if (rc != 0)
		snprintf(why, size, "%s", c->lost ? c->lost : "cannot connect");
	free(keys);
	free(vals);
	free_lists(&h);
	return rc;
oom:
	free_lists(&h);
	snprintf(why, size, "out of memory resolving host names");
	return -1;
}

static void on_resolved_later(pgc_conn *c)
{
	char why[512];
	if (resolved(c, why, sizeof why) != 0) {
		fail(c, why);
		return;
	}
	stop_resolving(c);
}

static void on_lookup(int err, struct evutil_addrinfo *ai, void *arg)
{
	pgc_lookup *l = arg;
	pgc_resolve *r = l->r;
	if (r == NULL) {	/* the connection is gone */
		if (ai)
			evutil_freeaddrinfo(ai);
		free(l);
		return;
	}
	l->done = 1;
	l->err = err;
	l->ai = ai;
	if (--r->pending == 0 && !r->launching) {
		pgc_conn *c = r->c;
		int top = lua_gettop(c->L);
		if (c->self_ref != LUA_NOREF)	/* anchored while it may be collected */
			lua_rawgeti(c->L, LUA_REGISTRYINDEX, c->self_ref);
		on_resolved_later(c);
		lua_settop(c->L, top);
	}
}

/*
 * Looks at the host, hostaddr and port the connection will use (conninfo,
 * then params, then PGHOST, PGHOSTADDR, PGPORT); when a host name needs a
 * lookup, starts them all and returns 1, else 0 (libpq can start now);
 * -1 when out of memory.
 */
static int start_resolving(lua_State *L, pgc_conn *c, const char *const *keys,
			   const char *const *vals)
{
	const char *host = NULL, *hostaddr = NULL, *port = NULL;
	PQconninfoOption *opts = NULL;
	for (int i = 0; keys[i]; i++) {
		const char *k = keys[i], *v = vals[i];
		if (i == 0 && strcmp(k, "dbname") == 0 &&
		    (strncmp(v, "postgresql://", 13) == 0 || strncmp(v, "postgres://", 11) == 0 ||
		     strchr(v, '=') != NULL)) {
			char *err = NULL;
			opts = PQconninfoParse(v, &err);
			if (opts == NULL) {	/* libpq says what is wrong */
				PQfreemem(err);
				return 0;
			}
			for (PQconninfoOption *o = opts; o->keyword; o++) {
				if (o->val == NULL)
					continue;
				if (strcmp(o->keyword, "host") == 0)
					host = o->val;
				else if (strcmp(o->keyword, "hostaddr") == 0)
					hostaddr = o->val;
				else if (strcmp(o->keyword, "port") == 0)
					port = o->val;
			}
		} else if (strcmp(k, "host") == 0) {
			host = v;
		} else if (strcmp(k, "hostaddr") == 0) {
			hostaddr = v;
		} else if (strcmp(k, "port") == 0) {
			port = v;
		}
	}
	if (host == NULL)
		host = getenv("PGHOST");
	if (hostaddr == NULL)
		hostaddr = getenv("PGHOSTADDR");
	if (port == NULL)
		port = getenv("PGPORT");
	int rc = 0;
	pgc_resolve *r = NULL;
	if (host == NULL || *host == '\0' || (hostaddr && *hostaddr))
		goto done;
	rc = -1;
	r = calloc(1, sizeof *r);
	if (r == NULL)
		goto done;
	r->c = c;
	r->nhosts = split_list(host, r->hosts);
	r->nports = port && *port ? split_list(port, r->ports) : 0;
	if (r->nhosts < 0 || r->nports < 0) {
		/* more hosts than pgcoord looks up: libpq resolves them */
		r->nhosts = r->nhosts < 0 ? 0 : r->nhosts;
		r->nports = r->nports < 0 ? 0 : r->nports;
		rc = 0;
		goto done;
	}
	int any = 0;
	for (int i = 0; i < r->nhosts; i++)
		any |= needs_lookup(r->hosts[i]);
	/* ports that match no host list: libpq's error says so */
	if (!any || (r->nports > 1 && r->nports != r->nhosts)) {
		rc = 0;
		goto done;
	}
	int nkw = 0;
	while (keys[nkw])
		nkw++;
	r->kw = calloc((size_t)nkw + 1, sizeof *r->kw);
	r->val = calloc((size_t)nkw + 1, sizeof *r->val);
	if (r->kw == NULL || r->val == NULL)
		goto done;
	for (; r->nkw < nkw; r->nkw++) {
		r->kw[r->nkw] = strdup(keys[r->nkw]);
		r->val[r->nkw] = strdup(vals[r->nkw]);
		if (r->kw[r->nkw] == NULL || r->val[r->nkw] == NULL) {
			r->nkw++;
			goto done;
		}
	}
	struct evdns_base *dns = pgc_dns(L);
	c->resolve = r;
	r->launching = 1;
	struct evutil_addrinfo hints;
	memset(&hints, 0, sizeof hints);
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_protocol = IPPROTO_TCP;
	for (int i = 0; i < r->nhosts; i++) {
		if (!needs_lookup(r->hosts[i]))
			continue;
		pgc_lookup *l = calloc(1, sizeof *l);
		if (l == NULL)
			break;
		l->r = r;
		r->lookups[i] = l;
		r->pending++;
		/* answers from /etc/hosts come before this returns (and NULL) */
		l->req = evdns_getaddrinfo(dns, r->hosts[i], NULL, &hints, on_lookup, l);
	}
	r->launching = 0;
	PQconninfoFree(opts);
	return 1;
done:
	PQconninfoFree(opts);
	if (r && c->resolve != r)
		free_resolve(r);
	return rc;
}

static void on_connect_timeout(evutil_socket_t fd, short what, void *arg)
{
	pgc_conn *c = arg;
	(void)fd, (void)what;
	if (c->state != CONNECTING)
		return;
	if (c->resolve) {
		char why[512];
		pgc_resolve *r = c->resolve;
		const char *name = "?";
		for (int i = 0; i < r->nhosts; i++)
			if (r->lookups[i] && !r->lookups[i]->done) {
				name = r->hosts[i];
				break;
			}
		snprintf(why, sizeof why,
			 "timeout expired while resolving host name \"%s\" (no answer from DNS)", name);
		fail(c, why);
		return;
	}
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

	pgc_conn *c = lua_newuserdatauv(L, sizeof *c, 1);
	int ud = lua_gettop(L);
	memset(c, 0, sizeof *c);
	c->sock = -1;
	c->self_ref = c->notify_ref = c->close_ref = c->notice_ref = LUA_NOREF;
	c->channel_ref = c->routes_ref = c->routed_ref = c->run_ref = LUA_NOREF;
	c->L = pgc_main_state(L);
	c->loop = pgc_loop_of(L);
	c->state = CONNECTING;
	luaL_setmetatable(L, CONN_META);

	c->ev_timeout = evtimer_new(pgc_base(L), on_connect_timeout, c);
	if (c->ev_timeout == NULL)
		return luaL_error(L, "pgcoord: cannot create the connect timer");
	if (timeout > 0) {
		struct timeval tv = pgc_timeval(timeout);
		if (evtimer_add(c->ev_timeout, &tv) != 0)
			return luaL_error(L, "pgcoord: cannot arm the connect timer");
	}
	int resolving = start_resolving(L, c, keys, vals);
	if (resolving < 0) {
		shut(c, "out of memory resolving host names");
		return luaL_error(L, "pgcoord: out of memory resolving host names");
	}
	if (resolving && c->resolve->pending == 0) {
		/* every name was answered at once (/etc/hosts) */
		char why[512];
		if (resolved(c, why, sizeof why) != 0) {
			shut(c, why);
			lua_pushnil(L);
			pgc_push_error(L, "08001", lost_message(c));
			return 2;
		}
		stop_resolving(c);
	} else if (!resolving && start_libpq(c, keys, vals) != 0) {
		lua_pushnil(L);
		pgc_push_error(L, "08001", lost_message(c));
		return 2;
	}
	c->self_ref = pgc_ref(L, ud);
	hold_callback(L, c, ud, 4);
	return 1;
}

/*
 * Starts libpq's side: 0, or -1 with the connection CLOSED and the reason
 * in c->lost.
 */
static int start_libpq(pgc_conn *c, const char *const *keys, const char *const *vals)
{
	c->pg = PQconnectStartParams(keys, vals, 1);
	if (c->pg == NULL) {
		shut(c, "out of memory starting a connection");
		return -1;
	}
	PQsetNoticeReceiver(c->pg, on_notice, c);
	if (PQstatus(c->pg) == CONNECTION_BAD) {
		shut(c, PQerrorMessage(c->pg));
		return -1;
	}
	if (watch_socket(c, event_get_base(c->ev_timeout)) != 0 || event_add(c->ev_write, NULL) != 0) {
		shut(c, "cannot watch the connection's socket");
		return -1;
	}
	return 0;
}

/* ---- queries ------------------------------------------------------- */

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
 * and goes back to its pool.  The PGresult is held in c->delivering, which
 * nothing else frees, until it is cleared here, before the callback runs
 * (which may send the next query); one left there by an error escaping
 * this function is cleared by the next delivery or the garbage collector.
 */
static int deliver_result(lua_State *L)
{
	pgc_conn *c = lua_touserdata(L, 1);
	PQclear(c->delivering);
	PGresult *res = c->delivering = c->result;
	c->result = NULL;
	lua_rawgeti(L, LUA_REGISTRYINDEX, c->self_ref);
	take_callback(L, c, lua_gettop(L));
	int cb = lua_gettop(L);
	ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
	int describing = c->describing;
	c->describing = 0;
	int nargs = 1;
	if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK || st == PGRES_EMPTY_QUERY) {
		lua_pushcfunction(L, build_result);
		lua_pushlightuserdata(L, res);
		lua_pushboolean(L, describing && st == PGRES_COMMAND_OK);
		int rc = lua_pcall(L, 2, 1, 0);
		if (rc != LUA_OK) {
			const char *why = rc == LUA_ERRMEM ? "out of memory" : lua_tostring(L, -1);
			char msg[512];
			snprintf(msg, sizeof msg, "pgcoord: cannot read the query's result: %s",
				 why ? why : "(error object is not a string)");
			lua_settop(L, cb);
			c->delivering = NULL;
			PQclear(res);
			res = NULL;
			if (rc == LUA_ERRMEM)	/* what was built is garbage now */
				lua_gc(L, LUA_GCCOLLECT);
			lua_pushnil(L);
			pgc_push_error(L, rc == LUA_ERRMEM ? "53200" : "22000", msg);
			nargs = 2;
		}
	} else {
		lua_pushnil(L);
		if (res)
			pgc_push_result_error(L, res);
		else
			pgc_push_error(L, "08006", "the query returned no result");
		nargs = 2;
	}
	c->delivering = NULL;
	PQclear(res);
	call_waiter(L, c, nargs);
	return 0;
}

/* Whether name is the channel push_channel pushed last (and kept). */
static int is_last_channel(const pgc_conn *c, const char *name)
{
	return c->channel_ref != LUA_NOREF && strcmp(name, c->channel) == 0;
}

/*
 * Pushes a notification's channel.  A listening connection hears one or a
 * few channels: the one before is kept, which spares interning its name
 * again (hashing it, then finding it) for each of a burst.
 */
static void push_channel(lua_State *L, pgc_conn *c, const char *name)
{
	if (is_last_channel(c, name)) {
		lua_rawgeti(L, LUA_REGISTRYINDEX, c->channel_ref);
		return;
	}
	lua_pushstring(L, name);
	pgc_unref(L, &c->channel_ref);
	size_t len = strlen(name);
	if (len >= sizeof c->channel)
		return;		/* (longer than the server allows: not kept) */
	memcpy(c->channel, name, len + 1);
	c->channel_ref = pgc_ref(L, -1);
}

/*
 * Pushes the function a notification on channel name goes to, and its
 * first argument: the route and routed_ref's function when the routes
 * have the channel (ROUTED), else the channel and notify_ref's (PLAIN);
 * nothing when nobody takes it (NOBODY).  A route spares a Lua function
 * that only looks the channel up (a subscriber's fan-outs).
 */
enum receiver { NOBODY, ROUTED, PLAIN };

static enum receiver push_receiver(lua_State *L, pgc_conn *c, const char *name)
{
	if (c->routes_ref != LUA_NOREF) {
		lua_rawgeti(L, LUA_REGISTRYINDEX, c->routes_ref);
		push_channel(L, c, name);
		if (lua_rawget(L, -2) != LUA_TNIL) {
			lua_rawgeti(L, LUA_REGISTRYINDEX, c->routed_ref);
			lua_replace(L, -3);	/* fn, route */
			return ROUTED;
		}
		lua_pop(L, 2);
	}
	if (c->notify_ref == LUA_NOREF)
		return NOBODY;
	lua_rawgeti(L, LUA_REGISTRYINDEX, c->notify_ref);
	push_channel(L, c, name);
	return PLAIN;
}

static int hears_notifications(pgc_conn *c)
{
	return c->notify_ref != LUA_NOREF || c->routes_ref != LUA_NOREF;
}

static void push_payload(lua_State *L, pgc_conn *c, const PGnotify *n)
{
	if (!c->notify_json || !pgc_json_push_payload(L, n->extra, strlen(n->extra)))
		lua_pushstring(L, n->extra);
}

/*
 * Starts a run (fn and route pushed): pushes its payloads table, the
 * connection's own unless a run has it (a call that came back here makes
 * one of its own); 1 when it is the connection's.
 */
static int start_run(lua_State *L, pgc_conn *c)
{
	if (c->run_ref == LUA_NOREF || c->run_lent) {
		lua_createtable(L, 16, 0);
		return 0;
	}
	lua_rawgeti(L, LUA_REGISTRYINDEX, c->run_ref);
	c->run_lent = 1;
	return 1;
}

/*
 * Calls fn(route, payloads, n) for the run on the stack (lent: its table
 * is the connection's), then empties the table, which would keep the
 * payloads alive, for the next run.  held, a notification taken from
 * libpq and not handed on yet, is freed if the call raises.
 */
static void end_run(lua_State *L, pgc_conn *c, int n, int lent, PGnotify *held)
{
	lua_pushvalue(L, -1);
	lua_insert(L, -4);	/* payloads, fn, route, payloads */
	lua_pushinteger(L, n);
	if (lua_pcall(L, 3, 0, 0) != LUA_OK) {
		if (held)
			PQfreemem(held);
		if (lent) {	/* (not emptied: the next run makes another) */
			c->run_lent = 0;
			pgc_unref(L, &c->run_ref);
		}
		lua_error(L);
	}
	for (int i = 1; i <= n; i++) {
		lua_pushnil(L);
		lua_rawseti(L, -2, i);
	}
	if (lent)
		c->run_lent = 0;
	else if (c->run_ref == LUA_NOREF && c->state != CLOSED)
		c->run_ref = pgc_ref(L, -1);
	lua_pop(L, 1);
}

/*
 * Hands on what libpq heard, in order.  The notifications in a row on one
 * routed channel (a burst on a fan-out's, which one read brings) make one
 * run and one call, fn(route, payloads, n): a burst costs one Lua call,
 * not one each.  No Lua runs while a run is gathered, so the routes it
 * was looked up in are still the live ones, and the channel push_channel
 * kept is the run's; the next channel is looked up after the run's call.
 */
static int deliver_notify(lua_State *L)
{
	pgc_conn *c = lua_touserdata(L, 1);
	int run = 0, lent = 0;	/* payloads in the run (fn, route, table on the stack) */
	PGnotify *n;
	while (c->pg && hears_notifications(c) && (n = PQnotifies(c->pg)) != NULL) {
		c->notifications++;
		if (run > 0) {
			if (is_last_channel(c, n->relname)) {
				push_payload(L, c, n);
				lua_rawseti(L, -2, ++run);
				PQfreemem(n);
				continue;
			}
			end_run(L, c, run, lent, n);
			run = 0;
			if (!c->pg || !hears_notifications(c)) {
				PQfreemem(n);
				break;
			}
		}
		switch (push_receiver(L, c, n->relname)) {
		case NOBODY:
			break;
		case ROUTED:
			lent = start_run(L, c);
			push_payload(L, c, n);
			lua_rawseti(L, -2, ++run);
			break;
		case PLAIN:
			push_payload(L, c, n);
			lua_pushinteger(L, n->be_pid);
			PQfreemem(n);
			lua_call(L, 3, 0);
			continue;
		}
		PQfreemem(n);
	}
	if (run > 0)
		end_run(L, c, run, lent, NULL);
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
	if (hears_notifications(c)) {
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

/*
 * After a send: wait for the result, the callback at cb to be called
 * with it, or report why the send failed.
 */
static int sent(lua_State *L, pgc_conn *c, int ok, int ud, int cb)
{
	if (!ok || flush(c) != 0)
		return send_failed(L, c);
	c->state = BUSY;
	hold_callback(L, c, ud, cb);
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
 * Sends a query with binary|nil at 4 and the parameters from 5 on: the
 * SQL text, or the name of a prepared statement, at `what`; the userdata
 * at ud and the callback at cb.  As conn:send returns.
 */
static int send_on(lua_State *L, pgc_conn *c, int ud, int what, int cb, int prepared)
{
	const char *text = prepared ? luaL_checkstring(L, what) : check_sql(L, what);
	if (!lua_isthread(L, cb))
		luaL_checktype(L, cb, LUA_TFUNCTION);
	const char *binary = luaL_optstring(L, 4, NULL);
	check_ready(L, c);
	pgc_params p;
	pgc_params_from_stack(L, 5, lua_gettop(L), binary, &p);
	int ok = prepared
		? PQsendQueryPrepared(c->pg, text, p.n, p.values, p.lengths, p.formats, 0)
		: PQsendQueryParams(c->pg, text, p.n, NULL, p.values, p.lengths, p.formats, 0);
	return sent(L, c, ok, ud, cb);
}

static int send_params(lua_State *L, int ud, int what, int cb, int prepared)
{
	return send_on(L, conn_at(L, ud), ud, what, cb, prepared);
}

/*
 * conn:send(sql, callback, binary|nil, params...) -> true | nil, err
 * The callback gets (rows) or (nil, err) once the query is done; binary
 * is as for send_prepared.
 */
static int conn_send(lua_State *L)
{
	return send_params(L, 1, 2, 3, 0);
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
	int r = sent(L, c, ok, 1, 4);
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
	return send_params(L, 1, 2, 3, 1);
}

/* A register function's end: a send that failed (nil, err) calls resume. */
static int registered(lua_State *L, int nresults)
{
	if (nresults == 2) {
		lua_pushvalue(L, 1);
		lua_insert(L, -3);
		lua_call(L, 2, 0);
	}
	return 0;
}

/*
 * core.send_register(resume, conn, sql, binary|nil, params...) and
 * core.prepared_register(resume, conn, name, binary|nil, params...):
 * conn:send and conn:send_prepared in the shape of a task.await register
 * function, so that a query's wait runs no Lua function of its own; a
 * send that fails calls resume(nil, err) at once.
 */
static int l_send_register(lua_State *L)
{
	return registered(L, send_params(L, 2, 3, 1, 0));
}

static int l_prepared_register(lua_State *L)
{
	return registered(L, send_params(L, 2, 3, 1, 1));
}

/*
 * core.wait_send(conn, sql, binary|nil, params...) and
 * core.wait_prepared(conn, name, binary|nil, params...) -> rows | nil, err
 * | false: the query, with the running task parked here until its outcome
 * resumes it (loop.c: tasks parked in C).  A send that fails returns
 * (nil, err) at once.  false, with nothing sent, where the task may not
 * park (pgc_can_park): the caller then waits with task.await.
 */
static int wait_params(lua_State *L, int prepared)
{
	pgc_conn *c = conn_at(L, 1);
	if (!pgc_can_park(c->loop, L)) {
		lua_pushboolean(L, 0);
		return 1;
	}
	/* (as the register functions have it: the callback, then the rest) */
	lua_pushthread(L);
	lua_insert(L, 1);
	if (send_on(L, c, 2, 3, 1, prepared) == 2)
		return 2;
	return lua_yield(L, 0);
}

static int l_wait_send(lua_State *L)
{
	return wait_params(L, 0);
}

static int l_wait_prepared(lua_State *L)
{
	return wait_params(L, 1);
}

/* conn:send_script(sql, callback): several statements, no parameters. */
static int conn_send_script(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	const char *sql = check_sql(L, 2);
	luaL_checktype(L, 3, LUA_TFUNCTION);
	check_ready(L, c);
	return sent(L, c, PQsendQuery(c->pg, sql), 1, 3);
}

/* ---- the rest of the handle ---------------------------------------- */

/*
 * conn:on_notify(fn [, "json"]): fn(channel, payload, pid) for each
 * notification; with "json", a payload that is JSON comes decoded (with no
 * Lua string made of it on the way), as core.json_decode_payload has it.
 * nil for fn stops the calls.
 */
static int conn_on_notify(lua_State *L)
{
	static const char *const forms[] = {"text", "json", NULL};
	pgc_conn *c = check_conn(L);
	int json = luaL_checkoption(L, 3, "text", forms);
	pgc_unref(L, &c->notify_ref);
	c->notify_json = json;
	if (!lua_isnoneornil(L, 2)) {
		luaL_checktype(L, 2, LUA_TFUNCTION);
		if (c->state != CLOSED)
			c->notify_ref = pgc_ref(L, 2);
	}
	return 0;
}

/*
 * conn:route_notify(routes, fn): notifications on a channel that is a key
 * of the table routes go to fn(routes[channel], payloads, n) instead of
 * on_notify's function: payloads[1..n] are those heard in a row on that
 * channel, decoded as on_notify says, in order (the table is lent for the
 * call: it is emptied and used again after).  routes is read (raw) for
 * each run, so it may change; nil stops it.
 */
static int conn_route_notify(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	int routing = !lua_isnoneornil(L, 2);
	if (routing) {
		luaL_checktype(L, 2, LUA_TTABLE);
		luaL_checktype(L, 3, LUA_TFUNCTION);
	}
	pgc_unref(L, &c->routes_ref);
	pgc_unref(L, &c->routed_ref);
	if (routing && c->state != CLOSED) {
		c->routes_ref = pgc_ref(L, 2);
		c->routed_ref = pgc_ref(L, 3);
	}
	return 0;
}

/* conn:notifications(): how many notifications it has heard, routed or not. */
static int conn_notifications(lua_State *L)
{
	lua_pushinteger(L, check_conn(L)->notifications);
	return 1;
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
	shut(c, "connection closed");
	drop_refs(L, c);
	if (take_callback(L, c, 1)) {
		lua_pushnil(L);
		pgc_push_error(L, "08003", "connection closed while a query was running");
		call_waiter(L, c, 2);
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
 * conn:check([fresh]) -> boolean: reads what an idle connection's socket
 * holds right now, so a connection the server closed (a restart, a
 * terminated backend) is found dead before it is handed out, even when
 * the loop has not run since.  A dead one is closed without callbacks.
 * One released less than fresh seconds ago is taken as alive unread: the
 * read is a syscall, and a pool hands a connection out again and again.
 */
static int conn_check(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	double fresh = luaL_optnumber(L, 2, 0);
	if (fresh > 0 && c->state == READY && pgc_now() - c->released < fresh) {
		lua_pushboolean(L, 1);
		return 1;
	}
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

static int reusable(pgc_conn *c)
{
	return c->state == READY && PQtransactionStatus(c->pg) == PQTRANS_IDLE;
}

/* conn:reusable(): idle, outside any transaction: fit to go back to a pool. */
static int conn_reusable(lua_State *L)
{
	lua_pushboolean(L, reusable(check_conn(L)));
	return 1;
}

/*
 * conn:release() -> conn:reusable(), the connection going back to its
 * pool: when it is, the time is kept for conn:check(fresh).
 */
static int conn_release(lua_State *L)
{
	pgc_conn *c = check_conn(L);
	int ok = reusable(c);
	if (ok)
		c->released = pgc_now();
	lua_pushboolean(L, ok);
	return 1;
}

static int conn_gc(lua_State *L)
{
	pgc_conn *c = luaL_checkudata(L, 1, CONN_META);
	shut(c, "connection closed");
	PQclear(c->delivering);
	c->delivering = NULL;
	drop_refs(L, c);
	c->waiting = 0;	/* (the user value goes with the userdata) */
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
	{"route_notify", conn_route_notify},
	{"notifications", conn_notifications},
	{"on_close", conn_on_close},
	{"on_notice", conn_on_notice},
	{"close", conn_close},
	{"status", conn_status},
	{"backend_pid", conn_backend_pid},
	{"parameter", conn_parameter},
	{"in_transaction", conn_in_transaction},
	{"reusable", conn_reusable},
	{"release", conn_release},
	{"check", conn_check},
	{NULL, NULL}
};

static const luaL_Reg conn_funcs[] = {
	{"connect", l_connect},
	{"send_register", l_send_register},
	{"prepared_register", l_prepared_register},
	{"wait_send", l_wait_send},
	{"wait_prepared", l_wait_prepared},
	{NULL, NULL}
};

void pgc_open_pgconn(lua_State *L)
{
	luaL_newmetatable(L, CONN_META);
	int meta = lua_gettop(L);
	luaL_newlibtable(L, conn_methods);
	lua_pushvalue(L, meta);
	luaL_setfuncs(L, conn_methods, 1);
	lua_setfield(L, meta, "__index");
	lua_pushcfunction(L, conn_gc);
	lua_setfield(L, meta, "__gc");
	luaL_setfuncs(L, conn_funcs, 1);	/* (the metatable as their upvalue too) */
}

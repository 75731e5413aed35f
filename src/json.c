/*
 * json.c -- a JSON encoder that keeps Lua 5.4 integers exact.
 *
 * lua-cjson 2.1 prints every number with %.14g and reads every number as
 * a float, which silently rounds integers past 10^14 on the way out and
 * past 2^53 on the way in (ids, epoch microseconds), and turns 42 into
 * 42.0.  Values must not change on their way through the database, so
 * both directions are here; JSON null is a NULL light userdata, the same
 * value as cjson.null.
 *
 * A table is an array when its keys are exactly 1..n (n > 0), else an
 * object whose keys are strings or numbers; an empty table is {}, unless
 * its metatable has __jsonarray (pgcoord.json.array), then [].  NaN and
 * infinities are refused (JSON has no spelling for them).
 *
 * Decoding never yields what encoding would refuse: a number too large for
 * a double raises instead of becoming inf, and a lone surrogate escape
 * becomes U+FFFD instead of bytes that are not UTF-8 (see below).
 */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pgcoord.h"

#define MAX_DEPTH 128
#define JBUF_META "pgcoord.json_buffer"

/*
 * The encoder's own buffer, not luaL_Buffer: the encoder pushes values
 * while it writes, and luaL_Buffer needs its box at the top of the stack.
 * The userdata frees the memory if encoding raises.  (The decoder pushes
 * nothing while it builds a string, so it uses luaL_Buffer.)
 */
typedef struct jbuf {
	char *p;
	size_t len, cap;
} jbuf;

static void jb_add(lua_State *L, jbuf *b, const char *s, size_t n)
{
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap < b->len + n)
			cap *= 2;
		char *p = realloc(b->p, cap);
		if (p == NULL)
			luaL_error(L, "out of memory encoding JSON");
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
}

static void jb_char(lua_State *L, jbuf *b, char c)
{
	jb_add(L, b, &c, 1);
}

static void jb_str(lua_State *L, jbuf *b, const char *s)
{
	jb_add(L, b, s, strlen(s));
}

static int jbuf_gc(lua_State *L)
{
	jbuf *b = lua_touserdata(L, 1);
	free(b->p);
	b->p = NULL;
	return 0;
}

static void encode(lua_State *L, jbuf *b, int idx, int depth);

static void add_string(lua_State *L, jbuf *b, const char *s, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	jb_char(L, b, '"');
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		switch (c) {
		case '"': jb_str(L, b, "\\\""); break;
		case '\\': jb_str(L, b, "\\\\"); break;
		case '\n': jb_str(L, b, "\\n"); break;
		case '\r': jb_str(L, b, "\\r"); break;
		case '\t': jb_str(L, b, "\\t"); break;
		default:
			if (c < 0x20) {
				char esc[7] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15], 0};
				jb_str(L, b, esc);
			} else {
				jb_char(L, b, (char)c);
			}
		}
	}
	jb_char(L, b, '"');
}

static void add_number(lua_State *L, jbuf *b, int idx)
{
	char buf[64];
	if (lua_isinteger(L, idx)) {
		jb_str(L, b, pgc_format_integer(lua_tointeger(L, idx), buf, sizeof buf));
		return;
	}
	double d = lua_tonumber(L, idx);
	if (isnan(d) || isinf(d))
		luaL_error(L, "cannot encode %f as JSON", d);
	pgc_format_double(d, buf, sizeof buf);
	jb_str(L, b, buf);
}

/* Length n when the table's keys are exactly 1..n (0 when empty), else -1. */
static lua_Integer array_length(lua_State *L, int idx)
{
	lua_Integer n = 0, max = 0;
	lua_pushnil(L);
	while (lua_next(L, idx)) {
		lua_pop(L, 1);
		if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1) {
			lua_pop(L, 1);
			return -1;
		}
		lua_Integer k = lua_tointeger(L, -1);
		if (k > max)
			max = k;
		n++;
	}
	return n == max ? n : -1;
}

static void encode_table(lua_State *L, jbuf *b, int idx, int depth)
{
	if (depth > MAX_DEPTH)
		luaL_error(L, "cannot encode a table nested deeper than %d (a cycle?)", MAX_DEPTH);
	luaL_checkstack(L, 6, "JSON nesting");
	lua_Integer n = array_length(L, idx);
	int as_array = n > 0;
	/* pgcoord.json.array(t) marks a list, so that an empty one is [] */
	if (n == 0 && luaL_getmetafield(L, idx, "__jsonarray") != LUA_TNIL) {
		lua_pop(L, 1);
		as_array = 1;
	}
	if (as_array) {
		jb_char(L, b, '[');
		for (lua_Integer i = 1; i <= n; i++) {
			if (i > 1)
				jb_char(L, b, ',');
			lua_rawgeti(L, idx, i);
			encode(L, b, lua_gettop(L), depth + 1);
			lua_pop(L, 1);
		}
		jb_char(L, b, ']');
		return;
	}
	jb_char(L, b, '{');
	int first = 1;
	lua_pushnil(L);
	while (lua_next(L, idx)) {
		int kt = lua_type(L, -2);
		if (kt != LUA_TSTRING && kt != LUA_TNUMBER)
			luaL_error(L, "cannot encode a table key of type %s as JSON", lua_typename(L, kt));
		if (!first)
			jb_char(L, b, ',');
		first = 0;
		size_t len;
		lua_pushvalue(L, -2);
		const char *k = lua_tolstring(L, -1, &len);	/* converts the copy only */
		add_string(L, b, k, len);
		lua_pop(L, 1);
		jb_char(L, b, ':');
		encode(L, b, lua_gettop(L), depth + 1);
		lua_pop(L, 1);
	}
	jb_char(L, b, '}');
}

static void encode(lua_State *L, jbuf *b, int idx, int depth)
{
	size_t len;
	const char *s;
	switch (lua_type(L, idx)) {
	case LUA_TNIL:
		jb_str(L, b, "null");
		return;
	case LUA_TBOOLEAN:
		jb_str(L, b, lua_toboolean(L, idx) ? "true" : "false");
		return;
	case LUA_TNUMBER:
		add_number(L, b, idx);
		return;
	case LUA_TSTRING:
		s = lua_tolstring(L, idx, &len);
		add_string(L, b, s, len);
		return;
	case LUA_TTABLE:
		encode_table(L, b, idx, depth);
		return;
	case LUA_TLIGHTUSERDATA:
		if (lua_touserdata(L, idx) == NULL) {	/* cjson.null, pgcoord.null */
			jb_str(L, b, "null");
			return;
		}
		break;
	}
	luaL_error(L, "cannot encode a %s as JSON", luaL_typename(L, idx));
}

/* core.json_encode(value) -> string; raises naming what cannot be encoded. */
int pgc_json_encode(lua_State *L)
{
	luaL_checkany(L, 1);
	lua_settop(L, 1);
	jbuf *b = lua_newuserdatauv(L, sizeof *b, 0);
	b->p = NULL;
	b->len = b->cap = 0;
	luaL_setmetatable(L, JBUF_META);
	encode(L, b, 1, 0);
	lua_pushlstring(L, b->p, b->len);
	return 1;
}

/* ---- decoding ------------------------------------------------------ */

typedef struct jreader {
	const char *p, *end, *start;
	jmp_buf *bail;	/* where a failure jumps instead of raising, if set */
} jreader;

static void decode_value(lua_State *L, jreader *r, int depth);

static int jfail(lua_State *L, jreader *r, const char *what)
{
	if (r->bail != NULL)
		longjmp(*r->bail, 1);
	return luaL_error(L, "invalid JSON at byte %d: %s", (int)(r->p - r->start) + 1, what);
}

static void skip_space(jreader *r)
{
	while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
		r->p++;
}

static int hex4(lua_State *L, jreader *r)
{
	if (r->end - r->p < 4)
		jfail(L, r, "short \\u escape");
	int v = 0;
	for (int i = 0; i < 4; i++) {
		char c = *r->p++;
		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= c - '0';
		else if (c >= 'a' && c <= 'f')
			v |= c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v |= c - 'A' + 10;
		else
			jfail(L, r, "bad \\u escape");
	}
	return v;
}

static void add_utf8(luaL_Buffer *b, unsigned cp)
{
	char u[4];
	size_t n;
	if (cp < 0x80) {
		u[0] = (char)cp;
		n = 1;
	} else if (cp < 0x800) {
		u[0] = (char)(0xC0 | (cp >> 6));
		u[1] = (char)(0x80 | (cp & 0x3F));
		n = 2;
	} else if (cp < 0x10000) {
		u[0] = (char)(0xE0 | (cp >> 12));
		u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
		u[2] = (char)(0x80 | (cp & 0x3F));
		n = 3;
	} else {
		u[0] = (char)(0xF0 | (cp >> 18));
		u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
		u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
		u[3] = (char)(0x80 | (cp & 0x3F));
		n = 4;
	}
	luaL_addlstring(b, u, n);
}

/*
 * \uD800-\uDFFF are the halves of a UTF-16 pair: a high half followed by a
 * low one is one code point.  A half on its own has no UTF-8 form; it
 * becomes U+FFFD, the replacement character, so that the string stays valid
 * UTF-8 and the row stays readable (PostgreSQL's json type keeps "\ud800"
 * as written; only jsonb refuses it).  r->p is just past the first half.
 */
static unsigned surrogate(lua_State *L, jreader *r, unsigned first)
{
	if (first < 0xDC00 && r->end - r->p >= 6 && r->p[0] == '\\' && r->p[1] == 'u') {
		const char *next = r->p;
		r->p += 2;
		unsigned lo = (unsigned)hex4(L, r);
		if (lo >= 0xDC00 && lo < 0xE000)
			return 0x10000 + ((first - 0xD800) << 10) + (lo - 0xDC00);
		r->p = next;	/* not a low half: it is decoded on its own */
	}
	return 0xFFFD;
}

/* Pushes the string at r->p (just past the opening quote). */
static void decode_string(lua_State *L, jreader *r)
{
	const char *run = r->p;
	while (r->p < r->end && *r->p != '"' && *r->p != '\\' && (unsigned char)*r->p >= 0x20)
		r->p++;
	if (r->p < r->end && *r->p == '"') {	/* no escapes: the common case */
		lua_pushlstring(L, run, (size_t)(r->p - run));
		r->p++;
		return;
	}
	luaL_Buffer b;
	luaL_buffinit(L, &b);
	luaL_addlstring(&b, run, (size_t)(r->p - run));
	for (;;) {
		if (r->p >= r->end)
			jfail(L, r, "unterminated string");
		unsigned char c = (unsigned char)*r->p++;
		if (c == '"')
			break;
		if (c < 0x20)
			jfail(L, r, "control character in string");
		if (c != '\\') {
			luaL_addchar(&b, (char)c);
			continue;
		}
		if (r->p >= r->end)
			jfail(L, r, "unterminated string");
		char e = *r->p++;
		switch (e) {
		case '"': luaL_addchar(&b, '"'); break;
		case '\\': luaL_addchar(&b, '\\'); break;
		case '/': luaL_addchar(&b, '/'); break;
		case 'b': luaL_addchar(&b, '\b'); break;
		case 'f': luaL_addchar(&b, '\f'); break;
		case 'n': luaL_addchar(&b, '\n'); break;
		case 'r': luaL_addchar(&b, '\r'); break;
		case 't': luaL_addchar(&b, '\t'); break;
		case 'u': {
			unsigned cp = (unsigned)hex4(L, r);
			if (cp >= 0xD800 && cp < 0xE000)
				cp = surrogate(L, r, cp);
			add_utf8(&b, cp);
			break;
		}
		default:
			jfail(L, r, "bad escape");
		}
	}
	luaL_pushresult(&b);
}

/* Skips the digits at r->p; returns how many there were. */
static size_t skip_digits(jreader *r)
{
	const char *s = r->p;
	while (r->p < r->end && *r->p >= '0' && *r->p <= '9')
		r->p++;
	return (size_t)(r->p - s);
}

/*
 * JSON's number grammar.  An integer that fits in 64 bits stays an exact
 * integer; a longer one (123456789012345678901234567890) becomes the
 * nearest float, as do numbers with a fraction or an exponent.  A number
 * too large for a double (1e400, which numeric and jsonb hold) raises
 * rather than turning into inf, a value that cannot even be encoded back;
 * one too small for a double (1e-400) becomes 0.0.
 */
static void decode_number(lua_State *L, jreader *r)
{
	const char *s = r->p;
	int is_float = 0;
	if (r->p < r->end && *r->p == '-')
		r->p++;
	const char *int_part = r->p;
	size_t n = skip_digits(r);
	if (n == 0 || (n > 1 && *int_part == '0'))
		jfail(L, r, n == 0 ? "bad number" : "bad number (a leading zero)");
	if (r->p < r->end && *r->p == '.') {
		r->p++;
		if (skip_digits(r) == 0)
			jfail(L, r, "bad number (no digits after '.')");
		is_float = 1;
	}
	if (r->p < r->end && (*r->p == 'e' || *r->p == 'E')) {
		r->p++;
		if (r->p < r->end && (*r->p == '+' || *r->p == '-'))
			r->p++;
		if (skip_digits(r) == 0)
			jfail(L, r, "bad number (no digits in the exponent)");
		is_float = 1;
	}
	if (!is_float && n <= 18) {	/* cannot overflow: no strtoll needed */
		lua_Integer v = 0;
		for (const char *d = int_part; d < int_part + n; d++)
			v = v * 10 + (*d - '0');
		lua_pushinteger(L, int_part > s ? -v : v);
		return;
	}
	/* strtoll and strtod need a terminated copy; a long one goes on the stack */
	size_t len = (size_t)(r->p - s);
	char buf[64];
	const char *text = buf;
	if (len < sizeof buf) {
		memcpy(buf, s, len);
		buf[len] = '\0';
	} else {
		text = lua_pushlstring(L, s, len);
	}
	double d = 0;
	int is_integer = 0;
	lua_Integer v = 0;
	if (!is_float) {
		errno = 0;
		v = (lua_Integer)strtoll(text, NULL, 10);
		is_integer = errno == 0;	/* else beyond 64 bits: a float */
	}
	if (!is_integer)
		d = strtod(text, NULL);
	if (text != buf)
		lua_pop(L, 1);
	if (is_integer) {
		lua_pushinteger(L, v);
		return;
	}
	if (isinf(d)) {
		r->p = s;
		jfail(L, r, "number too large for a double");
	}
	lua_pushnumber(L, d);
}

static void expect_word(lua_State *L, jreader *r, const char *word)
{
	size_t n = strlen(word);
	if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0)
		jfail(L, r, "unexpected character");
	r->p += n;
}

static void decode_container(lua_State *L, jreader *r, int depth, int is_array)
{
	if (depth > MAX_DEPTH)
		jfail(L, r, "nested too deep");
	luaL_checkstack(L, 6, "JSON nesting");
	char close = is_array ? ']' : '}';
	r->p++;
	skip_space(r);
	if (r->p < r->end && *r->p == close) {
		r->p++;
		lua_newtable(L);
		return;
	}
	/* room for the first element: most payloads are small objects, and
	 * growing a table from nothing costs a resize */
	lua_createtable(L, is_array, !is_array);
	int t = lua_gettop(L);
	lua_Integer n = 0;
	for (;;) {
		skip_space(r);
		if (!is_array) {
			if (r->p >= r->end || *r->p != '"')
				jfail(L, r, "expected a string key");
			r->p++;
			decode_string(L, r);
			skip_space(r);
			if (r->p >= r->end || *r->p != ':')
				jfail(L, r, "expected ':'");
			r->p++;
		}
		decode_value(L, r, depth + 1);
		if (is_array)
			lua_rawseti(L, t, ++n);
		else
			lua_rawset(L, t);
		skip_space(r);
		if (r->p < r->end && *r->p == ',') {
			r->p++;
			continue;
		}
		if (r->p < r->end && *r->p == close) {
			r->p++;
			return;
		}
		jfail(L, r, is_array ? "expected ',' or ']'" : "expected ',' or '}'");
	}
}

static void decode_value(lua_State *L, jreader *r, int depth)
{
	skip_space(r);
	if (r->p >= r->end)
		jfail(L, r, "unexpected end");
	switch (*r->p) {
	case '{': decode_container(L, r, depth, 0); return;
	case '[': decode_container(L, r, depth, 1); return;
	case '"':
		r->p++;
		decode_string(L, r);
		return;
	case 't': expect_word(L, r, "true"); lua_pushboolean(L, 1); return;
	case 'f': expect_word(L, r, "false"); lua_pushboolean(L, 0); return;
	case 'n': expect_word(L, r, "null"); lua_pushlightuserdata(L, NULL); return;
	default: decode_number(L, r); return;
	}
}

/* Pushes the value r's whole text holds. */
static void decode_text(lua_State *L, jreader *r)
{
	decode_value(L, r, 0);
	skip_space(r);
	if (r->p != r->end)
		jfail(L, r, "trailing characters");
}

/* core.json_decode(text) -> value; raises naming the byte where it failed. */
int pgc_json_decode(lua_State *L)
{
	size_t len;
	const char *s = luaL_checklstring(L, 1, &len);
	lua_settop(L, 1);
	jreader r = {s, s + len, s, NULL};
	decode_text(L, &r);
	return 1;
}

/* Whether s can start a JSON value: what else the decoder would refuse. */
static int starts_value(const char *s, size_t len)
{
	jreader r = {s, s + len, s, NULL};
	skip_space(&r);
	return r.p < r.end && *r.p != '\0' && strchr("{[\"tfn-0123456789", *r.p) != NULL;
}

/*
 * Pushes the value of a notification's payload s and returns 1 when it is
 * JSON; pushes nothing and returns 0 when it is not (nor ""): how a payload
 * reaches listeners.  A payload that is not JSON makes no error: the
 * decoder jumps back here instead, which costs less than the decoding,
 * where a pcall cost a quarter of it.  (The jump is from our own code,
 * between Lua API calls; lua_settop then drops what the decoding pushed,
 * a string buffer's box too.)
 */
int pgc_json_push_payload(lua_State *L, const char *s, size_t len)
{
	if (!starts_value(s, len))
		return 0;
	int top = lua_gettop(L);
	jmp_buf bail;
	jreader r = {s, s + len, s, &bail};
	if (setjmp(bail) != 0) {
		lua_settop(L, top);
		return 0;
	}
	decode_text(L, &r);
	return 1;
}

/* core.json_decode_payload(payload) -> its value, or the payload itself
 * when it is not JSON (nil and "" too). */
static int json_decode_payload(lua_State *L)
{
	lua_settop(L, 1);
	size_t len;
	const char *s = lua_type(L, 1) == LUA_TSTRING ? lua_tolstring(L, 1, &len) : NULL;
	if (s != NULL)
		pgc_json_push_payload(L, s, len);
	return 1;	/* (the value pushed, else the payload) */
}

static const luaL_Reg json_funcs[] = {
	{"json_encode", pgc_json_encode},
	{"json_decode", pgc_json_decode},
	{"json_decode_payload", json_decode_payload},
	{NULL, NULL}
};

void pgc_open_json(lua_State *L)
{
	luaL_newmetatable(L, JBUF_META);
	lua_pushcfunction(L, jbuf_gc);
	lua_setfield(L, -2, "__gc");
	lua_pop(L, 1);
	luaL_setfuncs(L, json_funcs, 0);
}

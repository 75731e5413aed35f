/*
 * json.c -- a JSON encoder that keeps Lua 5.4 integers exact.
 *
 * lua-cjson 2.1 prints every number with %.14g, which silently rounds
 * integers past 10^14 (ids, epoch microseconds); parameters and payloads
 * must not change on the way to the database.  Decoding stays with cjson.
 *
 * A table is an array when its keys are exactly 1..n (n > 0), else an
 * object whose keys are strings or numbers; an empty table is {}.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pgcoord.h"

#define MAX_DEPTH 128
#define JBUF_META "pgcoord.json_buffer"

/*
 * Our own buffer, not luaL_Buffer: the encoder pushes values while it
 * writes, and luaL_Buffer needs its box at the top of the stack.  The
 * userdata frees the memory if encoding raises.
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
		snprintf(buf, sizeof buf, LUA_INTEGER_FMT, (LUAI_UACINT)lua_tointeger(L, idx));
	} else {
		double d = lua_tonumber(L, idx);
		if (isnan(d) || isinf(d))
			luaL_error(L, "cannot encode %f as JSON", d);
		snprintf(buf, sizeof buf, "%.17g", d);
	}
	jb_str(L, b, buf);
}

/* Length n when the table's keys are exactly 1..n, else -1. */
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
	return n > 0 && n == max ? n : -1;
}

static void encode_table(lua_State *L, jbuf *b, int idx, int depth)
{
	if (depth > MAX_DEPTH)
		luaL_error(L, "cannot encode a table nested deeper than %d (a cycle?)", MAX_DEPTH);
	luaL_checkstack(L, 6, "JSON nesting");
	lua_Integer n = array_length(L, idx);
	if (n > 0) {
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
static int l_json_encode(lua_State *L)
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

static const luaL_Reg json_funcs[] = {
	{"json_encode", l_json_encode},
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

/*
 * pgvalue.c -- Lua values to query parameters, results to Lua values.
 *
 * Parameters go as text with type OID 0, so the server infers each type
 * from the statement; a string goes as binary to a bytea parameter (the
 * caller knows which from a describe of the statement).  Results are
 * converted by column type OID.
 * JSON goes through json.c, which keeps integers exact.
 */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pgcoord.h"

enum {
	BOOLOID = 16, BYTEAOID = 17, INT8OID = 20, INT2OID = 21, INT4OID = 23,
	OIDOID = 26, JSONOID = 114, FLOAT4OID = 700, FLOAT8OID = 701,
	TIMESTAMPOID = 1114, TIMESTAMPTZOID = 1184, NUMERICOID = 1700,
	JSONBOID = 3802
};

/* ---- parameters ---------------------------------------------------- */

/* nil, or JSON's null (a NULL light userdata: pgcoord.null, cjson.null) */
static int is_null(lua_State *L, int idx)
{
	return lua_isnil(L, idx) ||
	       (lua_type(L, idx) == LUA_TLIGHTUSERDATA && lua_touserdata(L, idx) == NULL);
}

/*
 * v in decimal, NUL-terminated, written backwards into buf; returns where
 * it starts.  snprintf costs more than a batch of ids is worth.
 */
char *pgc_format_integer(lua_Integer v, char *buf, size_t size)
{
	/* two digits a division: a batch's epoch microseconds have sixteen */
	static const char pairs[] =
		"00010203040506070809101112131415161718192021222324252627282930313233343536373839"
		"40414243444546474849505152535455565758596061626364656667686970717273747576777879"
		"8081828384858687888990919293949596979899";
	unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
	char *p = buf + size - 1;	/* size >= PGC_INTEGER_BUF */
	*p = '\0';
	while (u >= 100) {
		const char *d = pairs + 2 * (u % 100);
		u /= 100;
		*--p = d[1];
		*--p = d[0];
	}
	if (u >= 10) {
		*--p = pairs[2 * u + 1];
		*--p = pairs[2 * u];
	} else {
		*--p = (char)('0' + u);
	}
	if (v < 0)
		*--p = '-';
	return p;
}

/* The shortest text that reads back as the same double (0.1, not 0.10000000000000001). */
void pgc_format_double(double d, char *buf, size_t size)
{
	/* whole numbers (ids, counts, epoch seconds) skip the round trip */
	if (fabs(d) < 1e15 && d == (double)(long long)d && !(d == 0 && signbit(d))) {
		char digits[PGC_INTEGER_BUF];
		snprintf(buf, size, "%s", pgc_format_integer((lua_Integer)d, digits, sizeof digits));
		return;
	}
	for (int prec = 15; prec <= 17; prec++) {
		snprintf(buf, size, "%.*g", prec, d);
		if (strtod(buf, NULL) == d)
			return;
	}
}

static const char *number_text(lua_State *L, int idx)
{
	char buf[64];
	if (lua_isinteger(L, idx))
		return lua_pushstring(L, pgc_format_integer(lua_tointeger(L, idx), buf, sizeof buf));
	double d = lua_tonumber(L, idx);
	if (isnan(d))
		return lua_pushliteral(L, "NaN");
	if (isinf(d))
		return lua_pushstring(L, d > 0 ? "Infinity" : "-Infinity");
	pgc_format_double(d, buf, sizeof buf);
	return lua_pushstring(L, buf);
}

/*
 * A bad parameter: the message names it, never a line of db.lua (where
 * luaL_error would place it: the Lua function that sent the query).
 */
static int param_error(lua_State *L, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	lua_pushvfstring(L, fmt, ap);
	va_end(ap);
	return lua_error(L);
}

static const char *json_text(lua_State *L, int idx, int pos)
{
	lua_pushcfunction(L, pgc_json_encode);
	lua_pushvalue(L, idx);
	if (lua_pcall(L, 1, 1, 0) != LUA_OK)
		param_error(L, "pgcoord: parameter $%d cannot be encoded as JSON: %s", pos,
			   lua_tostring(L, -1));
	return lua_tostring(L, -1);
}

/*
 * Fills p from stack slots first..last.  Converted strings are pushed on
 * the stack, so they live until the calling C function returns.  binary,
 * when given, has a character per parameter of the statement, '1' where
 * the server takes it as bytea: a string goes there as its bytes, whatever
 * they are, and a string with NUL bytes goes nowhere else.  Without it (the
 * types unknown) such a string goes binary, for a bytea.
 */
void pgc_params_from_stack(lua_State *L, int first, int last, const char *binary,
			   pgc_params *p)
{
	size_t nbinary = binary ? strlen(binary) : 0;
	int n = last >= first ? last - first + 1 : 0;
	luaL_checkstack(L, n + 8, "too many query parameters");
	if (n > 65535)
		param_error(L, "pgcoord: %d parameters, PostgreSQL takes at most 65535", n);
	p->n = n;
	if (n <= PGC_INLINE_PARAMS) {
		p->values = p->values_buf;
		p->lengths = p->lengths_buf;
		p->formats = p->formats_buf;
	} else {
		p->values = lua_newuserdatauv(L, sizeof(char *) * (size_t)n, 0);
		p->lengths = lua_newuserdatauv(L, sizeof(int) * (size_t)n, 0);
		p->formats = lua_newuserdatauv(L, sizeof(int) * (size_t)n, 0);
	}
	for (int i = 0; i < n; i++) {
		int idx = first + i;
		size_t len = 0;
		const char *v = NULL;
		p->formats[i] = 0;
		switch (lua_type(L, idx)) {
		case LUA_TNIL:
		case LUA_TLIGHTUSERDATA:
			if (!is_null(L, idx))
				param_error(L, "pgcoord: parameter $%d: cannot send a userdata", i + 1);
			break;
		case LUA_TBOOLEAN:
			v = lua_toboolean(L, idx) ? "t" : "f";
			break;
		case LUA_TNUMBER:
			v = number_text(L, idx);
			break;
		case LUA_TSTRING:
			v = lua_tolstring(L, idx, &len);
			if ((size_t)i < nbinary && binary[i] == '1') {
				p->formats[i] = 1;
			} else if (memchr(v, '\0', len) != NULL) {
				/* as binary, "\0\0\0\1" would read as the int 1 */
				if ((size_t)i < nbinary)
					param_error(L, "pgcoord: parameter $%d: a string with NUL bytes "
						   "can only go to a bytea parameter", i + 1);
				p->formats[i] = 1;
			}
			break;
		case LUA_TTABLE:
			v = json_text(L, idx, i + 1);
			break;
		default:
			param_error(L, "pgcoord: parameter $%d: cannot send a %s to PostgreSQL",
				   i + 1, luaL_typename(L, idx));
		}
		if (len > 0x7fffffff)
			param_error(L, "pgcoord: parameter $%d is too long", i + 1);
		p->values[i] = v;
		p->lengths[i] = (int)len;
	}
}

/* ---- results ------------------------------------------------------- */

static long long days_from_civil(long long y, int m, int d)
{
	y -= m <= 2;
	long long era = (y >= 0 ? y : y - 399) / 400;
	long long yoe = y - era * 400;
	long long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
	long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + doe - 719468;
}

/*
 * The unsigned decimal at *s, which moves past its digits; -1 when there
 * is none, or more than 18 (no field of the server's text has that many).
 * strtol's locale and base handling cost more than a row is worth.
 */
static long long read_digits(const char **s)
{
	const char *p = *s;
	long long v = 0;
	int n = 0;
	for (; *p >= '0' && *p <= '9'; p++, n++) {
		if (n == 18)
			return -1;
		v = v * 10 + (*p - '0');
	}
	*s = p;
	return n == 0 ? -1 : v;
}

/* The server's text of an integer (int2, int4, int8, oid): [-]digits. */
static lua_Integer parse_integer(const char *s)
{
	int negative = *s == '-';
	unsigned long long u = 0;
	for (s += negative; *s >= '0' && *s <= '9'; s++)
		u = u * 10 + (unsigned long long)(*s - '0');
	/* (wraps to the exact value for the int8 minimum too) */
	return (lua_Integer)(negative ? 0ULL - u : u);
}

/* "YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]][ BC]" -> epoch seconds. */
static int parse_timestamp(const char *s, double *out)
{
	if (*s < '0' || *s > '9') {
		if (strcmp(s, "infinity") != 0 && strcmp(s, "-infinity") != 0)
			return 0;
		*out = s[0] == '-' ? -HUGE_VAL : HUGE_VAL;
		return 1;
	}
	const char *end = s;
	long long year = read_digits(&end);
	if (year < 0 || year > 1000000 || *end++ != '-')	/* the server's end: 294276 */
		return 0;
	long long mon = read_digits(&end);
	if (mon < 0 || *end++ != '-')
		return 0;
	long long day = read_digits(&end);
	if (day < 0 || (*end != ' ' && *end != 'T'))
		return 0;
	end++;
	long long hour = read_digits(&end);
	if (hour < 0 || *end++ != ':')
		return 0;
	long long min = read_digits(&end);
	if (min < 0 || *end++ != ':')
		return 0;
	/* seconds as whole microseconds: the server never sends more than
	 * six decimals */
	long long sec = read_digits(&end);
	if (sec < 0)
		return 0;
	long long usec = sec * 1000000LL;
	if (*end == '.') {
		long long scale = 100000;
		for (end++; *end >= '0' && *end <= '9'; end++, scale /= 10)
			usec += (*end - '0') * scale;
	}
	long long offset = 0;
	if (*end == '+' || *end == '-') {
		int sign = *end == '-' ? -1 : 1;
		long long part[3] = {0, 0, 0};
		for (int i = 0; i < 3; i++) {
			end++;
			part[i] = read_digits(&end);
			if (part[i] < 0)
				return 0;
			if (*end != ':')
				break;
		}
		offset = sign * (part[0] * 3600 + part[1] * 60 + part[2]);
	}
	if (strcmp(end, " BC") == 0)
		year = 1 - year;
	else if (*end != '\0')
		return 0;
	long long days = days_from_civil(year, (int)mon, (int)day);
	long long whole = days * 86400 + hour * 3600 + min * 60 - offset;
	/* in whole microseconds the result is rounded once; past 2^63 of
	 * them (the last days of 294276 AD) the two parts add as doubles */
	if (whole > LLONG_MAX / 1000000 - 1 || whole < LLONG_MIN / 1000000 + 1)
		*out = (double)whole + (double)usec / 1e6;
	else
		*out = (double)(whole * 1000000LL + usec) / 1e6;
	return 1;
}

static void push_json(lua_State *L, const char *v, int len)
{
	lua_pushcfunction(L, pgc_json_decode);
	lua_pushlstring(L, v, (size_t)len);
	lua_call(L, 1, 1);
}

static void push_bytea(lua_State *L, const char *v)
{
	size_t len;
	unsigned char *bytes = PQunescapeBytea((const unsigned char *)v, &len);
	if (bytes == NULL)
		luaL_error(L, "pgcoord: out of memory decoding bytea");
	lua_pushlstring(L, (const char *)bytes, len);
	PQfreemem(bytes);
}

/*
 * Text (and types not converted) as a string.  A column often holds the
 * row before's value (a claim's job type and group), kept in stack slot
 * last: the same string again costs a compare, not a hash and a lookup.
 */
static void push_text(lua_State *L, const char *v, int len, int last)
{
	size_t n;
	const char *prev = lua_tolstring(L, last, &n);
	if (prev != NULL && n == (size_t)len && memcmp(prev, v, n) == 0) {
		lua_pushvalue(L, last);
		return;
	}
	lua_pushlstring(L, v, (size_t)len);
	lua_copy(L, -1, last);
}

static void push_value(lua_State *L, const PGresult *res, int row, int col, Oid type,
		       int last)
{
	const char *v = PQgetvalue(res, row, col);
	double d;
	switch (type) {
	case BOOLOID:
		lua_pushboolean(L, v[0] == 't');
		return;
	case INT2OID:
	case INT4OID:
	case INT8OID:
	case OIDOID:
		lua_pushinteger(L, parse_integer(v));
		return;
	case FLOAT4OID:
	case FLOAT8OID:
		lua_pushnumber(L, strtod(v, NULL));
		return;
	case NUMERICOID:
		if (lua_stringtonumber(L, v) == 0)
			lua_pushnumber(L, strtod(v, NULL));	/* NaN, Infinity */
		return;
	case JSONOID:
	case JSONBOID:
		push_json(L, v, PQgetlength(res, row, col));
		return;
	case TIMESTAMPOID:
	case TIMESTAMPTZOID:
		if (parse_timestamp(v, &d)) {
			lua_pushnumber(L, d);
			return;
		}
		break;
	case BYTEAOID:
		push_bytea(L, v);
		return;
	}
	push_text(L, v, PQgetlength(res, row, col), last);
}

/* rows = { {col = value, ...}, ..., affected = n }; NULL leaves a key out. */
void pgc_push_result(lua_State *L, const PGresult *res)
{
	int nrows = PQntuples(res), ncols = PQnfields(res);
	luaL_checkstack(L, 2 * ncols + 8, "too many result columns");
	lua_createtable(L, nrows, 1);
	int rows = lua_gettop(L);
	/* the column names, then each column's last text value (push_text) */
	for (int c = 0; c < ncols; c++)
		lua_pushstring(L, PQfname(res, c));
	for (int c = 0; c < ncols; c++)
		lua_pushnil(L);
	/* the first COLUMNS columns' types, and a row's NULLs, read once
	 * (past them, asked again) */
	enum { COLUMNS = 64 };
	Oid types[COLUMNS];
	char null[COLUMNS];
	for (int c = 0; c < ncols && c < COLUMNS; c++)
		types[c] = PQftype(res, c);
	for (int r = 0; r < nrows; r++) {
		/* sized for the columns that are not NULL: a table's hash part
		 * doubles past a power of two, and rows are made by the thousand */
		int present = 0;
		for (int c = 0; c < ncols; c++) {
			int is_null = PQgetisnull(res, r, c);
			if (c < COLUMNS)
				null[c] = (char)is_null;
			present += !is_null;
		}
		lua_createtable(L, 0, present);
		for (int c = 0; c < ncols; c++) {
			if (c < COLUMNS ? null[c] : PQgetisnull(res, r, c))
				continue;
			lua_pushvalue(L, rows + 1 + c);
			push_value(L, res, r, c, c < COLUMNS ? types[c] : PQftype(res, c),
				   rows + 1 + ncols + c);
			lua_rawset(L, -3);
		}
		lua_rawseti(L, rows, r + 1);
	}
	lua_settop(L, rows);
	/* the count libpq has as text: digits only ("" when there is none) */
	lua_Integer affected = 0;
	for (const char *d = PQcmdTuples((PGresult *)res); *d >= '0' && *d <= '9'; d++)
		affected = affected * 10 + (*d - '0');
	lua_pushinteger(L, affected);
	lua_setfield(L, rows, "affected");
}

/* ---- errors -------------------------------------------------------- */

static void set_field(lua_State *L, const char *name, const char *value)
{
	if (value == NULL || value[0] == '\0')
		return;
	lua_pushstring(L, value);
	lua_setfield(L, -2, name);
}

void pgc_push_error(lua_State *L, const char *sqlstate, const char *message)
{
	lua_createtable(L, 0, 2);
	set_field(L, "message", message);
	set_field(L, "sqlstate", sqlstate);
	luaL_setmetatable(L, PGC_ERROR_META);
}

void pgc_push_result_error(lua_State *L, const PGresult *res)
{
	const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
	const char *sqlstate = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	if (primary == NULL) {
		/* libpq's own failures carry only the whole message */
		char *msg = strdup(PQresultErrorMessage(res));
		size_t n = msg ? strlen(msg) : 0;
		while (n > 0 && msg[n - 1] == '\n')
			msg[--n] = '\0';
		pgc_push_error(L, sqlstate ? sqlstate : "08006", msg && *msg ? msg : "query failed");
		free(msg);
		return;
	}
	pgc_push_error(L, sqlstate, primary);
	set_field(L, "severity", PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED));
	set_field(L, "detail", PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL));
	set_field(L, "hint", PQresultErrorField(res, PG_DIAG_MESSAGE_HINT));
	set_field(L, "constraint", PQresultErrorField(res, PG_DIAG_CONSTRAINT_NAME));
	set_field(L, "schema", PQresultErrorField(res, PG_DIAG_SCHEMA_NAME));
	set_field(L, "table", PQresultErrorField(res, PG_DIAG_TABLE_NAME));
	set_field(L, "column", PQresultErrorField(res, PG_DIAG_COLUMN_NAME));
	set_field(L, "position", PQresultErrorField(res, PG_DIAG_STATEMENT_POSITION));
}

/* Pushes label .. field (newlines folded), or nothing when absent. */
static int push_part(lua_State *L, const char *label, const char *field)
{
	if (lua_getfield(L, 1, field) != LUA_TSTRING) {
		lua_pop(L, 1);
		return 0;
	}
	lua_pushstring(L, label);
	lua_insert(L, -2);
	luaL_gsub(L, lua_tostring(L, -1), "\n", " ");
	lua_remove(L, -2);
	return 2;
}

/* "where: message (SQLSTATE 23505, constraint x) DETAIL: ... HINT: ...",
 * where being the caller's "file:line", as Lua puts it before a message. */
static int error_tostring(lua_State *L)
{
	luaL_checktype(L, 1, LUA_TTABLE);
	lua_settop(L, 1);
	if (push_part(L, "", "where"))
		lua_pushliteral(L, ": ");
	push_part(L, "", "message");
	if (push_part(L, " (SQLSTATE ", "sqlstate")) {
		push_part(L, ", constraint ", "constraint");
		lua_pushliteral(L, ")");
	}
	push_part(L, " DETAIL: ", "detail");
	push_part(L, " HINT: ", "hint");
	lua_concat(L, lua_gettop(L) - 1);
	return 1;
}

/* core.error(sqlstate, message) -> an error table like the server's. */
static int l_error(lua_State *L)
{
	pgc_push_error(L, luaL_optstring(L, 1, NULL), luaL_checkstring(L, 2));
	return 1;
}

/* ---- array literals --------------------------------------------------- */

/* What an array literal's elements are. */
enum elems { INT_ELEMS, TEXT_ELEMS, MICROS_ELEMS };

/*
 * "{e1,e2,...}" from list[1..n] (n defaults to #list), nil as NULL;
 * elements are integers and booleans (INT_ELEMS), strings, quoted
 * (TEXT_ELEMS), or epoch seconds written as whole microseconds, rounded
 * (MICROS_ELEMS).  Each is read and popped before it goes into the buffer,
 * which owns the stack top (a string stays alive in the list meanwhile).
 */
static int array_literal(lua_State *L, enum elems kind)
{
	int quoted = kind == TEXT_ELEMS;
	luaL_checktype(L, 1, LUA_TTABLE);
	lua_Integer n = luaL_opt(L, luaL_checkinteger, 2, (lua_Integer)lua_rawlen(L, 1));
	luaL_Buffer b;
	char digits[PGC_INTEGER_BUF];
	luaL_buffinit(L, &b);
	luaL_addchar(&b, '{');
	for (lua_Integer i = 1; i <= n; i++) {
		int type = lua_rawgeti(L, 1, i);
		size_t len = 0;
		const char *s = NULL;
		if (type == LUA_TNIL) {
			s = "NULL", len = 4;
		} else if (quoted && type == LUA_TSTRING) {
			s = lua_tolstring(L, -1, &len);
		} else if (kind == INT_ELEMS && type == LUA_TBOOLEAN) {
			s = lua_toboolean(L, -1) ? "t" : "f", len = 1;
		} else if (kind == INT_ELEMS && lua_isinteger(L, -1)) {
			s = pgc_format_integer(lua_tointeger(L, -1), digits, sizeof digits);
			len = (size_t)(digits + sizeof digits - 1 - s);
		} else if (kind == MICROS_ELEMS && type == LUA_TNUMBER &&
			   fabs(lua_tonumber(L, -1)) < 9e12) {
			/* as math.floor(t * 1e6 + 0.5) would round it */
			double us = floor(lua_tonumber(L, -1) * 1e6 + 0.5);
			s = pgc_format_integer((lua_Integer)us, digits, sizeof digits);
			len = (size_t)(digits + sizeof digits - 1 - s);
		} else {
			static const char *const wanted[] = {
				[INT_ELEMS] = "an integer or a boolean",
				[TEXT_ELEMS] = "a string",
				[MICROS_ELEMS] = "a time in epoch seconds",
			};
			return luaL_error(L, "pgcoord: array element %d is a %s, not %s", (int)i,
					  luaL_typename(L, -1), wanted[kind]);
		}
		lua_pop(L, 1);
		if (!quoted || type == LUA_TNIL) {
			/* the separator and the element in one go: ids come by the
			 * thousand */
			char *out = luaL_prepbuffsize(&b, len + 1);
			size_t k = 0;
			if (i > 1)
				out[k++] = ',';
			memcpy(out + k, s, len);
			luaL_addsize(&b, k + len);
			continue;
		}
		if (i > 1)
			luaL_addchar(&b, ',');
		luaL_addchar(&b, '"');
		for (size_t k = 0; k < len; k++) {
			if (s[k] == '"' || s[k] == '\\')
				luaL_addchar(&b, '\\');
			luaL_addchar(&b, s[k]);
		}
		luaL_addchar(&b, '"');
	}
	luaL_addchar(&b, '}');
	luaL_pushresult(&b);
	return 1;
}

/* core.int_array(list [, n]): integers and booleans. */
static int l_int_array(lua_State *L)
{
	return array_literal(L, INT_ELEMS);
}

/* core.text_array(list [, n]): strings, quoted. */
static int l_text_array(lua_State *L)
{
	return array_literal(L, TEXT_ELEMS);
}

/* core.micros_array(list [, n]): epoch seconds as integer microseconds. */
static int l_micros_array(lua_State *L)
{
	return array_literal(L, MICROS_ELEMS);
}

/*
 * core.set_metatables(list, mt): mt on each of list[1..#list], tables (rows,
 * as a job worker's claim has them): one call a batch, not one a row.
 */
static int l_set_metatables(lua_State *L)
{
	luaL_checktype(L, 1, LUA_TTABLE);
	luaL_checktype(L, 2, LUA_TTABLE);
	lua_settop(L, 2);
	lua_Integer n = (lua_Integer)lua_rawlen(L, 1);
	for (lua_Integer i = 1; i <= n; i++) {
		if (lua_rawgeti(L, 1, i) != LUA_TTABLE)
			return luaL_error(L, "pgcoord: list element %d is a %s, not a table", (int)i,
					  luaL_typename(L, -1));
		lua_pushvalue(L, 2);
		lua_setmetatable(L, -2);
		lua_pop(L, 1);
	}
	return 0;
}

static const luaL_Reg value_funcs[] = {
	{"set_metatables", l_set_metatables},
	{"error", l_error},
	{"int_array", l_int_array},
	{"text_array", l_text_array},
	{"micros_array", l_micros_array},
	{NULL, NULL}
};

void pgc_open_pgvalue(lua_State *L)
{
	luaL_newmetatable(L, PGC_ERROR_META);
	lua_pushcfunction(L, error_tostring);
	lua_setfield(L, -2, "__tostring");
	lua_setfield(L, -2, "error_meta");
	luaL_setfuncs(L, value_funcs, 0);
}

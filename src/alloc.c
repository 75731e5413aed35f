/*
 * alloc.c -- the Lua allocator of pgcoord-run.
 *
 * A job or a query result is a handful of small tables and strings that
 * die young; through malloc, their frees keep fragmenting the heap, and the
 * next larger request pays to consolidate it (a fifth of a worker's CPU).
 * Blocks up to SMALL_MAX bytes therefore come from free lists, one per
 * 16-byte size class, carved from slabs that are kept until the state is
 * closed; larger ones go to malloc.  Lua tells the allocator each block's
 * size, so no header is needed.  Under AddressSanitizer everything goes to
 * malloc, which ASan watches.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include "pgcoord.h"

#define SMALL_MAX 256
#define GRAIN 16
#define SLAB_SIZE (64 * 1024)
#define CLASS(n) (((n) + GRAIN - 1) / GRAIN)

#if defined(__SANITIZE_ADDRESS__)
#define POOLED 0
#else
#define POOLED 1
#endif

struct slab {
	struct slab *next;
	_Alignas(GRAIN) char bytes[SLAB_SIZE];
};

struct pool {
	void *free[CLASS(SMALL_MAX) + 1];
	char *cur, *end;
	struct slab *slabs;
	int warn_on;
};

static void *pool_get(struct pool *p, size_t n)
{
	size_t c = CLASS(n);
	void *b = p->free[c];
	if (b != NULL) {
		p->free[c] = *(void **)b;
		return b;
	}
	size_t size = c * GRAIN;
	if (p->cur == NULL || (size_t)(p->end - p->cur) < size) {
		struct slab *s = malloc(sizeof *s);
		if (s == NULL)
			return NULL;
		s->next = p->slabs;
		p->slabs = s;
		p->cur = s->bytes;
		p->end = s->bytes + SLAB_SIZE;
	}
	b = p->cur;
	p->cur += size;
	return b;
}

static void pool_put(struct pool *p, void *b, size_t n)
{
	size_t c = CLASS(n);
	*(void **)b = p->free[c];
	p->free[c] = b;
}

static void release(struct pool *p, void *ptr, size_t osize)
{
	if (osize <= SMALL_MAX)
		pool_put(p, ptr, osize);
	else
		free(ptr);
}

static void *pooled_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
	struct pool *p = ud;
	if (ptr == NULL)
		osize = 0;	/* then osize only says what kind of object */
	if (nsize == 0) {
		if (ptr != NULL)
			release(p, ptr, osize);
		return NULL;
	}
	if (ptr != NULL && osize > SMALL_MAX && nsize > SMALL_MAX)
		return realloc(ptr, nsize);
	if (ptr != NULL && osize <= SMALL_MAX && nsize <= SMALL_MAX &&
	    CLASS(osize) == CLASS(nsize))
		return ptr;
	void *b = nsize <= SMALL_MAX ? pool_get(p, nsize) : malloc(nsize);
	if (b == NULL)
		return NULL;	/* Lua keeps the old block */
	if (ptr != NULL) {
		memcpy(b, ptr, osize < nsize ? osize : nsize);
		release(p, ptr, osize);
	}
	return b;
}

static void *plain_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
	(void)ud, (void)osize;
	if (nsize == 0) {
		free(ptr);
		return NULL;
	}
	return realloc(ptr, nsize);
}

static int panic(lua_State *L)
{
	const char *msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "(not a string)";
	fprintf(stderr, "pgcoord-run: unprotected error in a Lua call: %s\n", msg);
	return 0;	/* Lua aborts */
}

/* warn(): off until "@on", as in the stock interpreter. */
static void warning(void *ud, const char *msg, int tocont)
{
	static int continued;
	struct pool *p = ud;
	if (!continued && *msg == '@') {
		if (strcmp(msg, "@on") == 0)
			p->warn_on = 1;
		else if (strcmp(msg, "@off") == 0)
			p->warn_on = 0;
		return;
	}
	if (p->warn_on) {
		fprintf(stderr, "%s%s%s", continued ? "" : "Lua warning: ", msg, tocont ? "" : "\n");
		fflush(stderr);
	}
	continued = tocont;
}

lua_State *pgc_new_state(void)
{
	struct pool *p = calloc(1, sizeof *p);
	if (p == NULL)
		return NULL;
	lua_State *L = lua_newstate(POOLED ? pooled_alloc : plain_alloc, p);
	if (L == NULL) {
		free(p);
		return NULL;
	}
	lua_atpanic(L, panic);
	lua_setwarnf(L, warning, p);
	return L;
}

void pgc_close_state(lua_State *L)
{
	void *ud;
	lua_getallocf(L, &ud);
	lua_close(L);
	struct pool *p = ud;
	while (p->slabs != NULL) {
		struct slab *next = p->slabs->next;
		free(p->slabs);
		p->slabs = next;
	}
	free(p);
}

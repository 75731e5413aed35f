/*
 * prompt.c -- the interactive prompt's line editor (libedit), driven by
 * the event loop through readline's callback interface, so tasks keep
 * running while the user types.  Module pgcoord.prompt, built into
 * pgcoord-run only; the REPL itself is lua/pgcoord/cli.lua.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <editline/readline.h>

#include "pgcoord.h"

int luaopen_pgcoord_prompt(lua_State *L);

static struct {
	lua_State *L;
	struct event *ev;
	int line_ref;		/* Lua function(line | nil) */
	int active;		/* the handler is installed */
	int has_line;		/* a complete line (or EOF) waits for Lua */
	char *line;
} prompt = {NULL, NULL, LUA_NOREF, 0, 0, NULL};

/* readline calls this from rl_callback_read_char; Lua runs afterwards. */
static void on_complete_line(char *line)
{
	free(prompt.line);
	prompt.line = line;
	prompt.has_line = 1;
}

static int deliver_line(lua_State *L)
{
	char *line = prompt.line;
	prompt.line = NULL;
	prompt.has_line = 0;
	lua_rawgeti(L, LUA_REGISTRYINDEX, prompt.line_ref);
	if (line)
		lua_pushstring(L, line);
	else
		lua_pushnil(L);
	free(line);
	lua_call(L, 1, 0);
	return 0;
}

static void on_stdin(evutil_socket_t fd, short what, void *arg)
{
	(void)fd, (void)what, (void)arg;
	if (!prompt.active)
		return;
	rl_callback_read_char();
	if (prompt.has_line)
		pgc_invoke(prompt.L, deliver_line, NULL);
}

static void install(const char *text)
{
	rl_callback_handler_install(text, on_complete_line);
	prompt.active = 1;
}

/* prompt.start(text, on_line): on_line(line) per line, on_line(nil) at EOF. */
static int l_start(lua_State *L)
{
	const char *text = luaL_checkstring(L, 1);
	luaL_checktype(L, 2, LUA_TFUNCTION);
	if (prompt.ev == NULL) {
		prompt.L = pgc_main_state(L);
		prompt.ev = event_new(pgc_base(L), STDIN_FILENO, EV_READ | EV_PERSIST, on_stdin, NULL);
		if (prompt.ev == NULL || event_add(prompt.ev, NULL) != 0)
			return luaL_error(L, "pgcoord: cannot watch standard input");
	}
	pgc_unref(L, &prompt.line_ref);
	prompt.line_ref = pgc_ref(L, 2);
	install(text);
	return 0;
}

/* prompt.pause(): stop reading while a chunk runs. */
static int l_pause(lua_State *L)
{
	(void)L;
	if (prompt.active) {
		rl_callback_handler_remove();
		prompt.active = 0;
	}
	return 0;
}

/* prompt.resume(text): show the prompt again and read. */
static int l_resume(lua_State *L)
{
	const char *text = luaL_checkstring(L, 1);
	if (prompt.active)
		rl_callback_handler_remove();
	install(text);
	return 0;
}

/* prompt.set(text): change the prompt for the next line. */
static int l_set(lua_State *L)
{
	rl_set_prompt(luaL_checkstring(L, 1));
	return 0;
}

static int l_add_history(lua_State *L)
{
	add_history(luaL_checkstring(L, 1));
	return 0;
}

/* prompt.print(text): write a line above the prompt and redraw it. */
static int l_print(lua_State *L)
{
	size_t len;
	const char *text = luaL_checklstring(L, 1, &len);
	if (prompt.active)
		fputs("\r\033[K", stdout);
	fwrite(text, 1, len, stdout);
	if (len == 0 || text[len - 1] != '\n')
		fputc('\n', stdout);
	fflush(stdout);
	if (prompt.active)
		rl_forced_update_display();
	return 0;
}

/* prompt.clear(): drop what was typed (Ctrl-C at the prompt). */
static int l_clear(lua_State *L)
{
	(void)L;
	if (prompt.active) {
		rl_replace_line("", 0);
		fputs("^C\n", stdout);
		fflush(stdout);
		rl_forced_update_display();
	}
	return 0;
}

static int l_close(lua_State *L)
{
	l_pause(L);
	if (prompt.ev) {
		event_free(prompt.ev);
		prompt.ev = NULL;
	}
	pgc_unref(L, &prompt.line_ref);
	free(prompt.line);
	prompt.line = NULL;
	return 0;
}

static const luaL_Reg prompt_funcs[] = {
	{"start", l_start},
	{"pause", l_pause},
	{"resume", l_resume},
	{"set", l_set},
	{"add_history", l_add_history},
	{"print", l_print},
	{"clear", l_clear},
	{"close", l_close},
	{NULL, NULL}
};

int luaopen_pgcoord_prompt(lua_State *L)
{
	luaL_newlib(L, prompt_funcs);
	return 1;
}

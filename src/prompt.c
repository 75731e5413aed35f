/*
 * prompt.c -- the interactive prompt's input, driven by the event loop so
 * that tasks keep running while the user types.  Module pgcoord.prompt,
 * built into pgcoord-run only; the REPL itself is lua/pgcoord/cli.lua.
 *
 * Two kinds of input:
 *   a terminal  libedit through readline's callback interface, with a
 *               history file and completion asked of Lua;
 *   otherwise   plain lines from a pipe or a file, no editor, the prompt
 *               echoed as `lua -i` does; end of input is one nil line.
 *
 * Ctrl-C belongs to the prompt, not to libedit and not to the default
 * action (which would end the process): the handler arms a hook on the
 * running chunk's thread, which interrupts a chunk that never waits, and
 * wakes the loop through a pipe so that Lua can cancel one that waits.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <editline/readline.h>

#include "pgcoord.h"

int luaopen_pgcoord_prompt(lua_State *L);

#define HISTORY_LINES 1000
#define PLAIN_READ 65536

static struct {
	lua_State *L;
	struct event *ev;	/* standard input is readable */
	struct event *pump;	/* plain lines buffered: deliver them */
	int line_ref;		/* function(line | nil) */
	int complete_ref;	/* function(word) -> { candidate, ... } */
	int interrupt_ref;	/* function() after a Ctrl-C */
	int plain;		/* not a terminal: no editor */
	int file;		/* a regular file: read() never waits (and epoll refuses it) */
	int active;		/* a line may be delivered */
	char *text;		/* the prompt */
	/* the editor */
	int has_line;		/* a complete line (or EOF) waits for Lua */
	char *line;
	char *history;		/* history file, or NULL */
	/* plain input */
	char *buf;
	size_t len, cap;
	int eof;
	/* Ctrl-C */
	int sigpipe[2];
	struct event *sigev;
	struct sigaction old_sigint;
	lua_State *volatile chunk;	/* the thread of the chunk that runs */
	int chunk_ref;
	volatile sig_atomic_t hit_chunk;	/* a Ctrl-C came while it ran */
} prompt = {
	.line_ref = LUA_NOREF, .complete_ref = LUA_NOREF, .interrupt_ref = LUA_NOREF,
	.sigpipe = {-1, -1}, .chunk_ref = LUA_NOREF,
};

/* ---- calls into Lua ------------------------------------------------- */

static int deliver_line(lua_State *L)
{
	char *line = lua_touserdata(L, 1);
	lua_rawgeti(L, LUA_REGISTRYINDEX, prompt.line_ref);
	if (line)
		lua_pushstring(L, line);
	else
		lua_pushnil(L);
	free(line);
	lua_call(L, 1, 0);
	return 0;
}

/* Hands line (malloc'd; NULL at end of input) to Lua, which frees it. */
static void give_line(char *line)
{
	if (prompt.line_ref == LUA_NOREF) {
		free(line);
		return;
	}
	pgc_invoke(prompt.L, deliver_line, line);
}

/* ---- the editor ----------------------------------------------------- */

/* readline calls this from rl_callback_read_char; Lua runs afterwards. */
static void on_complete_line(char *line)
{
	free(prompt.line);
	prompt.line = line;
	prompt.has_line = 1;
}

static char **candidates;	/* what Lua offered for the word being completed */
static size_t ncandidates;

static void drop_candidates(void)
{
	for (size_t i = 0; i < ncandidates; i++)
		free(candidates[i]);
	free(candidates);
	candidates = NULL;
	ncandidates = 0;
}

static int ask_completions(lua_State *L)
{
	const char *word = lua_touserdata(L, 1);
	lua_rawgeti(L, LUA_REGISTRYINDEX, prompt.complete_ref);
	lua_pushstring(L, word);
	lua_call(L, 1, 1);
	if (!lua_istable(L, -1))
		return 0;
	size_t n = (size_t)luaL_len(L, -1);
	candidates = calloc(n ? n : 1, sizeof *candidates);
	if (candidates == NULL)
		return 0;
	for (size_t i = 0; i < n; i++) {
		lua_rawgeti(L, -1, (lua_Integer)i + 1);
		const char *s = lua_tostring(L, -1);
		if (s && (candidates[ncandidates] = strdup(s)) != NULL)
			ncandidates++;
		lua_pop(L, 1);
	}
	return 0;
}

/* readline's generator: state 0 asks Lua, then one candidate per call. */
static char *next_candidate(const char *word, int state)
{
	static size_t next;
	if (state == 0) {
		drop_candidates();
		next = 0;
		if (prompt.complete_ref != LUA_NOREF)
			pgc_invoke(prompt.L, ask_completions, (void *)word);
	}
	return next < ncandidates ? strdup(candidates[next++]) : NULL;
}

static char **complete(const char *word, int start, int end)
{
	(void)start, (void)end;
	rl_attempted_completion_over = 1;	/* no file names */
	return rl_completion_matches(word, next_candidate);
}

static void install(void)
{
	rl_callback_handler_install(prompt.text, on_complete_line);
	prompt.active = 1;
}

static void editor_init(void)
{
	rl_catch_signals = 0;	/* Ctrl-C is the prompt's (see the top) */
	rl_readline_name = "pgcoord";
	/* a word runs through dots and colons: "string.fo" completes whole */
	rl_basic_word_break_characters = " \t\n\"\\'`@$><=;|&{(+-*/%^#~,[]";
	rl_attempted_completion_function = complete;
	rl_completion_append_character = '\0';
	if (prompt.history) {
		read_history(prompt.history);	/* none yet is fine */
		stifle_history(HISTORY_LINES);
	}
}

/* ---- plain input ---------------------------------------------------- */

/* Reads what is there; 0 at end of input or on an error. */
static int plain_read(void)
{
	if (prompt.cap - prompt.len < PLAIN_READ) {
		size_t cap = prompt.cap ? prompt.cap * 2 : PLAIN_READ * 2;
		char *p = realloc(prompt.buf, cap);
		if (p == NULL)
			return 0;
		prompt.buf = p;
		prompt.cap = cap;
	}
	ssize_t n = read(STDIN_FILENO, prompt.buf + prompt.len, PLAIN_READ);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 1;
	if (n <= 0)
		return 0;
	prompt.len += (size_t)n;
	return 1;
}

/* Takes the first line out of the buffer, or NULL while none is whole. */
static char *plain_take(int whole_only)
{
	char *nl = memchr(prompt.buf, '\n', prompt.len);
	if (nl == NULL && (whole_only || prompt.len == 0))
		return NULL;
	size_t n = nl ? (size_t)(nl - prompt.buf) : prompt.len;
	size_t used = nl ? n + 1 : n;
	char *line = malloc(n + 1);
	if (line == NULL)
		return NULL;
	memcpy(line, prompt.buf, n);
	line[n] = '\0';
	if (n > 0 && line[n - 1] == '\r')
		line[n - 1] = '\0';
	memmove(prompt.buf, prompt.buf + used, prompt.len - used);
	prompt.len -= used;
	return line;
}

/* Delivers buffered lines while Lua reads; at end of input, nil once. */
static void plain_pump(void)
{
	while (prompt.active) {
		char *line = plain_take(!prompt.eof);
		if (line) {
			give_line(line);
			continue;
		}
		if (prompt.eof) {
			prompt.active = 0;
			give_line(NULL);
			return;
		}
		if (!prompt.file)
			return;	/* the read event brings more */
		prompt.eof = !plain_read();
	}
}

static void show_prompt(void)
{
	fputs(prompt.text, stdout);
	fflush(stdout);
}

static void on_pump(evutil_socket_t fd, short what, void *arg)
{
	(void)fd, (void)what, (void)arg;
	plain_pump();
}

/* ---- events --------------------------------------------------------- */

static void on_stdin(evutil_socket_t fd, short what, void *arg)
{
	(void)fd, (void)what, (void)arg;
	if (prompt.plain) {
		if (!plain_read()) {
			prompt.eof = 1;
			event_del(prompt.ev);	/* a closed pipe stays readable */
		}
		plain_pump();
		return;
	}
	if (!prompt.active)
		return;
	rl_callback_read_char();
	if (prompt.has_line) {
		char *line = prompt.line;
		prompt.line = NULL;
		prompt.has_line = 0;
		give_line(line);
	}
}

/* Reading again: the editor shows its prompt, plain input echoes it. */
static int start_reading(lua_State *L)
{
	if (!prompt.plain) {
		if (prompt.active)
			rl_callback_handler_remove();
		install();
		return 0;
	}
	prompt.active = 1;
	show_prompt();
	if (prompt.ev && !prompt.eof && event_add(prompt.ev, NULL) != 0)
		return luaL_error(L, "pgcoord: cannot watch standard input");
	event_active(prompt.pump, EV_TIMEOUT, 0);	/* lines may wait in the buffer */
	return 0;
}

static void stop_reading(void)
{
	if (!prompt.active)
		return;
	prompt.active = 0;
	if (!prompt.plain)
		rl_callback_handler_remove();
	else if (prompt.ev)
		event_del(prompt.ev);	/* the pipe holds the rest meanwhile */
}

/* ---- Ctrl-C --------------------------------------------------------- */

static void interrupt_hook(lua_State *L, lua_Debug *ar)
{
	(void)ar;
	lua_sethook(L, NULL, 0, 0);
	luaL_error(L, "interrupted");
}

/* Async-signal-safe: lua_sethook may be called from a signal handler. */
static void on_sigint(int signum)
{
	(void)signum;
	int saved = errno;
	lua_State *chunk = prompt.chunk;
	if (chunk) {
		lua_sethook(chunk, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
		prompt.hit_chunk = 1;
	}
	char byte = 1;
	if (write(prompt.sigpipe[1], &byte, 1) < 0) {
		/* the pipe is full: a wake-up is on its way already */
	}
	errno = saved;
}

/* interrupt(during_chunk): whether a chunk ran when Ctrl-C came (the hook
 * may have ended it already). */
static int deliver_interrupt(lua_State *L)
{
	int during_chunk = prompt.hit_chunk;
	prompt.hit_chunk = 0;
	lua_rawgeti(L, LUA_REGISTRYINDEX, prompt.interrupt_ref);
	lua_pushboolean(L, during_chunk);
	lua_call(L, 1, 0);
	return 0;
}

static void on_sigpipe(evutil_socket_t fd, short what, void *arg)
{
	(void)what, (void)arg;
	char bytes[64];
	while (read(fd, bytes, sizeof bytes) > 0)
		;
	if (prompt.interrupt_ref != LUA_NOREF)
		pgc_invoke(prompt.L, deliver_interrupt, NULL);
}

static int watch_interrupts(lua_State *L)
{
	if (pipe(prompt.sigpipe) != 0)
		return luaL_error(L, "pgcoord: cannot create the prompt's signal pipe");
	for (int i = 0; i < 2; i++) {
		int fl = fcntl(prompt.sigpipe[i], F_GETFL);
		if (fl < 0 || fcntl(prompt.sigpipe[i], F_SETFL, fl | O_NONBLOCK) != 0
		    || fcntl(prompt.sigpipe[i], F_SETFD, FD_CLOEXEC) != 0)
			return luaL_error(L, "pgcoord: cannot set up the prompt's signal pipe");
	}
	prompt.sigev = event_new(pgc_base(L), prompt.sigpipe[0], EV_READ | EV_PERSIST,
				 on_sigpipe, NULL);
	if (prompt.sigev == NULL || event_add(prompt.sigev, NULL) != 0)
		return luaL_error(L, "pgcoord: cannot watch the prompt's signal pipe");
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_sigint;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_RESTART;
	if (sigaction(SIGINT, &sa, &prompt.old_sigint) != 0)
		return luaL_error(L, "pgcoord: cannot handle SIGINT");
	return 0;
}

/* ---- the module ----------------------------------------------------- */

static void set_ref(lua_State *L, int *ref, int idx)
{
	pgc_unref(L, ref);
	if (!lua_isnoneornil(L, idx)) {
		luaL_checktype(L, idx, LUA_TFUNCTION);
		*ref = pgc_ref(L, idx);
	}
}

static void set_text(lua_State *L, int idx)
{
	char *text = strdup(luaL_checkstring(L, idx));
	if (text == NULL)
		luaL_error(L, "pgcoord: out of memory");
	free(prompt.text);
	prompt.text = text;
}

/*
 * prompt.start(text, on_line, { complete = fn, interrupt = fn,
 * history = path }): on_line(line) per line, on_line(nil) at the end of
 * input; complete(word) -> candidates; interrupt(during_chunk) after a
 * Ctrl-C.
 */
static int l_start(lua_State *L)
{
	luaL_checkstring(L, 1);
	luaL_checktype(L, 2, LUA_TFUNCTION);
	luaL_checktype(L, 3, LUA_TTABLE);
	if (prompt.L != NULL)
		return luaL_error(L, "pgcoord: the prompt is started already");
	prompt.L = pgc_main_state(L);
	set_text(L, 1);
	set_ref(L, &prompt.line_ref, 2);
	lua_getfield(L, 3, "complete");
	set_ref(L, &prompt.complete_ref, -1);
	lua_getfield(L, 3, "interrupt");
	set_ref(L, &prompt.interrupt_ref, -1);
	lua_getfield(L, 3, "history");
	const char *history = lua_tostring(L, -1);
	if (history && (prompt.history = strdup(history)) == NULL)
		return luaL_error(L, "pgcoord: out of memory");
	lua_settop(L, 3);

	struct stat st;
	prompt.plain = !isatty(STDIN_FILENO);
	prompt.file = prompt.plain && fstat(STDIN_FILENO, &st) == 0 && !S_ISFIFO(st.st_mode)
		      && !S_ISSOCK(st.st_mode) && !S_ISCHR(st.st_mode);
	if (!prompt.plain)
		editor_init();
	if (!prompt.file) {
		prompt.ev = event_new(pgc_base(L), STDIN_FILENO, EV_READ | EV_PERSIST, on_stdin, NULL);
		if (prompt.ev == NULL || event_add(prompt.ev, NULL) != 0)
			return luaL_error(L, "pgcoord: cannot watch standard input");
	}
	prompt.pump = event_new(pgc_base(L), -1, 0, on_pump, NULL);
	if (prompt.pump == NULL)
		return luaL_error(L, "pgcoord: cannot create the prompt's event");
	watch_interrupts(L);
	return start_reading(L);
}

/* prompt.pause(): stop reading while a chunk runs. */
static int l_pause(lua_State *L)
{
	(void)L;
	stop_reading();
	return 0;
}

/* prompt.resume(text): show the prompt again and read. */
static int l_resume(lua_State *L)
{
	set_text(L, 1);
	return start_reading(L);
}

/* prompt.set(text): change the prompt for the next line. */
static int l_set(lua_State *L)
{
	set_text(L, 1);
	if (!prompt.plain)
		rl_set_prompt(prompt.text);
	return 0;
}

static int l_add_history(lua_State *L)
{
	const char *line = luaL_checkstring(L, 1);
	if (prompt.plain)
		return 0;
	add_history(line);
	if (prompt.history && write_history(prompt.history) != 0) {
		free(prompt.history);	/* not writable: keep it for this session only */
		prompt.history = NULL;
	}
	return 0;
}

/* prompt.print(text): write a line above the prompt and redraw it. */
static int l_print(lua_State *L)
{
	size_t len;
	const char *text = luaL_checklstring(L, 1, &len);
	int redraw = prompt.active && !prompt.plain;
	if (redraw)
		fputs("\r\033[K", stdout);
	fwrite(text, 1, len, stdout);
	if (len == 0 || text[len - 1] != '\n')
		fputc('\n', stdout);
	fflush(stdout);
	if (redraw)
		rl_forced_update_display();
	return 0;
}

/* prompt.clear(): drop what was typed (Ctrl-C at the prompt). */
static int l_clear(lua_State *L)
{
	(void)L;
	if (prompt.plain)
		return 0;
	if (prompt.active)
		rl_callback_handler_remove();
	fputs("^C\n", stdout);
	fflush(stdout);
	rl_replace_line("", 0);
	rl_point = rl_end = 0;
	install();
	return 0;
}

/*
 * prompt.running(thread | nil): the chunk now running, which a Ctrl-C
 * interrupts (nil: none; its hook, if armed, is taken off).
 */
static int l_running(lua_State *L)
{
	if (prompt.chunk)
		lua_sethook(prompt.chunk, NULL, 0, 0);
	prompt.chunk = NULL;
	pgc_unref(L, &prompt.chunk_ref);
	if (!lua_isnoneornil(L, 1)) {
		lua_State *co = lua_tothread(L, 1);
		luaL_argcheck(L, co != NULL, 1, "expected a thread");
		prompt.chunk_ref = pgc_ref(L, 1);
		prompt.chunk = co;
	}
	return 0;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static int l_close(lua_State *L)
{
	stop_reading();
	if (prompt.sigev) {
		sigaction(SIGINT, &prompt.old_sigint, NULL);
		event_free(prompt.sigev);
		prompt.sigev = NULL;
	}
	close_fd(&prompt.sigpipe[0]);
	close_fd(&prompt.sigpipe[1]);
	l_running(L);
	if (prompt.ev)
		event_free(prompt.ev);
	if (prompt.pump)
		event_free(prompt.pump);
	prompt.ev = prompt.pump = NULL;
	pgc_unref(L, &prompt.line_ref);
	pgc_unref(L, &prompt.complete_ref);
	pgc_unref(L, &prompt.interrupt_ref);
	drop_candidates();
	free(prompt.line);
	free(prompt.buf);
	free(prompt.text);
	free(prompt.history);
	prompt.line = prompt.buf = prompt.text = prompt.history = NULL;
	prompt.len = prompt.cap = 0;
	prompt.L = NULL;
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
	{"running", l_running},
	{"close", l_close},
	{NULL, NULL}
};

int luaopen_pgcoord_prompt(lua_State *L)
{
	luaL_newlib(L, prompt_funcs);
	return 1;
}

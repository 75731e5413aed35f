/*
 * tcp-relay -- a TCP forwarder that can play dead, for failure tests.
 *
 *   tcp-relay LISTEN_PORT TARGET_HOST TARGET_PORT
 *
 * Listens on 127.0.0.1:LISTEN_PORT (0 picks a free port, printed as the
 * first line of standard output) and forwards every accepted connection to
 * TARGET_HOST:TARGET_PORT.
 *
 *   SIGUSR1  stop forwarding in both directions, sockets left open: the
 *            link is silently dead (data piles up in kernel buffers);
 *            prints "paused" once in effect
 *   SIGUSR2  resume forwarding; prints "resumed" once in effect
 *   SIGTERM  exit
 *
 * With TARGET_PORT 0 it is a blackhole server: connections are accepted
 * and never answered.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>

#define BUF_SIZE 65536

typedef struct side {
	int fd;
	char buf[BUF_SIZE];	/* read from this side, to write to the other */
	size_t len, off;
	int eof;		/* this side sent FIN */
	int hup;		/* hung up while paused: not polled until resumed */
} side;

typedef struct relay_link {
	side a, b;		/* a: the accepted client, b: the target */
} relay_link;

static relay_link **links;
static size_t nlinks, caplinks;
static int sigpipe_fds[2] = {-1, -1};

static void die(const char *what)
{
	fprintf(stderr, "tcp-relay: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* Each signal becomes a byte on a pipe, handled (and acknowledged) in order. */
static void on_signal(int signum)
{
	int saved = errno;
	char c = signum == SIGUSR1 ? 'p' : 'r';
	(void)!write(sigpipe_fds[1], &c, 1);
	errno = saved;
}

static void set_nonblocking(int fd)
{
	int flags = fcntl(fd, F_GETFL);
	if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
		die("fcntl");
}

static int connect_target(const char *host, const char *port)
{
	struct addrinfo hints, *res, *ai;
	memset(&hints, 0, sizeof hints);
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	int rc = getaddrinfo(host, port, &hints, &res);
	if (rc != 0) {
		fprintf(stderr, "tcp-relay: %s:%s: %s\n", host, port, gai_strerror(rc));
		return -1;
	}
	int fd = -1;
	for (ai = res; ai != NULL; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
		if (fd < 0)
			continue;
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
			break;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd >= 0)
		set_nonblocking(fd);
	return fd;
}

static void add_link(int client, int target)
{
	if (nlinks == caplinks) {
		size_t cap = caplinks ? caplinks * 2 : 16;
		relay_link **p = realloc(links, cap * sizeof *p);
		if (p == NULL)
			die("realloc");
		links = p;
		caplinks = cap;
	}
	relay_link *l = calloc(1, sizeof *l);
	if (l == NULL)
		die("calloc");
	l->a.fd = client;
	l->b.fd = target;
	links[nlinks++] = l;
}

static void close_link(size_t i)
{
	relay_link *l = links[i];
	close(l->a.fd);
	if (l->b.fd >= 0)
		close(l->b.fd);
	free(l);
	links[i] = links[--nlinks];
}

/* Reads from `from` into its buffer; -1 when the relay_link is broken. */
static int pump_in(side *from, int discard)
{
	ssize_t n = read(from->fd, from->buf, BUF_SIZE);
	if (n > 0) {
		if (!discard) {
			from->len = (size_t)n;
			from->off = 0;
		}
		return 0;
	}
	if (n == 0) {
		from->eof = 1;
		return 0;
	}
	return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
}

/* Writes from's buffer to `to`; -1 when the relay_link is broken. */
static int pump_out(side *from, side *to)
{
	while (from->off < from->len) {
		ssize_t n = write(to->fd, from->buf + from->off, from->len - from->off);
		if (n < 0)
			return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
		from->off += (size_t)n;
	}
	from->len = from->off = 0;
	if (from->eof)
		shutdown(to->fd, SHUT_WR);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: tcp-relay LISTEN_PORT TARGET_HOST TARGET_PORT\n");
		return 2;
	}
	const char *target_host = argv[2], *target_port = argv[3];
	int blackhole = strcmp(target_port, "0") == 0;

	if (pipe(sigpipe_fds) != 0)
		die("pipe");
	set_nonblocking(sigpipe_fds[0]);
	set_nonblocking(sigpipe_fds[1]);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) != 0 || sigaction(SIGUSR2, &sa, NULL) != 0)
		die("sigaction");
	signal(SIGPIPE, SIG_IGN);

	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	if (lfd < 0)
		die("socket");
	int one = 1;
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in addr;
	memset(&addr, 0, sizeof addr);
	addr.sin_family = AF_INET;
	addr.sin_port = htons((unsigned short)atoi(argv[1]));
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0)
		die("bind");
	if (listen(lfd, 64) != 0)
		die("listen");
	socklen_t alen = sizeof addr;
	if (getsockname(lfd, (struct sockaddr *)&addr, &alen) != 0)
		die("getsockname");
	printf("%d\n", ntohs(addr.sin_port));
	fflush(stdout);
	set_nonblocking(lfd);

	struct pollfd *fds = NULL;
	size_t capfds = 0;
	int is_paused = 0;
	for (;;) {
		size_t want = 2 + 2 * nlinks;
		if (want > capfds) {
			struct pollfd *p = realloc(fds, want * 2 * sizeof *p);
			if (p == NULL)
				die("realloc");
			fds = p;
			capfds = want * 2;
		}
		fds[0] = (struct pollfd){.fd = sigpipe_fds[0], .events = POLLIN};
		fds[1] = (struct pollfd){.fd = lfd, .events = POLLIN};
		for (size_t i = 0; i < nlinks; i++) {
			relay_link *l = links[i];
			struct pollfd *pa = &fds[2 + 2 * i], *pb = &fds[3 + 2 * i];
			*pa = (struct pollfd){.fd = l->a.fd, .events = 0};
			*pb = (struct pollfd){.fd = l->b.fd, .events = 0};
			if (blackhole) {
				pa->events = POLLIN;	/* only to notice a hang-up */
				pb->fd = -1;
				continue;
			}
			if (is_paused) {
				/* poll reports hang-ups even unasked: park those sides */
				pa->fd = l->a.hup ? -1 : l->a.fd;
				pb->fd = l->b.hup ? -1 : l->b.fd;
				continue;
			}
			l->a.hup = l->b.hup = 0;
			if (l->a.len == 0 && !l->a.eof)
				pa->events |= POLLIN;
			else if (l->a.len > 0)
				pb->events |= POLLOUT;
			if (l->b.len == 0 && !l->b.eof)
				pb->events |= POLLIN;
			else if (l->b.len > 0)
				pa->events |= POLLOUT;
		}
		/* On EINTR no revents are set: the pause switch below still runs. */
		if (poll(fds, 2 + 2 * nlinks, -1) < 0 && errno != EINTR)
			die("poll");
		/* Signals first (a signal that came with data wins over it); each
		 * is acknowledged once in effect.  Read even without revents: an
		 * EINTR leaves them unset. */
		char sigs[64];
		ssize_t nsig;
		while ((nsig = read(sigpipe_fds[0], sigs, sizeof sigs)) > 0) {
			for (ssize_t k = 0; k < nsig; k++) {
				is_paused = sigs[k] == 'p';
				printf("%s\n", is_paused ? "paused" : "resumed");
			}
			fflush(stdout);
		}
		/* Links first: accepting may reallocate the array. */
		size_t n = nlinks;
		for (size_t i = n; i-- > 0;) {
			relay_link *l = links[i];
			short ra = fds[2 + 2 * i].revents, rb = fds[3 + 2 * i].revents;
			int broken = 0;
			if (blackhole) {
				if (ra && (pump_in(&l->a, 1) != 0 || l->a.eof))
					broken = 1;
			} else if (is_paused) {
				if (ra & (POLLERR | POLLHUP))
					l->a.hup = 1;
				if (rb & (POLLERR | POLLHUP))
					l->b.hup = 1;
			} else {
				if ((ra & (POLLIN | POLLHUP | POLLERR)) && (fds[2 + 2 * i].events & POLLIN))
					broken |= pump_in(&l->a, 0);
				if ((rb & (POLLIN | POLLHUP | POLLERR)) && (fds[3 + 2 * i].events & POLLIN))
					broken |= pump_in(&l->b, 0);
				if (!broken && (l->a.len > 0 || l->a.eof))
					broken |= pump_out(&l->a, &l->b);
				if (!broken && (l->b.len > 0 || l->b.eof))
					broken |= pump_out(&l->b, &l->a);
				if ((ra | rb) & POLLERR)
					broken = 1;
				if (l->a.eof && l->b.eof && l->a.len == 0 && l->b.len == 0)
					broken = 1;
			}
			if (broken)
				close_link(i);
		}
		if (fds[1].revents & POLLIN) {
			int cfd;
			while ((cfd = accept(lfd, NULL, NULL)) >= 0) {
				set_nonblocking(cfd);
				int tfd = -1;
				if (!blackhole) {
					tfd = connect_target(target_host, target_port);
					if (tfd < 0) {
						close(cfd);
						continue;
					}
				}
				add_link(cfd, tfd);
			}
		}
	}
}

/*
 * tcp-hold -- opens many TCP connections and holds them, for the specs of
 * servers that must not let idle or slow clients tie them up.
 *
 *   tcp-hold PORT N [DRIBBLE_SECONDS]
 *
 * Connects N times to 127.0.0.1:PORT and prints "connected N".  With
 * DRIBBLE_SECONDS, each connection starts a request and then sends one more
 * header byte every DRIBBLE_SECONDS, never finishing it (slowloris);
 * without, it sends nothing.  Each connection the server closes is printed
 * as "closed I after SECONDS status=CODE" (CODE from the first line the
 * server sent, or "none"); "all closed" once all are, then it exits.
 * SIGTERM ends it.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

typedef struct hold {
	int fd;
	char head[16];		/* the start of what the server sent */
	size_t head_len;
	double opened;
} hold;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int connect_to(int port)
{
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof sa);
	sa.sin_family = AF_INET;
	sa.sin_port = htons((unsigned short)port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* "HTTP/1.1 503 ..." -> "503"; else "none". */
static const char *status_of(const hold *h, char *buf)
{
	if (h->head_len >= 12 && memcmp(h->head, "HTTP/1.", 7) == 0) {
		memcpy(buf, h->head + 9, 3);
		buf[3] = '\0';
		return buf;
	}
	return "none";
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: tcp-hold PORT N [DRIBBLE_SECONDS]\n");
		return 2;
	}
	int port = atoi(argv[1]), n = atoi(argv[2]);
	double dribble = argc > 3 ? atof(argv[3]) : 0;
	if (n < 1) {
		fprintf(stderr, "tcp-hold: N must be positive\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	hold *holds = calloc((size_t)n, sizeof *holds);
	struct pollfd *pfds = calloc((size_t)n, sizeof *pfds);
	if (holds == NULL || pfds == NULL) {
		fprintf(stderr, "tcp-hold: out of memory\n");
		return 1;
	}
	for (int i = 0; i < n; i++) {
		holds[i].fd = connect_to(port);
		if (holds[i].fd < 0) {
			fprintf(stderr, "tcp-hold: connection %d: %s\n", i + 1, strerror(errno));
			return 1;
		}
		holds[i].opened = now();
		if (dribble > 0 && write(holds[i].fd, "GET / HTTP/1.1\r\nX", 17) != 17) {
			fprintf(stderr, "tcp-hold: connection %d: cannot write\n", i + 1);
			return 1;
		}
	}
	printf("connected %d\n", n);
	int open = n;
	double next_drip = now() + dribble;
	while (open > 0) {
		for (int i = 0; i < n; i++) {
			pfds[i].fd = holds[i].fd;
			pfds[i].events = POLLIN;
		}
		int wait_ms = dribble > 0 ? (int)((next_drip - now()) * 1000) : 1000;
		if (poll(pfds, (nfds_t)n, wait_ms < 0 ? 0 : wait_ms) < 0 && errno != EINTR) {
			perror("tcp-hold: poll");
			return 1;
		}
		for (int i = 0; i < n; i++) {
			hold *h = &holds[i];
			if (h->fd < 0 || !(pfds[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			char buf[4096];
			ssize_t got = read(h->fd, buf, sizeof buf);
			if (got > 0) {
				size_t take = (size_t)got;
				if (take > sizeof h->head - h->head_len)
					take = sizeof h->head - h->head_len;
				memcpy(h->head + h->head_len, buf, take);
				h->head_len += take;
				continue;
			}
			if (got < 0 && errno == EINTR)
				continue;
			char code[4];
			printf("closed %d after %.3f status=%s\n", i + 1, now() - h->opened,
			       status_of(h, code));
			close(h->fd);
			h->fd = -1;
			open--;
		}
		if (dribble > 0 && now() >= next_drip) {
			for (int i = 0; i < n; i++) {
				/* a failed write means closed: the next read says so */
				ssize_t put = holds[i].fd >= 0 ? write(holds[i].fd, "x", 1) : 0;
				(void)put;
			}
			next_drip = now() + dribble;
		}
	}
	printf("all closed\n");
	return 0;
}

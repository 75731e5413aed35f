/*
 * The baseline for scripts/bench/notify: the least a libpq client can do
 * to receive notifications.  LISTENs on a channel, prints "ready", then
 * counts what arrives in a window of SECONDS that opens with the first
 * notification, and prints "notifications=N seconds=S rate=R cpu=C" (C: the
 * process's CPU seconds in the window).
 *
 *   listen-baseline CHANNEL SECONDS [WAIT_SECONDS [COUNT]]
 *
 * The connection comes from libpq's PG* environment.  WAIT_SECONDS
 * (default 30) bounds the wait for the first notification.  COUNT (for
 * scripts/bench/cpu) ends the window early, once COUNT notifications came.
 */
#include <libpq-fe.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int die(PGconn *pg, const char *what)
{
	fprintf(stderr, "listen-baseline: %s: %s", what, pg ? PQerrorMessage(pg) : "?\n");
	PQfinish(pg);
	return 1;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: listen-baseline CHANNEL SECONDS [WAIT_SECONDS [COUNT]]\n");
		return 2;
	}
	const char *channel = argv[1];
	double window = atof(argv[2]);
	double wait_first = argc > 3 ? atof(argv[3]) : 30;
	long limit = argc > 4 ? atol(argv[4]) : 0;

	PGconn *pg = PQconnectdb("");
	if (PQstatus(pg) != CONNECTION_OK)
		return die(pg, "connect");
	char *ident = PQescapeIdentifier(pg, channel, strlen(channel));
	char sql[256];
	snprintf(sql, sizeof sql, "LISTEN %s", ident);
	PQfreemem(ident);
	PGresult *r = PQexec(pg, sql);
	if (PQresultStatus(r) != PGRES_COMMAND_OK) {
		PQclear(r);
		return die(pg, "LISTEN");
	}
	PQclear(r);
	if (PQsetnonblocking(pg, 1) != 0)
		return die(pg, "PQsetnonblocking");
	printf("ready\n");
	fflush(stdout);

	struct pollfd pfd = { .fd = PQsocket(pg), .events = POLLIN };
	long count = 0;
	double started = 0, deadline = now() + wait_first;
	clock_t cpu_started = 0;
	while (limit == 0 || count < limit) {
		double left = deadline - now();
		if (left <= 0)
			break;
		int rc = poll(&pfd, 1, (int)(left * 1000) + 1);
		if (rc < 0)
			return die(pg, "poll");
		if (rc == 0)
			continue;
		if (!PQconsumeInput(pg))
			return die(pg, "PQconsumeInput");
		PGnotify *n;
		while ((n = PQnotifies(pg)) != NULL) {
			PQfreemem(n);
			if (started == 0) {
				started = now();
				deadline = started + window;
				cpu_started = clock();
			}
			count++;
		}
	}
	double cpu = (double)(clock() - cpu_started) / CLOCKS_PER_SEC;
	PQfinish(pg);
	if (started == 0) {
		fprintf(stderr, "listen-baseline: no notification within %g s\n", wait_first);
		return 1;
	}
	printf("notifications=%ld seconds=%.3f rate=%.1f cpu=%.3f\n", count, window,
	       count / window, cpu);
	return 0;
}

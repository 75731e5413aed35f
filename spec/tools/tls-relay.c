/*
 * tls-relay -- a TLS-terminating PostgreSQL forwarder that writes large
 * TLS records, like a TLS proxy or a newer server may, for the TLS specs.
 *
 *   tls-relay CERT KEY TARGET_PORT
 *
 * Listens on 127.0.0.1 (a free port, printed as the first line of standard
 * output).  For each client: answers the SSLRequest with 'S', does the TLS
 * handshake, and forwards to 127.0.0.1:TARGET_PORT in plain TCP.  What the
 * server sends is gathered until it pauses for GATHER_MS and then written
 * with one SSL_write, so OpenSSL cuts it into records of 16 KB: bigger than
 * the 8 KB PostgreSQL 15 itself writes, and bigger than libpq's free buffer
 * space can be.  One process per client (fork), each ending with the relay.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define GATHER_MS 5
#define BUF_SIZE (1 << 20)

static void die(const char *what)
{
	fprintf(stderr, "tls-relay: %s: %s\n", what, strerror(errno));
	ERR_print_errors_fp(stderr);
	exit(1);
}

/* Small writes go out at once (Nagle would hold them for an ACK). */
static void no_delay(int fd)
{
	int one = 1;
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
		die("setsockopt");
}

static int connect_target(int port)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
		die("connect to the target");
	no_delay(fd);
	return fd;
}

/* Reads what fd has, waiting up to ms for the first byte; 0 at EOF. */
static ssize_t read_some(int fd, char *buf, size_t size, int ms)
{
	struct pollfd p = {fd, POLLIN, 0};
	int r = poll(&p, 1, ms);
	if (r < 0)
		die("poll");
	if (r == 0)
		return -1;	/* nothing came */
	ssize_t n = read(fd, buf, size);
	if (n < 0)
		die("read from the target");
	return n;
}

static void serve(SSL_CTX *ctx, int client, int target_port)
{
	char req[8];
	if (recv(client, req, sizeof req, MSG_WAITALL) != (ssize_t)sizeof req)
		exit(0);	/* not a client (a port probe) */
	no_delay(client);
	if (write(client, "S", 1) != 1)
		die("write the SSLRequest answer");
	SSL *ssl = SSL_new(ctx);
	if (ssl == NULL || SSL_set_fd(ssl, client) != 1 || SSL_accept(ssl) != 1)
		exit(0);	/* the client gave up on the handshake */
	int server = connect_target(target_port);
	char *buf = malloc(BUF_SIZE);
	if (buf == NULL)
		die("malloc");
	for (;;) {
		struct pollfd p[2] = {{client, POLLIN, 0}, {server, POLLIN, 0}};
		if (SSL_pending(ssl) == 0 && poll(p, 2, -1) < 0)
			die("poll");
		if (SSL_pending(ssl) > 0 || (p[0].revents & (POLLIN | POLLHUP | POLLERR))) {
			int n = SSL_read(ssl, buf, BUF_SIZE);
			if (n <= 0) {
				int err = SSL_get_error(ssl, n);
				if (err == SSL_ERROR_WANT_READ)
					continue;
				exit(0);	/* the client went */
			}
			for (int off = 0; off < n;) {
				ssize_t w = write(server, buf + off, (size_t)(n - off));
				if (w < 0)
					exit(0);
				off += (int)w;
			}
		}
		if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
			size_t len = 0;
			ssize_t n = read_some(server, buf, BUF_SIZE, 0);
			if (n <= 0)
				exit(0);	/* the server went */
			len = (size_t)n;
			/* gather until the server pauses, then one write */
			while (len < BUF_SIZE && (n = read_some(server, buf + len, BUF_SIZE - len,
								GATHER_MS)) > 0)
				len += (size_t)n;
			if (SSL_write(ssl, buf, (int)len) != (int)len)
				exit(0);
			if (n == 0)
				exit(0);
		}
	}
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: tls-relay CERT KEY TARGET_PORT\n");
		return 2;
	}
	signal(SIGCHLD, SIG_IGN);	/* no zombies */
	SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
	if (ctx == NULL || SSL_CTX_use_certificate_chain_file(ctx, argv[1]) != 1 ||
	    SSL_CTX_use_PrivateKey_file(ctx, argv[2], SSL_FILETYPE_PEM) != 1)
		die("load the certificate and key");
	int target_port = atoi(argv[3]);

	int ls = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	socklen_t salen = sizeof sa;
	if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(ls, 64) != 0 ||
	    getsockname(ls, (struct sockaddr *)&sa, &salen) != 0)
		die("listen");
	printf("%d\n", ntohs(sa.sin_port));
	fflush(stdout);
	for (;;) {
		int c = accept(ls, NULL, NULL);
		if (c < 0) {
			if (errno == EINTR)
				continue;
			die("accept");
		}
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0) {
			/* a child goes with the relay (the spec kills only the relay) */
			if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || getppid() == 1)
				exit(0);
			close(ls);
			serve(ctx, c, target_port);
			exit(0);
		}
		close(c);
	}
}

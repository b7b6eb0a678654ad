/* TCP request/response rate, netperf's TCP_RR in miniature (netperf is not
 * in Debian main): one byte out, one byte back, as often as it goes.
 *
 *   tcprr server PORT            echo every byte of every connection, for ever
 *   tcprr client HOST PORT SECS  print "TCPRR <transactions per second>"
 *
 * Built static by resources/bench-net.sh for the guest and the test host.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int server(int port)
{
	int one = 1, s = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(s, (struct sockaddr *)&a, sizeof(a)) || listen(s, 4)) {
		perror("tcprr: listen");
		return 1;
	}
	for (;;) {
		int c = accept(s, NULL, NULL);
		char b;
		if (c < 0)
			continue;
		setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		while (read(c, &b, 1) == 1 && write(c, &b, 1) == 1)
			;
		close(c);
	}
}

static int client(const char *host, int port, double secs)
{
	int one = 1, s = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	long n = 0;
	char b = 'x';
	double start, end;
	if (inet_pton(AF_INET, host, &a.sin_addr) != 1 ||
	    connect(s, (struct sockaddr *)&a, sizeof(a))) {
		perror("tcprr: connect");
		return 1;
	}
	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	start = now();
	end = start + secs;
	while (now() < end) {
		if (write(s, &b, 1) != 1 || read(s, &b, 1) != 1) {
			perror("tcprr: transaction");
			return 1;
		}
		n++;
	}
	printf("TCPRR %.0f\n", n / (now() - start));
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "server"))
		return server(atoi(argv[2]));
	if (argc == 5 && !strcmp(argv[1], "client"))
		return client(argv[2], atoi(argv[3]), atof(argv[4]));
	fprintf(stderr, "usage: tcprr server PORT | tcprr client HOST PORT SECS\n");
	return 2;
}

/*
 * vsock: the guest side of the vhost-vsock tests (busybox has no AF_VSOCK).
 *
 *   vsock listen PORT          accept one connection, print the line it
 *                              sends as SKIFF-VSOCK-GOT=LINE, answer "pong"
 *   vsock connect CID PORT MSG send MSG and a newline, print the answer as
 *                              SKIFF-VSOCK-REPLY=LINE
 *   vsock cid                  print this machine's CID as SKIFF-VSOCK-CID=N
 *
 * Exit status 0 on success, 1 with a message on stderr otherwise.
 */
#include <linux/vm_sockets.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int fail(const char *what)
{
	perror(what);
	return 1;
}

/* One line (without its newline) from fd into buf. */
static int read_line(int fd, char *buf, size_t size)
{
	size_t n = 0;
	while (n + 1 < size) {
		ssize_t r = read(fd, buf + n, 1);
		if (r <= 0 || buf[n] == '\n')
			break;
		n++;
	}
	buf[n] = 0;
	return (int)n;
}

int main(int argc, char **argv)
{
	struct sockaddr_vm addr;
	char line[256];
	int fd;

	if (argc == 2 && strcmp(argv[1], "cid") == 0) {
		unsigned int cid = 0;
		int dev = open("/dev/vsock", O_RDONLY);
		if (dev < 0 || ioctl(dev, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0)
			return fail("/dev/vsock");
		printf("SKIFF-VSOCK-CID=%u\n", cid);
		return 0;
	}
	memset(&addr, 0, sizeof(addr));
	addr.svm_family = AF_VSOCK;
	fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (fd < 0)
		return fail("socket(AF_VSOCK)");
	if (argc == 3 && strcmp(argv[1], "listen") == 0) {
		int c;
		addr.svm_cid = VMADDR_CID_ANY;
		addr.svm_port = (unsigned)strtoul(argv[2], NULL, 0);
		if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
			return fail("bind");
		if (listen(fd, 1) < 0)
			return fail("listen");
		printf("SKIFF-VSOCK-LISTENING=%u\n", addr.svm_port);
		fflush(stdout);
		c = accept(fd, NULL, NULL);
		if (c < 0)
			return fail("accept");
		read_line(c, line, sizeof(line));
		printf("SKIFF-VSOCK-GOT=%s\n", line);
		fflush(stdout);
		if (write(c, "pong\n", 5) != 5)
			return fail("write");
		close(c);
		return 0;
	}
	if (argc == 5 && strcmp(argv[1], "connect") == 0) {
		addr.svm_cid = (unsigned)strtoul(argv[2], NULL, 0);
		addr.svm_port = (unsigned)strtoul(argv[3], NULL, 0);
		if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
			return fail("connect");
		if (dprintf(fd, "%s\n", argv[4]) < 0)
			return fail("write");
		read_line(fd, line, sizeof(line));
		printf("SKIFF-VSOCK-REPLY=%s\n", line);
		return 0;
	}
	fprintf(stderr, "usage: vsock listen PORT | vsock connect CID PORT MSG | vsock cid\n");
	return 2;
}

/*
 * zeroout DEVICE LENGTH: BLKZEROOUT of the first LENGTH bytes of DEVICE
 * (the kernel sends virtio-blk WRITE_ZEROES without unmap where the disk
 * offers it). Busybox's blkdiscard has no -z. Prints ZEROOUT=0 or the
 * error's number.
 */
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <errno.h>

int main(int argc, char **argv)
{
	uint64_t range[2] = { 0, 0 };
	int fd;

	if (argc != 3) {
		fprintf(stderr, "usage: zeroout DEVICE LENGTH\n");
		return 2;
	}
	range[1] = strtoull(argv[2], NULL, 0);
	fd = open(argv[1], O_WRONLY);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	if (ioctl(fd, BLKZEROOUT, range) < 0) {
		printf("ZEROOUT=%d\n", errno);
		return 1;
	}
	printf("ZEROOUT=0\n");
	return 0;
}

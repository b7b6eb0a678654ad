/*
 * xattr PATH NAME...: print each extended attribute of PATH as NAME=VALUE,
 * the value as a little-endian number when it is 4 or 8 bytes (how QEMU's
 * and skiff's 9p mapped-xattr model store uid, gid, mode and rdev: decimal,
 * octal for a NAME ending in "mode"), else as hex; NAME=- when PATH has no
 * such attribute. The test host's busybox has
 * no getfattr.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/xattr.h>

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: xattr PATH NAME...\n");
		return 2;
	}
	for (int i = 2; i < argc; i++) {
		unsigned char v[64];
		ssize_t n = lgetxattr(argv[1], argv[i], v, sizeof(v));
		printf("%s=", argv[i]);
		if (n == 4 || n == 8) {
			uint64_t x = 0;
			for (ssize_t b = n - 1; b >= 0; b--)
				x = (x << 8) | v[b];
			size_t len = strlen(argv[i]);
			int mode = len >= 4 && strcmp(argv[i] + len - 4, "mode") == 0;
			printf(mode ? "%llo\n" : "%llu\n", (unsigned long long)x);
		} else if (n >= 0) {
			for (ssize_t b = 0; b < n; b++)
				printf("%02x", v[b]);
			printf("\n");
		} else {
			printf("-\n");
		}
	}
	return 0;
}

/*
 * stamp: run a program, pass its output through, and measure it.
 *
 *   stamp [-t SECS] [-m MARKER] [-r FILE] [-q] -- PROG [ARGS...]
 *
 * PROG runs in its own process group with stdout and stderr sent to one
 * pipe; stamp copies everything from that pipe to its own stdout as it
 * arrives (unless -q). stdin is inherited.
 *
 *   -t SECS    time limit: then SIGTERM to PROG's process group, SIGKILL
 *              2 s later; the exit status is then 124 (as GNU timeout).
 *   -m MARKER  note the time of the first output line containing MARKER.
 *   -r FILE    write one line "rc=N exit_ms=N marker_ms=N maxrss_kb=N"
 *              (marker_ms=-1 when MARKER was never seen). Times are
 *              milliseconds of CLOCK_MONOTONIC since just before the exec;
 *              maxrss_kb is PROG's peak RSS (ru_maxrss from wait4).
 *   -q         do not copy the output (it is still scanned for MARKER).
 *
 * Exit status: PROG's exit status, 128+N if killed by signal N, 124 on
 * time-out, 125 if stamp itself failed.
 *
 * When PROG exits, whatever is left of its process group is killed, so a
 * scenario cannot leave VMMs running behind it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: stamp [-t SECS] [-m MARKER] [-r FILE] [-q] -- PROG [ARGS...]\n");
	exit(125);
}

static void write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return; /* stdout gone: keep draining the child anyway */
		}
		buf += n;
		len -= (size_t)n;
	}
}

int main(int argc, char **argv)
{
	long timeout_s = 0;
	const char *marker = NULL, *result = NULL;
	int quiet = 0, opt;

	while ((opt = getopt(argc, argv, "+t:m:r:q")) != -1) {
		switch (opt) {
		case 't': timeout_s = strtol(optarg, NULL, 10); break;
		case 'm': marker = optarg; break;
		case 'r': result = optarg; break;
		case 'q': quiet = 1; break;
		default: usage();
		}
	}
	if (optind >= argc)
		usage();

	int pfd[2];
	if (pipe2(pfd, O_CLOEXEC) < 0) {
		perror("stamp: pipe");
		return 125;
	}

	long long t0 = now_ms();
	pid_t pid = fork();
	if (pid < 0) {
		perror("stamp: fork");
		return 125;
	}
	if (pid == 0) {
		setpgid(0, 0);
		dup2(pfd[1], 1);
		dup2(pfd[1], 2);
		execvp(argv[optind], argv + optind);
		fprintf(stderr, "stamp: cannot run %s: %s\n", argv[optind], strerror(errno));
		_exit(127);
	}
	setpgid(pid, pid); /* both sides, to win the race */
	close(pfd[1]);

	long long deadline = timeout_s > 0 ? t0 + timeout_s * 1000 : -1;
	long long kill_at = -1, marker_ms = -1, exit_ms = -1, drain_until = -1;
	int timed_out = 0, status = 0, exited = 0, pipe_open = 1;
	struct rusage ru;
	char line[8192];
	size_t line_len = 0;

	memset(&ru, 0, sizeof(ru));
	while (pipe_open || !exited) {
		int wait_ms = 100;
		struct pollfd p = { .fd = pfd[0], .events = POLLIN };

		if (pipe_open) {
			int n = poll(&p, 1, wait_ms);

			if (n > 0) {
				char buf[4096];
				ssize_t r = read(pfd[0], buf, sizeof(buf));

				if (r > 0) {
					if (!quiet)
						write_all(1, buf, (size_t)r);
					if (marker && marker_ms < 0) {
						for (ssize_t i = 0; i < r; i++) {
							if (buf[i] == '\n') {
								line_len = 0;
								continue;
							}
							if (line_len < sizeof(line) - 1)
								line[line_len++] = buf[i];
							line[line_len] = 0;
							if (strstr(line, marker)) {
								marker_ms = now_ms() - t0;
								break;
							}
						}
					}
				} else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
					pipe_open = 0;
				}
			}
		} else {
			usleep(wait_ms * 1000);
		}

		if (!exited) {
			pid_t w = wait4(pid, &status, WNOHANG, &ru);

			if (w == pid) {
				exited = 1;
				exit_ms = now_ms() - t0;
				/* give leftovers in the pipe a moment, then end the group */
				drain_until = now_ms() + 300;
			}
		}
		long long t = now_ms();
		if (exited && pipe_open && t >= drain_until) {
			kill(-pid, SIGKILL);
			/* read what is left without blocking, then stop */
			fcntl(pfd[0], F_SETFL, O_NONBLOCK);
			for (;;) {
				char buf[4096];
				ssize_t r = read(pfd[0], buf, sizeof(buf));

				if (r <= 0)
					break;
				if (!quiet)
					write_all(1, buf, (size_t)r);
			}
			pipe_open = 0;
		}
		if (!exited && deadline >= 0 && t >= deadline && !timed_out) {
			timed_out = 1;
			kill(-pid, SIGTERM);
			kill(pid, SIGTERM);
			kill_at = t + 2000;
		}
		if (!exited && kill_at >= 0 && t >= kill_at) {
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
			kill_at = -1;
		}
	}
	kill(-pid, SIGKILL); /* anything the program left behind */

	int rc;
	if (timed_out)
		rc = 124;
	else if (WIFEXITED(status))
		rc = WEXITSTATUS(status);
	else if (WIFSIGNALED(status))
		rc = 128 + WTERMSIG(status);
	else
		rc = 125;

	if (result) {
		FILE *f = fopen(result, "w");

		if (!f) {
			perror("stamp: result file");
			return 125;
		}
		fprintf(f, "rc=%d exit_ms=%lld marker_ms=%lld maxrss_kb=%ld\n",
			rc, exit_ms, marker_ms, ru.ru_maxrss);
		fclose(f);
	}
	return rc;
}

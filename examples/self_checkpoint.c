/*
 * self_checkpoint: a counter that checkpoints itself, as the seed's self_checkpoint.c does
 * with checkpoint(0, ...), but through the `checkpoint` command-line tool.
 *
 *   usage: self_checkpoint IMAGE [EVERY]      (EVERY counts between checkpoints, default 50)
 *   environment: CHECKPOINT = the checkpoint tool (default: "checkpoint" on PATH)
 *
 * Every 20 ms it prints "count N"; after every EVERY counts it checkpoints itself to IMAGE and
 * prints "checkpointed crid=N", or, in a process restarted from that image, "restarted"; then
 * it carries on counting. Build: gcc -O1 -Wall -o self_checkpoint self_checkpoint.c
 *
 * How (a checkpointer cannot stop itself): the caller makes a pipe, forks a helper twice over
 * (so the helper is no descendant of the caller and stays out of the image), and blocks in
 * read() on the pipe. The helper execs `checkpoint PID -o IMAGE -v` with its stderr on the
 * pipe; the tool stops the caller inside that read(), writes the image, lets it go and says
 * "checkpoint id N". A restarted caller finds the pipe with no writer: read() returns end of
 * file at once, and its start time (a restarted process is a new process) tells it that it
 * was restarted rather than failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PR_SET_PTRACER
#define PR_SET_PTRACER 0x59616d61
#endif

/* field 22 of /proc/self/stat: clock ticks after boot at which this process started */
static unsigned long long start_time(void)
{
	char buf[1024];
	int fd = open("/proc/self/stat", O_RDONLY);
	ssize_t len = fd < 0 ? -1 : read(fd, buf, sizeof(buf) - 1);
	unsigned long long t = 0;
	char *p;
	int field;

	if (fd >= 0)
		close(fd);
	if (len <= 0)
		return 0;
	buf[len] = '\0';
	p = strrchr(buf, ')');
	for (field = 2; p && field < 22; field++)
		p = strchr(p + 1, ' ');
	if (p)
		t = strtoull(p + 1, NULL, 10);
	return t;
}

static void helper(pid_t target, const char *image, int result_w, int go_r)
{
	const char *tool = getenv("CHECKPOINT") ? getenv("CHECKPOINT") : "checkpoint";
	char pid[32], go;

	dprintf(result_w, "helper %d\n", (int)getpid());
	if (read(go_r, &go, 1) != 1)
		_exit(0);	/* the caller gave up */
	snprintf(pid, sizeof(pid), "%d", (int)target);
	dup2(result_w, 2);	/* the tool's "checkpoint id N" or its error */
	execlp(tool, tool, pid, "-o", image, "-v", (char *)NULL);
	dprintf(2, "cannot run %s: %s\n", tool, strerror(errno));
	_exit(127);
}

/* > 0: the crid; 0: this process was restarted from the image; -1: failed (said why) */
static long self_checkpoint(const char *image)
{
	unsigned long long started = start_time();
	int result[2], go[2];
	char answer[4096];
	size_t got = 0;
	ssize_t n;
	pid_t middle, me = getpid();
	long crid = -1;
	char *at;

	if (pipe2(result, O_CLOEXEC) || pipe2(go, O_CLOEXEC))
		return -1;
	middle = fork();
	if (middle == 0) {
		close(result[0]);
		close(go[1]);
		if (fork() == 0)
			helper(me, image, result[1], go[0]);
		_exit(0);
	}
	close(result[1]);
	close(go[0]);
	if (middle < 0 || waitpid(middle, NULL, 0) != middle) {
		close(result[0]);
		close(go[1]);
		return -1;
	}
	/* the hello line, then let the helper trace us (Yama) and go */
	while (got < sizeof(answer) - 1 && (n = read(result[0], answer + got, 1)) == 1)
		if (answer[got++] == '\n')
			break;
	answer[got] = '\0';
	if (strncmp(answer, "helper ", 7) == 0)
		prctl(PR_SET_PTRACER, atol(answer + 7), 0, 0, 0);	/* EINVAL without Yama */
	n = write(go[1], "g", 1);
	close(go[1]);
	if (n != 1) {	/* the helper is gone: no checkpoint */
		close(result[0]);
		return -1;
	}
	/* stopped, checkpointed and let go somewhere in this read loop */
	got = 0;
	while (got < sizeof(answer) - 1) {
		n = read(result[0], answer + got, sizeof(answer) - 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += n;
	}
	answer[got] = '\0';
	close(result[0]);
	prctl(PR_SET_PTRACER, 0, 0, 0, 0);
	at = strstr(answer, "checkpoint id ");
	if (at)
		crid = atol(at + strlen("checkpoint id "));
	else if (got == 0 && start_time() != started)
		crid = 0;
	else
		dprintf(2, "self_checkpoint: %s", got ? answer : "the helper ended without a word\n");
	return crid;
}

int main(int argc, char **argv)
{
	long every = argc > 2 ? atol(argv[2]) : 50;
	long count, crid;

	if (argc < 2 || every <= 0) {
		fprintf(stderr, "usage: %s IMAGE [EVERY]\n", argv[0]);
		return 2;
	}
	for (count = 0;; count++) {
		dprintf(1, "count %ld\n", count);
		if ((count + 1) % every == 0) {
			crid = self_checkpoint(argv[1]);
			if (crid > 0)
				dprintf(1, "checkpointed crid=%ld\n", crid);
			else if (crid == 0)
				dprintf(1, "restarted\n");
			else
				dprintf(1, "checkpoint failed\n");
		}
		usleep(20000);
	}
}

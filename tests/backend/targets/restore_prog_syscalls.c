/* Restart proof target: a process that sits in a blocking syscall.
 *
 *   restore_prog_syscalls read FIFO    blocks in read(2) on FIFO (opened O_RDWR: never EOF);
 *                                      each line read is written back as "got LINE"
 *   restore_prog_syscalls pause        blocks in pause(2); SIGUSR1 (a handler) wakes it:
 *                                      "woke ret=R errno=E handled=H"
 *   restore_prog_syscalls sleep MS     clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) to a
 *                                      deadline MS ms ahead, then "slept COUNT"; an EINTR
 *                                      (no handler is installed: Linux never gives one) is
 *                                      written as "eintr COUNT" and the sleep retried
 *   restore_prog_syscalls nanosleep MS relative nanosleep(req, &rem) of MS ms, retried with
 *                                      rem on EINTR ("eintr COUNT"), then "slept COUNT"
 * Any other return of the blocking call is written as "error ..." and the process exits 3.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t handled;
static void on_usr1(int sig) { (void)sig; handled = 1; }

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "read") && argc > 2) {
        int fd = open(argv[2], O_RDWR);
        if (fd < 0) { perror(argv[2]); return 2; }
        dprintf(1, "READY pid=%d\n", getpid());
        char buf[256];
        for (;;) {
            ssize_t n = read(fd, buf, sizeof buf - 1);
            if (n <= 0) { dprintf(1, "error read=%zd errno=%d\n", n, errno); return 3; }
            buf[n] = 0;
            if (n && buf[n - 1] == '\n') buf[n - 1] = 0;
            dprintf(1, "got %s\n", buf);
        }
    }
    if (!strcmp(mode, "pause")) {
        struct sigaction sa = {0};
        sa.sa_handler = on_usr1;
        sigaction(SIGUSR1, &sa, NULL);
        dprintf(1, "READY pid=%d\n", getpid());
        for (;;) {
            int r = pause();
            dprintf(1, "woke ret=%d errno=%d handled=%d\n", r, errno, handled);
            handled = 0;
        }
    }
    if ((!strcmp(mode, "sleep") || !strcmp(mode, "nanosleep")) && argc > 2) {
        long ms = atol(argv[2]);
        dprintf(1, "READY pid=%d\n", getpid());
        for (uint64_t n = 0;; n++) {
            if (!strcmp(mode, "sleep")) {
                struct timespec deadline;
                clock_gettime(CLOCK_MONOTONIC, &deadline);
                deadline.tv_sec += ms / 1000;
                deadline.tv_nsec += (ms % 1000) * 1000000L;
                if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
                int r;
                while ((r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL)) == EINTR)
                    dprintf(1, "eintr %llu\n", (unsigned long long)n);
                if (r) { dprintf(1, "error clock_nanosleep=%d\n", r); return 3; }
            } else {
                struct timespec req = {ms / 1000, (ms % 1000) * 1000000L}, rem;
                while (nanosleep(&req, &rem) == -1) {
                    if (errno != EINTR) { dprintf(1, "error nanosleep errno=%d\n", errno); return 3; }
                    dprintf(1, "eintr %llu\n", (unsigned long long)n);
                    req = rem;
                }
            }
            dprintf(1, "slept %llu\n", (unsigned long long)n);
        }
    }
    fprintf(stderr, "usage: %s read FIFO | pause | sleep MS | nanosleep MS\n", argv[0]);
    return 2;
}

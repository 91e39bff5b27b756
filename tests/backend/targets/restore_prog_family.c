/* Restart proof target: a parent with a living child and a zombie child.
 *
 * The parent forks child A, which makes its own process group and counts ("c COUNT ppid=P"),
 * and child B, which exits at once with status 7 and stays a zombie (never reaped until
 * asked). The parent counts ("p COUNT"). On SIGUSR1 the parent reaps B and writes
 * "reaped PID status=S" (S: the raw wait status), then "a-alive PID" if A still runs.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t reap_asked;
static void on_usr1(int sig) { (void)sig; reap_asked = 1; }

static void tick(void) {
    struct timespec t = {0, 5 * 1000 * 1000};
    while (nanosleep(&t, &t) == -1)
        ;
}

int main(void) {
    pid_t a = fork();
    if (a == 0) {
        setpgid(0, 0);
        for (uint64_t n = 0;; n++) {
            dprintf(1, "c %llu ppid=%d\n", (unsigned long long)n, getppid());
            tick();
        }
    }
    pid_t b = fork();
    if (b == 0)
        _exit(7);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    dprintf(1, "READY pid=%d a=%d b=%d\n", getpid(), a, b);
    for (uint64_t n = 0;; n++) {
        if (reap_asked) {
            reap_asked = 0;
            int status = -1;
            pid_t got = waitpid(b, &status, WNOHANG);
            dprintf(1, "reaped %d status=%d\n", got, status);
            if (waitpid(a, &status, WNOHANG) == 0)
                dprintf(1, "a-alive %d\n", a);
        }
        dprintf(1, "p %llu\n", (unsigned long long)n);
        tick();
    }
}

/* Restart proof target: handlers, an alternate stack, blocked pending signals, an ignored one.
 *
 * SIGUSR1: SA_SIGINFO|SA_ONSTACK handler on a 64 KiB sigaltstack (heap); it writes
 *   "usr1 onstack=1" when its frame is on that stack. The main loop then unblocks SIGUSR2 and
 *   SIGRTMIN+1, which have been pending (blocked) since start: SIGUSR2 sent by kill(), and
 *   SIGRTMIN+1 queued twice with sigqueue values 11 and 22; their SA_SIGINFO handlers write
 *   "usr2 code=C" and "rt value=V" (in queue order), after which the loop writes "unblocked".
 * SIGTERM is ignored. The loop counts ("n COUNT") every ~5 ms.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static char *alt;
#define ALT_SIZE (64 * 1024)
static volatile sig_atomic_t got_usr1;

static void on_usr1(int sig, siginfo_t *si, void *uc) {
    char here;
    (void)sig; (void)si; (void)uc;
    dprintf(1, "usr1 onstack=%d\n", &here >= alt && &here < alt + ALT_SIZE);
    got_usr1 = 1;
}

static void on_usr2(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    dprintf(1, "usr2 code=%d\n", si->si_code);
}

static void on_rt(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    dprintf(1, "rt value=%d\n", si->si_value.sival_int);
}

int main(void) {
    alt = malloc(ALT_SIZE);
    stack_t ss = {.ss_sp = alt, .ss_size = ALT_SIZE, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    struct sigaction sa = {0};
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sa.sa_sigaction = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_flags = SA_SIGINFO;
    sa.sa_sigaction = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    sa.sa_sigaction = on_rt;
    sigaction(SIGRTMIN + 1, &sa, NULL);
    signal(SIGTERM, SIG_IGN);
    sigset_t held;
    sigemptyset(&held);
    sigaddset(&held, SIGUSR2);
    sigaddset(&held, SIGRTMIN + 1);
    sigprocmask(SIG_BLOCK, &held, NULL);
    kill(getpid(), SIGUSR2);
    sigqueue(getpid(), SIGRTMIN + 1, (union sigval){.sival_int = 11});
    sigqueue(getpid(), SIGRTMIN + 1, (union sigval){.sival_int = 22});
    dprintf(1, "READY pid=%d rt=%d\n", getpid(), SIGRTMIN + 1);
    for (uint64_t n = 0;; n++) {
        if (got_usr1) {
            got_usr1 = 0;
            sigprocmask(SIG_UNBLOCK, &held, NULL);
            dprintf(1, "unblocked\n");
        }
        dprintf(1, "n %llu\n", (unsigned long long)n);
        struct timespec t = {0, 5 * 1000 * 1000};
        while (nanosleep(&t, &t) == -1)
            ;
    }
}

/* Target for tests/backend/test_ptrace.py.
 *
 * usage: ptrace_target MODE [NTHREADS]
 *   tick   main thread: nanosleep(1 ms), print "tick N" (forever); NTHREADS extra threads sleep
 *   spin   main thread spins at the label spin_loop with r12 = MAGIC (never enters the kernel)
 *   block  main thread: read(0, &c, 1) in a loop, printing "got C" or "read R errno E"
 *   churn  main thread creates short-lived threads (each sleeps ~1 ms) without pause
 *
 * Before the mode starts: SIGUSR1 gets a SA_SIGINFO|SA_RESTART handler (sa_mask = {SIGWINCH}),
 * SIGUSR2 and signal 35 (SIGRTMIN+1 for glibc) are blocked, the extra threads are started and
 * have reached their loop (a barrier), and one line is printed (the readiness handshake):
 *   READY pid=P handler=0x.. tp=0x.. local=0x.. spin=0x.. magic=0x..
 * tp is pthread_self() of the main thread (= its fs_base on x86_64), local the address of a
 * variable on the main thread's stack.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x1122334455667788UL

extern char spin_loop[];

static volatile sig_atomic_t got_usr1;

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
    (void)sig; (void)si; (void)uc;
    got_usr1 = 1;
}

static pthread_barrier_t started;

static void *sleeper(void *arg)
{
    (void)arg;
    pthread_barrier_wait(&started);  /* past glibc's start-up (signals all blocked there) */
    struct timespec ts = {0, 1000000};
    for (;;)
        nanosleep(&ts, NULL);
    return NULL;
}

static void *short_lived(void *arg)
{
    (void)arg;
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
    return NULL;
}

static __attribute__((noinline, noreturn)) void spin(void)
{
    register unsigned long r12 asm("r12") = MAGIC;
    asm volatile("spin_loop:\n\tjmp spin_loop\n" : : "r"(r12));
    __builtin_unreachable();
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "tick";
    int nthreads = argc > 2 ? atoi(argv[2]) : 0;
    volatile long local = 0;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGWINCH);
    if (sigaction(SIGUSR1, &sa, NULL)) { perror("sigaction"); return 1; }

    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR2);
    sigaddset(&block, 35);
    if (sigprocmask(SIG_BLOCK, &block, NULL)) { perror("sigprocmask"); return 1; }

    pthread_barrier_init(&started, NULL, nthreads + 1);
    for (int i = 0; i < nthreads; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, sleeper, NULL)) { perror("pthread_create"); return 1; }
    }
    pthread_barrier_wait(&started);

    printf("READY pid=%d handler=%p tp=%p local=%p spin=%p magic=%#lx\n", (int)getpid(),
           (void *)on_usr1, (void *)pthread_self(), (void *)&local, (void *)spin_loop, MAGIC);
    fflush(stdout);

    if (!strcmp(mode, "spin"))
        spin();
    if (!strcmp(mode, "block")) {
        for (;;) {
            char c;
            ssize_t r = read(0, &c, 1);
            if (r == 1)
                printf("got %c\n", c);
            else
                printf("read %zd errno %d\n", r, r < 0 ? errno : 0);
            fflush(stdout);
            if (r == 0)
                return 0;
        }
    }
    if (!strcmp(mode, "churn")) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        for (;;) {
            pthread_t t;
            if (pthread_create(&t, &attr, short_lived, NULL)) {
                struct timespec ts = {0, 100000};
                nanosleep(&ts, NULL);   /* EAGAIN: too many threads for now */
            }
        }
    }
    struct timespec ts = {0, 1000000};
    for (long n = 1;; n++) {
        nanosleep(&ts, NULL);
        printf("tick %ld\n", n);
        fflush(stdout);
    }
}

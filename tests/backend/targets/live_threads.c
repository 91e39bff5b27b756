/* A multi-threaded target for live checkpoint tests: the main thread and three pthreads,
 * each with its own signal mask and each blocked in a different syscall:
 *   thread 1 blocks SIGUSR1 and sits in poll() on an empty pipe,
 *   thread 2 blocks SIGUSR2 and sits in clock_nanosleep(),
 *   thread 3 blocks SIGRTMIN+2 and waits on a condition variable (futex).
 * The main thread blocks nothing and reads stdin. Prints
 * "READY main=TID f0=PTHREAD_SELF tN=TID fN=PTHREAD_SELF sigN=SIGNO ..." once every thread has
 * reported in, then echoes stdin lines ("ok <line>") until EOF. */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int pfd[2];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER, never = PTHREAD_COND_INITIALIZER;
static int reported;
static pid_t tids[4];
static unsigned long selves[4];
static int sigs[4];

static void *run(void *arg) {
    int i = (int)(long)arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sigs[i]);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    pthread_mutex_lock(&lock);
    tids[i] = (pid_t)syscall(SYS_gettid);
    selves[i] = (unsigned long)pthread_self();
    reported++;
    pthread_cond_broadcast(&cond);
    if (i == 3) {
        for (;;) pthread_cond_wait(&never, &lock);          /* futex */
    }
    pthread_mutex_unlock(&lock);
    if (i == 1) {
        struct pollfd p = {.fd = pfd[0], .events = POLLIN};
        for (;;) poll(&p, 1, -1);                           /* nothing is ever written */
    }
    struct timespec ts = {3600, 0};
    for (;;) clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
    return NULL;
}

int main(void) {
    if (pipe(pfd)) return 1;
    sigs[0] = 0;
    sigs[1] = SIGUSR1;
    sigs[2] = SIGUSR2;
    sigs[3] = SIGRTMIN + 2;
    tids[0] = (pid_t)syscall(SYS_gettid);
    selves[0] = (unsigned long)pthread_self();
    pthread_t th[4];
    for (long i = 1; i <= 3; i++)
        if (pthread_create(&th[i], NULL, run, (void *)i)) return 1;
    pthread_mutex_lock(&lock);
    while (reported < 3) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    printf("READY main=%d f0=%#lx", tids[0], selves[0]);
    for (int i = 1; i <= 3; i++)
        printf(" t%d=%d f%d=%#lx sig%d=%d", i, tids[i], i, selves[i], i, sigs[i]);
    printf("\n");
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        printf("ok %s", line);
        fflush(stdout);
    }
    return 0;
}

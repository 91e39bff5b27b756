/* Restart proof target: threads that each count.
 *
 *   restore_prog_threads NTHREADS
 *
 * Starts NTHREADS threads (named "cnt0", "cnt1"...); thread k counts in its own heap block
 * and writes "tK COUNT" every ~5 ms; every step also adds one to a total under a mutex. The
 * main thread waits in pthread_join (a futex wait) and never returns from it.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t total;

struct counter { int k; uint64_t count; };

static void *run(void *arg) {
    struct counter *c = arg;
    char name[16];
    snprintf(name, sizeof name, "cnt%d", c->k);
    pthread_setname_np(pthread_self(), name);
    for (;;) {
        pthread_mutex_lock(&lock);
        uint64_t t = ++total;
        pthread_mutex_unlock(&lock);
        dprintf(1, "t%d %llu total %llu\n", c->k, (unsigned long long)c->count++,
                (unsigned long long)t);
        struct timespec ts = {0, 5 * 1000 * 1000};
        while (nanosleep(&ts, &ts) == -1)
            ;
    }
    return NULL;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 4;
    if (n < 1 || n > 64) {
        fprintf(stderr, "usage: %s NTHREADS(1..64)\n", argv[0]);
        return 2;
    }
    pthread_t th[64];
    for (int k = 0; k < n; k++) {
        struct counter *c = calloc(1, sizeof *c);
        c->k = k;
        pthread_create(&th[k], NULL, run, c);
    }
    dprintf(1, "READY pid=%d\n", getpid());
    pthread_join(th[0], NULL);
    return 1;
}

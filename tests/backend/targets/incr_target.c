/* Target for tests/backend/test_incremental_live.py (live incremental checkpoints).
 *
 * usage: incr_target DIR NPAGES [RATE [POPULATE [WORK_ROUNDS [ITERS]]]]
 *
 * Maps region a: NPAGES private anonymous pages between PROT_NONE guard pages. Writing page i
 * stores v = ++counter in its first and last 8 bytes and last[i] = v (a table elsewhere);
 * pages 0, 2, 3, 4 are written before READY. Prints "READY a=HEX" on stdout, then takes
 * stdin, stdout and stderr from /dev/null (a restored copy must not depend on the test's pipes) and
 * runs on signals:
 *   SIGUSR1  the next step: step 1 writes pages 1, 5, 6; step 2 writes 5 and 9 and drops
 *            2..3 (MADV_DONTNEED: last[] = 0); step 3 writes 0 and NPAGES-1; step k > 3
 *            writes page (7 k) % NPAGES, and step 4 first marks region a MADV_RANDOM (a
 *            VmFlags change, "rr", that leaves its maps line as it was) and step 5 sets
 *            SIGURG to SIG_IGN; then DIR/step-K holds "done"
 *   SIGUSR2  check every page against last[] and write DIR/report-N (N counts reports):
 *            "OK" or "BAD I GOT WANT" on the first line, then "I V" for every page with V != 0
 * With RATE > 0 it also writes RATE pages per second (pseudo-random pages, 100 batches a
 * second) until killed: a target that keeps writing while pre-copy rounds run.
 * POPULATE = 1 writes every page before READY (bench/bench_incremental.py: 1 GiB in use).
 * WORK_ROUNDS > 0: the first WORK_ROUNDS * 100 batches are separated by ITERS iterations of a
 * compute loop instead of a 10 ms sleep (ITERS 0: calibrated to about 10 ms before READY),
 * starting at the first SIGUSR1 (which is no step); the wall time they took goes to
 * DIR/work-0 ("NS"), then it sleeps between batches as above.
 * READY also says iters=ITERS.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PG 4096

static volatile sig_atomic_t steps_asked, reports_asked;
static unsigned char *a;
static unsigned long *last;
static unsigned long counter, npages;
static const char *dir;

static volatile unsigned sink_value;

static unsigned long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000ULL + t.tv_nsec;
}

static void compute(unsigned long iters)
{
    unsigned v = sink_value;
    for (unsigned long k = 0; k < iters; k++)
        v = v * 1103515245u + 12345u;
    sink_value = v;
}

static void on_usr1(int sig) { (void)sig; steps_asked++; }
static void on_usr2(int sig) { (void)sig; reports_asked++; }

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void put(unsigned long i)
{
    unsigned long v = ++counter;
    memcpy(a + i * PG, &v, 8);
    memcpy(a + i * PG + PG - 8, &v, 8);
    last[i] = v;
}

static void drop(unsigned long i, unsigned long n)
{
    if (madvise(a + i * PG, n * PG, MADV_DONTNEED))
        die("madvise");
    for (unsigned long k = i; k < i + n; k++)
        last[k] = 0;
}

static void write_file(const char *name, long n, const char *text)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s-%ld.tmp", dir, name, n);
    FILE *f = fopen(path, "w");
    if (!f)
        die("fopen");
    fputs(text, f);
    fclose(f);
    char final[4096];
    snprintf(final, sizeof final, "%s/%s-%ld", dir, name, n);
    rename(path, final);
}

static void step(long k)
{
    if (k == 1) {
        put(1); put(5); put(6);
    } else if (k == 2) {
        put(5); put(9); drop(2, 2);
    } else if (k == 3) {
        put(0); put(npages - 1);
    } else {
        if (k == 4 && madvise(a, npages * PG, MADV_RANDOM))
            die("madvise");
        if (k == 5 && signal(SIGURG, SIG_IGN) == SIG_ERR)
            die("signal");
        put((7 * k) % npages);
    }
    write_file("step", k, "done\n");
}

static void report(long n)
{
    char path[4096], final[4096];
    snprintf(path, sizeof path, "%s/report-%ld.tmp", dir, n);
    snprintf(final, sizeof final, "%s/report-%ld", dir, n);
    FILE *f = fopen(path, "w");
    if (!f)
        die("fopen");
    int bad = 0;
    for (unsigned long i = 0; i < npages && !bad; i++) {
        unsigned long head, tail;
        memcpy(&head, a + i * PG, 8);
        memcpy(&tail, a + i * PG + PG - 8, 8);
        if (head != last[i] || tail != last[i]) {
            fprintf(f, "BAD %lu %lu %lu\n", i, head, last[i]);
            bad = 1;
        }
    }
    if (!bad)
        fputs("OK\n", f);
    for (unsigned long i = 0; i < npages; i++)
        if (last[i])
            fprintf(f, "%lu %lu\n", i, last[i]);
    fclose(f);
    rename(path, final);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: incr_target DIR NPAGES [RATE]\n");
        return 2;
    }
    dir = argv[1];
    npages = strtoul(argv[2], NULL, 0);
    long rate = argc > 3 ? atol(argv[3]) : 0;
    int populate = argc > 4 ? atoi(argv[4]) : 0;
    long work_batches = (argc > 5 ? atol(argv[5]) : 0) * 100;
    unsigned long iters = argc > 6 ? strtoul(argv[6], NULL, 0) : 0;
    unsigned char *g = mmap(NULL, (npages + 2) * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g == MAP_FAILED)
        die("mmap");
    a = mmap(g + PG, npages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    last = mmap(NULL, npages * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED || last == MAP_FAILED)
        die("mmap");
    put(0); put(2); put(3); put(4);
    if (populate)
        for (unsigned long i = 5; i < npages; i++)
            put(i);
    if (work_batches && !iters) {             /* about 10 ms of compute */
        unsigned long long t0 = now_ns();
        compute(1000000);
        unsigned long long dt = now_ns() - t0;
        iters = 1000000ULL * 10000000ULL / (dt ? dt : 1);
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGUSR2);
    sigprocmask(SIG_BLOCK, &block, &old);
    printf("READY a=%p iters=%lu\n", (void *)a, iters);
    fflush(stdout);
    int null = open("/dev/null", O_RDWR);
    if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0)
        die("/dev/null");
    close(null);
    long steps_done = 0, reports_done = 0;
    unsigned long seed = 12345;
    if (work_batches) {                       /* the first SIGUSR1 starts the workload */
        while (!steps_asked)
            sigsuspend(&old);
        steps_asked = 0;
    }
    unsigned long long work_began = now_ns();
    for (;;) {
        while (steps_done < steps_asked)
            step(++steps_done);
        while (reports_done < reports_asked)
            report(reports_done++);
        if (rate > 0) {
            sigprocmask(SIG_SETMASK, &old, NULL);
            for (long k = 0; k < (rate + 99) / 100; k++) {
                seed = seed * 6364136223846793005UL + 1442695040888963407UL;
                put((seed >> 17) % npages);
            }
            if (work_batches > 0) {
                compute(iters);
                if (--work_batches == 0) {
                    char text[64];
                    snprintf(text, sizeof text, "%llu\n", now_ns() - work_began);
                    write_file("work", 0, text);
                }
            } else {
                struct timespec ts = {0, 10 * 1000 * 1000};
                nanosleep(&ts, NULL);
            }
            sigprocmask(SIG_BLOCK, &block, NULL);
        } else {
            sigsuspend(&old);
        }
    }
}

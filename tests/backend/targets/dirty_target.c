/* Target for tests/backend/test_dirty.py and bench/bench_dirty_tracking.py.
 *
 * usage: dirty_target FILE     (FILE: at least 8 pages)
 *
 * Maps two regions, each between PROT_NONE guard pages (so no neighbour merges with them):
 *   a: 64 private anonymous pages; pages 0..47 written before READY, 48..63 never touched;
 *   f: FILE mapped MAP_PRIVATE read-write, 8 pages, all read before READY (none written).
 * Prints "READY a=HEX f=HEX" and runs one command per stdin line, answering one line each:
 *   w R A B     write byte 8 of pages [A, B) of region R (a or f): +1      -> "OK"
 *   r R A B     read those pages                                         -> "OK"
 *   s R A B     the sum of byte 8 of those pages                         -> "SUM=N"
 *   i R A B     pread() FILE's first page into each of pages [A, B): the kernel writes
 *               them                                                     -> "OK"
 *   m N         mmap N new anonymous pages and write them all            -> "MAPPED=HEX"
 *   u R A B     munmap pages [A, B) of R                                 -> "OK"
 *   M R A B     mremap pages [A, B) of R to a new address (moved)        -> "MOVED=HEX"
 *   n G         map G GiB of MAP_NORESERVE anonymous memory, write its first page
 *                                                                        -> "SPARSE=HEX"
 *   b N         map and populate a bench region of N pages               -> "BENCH=HEX"
 *   t           write one byte in every page of the bench region, timed  -> "NS=N"
 *   F           fork: the child answers "CHILD=PID" and reads the next commands (its writes
 *               are copy-on-write copies); the parent waits for it, then answers
 *               "REAPED=STATUS" and goes on
 *   x           exit(0)
 * EOF on stdin ends the process too.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PG 4096

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static unsigned char *guarded(size_t n, int flags, int fd)
{
    unsigned char *g = mmap(NULL, (n + 2) * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g == MAP_FAILED)
        die("mmap");
    unsigned char *p = mmap(g + PG, n * PG, PROT_READ | PROT_WRITE, flags | MAP_FIXED, fd, 0);
    if (p == MAP_FAILED)
        die("mmap");
    return p;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: dirty_target FILE\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0)
        die("open");
    unsigned char *a = guarded(64, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    unsigned char *f = guarded(8, MAP_PRIVATE, fd);
    for (int i = 0; i < 48; i++)
        a[i * PG + 8] = 1;
    unsigned sum = 0;
    for (int i = 0; i < 8; i++)
        sum += ((volatile unsigned char *)f)[i * PG];
    (void)sum;
    unsigned char *bench = NULL;
    size_t bench_pages = 0;
    printf("READY a=%p f=%p\n", (void *)a, (void *)f);
    fflush(stdout);

    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char c, r = 0;
        long x = 0, y = 0;
        int n = sscanf(line, "%c %c %ld %ld", &c, &r, &x, &y);
        unsigned char *base = r == 'f' ? f : a;
        if (n == 4 && c == 'w') {
            for (long i = x; i < y; i++)
                base[i * PG + 8]++;
            printf("OK\n");
        } else if (n == 4 && c == 'r') {
            unsigned long s = 0;
            for (long i = x; i < y; i++)
                s += ((volatile unsigned char *)base)[i * PG + 8];
            (void)s;
            printf("OK\n");
        } else if (n == 4 && c == 's') {
            unsigned long s = 0;
            for (long i = x; i < y; i++)
                s += base[i * PG + 8];
            printf("SUM=%lu\n", s);
        } else if (n == 4 && c == 'i') {
            for (long i = x; i < y; i++)
                if (pread(fd, base + i * PG, PG, 0) != PG)
                    die("pread");
            printf("OK\n");
        } else if (n == 4 && c == 'u') {
            if (munmap(base + x * PG, (y - x) * PG))
                die("munmap");
            printf("OK\n");
        } else if (n == 4 && c == 'M') {
            void *to = mmap(NULL, (y - x) * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            void *p = mremap(base + x * PG, (y - x) * PG, (y - x) * PG,
                             MREMAP_MAYMOVE | MREMAP_FIXED, to);
            if (to == MAP_FAILED || p == MAP_FAILED)
                die("mremap");
            printf("MOVED=%p\n", p);
        } else if (sscanf(line, "m %ld", &x) == 1) {
            unsigned char *p = mmap(NULL, x * PG, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED)
                die("mmap");
            for (long i = 0; i < x; i++)
                p[i * PG + 8] = 1;
            printf("MAPPED=%p\n", (void *)p);
        } else if (sscanf(line, "n %ld", &x) == 1) {
            unsigned char *p = mmap(NULL, (size_t)x << 30, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED)
                die("mmap");
            p[8] = 1;
            printf("SPARSE=%p\n", (void *)p);
        } else if (sscanf(line, "b %ld", &x) == 1) {
            bench_pages = x;
            bench = guarded(x, MAP_PRIVATE | MAP_ANONYMOUS, -1);
            for (long i = 0; i < x; i++)
                bench[i * PG] = 1;
            printf("BENCH=%p\n", (void *)bench);
        } else if (line[0] == 't') {
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            for (size_t i = 0; i < bench_pages; i++)
                bench[i * PG]++;
            clock_gettime(CLOCK_MONOTONIC, &t1);
            printf("NS=%lld\n", (t1.tv_sec - t0.tv_sec) * 1000000000LL + t1.tv_nsec - t0.tv_nsec);
        } else if (line[0] == 'F') {
            fflush(stdout);
            pid_t child = fork();
            if (child < 0)
                die("fork");
            if (child == 0) {
                printf("CHILD=%d\n", (int)getpid());
                fflush(stdout);
                continue;
            }
            int status;
            if (waitpid(child, &status, 0) != child)
                die("waitpid");
            printf("REAPED=%d\n", status);
        } else if (line[0] == 'x') {
            return 0;
        } else {
            printf("BAD\n");
        }
        fflush(stdout);
    }
    return 0;
}

/* Target for tests/backend/test_memory_dump.py.
 *
 * usage: memdump FILE      (FILE: 8 pages that the test wrote)
 *
 * Maps and fills memory in known ways, forks a child that copies one page on write, then
 * prints one line (the readiness handshake) and blocks reading stdin; EOF on stdin ends both
 * processes (the parent reaps the child first).
 *   anon:   64 private anonymous pages. Page i of WRITTEN[] is filled with pattern(i, 0);
 *           page 20 is only read (the kernel maps its zero page), page 21 is written with
 *           zeros (a real page that holds zeros). The child then writes pattern(5, 1) to
 *           page 5 (its own copy; the parent keeps pattern(5, 0)).
 *   file:   FILE mapped MAP_PRIVATE, 8 pages, all read; page 3 written with pattern(3, 2).
 *   prot:   4 private anonymous pages filled with pattern(i, 3), then mprotect(PROT_NONE).
 *   shared: 8 MAP_SHARED|MAP_ANONYMOUS pages, pages 0 and 2 filled with pattern(i, 4).
 * pattern(i, g)[j] = (i * 31 + g * 17 + j) % 251 + 1, never zero.
 * Output: "anon=HEX file=HEX prot=HEX shared=HEX child=PID\n".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PG 4096
static const int WRITTEN[] = {0, 1, 2, 5, 10, 11, 12, 13, 40, 63};

static void pattern(unsigned char *p, int i, int g)
{
    for (int j = 0; j < PG; j++)
        p[j] = (unsigned char)((i * 31 + g * 17 + j) % 251 + 1);
}

static void *map(size_t len, int prot, int flags, int fd)
{
    void *p = mmap(NULL, len, prot, flags, fd, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    return p;
}

/* n private anonymous pages, read-write, between two read-only guard pages so that the
 * kernel cannot merge them with a neighbouring mapping */
static unsigned char *guarded(size_t n)
{
    unsigned char *p = map((n + 2) * PG, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    if (mprotect(p + PG, n * PG, PROT_READ | PROT_WRITE)) {
        perror("mprotect");
        exit(2);
    }
    return p + PG;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: memdump FILE\n");
        return 2;
    }
    unsigned char *anon = guarded(64);
    for (size_t k = 0; k < sizeof WRITTEN / sizeof WRITTEN[0]; k++)
        pattern(anon + WRITTEN[k] * PG, WRITTEN[k], 0);
    volatile unsigned char sink = ((volatile unsigned char *)anon)[20 * PG];  /* zero page */
    (void)sink;
    ((volatile unsigned char *)anon)[21 * PG] = 0;                            /* real zeros */

    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) {
        perror("open");
        return 2;
    }
    unsigned char *file = map(8 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd);
    close(fd);
    unsigned sum = 0;
    for (int i = 0; i < 8; i++)
        sum += ((volatile unsigned char *)file)[i * PG];
    (void)sum;
    pattern(file + 3 * PG, 3, 2);

    unsigned char *prot = guarded(4);
    for (int i = 0; i < 4; i++)
        pattern(prot + i * PG, i, 3);
    if (mprotect(prot, 4 * PG, PROT_NONE)) {
        perror("mprotect");
        return 2;
    }

    unsigned char *shared = map(8 * PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1);
    pattern(shared, 0, 4);
    pattern(shared + 2 * PG, 2, 4);

    int ready[2];
    if (pipe(ready)) {
        perror("pipe");
        return 2;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 2;
    }
    char c;
    if (child == 0) {
        close(ready[0]);
        pattern(anon + 5 * PG, 5, 1);
        if (write(ready[1], "c", 1) != 1)
            _exit(2);
        while (read(0, &c, 1) > 0)
            ;
        _exit(0);
    }
    close(ready[1]);
    if (read(ready[0], &c, 1) != 1)
        return 2;
    printf("anon=%lx file=%lx prot=%lx shared=%lx child=%d\n", (unsigned long)anon,
           (unsigned long)file, (unsigned long)prot, (unsigned long)shared, (int)child);
    fflush(stdout);
    while (read(0, &c, 1) > 0)
        ;
    waitpid(child, NULL, 0);
    return 0;
}

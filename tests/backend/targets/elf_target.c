/* Target of tests/backend/restore/test_elfcheck.py. Counts in the file argv[1] (its count,
 * rewritten at offset 0 every 10 ms, so a restarted copy shows it runs on); with argv[2], maps
 * that file PROT_READ|PROT_EXEC (an executable mapping of a file that is not ELF). Prints
 * READY, then counts until killed. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return 1;
    if (argc > 2) {
        int data = open(argv[2], O_RDONLY);
        if (data < 0 || mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, data, 0) == MAP_FAILED)
            return 1;
        close(data);
    }
    printf("READY counter_fd=%d\n", fd);
    fflush(stdout);
    struct timespec tick = {0, 10 * 1000 * 1000};
    for (unsigned long count = 1;; count++) {
        char line[32];
        int n = snprintf(line, sizeof line, "%20lu\n", count);
        if (pwrite(fd, line, n, 0) != n) return 1;
        nanosleep(&tick, NULL);
    }
}

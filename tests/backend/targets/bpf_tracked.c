/* A target for the eBPF tracker's tests: a region of PAGES fresh anonymous pages (never
 * touched) and commands on stdin, one per line, each answered by one line:
 *   w I J ...     write one byte to pages I, J... of the region        -> "done"
 *   dontneed      madvise(MADV_DONTNEED) the region (pages not present) -> "done"
 *   rd I          read() 4096 bytes of /dev/zero into page I (a kernel write) -> "done"
 *   mm            mmap 3 pages, mremap them to 5 pages (may move), mprotect the first
 *                 read-only, madvise the last, munmap, grow brk by a page
 *                 -> "mm a=ADDR b=NEWADDR brk0=OLD brk1=NEW"
 *   fd            open /dev/null, dup it, pipe, write and read the pipe, lseek, close all
 *                 -> "fd null=N dup=D r=R w=W"
 *   fork I ...    fork a child that writes pages I... then waits for "reap" -> "forked child=PID"
 *   reap          let the child exit and reap it                          -> "reaped"
 *   exec          fork a child that execs /bin/sleep 600 (the test kills it) -> "execed child=PID"
 *   thread        start a thread that writes page 0 and exits; join it    -> "done"
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGES 64
#define PAGE 4096

static unsigned char *region;
static int child_pipe = -1;
static pid_t child;

static void write_pages(char *list) {
    for (char *tok = strtok(list, " \n"); tok; tok = strtok(NULL, " \n"))
        region[atoi(tok) * PAGE + 1] = 'w';
}

static void *thread_main(void *arg) {
    (void)arg;
    region[0] = 't';
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    region = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                  -1, 0);
    if (region == MAP_FAILED) return 1;
    printf("READY region=%p pages=%d\n", (void *)region, PAGES);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "w ", 2) == 0) {
            write_pages(line + 2);
            puts("done");
        } else if (strncmp(line, "sig", 3) == 0) {
            struct sigaction sa, old;
            memset(&sa, 0, sizeof sa);
            sa.sa_handler = SIG_IGN;
            sigaction(SIGURG, &sa, &old);             /* set */
            sigaction(SIGURG, NULL, &old);            /* only read */
            puts("done");
        } else if (strncmp(line, "dontneed", 8) == 0) {
            madvise(region, PAGES * PAGE, MADV_DONTNEED);
            puts("done");
        } else if (strncmp(line, "rd ", 3) == 0) {
            int fd = open("/dev/zero", O_RDONLY);
            ssize_t n = read(fd, region + atoi(line + 3) * PAGE, PAGE);
            close(fd);
            puts(n == PAGE ? "done" : "failed");
        } else if (strncmp(line, "mm", 2) == 0) {
            unsigned char *a = mmap(NULL, 3 * PAGE, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            unsigned char *b = mremap(a, 3 * PAGE, 5 * PAGE, MREMAP_MAYMOVE);
            mprotect(b, PAGE, PROT_READ);
            madvise(b + 4 * PAGE, PAGE, MADV_DONTNEED);
            mlock(b + 2 * PAGE, PAGE);             /* VM_LOCKED: the maps lines stay */
            munlock(b + 2 * PAGE, PAGE);
            munmap(b, 5 * PAGE);
            void *brk0 = sbrk(0);
            sbrk(PAGE);
            printf("mm a=%p b=%p brk0=%p brk1=%p\n", (void *)a, (void *)b, brk0, sbrk(0));
        } else if (strncmp(line, "fd", 2) == 0) {
            int null = open("/dev/null", O_RDWR);
            int dup_fd = dup(null);
            int p[2];
            char c;
            if (pipe(p) || write(p[1], "x", 1) != 1 || read(p[0], &c, 1) != 1) return 1;
            lseek(null, 10, SEEK_SET);
            close(p[0]);
            close(p[1]);
            close(dup_fd);
            close(null);
            printf("fd null=%d dup=%d r=%d w=%d\n", null, dup_fd, p[0], p[1]);
        } else if (strncmp(line, "fork", 4) == 0) {
            int p[2];
            if (pipe(p)) return 1;
            child = fork();
            if (child == 0) {
                close(p[1]);
                write_pages(line + 4);
                char c;
                (void)!read(p[0], &c, 1);
                _exit(0);
            }
            close(p[0]);
            child_pipe = p[1];
            printf("forked child=%d\n", child);
        } else if (strncmp(line, "reap", 4) == 0) {
            close(child_pipe);
            waitpid(child, NULL, 0);
            puts("reaped");
        } else if (strncmp(line, "exec", 4) == 0) {
            pid_t pid = fork();
            if (pid == 0) {
                execl("/bin/sleep", "sleep", "600", (char *)NULL);
                _exit(127);
            }
            printf("execed child=%d\n", pid);
        } else if (strncmp(line, "thread", 6) == 0) {
            pthread_t t;
            pthread_create(&t, NULL, thread_main, NULL);
            pthread_join(t, NULL);
            puts("done");
        } else {
            puts("unknown");
        }
    }
    return 0;
}

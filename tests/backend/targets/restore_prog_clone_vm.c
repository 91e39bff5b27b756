/* Restart proof target: two processes sharing one address space, a child made with
 * clone(CLONE_VM | SIGCHLD) (not a thread: its own pid, fds, signal handlers).
 *
 *   restore_prog_clone_vm
 *
 * The child bumps `shared.ticks` every ~2 ms and never calls into libc beyond raw syscalls
 * (it shares the parent's TLS). The parent prints "READY child=PID", then every ~5 ms
 * "n COUNT ticks=TICKS": TICKS is only visible to it through the shared memory. A second
 * without a tick prints "STALLED COUNT" and exits 3 (a restart that gave the two separate
 * copies of their memory shows that way). The child also maps one page (its address in
 * `shared.page`) and writes "child-page" there: the parent checks it can read it ("page ok")
 * once after READY, proving that a mapping one process made is the other's too.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static struct { volatile uint64_t ticks; char *volatile page; } shared;

static long raw_nanosleep(long ns) {
    struct timespec ts = { 0, ns };
    return syscall(SYS_nanosleep, &ts, NULL);   /* returns 0: errno untouched */
}

static int child_main(void *arg) {
    (void)arg;
    syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);    /* never outlives its parent */
    char *page = (char *)syscall(SYS_mmap, NULL, 4096, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memcpy(page, "child-page", 11);
    shared.page = page;
    for (;;) {
        shared.ticks++;
        raw_nanosleep(2000000);
    }
    return 0;
}

int main(void) {
    size_t size = 256 * 1024;
    char *stack = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (stack == MAP_FAILED)
        return 2;
    pid_t child = clone(child_main, stack + size, CLONE_VM | SIGCHLD, NULL);
    if (child < 0)
        return 2;
    while (!shared.page)
        raw_nanosleep(1000000);
    dprintf(1, "READY child=%d\n", (int)child);
    dprintf(1, "page %s\n", strcmp((const char *)shared.page, "child-page") ? "bad" : "ok");
    uint64_t last = shared.ticks, count = 0;
    struct timespec since;
    clock_gettime(CLOCK_MONOTONIC, &since);
    for (;;) {
        raw_nanosleep(5000000);
        uint64_t now = shared.ticks;
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (now != last) {
            last = now;
            since = t;
        } else if ((t.tv_sec - since.tv_sec) * 1000000000L + (t.tv_nsec - since.tv_nsec) > 1000000000L) {
            dprintf(1, "STALLED %llu\n", (unsigned long long)count);
            return 3;
        }
        dprintf(1, "n %llu ticks=%llu\n", (unsigned long long)++count, (unsigned long long)now);
    }
}

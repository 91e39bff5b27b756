/* A parent and a child made with clone() (not a thread) sharing a per-process table:
 *   shared_tables files     CLONE_FILES: one fd table
 *   shared_tables fs        CLONE_FS: one cwd/root/umask
 *   shared_tables sighand   CLONE_VM|CLONE_SIGHAND: one handler table (and the mm)
 *   shared_tables vfork-thread   a second thread vforks; the child never execs
 * Prints "READY child=PID" (from the parent, or the vfork child) and pauses. The child asks
 * for SIGKILL when its parent dies (not the vfork child: its parent waits for it). */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int child_main(void *arg) {
    (void)arg;
    syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    for (;;)
        syscall(SYS_pause);
    return 0;
}

static void *vforker(void *arg) {
    (void)arg;
    pid_t pid = vfork();
    if (pid == 0) {
        char line[64];
        int n = snprintf(line, sizeof line, "READY child=%d\n", (int)getpid());
        if (write(1, line, n) != n)
            _exit(2);
        for (;;)
            pause();
    }
    return NULL;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "files";
    if (!strcmp(mode, "vfork-thread")) {
        pthread_t t;
        pthread_create(&t, NULL, vforker, NULL);
        for (;;)
            pause();
    }
    int flags = !strcmp(mode, "files") ? CLONE_FILES : !strcmp(mode, "fs") ? CLONE_FS
              : CLONE_VM | CLONE_SIGHAND;
    size_t size = 256 * 1024;
    char *stack = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pid_t child = clone(child_main, stack + size, flags | SIGCHLD, NULL);
    if (child < 0)
        return 2;
    printf("READY child=%d\n", (int)child);
    fflush(stdout);
    for (;;)
        pause();
}

/* A small container for --container (leak detection) tests.
 *
 *   container [file PATH] [sharefiles]
 *
 * The launcher makes a new pid namespace and starts its init (pid 1 there), which forks a
 * child (pid 2); init and child share a pipe holding "inside" and have their own memory.
 * By default nothing of the launcher is kept: once set up, init and child point their stdio
 * at /dev/null (opened by themselves) and close their end of a private sync pipe; the launcher
 * waits for its EOF, then prints "READY init=<host pid of init>" and waits for stdin EOF.
 *   file PATH    init also keeps PATH open (O_RDWR|O_CREAT) at fd 10.
 *   sharefiles   init is cloned with CLONE_FILES: it shares its files table with the launcher
 *                (a leak); init then leaves the (shared) stdio alone.
 * init and child die with the launcher (PR_SET_PDEATHSIG SIGKILL): ending the launcher ends
 * the namespace. On stdin EOF the launcher kills init and reaps it. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

static int sync_pipe[2];
static const char *keep_path;
static int share_files;

static void stdio_to_null(void) {
    int fd = open("/dev/null", O_RDWR);
    if (fd < 0) _exit(3);
    for (int i = 0; i < 3; i++) dup2(fd, i);
    if (fd > 2) close(fd);
}

static int init_main(void *arg) {
    (void)arg;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (!share_files) close(sync_pipe[0]);
    unsigned char *mem = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) _exit(3);
    memset(mem, 'C', 4 * 4096);
    int p[2];
    if (pipe(p) || write(p[1], "inside", 6) != 6) _exit(3);
    if (keep_path) {
        int fd = open(keep_path, O_RDWR | O_CREAT, 0600);
        if (fd < 0 || dup2(fd, 10) != 10) _exit(3);
        close(fd);
    }
    pid_t child = fork();
    if (child < 0) _exit(3);
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        stdio_to_null();
        close(sync_pipe[1]);
        if (share_files) close(sync_pipe[0]);
        for (;;) pause();
    }
    if (share_files) {
        if (write(sync_pipe[1], "R", 1) != 1) _exit(3);
    } else {
        stdio_to_null();
        close(sync_pipe[1]);
    }
    for (;;) pause();
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "file") == 0 && i + 1 < argc) keep_path = argv[++i];
        else if (strcmp(argv[i], "sharefiles") == 0) share_files = 1;
    }
    if (pipe(sync_pipe)) return 1;
    static char stack[1 << 16];
    int flags = CLONE_NEWPID | SIGCHLD | (share_files ? CLONE_FILES : 0);
    pid_t init = clone(init_main, stack + sizeof stack, flags, NULL);
    if (init < 0) { perror("clone"); return 1; }
    char c;
    if (share_files) {
        if (read(sync_pipe[0], &c, 1) != 1) return 1;
    } else {
        close(sync_pipe[1]);
        while (read(sync_pipe[0], &c, 1) > 0) {}
        close(sync_pipe[0]);
    }
    printf("READY init=%d\n", init);
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        printf("ok %s", line);
        fflush(stdout);
    }
    kill(init, SIGKILL);
    waitpid(init, NULL, 0);
    return 0;
}

/* A small tree for live checkpoint tests: memory with a known pattern, a file at an offset,
 * a pipe holding bytes, a handler, blocked and pending signals, a child. Prints one READY
 * line with what it set up, then echoes stdin lines ("ok <line>") until EOF. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile int hits;
static void on_usr1(int sig) { (void)sig; hits++; }

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "/tmp/ckpt_tree.data";
    int with_socket = argc > 2 && strcmp(argv[2], "socket") == 0;
    unsigned char *mem = mmap(NULL, 16 * 4096, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return 1;
    for (int page = 0; page < 16; page += 5)            /* pages 0, 5, 10, 15 */
        memset(mem + page * 4096, 'A' + page, 4096);
    memset(mem + 3 * 4096, 0, 4096);                     /* touched, but all zeros */
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || write(fd, "hello world", 11) != 11) return 1;
    lseek(fd, 4, SEEK_SET);
    int pfd[2];
    if (pipe(pfd) || write(pfd[1], "piped", 5) != 5) return 1;
    int sv[2] = {-1, -1};
    /* an AF_INET socket: unix sockets are supported now (backend/sockets.py) */
    if (with_socket && (sv[0] = socket(AF_INET, SOCK_DGRAM, 0)) < 0) return 1;
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR2);
    sigaddset(&block, SIGRTMIN + 1);
    sigprocmask(SIG_BLOCK, &block, NULL);
    union sigval v = {.sival_int = 42};
    sigqueue(getpid(), SIGRTMIN + 1, v);                 /* stays pending: blocked */
    pid_t child = fork();
    if (child == 0) {                       /* dies with its parent: never an orphan */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() == 1) _exit(0);
        for (;;) pause();
    }
    printf("READY mem=%p handler=%p child=%d fd=%d pipe_r=%d pipe_w=%d rt=%d\n", (void *)mem,
           (void *)on_usr1, child, fd, pfd[0], pfd[1], SIGRTMIN + 1);
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        printf("ok %s", line);
        fflush(stdout);
    }
    kill(child, SIGKILL);
    return 0;
}

/* A process tree for live checkpoint tests. The root makes itself a process group leader and
 * maps two shared anonymous segments (MAP_SHARED|MAP_ANONYMOUS of 16 pages, and 4 pages of
 * /dev/zero mapped shared), then forks:
 *   zombie: writes page 9 of the segment ('Z'), exits with status 7, never reaped;
 *   sess:   calls setsid() (a new session and group), writes page 5 ('S');
 *   peer:   stays in the root's group, writes page 7 ('P').
 * The root writes pages 0 and 3 ('R', 'r') and page 1 of the /dev/zero one ('D'). Children
 * die with the root (PR_SET_PDEATHSIG). Prints
 *   READY zombie=PID sess=PID peer=PID shm=ADDR devzero=ADDR
 * once all of that is done (the zombie is waited for with WNOWAIT: it stays a zombie), then
 * echoes stdin lines ("ok <line>") until EOF. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096

static int sync_w;

static pid_t child(unsigned char *shm, int page, int c, int new_session, int code) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (new_session && setsid() < 0) _exit(1);
    memset(shm + page * PAGE, c, PAGE);
    if (code >= 0) _exit(code);
    if (write(sync_w, "x", 1) != 1) _exit(1);
    for (;;) pause();
}

int main(void) {
    if (setpgid(0, 0)) return 1;
    unsigned char *shm = mmap(NULL, 16 * PAGE, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int zfd = open("/dev/zero", O_RDWR);
    unsigned char *dz = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, zfd, 0);
    if (shm == MAP_FAILED || dz == MAP_FAILED) return 1;
    close(zfd);
    int sp[2];
    if (pipe(sp)) return 1;
    sync_w = sp[1];
    memset(shm, 'R', PAGE);
    pid_t zombie = child(shm, 9, 'Z', 0, 7);
    pid_t sess = child(shm, 5, 'S', 1, -1);
    pid_t peer = child(shm, 7, 'P', 0, -1);
    memset(shm + 3 * PAGE, 'r', PAGE);
    memset(dz + PAGE, 'D', PAGE);
    char b[2];
    if (read(sp[0], b, 1) != 1 || read(sp[0], b + 1, 1) != 1) return 1;
    siginfo_t si;
    if (waitid(P_PID, zombie, &si, WEXITED | WNOWAIT)) return 1;
    close(sp[0]);
    close(sp[1]);
    printf("READY zombie=%d sess=%d peer=%d shm=%p devzero=%p\n", zombie, sess, peer,
           (void *)shm, (void *)dz);
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        printf("ok %s", line);
        fflush(stdout);
    }
    kill(sess, SIGKILL);
    kill(peer, SIGKILL);
    return 0;
}

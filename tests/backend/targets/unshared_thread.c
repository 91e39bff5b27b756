/* A target whose second thread has unshared part of what threads share:
 *   unshared_thread files   the thread calls unshare(CLONE_FILES) and opens /dev/null
 *                           (an fd its process's table does not have)
 *   unshared_thread fs      the thread calls unshare(CLONE_FS) and chdir("/") (its own cwd)
 *   unshared_thread none    the thread shares everything (the control case)
 * Prints "READY tid=TID fd=FD" once the thread is done, then echoes stdin lines ("ok <line>")
 * until EOF. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *what;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int ready, fd = -1;
static pid_t tid;

static void *run(void *arg) {
    (void)arg;
    if (!strcmp(what, "files")) {
        if (unshare(CLONE_FILES)) { perror("unshare"); _exit(2); }
        fd = open("/dev/null", O_RDONLY);
    } else if (!strcmp(what, "fs")) {
        if (unshare(CLONE_FS) || chdir("/")) { perror("unshare"); _exit(2); }
    }
    pthread_mutex_lock(&lock);
    tid = (pid_t)syscall(SYS_gettid);
    ready = 1;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    for (;;) pause();
}

int main(int argc, char **argv) {
    what = argc > 1 ? argv[1] : "none";
    pthread_t th;
    if (chdir("/tmp")) return 1;
    pthread_create(&th, NULL, run, NULL);
    pthread_mutex_lock(&lock);
    while (!ready) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    printf("READY tid=%d fd=%d\n", tid, fd);
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        printf("ok %s", line);
        fflush(stdout);
    }
    return 0;
}

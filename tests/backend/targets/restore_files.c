/* Target of tests/backend/restore/test_files.py: open files that a live restart rebuilds.
 *
 *   restore_files files DIR     regular files, a directory, /dev/null, an unlinked file
 *   restore_files pipes DIR     pipes (both ends, one end), a pipe shared with a child, a FIFO
 *   restore_files mapdel DIR    a shared mapping of a file that is then unlinked
 *
 * Each mode sets its files up at fixed fd numbers, prints "READY name=fd ..." and then waits
 * (polling, so a checkpoint can come at any time) for the file DIR/go. It then uses every fd
 * and writes one line per check to DIR/report (written as DIR/report.tmp, then renamed), and
 * sleeps until it is killed. stdout is not used after READY (after a restart it is a pipe
 * nobody reads). A child (pipes mode) writes DIR/child-report the same way.
 *
 * Report lines: "<name> <hex of bytes read>" for reads, "<name>-err <errno>" for a failed
 * call, "<name>-flags <F_GETFL in octal>", "<name>-fd <F_GETFD>", "<name>-nlink <n>", ... */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *dir;
static char report[1 << 16];
static size_t used;

static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    used += vsnprintf(report + used, sizeof report - used, fmt, ap);
    va_end(ap);
}

static void hex(const char *name, const char *buf, ssize_t n) {
    if (n < 0) { say("%s-err %d\n", name, errno); return; }
    say("%s ", name);
    for (ssize_t i = 0; i < n; i++) say("%02x", (unsigned char)buf[i]);
    say("\n");
}

static char *at(const char *leaf) {
    static char paths[8][512];
    static int next;
    char *p = paths[next++ % 8];
    snprintf(p, 512, "%s/%s", dir, leaf);
    return p;
}

static void nap(void) {
    struct timespec ts = {0, 5 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

static void wait_for(const char *leaf) {
    struct stat st;
    while (stat(at(leaf), &st) != 0) nap();
}

static void publish(const char *leaf) {
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", at(leaf));
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, report, used) != (ssize_t)used) exit(3);
    close(fd);
    if (rename(tmp, at(leaf))) exit(3);
    used = 0;
}

static void sleep_forever(void) {
    for (;;) pause();
}

static void must(int ok, const char *what) {
    if (!ok) { perror(what); exit(2); }
}

static void put_at(int fd, int want) {   /* move fd to number want */
    if (fd == want) return;
    must(dup3(fd, want, 0) == want, "dup3");
    close(fd);
}

static void write_file(const char *leaf, const char *text) {
    int fd = open(at(leaf), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    must(fd >= 0 && write(fd, text, strlen(text)) == (ssize_t)strlen(text), leaf);
    close(fd);
}

static void files_mode(void) {
    write_file("data.txt", "0123456789abcdef");
    write_file("log.txt", "line1\n");
    write_file("ro.txt", "ABCDEFGH");
    write_file("gone.txt", "unlinked contents");
    must(mkdir(at("sub"), 0755) == 0, "mkdir");

    int rw = open(at("data.txt"), O_RDWR);
    must(rw >= 0 && lseek(rw, 4, SEEK_SET) == 4, "data.txt");
    put_at(rw, 7);
    int app = open(at("log.txt"), O_WRONLY | O_APPEND);
    must(app >= 0, "log.txt");
    lseek(app, 2, SEEK_SET);
    put_at(app, 9);
    int ro = open(at("ro.txt"), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    must(ro >= 0 && lseek(ro, 2, SEEK_SET) == 2, "ro.txt");
    must(dup3(ro, 12, O_CLOEXEC) == 12, "dup3");
    close(ro);
    int d = open(at("sub"), O_RDONLY | O_DIRECTORY);
    must(d >= 0, "sub");
    put_at(d, 20);
    int null = open("/dev/null", O_WRONLY);
    must(null >= 0, "/dev/null");
    put_at(null, 33);
    int gone = open(at("gone.txt"), O_RDWR);
    must(gone >= 0 && lseek(gone, 3, SEEK_SET) == 3 && unlink(at("gone.txt")) == 0, "gone");
    put_at(gone, 41);
    /* a second description of the unlinked file, read-only, at another position */
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", 41);
    int gone2 = open(self, O_RDONLY);
    must(gone2 >= 0 && lseek(gone2, 9, SEEK_SET) == 9, "gone2");
    put_at(gone2, 42);
    printf("READY rw=7 app=9 ro=12 dir=20 null=33 gone=41 gone2=42\n");
    fflush(stdout);
    wait_for("go");

    char buf[256];
    hex("rw", buf, read(7, buf, 4));
    say("rw-write %zd\n", write(7, "XY", 2));          /* at 8: data.txt 01234567XYabcdef */
    say("app-write %zd\n", write(9, "line2\n", 6));
    hex("ro", buf, read(12, buf, 3));
    say("ro-flags %o\n", fcntl(12, F_GETFL));
    say("ro-fd %d\n", fcntl(12, F_GETFD));
    say("rw-fd %d\n", fcntl(7, F_GETFD));
    struct stat st;
    say("dir-isdir %d\n", fstat(20, &st) == 0 && S_ISDIR(st.st_mode));
    say("dir-fchdir %d\n", fchdir(20));
    say("null-write %zd\n", write(33, "discard", 7));
    hex("gone", buf, read(41, buf, sizeof buf));
    say("gone-nlink %d\n", fstat(41, &st) == 0 ? (int)st.st_nlink : -1);
    say("gone-write %zd\n", pwrite(41, "U", 1, 0));
    hex("gone2", buf, pread(42, buf, sizeof buf, 0));
    hex("gone2-read", buf, read(42, buf, 4));
    publish("report");
    sleep_forever();
}

static void pipes_mode(void) {
    signal(SIGPIPE, SIG_IGN);
    int p[2];
    /* both ends, a grown pipe holding more than a default pipe's 64 KiB */
    must(pipe(p) == 0, "pipe");
    must(fcntl(p[1], F_SETPIPE_SZ, 131072) >= 131072, "F_SETPIPE_SZ");
    static char big[70000];
    for (size_t i = 0; i < sizeof big; i++) big[i] = (char)('a' + i % 26);
    must(write(p[1], big, sizeof big) == (ssize_t)sizeof big, "write big");
    put_at(p[0], 5);
    put_at(p[1], 6);
    /* only the read end: data, then EOF */
    must(pipe(p) == 0, "pipe");
    must(write(p[1], "only-read-end", 13) == 13, "write");
    close(p[1]);
    put_at(p[0], 7);
    /* only the write end: writing fails with EPIPE */
    must(pipe(p) == 0, "pipe");
    close(p[0]);
    put_at(p[1], 8);
    /* a pipe shared with the child (same descriptions), data queued */
    must(pipe(p) == 0, "pipe");
    must(write(p[1], "shared-pipe-data", 16) == 16, "write");
    put_at(p[0], 10);
    put_at(p[1], 11);
    /* a FIFO by path, opened both ways, with data */
    must(mkfifo(at("fifo"), 0600) == 0, "mkfifo");
    int fr = open(at("fifo"), O_RDONLY | O_NONBLOCK);
    int fw = open(at("fifo"), O_WRONLY);
    must(fr >= 0 && fw >= 0 && write(fw, "fifo-data", 9) == 9, "fifo");
    put_at(fr, 13);
    put_at(fw, 14);
    pid_t child = fork();
    must(child >= 0, "fork");
    if (child == 0) {
        wait_for("nb-set");          /* the parent set O_NONBLOCK on fd 10 */
        say("child-flags10 %o\n", fcntl(10, F_GETFL));
        char buf[64];
        hex("child-read10", buf, read(10, buf, 6));
        publish("child-report");
        sleep_forever();
    }
    printf("READY big=5 bigw=6 ronly=7 wonly=8 shr=10 shw=11 fifor=13 fifow=14 child=%d\n",
           child);
    fflush(stdout);
    wait_for("go");

    static char got[140000];
    ssize_t n = 0, r;
    while ((r = read(5, got + n, sizeof got - n)) > 0) {
        n += r;
        if (n >= (ssize_t)sizeof big) break;
    }
    say("big-len %zd\n", n);
    say("big-same %d\n", n == (ssize_t)sizeof big && memcmp(got, big, sizeof big) == 0);
    say("big-size %d\n", fcntl(5, F_GETPIPE_SZ));
    say("big-w-write %zd\n", write(6, "more", 4));
    hex("big-r-more", got, read(5, got, 4));
    char buf[256];
    hex("ronly", buf, read(7, buf, sizeof buf));
    say("ronly-eof %zd\n", read(7, buf, sizeof buf));
    say("wonly-write %zd\n", write(8, "x", 1));
    say("wonly-errno %d\n", errno);
    hex("shared-parent", buf, read(10, buf, 7));    /* "shared-" */
    say("nb-set %d\n", fcntl(10, F_SETFL, fcntl(10, F_GETFL) | O_NONBLOCK));
    write_file("nb-set", "1");
    hex("fifo", buf, read(13, buf, 9));
    publish("report");
    /* second round: the test writes into the FIFO by its path */
    wait_for("go2");
    hex("fifo2", buf, read(13, buf, sizeof buf));
    publish("report2");
    sleep_forever();
}

static void mapdel_mode(void) {
    write_file("mapped.bin", "mapped file contents, page one");
    int fd = open(at("mapped.bin"), O_RDWR);
    must(fd >= 0 && ftruncate(fd, 8192) == 0, "mapped.bin");
    char *shared = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    char *private = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    must(shared != MAP_FAILED && private != MAP_FAILED, "mmap");
    memcpy(shared + 4096, "second page, shared write", 25);
    memcpy(private, "PRIVATE", 7);
    must(unlink(at("mapped.bin")) == 0, "unlink");
    put_at(fd, 9);
    printf("READY fd=9 shared=%lu private=%lu\n", (unsigned long)shared, (unsigned long)private);
    fflush(stdout);
    wait_for("go");
    hex("shared0", shared, 30);
    hex("shared1", shared + 4096, 25);
    hex("private0", private, 30);
    char buf[64];
    hex("fd-read", buf, pread(9, buf, 25, 4096));
    memcpy(shared, "SHARED", 6);                      /* through the mapping ... */
    hex("fd-sees", buf, pread(9, buf, 6, 0));         /* ... seen through the fd */
    publish("report");
    sleep_forever();
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: restore_files MODE DIR\n"); return 2; }
    dir = argv[2];
    if (strcmp(argv[1], "files") == 0) files_mode();
    else if (strcmp(argv[1], "pipes") == 0) pipes_mode();
    else if (strcmp(argv[1], "mapdel") == 0) mapdel_mode();
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}

/* Target of tests/backend/restore/test_sockets.py: AF_UNIX sockets a live restart rebuilds.
 *
 *   restore_sockets all DIR ABSTRACT   the sockets below, then READY; after DIR/go each is
 *                                      used and DIR/report written (see restore_files.c)
 *   restore_sockets more DIR           3, 4: a stream socketpair with a pipe's read end in
 *                                      flight ("with-fd", the pipe holds "piped"; its write
 *                                      end is fd 6); 5: a stream socket whose peer closed
 *                                      leaving "unread" unread: "bye" queued, ECONNRESET
 *   restore_sockets external PATH      a stream socket connected to PATH (a listener of the
 *                                      test, outside the tree), then READY
 *
 * "all" (fds fixed):
 *   3, 4   stream socketpair: "s 3->4" queued on 4, "s 4->3, longer" on 3; 3 is O_NONBLOCK
 *   5, 6   dgram socketpair: "d-one", "d-two, longer" queued on 6
 *   7, 8   seqpacket socketpair: "q-a", "q-bb" queued on 8
 *   10     stream listener on DIR/lis.sock, backlog 4
 *   11, 12 a connection to it: 11 the client, 12 accepted; "c->s" queued on 12, "s->c" on 11
 *   13     a client whose connection is still pending (not accepted), "early" sent into it
 *          is refused at checkpoint, so nothing is sent before the restart
 *   14     dgram bound to DIR/dg.sock: "from-abstract" (sent by 15), "from-unnamed" (by 16)
 *   15     dgram bound to the abstract name ABSTRACT, connected to DIR/dg.sock
 *   16     unbound dgram socket
 *   17, 18 stream socketpair, 17 shut down for writing after sending "last"
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
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

static void must(int ok, const char *what) {
    if (!ok) { perror(what); exit(2); }
}

static void put_at(int fd, int want) {
    if (fd == want) return;
    must(dup3(fd, want, 0) == want, "dup3");
    close(fd);
}

static socklen_t path_addr(struct sockaddr_un *a, const char *leaf) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    snprintf(a->sun_path, sizeof a->sun_path, "%s/%s", dir, leaf);
    return offsetof(struct sockaddr_un, sun_path) + strlen(a->sun_path) + 1;
}

static void send_str(int fd, const char *s) {
    must(send(fd, s, strlen(s), 0) == (ssize_t)strlen(s), s);
}

static void name_of(const char *what, int fd, int peer) {
    struct sockaddr_un a;
    socklen_t len = sizeof a;
    int r = peer ? getpeername(fd, (struct sockaddr *)&a, &len)
                 : getsockname(fd, (struct sockaddr *)&a, &len);
    if (r) { say("%s-err %d\n", what, errno); return; }
    size_t n = len - offsetof(struct sockaddr_un, sun_path);
    if (n > 0 && a.sun_path[0] == 0) say("%s @%.*s\n", what, (int)n - 1, a.sun_path + 1);
    else say("%s %s\n", what, n ? a.sun_path : "-");
}

static void wait_go(void) {
    char go[600];
    snprintf(go, sizeof go, "%s/go", dir);
    struct stat st;
    struct timespec ts = {0, 5 * 1000 * 1000};
    while (stat(go, &st) != 0) nanosleep(&ts, NULL);
}

static void publish(void) {
    char tmp[600], fin[600];
    snprintf(tmp, sizeof tmp, "%s/report.tmp", dir);
    snprintf(fin, sizeof fin, "%s/report", dir);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    must(fd >= 0 && write(fd, report, used) == (ssize_t)used, "report");
    close(fd);
    must(rename(tmp, fin) == 0, "rename");
}

static void all_mode(const char *abstract) {
    int sv[2];
    must(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
    put_at(sv[0], 3); put_at(sv[1], 4);
    send_str(3, "s 3->4");
    send_str(4, "s 4->3, longer");
    fcntl(3, F_SETFL, fcntl(3, F_GETFL) | O_NONBLOCK);
    must(socketpair(AF_UNIX, SOCK_DGRAM, 0, sv) == 0, "socketpair");
    put_at(sv[0], 5); put_at(sv[1], 6);
    send_str(5, "d-one");
    send_str(5, "d-two, longer");
    must(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) == 0, "socketpair");
    put_at(sv[0], 7); put_at(sv[1], 8);
    send_str(7, "q-a");
    send_str(7, "q-bb");

    struct sockaddr_un a;
    socklen_t alen = path_addr(&a, "lis.sock");
    int lis = socket(AF_UNIX, SOCK_STREAM, 0);
    must(lis >= 0 && bind(lis, (struct sockaddr *)&a, alen) == 0 && listen(lis, 4) == 0, "lis");
    put_at(lis, 10);
    int cli = socket(AF_UNIX, SOCK_STREAM, 0);
    must(cli >= 0 && connect(cli, (struct sockaddr *)&a, alen) == 0, "connect");
    put_at(cli, 11);
    int srv = accept(10, NULL, NULL);
    must(srv >= 0, "accept");
    put_at(srv, 12);
    send_str(11, "c->s");
    send_str(12, "s->c");
    int pend = socket(AF_UNIX, SOCK_STREAM, 0);
    must(pend >= 0 && connect(pend, (struct sockaddr *)&a, alen) == 0, "connect pending");
    put_at(pend, 13);

    struct sockaddr_un d;
    socklen_t dlen = path_addr(&d, "dg.sock");
    int dg = socket(AF_UNIX, SOCK_DGRAM, 0);
    must(dg >= 0 && bind(dg, (struct sockaddr *)&d, dlen) == 0, "dg");
    put_at(dg, 14);
    struct sockaddr_un ab = {.sun_family = AF_UNIX};
    size_t an = strlen(abstract);
    memcpy(ab.sun_path + 1, abstract, an);
    int abs_ = socket(AF_UNIX, SOCK_DGRAM, 0);
    must(abs_ >= 0 && bind(abs_, (struct sockaddr *)&ab,
                           offsetof(struct sockaddr_un, sun_path) + 1 + an) == 0, "abstract");
    must(connect(abs_, (struct sockaddr *)&d, dlen) == 0, "connect dg");
    put_at(abs_, 15);
    send_str(15, "from-abstract");
    int loose = socket(AF_UNIX, SOCK_DGRAM, 0);
    must(loose >= 0 && sendto(loose, "from-unnamed", 12, 0, (struct sockaddr *)&d, dlen) == 12,
         "sendto");
    put_at(loose, 16);

    must(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
    put_at(sv[1], 18); put_at(sv[0], 17);   /* sv may be {9, 17} */
    send_str(17, "last");
    must(shutdown(17, SHUT_WR) == 0, "shutdown");

    printf("READY sp0=3 sp1=4 dp0=5 dp1=6 qp0=7 qp1=8 lis=10 cli=11 srv=12 pend=13 dg=14 "
           "abs=15 loose=16 sh0=17 sh1=18\n");
    fflush(stdout);
    signal(SIGPIPE, SIG_IGN);
    wait_go();

    char buf[256];
    hex("sp1", buf, recv(4, buf, sizeof buf, MSG_DONTWAIT));
    hex("sp0", buf, recv(3, buf, sizeof buf, MSG_DONTWAIT));
    say("sp0-flags %o\n", fcntl(3, F_GETFL));
    hex("sp0-empty", buf, recv(3, buf, sizeof buf, 0));   /* O_NONBLOCK: EAGAIN */
    say("sp-again %zd\n", send(4, "x", 1, 0));
    hex("sp0-again", buf, recv(3, buf, sizeof buf, 0));
    hex("dp1-a", buf, recv(6, buf, sizeof buf, MSG_DONTWAIT));
    hex("dp1-b", buf, recv(6, buf, sizeof buf, MSG_DONTWAIT));
    hex("dp1-c", buf, recv(6, buf, sizeof buf, MSG_DONTWAIT));
    hex("qp1-a", buf, recv(8, buf, 2, MSG_DONTWAIT));       /* truncated: rest dropped */
    hex("qp1-b", buf, recv(8, buf, sizeof buf, MSG_DONTWAIT));
    hex("srv", buf, recv(12, buf, sizeof buf, MSG_DONTWAIT));
    hex("cli", buf, recv(11, buf, sizeof buf, MSG_DONTWAIT));
    name_of("srv-name", 12, 0);
    name_of("cli-peer", 11, 1);
    name_of("cli-name", 11, 0);
    name_of("lis-name", 10, 0);
    send_str(13, "late");
    int acc = accept(10, NULL, NULL);
    say("accepted %d\n", acc >= 0);
    if (acc >= 0) hex("late", buf, recv(acc, buf, sizeof buf, 0));
    fcntl(10, F_SETFL, fcntl(10, F_GETFL) | O_NONBLOCK);
    int none = accept(10, NULL, NULL);
    say("accept-more %d\n", none >= 0 ? 0 : errno);
    for (int i = 0; i < 2; i++) {
        struct sockaddr_un from;
        socklen_t flen = sizeof from;
        ssize_t n = recvfrom(14, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&from, &flen);
        char what[16];
        snprintf(what, sizeof what, "dg-%d", i);
        hex(what, buf, n);
        /* an unnamed sender: msg_namelen 0 */
        size_t fl = flen > offsetof(struct sockaddr_un, sun_path)
                    ? flen - offsetof(struct sockaddr_un, sun_path) : 0;
        say("%s-from %s%.*s\n", what, fl && from.sun_path[0] == 0 ? "@" : "",
            fl ? (int)fl - 1 : 1, fl ? from.sun_path + (from.sun_path[0] == 0) : "-");
    }
    say("abs-send %zd\n", send(15, "post", 4, 0));
    hex("dg-post", buf, recv(14, buf, sizeof buf, MSG_DONTWAIT));
    name_of("abs-name", 15, 0);
    name_of("abs-peer", 15, 1);
    hex("sh1", buf, recv(18, buf, sizeof buf, MSG_DONTWAIT));
    say("sh1-eof %zd\n", recv(18, buf, sizeof buf, MSG_DONTWAIT));
    say("sh0-send %zd\n", send(17, "x", 1, 0));
    say("sh0-errno %d\n", errno);
    say("sh1-send %zd\n", send(18, "back", 4, 0));
    hex("sh0", buf, recv(17, buf, sizeof buf, MSG_DONTWAIT));
    publish();
    for (;;) pause();
}

static void more_mode(void) {
    int sv[2], p[2];
    must(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0 && pipe(p) == 0, "pair");
    put_at(p[1], 16); put_at(p[0], 15); put_at(sv[1], 14); put_at(sv[0], 13);
    put_at(13, 3); put_at(14, 4); put_at(16, 6);
    must(write(6, "piped", 5) == 5, "pipe");
    char data[] = "with-fd", cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = data, .iov_len = 7};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                       .msg_controllen = sizeof cbuf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    int passed = 15;
    memcpy(CMSG_DATA(c), &passed, sizeof passed);
    must(sendmsg(3, &m, 0) == 7, "sendmsg");
    close(15);
    must(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "pair");
    send_str(sv[1], "bye");
    send_str(sv[0], "unread");
    close(sv[1]);
    put_at(sv[0], 5);
    printf("READY sp0=3 sp1=4 pipew=6 survivor=5\n");
    fflush(stdout);
    signal(SIGPIPE, SIG_IGN);
    wait_go();
    char buf[64], rbuf[CMSG_SPACE(4 * sizeof(int))];
    struct iovec riov = {.iov_base = buf, .iov_len = sizeof buf};
    struct msghdr r = {.msg_iov = &riov, .msg_iovlen = 1, .msg_control = rbuf,
                       .msg_controllen = sizeof rbuf};
    ssize_t n = recvmsg(4, &r, MSG_DONTWAIT);
    hex("scm", buf, n);
    struct cmsghdr *rc = CMSG_FIRSTHDR(&r);
    int got = -1;
    if (rc && rc->cmsg_type == SCM_RIGHTS) memcpy(&got, CMSG_DATA(rc), sizeof got);
    say("scm-fd %d\n", got >= 0);
    if (got >= 0) {
        hex("scm-pipe", buf, read(got, buf, sizeof buf));
        say("scm-pipe-write %zd\n", write(6, "more", 4));
        hex("scm-pipe-more", buf, read(got, buf, sizeof buf));
    }
    hex("survivor", buf, recv(5, buf, sizeof buf, MSG_DONTWAIT));
    hex("survivor-2", buf, recv(5, buf, sizeof buf, MSG_DONTWAIT));
    say("survivor-3 %zd\n", recv(5, buf, sizeof buf, MSG_DONTWAIT));
    say("survivor-send %zd\n", send(5, "x", 1, 0));
    say("survivor-errno %d\n", errno);
    publish();
    for (;;) pause();
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "more") == 0) {
        dir = argv[2];
        more_mode();
    }
    if (argc == 4 && strcmp(argv[1], "all") == 0) {
        dir = argv[2];
        all_mode(argv[3]);
    }
    if (argc == 3 && strcmp(argv[1], "external") == 0) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        snprintf(a.sun_path, sizeof a.sun_path, "%s", argv[2]);
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        must(s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) == 0, "connect");
        put_at(s, 5);
        printf("READY ext=5\n");
        fflush(stdout);
        for (;;) pause();
    }
    fprintf(stderr, "usage: restore_sockets all DIR ABSTRACT | external PATH\n");
    return 2;
}

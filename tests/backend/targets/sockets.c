/* Target of tests/backend/test_live_sockets.py: AF_UNIX sockets with queued data.
 *
 *   sockets PATH ABSTRACT         unix sockets (below), then READY with their fds
 *   sockets inet                  one AF_INET datagram socket, then READY
 *   sockets scm                   a stream socketpair with fd 0 in flight (SCM_RIGHTS) and
 *                                 "with-fd" queued on sv1; "drain" receives it: "scm <hex> <nfds>"
 *
 * Unix sockets made (data is queued, nothing is read before the checkpoint):
 *   sp0, sp1   stream socketpair: "stream 0->1" queued on sp1, "back 1->0, longer" on sp0
 *   dp0, dp1   dgram socketpair: "first datagram" and "second, longer datagram" queued on dp1
 *   sq0, sq1   seqpacket socketpair: "seq-a", "seq-bb" queued on sq1
 *   sh0, sh1   stream socketpair, sh0 shut down for writing after sending "last words"
 *   lis        stream listener bound to PATH (backlog 4), one connection not accepted
 *   cli        the client of that connection
 *   abs        dgram socket bound to the abstract name ABSTRACT (without its leading NUL)
 *   cl0        stream socket whose peer closed with "unread" unread: "bye" queued on cl0,
 *              shut down both ways, a pending ECONNRESET
 *
 * Commands on stdin: "ping" -> "ok ping"; "drain" reads every queue and prints, one line each,
 * "<name> <hex of what one recv returned>" (sp0, sp1, sh1: one recv each; dp1, sq1: one line
 * per message; cl0: two recvs, the second reports the error), then "accepted <1|0>" for
 * accept() on lis and "DONE". A failed recv prints "<name> error-<errno>". */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <stddef.h>
#include <unistd.h>

static void put(int fd, const char *s) {
    if (send(fd, s, strlen(s), 0) != (ssize_t)strlen(s)) { perror("send"); exit(2); }
}

static void show(const char *name, int fd) {
    char buf[4096];
    ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    printf("%s ", name);
    if (n < 0) printf("error-%d", errno);
    for (ssize_t i = 0; i < n; i++) printf("%02x", (unsigned char)buf[i]);
    printf("\n");
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "inet") == 0) {
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        if (s < 0) return 1;
        printf("READY inet=%d\n", s);
        fflush(stdout);
        char line[256];
        while (fgets(line, sizeof line, stdin)) { printf("ok %s", line); fflush(stdout); }
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "scm") == 0) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) return 1;
        char data[] = "with-fd", cbuf[CMSG_SPACE(sizeof(int))];
        struct iovec iov = {.iov_base = data, .iov_len = 7};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                           .msg_controllen = sizeof cbuf};
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        int passed = 0;
        memcpy(CMSG_DATA(c), &passed, sizeof passed);
        if (sendmsg(sv[0], &m, 0) != 7) return 1;
        printf("READY sv0=%d sv1=%d\n", sv[0], sv[1]);
        fflush(stdout);
        char line[256];
        while (fgets(line, sizeof line, stdin)) {
            if (strcmp(line, "drain\n") == 0) {
                char buf[64], rbuf[CMSG_SPACE(16 * sizeof(int))];
                struct iovec riov = {.iov_base = buf, .iov_len = sizeof buf};
                struct msghdr r = {.msg_iov = &riov, .msg_iovlen = 1, .msg_control = rbuf,
                                   .msg_controllen = sizeof rbuf};
                ssize_t n = recvmsg(sv[1], &r, MSG_DONTWAIT);
                int nfds = 0;
                for (struct cmsghdr *h = CMSG_FIRSTHDR(&r); h; h = CMSG_NXTHDR(&r, h))
                    if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS)
                        nfds += (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                printf("scm ");
                for (ssize_t i = 0; i < n; i++) printf("%02x", (unsigned char)buf[i]);
                printf(" %d\n", nfds);
            } else {
                printf("ok %s", line);
            }
            fflush(stdout);
        }
        return 0;
    }
    if (argc < 3) return 1;
    int sp[2], dp[2], sq[2], sh[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) || socketpair(AF_UNIX, SOCK_DGRAM, 0, dp) ||
        socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sq) || socketpair(AF_UNIX, SOCK_STREAM, 0, sh))
        return 1;
    put(sp[0], "stream 0->1");
    put(sp[1], "back 1->0, longer");
    put(dp[0], "first datagram");
    put(dp[0], "second, longer datagram");
    put(sq[0], "seq-a");
    put(sq[0], "seq-bb");
    put(sh[0], "last words");
    shutdown(sh[0], SHUT_WR);
    int cl[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, cl)) return 1;
    put(cl[0], "unread");
    put(cl[1], "bye");
    close(cl[1]);

    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    int lis = socket(AF_UNIX, SOCK_STREAM, 0), cli = socket(AF_UNIX, SOCK_STREAM, 0);
    if (bind(lis, (struct sockaddr *)&a, sizeof a) || listen(lis, 4) ||
        connect(cli, (struct sockaddr *)&a, sizeof a))
        return 1;
    struct sockaddr_un b = {.sun_family = AF_UNIX};
    size_t alen = strlen(argv[2]);
    memcpy(b.sun_path + 1, argv[2], alen);
    int abs_ = socket(AF_UNIX, SOCK_DGRAM, 0);
    if (bind(abs_, (struct sockaddr *)&b, offsetof(struct sockaddr_un, sun_path) + 1 + alen))
        return 1;

    printf("READY sp0=%d sp1=%d dp0=%d dp1=%d sq0=%d sq1=%d sh0=%d sh1=%d lis=%d cli=%d abs=%d "
           "cl0=%d\n", sp[0], sp[1], dp[0], dp[1], sq[0], sq[1], sh[0], sh[1], lis, cli, abs_, cl[0]);
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        if (strcmp(line, "drain\n") == 0) {
            show("sp0", sp[0]);
            show("sp1", sp[1]);
            show("sh1", sh[1]);
            for (int i = 0; i < 2; i++) show("dp1", dp[1]);
            show("dp1", dp[1]);          /* a third recv: the queue must be empty now */
            for (int i = 0; i < 2; i++) show("sq1", sq[1]);
            for (int i = 0; i < 2; i++) show("cl0", cl[0]);
            int c = accept4(lis, NULL, NULL, SOCK_NONBLOCK);
            printf("accepted %d\n", c >= 0);
            printf("DONE\n");
        } else {
            printf("ok %s", line);
        }
        fflush(stdout);
    }
    return 0;
}

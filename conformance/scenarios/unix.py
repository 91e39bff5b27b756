"""Conformance scenarios: unix (AF_UNIX sockets).

Every scenario queues state in sockets before its checkpoint point and reads it back after:
data in both directions, message boundaries (datagram, seqpacket), listeners with connections
not yet accepted, names (path and abstract), shutdown state, files in flight (SCM_RIGHTS:
supported by the model, which departs from Linux-CR's EBUSY here) and sockets shared by fork.
"""
import errno

from ..dsl import *  # noqa: F401,F403
from ..scenario import scenario  # noqa: F401

U64 = (1 << 64) - 1
F_GETFD, F_GETFL, F_SETFL = 1, 3, 4
SHUT_WR = 1


def err(code: int) -> int:
    """What a failing syscall leaves in its register: -errno as an unsigned 64-bit value."""
    return -code & U64


def _fds(*regs) -> list:
    """An SCM_RIGHTS fd list for sendmsg: the registers holding the fds ("$rN")."""
    return [str(r) for r in regs]


def _buffer(p):
    return p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)


def _nonblock_empty(p, fd, buf, label: str) -> None:
    """Switch ``fd`` to O_NONBLOCK and check that nothing more is queued (EAGAIN)."""
    p.do("fcntl", fd, F_SETFL, O_NONBLOCK)
    got = p.read(fd, buf, 64)
    p.check(got, "==", err(errno.EAGAIN), label)


@scenario("unix", "a stream socketpair with data queued both ways")
def unix_socketpair_stream(p):
    buf = _buffer(p)
    a, b = p.socketpair(SOCK_STREAM)
    p.write_text(a, buf, "hello")
    p.write_text(a, buf, " world")
    p.write_text(b, buf, "pong")
    p.store(buf, "................")
    p.ckpt()
    p.read_check(b, buf, "hello world", "a->b stream bytes (no boundaries)")
    p.read_check(a, buf, "pong", "b->a stream bytes")
    _nonblock_empty(p, b, buf, "a->b queue holds nothing more")
    _nonblock_empty(p, a, buf, "b->a queue holds nothing more")
    p.write_text(a, buf, "again")          # the pair still works after restart
    p.read_check(b, buf, "again", "a->b after restart")


@scenario("unix", "a datagram socketpair keeps its message boundaries")
def unix_socketpair_dgram(p):
    buf = _buffer(p)
    a, b = p.socketpair(SOCK_DGRAM)
    p.write_text(a, buf, "one")
    p.write_text(a, buf, "three!")
    p.write_text(b, buf, "x")
    p.write_text(b, buf, "yz")
    p.store(buf, "................")
    p.ckpt()
    for fd, text in ((b, "one"), (b, "three!"), (a, "x"), (a, "yz")):
        got = p.read(fd, buf, 100)     # a datagram read returns one whole message
        p.check(got, "==", len(text), f"datagram {text!r}: length (boundary kept)")
        p.check_mem(buf, text, f"datagram {text!r}: contents")
    _nonblock_empty(p, b, buf, "no further datagram for b")
    _nonblock_empty(p, a, buf, "no further datagram for a")


@scenario("unix", "a seqpacket socketpair keeps records; a short read drops the rest of one")
def unix_socketpair_seqpacket(p):
    buf = _buffer(p)
    a, b = p.socketpair(SOCK_SEQPACKET)
    p.write_text(a, buf, "abcdef")
    p.write_text(a, buf, "gh")
    p.write_text(b, buf, "reply-1")
    p.store(buf, "................")
    p.ckpt()
    got = p.read(b, buf, 2)                 # takes "ab", drops "cdef"
    p.check(got, "==", 2, "short read of the first record")
    p.check_mem(buf, "ab", "first record's head")
    got = p.read(b, buf, 100)
    p.check(got, "==", 2, "second record is whole and separate")
    p.check_mem(buf, "gh", "second record's contents")
    p.read_check(a, buf, "reply-1", "b->a record")
    _nonblock_empty(p, b, buf, "no further record for b")


@scenario("unix", "a listener bound in /tmp with two connections not yet accepted")
def unix_listen_pending(p):
    buf = _buffer(p)
    srv = p.socket(AF_UNIX, SOCK_STREAM, 0)
    p.check(p.bind(srv, "/tmp/srv.sock"), "==", 0, "bind")
    p.check(p.listen(srv, 4), "==", 0, "listen")
    c1 = p.socket(AF_UNIX, SOCK_STREAM, 0)
    p.check(p.connect(c1, "/tmp/srv.sock"), "==", 0, "connect 1")
    p.write_text(c1, buf, "first-client")
    c2 = p.socket(AF_UNIX, SOCK_STREAM, 0)
    p.check(p.connect(c2, "/tmp/srv.sock"), "==", 0, "connect 2")
    p.write_text(c2, buf, "second")
    p.ckpt()
    s1 = p.accept(srv)
    p.read_check(s1, buf, "first-client", "first accepted connection carries client 1's data")
    s2 = p.accept(srv)
    p.read_check(s2, buf, "second", "second accepted connection carries client 2's data")
    p.write_text(s2, buf, "back")
    p.read_check(c2, buf, "back", "server->client 2 after restart")
    # the name is bound again: a new client connects after restart
    c3 = p.socket(AF_UNIX, SOCK_STREAM, 0)
    p.check(p.connect(c3, "/tmp/srv.sock"), "==", 0, "connect after restart")
    p.write_text(c3, buf, "third")
    s3 = p.accept(srv)
    p.read_check(s3, buf, "third", "connection made after restart")
    p.do("fcntl", srv, F_SETFL, O_NONBLOCK)
    p.check(p.accept(srv), "==", err(errno.EAGAIN), "no other connection was pending")


@scenario("unix", "a stream connection through bind/listen/connect/accept with data both ways")
def unix_stream_accepted(p):
    buf = _buffer(p)
    srv = p.socket(AF_UNIX, SOCK_STREAM, 0)
    p.do("bind", srv, "/tmp/acc.sock")
    p.do("listen", srv, 1)
    cli = p.socket(AF_UNIX, SOCK_STREAM, 0)
    p.check(p.connect(cli, "/tmp/acc.sock"), "==", 0, "connect")
    conn = p.accept(srv)
    p.write_text(cli, buf, "request")
    p.write_text(conn, buf, "response")
    p.do("close", srv)                 # the established connection outlives its listener
    p.ckpt()
    p.read_check(conn, buf, "request", "client->server bytes")
    p.read_check(cli, buf, "response", "server->client bytes")
    p.write_text(conn, buf, "more")
    p.read_check(cli, buf, "more", "server->client after restart")
    p.do("close", cli)
    got = p.read(conn, buf, 16)
    p.check(got, "==", 0, "EOF once the client closes")


@scenario("unix", "a listener bound by a relative name in its cwd: after restart a connect "
          "by its absolute path and one by the relative name reach it")
def unix_listen_relative(p):
    buf = _buffer(p)
    p.do("mkdir", "/tmp/rel", 0o755)
    p.do("chdir", "/tmp/rel")
    srv = p.socket(AF_UNIX, SOCK_STREAM, 0)
    p.check(p.bind(srv, "srv.sock"), "==", 0, "bind by a relative name")
    p.check(p.listen(srv, 2), "==", 0, "listen")
    p.ckpt()
    cli = p.socket(AF_UNIX, SOCK_STREAM, 0)
    p.check(p.connect(cli, "/tmp/rel/srv.sock"), "==", 0, "connect by the absolute path")
    conn = p.accept(srv)
    p.write_text(cli, buf, "abs")
    p.read_check(conn, buf, "abs", "bytes through the absolute path")
    cli2 = p.socket(AF_UNIX, SOCK_STREAM, 0)
    p.check(p.connect(cli2, "srv.sock"), "==", 0, "connect by the relative name")
    conn2 = p.accept(srv)
    p.write_text(cli2, buf, "rel")
    p.read_check(conn2, buf, "rel", "bytes through the relative name")


@scenario("unix", "a datagram socket bound to a path receives from an unbound sender")
def unix_dgram_path(p):
    buf = _buffer(p)
    rcv = p.socket(AF_UNIX, SOCK_DGRAM, 0)
    p.check(p.bind(rcv, "/tmp/dgram.sock"), "==", 0, "bind")
    snd = p.socket(AF_UNIX, SOCK_DGRAM, 0)
    p.store(buf, "m1-abc")
    p.check(p.sendto(snd, buf, 2, "/tmp/dgram.sock"), "==", 2, "sendto 1")
    p.check(p.sendto(snd, buf, 6, "/tmp/dgram.sock"), "==", 6, "sendto 2")
    p.store(buf, "................")
    p.ckpt()
    got = p.read(rcv, buf, 100)
    p.check(got, "==", 2, "first datagram: length")
    p.check_mem(buf, "m1", "first datagram")
    got = p.read(rcv, buf, 100)
    p.check(got, "==", 6, "second datagram: length")
    p.check_mem(buf, "m1-abc", "second datagram")
    p.store(buf, "late")
    p.check(p.sendto(snd, buf, 4, "/tmp/dgram.sock"), "==", 4, "the path is bound after restart")
    got = p.read(rcv, buf, 100)
    p.check(got, "==", 4, "datagram sent after restart")
    _nonblock_empty(p, rcv, buf, "nothing else queued")


@scenario("unix", "a datagram socket bound to an abstract name; the sender connected to it")
def unix_dgram_abstract(p):
    buf = _buffer(p)
    name = "\0ckpt-conf-abstract"
    rcv = p.socket(AF_UNIX, SOCK_DGRAM, 0)
    p.check(p.bind(rcv, name), "==", 0, "bind abstract")
    snd = p.socket(AF_UNIX, SOCK_DGRAM, 0)
    p.check(p.connect(snd, name), "==", 0, "connect to the abstract name")
    p.write_text(snd, buf, "abstract-1")
    p.write_text(snd, buf, "a2")
    p.ckpt()
    p.read_check(rcv, buf, "abstract-1", "first datagram")
    got = p.read(rcv, buf, 100)
    p.check(got, "==", 2, "second datagram keeps its boundary")
    p.write_text(snd, buf, "post")       # the association survives
    p.read_check(rcv, buf, "post", "connected sender after restart")
    other = p.socket(AF_UNIX, SOCK_DGRAM, 0)
    p.store(buf, "new")
    p.check(p.sendto(other, buf, 3, name), "==", 3, "the abstract name is registered again")
    p.read_check(rcv, buf, "new", "datagram from a new sender")
    dup = p.socket(AF_UNIX, SOCK_DGRAM, 0)
    p.check(p.bind(dup, name), "==", err(errno.EADDRINUSE), "the name is still taken")


@scenario("unix", "SHUT_WR before the point: the peer reads the data, then EOF")
def unix_shutdown_wr(p):
    buf = _buffer(p)
    a, b = p.socketpair(SOCK_STREAM)
    p.write_text(a, buf, "bye")
    p.check(p.shutdown(a, SHUT_WR), "==", 0, "shutdown")
    p.write_text(b, buf, "still-open")
    p.ckpt()
    p.read_check(b, buf, "bye", "data sent before the shutdown")
    p.do("fcntl", b, F_SETFL, O_NONBLOCK)   # a lost shutdown shows as EAGAIN, not a hang
    got = p.read(b, buf, 16)
    p.check(got, "==", 0, "EOF after the shutdown")
    p.store(buf, "x")
    got = p.write(a, buf, 1)
    p.check(got, "==", err(errno.EPIPE), "the shut-down side cannot write")
    p.read_check(a, buf, "still-open", "the other direction is open")
    p.write_text(b, buf, "more")
    p.read_check(a, buf, "more", "the other direction works after restart")


@scenario("unix", "a peer closed with data left: the survivor reads it, then EOF, then EPIPE")
def unix_peer_closed(p):
    buf = _buffer(p)
    a, b = p.socketpair(SOCK_STREAM)
    p.write_text(a, buf, "last-words")
    p.do("close", a)
    p.ckpt()
    p.read_check(b, buf, "last-words", "data of the closed peer")
    p.do("fcntl", b, F_SETFL, O_NONBLOCK)   # a lost shutdown shows as EAGAIN, not a hang
    got = p.read(b, buf, 16)
    p.check(got, "==", 0, "EOF")
    p.store(buf, "x")
    got = p.write(b, buf, 1)
    p.check(got, "==", err(errno.EPIPE), "writing to a closed peer")


@scenario("unix", "a pipe's read end in flight (SCM_RIGHTS) and closed by its sender")
def unix_scm_rights_pipe(p):
    buf = _buffer(p)
    r, w = p.pipe()
    p.write_text(w, buf, "through-the-pipe")
    a, b = p.socketpair(SOCK_STREAM)
    p.store(buf, "F")
    p.check(p.sendmsg(a, buf, 1, _fds(r)), "==", 1, "sendmsg with the pipe's read end")
    p.do("close", r)                   # only the in-flight reference keeps it open
    p.write_text(a, buf, "tail")       # plain bytes after the segment that carries the fd
    p.ckpt()
    p.check(p.fcntl(r, F_GETFD), "==", err(errno.EBADF), "the fd number is free before recvmsg")
    p.do("recvmsg", b, 1)              # installs the passed file at the lowest free fd: r's
    p.check(p.fcntl(r, F_GETFD), "==", 0, "a received fd exists (no close-on-exec)")
    p.read_check(r, buf, "through-the-pipe", "the pipe's data read through the received fd")
    p.write_text(w, buf, "after")
    p.read_check(r, buf, "after", "the received fd is the same pipe")
    p.read_check(b, buf, "tail", "the bytes queued behind the fd")


@scenario("unix", "a datagram carrying two fds and data: a file and a socket")
def unix_scm_rights_dgram(p):
    buf = _buffer(p)
    f = p.open("/data/scm.txt", O_RDWR | O_CREAT | O_TRUNC, 0o644)
    p.write_text(f, buf, "0123456789")
    p.do("lseek", f, 4, 0)
    s1, s2 = p.socketpair(SOCK_STREAM)
    p.write_text(s2, buf, "sock-data")
    a, b = p.socketpair(SOCK_DGRAM)
    p.store(buf, "two-fds")
    p.check(p.sendmsg(a, buf, 7, _fds(f, s1)), "==", 7, "sendmsg with two fds")
    p.do("close", f)
    p.do("close", s1)
    p.ckpt()
    p.do("recvmsg", b, 100)            # the fds come back in order at the two lowest free fds
    p.read_check(f, buf, "456789", "the file came back with its offset")
    p.read_check(s1, buf, "sock-data", "the socket came back connected, with its queue")
    p.write_text(s2, buf, "live")
    p.read_check(s1, buf, "live", "and the connection still works")


@scenario("unix", "a socketpair shared by fork: each side talks through the restored pair")
def unix_fork_shared(p):
    buf = _buffer(p)
    a, b = p.socketpair(SOCK_STREAM)
    child = p.fork()
    with p.child(child):
        p.do("close", a)
        p.write_text(b, buf, "from-child")
        p.ckpt()
        p.read_check(b, buf, "from-parent", "child reads what the parent queued")
        p.write_text(b, buf, "child-after")
    p.do("close", b)
    p.write_text(a, buf, "from-parent")
    p.ckpt()
    p.read_check(a, buf, "from-child", "parent reads what the child queued")
    p.read_check(a, buf, "child-after", "data the child sent after restart")
    got = p.read(a, buf, 16)            # the child's exit closed the last reference of b
    p.check(got, "==", 0, "EOF once the child is gone (b had no other reference)")
    p.wait_child(child)


@scenario("unix", "a non-blocking socketpair stays non-blocking after restart")
def unix_nonblock_flag(p):
    buf = _buffer(p)
    a, b = p.socketpair(SOCK_STREAM | O_NONBLOCK)
    p.write_text(b, buf, "q")
    p.ckpt()
    p.check(p.fcntl(a, F_GETFL), "==", O_RDWR | O_NONBLOCK, "F_GETFL of a")
    p.check(p.fcntl(b, F_GETFL), "==", O_RDWR | O_NONBLOCK, "F_GETFL of b")
    p.read_check(a, buf, "q", "queued byte")
    got = p.read(a, buf, 8)
    p.check(got, "==", err(errno.EAGAIN), "read on an empty non-blocking socket")


@scenario("unix", "a seqpacket listener with a pending connection and records, restarted twice",
          restarts=2)
def unix_seqpacket_listen_twice(p):
    buf = _buffer(p)
    srv = p.socket(AF_UNIX, SOCK_SEQPACKET, 0)
    p.check(p.bind(srv, "\0ckpt-conf-seqpacket"), "==", 0, "bind")
    p.check(p.listen(srv, 2), "==", 0, "listen")
    cli = p.socket(AF_UNIX, SOCK_SEQPACKET, 0)
    p.check(p.connect(cli, "\0ckpt-conf-seqpacket"), "==", 0, "connect")
    p.write_text(cli, buf, "rec-1")
    p.write_text(cli, buf, "r2")
    p.ckpt()
    conn = p.accept(srv)
    got = p.read(conn, buf, 100)
    p.check(got, "==", 5, "first record after two restarts")
    p.check_mem(buf, "rec-1", "first record's contents")
    got = p.read(conn, buf, 100)
    p.check(got, "==", 2, "second record")
    p.write_text(conn, buf, "ack")
    p.read_check(cli, buf, "ack", "server->client record")

"""UNIX domain sockets: every syscall and its Linux errnos, SCM_RIGHTS, and a property test."""
from __future__ import annotations

import errno
import os
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptsim.errors import ModelError
from ckptsim.model.creds import Cred
from ckptsim.model.pipe import PipeOps
from ckptsim.model.sched import Blocked
from ckptsim.model.unix import (AF_UNIX, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_PEEK, SHUT_RD,
                                SHUT_RDWR, SHUT_WR, SOCK_BUF_DEFAULT, SOCK_CLOEXEC, SOCK_DGRAM,
                                SOCK_NONBLOCK, SOCK_RAW, SOCK_SEQPACKET, SOCK_STREAM,
                                SocketInode, SockState, UnixOps)
from ckptsim.model.vfs import FdTable, FileOps, FsContext, kernel_filesystem
from ckptsim.model.vfs_ops import F_SETFL

ALL_TYPES = [SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET]
CONN_TYPES = [SOCK_STREAM, SOCK_SEQPACKET]


class _Task:
    def __init__(self, files, fs, cred):
        self.files, self.fs, self.cred = files, fs, cred


class _MiniKernel(UnixOps, PipeOps, FileOps):
    """Just the file, pipe and socket areas of the Kernel."""

    def __init__(self):
        self.signals_sent = []

    def send_signal(self, t, sig):
        self.signals_sent.append(sig)


@pytest.fixture
def k():
    return _MiniKernel()


@pytest.fixture
def t(k):
    return _Task(FdTable(), FsContext.new(kernel_filesystem(k)), Cred())


def errno_of(fn, *args, **kw):
    with pytest.raises(ModelError) as ei:
        fn(*args, **kw)
    return ei.value.errno


def sock_of(t, fd):
    return t.files.get(fd).private


def listener(k, t, addr, sock_type=SOCK_STREAM, backlog=5):
    fd = k.socket(t, AF_UNIX, sock_type)
    k.bind(t, fd, addr)
    k.listen(t, fd, backlog)
    return fd


# -- socket / socketpair ----------------------------------------------------------------------

def test_socket_families_types_and_flags(k, t):
    assert errno_of(k.socket, t, 2, SOCK_STREAM) == errno.EAFNOSUPPORT
    assert errno_of(k.socket, t, AF_UNIX, 10) == errno.ESOCKTNOSUPPORT
    assert errno_of(k.socket, t, AF_UNIX, SOCK_STREAM, 6) == errno.EPROTONOSUPPORT
    assert errno_of(k.socket, t, AF_UNIX, SOCK_STREAM | 0x100) == errno.EINVAL
    fd = k.socket(t, AF_UNIX, SOCK_RAW)
    assert sock_of(t, fd).type == SOCK_DGRAM   # Linux maps SOCK_RAW to SOCK_DGRAM for unix
    fd = k.socket(t, AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC)
    assert t.files.get(fd).flags & os.O_NONBLOCK and t.files.is_cloexec(fd)
    assert t.files.get(fd).kind == "socket"
    assert sock_of(t, fd).state == SockState.UNCONNECTED


def test_enotsock_on_a_regular_file(k, t):
    fd = k.open(t, "/f", os.O_CREAT | os.O_RDWR)
    assert errno_of(k.send, t, fd, b"x") == errno.ENOTSOCK
    assert errno_of(k.listen, t, fd, 1) == errno.ENOTSOCK
    assert errno_of(k.send, t, 99, b"x") == errno.EBADF


@pytest.mark.parametrize("sock_type", ALL_TYPES)
def test_socketpair_both_ways_and_read_write(k, t, sock_type):
    a, b = k.socketpair(t, sock_type)
    assert k.send(t, a, b"ping") == 4
    assert k.write(t, b, b"pong") == 4
    assert k.recv(t, b, 100) == b"ping"
    assert k.read(t, a, 100) == b"pong"
    assert k.getsockname(t, a) == "" and k.getpeername(t, a) == ""
    assert sock_of(t, a).peer is sock_of(t, b) and sock_of(t, b).peer is sock_of(t, a)


def test_stream_ignores_boundaries_dgram_keeps_them(k, t):
    a, b = k.socketpair(t, SOCK_STREAM)
    k.send(t, a, b"abc")
    k.send(t, a, b"def")
    assert k.recv(t, b, 4) == b"abcd"
    assert k.recv(t, b, 100) == b"ef"
    for sock_type in (SOCK_DGRAM, SOCK_SEQPACKET):
        a, b = k.socketpair(t, sock_type)
        k.send(t, a, b"abc")
        k.send(t, a, b"defgh")
        assert k.recv(t, b, 2) == b"ab"        # the rest of a datagram is dropped
        assert k.recv(t, b, 100) == b"defgh"


def test_empty_queue_blocks_or_eagain(k, t):
    a, b = k.socketpair(t, SOCK_STREAM)
    with pytest.raises(Blocked):
        k.recv(t, b, 10)
    assert errno_of(k.recv, t, b, 10, MSG_DONTWAIT) == errno.EAGAIN
    k.fcntl(t, b, F_SETFL, os.O_NONBLOCK)
    assert errno_of(k.read, t, b, 10) == errno.EAGAIN


def test_peek_leaves_data(k, t):
    a, b = k.socketpair(t, SOCK_STREAM)
    k.send(t, a, b"hello")
    assert k.recv(t, b, 3, MSG_PEEK) == b"hel"
    assert k.recv(t, b, 10) == b"hello"


# -- flow control -----------------------------------------------------------------------------

def test_stream_send_is_partial_then_blocks(k, t):
    a, b = k.socketpair(t, SOCK_STREAM)
    big = bytes(SOCK_BUF_DEFAULT + 100)
    assert k.send(t, a, big) == SOCK_BUF_DEFAULT
    with pytest.raises(Blocked):
        k.send(t, a, b"x")
    assert errno_of(k.send, t, a, b"x", MSG_DONTWAIT) == errno.EAGAIN
    assert len(k.recv(t, b, 1000)) == 1000
    assert k.send(t, a, big) == 1000


def test_dgram_must_fit_whole(k, t):
    a, b = k.socketpair(t, SOCK_DGRAM)
    assert errno_of(k.send, t, a, bytes(SOCK_BUF_DEFAULT)) == errno.EMSGSIZE
    chunk = bytes(SOCK_BUF_DEFAULT // 2)
    k.send(t, a, chunk)
    k.send(t, a, chunk[:-100])
    with pytest.raises(Blocked):
        k.send(t, a, bytes(200))
    k.recv(t, b, len(chunk))
    assert k.send(t, a, bytes(200)) == 200


# -- bind / listen / connect / accept ---------------------------------------------------------

def test_bind_path_creates_a_socket_inode(k, t):
    fd = k.socket(t, AF_UNIX, SOCK_STREAM)
    k.bind(t, fd, "/sock")
    inode = kernel_filesystem(k).lookup("/sock")
    assert isinstance(inode, SocketInode) and inode.bound is sock_of(t, fd)
    assert inode.st_mode & 0o170000 == 0o140000
    assert k.getsockname(t, fd) == "/sock"
    assert errno_of(k.bind, t, fd, "/other") == errno.EINVAL     # already bound
    fd2 = k.socket(t, AF_UNIX, SOCK_STREAM)
    assert errno_of(k.bind, t, fd2, "/sock") == errno.EADDRINUSE
    assert errno_of(k.bind, t, fd2, "/nodir/sock") == errno.ENOENT
    k.open(t, "/reg", os.O_CREAT | os.O_RDWR)
    assert errno_of(k.bind, t, fd2, "/reg") == errno.EADDRINUSE
    assert errno_of(k.bind, t, fd2, "/reg/x") == errno.ENOTDIR


def test_bind_abstract_and_autobind(k, t):
    fd = k.socket(t, AF_UNIX, SOCK_DGRAM)
    k.bind(t, fd, b"\0name")
    assert k.getsockname(t, fd) == b"\0name"
    fd2 = k.socket(t, AF_UNIX, SOCK_DGRAM)
    assert errno_of(k.bind, t, fd2, b"\0name") == errno.EADDRINUSE
    k.bind(t, fd2, "")
    assert k.getsockname(t, fd2) == b"\x0000000"
    k.close(t, fd)                                   # the abstract name is free again
    fd3 = k.socket(t, AF_UNIX, SOCK_DGRAM)
    k.bind(t, fd3, b"\0name")


def test_listen_errors(k, t):
    fd = k.socket(t, AF_UNIX, SOCK_STREAM)
    assert errno_of(k.listen, t, fd, 5) == errno.EINVAL          # unbound
    d = k.socket(t, AF_UNIX, SOCK_DGRAM)
    assert errno_of(k.listen, t, d, 5) == errno.EOPNOTSUPP
    a, _ = k.socketpair(t, SOCK_STREAM)
    assert errno_of(k.listen, t, a, 5) == errno.EINVAL           # connected
    k.bind(t, fd, "/l")
    k.listen(t, fd, -1)
    assert sock_of(t, fd).backlog == 4096


@pytest.mark.parametrize("sock_type", CONN_TYPES)
def test_connect_completes_before_accept(k, t, sock_type):
    lfd = listener(k, t, "/srv", sock_type)
    c = k.socket(t, AF_UNIX, sock_type)
    k.connect(t, c, "/srv")
    assert sock_of(t, c).state == SockState.CONNECTED
    assert k.getpeername(t, c) == "/srv"
    k.send(t, c, b"early")                      # data may go before accept
    assert len(sock_of(t, lfd).pending) == 1
    s = k.accept(t, lfd)
    assert k.getsockname(t, s) == "/srv" and k.getpeername(t, s) == ""
    assert k.recv(t, s, 100) == b"early"
    k.send(t, s, b"reply")
    assert k.recv(t, c, 100) == b"reply"
    assert errno_of(k.connect, t, c, "/srv") == errno.EISCONN
    assert errno_of(k.connect, t, lfd, "/srv") == errno.EINVAL


def test_connect_errors(k, t):
    c = k.socket(t, AF_UNIX, SOCK_STREAM)
    assert errno_of(k.connect, t, c, "/missing") == errno.ENOENT
    assert errno_of(k.connect, t, c, b"\0missing") == errno.ECONNREFUSED
    k.open(t, "/reg", os.O_CREAT | os.O_RDWR)
    assert errno_of(k.connect, t, c, "/reg") == errno.ECONNREFUSED
    bound = k.socket(t, AF_UNIX, SOCK_STREAM)
    k.bind(t, bound, "/notlistening")
    assert errno_of(k.connect, t, c, "/notlistening") == errno.ECONNREFUSED
    d = k.socket(t, AF_UNIX, SOCK_DGRAM)
    k.bind(t, d, "/dg")
    assert errno_of(k.connect, t, c, "/dg") == errno.EPROTOTYPE
    lfd = listener(k, t, "/gone")
    k.close(t, lfd)                               # the inode stays, nobody is bound
    assert isinstance(kernel_filesystem(k).lookup("/gone"), SocketInode)
    assert errno_of(k.connect, t, c, "/gone") == errno.ECONNREFUSED


def test_backlog_full_blocks_and_accept_empty(k, t):
    lfd = listener(k, t, b"\0srv", backlog=1)
    assert errno_of(k.accept, t, lfd, 0x1) == errno.EINVAL   # bad accept4 flags
    with pytest.raises(Blocked):
        k.accept(t, lfd)
    clients = [k.socket(t, AF_UNIX, SOCK_STREAM) for _ in range(3)]
    k.connect(t, clients[0], b"\0srv")
    k.connect(t, clients[1], b"\0srv")              # backlog + 1 fit, as in Linux
    with pytest.raises(Blocked):
        k.connect(t, clients[2], b"\0srv")
    nb = k.socket(t, AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK)
    assert errno_of(k.connect, t, nb, b"\0srv") == errno.EAGAIN
    s = k.accept(t, lfd, SOCK_CLOEXEC)
    assert t.files.is_cloexec(s)
    k.connect(t, clients[2], b"\0srv")
    d = k.socket(t, AF_UNIX, SOCK_DGRAM)
    assert errno_of(k.accept, t, d) == errno.EOPNOTSUPP
    unl = k.socket(t, AF_UNIX, SOCK_STREAM)
    assert errno_of(k.accept, t, unl) == errno.EINVAL


def test_closing_listener_resets_pending_clients(k, t):
    lfd = listener(k, t, "/srv")
    c = k.socket(t, AF_UNIX, SOCK_STREAM)
    k.connect(t, c, "/srv")
    embryo = sock_of(t, lfd).pending[0]
    k.close(t, lfd)
    assert embryo.state == SockState.CLOSED
    assert errno_of(k.recv, t, c, 10) == errno.ECONNRESET
    assert k.recv(t, c, 10) == b""                          # then EOF
    assert errno_of(k.send, t, c, b"x", MSG_NOSIGNAL) == errno.EPIPE
    k.close(t, c)
    assert embryo.refs == 0


# -- EOF, EPIPE, ECONNRESET, shutdown ---------------------------------------------------------

@pytest.mark.parametrize("sock_type", CONN_TYPES)
def test_eof_and_epipe_after_peer_close(k, t, sock_type):
    a, b = k.socketpair(t, sock_type)
    k.send(t, a, b"last")
    k.close(t, a)
    assert k.recv(t, b, 100) == b"last"
    assert k.recv(t, b, 100) == b""
    assert errno_of(k.send, t, b, b"x") == errno.EPIPE
    expected = [signal.SIGPIPE] if sock_type == SOCK_STREAM else []
    assert k.signals_sent == expected
    assert errno_of(k.send, t, b, b"x", MSG_NOSIGNAL) == errno.EPIPE
    assert k.signals_sent == expected


def test_close_with_unread_data_resets_the_peer(k, t):
    a, b = k.socketpair(t, SOCK_STREAM)
    k.send(t, a, b"unread")
    k.close(t, b)
    assert errno_of(k.recv, t, a, 10) == errno.ECONNRESET
    assert k.recv(t, a, 10) == b""


def test_dgram_peer_close_gives_econnrefused_once(k, t):
    a, b = k.socketpair(t, SOCK_DGRAM)
    sb = sock_of(t, b)
    k.close(t, b)
    assert sb.state == SockState.CLOSED and sb.refs == 1       # a still points at it
    assert errno_of(k.send, t, a, b"x") == errno.ECONNREFUSED
    assert sb.refs == 0
    assert errno_of(k.send, t, a, b"x") == errno.ENOTCONN


def test_shutdown_modes(k, t):
    a, b = k.socketpair(t, SOCK_STREAM)
    assert errno_of(k.shutdown, t, a, 3) == errno.EINVAL
    k.send(t, b, b"queued")
    k.shutdown(t, a, SHUT_RD)
    assert k.recv(t, a, 100) == b"queued"       # queued data stays readable
    assert k.recv(t, a, 100) == b""
    assert errno_of(k.send, t, b, b"x", MSG_NOSIGNAL) == errno.EPIPE   # peer can't write
    k.shutdown(t, a, SHUT_WR)
    assert errno_of(k.send, t, a, b"x") == errno.EPIPE
    assert k.recv(t, b, 10) == b""              # b sees EOF
    c, d = k.socketpair(t, SOCK_SEQPACKET)
    k.shutdown(t, c, SHUT_RDWR)
    assert k.recv(t, d, 10) == b""
    u = k.socket(t, AF_UNIX, SOCK_STREAM)
    assert k.shutdown(t, u, SHUT_RDWR) == 0     # no ENOTCONN for AF_UNIX


def test_not_connected_errors(k, t):
    s = k.socket(t, AF_UNIX, SOCK_STREAM)
    assert errno_of(k.send, t, s, b"x") == errno.ENOTCONN
    assert errno_of(k.recv, t, s, 1) == errno.EINVAL
    assert errno_of(k.getpeername, t, s) == errno.ENOTCONN
    assert errno_of(k.sendto, t, s, b"x", "/x") == errno.EOPNOTSUPP
    a, _ = k.socketpair(t, SOCK_STREAM)
    assert errno_of(k.sendto, t, a, b"x", "/x") == errno.EISCONN
    q = k.socket(t, AF_UNIX, SOCK_SEQPACKET)
    assert errno_of(k.send, t, q, b"x") == errno.ENOTCONN
    assert errno_of(k.recv, t, q, 1) == errno.ENOTCONN
    d = k.socket(t, AF_UNIX, SOCK_DGRAM)
    assert errno_of(k.send, t, d, b"x") == errno.ENOTCONN


# -- datagrams --------------------------------------------------------------------------------

def test_dgram_sendto_recvfrom_and_connect(k, t):
    srv = k.socket(t, AF_UNIX, SOCK_DGRAM)
    k.bind(t, srv, "/dgsrv")
    cli = k.socket(t, AF_UNIX, SOCK_DGRAM)
    k.bind(t, cli, b"\0cli")
    anon = k.socket(t, AF_UNIX, SOCK_DGRAM)
    k.sendto(t, cli, b"one", "/dgsrv")
    k.sendto(t, anon, b"two", "/dgsrv")
    assert k.recvfrom(t, srv, 10) == (b"one", b"\0cli")
    assert k.recvfrom(t, srv, 10) == (b"two", "")
    k.connect(t, cli, "/dgsrv")
    k.send(t, cli, b"three")
    assert k.recv(t, srv, 10) == b"three"
    k.connect(t, srv, b"\0cli")      # srv now only talks with cli
    assert errno_of(k.sendto, t, anon, b"x", "/dgsrv") == errno.EPERM
    assert errno_of(k.connect, t, anon, "/dgsrv") == errno.EPERM
    k.connect(t, cli, None)          # AF_UNSPEC
    assert errno_of(k.send, t, cli, b"x") == errno.ENOTCONN
    assert errno_of(k.sendto, t, anon, b"x", "/nowhere") == errno.ENOENT


def test_dgram_shut_rd_gives_eof_or_eagain(k, t):
    a, b = k.socketpair(t, SOCK_DGRAM)
    k.shutdown(t, b, SHUT_RD)
    assert k.recv(t, b, 10) == b""
    assert errno_of(k.recv, t, b, 10, MSG_DONTWAIT) == errno.EAGAIN
    assert errno_of(k.send, t, a, b"x") == errno.EPIPE


# -- SCM_RIGHTS -------------------------------------------------------------------------------

@pytest.mark.parametrize("sock_type", ALL_TYPES)
def test_pass_a_pipe_fd(k, t, sock_type):
    a, b = k.socketpair(t, sock_type)
    r, w = k.pipe(t)
    pipe_file = t.files.get(w)
    assert k.sendmsg(t, a, b"fd", [w]) == 2
    assert pipe_file.refs == 2                      # the fd slot and the message
    k.close(t, w)
    assert pipe_file.refs == 1
    data, fds = k.recvmsg(t, b, 100)
    assert data == b"fd" and len(fds) == 1
    assert t.files.get(fds[0]) is pipe_file and pipe_file.refs == 1
    k.write(t, fds[0], b"through")
    assert k.read(t, r, 100) == b"through"


def test_pass_a_file_to_another_task(k, t):
    other = _Task(FdTable(), t.fs.fork_copy(), t.cred)
    a, b = k.socketpair(t, SOCK_STREAM)
    fd = k.open(t, "/data", os.O_CREAT | os.O_RDWR)
    k.write(t, fd, b"contents")
    k.sendmsg(t, a, b"x", [fd, fd])
    t.files.install(t.files.get(b).get(), 7)        # share the receiving end
    other.files.install(t.files.get(b).get(), 3)
    data, fds = k.recvmsg(other, 3, 10)
    assert data == b"x" and fds == [0, 1]
    k.lseek(other, fds[0], 0, os.SEEK_SET)
    assert k.read(other, fds[1], 100) == b"contents"   # one open file description, twice


def test_stream_read_stops_after_the_segment_with_files(k, t):
    a, b = k.socketpair(t, SOCK_STREAM)
    r, w = k.pipe(t)
    k.send(t, a, b"aa")
    k.sendmsg(t, a, b"bb", [r])
    k.send(t, a, b"cc")
    data, fds = k.recvmsg(t, b, 100)
    assert data == b"aabb" and len(fds) == 1
    assert k.recvmsg(t, b, 100) == (b"cc", [])


def test_plain_recv_and_close_drop_files_in_flight(k, t):
    a, b = k.socketpair(t, SOCK_DGRAM)
    r, w = k.pipe(t)
    write_end = t.files.get(w)
    k.sendmsg(t, a, b"1", [w])
    k.sendmsg(t, a, b"2", [w])
    assert write_end.refs == 3
    assert k.recv(t, b, 10) == b"1"                # no control buffer: the file is closed
    assert write_end.refs == 2
    k.close(t, b)                                  # the queue goes: so does its file
    assert write_end.refs == 1


def test_sendmsg_errors(k, t):
    a, b = k.socketpair(t, SOCK_STREAM)
    assert errno_of(k.sendmsg, t, a, b"x", [42]) == errno.EBADF
    assert errno_of(k.sendmsg, t, a, b"x", [a] * 254) == errno.EINVAL
    assert k.sendmsg(t, a, b"", [a]) == 0          # empty stream write carries nothing
    assert sock_of(t, b).queued == 0 and t.files.get(a).refs == 1


def test_received_files_beyond_the_fd_limit_are_dropped(k, t):
    a, b = k.socketpair(t, SOCK_DGRAM)
    r, w = k.pipe(t)
    k.sendmsg(t, a, b"x", [r, w])
    t.files.limit = 5                              # fds 0..3 used: room for one more
    data, fds = k.recvmsg(t, b, 10)
    assert fds == [4] and t.files.get(w).refs == 1


def test_socket_passed_over_itself_keeps_the_peer_alive(k, t):
    a, b = k.socketpair(t, SOCK_STREAM)
    k.sendmsg(t, a, b"me", [a])
    k.close(t, a)
    sa = sock_of(t, b).peer
    assert sa.state == SockState.CONNECTED          # its File is still in flight
    data, fds = k.recvmsg(t, b, 10)
    k.send(t, fds[0], b"back")
    assert k.recv(t, b, 10) == b"back"


def test_refcounts_return_to_zero(k, t):
    lfd = listener(k, t, "/srv")
    c = k.socket(t, AF_UNIX, SOCK_STREAM)
    k.connect(t, c, "/srv")
    s = k.accept(t, lfd)
    socks = [sock_of(t, fd) for fd in (lfd, c, s)]
    for fd in (lfd, c, s):
        k.close(t, fd)
    assert [x.refs for x in socks] == [0, 0, 0]


# -- property: random traffic on a socketpair against a reference -----------------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(0, 1), st.binary(max_size=64)),
    st.tuples(st.just("recv"), st.integers(0, 1), st.integers(0, 80)),
), max_size=40)


@pytest.mark.parametrize("sock_type", ALL_TYPES)
@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_random_traffic_matches_reference(sock_type, ops):
    k = _MiniKernel()
    t = _Task(FdTable(), FsContext.new(kernel_filesystem(k)), Cred())
    ends = k.socketpair(t, sock_type | SOCK_NONBLOCK)
    # reference: what each end has to read, as one byte string or a list of messages
    pending = [b"", b""] if sock_type == SOCK_STREAM else [[], []]
    for op, side, arg in ops:
        if op == "send":
            assert k.send(t, ends[side], arg) == len(arg)
            if sock_type == SOCK_STREAM:
                pending[1 - side] += arg
            else:
                pending[1 - side].append(arg)
            continue
        if not pending[side]:
            assert errno_of(k.recv, t, ends[side], arg) == errno.EAGAIN
            continue
        got = k.recv(t, ends[side], arg)
        if sock_type == SOCK_STREAM:
            want, pending[side] = pending[side][:arg], pending[side][arg:]
            if arg == 0:
                want = b""
        else:
            want = pending[side].pop(0)[:arg]
        assert got == want
    for side in (0, 1):
        size = len(pending[side]) if sock_type == SOCK_STREAM else sum(map(len, pending[side]))
        assert sock_of(t, ends[side]).queued == size

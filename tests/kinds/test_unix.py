"""The unix socket kind: checkpoint/restart round trips through the real codec and contexts."""
from __future__ import annotations

import errno
import io
import os

import pytest

from ckptsim.cr.context import CheckpointContext, Log, RestartContext, RestartError
from ckptsim.image.codec import ImageReader
from ckptsim.image.types import ObjType
from ckptsim.kinds import files, pipes, unix as unix_kind  # noqa: F401  (registers the kinds)
from ckptsim.model.kernel import Kernel
from ckptsim.model.unix import (AF_UNIX, MSG_DONTWAIT, SOCK_DGRAM, SOCK_SEQPACKET, SOCK_STREAM,
                                SocketInode, SockState)


def checkpoint_table(k, table):
    """Save one fd table (one ctx.ref, as TASK_OBJS does); return (image, ref, leaks)."""
    buf = io.BytesIO()
    ctx = CheckpointContext(k, k.init, k.init, [k.init], buf, Log())
    ref = ctx.ref(table)
    ctx.writer.finish()
    return buf.getvalue(), ref, ctx.leaks()


def restore_table(image, ref, k2=None):
    """Restore the table into ``k2`` (fresh by default) as a new task's files."""
    k2 = k2 or Kernel()
    rctx = RestartContext(k2, k2.init, ImageReader(image), Log())
    rctx.peek()   # loads every OBJREF up to the tail
    table = rctx.obj(ref, ObjType.FILE_TABLE).get()
    for _, obj in sorted(rctx.objects.items()):
        obj.put(k2)   # the object table's references
    t2 = k2.clone(k2.init, 0)
    old, t2.files = t2.files, table
    old.put(k2)
    return k2, t2


def roundtrip(k, t):
    image, ref, leaks = checkpoint_table(k, t.files)
    assert leaks == []
    return restore_table(image, ref)


def new_task(k):
    return k.clone(k.init, 0)


def sock_of(t, fd):
    return t.files.get(fd).private


def test_socketpair_with_data_queued_both_ways():
    k = Kernel()
    t = new_task(k)
    a, b = k.socketpair(t, SOCK_STREAM)
    k.send(t, a, b"to b, ")
    k.send(t, a, b"more")
    k.send(t, b, b"to a")
    k2, t2 = roundtrip(k, t)
    sa, sb = sock_of(t2, a), sock_of(t2, b)
    assert sa.peer is sb and sb.peer is sa
    assert sa.refs == 2 and sb.refs == 2        # its File and its peer
    assert k2.recv(t2, b, 100) == b"to b, more"
    assert k2.recv(t2, a, 100) == b"to a"
    k2.send(t2, a, b"after")
    assert k2.recv(t2, b, 100) == b"after"
    k2.close(t2, a)
    assert k2.recv(t2, b, 100) == b""


@pytest.mark.parametrize("sock_type", [SOCK_DGRAM, SOCK_SEQPACKET])
def test_message_boundaries_survive(sock_type):
    k = Kernel()
    t = new_task(k)
    a, b = k.socketpair(t, sock_type)
    for msg in (b"one", b"", b"three"):
        k.send(t, a, msg)
    k2, t2 = roundtrip(k, t)
    assert [k2.recv(t2, b, 100) for _ in range(3)] == [b"one", b"", b"three"]
    assert k2.getpeername(t2, a) == ""


def test_dgram_with_names_and_senders():
    k = Kernel()
    t = new_task(k)
    srv = k.socket(t, AF_UNIX, SOCK_DGRAM)
    k.bind(t, srv, b"\0server")
    cli = k.socket(t, AF_UNIX, SOCK_DGRAM)
    k.bind(t, cli, b"\0client")
    k.connect(t, cli, b"\0server")
    k.send(t, cli, b"hello")
    k2, t2 = roundtrip(k, t)
    assert k2.recvfrom(t2, srv, 100) == (b"hello", b"\0client")
    assert k2.getsockname(t2, srv) == b"\0server"
    other = k2.socket(t2, AF_UNIX, SOCK_DGRAM)
    k2.sendto(t2, other, b"new", b"\0server")    # the name is registered again
    assert k2.recv(t2, srv, 100) == b"new"
    k2.send(t2, cli, b"still connected")
    assert k2.recv(t2, srv, 100) == b"still connected"


def test_listener_with_pending_connections():
    k = Kernel()
    t = new_task(k)
    lfd = k.socket(t, AF_UNIX, SOCK_STREAM)
    k.bind(t, lfd, b"\0srv")
    k.listen(t, lfd, 3)
    clients = []
    for i in range(2):
        c = k.socket(t, AF_UNIX, SOCK_STREAM)
        k.connect(t, c, b"\0srv")
        k.send(t, c, b"client %d" % i)
        clients.append(c)
    k2, t2 = roundtrip(k, t)
    listener = sock_of(t2, lfd)
    assert listener.state == SockState.LISTENING and listener.backlog == 3
    assert len(listener.pending) == 2
    for i, c in enumerate(clients):                 # accept order is kept
        s = k2.accept(t2, lfd)
        assert k2.recv(t2, s, 100) == b"client %d" % i
        k2.send(t2, s, b"welcome")
        assert k2.recv(t2, c, 100) == b"welcome"
    late = k2.socket(t2, AF_UNIX, SOCK_STREAM)
    k2.connect(t2, late, b"\0srv")                  # still listening under its name
    assert len(listener.pending) == 1


def test_path_bound_listener_recreates_its_inode():
    k = Kernel()
    t = new_task(k)
    lfd = k.socket(t, AF_UNIX, SOCK_STREAM)
    k.bind(t, lfd, "/srv.sock")
    k.listen(t, lfd, 1)
    k2, t2 = roundtrip(k, t)   # the fresh kernel has no /srv.sock: restart binds it again
    inode = k2.vfs.lookup("/srv.sock")
    assert isinstance(inode, SocketInode) and inode.bound is sock_of(t2, lfd)
    c = k2.socket(t2, AF_UNIX, SOCK_STREAM)
    k2.connect(t2, c, "/srv.sock")
    assert k2.getsockname(t2, k2.accept(t2, lfd)) == "/srv.sock"


def test_unlinked_path_name_is_kept_as_a_name():
    k = Kernel()
    t = new_task(k)
    fd = k.socket(t, AF_UNIX, SOCK_DGRAM)
    k.bind(t, fd, "/gone.sock")
    k.unlink(t, "/gone.sock")
    k2, t2 = roundtrip(k, t)
    assert k2.getsockname(t2, fd) == "/gone.sock"
    assert k2.vfs.lookup("/gone.sock") is None


def test_abstract_name_in_use_refuses_restart():
    k = Kernel()
    t = new_task(k)
    fd = k.socket(t, AF_UNIX, SOCK_DGRAM)
    k.bind(t, fd, b"\0taken")
    image, ref, _ = checkpoint_table(k, t.files)
    with pytest.raises(RestartError) as ei:
        restore_table(image, ref, k2=k)   # the original still holds the name
    assert ei.value.errno == errno.EADDRINUSE


def test_files_in_flight_pipe_and_socket():
    k = Kernel()
    t = new_task(k)
    a, b = k.socketpair(t, SOCK_STREAM)
    r, w = k.pipe(t)
    k.write(t, w, b"in the pipe")
    k.send(t, a, b"head ")
    k.sendmsg(t, a, b"with fds", [r, a])
    k.send(t, a, b" tail")
    k.close(t, r)                                 # only the message holds the read end now
    k2, t2 = roundtrip(k, t)
    data, fds = k2.recvmsg(t2, b, 100)
    assert data == b"head with fds" and len(fds) == 2
    assert k2.read(t2, fds[0], 100) == b"in the pipe"
    assert t2.files.get(fds[1]) is t2.files.get(a)    # the same open file description
    assert t2.files.get(a).refs == 2
    assert k2.recv(t2, b, 100) == b" tail"


def test_dgram_fd_in_flight_to_itself():
    k = Kernel()
    t = new_task(k)
    a, b = k.socketpair(t, SOCK_DGRAM)
    k.sendmsg(t, a, b"take b", [b])
    k2, t2 = roundtrip(k, t)
    data, fds = k2.recvmsg(t2, b, 100)
    assert data == b"take b" and t2.files.get(fds[0]) is t2.files.get(b)


def test_half_closed_and_reset_states():
    k = Kernel()
    t = new_task(k)
    a, b = k.socketpair(t, SOCK_STREAM)
    k.send(t, a, b"unread")
    k.close(t, b)                                   # a gets ECONNRESET; b lives on as CLOSED
    c, d = k.socketpair(t, SOCK_STREAM | 0)
    k.shutdown(t, c, 1)
    k2, t2 = roundtrip(k, t)
    assert sock_of(t2, a).peer.state == SockState.CLOSED
    with pytest.raises(Exception) as ei:
        k2.recv(t2, a, 10)
    assert ei.value.errno == errno.ECONNRESET
    assert k2.recv(t2, a, 10) == b""
    assert k2.recv(t2, d, 10) == b""
    assert k2.send(t2, d, b"x") == 1


def test_nonblocking_flag_and_queue_accounting():
    k = Kernel()
    t = new_task(k)
    a, b = k.socketpair(t, SOCK_STREAM | os.O_NONBLOCK)
    k.send(t, a, b"x" * 1000)
    k2, t2 = roundtrip(k, t)
    assert sock_of(t2, b).queued == 1000
    assert len(k2.recv(t2, b, 5000)) == 1000
    with pytest.raises(Exception) as ei:
        k2.recv(t2, b, 10, MSG_DONTWAIT)
    assert ei.value.errno == errno.EAGAIN


def test_leak_detected_when_a_peer_is_outside():
    k = Kernel()
    t = new_task(k)
    outside = new_task(k)
    a, b = k.socketpair(t, SOCK_STREAM)
    outside.files.install(t.files.get(b).get(), 0)
    k.close(t, b)
    _, _, leaks = checkpoint_table(k, t.files)
    assert leaks and "UnixSocket" in leaks[0]


def test_end_to_end_through_the_api():
    from ckptsim.cr import api
    from ckptsim.image import core
    k = Kernel()
    c = k.clone(k.init, 0)
    a, b = k.socketpair(c, SOCK_STREAM)
    k.send(c, a, b"across")
    lfd = k.socket(c, AF_UNIX, SOCK_SEQPACKET)
    k.bind(c, lfd, b"\0e2e")
    k.listen(c, lfd, 2)
    cl = k.socket(c, AF_UNIX, SOCK_SEQPACKET)
    k.connect(c, cl, b"\0e2e")
    buf = io.BytesIO()
    api.checkpoint(k, c, 0, buf, core.CHECKPOINT_SUBTREE)   # a self-checkpoint
    k2 = Kernel()
    t2 = api.restart_tasks(k2, k2.init, 0, buf.getvalue(), 0, restore_fs=True)[0]
    assert k2.recv(t2, b, 100) == b"across"
    s = k2.accept(t2, lfd)
    k2.send(t2, cl, b"msg")
    assert k2.recv(t2, s, 100) == b"msg"

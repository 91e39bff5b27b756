"""UNIX domain sockets (AF_UNIX): ``UnixSocket`` and the socket syscalls (``UnixOps``); their
names (bind, lookup, ``SocketInode``) are in unix_names.py.

A socket fd is a ``File`` whose ``ftype`` is ``SOCKET_FILE`` and whose ``private`` is the
``UnixSocket``; read/write on it are recv/send. Semantics follow net/unix/af_unix.c:

- stream connect completes at once: the listener gets an already connected server-side socket
  (an "embryo") on its ``pending`` queue, and ``accept`` hands it out; a backlog holds
  ``backlog + 1`` connections (Linux's ``unix_recvq_full`` uses ``>``);
- a stream receive queue is a list of segments without message boundaries; a recv stops after
  the segment that carried SCM_RIGHTS files. Datagram and seqpacket queues keep whole
  messages with the sender's address; a short recv drops the rest of the message;
- in-flight files hold one reference each (``file.get()``), handed to the receiver's fd table
  by ``recvmsg``, dropped by a plain ``recv`` or when the queue is purged at close;
- closing a stream/seqpacket socket sets SHUTDOWN_MASK on its peer (EOF, EPIPE) and
  ECONNRESET if it left unread data or was never accepted. A closed socket lives on (state
  CLOSED) while a peer still points at it: a datagram sender then gets ECONNREFUSED once;
- flow control: each receive queue holds at most ``rcvbuf`` bytes. A stream send writes what
  fits and returns the count (it blocks only when nothing fits: the scheduler retries whole
  syscalls, so it cannot sleep half way); a datagram must fit whole.

Reference counts (``refs``): one for the File (or, before accept, the listener's pending
queue) and one per socket whose ``peer`` points here. A checkpoint calls ``ctx.ref`` for
each of them. Not modelled: SCM_CREDENTIALS, MSG_OOB, the garbage collector of unreachable
in-flight sockets (a socket sent into its own queue leaks, as Linux without unix_gc would).
"""
from __future__ import annotations

import collections
import enum
import errno
import os
import signal
import stat

from ..errors import ModelError, kerr
from .sched import Blocked
from .shared import Shared
from .unix_names import (UNIX_PATH_MAX, SocketInode, abstract_names,  # noqa: F401 (re-exported)
                         autobind_name, bind_absolute, bind_path, filesystem, find_socket,
                         normalize_address, unbind)
from .vfs import FILE_TYPES, File, FileType
from .vfs_ops import MAY_EXEC, MAY_WRITE, permitted

AF_UNIX = 1
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET = 1, 2, 3, 5
SOCK_TYPE_NAMES = {SOCK_STREAM: "stream", SOCK_DGRAM: "dgram", SOCK_SEQPACKET: "seqpacket"}
SOCK_NONBLOCK = os.O_NONBLOCK
SOCK_CLOEXEC = os.O_CLOEXEC
SHUT_RD, SHUT_WR, SHUT_RDWR = 0, 1, 2
RCV_SHUTDOWN, SEND_SHUTDOWN = 1, 2
SHUTDOWN_MASK = RCV_SHUTDOWN | SEND_SHUTDOWN
MSG_PEEK, MSG_DONTWAIT, MSG_NOSIGNAL = 0x2, 0x40, 0x4000
MSG_CMSG_CLOEXEC = 0x40000000
SOCK_BUF_DEFAULT = 212992      # net.core.rmem_default / wmem_default
SOMAXCONN = 4096
SCM_MAX_FD = 253
UNNAMED = ""                   # getsockname of an unbound socket (as Python's socket shows it)


class SockState(enum.IntEnum):
    UNCONNECTED = 1
    LISTENING = 2
    CONNECTED = 3
    CLOSED = 4     # its file is gone (Linux's SOCK_DEAD); alive only while a peer points here


class Segment:
    """One queued item: bytes, the sender's address (datagrams) and SCM_RIGHTS files."""

    __slots__ = ("data", "sender", "files")

    def __init__(self, data, sender=None, files=()):
        self.data = bytearray(data)
        self.sender = sender
        self.files = list(files)

    def __repr__(self) -> str:
        return f"<Segment {len(self.data)}B from={self.sender!r} files={len(self.files)}>"


class UnixSocket(Shared):
    """One AF_UNIX socket (struct unix_sock)."""

    def __init__(self, sock_type: int):
        super().__init__()
        self.type = sock_type
        self.state = SockState.UNCONNECTED
        self.address: str | bytes | None = None  # str: path as given; bytes: abstract (\0...)
        self.bound_path: str | None = None        # absolute path of the socket inode we own
        self.inode: SocketInode | None = None
        self.peer: UnixSocket | None = None        # holds one reference of the peer
        self.backlog = 0
        self.pending: collections.deque[UnixSocket] = collections.deque()  # not yet accepted
        self.queue: collections.deque[Segment] = collections.deque()
        self.queued = 0                            # bytes in ``queue``
        self.shutdown = 0                          # RCV_SHUTDOWN | SEND_SHUTDOWN
        self.error = 0                             # pending sk_err (ECONNRESET)
        self.rcvbuf = SOCK_BUF_DEFAULT
        self.sndbuf = SOCK_BUF_DEFAULT

    @property
    def connection_oriented(self) -> bool:
        return self.type != SOCK_DGRAM

    def name(self):
        return UNNAMED if self.address is None else self.address

    def enqueue(self, seg: Segment) -> None:
        tail = self.queue[-1] if self.queue else None
        if (self.type == SOCK_STREAM and tail is not None and not tail.files
                and not seg.files):
            tail.data += seg.data    # no boundaries in a stream: merge plain bytes
        else:
            self.queue.append(seg)
        self.queued += len(seg.data)

    def purge(self, kernel) -> None:
        """Drop the receive queue and the references of the files in flight in it."""
        queue, self.queue, self.queued = self.queue, collections.deque(), 0
        for seg in queue:
            for file in seg.files:
                file.put(kernel)

    def set_peer(self, other: UnixSocket | None, kernel) -> None:
        old, self.peer = self.peer, (other.get() if other is not None else None)
        if old is not None:
            old.put(kernel)

    def close(self, kernel, embryo: bool = False) -> None:
        """Its file went away (unix_release_sock): unbind, disconnect, drop queues."""
        if self.state == SockState.CLOSED:
            return
        unread = bool(self.queue)
        self.state = SockState.CLOSED
        self.shutdown = SHUTDOWN_MASK
        unbind(kernel, self)
        peer = self.peer
        if peer is not None:
            if self.connection_oriented:
                peer.shutdown = SHUTDOWN_MASK
                if unread or embryo:
                    peer.error = errno.ECONNRESET
            self.set_peer(None, kernel)
        pending, self.pending = self.pending, collections.deque()
        for emb in pending:
            emb.close(kernel, embryo=True)
            emb.put(kernel)
        self.purge(kernel)

    def release(self, kernel) -> None:
        self.close(kernel)

    def __repr__(self) -> str:
        return (f"<UnixSocket {SOCK_TYPE_NAMES.get(self.type, self.type)} {self.state.name} "
                f"addr={self.address!r} queued={self.queued} refs={self.refs}>")


# -- data transfer (shared by the syscalls and by read/write on the fd) ---------------------

def _would_block(file: File, flags: int, reason: str):
    if file.flags & os.O_NONBLOCK or flags & MSG_DONTWAIT:
        return kerr(errno.EAGAIN, reason)
    return Blocked(reason)


def _pipe_error(kernel, t, sock: UnixSocket, flags: int, detail: str) -> ModelError:
    # Only stream sockets raise SIGPIPE (unix_stream_sendmsg); datagram sends just fail.
    if sock.type == SOCK_STREAM and not flags & MSG_NOSIGNAL:
        send_signal = getattr(kernel, "send_signal", None)
        if send_signal is not None:
            send_signal(t, signal.SIGPIPE)
    return kerr(errno.EPIPE, detail)


def sock_send(kernel, t, file: File, data, files=(), flags: int = 0, addr=None) -> int:
    """sendmsg on a socket File; ``files`` are the File objects to pass (SCM_RIGHTS)."""
    sock: UnixSocket = file.private
    data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    if len(files) > SCM_MAX_FD:
        raise kerr(errno.EINVAL, f"more than {SCM_MAX_FD} fds in one message")
    if sock.type == SOCK_STREAM:
        if addr is not None:
            if sock.state == SockState.CONNECTED:
                raise kerr(errno.EISCONN, "stream socket is connected")
            raise kerr(errno.EOPNOTSUPP, "sendto on an unconnected stream socket")
        target = sock.peer if sock.state == SockState.CONNECTED else None
        if target is None:
            raise kerr(errno.ENOTCONN, "stream socket is not connected")
        if sock.shutdown & SEND_SHUTDOWN:
            raise _pipe_error(kernel, t, sock, flags, "socket is shut down for writing")
        if target.state == SockState.CLOSED or target.shutdown & RCV_SHUTDOWN:
            raise _pipe_error(kernel, t, sock, flags, "peer closed or shut down reading")
        if len(data) == 0:
            return 0   # Linux sends nothing, not even the fds, for an empty stream write
        room = target.rcvbuf - target.queued
        if room <= 0:
            raise _would_block(file, flags, "peer's receive queue is full")
        chunk = bytes(data[:room])
        target.enqueue(Segment(chunk, None, [f.get() for f in files]))
        return len(chunk)
    # datagram and seqpacket: one message, whole
    if sock.type == SOCK_SEQPACKET:
        if sock.state != SockState.CONNECTED:
            raise kerr(errno.ENOTCONN, "seqpacket socket is not connected")
        addr = None
    target = find_socket(kernel, t, addr, sock.type) if addr is not None else sock.peer
    if target is None:
        raise kerr(errno.ENOTCONN, "datagram socket has no peer and no address was given")
    if len(data) > sock.sndbuf - 32:
        raise kerr(errno.EMSGSIZE, f"message of {len(data)} bytes exceeds sndbuf")
    if sock.shutdown & SEND_SHUTDOWN:
        raise _pipe_error(kernel, t, sock, flags, "socket is shut down for writing")
    if target.state == SockState.CLOSED:
        if sock.type == SOCK_SEQPACKET:
            raise _pipe_error(kernel, t, sock, flags, "peer closed")
        if target is sock.peer:   # the peer died: forget it, report once
            sock.set_peer(None, kernel)
            sock.state = SockState.UNCONNECTED
        raise kerr(errno.ECONNREFUSED, "peer socket is closed")
    if addr is not None and target.peer is not None and target.peer is not sock:
        raise kerr(errno.EPERM, "target datagram socket is connected to another socket")
    if target.shutdown & RCV_SHUTDOWN:
        raise _pipe_error(kernel, t, sock, flags, "peer shut down reading")
    if target.queue and target.queued + len(data) > target.rcvbuf:
        raise _would_block(file, flags, "peer's receive queue is full")
    target.enqueue(Segment(data, sock.name(), [f.get() for f in files]))
    return len(data)


def sock_recv(kernel, t, file: File, n: int, flags: int = 0):
    """recvmsg on a socket File: ``(data, files, sender)``; the caller owns the files' refs."""
    sock: UnixSocket = file.private
    if n < 0:
        raise kerr(errno.EINVAL, "negative length")
    if sock.type == SOCK_STREAM and sock.state not in (SockState.CONNECTED,):
        raise kerr(errno.EINVAL, "stream socket is not connected")
    if sock.type == SOCK_SEQPACKET and sock.state != SockState.CONNECTED:
        raise kerr(errno.ENOTCONN, "seqpacket socket is not connected")
    if not sock.queue:
        if sock.error:
            err, sock.error = sock.error, 0
            raise kerr(err, "connection reset by peer")
        if sock.shutdown & RCV_SHUTDOWN:
            if sock.type == SOCK_DGRAM and (file.flags & os.O_NONBLOCK or flags & MSG_DONTWAIT):
                raise kerr(errno.EAGAIN, "no datagram queued")
            return b"", [], None
        raise _would_block(file, flags, "receive queue is empty")
    peek = bool(flags & MSG_PEEK)
    if sock.type != SOCK_STREAM:
        seg = sock.queue[0] if peek else sock.queue.popleft()
        if peek:
            return bytes(seg.data[:n]), [f.get() for f in seg.files], seg.sender
        sock.queued -= len(seg.data)
        return bytes(seg.data[:n]), seg.files, seg.sender
    parts, files, want, index = [], [], n, 0
    while index < len(sock.queue) and want > 0:
        seg = sock.queue[index]
        take = bytes(seg.data[:want])
        parts.append(take)
        want -= len(take)
        carried = bool(seg.files)
        if peek:
            files.extend(f.get() for f in seg.files)
            index += 1
        else:
            files.extend(seg.files)
            seg.files = []
            del seg.data[:len(take)]
            sock.queued -= len(take)
            if not seg.data:
                sock.queue.popleft()
        if carried:
            break   # a read stops after the segment that brought files (unix_stream_read_generic)
    return b"".join(parts), files, None


def install_received(kernel, t, files, cloexec: bool) -> list[int]:
    """Give received files fds; those that do not fit are dropped (Linux's MSG_CTRUNC)."""
    fds = []
    for i, file in enumerate(files):
        try:
            fds.append(t.files.install(file, cloexec=cloexec))
        except ModelError:
            for rest in files[i:]:
                rest.put(kernel)
            break
    return fds


class SocketType(FileType):
    """File operations of a socket fd: read/write are recv/send without flags."""

    kind = "socket"
    seekable = False

    def read(self, kernel, t, file, n):
        data, files, _ = sock_recv(kernel, t, file, n)
        for f in files:
            f.put(kernel)
        return data

    def write(self, kernel, t, file, data):
        return sock_send(kernel, t, file, data)

    def stat(self, file):
        return {"st_ino": 0, "st_mode": stat.S_IFSOCK | 0o777, "st_nlink": 1, "st_size": 0,
                "st_uid": 0, "st_gid": 0}

    def restore_file(self, kernel, file):
        """Restart hook of kinds/files.py: the unix kind may wait for this File (see there)."""
        hook = getattr(kernel, "unix_file_restored", None)
        if hook is not None:
            hook(file)

    def release(self, kernel, file):
        sock, file.private = file.private, None
        if sock is not None:
            sock.close(kernel)
            sock.put(kernel)


SOCKET_FILE = SocketType()
FILE_TYPES["socket"] = SOCKET_FILE


def socket_file(sock: UnixSocket, nonblock: bool = False) -> File:
    """A File for ``sock``, taking over one of its references."""
    return File(None, os.O_RDWR | (os.O_NONBLOCK if nonblock else 0), SOCKET_FILE, private=sock)


class UnixOps:
    """The AF_UNIX socket syscalls (mixin of Kernel)."""

    def _sockfile(self, t, fd: int) -> File:
        file = t.files.get(fd)
        if not isinstance(file.ftype, SocketType):
            raise kerr(errno.ENOTSOCK, f"fd {fd} is not a socket")
        return file

    def _install_socket(self, t, sock: UnixSocket, type_flags: int) -> int:
        file = socket_file(sock, bool(type_flags & SOCK_NONBLOCK))
        try:
            return t.files.install(file, cloexec=bool(type_flags & SOCK_CLOEXEC))
        except ModelError:
            file.put(self)
            raise

    @staticmethod
    def _socket_type(sock_type: int, protocol: int) -> tuple[int, int]:
        flags = sock_type & (SOCK_NONBLOCK | SOCK_CLOEXEC)
        base = sock_type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)
        if base & ~0xF:
            raise kerr(errno.EINVAL, f"bad socket type flags {sock_type:#x}")
        if protocol not in (0, AF_UNIX):
            raise kerr(errno.EPROTONOSUPPORT, f"protocol {protocol} for AF_UNIX")
        if base == SOCK_RAW:
            base = SOCK_DGRAM   # unix_create treats SOCK_RAW as SOCK_DGRAM
        if base not in SOCK_TYPE_NAMES:
            raise kerr(errno.ESOCKTNOSUPPORT, f"socket type {base} for AF_UNIX")
        return base, flags

    def socket(self, t, family: int, sock_type: int, protocol: int = 0) -> int:
        if family != AF_UNIX:
            raise kerr(errno.EAFNOSUPPORT, f"address family {family} is not modelled")
        base, flags = self._socket_type(sock_type, protocol)
        return self._install_socket(t, UnixSocket(base), flags)

    def socketpair(self, t, sock_type: int, protocol: int = 0) -> tuple[int, int]:
        base, flags = self._socket_type(sock_type, protocol)
        a, b = UnixSocket(base), UnixSocket(base)
        a.set_peer(b, self)
        b.set_peer(a, self)
        a.state = b.state = SockState.CONNECTED
        fd_a = self._install_socket(t, a, flags)
        try:
            fd_b = self._install_socket(t, b, flags)
        except ModelError:
            t.files.close(self, fd_a)
            raise
        return fd_a, fd_b

    def bind(self, t, fd: int, addr) -> int:
        sock: UnixSocket = self._sockfile(t, fd).private
        addr = normalize_address(addr)
        if sock.address is not None:
            raise kerr(errno.EINVAL, "socket is already bound")
        if addr == "":
            addr = autobind_name(self)
        if isinstance(addr, bytes):
            names = abstract_names(self)
            if addr in names:
                raise kerr(errno.EADDRINUSE, f"abstract name {addr[1:]!r} is in use")
            names[addr] = sock
        else:
            lk = self._lookup(t, addr)
            if lk.inode is not None:
                raise kerr(errno.EADDRINUSE, f"{lk.path} exists")
            cred = getattr(t, "cred", None)
            if lk.parent is not None and not permitted(cred, lk.parent, MAY_WRITE | MAY_EXEC):
                raise kerr(errno.EACCES, f"{lk.path}: no write permission on the directory")
            bind_path(self, sock, lk.parent, lk.name, lk.path, 0o777 & ~t.fs.umask,
                      getattr(cred, "fsuid", 0), getattr(cred, "fsgid", 0))
        sock.address = addr
        return 0

    def listen(self, t, fd: int, backlog: int) -> int:
        sock: UnixSocket = self._sockfile(t, fd).private
        if sock.type == SOCK_DGRAM:
            raise kerr(errno.EOPNOTSUPP, "listen on a datagram socket")
        if sock.state not in (SockState.UNCONNECTED, SockState.LISTENING):
            raise kerr(errno.EINVAL, "listen on a connected socket")
        if sock.address is None:
            raise kerr(errno.EINVAL, "listen on an unbound socket")
        sock.backlog = SOMAXCONN if backlog < 0 or backlog > SOMAXCONN else backlog
        sock.state = SockState.LISTENING
        return 0

    def connect(self, t, fd: int, addr) -> int:
        file = self._sockfile(t, fd)
        sock: UnixSocket = file.private
        if sock.type == SOCK_DGRAM:
            if addr is None:   # AF_UNSPEC: dissolve the association
                sock.set_peer(None, self)
                sock.state = SockState.UNCONNECTED
                return 0
            other = find_socket(self, t, addr, sock.type)
            if other.peer is not None and other.peer is not sock and other is not sock:
                raise kerr(errno.EPERM, "target datagram socket is connected elsewhere")
            sock.set_peer(other, self)
            sock.state = SockState.CONNECTED
            return 0
        if sock.state == SockState.CONNECTED:
            raise kerr(errno.EISCONN, "socket is already connected")
        if sock.state != SockState.UNCONNECTED:
            raise kerr(errno.EINVAL, "connect on a listening socket")
        listener = find_socket(self, t, addr, sock.type)
        if listener.state != SockState.LISTENING or listener.shutdown & RCV_SHUTDOWN:
            raise kerr(errno.ECONNREFUSED, "target socket is not listening")
        if len(listener.pending) > listener.backlog:
            raise _would_block(file, 0, "listener's backlog is full")
        embryo = UnixSocket(sock.type)   # its first reference belongs to the pending queue
        embryo.address = listener.address
        embryo.rcvbuf, embryo.sndbuf = listener.rcvbuf, listener.sndbuf
        embryo.state = sock.state = SockState.CONNECTED
        embryo.set_peer(sock, self)
        sock.set_peer(embryo, self)
        listener.pending.append(embryo)
        return 0

    def accept(self, t, fd: int, flags: int = 0) -> int:
        file = self._sockfile(t, fd)
        sock: UnixSocket = file.private
        if flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC):
            raise kerr(errno.EINVAL, f"bad accept4 flags {flags:#x}")
        if sock.type == SOCK_DGRAM:
            raise kerr(errno.EOPNOTSUPP, "accept on a datagram socket")
        if sock.state != SockState.LISTENING:
            raise kerr(errno.EINVAL, "accept on a socket that is not listening")
        if not sock.pending:
            raise _would_block(file, 0, "no pending connection")
        t.files.alloc_fd()   # EMFILE before the connection leaves the queue
        embryo = sock.pending.popleft()
        return self._install_socket(t, embryo, flags)

    def send(self, t, fd: int, data, flags: int = 0) -> int:
        return sock_send(self, t, self._sockfile(t, fd), data, (), flags)

    def sendto(self, t, fd: int, data, addr, flags: int = 0) -> int:
        return sock_send(self, t, self._sockfile(t, fd), data, (), flags, addr)

    def sendmsg(self, t, fd: int, data, fds=(), flags: int = 0, addr=None) -> int:
        file = self._sockfile(t, fd)
        files = [t.files.get(passed) for passed in fds]   # EBADF before anything is sent
        return sock_send(self, t, file, data, files, flags, addr)

    def recv(self, t, fd: int, n: int, flags: int = 0) -> bytes:
        return self.recvfrom(t, fd, n, flags)[0]

    def recvfrom(self, t, fd: int, n: int, flags: int = 0):
        data, files, sender = sock_recv(self, t, self._sockfile(t, fd), n, flags)
        for file in files:   # no control buffer: the passed files are closed
            file.put(self)
        return data, (UNNAMED if sender is None else sender)

    def recvmsg(self, t, fd: int, n: int, flags: int = 0) -> tuple[bytes, list[int]]:
        data, files, _ = sock_recv(self, t, self._sockfile(t, fd), n, flags)
        return data, install_received(self, t, files, bool(flags & MSG_CMSG_CLOEXEC))

    def shutdown(self, t, fd: int, how: int) -> int:
        sock: UnixSocket = self._sockfile(t, fd).private
        if how not in (SHUT_RD, SHUT_WR, SHUT_RDWR):
            raise kerr(errno.EINVAL, f"bad shutdown mode {how}")
        mode = how + 1   # SHUT_RD -> RCV_SHUTDOWN, SHUT_WR -> SEND_SHUTDOWN, both
        sock.shutdown |= mode
        peer = sock.peer
        if peer is not None and sock.connection_oriented:
            peer.shutdown |= ((SEND_SHUTDOWN if mode & RCV_SHUTDOWN else 0)
                              | (RCV_SHUTDOWN if mode & SEND_SHUTDOWN else 0))
        return 0

    def getsockname(self, t, fd: int):
        return self._sockfile(t, fd).private.name()

    def getpeername(self, t, fd: int):
        peer = self._sockfile(t, fd).private.peer
        if peer is None:
            raise kerr(errno.ENOTCONN, "socket has no peer")
        return peer.name()

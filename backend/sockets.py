"""Live checkpoint of AF_UNIX sockets, written through the model's unix kind (kinds/unix.py).

What is read, and how, without disturbing the (stopped) tree:

- Type, state, name, peer, receive-queue length, pending connections of a listener, shutdown
  state and buffer sizes come from NETLINK_SOCK_DIAG (sock_diag(7), one UNIX_DIAG dump of the
  network namespace per checkpoint, taken when the first socket fd is met).
- Queued data is peeked through a copy of the socket fd (pidfd_getfd): stream queues with
  SO_PEEK_OFF walking exactly the number of bytes sock_diag reports (a peek past the end would
  consume a pending error), datagram and seqpacket queues message by message (the peek offset
  advances one message per peek; a message larger than the buffer comes back in pieces with
  MSG_TRUNC). The socket's own peek offset is put back afterwards.
- Files in flight (SCM_RIGHTS): a peek brings a duplicate of each in-flight file into this
  process (as a received fd; the queue keeps its own). Those fds are gathered like a task's
  fds (snapshot.Gatherer.in_flight: a description also held by a task is one File, found with
  kcmp; a socket in flight is walked in turn) and kept open until the checkpoint ends. A stream
  read stops right after a buffer carrying files, so each file is saved with the run of bytes
  that ends with its buffer (where that buffer starts cannot be seen by peeking: see
  peek_stream). The number found must equal the socket's fdinfo scm_fds. Nothing runs
  inside the target. The pending error (sk_err,
  only ever ECONNRESET for AF_UNIX) is seen with poll(POLLERR), which does not clear it; a
  datagram or seqpacket socket that has both a pending error and queued data is refused,
  because the first peek would consume the error.
- One socket (inode) reached from several fds or tasks is one LiveUnixSocket, so one SOCK.

Choices (documented limits):

- A peer that no task of the tree holds (the tree is a subtree of a bigger system) is saved as
  an *external* socket: its type, state and name as sock_diag shows them, but not its queue
  (the bytes the tree sent to it and that its owner has not read) and it never owns its name
  (restoring it must not steal a name from the live system). It is logged.
- A peer that is already closed (the survivor of a connection) is saved as a CLOSED socket.
- A connection not yet accepted: the server-side socket ("embryo") has no inode and no fd;
  it is saved in its listener's pending list with the listener's name. Data the client wrote
  into it cannot be peeked (no fd; accepting it, even inside the target, would change what
  the tree sees): it is read in the kernel by a BPF iterator (backend/unix_embryo.py, loaded
  only when such data exists; compiled once by bcc in a child process, its bytecode kept in
  the run cache and loaded with bpf(2): no LLVM in the checkpointer). Where that reader cannot run or copy the
  queue (no bcc, page-fragment buffers, files in flight, MSG_OOB) the listener is refused
  saying why, as is one whose pending client already closed (it cannot be restored).
- Name ownership: a listening, unconnected or datagram socket owns its name; a connected
  stream or seqpacket socket never does (an accepted socket carries a copy of its listener's
  name; a client bound before connect() therefore restores with the name, not the binding).
  A path name is saved as linked when the file at that path (seen from the task's root, or
  its cwd for a relative name) is still that socket's inode, as unlinked otherwise; a
  relative name that cannot be found from the task's cwd is refused.
- Refused with Unsupported naming the task, the fd and why: sockets of other families, files
  in flight that peeking cannot account for (fewer or more than fdinfo's scm_fds, e.g. in a
  not yet accepted connection's queue), a socket sock_diag cannot see (another network
  namespace), unknown states.
- A datagram socket another one connected to is saved UNCONNECTED: Linux marks both
  ESTABLISHED (unix_dgram_connect), but only the connecting one has a peer.
- Not seen: MSG_OOB data, a zero-length datagram the target itself already peeked, zero-length
  seqpacket messages queued after the peer shut down (indistinguishable from EOF by peeking).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import posixpath
import select
import socket
import stat
import weakref
from dataclasses import dataclass, field

from ckptsim.model.unix import (AF_UNIX, RCV_SHUTDOWN, SHUTDOWN_MASK, SOCK_BUF_DEFAULT,
                                SOCK_DGRAM, SOCK_SEQPACKET, SOCK_STREAM, SOCK_TYPE_NAMES,
                                Segment, SockState)

from . import kabi, proc
from .sock_peek import close_fds, poll_events, peek_messages, peek_stream

_DIAG_SHOW = (kabi.UDIAG_SHOW_NAME | kabi.UDIAG_SHOW_VFS | kabi.UDIAG_SHOW_PEER
              | kabi.UDIAG_SHOW_ICONS | kabi.UDIAG_SHOW_RQLEN | kabi.UDIAG_SHOW_MEMINFO)


# -- sock_diag --------------------------------------------------------------------------------
@dataclass
class UnixDiag:
    """One AF_UNIX socket as sock_diag reports it."""
    ino: int
    type: int
    state: int
    name: bytes | None = None           # raw sun_path bytes (abstract names start with NUL)
    vfs: tuple[int, int] | None = None  # (inode, kernel dev) of the bound path's socket file
    peer: int | None = None             # peer inode; 0: the peer has no inode (embryo, closed)
    icons: list[int] = field(default_factory=list)   # listener: client inodes of pending conns
    rqueue: int = 0                     # listener: pending count; stream/seqpacket: queued
    wqueue: int = 0                     # bytes; dgram: first message's length. listener:
    rcvbuf: int = SOCK_BUF_DEFAULT      # backlog; others: bytes sent, not yet read (truesize)
    sndbuf: int = SOCK_BUF_DEFAULT
    shutdown: int = 0


def _aligned(n: int) -> int:
    return (n + 3) & ~3


def _parse_diag(payload: memoryview) -> UnixDiag:
    msg = kabi.unix_diag_msg.from_buffer_copy(payload)
    d = UnixDiag(msg.udiag_ino, msg.udiag_type, msg.udiag_state)
    off = _aligned(ctypes.sizeof(kabi.unix_diag_msg))
    while off + 4 <= len(payload):
        attr = kabi.nlattr.from_buffer_copy(payload, off)
        if attr.nla_len < 4:
            break
        data = payload[off + 4:off + attr.nla_len]
        kind = attr.nla_type & 0x3FFF
        if kind == kabi.UNIX_DIAG_NAME:
            d.name = bytes(data)
        elif kind == kabi.UNIX_DIAG_VFS:
            v = kabi.unix_diag_vfs.from_buffer_copy(data)
            d.vfs = (v.udiag_vfs_ino, v.udiag_vfs_dev)
        elif kind == kabi.UNIX_DIAG_PEER:
            d.peer = int.from_bytes(data[:4], "little")
        elif kind == kabi.UNIX_DIAG_ICONS:
            d.icons = list(data.cast("I")) if len(data) else []
        elif kind == kabi.UNIX_DIAG_RQLEN:
            q = kabi.unix_diag_rqlen.from_buffer_copy(data)
            d.rqueue, d.wqueue = q.udiag_rqueue, q.udiag_wqueue
        elif kind == kabi.UNIX_DIAG_MEMINFO:
            mem = data.cast("I")
            d.rcvbuf, d.sndbuf = mem[kabi.SK_MEMINFO_RCVBUF], mem[kabi.SK_MEMINFO_SNDBUF]
        elif kind == kabi.UNIX_DIAG_SHUTDOWN:
            d.shutdown = data[0]
        off += _aligned(attr.nla_len)
    return d


def diag_dump() -> dict[int, UnixDiag]:
    """Every AF_UNIX socket of our network namespace, by inode (one NLM_F_DUMP request)."""
    req = kabi.unix_diag_req(sdiag_family=AF_UNIX, udiag_states=0xFFFFFFFF, udiag_show=_DIAG_SHOW)
    hdr = kabi.nlmsghdr(nlmsg_len=ctypes.sizeof(kabi.nlmsghdr) + ctypes.sizeof(req),
                        nlmsg_type=kabi.SOCK_DIAG_BY_FAMILY,
                        nlmsg_flags=kabi.NLM_F_REQUEST | kabi.NLM_F_DUMP, nlmsg_seq=1)
    out: dict[int, UnixDiag] = {}
    hdr_size = ctypes.sizeof(kabi.nlmsghdr)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       kabi.NETLINK_SOCK_DIAG) as nl:
        nl.sendto(bytes(hdr) + bytes(req), (0, 0))
        buf = bytearray(1 << 16)
        while True:
            n = nl.recv_into(buf)
            view = memoryview(buf)[:n]
            off = 0
            while off + hdr_size <= n:
                h = kabi.nlmsghdr.from_buffer_copy(view, off)
                if h.nlmsg_len < hdr_size or off + h.nlmsg_len > n:
                    raise OSError(errno.EPROTO, "sock_diag: truncated netlink message")
                payload = view[off + hdr_size:off + h.nlmsg_len]
                if h.nlmsg_type == kabi.NLMSG_DONE:
                    return out
                if h.nlmsg_type == kabi.NLMSG_ERROR:
                    err = -int.from_bytes(payload[:4], "little", signed=True)
                    if err:
                        raise OSError(err, f"sock_diag of AF_UNIX sockets: {os.strerror(err)}")
                elif h.nlmsg_type == kabi.SOCK_DIAG_BY_FAMILY:
                    d = _parse_diag(payload)
                    out[d.ino] = d
                off += _aligned(h.nlmsg_len)


# -- stand-ins for the model's UnixSocket and what kinds/unix.py asks ctx.kernel -------------
class LiveSocketInode:
    """The socket file a path-named socket is bound to (SocketInode's ``bound``)."""

    def __init__(self, ino: int, bound: "LiveUnixSocket"):
        self.ino, self.bound = ino, bound


class LiveSocketFs:
    """``filesystem(kernel).lookup(path)``: the socket inode still linked at ``path``."""

    def __init__(self):
        self.linked: dict[str, LiveSocketInode] = {}

    def lookup(self, path: str):
        return self.linked.get(path)


class LiveUnixKernel:
    """What kinds/unix.py reads of ``ctx.kernel`` when it saves a name: the abstract names
    and the linked socket files the checkpointed sockets own."""

    def __init__(self):
        self.unix_abstract_names: dict[bytes, LiveUnixSocket] = {}
        self.vfs = LiveSocketFs()


_UNRESOLVED = object()


class LiveUnixSocket:
    """One AF_UNIX socket with UnixSocket's attributes as kinds/unix.py reads them.

    ``peer`` and ``pending`` are resolved when the image is written (first read), once every
    fd of the tree has been seen: only then is it known which sockets the tree holds."""

    def __init__(self, table: "UnixSockets | None", ino: int, sock_type: int):
        self._table = table
        self.ino = ino
        self.type = sock_type
        self.state = SockState.UNCONNECTED
        self.address: str | bytes | None = None
        self.bound_path: str | None = None
        self.inode: LiveSocketInode | None = None
        self.backlog = 0
        self._queue: list[Segment] = []
        self.queued = 0
        self.shutdown = 0
        self.error = 0
        self.rcvbuf = self.sndbuf = SOCK_BUF_DEFAULT
        self.held_by: tuple[int, int] | None = None   # (pid, fd) of the first holder in the tree
        self.where: str | None = None                 # how messages name that holder
        self.external = True     # no task of the tree holds it (nor is it part of one it holds)
        self.what = f"socket:[{ino}]" if ino else "socket"
        self._peer = _UNRESOLVED
        self._pending = _UNRESOLVED
        self._noted = False

    @property
    def peer(self):
        if self._peer is _UNRESOLVED:
            self._peer = None   # (a cycle back here while resolving sees "no peer yet")
            self._peer = self._table.resolve_peer(self)
        return self._peer

    @peer.setter
    def peer(self, value) -> None:
        self._peer = value

    @property
    def pending(self):
        if self._pending is _UNRESOLVED:
            self._pending = []
            self._pending = self._table.resolve_pending(self)
        return self._pending

    @pending.setter
    def pending(self, value) -> None:
        self._pending = value

    @property
    def queue(self) -> list[Segment]:
        if self.external and not self._noted and self._table is not None:
            self._noted = True
            self._table.note_external(self)
        return self._queue

    def set_queue(self, segments: list[Segment]) -> None:
        self._queue = segments
        self.queued = sum(len(s.data) for s in segments)

    def __repr__(self) -> str:
        return (f"<LiveUnixSocket {self.what} {SOCK_TYPE_NAMES.get(self.type, self.type)} "
                f"{self.state.name} addr={self.address!r} queued={self.queued}>")


# -- gathering --------------------------------------------------------------------------------
_STATES = {kabi.TCP_CLOSE: SockState.UNCONNECTED, kabi.TCP_LISTEN: SockState.LISTENING,
           kabi.TCP_ESTABLISHED: SockState.CONNECTED}


def _address(raw: bytes | None) -> str | bytes | None:
    """sock_diag's name as the model keeps it: str path, or bytes starting with NUL."""
    if not raw:
        return None
    if raw.startswith(b"\0"):
        return raw
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _sysctl(name: str, default: int) -> int:
    try:
        with open(f"/proc/sys/net/core/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


def take_fd(pid: int, fd: int) -> int:
    """A copy of ``pid``'s fd in this process (pidfd_open + pidfd_getfd), close-on-exec."""
    pidfd = os.pidfd_open(pid)
    try:
        return kabi.syscall(kabi.SYS_pidfd_getfd, pidfd, fd, 0, what=f"pidfd_getfd of task {pid} fd {fd}")
    finally:
        os.close(pidfd)


def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return f"address family {family}"


def _unsupported(message: str):
    from .snapshot import Unsupported
    return Unsupported(message)


class UnixSockets:
    """The AF_UNIX sockets of one checkpoint, by inode; ``kernel`` is the stand-in that
    kinds/unix.py reads through ``ctx.kernel``."""

    def __init__(self, log=None, gatherer=None):
        self.log = log
        self.gatherer = gatherer     # snapshot.Gatherer: makes the Files of fds in flight
        self.kernel = LiveUnixKernel()
        self.socks: dict[int, LiveUnixSocket] = {}
        self.embryos: dict[int, LiveUnixSocket] = {}   # client inode -> not yet accepted socket
        self._diag: dict[int, UnixDiag] | None = None
        self._listener_of: dict[int, int] = {}         # client inode -> listener inode
        self._embryo_data = None                       # unix_embryo's answer, when needed
        self._rmem = _sysctl("rmem_default", SOCK_BUF_DEFAULT)
        self._wmem = _sysctl("wmem_default", SOCK_BUF_DEFAULT)

    def _debug(self, message: str) -> None:
        if self.log is not None:
            self.log.debug(0, message)

    def diag(self) -> dict[int, UnixDiag]:
        if self._diag is None:
            self._diag = diag_dump()
            for d in self._diag.values():
                for client in d.icons:
                    if client:
                        self._listener_of[client] = d.ino
        return self._diag

    # -- a socket fd of the tree ------------------------------------------------------------
    def file(self, pid: int, info: proc.FdInfo, *, seen_from: int | None = None,
             where: str | None = None):
        """The LiveFile for socket fd ``info.fd`` of task ``pid`` (which must be stopped).
        A socket in flight is an fd of this process: ``seen_from`` is then the task whose
        queue holds it (its root and cwd resolve the socket's path), ``where`` names it."""
        from .snapshot import LiveFile
        where = where or f"task {pid}: fd {info.fd}"
        fd = take_fd(pid, info.fd)
        flags_before = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise
        with s:
            if fcntl.fcntl(fd, fcntl.F_GETFL) != flags_before:   # the file is shared: keep it
                fcntl.fcntl(fd, fcntl.F_SETFL, flags_before)
            if s.family != socket.AF_UNIX:
                raise _unsupported(f"{where} is an {_family_name(s.family)} socket "
                                   f"({info.target}): not supported yet")
            sock = self._held(pid, info, s, where, seen_from or pid)
        return LiveFile("socket", info.flags & ~os.O_CLOEXEC, 0, "", seekable=False,
                        private=sock)

    def _held(self, pid: int, info: proc.FdInfo, s: socket.socket, where: str,
              seen_from: int) -> LiveUnixSocket:
        sock = self.socks.get(info.ino)
        if sock is not None and not sock.external:
            return sock
        d = self.diag().get(info.ino)
        if d is None:
            raise _unsupported(f"{where}: unix socket:[{info.ino}] is not visible to sock_diag "
                               "(another network namespace?): not supported yet")
        if sock is None:
            sock = self._make(d)
        # held from now on: a socket met again while its own queue is walked (it is in flight
        # in it, or in its peer's) is this one
        sock.held_by, sock.external, sock.where = (pid, info.fd), False, where
        where = f"{where} (unix {SOCK_TYPE_NAMES.get(d.type, d.type)} socket:[{d.ino}])"
        scm = dict(info.extra).get("scm_fds", "0")
        in_flight = int(scm) if scm.isdigit() else 0
        revents = poll_events(s.fileno())
        if revents & select.POLLERR:
            sock.error = errno.ECONNRESET   # the only sk_err AF_UNIX sets
        queue: list[tuple[Segment, list[int]]] = []
        if d.state == kabi.TCP_ESTABLISHED and d.type == SOCK_STREAM:
            if d.rqueue:
                queue = [(Segment(data, None), fds) for data, fds in peek_stream(s, d.rqueue, where)]
        elif d.type == SOCK_DGRAM or (d.type == SOCK_SEQPACKET and d.state == kabi.TCP_ESTABLISHED):
            # POLLIN: messages queued, or shut down for reading (then the queue may be empty)
            may_hold = bool(revents & select.POLLIN)
            if may_hold and sock.error:
                raise _unsupported(f"{where}: a pending error (ECONNRESET) and possibly queued "
                                   "messages: peeking would clear the error")
            if may_hold:
                eof = d.type == SOCK_SEQPACKET and bool(d.shutdown & RCV_SHUTDOWN)
                queue = peek_messages(s, eof, where)
        found = sum(len(fds) for _, fds in queue)
        if found:
            self._files_in_flight(queue, seen_from, where)
        sock.set_queue([seg for seg, _ in queue])
        if d.type == SOCK_SEQPACKET and d.state == kabi.TCP_ESTABLISHED and sock.queued != d.rqueue:
            raise _unsupported(f"{where}: sock_diag reports {d.rqueue} queued bytes, "
                               f"{sock.queued} were peeked")
        if found != in_flight:
            raise _unsupported(f"{where}: its fdinfo counts {in_flight} file(s) in flight in its "
                               f"queue (SCM_RIGHTS), peeking found {found}: not supported")
        self._own_name(seen_from, sock, d, where)
        return sock

    def _files_in_flight(self, queue: list[tuple[Segment, list[int]]], seen_from: int,
                         where: str) -> None:
        """Turn the fds the peeks brought (SCM_RIGHTS) into the Files of their segments. The
        gatherer keeps each fd open until the checkpoint ends (kcmp compares later fds of
        the tree with it); the fds not handed over yet are closed on an error."""
        pending = [fd for _, fds in queue for fd in fds]
        try:
            if self.gatherer is None:
                raise _unsupported(f"{where}: {len(pending)} file(s) in flight in its queue "
                                   "(SCM_RIGHTS) and no gatherer to save them")
            for seg, fds in queue:
                for i, fd in enumerate(fds):
                    pending.remove(fd)
                    seg.files.append(self.gatherer.in_flight(
                        fd, seen_from, f"{where}: file {i + 1} in flight in segment of "
                                       f"{len(seg.data)} bytes"))
        finally:
            close_fds(pending)

    def _own_name(self, pid: int, sock: LiveUnixSocket, d: UnixDiag, where: str) -> None:
        """Register the name of a socket the tree holds if it owns it (see the module doc)."""
        if sock.address is None or (sock.state == SockState.CONNECTED and sock.type != SOCK_DGRAM):
            return
        if isinstance(sock.address, bytes):
            self.kernel.unix_abstract_names.setdefault(sock.address, sock)
            return
        name = sock.address
        if name.startswith("/"):
            full = posixpath.normpath(name)
            seen_at = f"/proc/{pid}/root{full}"
        else:
            cwd = (proc.read_cwd(pid) or "/").removesuffix(" (deleted)")
            full = posixpath.normpath(posixpath.join(cwd, name))
            seen_at = f"/proc/{pid}/cwd/{name}"
        linked = False
        if d.vfs is not None:
            try:
                st = os.stat(seen_at)
                vino, vdev = d.vfs
                linked = (stat.S_ISSOCK(st.st_mode) and st.st_ino == vino
                          and os.major(st.st_dev) == vdev >> kabi.KDEV_MINORBITS
                          and os.minor(st.st_dev) == vdev & ((1 << kabi.KDEV_MINORBITS) - 1))
            except OSError:
                linked = False
        if not linked and not name.startswith("/"):
            raise _unsupported(f"{where}: bound to the relative path {name!r}, which is not that "
                               "socket's file seen from the task's cwd: cannot tell its path")
        sock.inode = LiveSocketInode(d.vfs[0] if d.vfs else 0, sock)
        sock.bound_path = full
        if linked:
            self.kernel.vfs.linked.setdefault(full, sock.inode)

    # -- sockets built from sock_diag ---------------------------------------------------------
    def _make(self, d: UnixDiag) -> LiveUnixSocket:
        state = _STATES.get(d.state)
        if state is None or d.type not in SOCK_TYPE_NAMES:
            raise _unsupported(f"unix socket:[{d.ino}]: type {d.type} in state {d.state} is not "
                               "supported yet")
        if d.type == SOCK_DGRAM and state == SockState.CONNECTED and d.peer is None:
            # Linux marks a datagram socket ESTABLISHED when another one connects to it
            # (unix_dgram_connect sets both); only the connecting one has a peer.
            state = SockState.UNCONNECTED
        sock = self.socks[d.ino] = LiveUnixSocket(self, d.ino, d.type)
        sock.state = state
        sock.address = _address(d.name)
        sock.shutdown = d.shutdown & SHUTDOWN_MASK
        sock.rcvbuf, sock.sndbuf = d.rcvbuf or self._rmem, d.sndbuf or self._wmem
        if state == SockState.LISTENING:
            sock.backlog = d.wqueue
        return sock

    def _get(self, ino: int, wanted_by: LiveUnixSocket) -> LiveUnixSocket:
        sock = self.socks.get(ino)
        if sock is None:
            d = self.diag().get(ino)
            if d is None:
                raise _unsupported(f"{self._where(wanted_by)}: its peer socket:[{ino}] is not "
                                   "visible to sock_diag (another network namespace?)")
            sock = self._make(d)
        return sock

    @staticmethod
    def _where(sock: LiveUnixSocket) -> str:
        if sock.held_by is not None:
            return f"{sock.where or f'task {sock.held_by[0]}: fd {sock.held_by[1]}'} ({sock.what})"
        return f"{sock.what} (outside the checkpointed tree)"

    def resolve_peer(self, sock: LiveUnixSocket):
        if sock.state != SockState.CONNECTED:
            return None
        d = self.diag().get(sock.ino) if sock.ino else None
        if d is None or d.peer is None:
            return None
        if d.peer:
            return self._get(d.peer, sock)
        listener = self._listener_of.get(sock.ino)
        if listener is not None:   # a client whose connection is not accepted yet
            return self.embryo(listener, sock)
        dead = LiveUnixSocket(None, 0, sock.type)   # the peer is closed (only we point at it)
        dead.what = f"closed peer of {sock.what}"
        dead.state, dead.shutdown = SockState.CLOSED, SHUTDOWN_MASK
        dead.rcvbuf, dead.sndbuf = self._rmem, self._wmem
        dead.external, dead._peer, dead._pending = False, None, []
        self._debug(f"{self._where(sock)}: its peer is closed; saved as a closed socket")
        return dead

    def embryo(self, listener_ino: int, client: LiveUnixSocket) -> LiveUnixSocket:
        """The server side of ``client``'s not yet accepted connection (one per client)."""
        emb = self.embryos.get(client.ino)
        if emb is None:
            listener = self._get(listener_ino, client)
            queue: list[Segment] = []
            if self.diag()[client.ino].wqueue:      # the client's bytes are in its queue
                queue = self._embryo_queue(listener, client)
            emb = self.embryos[client.ino] = LiveUnixSocket(self, 0, client.type)
            emb.what = f"not yet accepted connection of {listener.what}"
            emb.state = SockState.CONNECTED
            emb.address = listener.address
            emb.rcvbuf, emb.sndbuf = self._rmem, self._wmem
            emb._peer, emb._pending = client, []
            emb.held_by, emb.external = listener.held_by, listener.external   # in its queue
            emb.set_queue(queue)
        return emb

    def _embryo_queue(self, listener: LiveUnixSocket, client: LiveUnixSocket) -> list[Segment]:
        """The data ``client`` wrote into its not yet accepted connection, read by the BPF
        embryo reader (backend/unix_embryo.py, imported here only), or Unsupported saying
        why it cannot be."""
        from . import unix_embryo
        if listener.external:
            got = "its listener is outside the tree"
        else:
            if self._embryo_data is None:
                self._embryo_data = unix_embryo.try_read(
                    [s.ino for s in self.socks.values() if s.state == SockState.LISTENING
                     and not s.external and self.diag()[s.ino].icons])
                self._debug(f"BPF embryo reader: {_summary(self._embryo_data)}")
            got = unix_embryo.segments(self._embryo_data, listener.ino, client.ino,
                                       client.type, client.address)
        if isinstance(got, str):
            raise _unsupported(
                f"{self._where(listener)}: the pending connection from {client.what} has data "
                f"queued ({self.diag()[client.ino].wqueue} bytes of buffer, sock_diag), which "
                "cannot be peeked (no fd, no inode) and accepting it would change what the "
                f"tree sees; reading it in the kernel failed: {got}: not supported")
        return got

    def resolve_pending(self, sock: LiveUnixSocket) -> list[LiveUnixSocket]:
        if sock.state != SockState.LISTENING or sock.external:
            return []   # an outside listener's connections are not the tree's
        d = self.diag()[sock.ino]
        out = []
        for client_ino in d.icons:
            if not client_ino:
                raise _unsupported(f"{self._where(sock)}: a pending connection whose client "
                                   "already closed: not supported yet (a restart "
                                   "rebuilds a pending connection by its client's connect)")
            out.append(self.embryo(sock.ino, self._get(client_ino, sock)))
        return out

    def note_external(self, sock: LiveUnixSocket) -> None:
        d = self.diag().get(sock.ino) if sock.ino else None
        queued = f", {d.rqueue} queued bytes not saved" if d is not None and d.rqueue else ""
        self._debug(f"{sock.what} ({SOCK_TYPE_NAMES.get(sock.type)} {sock.state.name}, name "
                    f"{sock.address!r}) is held by no task of the tree: saved as an external "
                    f"socket without its queue{queued}")


def _summary(answer) -> str:
    return answer if isinstance(answer, str) else f"{len(answer)} pending connection(s) read"


def for_gatherer(gatherer) -> UnixSockets:
    """The socket table of a snapshot.Gatherer (made on first use)."""
    table = getattr(gatherer, "_unix_sockets", None)
    if table is None:
        # a proxy: no cycle, so the gatherer (and the fds in flight it holds) goes as soon
        # as the checkpoint drops it
        table = gatherer._unix_sockets = UnixSockets(getattr(gatherer, "log", None),
                                                     weakref.proxy(gatherer))
    return table


def live_kernel(gatherer) -> LiveUnixKernel:
    """What dump.py puts in ``ctx.kernel``: the names the tree's sockets own."""
    return for_gatherer(gatherer).kernel


def _register_with_kinds() -> None:
    from ckptsim.kinds import load_all
    from ckptsim.kinds.registry import BY_MODEL_TYPE, also_saves
    load_all()
    if LiveUnixSocket not in BY_MODEL_TYPE:
        also_saves("unix", LiveUnixSocket)


_register_with_kinds()

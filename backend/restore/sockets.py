"""AF_UNIX sockets of a live restart, rebuilt by the restorer and handed over like any file.

The model (kinds/unix.py restored into the fresh kernel) gives every socket of the image:
type, state, name (and the absolute path of a linked one), peer, pending connections of a
listener, queued segments (sender, bytes, files in flight), shutdown bits, the pending
ECONNRESET and the buffer sizes. At the first socket fd, every socket the tree holds (by an
fd, in flight, or as a listener's pending connection) is rebuilt at once, in this order:

  1. each socket is created; buffer sizes as saved; names bound: a listener (then listen with
     its backlog), an unconnected or datagram socket that owned its name, a client that bound
     one before connecting. A relative name is bound from the directory that makes it the
     saved path; a name whose file was unlinked is bound and its file unlinked again. A file
     found at the path is removed only if it is a socket nobody listens on (a stale one);
  2. connections: stream/seqpacket pairs through their listener (connect, then accept: the
     accepted side gets the listener's name as on Linux) when one of the restored listeners
     has the server side's name; through a temporary listener of the restorer's with that
     name when the listener had closed; else as a socketpair (no name on either side, or the
     peer closed); then each listener's pending connections, in accept order, by connect only;
  3. queued data, sent by the socket that sent it (the peer, or the datagram sender named by
     its address, or an unnamed socket for unnamed senders), segment by segment with the files
     in flight as SCM_RIGHTS (opened by the FileFactory like any file);
  4. datagram connections (after the queues: a connected socket refuses other senders);
  5. a pending ECONNRESET (one byte sent into the closed peer before it closes), shutdown
     bits, and the closed peers are closed.

Refused with a message naming the socket's first holder (pid, fd) and why: a stream or
seqpacket socket connected to a socket outside the tree, a datagram queued from a sender
that cannot be rebuilt,
a name held by a live socket or a file that is not a socket, a queue that does not fit.
"""
from __future__ import annotations

import array
import errno
import fcntl
import os
import posixpath
import socket
import stat
import threading

from backend import kabi
from ckptsim.model.unix import (RCV_SHUTDOWN, SEND_SHUTDOWN, SOCK_DGRAM, SOCK_STREAM,
                                SockState)

from .stub import StubError


class SocketFactory:
    """The restorer's socket for each model UnixSocket of the image, built all at once."""

    def __init__(self, files):
        self.files = files                              # the FileFactory (in-flight files)
        self.kernel = files.kernel
        self._socks: dict[int, socket.socket] = {}      # id(UnixSocket) -> restorer's socket
        self._where: dict[int, str] = {}                # id(UnixSocket) -> "pid P fd F"
        self._all: list = []                            # the model sockets, in holder order
        self._held: set[int] = set()
        self._built = False
        self._pairs: set[frozenset[int]] = set()        # made by socketpair() here
        self.made_paths: list[str] = []                 # socket files this restart created

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks.clear()

    def abort(self) -> None:
        """After a failed restart: the socket files it created go too."""
        self.close()
        for path in self.made_paths:
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except OSError:
                pass
        self.made_paths.clear()

    def fd_for(self, file, where: str) -> int:
        if not self._built:
            self._built = True
            try:
                self._build()
            except BaseException:
                self.abort()
                raise
        s = self._socks.get(id(file.private))
        if s is None:
            raise StubError(errno.EOPNOTSUPP, f"{where}: the socket was not rebuilt")
        fd = os.dup(s.fileno())
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        want = (flags & ~os.O_NONBLOCK) | (file.flags & os.O_NONBLOCK)
        if want != flags:
            fcntl.fcntl(fd, fcntl.F_SETFL, want)
        os.set_inheritable(fd, False)
        return fd

    # -- what the image holds ---------------------------------------------------------------
    def _gather(self) -> None:
        def add(sock, where: str, held: bool) -> None:
            if held:
                self._held.add(id(sock))
            if id(sock) in self._where:
                return
            self._where[id(sock)] = where
            self._all.append(sock)
            if sock.peer is not None:
                add(sock.peer, f"the peer of {where}", False)
            for i, embryo in enumerate(sock.pending):
                add(embryo, f"pending connection {i} of {where}", True)
            for seg in sock.queue:
                for f in seg.files:
                    if f.kind == "socket":
                        add(f.private, f"a socket in flight in {where}", True)

        for t in self.kernel.live_tasks():
            if t.files is None or t.state == "zombie" or t.leader is not t:
                continue
            pid = t.nr_in(t.ns)
            for fd in sorted(t.files.fds):
                f = t.files.fds[fd]
                if f.kind == "socket" and f.private is not None:
                    add(f.private, f"pid {pid} fd {fd} (socket)", True)

    def _fail(self, sock, err: int, why: str):
        return StubError(err, f"{self._where.get(id(sock), 'a socket')}: {why}")

    def _is_external(self, sock) -> bool:
        return id(sock) not in self._held and sock.state != SockState.CLOSED

    # -- the steps --------------------------------------------------------------------------
    def _build(self) -> None:
        self._gather()
        self._embryos = {id(e): lis for lis in self._all for e in lis.pending}
        listeners = {(s.type, s.address): s for s in self._all
                     if s.state == SockState.LISTENING and not self._is_external(s)}
        for sock in self._all:                       # 1. sockets with names of their own
            if self._is_external(sock) or id(sock) in self._embryos:
                continue
            if sock.state == SockState.LISTENING:
                self._bind(self._new(sock), sock, sock.address)
                self._socks[id(sock)].listen(sock.backlog)
            elif sock.type == SOCK_DGRAM and id(sock) not in self._socks:
                peer = sock.peer
                if peer is not None and not self._owns_name(sock) and \
                        (peer.state == SockState.CLOSED or
                         (peer.peer is sock and not self._owns_name(peer))):
                    self._socketpair(sock, peer)     # unnamed both: a socketpair
                    continue
                if sock.state == SockState.CLOSED:
                    continue
                s = self._new(sock)
                if sock.address is not None and self._owns_name(sock):
                    self._bind(s, sock, sock.address)
        for sock in self._all:                       # 2. connections
            if id(sock) in self._socks or sock.type == SOCK_DGRAM or self._is_external(sock) \
                    or id(sock) in self._embryos:
                continue
            self._connect_pair(sock, listeners)
        for lis in self._all:
            if id(lis) in self._socks and lis.state == SockState.LISTENING:
                for embryo in lis.pending:
                    client = embryo.peer
                    if client is None or id(client) in self._socks:
                        raise self._fail(embryo, errno.EOPNOTSUPP, "a pending connection "
                                         "without its own client")
                    s = self._client(client)
                    self._connect(s, client, lis.address, lis)
        for sock in self._all:                       # dgram: a pair, or a socket of its own
            if sock.type == SOCK_DGRAM and id(sock) not in self._socks \
                    and not self._is_external(sock):
                raise self._fail(sock, errno.EOPNOTSUPP, "a datagram socket in state "
                                 f"{sock.state.name} cannot be rebuilt")
        for sock in self._all:                       # 3. queues
            if sock.queue:
                self._fill(sock)
        for sock in self._all:                       # 4. datagram connections
            if sock.type == SOCK_DGRAM and sock.peer is not None and not self._is_external(sock):
                self._dgram_connect(sock)
        for sock in self._all:                       # 5. errors, shutdowns, closed peers
            peer = sock.peer
            if sock.error and id(sock) in self._socks:
                if peer is None or peer.state != SockState.CLOSED:
                    raise self._fail(sock, errno.EOPNOTSUPP, "a pending error without a closed"
                                     " peer cannot be rebuilt")
                self._socks[id(sock)].send(b"\0", socket.MSG_DONTWAIT)
        for sock in self._all:
            how = {RCV_SHUTDOWN: socket.SHUT_RD, SEND_SHUTDOWN: socket.SHUT_WR,
                   RCV_SHUTDOWN | SEND_SHUTDOWN: socket.SHUT_RDWR}.get(sock.shutdown)
            if how is not None and id(sock) in self._socks and sock.state != SockState.CLOSED:
                self._socks[id(sock)].shutdown(how)
        for sock in self._all:
            if sock.state == SockState.CLOSED and id(sock) in self._socks:
                self._socks.pop(id(sock)).close()

    def _is_pair(self, a, b) -> bool:
        return frozenset((id(a), id(b))) in self._pairs

    def _socketpair(self, a, b) -> None:
        sa, sb = socket.socketpair(socket.AF_UNIX, a.type | socket.SOCK_CLOEXEC
                                   | socket.SOCK_NONBLOCK)
        self._socks[id(a)], self._socks[id(b)] = sa, sb
        self._pairs.add(frozenset((id(a), id(b))))
        for s, sock in ((sa, a), (sb, b)):
            self._buffers(s, sock)

    def _owns_name(self, sock) -> bool:
        return isinstance(sock.address, bytes) or sock.bound_path is not None \
            or sock.inode is not None

    def _new(self, sock) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, sock.type | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._socks[id(sock)] = s
        self._buffers(s, sock)
        return s

    @staticmethod
    def _buffers(s: socket.socket, sock) -> None:
        for opt, want in ((socket.SO_RCVBUF, sock.rcvbuf), (socket.SO_SNDBUF, sock.sndbuf)):
            if s.getsockopt(socket.SOL_SOCKET, opt) != want:
                s.setsockopt(socket.SOL_SOCKET, opt, want // 2)   # Linux doubles it

    def _client(self, sock) -> socket.socket:
        """A connecting socket, with the name it bound before connecting (if any)."""
        s = self._new(sock)
        if sock.address is not None:
            self._bind(s, sock, sock.address)
        return s

    def _connect_pair(self, sock, listeners) -> None:
        peer = sock.peer
        if sock.state != SockState.CONNECTED or peer is None:
            if sock.state == SockState.UNCONNECTED:
                self._client(sock)                   # a fresh, unconnected stream socket
                return
            raise self._fail(sock, errno.EOPNOTSUPP, f"a {sock.state.name} socket without a "
                             "peer cannot be rebuilt")
        if id(peer) in self._embryos:                # a client whose connection is pending
            return
        if self._is_external(peer):
            raise self._fail(sock, errno.EOPNOTSUPP, "connected to a socket outside the "
                             f"restored tree ({_show(peer.address)}): not restorable")
        server = client = None
        if peer.state != SockState.CLOSED:
            for a, b in ((peer, sock), (sock, peer)):
                lis = listeners.get((a.type, a.address)) if a.address is not None else None
                if lis is not None and lis is not a and b.peer is a:
                    server, client, listener = a, b, lis
                    break
        if server is None:
            named = peer.address if peer.address is not None else sock.address
            if peer.state != SockState.CLOSED and named is not None:
                # its listener is gone (a socketpair would lose the accepted side's name): a
                # listener of the restorer's own takes the name just long enough to accept
                self._through_temporary_listener(sock, peer, named)
                return
            self._socketpair(sock, peer)
            return
        s = self._client(client)
        self._connect(s, client, listener.address, listener)
        try:
            accepted, _ = self._socks[id(listener)].accept()
        except OSError as e:
            raise self._fail(client, e.errno, f"accept on its listener: {e.strerror}") from None
        accepted.setblocking(False)
        self._socks[id(server)] = accepted

    def _through_temporary_listener(self, sock, peer, named) -> None:
        server = peer if peer.address is not None else sock     # the accepted side
        client = sock if server is peer else peer
        temporary = socket.socket(socket.AF_UNIX, server.type | socket.SOCK_CLOEXEC)
        try:
            self._bind(temporary, server, named)
            temporary.listen(1)
            s = self._client(client)
            self._connect(s, client, named, server)
            try:
                accepted, _ = temporary.accept()
            except OSError as e:
                raise self._fail(server, e.errno, f"accept on a listener for {_show(named)}: "
                                 f"{e.strerror}") from None
        finally:
            temporary.close()          # the name's file stays, as its listener's did
        accepted.setblocking(False)
        self._socks[id(server)] = accepted

    def _connect(self, s: socket.socket, sock, address, listener) -> None:
        try:
            s.connect(self._reachable(listener, address))
        except OSError as e:
            raise self._fail(sock, e.errno, f"connect to {_show(address)}: {e.strerror}") \
                from None

    def _reachable(self, sock, address):
        """An address the restorer can use for ``sock``'s name (a relative one: its path)."""
        if isinstance(address, str) and not address.startswith("/"):
            if sock.bound_path is None:
                raise self._fail(sock, errno.EOPNOTSUPP, f"the relative name {address!r} has "
                                 "no saved path")
            return sock.bound_path
        return address

    # -- names ------------------------------------------------------------------------------
    def _bind(self, s: socket.socket, sock, address) -> None:
        if isinstance(address, bytes):
            try:
                s.bind(address)
            except OSError as e:
                raise self._fail(sock, e.errno, f"bind to the abstract name "
                                 f"{_show(address)}: {e.strerror}") from None
            return
        path = sock.bound_path or (address if address.startswith("/") else None)
        unlinked = sock.bound_path is None and sock.state in (SockState.LISTENING,
                                                              SockState.UNCONNECTED)
        if path is None:
            if not unlinked:
                raise self._fail(sock, errno.EOPNOTSUPP, f"the relative name {address!r} has "
                                 "no saved path")
            raise self._fail(sock, errno.EOPNOTSUPP, f"the name {address!r} was unlinked and "
                             "is relative: it cannot be bound again")
        self._clear_stale(sock, path)
        base = None
        if not address.startswith("/"):
            base = _base_dir(path, address)
            if base is None:
                raise self._fail(sock, errno.EOPNOTSUPP, f"the relative name {address!r} does "
                                 f"not lead to its saved path {path}")
        try:
            if base is not None:
                bind_from(base, s, address)
            else:
                s.bind(address)
        except OSError as e:
            raise self._fail(sock, e.errno, f"bind to {path}: {e.strerror}") from None
        if unlinked and sock.address is not None and not sock.bound_path and \
                sock.state != SockState.CONNECTED and sock.inode is None:
            os.unlink(path)                          # the name only, as when checkpointed
        else:
            self.made_paths.append(path)

    def _clear_stale(self, sock, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise self._fail(sock, errno.EADDRINUSE, f"{path} exists and is not a socket: "
                             "not removed")
        probe = socket.socket(socket.AF_UNIX, sock.type | socket.SOCK_CLOEXEC
                              | socket.SOCK_NONBLOCK)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)                          # stale: nobody is bound to it
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EPROTOTYPE):
                raise self._fail(sock, e.errno, f"{path}: {e.strerror}") from None
        finally:
            probe.close()
        raise self._fail(sock, errno.EADDRINUSE, f"{path} is in use by a live socket")

    # -- queues -----------------------------------------------------------------------------
    def _fill(self, sock) -> None:
        """Send ``sock``'s queued segments into it, from the socket that sent them."""
        where = self._where[id(sock)]
        loose = None
        try:
            for i, seg in enumerate(sock.queue):
                fds = [self.files.fd_for(f, f"{where}: file {j} in flight in segment {i}")
                       for j, f in enumerate(seg.files)]
                cmsg = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] \
                    if fds else []
                data = bytes(seg.data)
                sender, to = self._sender(sock, seg)
                if sender is None:
                    if loose is None:
                        loose = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM
                                              | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                    sender = loose
                try:
                    n = sender.sendmsg([data], cmsg, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL,
                                       *([to] if to is not None else []))
                except OSError as e:
                    raise self._fail(sock, e.errno, f"cannot queue segment {i} of "
                                     f"{len(data)} bytes: {e.strerror}") from None
                if n != len(data):
                    raise self._fail(sock, errno.ENOBUFS, f"only {n} of the {len(data)} bytes "
                                     f"of segment {i} fit in its queue")
        finally:
            if loose is not None:
                loose.close()

    def _sender(self, sock, seg):
        """(the restorer's socket that sends ``seg`` into ``sock``, its address or None);
        (None, address): an unnamed socket sends it."""
        peer = sock.peer
        if sock.type != SOCK_DGRAM:
            if id(sock) in self._embryos:            # a pending connection: its client sends
                return self._socks[id(peer)], None
            if peer is None or id(peer) not in self._socks:
                raise self._fail(sock, errno.EOPNOTSUPP, "queued data without a peer to "
                                 "send it")
            return self._socks[id(peer)], None
        sender = seg.sender if seg.sender not in ("", None) else None
        if peer is not None and self._is_pair(sock, peer):
            return self._socks[id(peer)], None       # a socketpair: all from the peer
        if sock.address is None:
            raise self._fail(sock, errno.EOPNOTSUPP, "a datagram from "
                             f"{_show(sender)} queued on an unnamed socket that is not its "
                             "peer's: not restorable")
        to = self._reachable(sock, sock.address)
        if sender is None:
            return None, to
        for other in self._all:
            if other.type == SOCK_DGRAM and other.address == sender and \
                    id(other) in self._socks and self._owns_name(other):
                return self._socks[id(other)], to
        raise self._fail(sock, errno.EOPNOTSUPP, f"a datagram from {_show(sender)}, a socket "
                         "the image does not hold: not restorable")

    def _dgram_connect(self, sock) -> None:
        peer = sock.peer
        if self._is_pair(sock, peer):
            return
        if id(sock) not in self._socks:
            return
        if peer.address is None:
            raise self._fail(sock, errno.EOPNOTSUPP, "connected to an unnamed datagram socket"
                             " that is not its pair: not restorable")
        if not self._is_external(peer) and not self._owns_name(peer):
            raise self._fail(sock, errno.EOPNOTSUPP, f"connected to {_show(peer.address)}, "
                             "which no longer owns that name")
        try:
            self._socks[id(sock)].connect(self._reachable(peer, peer.address))
        except OSError as e:
            raise self._fail(sock, e.errno, f"connect to {_show(peer.address)}: "
                             f"{e.strerror}") from None


def bind_from(base: str, s: socket.socket, address: str) -> None:
    """bind(s, address) for a relative ``address``, resolved from the directory ``base``: in a
    thread of its own that first unshares its fs struct (its cwd), so that no other thread of
    the restorer, nor of a program calling restart_image, ever sees another working directory.
    Raises what chdir or bind raised."""
    failure: list[OSError] = []

    def run() -> None:
        try:
            kabi.syscall(kabi.SYS_unshare, kabi.CLONE_FS, what="unshare(CLONE_FS)")
            os.chdir(base)
            s.bind(address)
        except OSError as e:
            failure.append(e)

    worker = threading.Thread(target=run, name="bind-relative-name")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]


def _base_dir(path: str, relative: str) -> str | None:
    """The directory from which ``relative`` names the absolute ``path``."""
    rel = posixpath.normpath(relative)
    if rel.startswith("..") or not posixpath.normpath(path).endswith("/" + rel):
        return None
    return posixpath.normpath(path)[:-len(rel) - 1] or "/"


def _show(address) -> str:
    if address is None:
        return "an unnamed socket"
    if isinstance(address, bytes):
        return "@" + address[1:].decode("utf-8", "backslashreplace")
    return address

"""UNIX domain sockets: one SOCK object per ``UnixSocket``.

Records of one socket, right after its OBJREF{SOCK}:

    SOCKET          family, type, state, shutdown, pending error, rcvbuf/sndbuf
    (OBJREFs of the peer, the pending connections and the files in flight, if new)
    SOCKET_UNIX     peer objref, backlog, number of pending connections, name flags; var: name
    SOCKET_UNIX_PATH  absolute path of the socket inode (only if it owns a linked one)
    SOCKET_PENDING  x nr_pending: objref of a connected, not yet accepted server-side socket
    SOCKET_QUEUE    number of queued segments, queued bytes
    SOCKET_BUFFER   x nr: number of files, sender length; var: sender address + data
    SOCKET_SCM      x nr_files: objref of a File in flight (SCM_RIGHTS)

Peers form cycles (A.peer is B, B.peer is A): the load side binds the socket (``ctx.bind``)
right after SOCKET, so the peer's records, loaded while reading SOCKET_UNIX, can name it back.

Unlike Linux-CR (which refused both with EBUSY), in-flight SCM_RIGHTS files and not-yet-accepted
connections are supported: each in-flight File and each pending socket is one ``ctx.ref`` (they
hold one reference each), restored with the same segment boundaries and accept order.

Names: an abstract name is re-registered on restore (EADDRINUSE if a live socket of the target
kernel holds it). A path name reuses the socket inode at that path if nobody is bound to it,
creates it if the path is free, and fails with EADDRINUSE otherwise; a name whose inode was
unlinked is restored as a name only (getsockname works, nobody can connect), as on Linux.
A live image replayed into a fresh model (no file-system snapshot) gets the missing directories
of a socket path as placeholders first (files.lookup_or_placeholder).
"""
from __future__ import annotations

import errno
import posixpath

from ..image.schema import ENUMS, layout
from ..image.types import ObjType
from ..model.unix import (AF_UNIX, SHUTDOWN_MASK, SOCK_STREAM,
                          SOCK_TYPE_NAMES, Segment, SocketInode, SockState, UnixSocket,
                          abstract_names, bind_absolute, filesystem)
from ..model.vfs import KIND_DIR
from .files import lookup_or_placeholder
from .registry import Kind, register

ENUMS["sock_family"] = {AF_UNIX: "AF_UNIX"}
ENUMS["sock_type"] = {k: v.upper() for k, v in SOCK_TYPE_NAMES.items()}
ENUMS["sock_state"] = {s.value: s.name for s in SockState}
ENUMS["sock_shutdown"] = {1: "RCV_SHUTDOWN", 2: "SEND_SHUTDOWN"}
NAME_OWNED, NAME_UNLINKED = 0x1, 0x2    # SOCKET_UNIX flags
ENUMS["unix_name_flags"] = {NAME_OWNED: "OWNED", NAME_UNLINKED: "UNLINKED"}
MAX_SOCK_BUF = 1 << 24

SOCKET = layout(701, "SOCKET", [
    ("family", "u16", "enum:sock_family"), ("type", "u16", "enum:sock_type"),
    ("state", "u16", "enum:sock_state"), ("shutdown", "u16", "flags:sock_shutdown"),
    ("err", "i32"), ("flags", "u32", "hex"), ("rcvbuf", "u32"), ("sndbuf", "u32")],
    subsystem="socket")
SOCKET_QUEUE = layout(702, "SOCKET_QUEUE", [("nr_buffers", "u32"), ("pad", "u32"),
                                            ("queued", "u64")], subsystem="socket")
SOCKET_BUFFER = layout(703, "SOCKET_BUFFER", [("nr_files", "u32"), ("sender_len", "u32")],
                       var="bytes", max_var=MAX_SOCK_BUF, subsystem="socket")
SOCKET_SCM = layout(704, "SOCKET_SCM", [("file_objref", "i32", "objref:FILE"), ("pad", "u32")],
                    subsystem="socket")
SOCKET_UNIX = layout(705, "SOCKET_UNIX", [
    ("peer_objref", "i32", "objref:SOCK"), ("backlog", "u32"), ("nr_pending", "u32"),
    ("flags", "u32", "flags:unix_name_flags")], var="bytes", subsystem="socket")
SOCKET_UNIX_PATH = layout(710, "SOCKET_UNIX_PATH", [], var="str", subsystem="socket")
SOCKET_PENDING = layout(711, "SOCKET_PENDING", [("sock_objref", "i32", "objref:SOCK"),
                                                ("pad", "u32")], subsystem="socket")


def encode_address(addr) -> bytes:
    if addr is None:
        return b""
    return addr if isinstance(addr, bytes) else addr.encode("utf-8", "surrogateescape")


def decode_address(raw) -> str | bytes | None:
    raw = bytes(raw)
    if not raw:
        return None
    return raw if raw.startswith(b"\0") else raw.decode("utf-8", "surrogateescape")


def _owns_name(kernel, sock: UnixSocket) -> bool:
    if isinstance(sock.address, bytes):
        return abstract_names(kernel).get(sock.address) is sock
    return sock.inode is not None and sock.inode.bound is sock


# --- checkpoint ----------------------------------------------------------------------------

def save_socket(ctx, sock: UnixSocket) -> None:
    ctx.write(SOCKET, family=AF_UNIX, type=sock.type, state=int(sock.state),
              shutdown=sock.shutdown, err=sock.error, flags=0, rcvbuf=sock.rcvbuf,
              sndbuf=sock.sndbuf)
    # every reference this socket holds, so each object's OBJREF precedes the records below
    peer_ref = ctx.ref(sock.peer)
    pending_refs = [ctx.ref(embryo) for embryo in sock.pending]
    file_refs = [[ctx.ref(file) for file in seg.files] for seg in sock.queue]

    flags, path = 0, None
    if _owns_name(ctx.kernel, sock):
        flags |= NAME_OWNED
        if sock.inode is not None:
            if filesystem(ctx.kernel).lookup(sock.bound_path) is sock.inode:
                path = sock.bound_path
            else:
                flags |= NAME_UNLINKED
    ctx.write(SOCKET_UNIX, peer_objref=peer_ref, backlog=sock.backlog,
              nr_pending=len(pending_refs), flags=flags, var=encode_address(sock.address))
    if path is not None:
        ctx.write(SOCKET_UNIX_PATH, var=path)
    for ref in pending_refs:
        ctx.write(SOCKET_PENDING, sock_objref=ref, pad=0)

    ctx.write(SOCKET_QUEUE, nr_buffers=len(sock.queue), pad=0, queued=sock.queued)
    for seg, refs in zip(sock.queue, file_refs):
        sender = encode_address(seg.sender)
        ctx.write(SOCKET_BUFFER, nr_files=len(refs), sender_len=len(sender),
                  var=sender + bytes(seg.data))
        for ref in refs:
            ctx.write(SOCKET_SCM, file_objref=ref, pad=0)
    if sock.pending or any(file_refs):
        ctx.log(f"unix socket: {len(sock.pending)} pending connections, "
                f"{sum(map(len, file_refs))} files in flight")


# --- restart -------------------------------------------------------------------------------

def _check_header(ctx, rec) -> None:
    if rec["family"] != AF_UNIX:
        ctx.fail(errno.EINVAL, f"socket family {rec['family']} is not AF_UNIX")
    if rec["type"] not in SOCK_TYPE_NAMES:
        ctx.fail(errno.EINVAL, f"bad unix socket type {rec['type']}")
    if rec["state"] not in ENUMS["sock_state"]:
        ctx.fail(errno.EINVAL, f"bad unix socket state {rec['state']}")
    if rec["shutdown"] & ~SHUTDOWN_MASK or rec["err"] not in (0, errno.ECONNRESET):
        ctx.fail(errno.EINVAL, "bad socket shutdown or error")
    for name in ("rcvbuf", "sndbuf"):
        if not 0 < rec[name] <= MAX_SOCK_BUF:
            ctx.fail(errno.EINVAL, f"socket {name} {rec[name]} out of range")


def _restore_name(ctx, sock: UnixSocket, flags: int) -> None:
    """Give the restored socket back its name (see the module docstring)."""
    kernel = ctx.kernel
    if isinstance(sock.address, bytes):
        names = abstract_names(kernel)
        holder = names.get(sock.address)
        if holder is not None and holder is not sock:
            ctx.fail(errno.EADDRINUSE, f"abstract name {sock.address[1:]!r} is already bound")
        names[sock.address] = sock
        return
    if flags & NAME_UNLINKED:
        return
    path = ctx.read(SOCKET_UNIX_PATH).var
    if not path.startswith("/"):
        ctx.fail(errno.EINVAL, f"socket path {path!r} is not absolute")
    inode = filesystem(kernel).lookup(path)
    if inode is None:
        if getattr(ctx, "placeholders", None) is not None:   # a live image replayed
            lookup_or_placeholder(ctx, posixpath.dirname(path), KIND_DIR)
        bind_absolute(kernel, sock, path)
    elif isinstance(inode, SocketInode) and (inode.bound is None
                                             or inode.bound.state == SockState.CLOSED):
        inode.bound = sock
        sock.inode, sock.bound_path = inode, path
    else:
        ctx.fail(errno.EADDRINUSE, f"cannot rebind unix socket to {path}: in use")


def _in_flight_file(ctx, ref: int, seg: Segment, index: int):
    """The in-flight File ``ref`` with one reference taken, or None for now if that File is
    still loading: a socket File whose socket (or its peer) holds the File itself in flight,
    e.g. ``sendmsg(a, fds=[a])``. files.py writes FILE after the socket it wraps, so the slot is
    filled when the File is made (SocketType.restore_file -> _file_restored)."""
    if ref in ctx.objects:
        file = ctx.obj(ref, ObjType.FILE)
        if file is None:
            ctx.fail(errno.EINVAL, "in-flight file objref 0")
        return file.get()
    if ref not in ctx._loading or ctx.types.get(ref) != ObjType.FILE:
        ctx.fail(errno.EINVAL, f"in-flight file objref {ref} is unknown")
    waiting = _waiting(ctx)
    waiting.setdefault(ref, []).append((seg, index))
    return None


def _waiting(ctx) -> dict:
    waiting = getattr(ctx, "_unix_waiting", None)
    if waiting is None:
        waiting = ctx._unix_waiting = {}
        ctx.kernel.unix_file_restored = lambda file: _file_restored(ctx, file)
    return waiting


def _file_restored(ctx, file) -> None:
    waiting = ctx._unix_waiting
    for seg, index in waiting.pop(ctx._loading[-1], ()):
        seg.files[index] = file.get()
    if not waiting:
        del ctx.kernel.unix_file_restored
        ctx._unix_waiting = None


def load_socket(ctx) -> UnixSocket:
    rec = ctx.read(SOCKET)
    _check_header(ctx, rec)
    sock = UnixSocket(rec["type"])
    sock.state = SockState(rec["state"])
    sock.shutdown, sock.error = rec["shutdown"], rec["err"]
    sock.rcvbuf, sock.sndbuf = rec["rcvbuf"], rec["sndbuf"]
    ctx.bind(sock)   # peers and in-flight files loaded below may point back at this socket

    unix = ctx.read(SOCKET_UNIX)
    sock.set_peer(ctx.obj(unix["peer_objref"], ObjType.SOCK), ctx.kernel)
    if sock.peer is not None and sock.peer.type != sock.type:
        ctx.fail(errno.EINVAL, "unix socket peer of another type")
    if (sock.peer is not None) != (sock.state == SockState.CONNECTED):
        ctx.fail(errno.EINVAL, f"unix socket in state {sock.state.name} with peer objref "
                               f"{unix['peer_objref']}")
    sock.address = decode_address(unix.var)
    sock.backlog = unix["backlog"]
    if sock.state == SockState.LISTENING and sock.address is None:
        ctx.fail(errno.EINVAL, "listening unix socket without a name")
    if unix["flags"] & NAME_OWNED and sock.state != SockState.CLOSED:
        _restore_name(ctx, sock, unix["flags"])
    if unix["nr_pending"] and sock.state != SockState.LISTENING:
        ctx.fail(errno.EINVAL, "pending connections on a socket that is not listening")
    for _ in range(unix["nr_pending"]):
        embryo = ctx.obj(ctx.read(SOCKET_PENDING)["sock_objref"], ObjType.SOCK)
        if embryo is None or embryo.type != sock.type or embryo in sock.pending:
            ctx.fail(errno.EINVAL, "bad pending connection")
        sock.pending.append(embryo.get())

    queue = ctx.read(SOCKET_QUEUE)
    total = 0
    for _ in range(queue["nr_buffers"]):
        buf = ctx.read(SOCKET_BUFFER)
        raw = bytes(buf.var)
        if buf["sender_len"] > len(raw):
            ctx.fail(errno.EINVAL, "socket buffer sender longer than the buffer")
        sender = decode_address(raw[:buf["sender_len"]])
        if sock.type != SOCK_STREAM and sender is None:
            sender = ""
        seg = Segment(raw[buf["sender_len"]:], sender)
        for index in range(buf["nr_files"]):
            seg.files.append(_in_flight_file(ctx, ctx.read(SOCKET_SCM)["file_objref"], seg, index))
        sock.queue.append(seg)   # as saved: boundaries and file attachments kept
        total += len(seg.data)
    if total != queue["queued"]:
        ctx.fail(errno.EINVAL, f"socket queue holds {total} bytes, header says {queue['queued']}")
    sock.queued = total
    return sock


register(Kind(name="unix", objtype=ObjType.SOCK, model_types=(UnixSocket,),
              layouts=(SOCKET, SOCKET_QUEUE, SOCKET_BUFFER, SOCKET_SCM, SOCKET_UNIX,
                       SOCKET_UNIX_PATH, SOCKET_PENDING),
              save_object=save_socket, load_object=load_socket,
              doc="AF_UNIX socket: SOCKET, SOCKET_UNIX (+path, pending), SOCKET_QUEUE of buffers"))

__all__ = ["SOCKET", "SOCKET_QUEUE", "SOCKET_BUFFER", "SOCKET_SCM", "SOCKET_UNIX",
           "SOCKET_UNIX_PATH", "SOCKET_PENDING", "save_socket", "load_socket"]

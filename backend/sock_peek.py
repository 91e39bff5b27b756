"""Peeking at the queue of an AF_UNIX socket without taking anything from it (for
backend/sockets.py): stream queues byte-exact with SO_PEEK_OFF, datagram and seqpacket queues
message by message, and the files in flight (SCM_RIGHTS) that each peek brings into this
process as fds (the caller owns them: it closes them or hands them on)."""
from __future__ import annotations

import os
import select
import socket

from ckptsim.model.unix import Segment

from . import kabi

MSG_PEEK, MSG_DONTWAIT, MSG_TRUNC, MSG_CTRUNC = 0x2, 0x40, 0x20, 0x8
PEEK_CHUNK = 1 << 20                  # stream peeks: at most this much per recvmsg
DGRAM_BUF = 1 << 18                   # datagram peeks: a bigger message comes in pieces
MAX_MESSAGES = 1 << 20
ANC_BUF = socket.CMSG_SPACE(253 * 4)  # room for SCM_MAX_FD descriptors (closed at once)


def _unsupported(message: str):
    from .snapshot import Unsupported
    return Unsupported(message)


def received_fds(ancdata) -> list[int]:
    """The fds a peek brought into this process (SCM_RIGHTS), in order."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(memoryview(data)[:len(data) - len(data) % 4].cast("i"))
    return fds


def close_fds(fds) -> None:
    for fd in fds:
        os.close(fd)


class _PeekOffset:
    """SO_PEEK_OFF set to 0 for the walk, put back to the socket's own value afterwards."""

    def __init__(self, s: socket.socket):
        self.s = s

    def __enter__(self):
        self.old = self.s.getsockopt(socket.SOL_SOCKET, kabi.SO_PEEK_OFF)
        self.s.setsockopt(socket.SOL_SOCKET, kabi.SO_PEEK_OFF, 0)
        return self

    def __exit__(self, *exc):
        self.s.setsockopt(socket.SOL_SOCKET, kabi.SO_PEEK_OFF, self.old)


def _peek_at(s: socket.socket, off: int, view: memoryview) -> tuple[int, list[int]]:
    """Peek into ``view`` from byte ``off`` of a stream queue: (bytes, fds brought)."""
    s.setsockopt(socket.SOL_SOCKET, kabi.SO_PEEK_OFF, off)
    try:
        n, anc, _, _ = s.recvmsg_into([view], ANC_BUF, MSG_PEEK | MSG_DONTWAIT)
    except BlockingIOError:
        return 0, []
    return n, received_fds(anc)


def peek_stream(s: socket.socket, total: int, where: str) -> list[tuple[bytes, list[int]]]:
    """The ``total`` bytes queued on stream socket ``s``, left in place, as (bytes, fds)
    pieces: each piece ends with a buffer that carries files (SCM_RIGHTS, the fds now open in
    this process), or is the plain run at the end. A stream read stops right after a buffer
    carrying files; where that buffer starts cannot be seen (on Linux 6.18 a peek brings its
    files from the first byte of the run before it), so the files travel with the whole run
    (a restored reader whose read ends inside the run gets them one read early). Never
    peeks at the end of the queue (there, the kernel would report - and clear - a pending
    error)."""
    buf = bytearray(total)
    view = memoryview(buf)
    pieces: list[tuple[int, int, list[int]]] = []   # [start, end) and the fds
    off = plain_from = 0
    try:
        with _PeekOffset(s):
            while off < total:
                n, fds = _peek_at(s, off, view[off:off + min(PEEK_CHUNK, total - off)])
                if n == 0:
                    raise _unsupported(f"{where}: sock_diag reports {total} queued bytes but "
                                       f"only {off} could be peeked (MSG_OOB data?)")
                if fds:
                    pieces.append((plain_from, off + n, fds))
                    plain_from = off + n
                off += n
    except BaseException:
        close_fds(fd for _, _, fds in pieces for fd in fds)
        raise
    if total > plain_from:
        pieces.append((plain_from, total, []))
    return [(bytes(view[a:b]), fds) for a, b, fds in pieces]


def peek_messages(s: socket.socket, seqpacket_eof: bool, where: str) -> list[tuple[Segment, list[int]]]:
    """Every message queued on datagram/seqpacket socket ``s`` with its sender and the fds it
    carries (SCM_RIGHTS, now open in this process), left in place. ``seqpacket_eof``: the
    socket is shut down for reading, where an empty peek means EOF."""
    out: list[tuple[Segment, list[int]]] = []
    buf = bytearray(DGRAM_BUF)
    part = bytearray()
    part_fds: list[int] | None = None
    try:
        with _PeekOffset(s):
            while True:
                try:
                    n, anc, flags, sender = s.recvmsg_into([buf], ANC_BUF, MSG_PEEK | MSG_DONTWAIT)
                except BlockingIOError:
                    break
                fds = received_fds(anc)
                if part_fds is None:
                    part_fds = fds
                else:       # each piece of a long message brings its files again
                    close_fds(fds)
                part += memoryview(buf)[:n]
                if flags & MSG_TRUNC:
                    continue   # the rest of this message comes with the next peek
                if n == 0 and not part and seqpacket_eof:
                    close_fds(part_fds)
                    break
                out.append((Segment(bytes(part), sender if sender is not None else ""), part_fds))
                part, part_fds = bytearray(), None
                if len(out) > MAX_MESSAGES:
                    raise _unsupported(f"{where}: more than {MAX_MESSAGES} queued messages")
    except BaseException:
        close_fds(fd for _, fds in out for fd in fds)
        close_fds(part_fds or ())
        raise
    return out


def poll_events(fd: int) -> int:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLERR)
    events = p.poll(0)
    return events[0][1] if events else 0

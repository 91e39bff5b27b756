"""Handing open files from the restorer to the stubs.

Every file a restored task holds is opened or created by the restorer itself, with the
caller's own privileges (a regular file opened by path, a pipe, a socket, the file behind a
shared mapping...), and then handed to the task over a UNIX datagram socket with SCM_RIGHTS.
The stubs' end of that socket is inherited by every stub at ``fd`` (the seed gets it across
its exec; each clone copies it), so one socket pair serves the whole tree: the restorer sends,
then injects recvmsg() into the one stub that must receive, one file at a time.

Files shared by several tasks are therefore shared again for free: the same open file
description is sent to each of them.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from backend import kabi
from .stub import Stub, StubError

MAX_FDS_PER_SEND = 64                         # SCM_RIGHTS takes up to 253; the scratch less


class Transport:
    """The socket pair; ``fd`` is the stubs' end's number in every stub."""

    def __init__(self, min_fd: int):
        """``min_fd``: the stubs' end gets the lowest number from there that is free in this
        process (and so, inherited, in the stubs), above every fd the image restores."""
        self.local, remote = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.fd = fcntl.fcntl(remote.fileno(), fcntl.F_DUPFD, min_fd)
            os.set_inheritable(self.fd, True)
        finally:
            remote.close()
        self._restorer_copy = self.fd     # the restorer's own copy, closed once the seed has it

    def seed_spawned(self) -> None:
        if self._restorer_copy is not None:
            os.close(self._restorer_copy)
            self._restorer_copy = None

    def close(self) -> None:
        self.seed_spawned()
        self.local.close()

    def move(self, seed: Stub, min_fd: int) -> None:
        """Give the stubs' end (in the seed, before it has children) the lowest free number
        from ``min_fd`` on: an early seed got it before the image said which fds it uses."""
        new = seed.syscall(kabi.SYS_fcntl, self.fd, fcntl.F_DUPFD, min_fd,
                           what="fcntl(F_DUPFD) of the transport")
        seed.syscall(kabi.SYS_close, self.fd, what="close of the transport's old number")
        self.fd = new

    def send(self, stub: Stub, fd: int, what: str) -> int:
        """Install a copy of the restorer's ``fd`` in ``stub``; returns its number there
        (the lowest free one, close-on-exec clear)."""
        return self.send_many(stub, [fd], what)[0]

    def send_many(self, stub: Stub, fds: list[int], what: str) -> list[int]:
        """send() for several fds in one message and one injected recvmsg: their numbers in
        ``stub``, in order (at most MAX_FDS_PER_SEND)."""
        if not fds:
            return []
        if len(fds) > MAX_FDS_PER_SEND:
            raise StubError(errno.E2BIG, f"pid {stub.pid}: {len(fds)} files in one message")
        socket.send_fds(self.local, [b"f"], list(fds))
        space = kabi.CMSG_HDR_SIZE + ((4 * len(fds) + 7) & ~7)    # CMSG_SPACE(n ints)
        base = 512                                   # scratch layout: msghdr, iov, data, cmsg
        iov_addr, data_addr, ctl_addr = (stub.scratch + base + 64, stub.scratch + base + 96,
                                         stub.scratch + base + 128)
        hdr = kabi.msghdr(msg_iov=iov_addr, msg_iovlen=1, msg_control=ctl_addr,
                          msg_controllen=space)
        block = bytearray(128 + space)               # one write for the three parts
        block[:len(bytes(hdr))] = bytes(hdr)
        block[64:80] = struct.pack("<QQ", data_addr, 1)
        stub.put_scratch(bytes(block), base)
        n = stub.syscall(kabi.SYS_recvmsg, self.fd, stub.scratch + base, 0,
                         what=f"recvmsg of {what}")
        cmsg = stub.read(ctl_addr, kabi.CMSG_HDR_SIZE + 4 * len(fds))   # one read: all of it
        length, level, ctype = struct.unpack_from("<Qii", cmsg, 0)
        if n != 1 or level != kabi.SOL_SOCKET or ctype != kabi.SCM_RIGHTS \
                or length != kabi.CMSG_HDR_SIZE + 4 * len(fds):
            raise StubError(errno.EPROTO, f"pid {stub.pid}: {what} did not arrive")
        return list(struct.unpack_from(f"<{len(fds)}i", cmsg, kabi.CMSG_HDR_SIZE))

    def install(self, stub: Stub, fd: int, target: int, cloexec: bool, what: str) -> None:
        """Install the restorer's ``fd`` in ``stub`` as fd number ``target``."""
        got = self.send(stub, fd, what)
        if got != target:
            stub.syscall(kabi.SYS_dup3, got, target, kabi.O_CLOEXEC if cloexec else 0,
                         what=f"dup3 of {what} to fd {target}")
            stub.syscall(kabi.SYS_close, got, what="close")
        elif cloexec:
            stub.syscall(kabi.SYS_fcntl, target, kabi.F_SETFD, kabi.FD_CLOEXEC,
                         what=f"FD_CLOEXEC on fd {target}")

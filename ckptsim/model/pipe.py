"""Pipes and FIFOs: the ``Pipe`` object, its file type and the ``PipeOps`` syscalls.

A ``Pipe`` is shared by its read and write Files (each File holds one reference of it) and, for
a FIFO, by every open of the FIFO inode: ``inode.pipe`` points at it while some File has it
open (a link, not a counted reference: Linux drops a FIFO's buffer when the last end closes).

Tasks blocked in a FIFO open are counted as peers (``inode.fifo_waiting``), as Linux counts a
waiting opener in ``pipe->readers``/``writers``: so a writer's non-blocking open succeeds and a
reader does not see EOF while a writer is still on its way in.
"""
from __future__ import annotations

import errno
import os
import signal
import stat

from ..errors import kerr
from .sched import Blocked
from .shared import Shared
from .vfs import FILE_TYPES, KIND_FIFO, File, FileType, Inode, kernel_filesystem, readable, writable

PIPE_BUF = 4096            # writes up to this size are atomic
DEFAULT_CAPACITY = 65536   # 16 pages, Linux's default pipe size


class Pipe(Shared):
    """A pipe buffer with its reader and writer counts."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, data=b""):
        super().__init__()
        self.capacity = capacity
        self.buffer = bytearray(data)
        self.readers = 0
        self.writers = 0
        self.inode: Inode | None = None   # the FIFO inode this pipe is attached to

    def _waiting(self, side: str) -> int:
        return len(self.inode.fifo_waiting[side]) if self.inode is not None else 0

    def has_readers(self) -> bool:
        return self.readers > 0 or self._waiting("r") > 0

    def has_writers(self) -> bool:
        return self.writers > 0 or self._waiting("w") > 0

    def attach(self, inode: Inode) -> None:
        """Make this the pipe of a FIFO inode (on open, and on restart)."""
        self.inode = inode
        inode.pipe = self

    def release(self, kernel) -> None:
        if self.inode is not None and self.inode.pipe is self:
            self.inode.pipe = None
        self.buffer.clear()

    def __repr__(self) -> str:
        return (f"<Pipe {len(self.buffer)}/{self.capacity} r={self.readers} w={self.writers} "
                f"refs={self.refs}>")


def _would_block(file: File, what: str):
    if file.flags & os.O_NONBLOCK:
        return kerr(errno.EAGAIN, what)
    return Blocked(what)


class PipeType(FileType):
    """The two ends of a pipe, and FIFO opens (``kind`` "pipe" or "fifo")."""

    seekable = False

    def __init__(self, kind: str):
        self.kind = kind

    def read(self, kernel, t, file, n):
        pipe: Pipe = file.private
        if n == 0:
            return b""
        if pipe.buffer:
            data = bytes(pipe.buffer[:n])
            del pipe.buffer[:n]
            return data
        if not pipe.has_writers():
            return b""   # EOF
        raise _would_block(file, "pipe read: empty")

    def write(self, kernel, t, file, data):
        pipe: Pipe = file.private
        if not pipe.has_readers():
            if t is not None and hasattr(kernel, "send_signal"):
                kernel.send_signal(t, signal.SIGPIPE)
            raise kerr(errno.EPIPE, "pipe has no readers")
        n = len(data)
        if n == 0:
            return 0
        free = pipe.capacity - len(pipe.buffer)
        if n <= PIPE_BUF:
            # Small writes are atomic: all or (wait for) nothing.
            if free < n:
                raise _would_block(file, "pipe write: full")
            pipe.buffer += data
            return n
        if free == 0:
            raise _would_block(file, "pipe write: full")
        # Large writes go in as far as they fit. Linux would keep waiting for the rest in a
        # blocking write; under the retry scheduler we return the short count instead.
        taken = min(free, n)
        pipe.buffer += memoryview(data)[:taken]
        return taken

    def stat(self, file):
        inode = file.inode
        return {"st_ino": inode.ino if inode else 0, "st_mode": stat.S_IFIFO | (inode.mode if inode else 0o600),
                "st_nlink": inode.nlink if inode else 1, "st_size": 0,
                "st_uid": inode.uid if inode else 0, "st_gid": inode.gid if inode else 0}

    def release(self, kernel, file):
        pipe: Pipe = file.private
        if readable(file.flags):
            pipe.readers -= 1
        if writable(file.flags):
            pipe.writers -= 1
        pipe.put(kernel)


PIPE_TYPE = PipeType("pipe")
FIFO_TYPE = PipeType("fifo")
FILE_TYPES["pipe"] = PIPE_TYPE
FILE_TYPES["fifo"] = FIFO_TYPE


def open_pipe_file(pipe: Pipe, flags: int, ftype: PipeType, inode: Inode | None,
                   path: str = "") -> File:
    """A new File on ``pipe`` (refs 1), taking one reference of the pipe and counting the end."""
    pipe.get()
    if readable(flags):
        pipe.readers += 1
    if writable(flags):
        pipe.writers += 1
    return File(inode, flags, ftype, private=pipe, path=path)


def _waiter(t):
    # A task object keys the FIFO wait sets; fall back to identity for unhashable test tasks.
    try:
        hash(t)
        return t
    except TypeError:
        return ("task", id(t))


class PipeOps:
    """pipe/pipe2, and the FIFO half of ``open``."""

    def pipe(self, t) -> tuple[int, int]:
        return self.pipe2(t, 0)

    def pipe2(self, t, flags: int) -> tuple[int, int]:
        if flags & ~(os.O_CLOEXEC | os.O_NONBLOCK | os.O_DIRECT):
            raise kerr(errno.EINVAL, f"pipe2 flags {flags:#x}")
        files = t.files
        rfd = files.alloc_fd()
        files.alloc_fd(rfd + 1)  # EMFILE unless two descriptors are free
        cred = getattr(t, "cred", None)
        inode = kernel_filesystem(self).new_anon_inode(KIND_FIFO, 0o600, getattr(cred, "fsuid", 0),
                                                  getattr(cred, "fsgid", 0))  # pipefs: never linked
        pipe = Pipe()
        status = flags & (os.O_NONBLOCK | os.O_DIRECT)
        rfile = open_pipe_file(pipe, os.O_RDONLY | status, PIPE_TYPE, inode)
        wfile = open_pipe_file(pipe, os.O_WRONLY | status, PIPE_TYPE, inode)
        pipe.put(self)   # the Files hold the pipe now
        cloexec = bool(flags & os.O_CLOEXEC)
        rfd = files.install(rfile, None, cloexec)
        wfd = files.install(wfile, None, cloexec)
        return rfd, wfd

    def fifo_open(self, t, inode: Inode, flags: int, path: str) -> File:
        """Open a FIFO inode: attach to its pipe, waiting for a peer like Linux's fifo_open."""
        mode = flags & os.O_ACCMODE
        nonblock = flags & os.O_NONBLOCK
        waiting = inode.fifo_waiting
        pipe = inode.pipe
        me = _waiter(t)
        readers = (pipe.readers if pipe else 0) + len(waiting["r"] - {me})
        writers = (pipe.writers if pipe else 0) + len(waiting["w"] - {me})
        if mode == os.O_RDONLY and not nonblock and writers == 0:
            waiting["r"].add(me)
            raise Blocked(f"fifo {path}: open for reading waits for a writer")
        if mode == os.O_WRONLY and readers == 0:
            if nonblock:
                raise kerr(errno.ENXIO, f"fifo {path} has no reader")
            waiting["w"].add(me)
            raise Blocked(f"fifo {path}: open for writing waits for a reader")
        waiting["r"].discard(me)
        waiting["w"].discard(me)
        if pipe is None:
            pipe = Pipe()
            pipe.attach(inode)
            file = open_pipe_file(pipe, flags, FIFO_TYPE, inode, path)
            pipe.put(self)
        else:
            file = open_pipe_file(pipe, flags, FIFO_TYPE, inode, path)
        return file

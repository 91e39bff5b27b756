"""Pipes and FIFOs."""
from __future__ import annotations

import errno
import os
import signal

import pytest

from ckptsim.errors import ModelError
from ckptsim.model.creds import Cred
from ckptsim.model.pipe import DEFAULT_CAPACITY, PIPE_BUF
from ckptsim.model.vfs import FileOps as _unused
from ckptsim.model.pipe import PipeOps
from ckptsim.model.sched import Blocked
from ckptsim.model.vfs import FdTable, FsContext, kernel_filesystem
from ckptsim.model.vfs_ops import F_SETFL


class _Task:
    def __init__(self, files, fs, cred):
        self.files, self.fs, self.cred = files, fs, cred


class _MiniKernel(PipeOps, _unused):
    def __init__(self):
        self.signals_sent = []

    def send_signal(self, t, sig):
        self.signals_sent.append((t, sig))


@pytest.fixture
def kt():
    k = _MiniKernel()
    return k, _Task(FdTable(), FsContext.new(kernel_filesystem(k)), Cred())


def other_task(k, t):
    return _Task(FdTable(), t.fs.fork_copy(), t.cred)


def errno_of(fn, *args):
    with pytest.raises(ModelError) as ei:
        fn(*args)
    return ei.value.errno


def test_pipe_roundtrip_and_partial_reads(kt):
    k, t = kt
    r, w = k.pipe(t)
    assert (r, w) == (0, 1)
    assert k.write(t, w, b"hello") == 5
    assert k.read(t, r, 2) == b"he"
    assert k.read(t, r, 100) == b"llo"
    assert k.read(t, r, 0) == b""


def test_empty_pipe_blocks_or_eagain(kt):
    k, t = kt
    r, w = k.pipe(t)
    with pytest.raises(Blocked):
        k.read(t, r, 1)
    k.fcntl(t, r, F_SETFL, os.O_NONBLOCK)
    assert errno_of(k.read, t, r, 1) == errno.EAGAIN


def test_eof_when_no_writers(kt):
    k, t = kt
    r, w = k.pipe(t)
    k.write(t, w, b"tail")
    k.close(t, w)
    assert k.read(t, r, 10) == b"tail"
    assert k.read(t, r, 10) == b""


def test_epipe_and_sigpipe(kt):
    k, t = kt
    r, w = k.pipe(t)
    k.close(t, r)
    assert errno_of(k.write, t, w, b"x") == errno.EPIPE
    assert k.signals_sent == [(t, signal.SIGPIPE)]


def test_full_pipe_small_and_large_writes(kt):
    k, t = kt
    r, w = k.pipe2(t, os.O_NONBLOCK)
    assert k.write(t, w, b"a" * (DEFAULT_CAPACITY - 100)) == DEFAULT_CAPACITY - 100
    # a small write that does not fit is atomic: nothing is written
    assert errno_of(k.write, t, w, b"b" * 200) == errno.EAGAIN
    # a large write goes in partially
    assert k.write(t, w, b"c" * (PIPE_BUF + 1)) == 100
    assert errno_of(k.write, t, w, b"d" * (PIPE_BUF + 1)) == errno.EAGAIN
    k.fcntl(t, w, F_SETFL, 0)
    with pytest.raises(Blocked):
        k.write(t, w, b"e")
    data = k.read(t, r, DEFAULT_CAPACITY)
    assert data == b"a" * (DEFAULT_CAPACITY - 100) + b"c" * 100


def test_pipe_misuse(kt):
    k, t = kt
    r, w = k.pipe(t)
    assert errno_of(k.write, t, r, b"x") == errno.EBADF
    assert errno_of(k.read, t, w, 1) == errno.EBADF
    assert errno_of(k.lseek, t, r, 0, os.SEEK_SET) == errno.ESPIPE
    assert errno_of(k.pread, t, r, 1, 0) == errno.ESPIPE
    assert errno_of(k.pwrite, t, w, b"x", 0) == errno.ESPIPE
    assert errno_of(k.pipe2, t, os.O_APPEND) == errno.EINVAL
    assert k.fstat(t, r)["st_mode"] & 0o170000 == 0o010000


def test_pipe2_flags(kt):
    k, t = kt
    r, w = k.pipe2(t, os.O_CLOEXEC | os.O_NONBLOCK)
    assert t.files.is_cloexec(r) and t.files.is_cloexec(w)
    assert t.files.get(r).flags & os.O_NONBLOCK


def test_pipe_refcounts_and_release(kt):
    k, t = kt
    r, w = k.pipe(t)
    pipe = t.files.get(r).private
    assert pipe is t.files.get(w).private
    assert (pipe.refs, pipe.readers, pipe.writers) == (2, 1, 1)
    d = k.dup(t, w)
    assert pipe.writers == 1 and t.files.get(w).refs == 2
    child = _Task(t.files.fork_copy(k), t.fs, t.cred)
    k.write(child, w, b"from child")
    child.files.put(k)
    assert k.read(t, r, 100) == b"from child"
    k.close(t, w)
    k.close(t, d)
    assert pipe.writers == 0 and pipe.refs == 1
    k.close(t, r)
    assert pipe.refs == 0


# --- FIFOs --------------------------------------------------------------------------------

def test_fifo_nonblocking_opens(kt):
    k, t = kt
    k.mkfifo(t, "/ff")
    assert errno_of(k.mkfifo, t, "/ff") == errno.EEXIST
    assert errno_of(k.open, t, "/ff", os.O_WRONLY | os.O_NONBLOCK) == errno.ENXIO
    r = k.open(t, "/ff", os.O_RDONLY | os.O_NONBLOCK)
    w = k.open(t, "/ff", os.O_WRONLY | os.O_NONBLOCK)
    k.write(t, w, b"via fifo")
    assert k.read(t, r, 100) == b"via fifo"
    assert errno_of(k.read, t, r, 1) == errno.EAGAIN
    assert errno_of(k.lseek, t, r, 0, 0) == errno.ESPIPE
    assert k.fstat(t, r)["st_mode"] & 0o170000 == 0o010000
    k.close(t, w)
    assert k.read(t, r, 1) == b""


def test_fifo_blocking_rendezvous(kt):
    k, t = kt
    k.mkfifo(t, "/ff")
    reader = other_task(k, t)
    with pytest.raises(Blocked):
        k.open(reader, "/ff", os.O_RDONLY)
    # the waiting reader counts: the writer gets through, even non-blocking
    w = k.open(t, "/ff", os.O_WRONLY | os.O_NONBLOCK)
    k.write(t, w, b"early")
    r = k.open(reader, "/ff", os.O_RDONLY)   # the retry succeeds
    assert k.read(reader, r, 100) == b"early"
    inode = t.files.get(w).inode
    assert not inode.fifo_waiting["r"] and not inode.fifo_waiting["w"]


def test_fifo_blocked_writer_keeps_reader_from_eof(kt):
    k, t = kt
    k.mkfifo(t, "/ff")
    writer = other_task(k, t)
    with pytest.raises(Blocked):
        k.open(writer, "/ff", os.O_WRONLY)
    r = k.open(t, "/ff", os.O_RDONLY)
    with pytest.raises(Blocked):
        k.read(t, r, 1)          # not EOF: a writer is on its way
    w = k.open(writer, "/ff", os.O_WRONLY)
    k.write(writer, w, b"x")
    assert k.read(t, r, 1) == b"x"


def test_fifo_rdwr_and_shared_pipe(kt):
    k, t = kt
    k.mkfifo(t, "/ff")
    a = k.open(t, "/ff", os.O_RDWR)          # never blocks
    b = k.open(t, "/ff", os.O_RDONLY)
    assert t.files.get(a).private is t.files.get(b).private
    pipe = t.files.get(a).private
    k.write(t, a, b"12")
    assert k.read(t, b, 5) == b"12"
    inode = t.files.get(a).inode
    k.close(t, a)
    k.close(t, b)
    assert pipe.refs == 0 and inode.pipe is None   # the buffer goes with the last open


def test_unlinked_fifo_keeps_working(kt):
    k, t = kt
    k.mkfifo(t, "/ff")
    a = k.open(t, "/ff", os.O_RDWR)
    k.unlink(t, "/ff")
    k.write(t, a, b"q")
    assert k.read(t, a, 1) == b"q"

"""Writing the image's private pages into the restored processes, on a helper thread.

process_vm_writev needs no ptrace stop and releases the GIL for the copy, so while this
thread copies one process's pages the tracer thread goes on injecting that process's other
syscalls (fds, cwd, limits, handlers, threads) and checking the executables. The job waits
for the writes (``wait``, which raises the first failure) before anything depends on the
pages: the mprotect of VMAs that were made writable for the copy, then the registers.

The chunks of one process go out in as few calls as IOV_MAX allows (up to 1024 local
iovecs, one per image chunk, and 1024 remote ones, the page runs, merged across chunk
boundaries), at most ``CALL_BYTES`` per call so that an abort does not wait for long.
"""
from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading
import time
from array import array

from backend import kabi
from backend.memory_pages import _runs_of as runs_of   # one run finder for both sides
from .stub import StubError

_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_writev = _libc.process_vm_writev
_process_vm_writev.restype = ctypes.c_ssize_t
IOV_MAX = 1024
CALL_BYTES = 64 << 20
PAGE = 4096


class _PyBuffer(ctypes.Structure):         # CPython's Py_buffer (the buffer protocol)
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


# own prototypes (ctypes.pythonapi's function objects are shared: their argtypes are not ours)
_get_buffer = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.POINTER(_PyBuffer),
                                ctypes.c_int)(("PyObject_GetBuffer", ctypes.pythonapi))
_release_buffer = ctypes.PYFUNCTYPE(None, ctypes.POINTER(_PyBuffer))(
    ("PyBuffer_Release", ctypes.pythonapi))


class _Call:
    """One process_vm_writev: local (address, length) pieces, remote page runs."""

    def __init__(self):
        self.local: list[tuple[int, int]] = []
        self.remote: list[tuple[int, int]] = []
        self.size = 0

    def fits(self, runs: int, size: int) -> bool:
        return (not self.local or len(self.local) < IOV_MAX
                and len(self.remote) + runs <= IOV_MAX and self.size + size <= CALL_BYTES)

    def add(self, buf: int, runs: list[tuple[int, int]]) -> None:
        size = sum(b - a for a, b in runs)
        self.local.append((buf, size))
        for a, b in runs:
            if self.remote and self.remote[-1][1] == a:      # continues the last run
                self.remote[-1] = (self.remote[-1][0], b)
            else:
                self.remote.append((a, b))
        self.size += size


def in_order(runs: list[tuple[int, int]], addrs: array) -> list[tuple[int, int]]:
    """``runs`` (the runs of adjacent pages of ``addrs``), once sure that the pages are in
    strictly increasing order (each run starts past the one before): a chunk whose first and
    last pages lie in its VMA (memory._check_chunk) then lies in it whole. StubError if not."""
    for (_, end), (start, _) in zip(runs, runs[1:]):
        if start < end:
            raise StubError(errno.EINVAL, f"a page chunk ({addrs[0]:#x}..{addrs[-1]:#x}) is "
                                          "not in increasing order: refused, it could reach "
                                          "outside its mapping")
    return runs


def plan_calls(chunks: list[tuple[int, array]]) -> list[_Call]:
    """The calls that write ``chunks`` ((buffer address, page addresses), in order)."""
    calls: list[_Call] = []
    call = _Call()
    for buf, addrs in chunks:
        runs = in_order(runs_of(addrs), addrs)
        # a chain's inherited pages come as one chunk of a whole VMA, whose runs can be
        # many more than IOV_MAX: such a chunk is cut into pieces of IOV_MAX runs
        for k in range(0, len(runs), IOV_MAX):
            piece = runs[k:k + IOV_MAX]
            size = sum(b - a for a, b in piece)
            if not call.fits(len(piece), size):
                calls.append(call)
                call = _Call()
            call.add(buf, piece)
            buf += size
    if call.local:
        calls.append(call)
    return calls


def _write(pid: int, call: _Call) -> None:
    local = (kabi.iovec * len(call.local))(*[kabi.iovec(a, n) for a, n in call.local])
    remote = (kabi.iovec * len(call.remote))(*[kabi.iovec(a, b - a) for a, b in call.remote])
    done = _process_vm_writev(pid, local, len(call.local), remote, len(call.remote), 0)
    if done != call.size:
        err = ctypes.get_errno() if done < 0 else errno.EFAULT
        raise StubError(err, f"pid {pid}: writing {call.size // PAGE} pages at "
                             f"{call.remote[0][0]:#x} failed ({os.strerror(err)})")


def write_chunks(pid: int, chunks: list[tuple[array, memoryview]]) -> None:
    """process_vm_writev the page chunks ((page addresses, their data), in order) into
    ``pid``, straight from the data's memory (a read-only mmap of the image is fine: the
    buffer protocol gives its address without a copy)."""
    views = []
    try:
        located = []
        for addrs, data in chunks:
            view = _PyBuffer()
            _get_buffer(data, ctypes.byref(view), 0)      # PyBUF_SIMPLE: contiguous bytes
            views.append(view)
            located.append((view.buf, addrs))
        for call in plan_calls(located):
            _write(pid, call)
    finally:
        for view in views:
            _release_buffer(ctypes.byref(view))


class PageWriter:
    """A helper thread that runs ``write_chunks`` for each ``submit``, in order."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._done = threading.Condition()
        self._error: BaseException | None = None
        self._stopping = False
        self.busy_s = 0.0                  # time spent writing (for the job's step timings)

    def submit(self, pid: int, chunks: list[tuple[array, memoryview]]) -> None:
        if not chunks:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="page-writer")
            self._thread.start()
        with self._done:
            self._pending += 1
        self._jobs.put((pid, chunks))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            start = time.perf_counter()
            try:
                if self._error is None and not self._stopping:
                    write_chunks(*job)
            except BaseException as e:          # handed to the tracer thread by wait()
                self._error = e
            finally:
                self.busy_s += time.perf_counter() - start
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()

    def wait(self) -> None:
        """Until every submitted write is done; raises the first failure."""
        with self._done:
            self._done.wait_for(lambda: self._pending == 0)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Skip what is not written yet and end the thread (after a failure: the processes
        are killed first, so a write under way ends at once)."""
        if self._thread is not None:
            self._stopping = True
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

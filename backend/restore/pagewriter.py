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


def write_chunks(pid: int, chunks: list[tuple[array, memoryview]], mapped=None) -> None:
    """process_vm_writev the page chunks ((page addresses, their data), in order) into
    ``pid``, straight from the data's memory (a read-only mmap of the image is fine: the
    buffer protocol gives its address without a copy). ``mapped()``: called once the calls
    are planned, returns once the pages may be written (False: they may not, nothing is)."""
    views = []
    try:
        located = []
        for addrs, data in chunks:
            view = _PyBuffer()
            _get_buffer(data, ctypes.byref(view), 0)      # PyBUF_SIMPLE: contiguous bytes
            views.append(view)
            located.append((view.buf, addrs))
        calls = plan_calls(located)
        if mapped is not None and not mapped():
            return
        for call in calls:
            _write(pid, call)
    finally:
        for view in views:
            _release_buffer(ctypes.byref(view))


class Submitted:
    """A submitted process's pages: planned at once, written once ``mapped()`` was called
    (its VMAs exist), or never after ``cancel()``."""

    def __init__(self, pid: int, chunks: list):
        self.pid, self.chunks = pid, chunks
        self._ready = threading.Event()
        self._go = False

    def mapped(self) -> None:
        self._go = True
        self._ready.set()

    def cancel(self) -> None:
        self._ready.set()

    def _may_write(self) -> bool:
        self._ready.wait()
        return self._go


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
        self._works: list[Submitted] = []

    def submit(self, pid: int, chunks: list[tuple[array, memoryview]]) -> Submitted:
        """Plan the writes of ``chunks`` into ``pid`` now (on the thread, while the caller
        maps the VMAs); they are made once the caller says ``.mapped()``."""
        work = Submitted(pid, chunks)
        if not chunks:
            return work
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="page-writer")
            self._thread.start()
        with self._done:
            self._pending += 1
        self._works.append(work)
        self._jobs.put(work)
        return work

    def _run(self) -> None:
        while True:
            work = self._jobs.get()
            if work is None:
                return
            start = time.perf_counter()
            try:
                if self._error is None and not self._stopping:
                    write_chunks(work.pid, work.chunks,
                                 lambda: work._may_write() and not self._stopping)
            except BaseException as e:          # handed to the tracer thread by wait()
                self._error = e
            finally:
                self.busy_s += time.perf_counter() - start
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()

    def wait(self) -> None:
        """Until every submitted write is done; raises the first failure. A submission not
        released by mapped() by now is a bug of the caller: cancelled and raised."""
        unreleased = [work for work in self._works if not work._ready.is_set()]
        for work in unreleased:
            work.cancel()
        with self._done:
            self._done.wait_for(lambda: self._pending == 0)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if unreleased:
            raise StubError(errno.EINVAL, f"pid {unreleased[0].pid}: its pages were never "
                                          "written (their VMAs were not said to be mapped)")

    def close(self) -> None:
        """Skip what is not written yet and end the thread (after a failure: the processes
        are killed first, so a write under way ends at once)."""
        if self._thread is not None:
            self._stopping = True
            for work in self._works:       # a write waiting for its VMAs: never made
                work.cancel()
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

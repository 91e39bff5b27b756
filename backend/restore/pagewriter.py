"""Writing the image's private pages into the restored processes, on a helper thread.

process_vm_writev needs no ptrace stop and releases the GIL for the copy, so while this
thread copies one process's pages the tracer thread goes on injecting that process's other
syscalls (fds, cwd, limits, handlers, threads) and checking the executables. The job waits
for the writes (``wait``, which raises the first failure) before anything depends on the
pages: the mprotect of VMAs that were made writable for the copy, then the registers.

The chunks of one process go out in as few calls as IOV_MAX allows (up to 1024 local
iovecs, one per image chunk, and 1024 remote ones, the page runs, merged across chunk
boundaries), at most ``CALL_BYTES`` per call so that an abort does not wait for long.

Runs of at least ``UFFD_MIN_RUN`` bytes in private anonymous VMAs go by UFFDIO_COPY instead,
when the caller hands over a userfaultfd of the process's mm: the kernel then allocates each
page and copies into it, where process_vm_writev first faults in a zeroed page and copies
over it (64 MiB here: ~17-19 ms against ~27-28). Their VMAs are registered in MISSING mode,
filled, and unregistered again before process_vm_writev writes the short runs: a missing
page of a registered range would fail that (the userfaultfd is made with
UFFD_USER_MODE_ONLY: a kernel-mode fault there fails at once instead of waiting for a
handler), and a short run written first could fault in a whole huge page (THP) that a long
run then finds there (EEXIST: the rest of such a run goes by process_vm_writev too).
"""
from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import fcntl
import os
import queue
import threading
import time
from array import array

from backend import kabi
from ckptsim.threads import Background
from backend.memory_pages import _runs_of as runs_of   # one run finder for both sides
from .stub import StubError

_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_writev = _libc.process_vm_writev
_process_vm_writev.restype = ctypes.c_ssize_t
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
IOV_MAX = 1024
CALL_BYTES = 64 << 20
PAGE = 4096
UFFD_MIN_RUN = 4 * PAGE          # shorter runs: many to one process_vm_writev, not an ioctl each
USE_UFFD = True                  # False: process_vm_writev only (tests and benchmarks compare)


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
    return _plan_runs([(buf, in_order(runs_of(addrs), addrs)) for buf, addrs in chunks])


def split_for_uffd(chunks: list[tuple[int, array]], anon: list[tuple[int, int]]) \
        -> tuple[list[tuple[int, list]], list[tuple[int, int, int]]]:
    """``chunks`` ((buffer address, page addresses), in order) as pieces for
    process_vm_writev ((buffer address, its page runs)) and copies for UFFDIO_COPY
    ((destination, source, bytes)): the runs of at least UFFD_MIN_RUN bytes of the chunks
    that lie in one of the ``anon`` ranges (sorted [start, end) pairs). Chunks that write a
    page more than once (an incremental chain's layers, in order: the last one wins) are
    all left to process_vm_writev: UFFDIO_COPY fills a page once only."""
    starts = [a for a, _ in anon]
    pieces: list[tuple[int, list]] = []
    copies: list[tuple[int, int, int]] = []
    located = [(buf, in_order(runs_of(addrs), addrs), addrs) for buf, addrs in chunks if addrs]
    if any(b[1][0][0] < a[1][-1][1] for a, b in zip(located, located[1:])):
        return [(buf, runs) for buf, runs, _ in located], []
    for buf, runs, addrs in located:
        k = bisect.bisect_right(starts, addrs[0]) - 1
        if k < 0 or addrs[0] >= anon[k][1]:      # (a chunk lies in one VMA: memory.py)
            pieces.append((buf, runs))
            continue
        short: list[tuple[int, int]] = []
        short_buf = buf
        for a, b in runs:
            if b - a >= UFFD_MIN_RUN:
                if short:
                    pieces.append((short_buf, short))
                    short = []
                copies.append((a, buf, b - a))
            elif not short:
                short_buf = buf
                short = [(a, b)]
            else:
                short.append((a, b))
            buf += b - a
        if short:
            pieces.append((short_buf, short))
    return pieces, copies


def _plan_runs(pieces: list[tuple[int, list[tuple[int, int]]]]) -> list[_Call]:
    """The calls that write ``pieces`` ((buffer address, the page runs its bytes fill))."""
    calls: list[_Call] = []
    call = _Call()
    for buf, runs in pieces:
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


def _register(uffd: int, ranges: list[tuple[int, int]]) -> bool:
    """UFFDIO_API, then each range registered in MISSING mode; False (nothing left
    registered) where the kernel refuses."""
    done = []
    try:
        fcntl.ioctl(uffd, kabi.UFFDIO_API, kabi.uffdio_api(api=kabi.UFFD_API))
        for start, end in ranges:
            fcntl.ioctl(uffd, kabi.UFFDIO_REGISTER, kabi.uffdio_register(
                range=kabi.uffdio_range(start, end - start),
                mode=kabi.UFFDIO_REGISTER_MODE_MISSING))
            done.append((start, end))
        return True
    except OSError:
        for start, end in done:
            fcntl.ioctl(uffd, kabi.UFFDIO_UNREGISTER, kabi.uffdio_range(start, end - start))
        return False


def _copy(pid: int, uffd: int, copies: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """UFFDIO_COPY each (destination, source, bytes); returns what is left for
    process_vm_writev: the rest of a run that met a page already there (EEXIST: a huge page
    that a neighbouring write faulted in whole, say)."""
    arg = kabi.uffdio_copy(mode=kabi.UFFDIO_COPY_MODE_DONTWAKE)     # nothing waits on it
    ref = ctypes.byref(arg)
    left = []
    for dst, src, size in copies:
        # UFFDIO_COPY reads its source with page faults off: a source page that is not
        # mapped in yet (the image's mmap) costs a retry of its own, ~8 us each (a 64 MiB
        # image straight from the page cache: 140 ms instead of 17); one populate first
        low = src & ~(PAGE - 1)
        _madvise(low, src + size - low, kabi.MADV_POPULATE_READ)     # (failure: just slower)
        done = 0
        while done < size:
            arg.dst, arg.src, arg.len, arg.copy = dst + done, src + done, size - done, 0
            if _ioctl(uffd, kabi.UFFDIO_COPY, ref) == 0:
                break
            err = ctypes.get_errno()
            if arg.copy > 0:
                done += arg.copy
            if err == errno.EEXIST:
                left.append((dst + done, src + done, size - done))
                break
            if err != errno.EAGAIN:    # EAGAIN: the mm changed under it (retried)
                raise StubError(err, f"pid {pid}: UFFDIO_COPY of {(size - done) // PAGE} "
                                     f"pages at {dst + done:#x} failed ({os.strerror(err)})")
    return left


def _unregister(uffd: int, ranges: list[tuple[int, int]]) -> None:
    for start, end in ranges:
        fcntl.ioctl(uffd, kabi.UFFDIO_UNREGISTER, kabi.uffdio_range(start, end - start))


def write_chunks(pid: int, chunks: list[tuple[array, memoryview]], mapped=None,
                 anon: list[tuple[int, int]] = ()) -> tuple[int, int]:
    """Write the page chunks ((page addresses, their data), in order) into ``pid``, straight
    from the data's memory (a read-only mmap of the image is fine: the buffer protocol gives
    its address without a copy). ``mapped()``: called once the writes are planned, returns
    once the pages may be written: None (they may not: nothing is), or the userfaultfd of
    ``pid``'s mm (ours to close) that fills the long runs in the ``anon`` ranges (sorted
    [start, end) of private anonymous VMAs), or -1 (process_vm_writev for all). Returns the
    bytes written by process_vm_writev and by UFFDIO_COPY."""
    views = []
    uffd = -1
    try:
        located = []
        for addrs, data in chunks:
            view = _PyBuffer()
            _get_buffer(data, ctypes.byref(view), 0)      # PyBUF_SIMPLE: contiguous bytes
            views.append(view)
            located.append((view.buf, addrs))
        pieces, copies = split_for_uffd(located, list(anon)) if anon and USE_UFFD else \
            ([(buf, in_order(runs_of(addrs), addrs)) for buf, addrs in located], [])
        calls = _plan_runs(pieces)
        uffd = mapped() if mapped is not None else -1
        if uffd is None:
            return 0, 0
        by_uffd = 0
        if copies:
            starts = [a for a, _ in anon]
            used = sorted({anon[bisect.bisect_right(starts, dst) - 1] for dst, _, _ in copies})
            if uffd >= 0 and _register(uffd, used):
                try:
                    left = _copy(pid, uffd, copies)
                except BaseException:
                    with contextlib.suppress(OSError):   # (the process may be gone: ENOMEM)
                        _unregister(uffd, used)
                    raise
                try:                            # before any process_vm_writev of these VMAs
                    _unregister(uffd, used)
                except OSError as e:
                    raise StubError(e.errno or errno.EIO, f"pid {pid}: UFFDIO_UNREGISTER "
                                    f"failed ({os.strerror(e.errno or errno.EIO)})") from None
                by_uffd = sum(n for _, _, n in copies) - sum(n for _, _, n in left)
                copies = left
            if copies:                          # no userfaultfd, or pages already there
                calls += _plan_runs([(src, [(dst, dst + n)]) for dst, src, n in copies])
        for call in calls:
            _write(pid, call)
        return sum(call.size for call in calls), by_uffd
    finally:
        if uffd is not None and uffd >= 0:
            os.close(uffd)                 # (the process's copy is closed: unregistered)
        for view in views:
            _release_buffer(ctypes.byref(view))


class Submitted:
    """A submitted process's pages: planned at once, written once ``mapped()`` was called
    (its VMAs exist), or never after ``cancel()``. ``anon``: the [start, end) ranges of its
    private anonymous VMAs (sorted), which a userfaultfd handed to mapped() may fill."""

    def __init__(self, pid: int, chunks: list, anon: list[tuple[int, int]] = ()):
        self.pid, self.chunks, self.anon = pid, chunks, sorted(anon)
        self._ready = threading.Event()
        self._go = False
        self._uffd = -1
        self._lock = threading.Lock()
        self._dropped = False

    def mapped(self, uffd: int = -1) -> None:
        """The VMAs exist: write. ``uffd`` (>= 0): our fd of a userfaultfd of the process's
        mm, made with UFFD_USER_MODE_ONLY, whose copy in the process is about to be closed;
        the writer owns it from now on (and closes it, written or not)."""
        with self._lock:
            if self._dropped and uffd >= 0:      # the writer gave up on it already
                os.close(uffd)
                uffd = -1
            self._uffd = uffd
        self._go = True
        self._ready.set()

    def cancel(self) -> None:
        self._ready.set()

    def _may_write(self) -> int | None:
        self._ready.wait()
        return self._uffd if self._go else None

    def _drop(self) -> None:
        """Close a handed userfaultfd that will not be used (the writer is stopping)."""
        with self._lock:
            uffd, self._uffd, self._dropped = self._uffd, -1, True
        if uffd >= 0:
            os.close(uffd)


class PageWriter:
    """A helper thread that runs ``write_chunks`` for each ``submit``, in order."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Background | None = None
        self._pending = 0
        self._done = threading.Condition()
        self._error: BaseException | None = None
        self._stopping = False
        self.busy_s = 0.0                  # time spent writing (for the job's step timings)
        self.written = {"process_vm_writev": 0, "UFFDIO_COPY": 0}      # bytes, by way
        self._works: list[Submitted] = []

    def submit(self, pid: int, chunks: list[tuple[array, memoryview]],
               anon: list[tuple[int, int]] = ()) -> Submitted:
        """Plan the writes of ``chunks`` into ``pid`` now (on the thread, while the caller
        maps the VMAs); they are made once the caller says ``.mapped()``. ``anon``: see
        Submitted."""
        work = Submitted(pid, chunks, anon)
        if not chunks:
            return work
        if self._thread is None:
            self._thread = Background(self._run, name="page-writer")
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
                    by_pvm, by_uffd = write_chunks(work.pid, work.chunks,
                                                   lambda: self._go_ahead(work), work.anon)
                    self.written["process_vm_writev"] += by_pvm
                    self.written["UFFDIO_COPY"] += by_uffd
            except BaseException as e:          # handed to the tracer thread by wait()
                self._error = e
            finally:
                work._drop()                    # (not taken by write_chunks: never written)
                self.busy_s += time.perf_counter() - start
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()

    def _go_ahead(self, work: Submitted) -> int | None:
        if work._may_write() is None or self._stopping:
            return None
        with work._lock:
            uffd, work._uffd = work._uffd, -1   # write_chunks owns it now
        return uffd

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

"""Reading a live process's memory for checkpoint: which pages to save, and their contents.

The target is normally stopped (seized or frozen) while this runs; nothing here stops, traces
or otherwise changes it, so the functions work on a running process too (tests use that).

Public API:
    classify(vma) -> VmaClass(kind, reason)      kind of a /proc maps/smaps entry
    pages_to_dump(pid, vma) -> array('Q')        page addresses worth saving in that VMA
    read_pages(pid, addrs) -> bytearray          len(addrs) * 4096 bytes, in addrs order
    dump_vma_pages(pid, vma, emit)               stream chunks emit(addrs, data), <= 1024 pages
    ProcessMemory(pid)                           the same with open fds and a reused buffer
                                                 (one per target: the checkpoint uses this)

Which pages (``pages_to_dump``): present or swapped-out pages that are not the shared zero page;
in a private mapping only anonymous pages (for a private file mapping: the copied-on-write
ones; clean file pages are the file's and restart maps the file again). A shared anonymous
mapping (shmem) keeps all its present pages; a shared file mapping and the special mappings
(vdso, vvar) keep none. They come from the PAGEMAP_SCAN ioctl on /proc/PID/pagemap
(Linux 6.7+), with

    category_inverted = PAGE_IS_PFNZERO | PAGE_IS_FILE (private) | PAGE_IS_GUARD
    category_mask     = the same bits          (all of them must be *clear*)
    category_anyof    = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
    return_mask       = PAGE_IS_PRESENT | PAGE_IS_SWAPPED

or, on older kernels, from the 64-bit /proc/PID/pagemap entries read in one pread per VMA
(bit 63 present, 62 swapped, 61 file page or shared anon; the zero page recognised by its
PFN, which root can see). Swapped-out pages are included by PAGE_IS_SWAPPED / bit 62: reading
them with process_vm_readv faults them back in, so their contents are saved like any other.
A page that was *written* with zeros is a real anonymous page to the kernel, so it is in
``pages_to_dump``; ``dump_vma_pages`` drops such all-zero pages after reading them for the
anonymous kinds (where restart's zero fill gives the same contents), never for a private file
mapping (where a missing page would read back as the file's data).

The classification lives in backend/memory_kinds.py and the bulk address helpers in
backend/memory_pages.py; their public names are importable from here.

Reading (``read_pages``): one process_vm_readv per batch of at most 1024 pages (4 MiB), the
remote iovecs being runs of adjacent pages, straight into one reused buffer. What
process_vm_readv cannot read (PROT_NONE pages, which need FOLL_FORCE; VM_IO) is read from
/proc/PID/mem with os.preadv into the same buffer, short reads retried.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from array import array
from dataclasses import dataclass
from typing import Callable, Iterable

from backend import kabi
from backend.memory_kinds import (  # noqa: F401 - re-exported
    _PRIVATE_DUMPED, _SHARED_DUMPED, _SPECIAL, _SYSV, _UNSUPPORTED_FLAGS, _ZERO_FILLED, VmaClass,
    VmaKind, _mapping, classify, describe, dump_kinds,
)
from backend.memory_pages import (  # noqa: F401 - re-exported
    _PRIVATE_KEEP, _RUNS, _SHARED_KEEP, CHUNK_PAGES, PAGE_SHIFT, PAGE_SIZE, _address_ints,
    _batches, _index, _keep_table, _page_addresses, _runs_of, _zero_page_entry,
)
from backend.proc import SmapsEntry, read_smaps
from ckptsim.errors import CkptsimError

__all__ = [
    "PAGE_SIZE", "CHUNK_PAGES", "MemoryDumpError", "VmaKind", "VmaClass", "classify",
    "pages_to_dump", "read_pages", "dump_vma_pages", "ProcessMemory", "dump_kinds",
    "pagemap_scan_available",
]

SCAN_VEC_LEN = 512                      # page_region entries per PAGEMAP_SCAN call
PAGEMAP_READ_PAGES = 1 << 16            # pagemap entries per pread in the fallback (512 KiB)
_ZERO_PAGE = bytes(PAGE_SIZE)


class MemoryDumpError(CkptsimError, OSError):
    """Reading a process's memory failed, or a mapping cannot be checkpointed. The message
    names the pid and the mapping; ``.errno`` is set."""

    def __init__(self, err: int, message: str):
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        return self.strerror


# --- syscalls -----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                              ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]

_scan_state: bool | None = None         # None: not probed; False: missing; True: present
_scan_has_guard = True                  # PAGE_IS_GUARD known (6.14+): retried without on EINVAL


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


# --- the reader ---------------------------------------------------------------------------

@dataclass
class ReadStats:
    vm_readv_calls: int = 0
    vm_readv_bytes: int = 0
    proc_mem_bytes: int = 0             # bytes that needed the /proc/PID/mem fallback
    scan_calls: int = 0                 # PAGEMAP_SCAN ioctls
    pagemap_bytes: int = 0              # pagemap entries read in the fallback
    zero_pages_dropped: int = 0


class ProcessMemory:
    """Memory access to one process: keeps /proc/PID/pagemap and /proc/PID/mem open and one
    4 MiB buffer that every read reuses (no fresh page faults per batch). ``use_scan``: None
    = PAGEMAP_SCAN when the kernel has it, False = always the pagemap fallback, True = require
    PAGEMAP_SCAN. Use as a context manager or call close()."""

    def __init__(self, pid: int, use_scan: bool | None = None):
        self.pid = int(pid)
        self.use_scan = use_scan
        self.stats = ReadStats()
        self._pagemap: int | None = None
        self._mem: int | None = None
        # the 4 MiB buffer is made on first use: read_pages(out=...) never needs it, and a
        # zero-filled 4 MiB costs ~1,000 page faults
        self._buf: bytearray | None = None
        self._view: memoryview | None = None
        self._buf_addr = 0
        self._local = kabi.iovec(0, 0)
        self._remote = (kabi.iovec * CHUNK_PAGES)()
        self._regions = (kabi.page_region * SCAN_VEC_LEN)()
        if _gone(self.pid):
            raise MemoryDumpError(errno.ESRCH, f"process {self.pid} does not exist")

    # -- plumbing ------------------------------------------------------------------------
    def __enter__(self) -> "ProcessMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for name in ("_pagemap", "_mem"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)

    def _open(self, attr: str, name: str) -> int:
        fd = getattr(self, attr)
        if fd is None:
            try:
                fd = os.open(f"/proc/{self.pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise self._error(e.errno or errno.EIO, f"cannot open /proc/{self.pid}/{name}: "
                                  f"{os.strerror(e.errno or errno.EIO)}") from None
            setattr(self, attr, fd)
        return fd

    def _own_buffer(self) -> tuple[memoryview, int]:
        """The reused 4 MiB buffer (a view and its address), made on first use."""
        if self._buf is None:
            self._buf = bytearray(CHUNK_PAGES * PAGE_SIZE)
            self._view = memoryview(self._buf)
            self._buf_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        return self._view, self._buf_addr

    def _error(self, err: int, message: str) -> MemoryDumpError:
        if _gone(self.pid):
            err, message = errno.ESRCH, f"process {self.pid} is gone ({message})"
        elif not message.startswith(f"process {self.pid}"):
            message = f"process {self.pid}: {message}"
        return MemoryDumpError(err, message)

    # -- which pages ---------------------------------------------------------------------
    def regions(self, vma) -> list[tuple[int, int]]:
        """The page ranges ``[start, end)`` worth saving in ``vma`` (see the module doc), in
        address order, adjacent ranges merged. UNSUPPORTED raises MemoryDumpError."""
        cls = classify(vma)
        m = _mapping(vma)
        if cls.kind == VmaKind.UNSUPPORTED:
            raise MemoryDumpError(errno.EINVAL, f"process {self.pid}: mapping {describe(m)} "
                                  f"cannot be checkpointed: {cls.reason}")
        if cls.kind in _PRIVATE_DUMPED:
            shared = False
        elif cls.kind in _SHARED_DUMPED:
            shared = True
        else:
            return []
        return self.scan_range(m.start, m.end, shared)

    def pages_to_dump_many(self, vmas: list) -> list[array]:
        """pages_to_dump of each of ``vmas`` (in address order), the private ones found by
        one scan of the span they cover instead of one each (~40 us a call)."""
        kinds = [self.regions_kind(v) for v in vmas]
        private = [v for v, k in zip(vmas, kinds) if k is False]
        if not self.scans_spans():          # the pagemap fallback reads every page between
            return [self.pages_to_dump(v) for v in vmas]
        runs = self.scan_range(_mapping(private[0]).start, _mapping(private[-1]).end) \
            if private else []
        out = []
        k = 0
        for vma, kind in zip(vmas, kinds):
            if kind is None:
                out.append(array("Q"))
                continue
            m = _mapping(vma)
            if kind is True:
                out.append(self._addresses(self.scan_range(m.start, m.end, True)))
                continue
            while k < len(runs) and runs[k][1] <= m.start:
                k += 1
            mine, j = [], k
            while j < len(runs) and runs[j][0] < m.end:
                mine.append((max(runs[j][0], m.start), min(runs[j][1], m.end)))
                j += 1
            out.append(self._addresses(mine))
        return out

    def scans_spans(self) -> bool:
        """Whether a scan costs per page present (PAGEMAP_SCAN), not per page of the span
        (the pagemap fallback): only then may one scan cover several VMAs and the gaps
        between them."""
        return self.use_scan is not False and \
            pagemap_scan_available(self._open("_pagemap", "pagemap"))

    def regions_kind(self, vma) -> bool | None:
        """How ``vma``'s pages are scanned: False private, True shared, None not at all.
        UNSUPPORTED raises MemoryDumpError."""
        cls = classify(vma)
        if cls.kind == VmaKind.UNSUPPORTED:
            raise MemoryDumpError(errno.EINVAL, f"process {self.pid}: mapping "
                                  f"{describe(_mapping(vma))} cannot be checkpointed: "
                                  f"{cls.reason}")
        if cls.kind in _PRIVATE_DUMPED:
            return False
        return True if cls.kind in _SHARED_DUMPED else None

    def scan_range(self, start: int, end: int, shared: bool = False) -> list[tuple[int, int]]:
        """Present or swapped, non-zero-page pages of [start, end); when not ``shared``, only
        anonymous ones."""
        if self.use_scan is not False and pagemap_scan_available(self._open("_pagemap", "pagemap")):
            return self._scan_ioctl(start, end, shared)
        if self.use_scan:
            raise self._error(errno.ENOTTY, "the kernel lacks PAGEMAP_SCAN")
        return self._scan_pagemap(start, end, shared)

    def _scan_ioctl(self, start: int, end: int, shared: bool) -> list[tuple[int, int]]:
        global _scan_has_guard
        fd = self._open("_pagemap", "pagemap")
        excl = kabi.PAGE_IS_PFNZERO | (0 if shared else kabi.PAGE_IS_FILE)
        if _scan_has_guard:
            excl |= kabi.PAGE_IS_GUARD
        want = kabi.PAGE_IS_PRESENT | kabi.PAGE_IS_SWAPPED
        arg = kabi.pm_scan_arg(size=ctypes.sizeof(kabi.pm_scan_arg), flags=0, start=start,
                               end=end, vec=ctypes.addressof(self._regions),
                               vec_len=SCAN_VEC_LEN, max_pages=0, category_inverted=excl,
                               category_mask=excl, category_anyof_mask=want, return_mask=want)
        out: list[tuple[int, int]] = []
        regions = self._regions
        while arg.start < end:
            try:
                n = fcntl.ioctl(fd, kabi.PAGEMAP_SCAN, arg)
            except OSError as e:
                if e.errno == errno.EINVAL and _scan_has_guard:
                    _scan_has_guard = False     # a kernel before PAGE_IS_GUARD (6.14)
                    return self._scan_ioctl(start, end, shared)
                raise self._error(e.errno or errno.EIO, f"PAGEMAP_SCAN {start:#x}-{end:#x}: "
                                  f"{os.strerror(e.errno or errno.EIO)}") from None
            self.stats.scan_calls += 1
            for i in range(n):
                r = regions[i]
                if out and out[-1][1] == r.start:
                    out[-1] = (out[-1][0], r.end)
                else:
                    out.append((r.start, r.end))
            if arg.walk_end <= arg.start:       # no progress: never loop forever
                break
            arg.start = arg.walk_end
        return out

    def _scan_pagemap(self, start: int, end: int, shared: bool) -> list[tuple[int, int]]:
        """The fallback: decode /proc/PID/pagemap entries in bulk. The top byte of each
        little-endian entry holds bits 56..63; a translation table maps it to 1 (keep) or 0,
        and a regular expression finds the runs of kept pages. The zero page is recognised by
        its whole entry (present bit + its PFN) and struck out."""
        fd = self._open("_pagemap", "pagemap")
        table = _SHARED_KEEP if shared else _PRIVATE_KEEP
        zero = _zero_page_entry()
        zero_value = int.from_bytes(zero, "little") if zero is not None else 0
        out: list[tuple[int, int]] = []
        first = start >> PAGE_SHIFT
        last = end >> PAGE_SHIFT
        for lo in range(first, last, PAGEMAP_READ_PAGES):
            count = min(PAGEMAP_READ_PAGES, last - lo)
            raw = self._pread_all(fd, count * 8, lo * 8, "pagemap")
            self.stats.pagemap_bytes += len(raw)
            keep = bytearray(raw[7::8].translate(table))
            if zero is not None and zero in raw:     # a byte search first: usually absent
                entries = array("Q", raw)
                i = _index(entries, zero_value, 0)
                while i >= 0:
                    keep[i] = 0
                    i = _index(entries, zero_value, i + 1)
            for mt in _RUNS.finditer(keep):
                a = (lo + mt.start()) << PAGE_SHIFT
                b = (lo + mt.end()) << PAGE_SHIFT
                if out and out[-1][1] == a:
                    out[-1] = (out[-1][0], b)
                else:
                    out.append((a, b))
        return out

    def _pread_all(self, fd: int, size: int, offset: int, what: str) -> bytes:
        parts = []
        while size > 0:
            try:
                b = os.pread(fd, size, offset)
            except OSError as e:
                raise self._error(e.errno or errno.EIO, f"reading {what} at {offset:#x}: "
                                  f"{os.strerror(e.errno or errno.EIO)}") from None
            if not b:
                raise self._error(errno.EIO, f"short read of {what} at {offset:#x}")
            parts.append(b)
            size -= len(b)
            offset += len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def pages_to_dump(self, vma) -> array:
        return self._addresses(self.regions(vma))

    @staticmethod
    def _addresses(regions) -> array:
        out = array("Q")
        for a, b in regions:
            for lo in range(a, b, CHUNK_PAGES * PAGE_SIZE):
                hi = min(b, lo + CHUNK_PAGES * PAGE_SIZE)
                out.frombytes(_page_addresses(lo, (hi - lo) >> PAGE_SHIFT))
        return out

    # -- reading -------------------------------------------------------------------------
    def _read_runs(self, runs: list[tuple[int, int]], where: str = "",
                   dest: memoryview | None = None, dest_addr: int = 0) -> memoryview:
        """Read ``runs`` (page-aligned [start, end), at most CHUNK_PAGES pages and at most
        CHUNK_PAGES runs in all) back to back into ``dest`` (whose address is ``dest_addr``)
        or the reused buffer; returns the filled view."""
        if dest is None:
            dest, dest_addr = self._own_buffer()
        remote = self._remote
        total = 0
        for i, (a, b) in enumerate(runs):
            remote[i].iov_base = a
            remote[i].iov_len = b - a
            total += b - a
        if total > len(dest):
            raise ValueError("batch larger than the read buffer")
        self._local.iov_base = dest_addr
        self._local.iov_len = total
        done = 0            # bytes of the buffer filled so far
        i = 0               # first remote iovec not yet fully read
        while done < total:
            got = _process_vm_readv(self.pid, ctypes.byref(self._local), 1,
                                    ctypes.byref(remote, i * ctypes.sizeof(kabi.iovec)),
                                    len(runs) - i, 0)
            self.stats.vm_readv_calls += 1
            if got < 0:
                err = ctypes.get_errno()
                if err not in (errno.EFAULT, errno.EIO):
                    raise self._error(err, f"process_vm_readv{where}: {os.strerror(err)}")
                got = 0
            self.stats.vm_readv_bytes += got
            # advance over the fully read iovecs
            while got:
                ln = remote[i].iov_len
                if got < ln:
                    break
                got -= ln
                done += ln
                i += 1
            if done >= total:
                break
            # iovec i failed after ``got`` bytes: its rest comes from /proc/PID/mem
            base = remote[i].iov_base + got
            ln = remote[i].iov_len - got
            self._read_mem(base, dest[done + got:done + got + ln], where)
            done += remote[i].iov_len
            i += 1
            if i < len(runs):
                self._local.iov_base = dest_addr + done
                self._local.iov_len = total - done
        return dest[:total]

    def _read_mem(self, addr: int, into: memoryview, where: str) -> None:
        """Read len(into) bytes at ``addr`` through /proc/PID/mem (FOLL_FORCE: PROT_NONE pages
        read too), retrying short reads."""
        fd = self._open("_mem", "mem")
        pos = 0
        n = len(into)
        while pos < n:
            try:
                got = os.preadv(fd, [into[pos:]], addr + pos)
            except OSError as e:
                raise self._error(e.errno or errno.EIO, f"cannot read page {addr + pos:#x}"
                                  f"{where}: {os.strerror(e.errno or errno.EIO)}") from None
            if got <= 0:
                raise self._error(errno.EIO, f"cannot read page {addr + pos:#x}{where}: "
                                  "end of /proc/PID/mem")
            pos += got
        self.stats.proc_mem_bytes += n

    def read_pages(self, addrs: Iterable[int], out=None):
        """The contents of the pages at ``addrs`` (page-aligned, any order; duplicates
        allowed), ``len(addrs) * 4096`` bytes in ``addrs`` order, into ``out`` (a writable
        buffer of at least that size) or a new bytearray. Adjacent pages are merged into one
        iovec; one process_vm_readv per 1024 pages."""
        if not isinstance(addrs, array) or addrs.typecode != "Q":
            addrs = array("Q", addrs)
        n = len(addrs)
        if out is None:
            out_obj = bytearray(n * PAGE_SIZE)
            dest = memoryview(out_obj)
        else:
            out_obj = out
            dest = memoryview(out).cast("B")
        if len(dest) < n * PAGE_SIZE:
            raise ValueError(f"output buffer of {len(dest)} bytes for {n} pages")
        if n == 0:
            return out_obj
        if dest.readonly:
            raise ValueError("the output buffer is read-only")
        # straight into the caller's buffer: no copy through ours
        dest_addr = ctypes.addressof(ctypes.c_char.from_buffer(dest))
        for i in range(0, n, CHUNK_PAGES):
            part = addrs[i:i + CHUNK_PAGES]
            lo = i * PAGE_SIZE
            self._read_runs(_runs_of(part), "", dest[lo:lo + len(part) * PAGE_SIZE],
                            dest_addr + lo)
        return out_obj

    def dump_vma_pages(self, vma, emit: Callable[[array, memoryview], object],
                       drop_zero: bool | None = None) -> int:
        """Stream the pages of ``vma`` worth saving to ``emit(addrs, data)`` in chunks of at
        most 1024 pages (``addrs`` an array('Q'), ``data`` a memoryview of len(addrs) * 4096
        bytes that is only valid until emit returns: the buffer is reused). All-zero pages
        are dropped for the anonymous kinds (``drop_zero`` None) unless drop_zero is False.
        Returns the number of pages emitted."""
        kind = classify(vma).kind
        if drop_zero is None:
            drop_zero = kind in _ZERO_FILLED
        elif drop_zero and kind not in _ZERO_FILLED:
            raise ValueError(f"zero pages of a {kind} mapping cannot be dropped")
        where = f" in {describe(vma)}"
        emitted = 0
        for runs, npages in _batches(self.regions(vma)):
            data = self._read_runs(runs, where)
            addrs = array("Q")
            for a, b in runs:
                addrs.frombytes(_page_addresses(a, (b - a) >> PAGE_SHIFT))
            if drop_zero:
                addrs, data = self._drop_zero_pages(addrs, data)
                if not addrs:
                    continue
            emit(addrs, data)
            emitted += len(addrs)
        return emitted

    def _drop_zero_pages(self, addrs: array, data: memoryview) -> tuple[array, memoryview]:
        keep, view = drop_zero_pages(addrs, self._buf, len(data))  # data is in _buf
        self.stats.zero_pages_dropped += len(addrs) - len(keep)
        return keep, view


_ZERO_WORD = bytes(8)
_WORDS_PER_PAGE = PAGE_SIZE // 8


def _first_zero_page(buf, size: int) -> int:
    """The offset of the first all-zero page in ``buf[:size]``, or -1. Only a page whose
    first word is zero can be: those words are gathered in one strided copy (8 bytes a
    page) and searched in C, so a chunk without such pages costs no full scan."""
    firsts = memoryview(buf)[:size].cast("Q")[::_WORDS_PER_PAGE].tobytes()
    pos = firsts.find(_ZERO_WORD)
    while pos >= 0:
        if pos % 8:                               # straddles two pages' words
            pos = firsts.find(_ZERO_WORD, pos + 8 - pos % 8)
            continue
        off = pos // 8 * PAGE_SIZE
        if buf.find(_ZERO_PAGE, off, off + PAGE_SIZE) == off:
            return off
        pos = firsts.find(_ZERO_WORD, pos + 8)
    return -1


def drop_zero_pages(addrs: array, buf, size: int) -> tuple[array, memoryview]:
    """Drop the all-zero pages from the chunk held in ``buf[:size]`` (page i belongs to
    ``addrs[i]``), compacting the rest in place: (kept addresses, a view of their contents).
    For anonymous mappings only: there a missing page reads back as zeros."""
    first = _first_zero_page(buf, size)
    view = memoryview(buf)
    if first < 0:
        return addrs, view[:size]
    keep_addrs = array("Q", addrs[:first // PAGE_SIZE])
    w = first               # write offset: pages before ``first`` stay where they are
    for i in range(first // PAGE_SIZE, len(addrs)):
        off = i * PAGE_SIZE
        if buf.find(_ZERO_PAGE, off, off + PAGE_SIZE) == off:    # bytearray or mmap
            continue
        if w != off:
            buf[w:w + PAGE_SIZE] = view[off:off + PAGE_SIZE]
        keep_addrs.append(addrs[i])
        w += PAGE_SIZE
    return keep_addrs, view[:w]


def pagemap_scan_available(pagemap_fd: int | None = None) -> bool:
    """True when the PAGEMAP_SCAN ioctl answers (Linux 6.7+ with PROC_PAGE_MONITOR)."""
    global _scan_state
    if _scan_state is None:
        own = pagemap_fd is None
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC) if own else pagemap_fd
        try:
            arg = kabi.pm_scan_arg(size=ctypes.sizeof(kabi.pm_scan_arg), start=0, end=0)
            fcntl.ioctl(fd, kabi.PAGEMAP_SCAN, arg)
            _scan_state = True
        except OSError as e:
            _scan_state = e.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP)
        finally:
            if own:
                os.close(fd)
    return _scan_state


# --- one-shot wrappers --------------------------------------------------------------------

def pages_to_dump(pid: int, vma) -> array:
    """The page addresses worth saving in ``vma`` of ``pid`` (see the module doc)."""
    with ProcessMemory(pid) as pm:
        return pm.pages_to_dump(vma)


def read_pages(pid: int, addrs: Iterable[int]) -> bytearray:
    """The contents of the pages at ``addrs`` of ``pid``: len(addrs) * 4096 bytes."""
    with ProcessMemory(pid) as pm:
        return pm.read_pages(addrs)


def dump_vma_pages(pid: int, vma, emit: Callable[[array, memoryview], object],
                   drop_zero: bool | None = None) -> int:
    """Stream ``vma``'s pages to ``emit(addrs, data)`` in chunks of at most 1024 pages;
    ``emit`` may be ``ctx.write_pages``. ``data`` is valid only during the call."""
    with ProcessMemory(pid) as pm:
        return pm.dump_vma_pages(vma, emit, drop_zero)


def vmas(pid: int) -> list[SmapsEntry]:
    """The VMAs of ``pid`` with their VmFlags (backend.proc.read_smaps)."""
    return read_smaps(pid)

"""Live address spaces for the checkpoint: LiveVMA, LiveMM and LiveShmem (stand-ins for the
model's VMA, MM and Shmem that kinds/memory.py saves), and the two helpers that keep the page
reads streaming: the reusable chunk buffers and a one-slot read-ahead thread.

LiveMM reads pages in bounded chunks (present_chunks: process_vm_readv through
backend/memory.py) while the image is written, never the whole address space at once;
shared anonymous segments are read once, through a task that maps them or
/proc/PID/map_files. Split from backend/snapshot.py, which gathers everything else.
"""
from __future__ import annotations

import errno
import itertools
import mmap
import os
import queue
import threading
from array import array
from typing import TYPE_CHECKING

from ckptsim.errors import CkptsimError
from ckptsim.image.codec import crc32
from ckptsim.kinds.memory import SPECIAL_MAPPINGS

from . import proc
from .memory import ProcessMemory, drop_zero_pages
from ckptsim.threads import Background

if TYPE_CHECKING:
    from .snapshot import LiveFile

PAGE = 4096


class Unsupported(CkptsimError):
    """Something the live backend cannot checkpoint yet (the message names it)."""


_VM_FLAG_BITS = {"rd": 0x1, "wr": 0x2, "ex": 0x4, "sh": 0x8, "mr": 0x10, "mw": 0x20,
                 "me": 0x40, "ms": 0x80, "gd": 0x100, "pf": 0x400, "lo": 0x2000, "io": 0x4000,
                 "sr": 0x8000, "rr": 0x10000, "dc": 0x20000, "de": 0x40000, "ac": 0x100000,
                 "nr": 0x200000}
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_GROWSDOWN = 0x1, 0x2, 0x20, 0x100


class LiveVMA:
    def __init__(self, entry, file: LiveFile | None):
        m = entry.mapping
        self.entry = entry
        self.start, self.end = m.start, m.end
        self.prot = (m.readable and 1) | (m.writable and 2) | (m.executable and 4)
        shared = m.shared
        self.flags = (MAP_SHARED if shared else MAP_PRIVATE) | (0 if file else MAP_ANONYMOUS)
        if "gd" in entry.vm_flags:
            self.flags |= MAP_GROWSDOWN
        self.file, self.shmem = file, None
        self.pgoff = (m.offset >> 12) if file is not None else (m.start >> 12)
        self.name = m.path if m.path.startswith("[") else None
        self.vm_flags = sum(bit for flag, bit in _VM_FLAG_BITS.items() if flag in entry.vm_flags)
        self.maxprot = (self.vm_flags >> 4) & 7

    @property
    def shared(self) -> bool:
        return bool(self.flags & MAP_SHARED)


class _ChunkBuffers:
    """The two page buffers of LiveMM.present_chunks, kept for the next VMA and the next
    process: fresh memory costs a page fault per page (about 3 ms per 4 MiB here), which
    per VMA would add up. Buffers of ``size`` bytes; one user at a time (a concurrent one
    gets fresh buffers, which are then dropped). At most two are kept."""

    _lock = threading.Lock()
    _kept: list = []          # mmap buffers
    _filling: Background | None = None

    @staticmethod
    def _new(size: int) -> mmap.mmap:
        # populated in one call: bytearray(size) zeroes 4 MiB through 1,024 page faults
        return mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                         | getattr(mmap, "MAP_POPULATE", 0))

    @classmethod
    def prefetch(cls, size: int) -> None:
        """Populate the two buffers on a helper thread (4-6 ms here), while the caller does
        other work (seizing and gathering the tree); take() waits for it."""
        with cls._lock:
            if cls._kept or cls._filling is not None:
                return
            cls._filling = Background(cls._fill, size, name="ckptsim-buffers")

    @classmethod
    def _fill(cls, size: int) -> None:
        bufs = [cls._new(size), cls._new(size)]
        with cls._lock:
            if not cls._kept:
                cls._kept = bufs
            cls._filling = None

    @classmethod
    def take(cls, size: int) -> list:
        filling = cls._filling
        if filling is not None:
            filling.join()
        with cls._lock:
            bufs, cls._kept = [b for b in cls._kept if len(b) == size], []
        while len(bufs) < 2:
            bufs.append(cls._new(size))
        return bufs

    @classmethod
    def give_back(cls, bufs: list) -> None:
        with cls._lock:
            if not cls._kept:
                cls._kept = bufs[:2]


class _ReadAhead:
    """A helper thread running one job at a time (``submit``, then ``result``). A job it has
    not started when its result is wanted is claimed back and run by the caller: nobody
    waits for an idle helper (a loaded machine has no core free for it). ``close`` waits
    for (or claims back) the pending job, so no buffer is used after it returns."""

    def __init__(self, name: str):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = None
        self.thread = Background(self._run, name=name)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, args, claim = job
            if claim.acquire(blocking=False):   # else the caller took it back
                try:
                    self.results.put((True, fn(*args)))
                except BaseException as e:      # raised by result()
                    self.results.put((False, e))
            del job, fn, args

    def submit(self, fn, *args) -> None:
        self.pending = (fn, args, threading.Lock())
        self.jobs.put(self.pending)

    def result(self):
        fn, args, claim = self.pending
        self.pending = None
        if claim.acquire(blocking=False):
            return fn(*args)
        ok, value = self.results.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        try:
            if self.pending is not None:
                fn, args, claim = self.pending
                self.pending = None
                if not claim.acquire(blocking=False):
                    self.results.get()          # its outcome no longer matters
        finally:
            self.jobs.put(None)
            self.thread.join()


def prefetch_chunk_buffers(max_pages: int = 1024) -> None:
    """Start populating present_chunks' page buffers now (see _ChunkBuffers.prefetch)."""
    _ChunkBuffers.prefetch(max_pages * PAGE)


AHEAD_MIN_BYTES = 1 << 20     # a VMA this big is scanned and read ahead on the helper thread


class LiveMM:
    """The address space (MM's attributes); pages are read in chunks as the image is written."""

    def __init__(self, pid: int, stat: proc.Stat, vmas: list[LiveVMA], exe_file: LiveFile | None):
        self.pid, self.vmas, self.exe_file = pid, vmas, exe_file
        self.def_flags = self.flags = 0
        heap = next((v for v in vmas if v.name == "[heap]"), None)
        self.start_code, self.end_code = stat.startcode, stat.endcode
        self.start_data, self.end_data = stat.start_data, stat.end_data
        self.start_brk = stat.start_brk
        self.brk = heap.end if heap is not None else stat.start_brk
        self.start_stack = stat.startstack
        self.arg_start, self.arg_end = stat.arg_start, stat.arg_end
        self.env_start, self.env_end = stat.env_start, stat.env_end
        self._memory: ProcessMemory | None = None
        self.file_ids: dict = {}              # LiveFile -> FileIdentity (backend/elf_ids.py)
        self.vdso_layout = None
        self.delta = None                     # backend/incremental.MmDelta: only changes saved
        self._stream = None                   # present_chunks' pages of every VMA, in order
        self._next = None                     # the stream's next item (vma, chunk) or None
        self._stream_at: dict[int, int] = {}  # id(vma) -> its index in the stream's order
        self._last_at = -1                    # the index of the last VMA present_chunks served

    @property
    def map_count(self) -> int:
        return len(self.vmas)

    def _process_memory(self) -> ProcessMemory:
        if self._memory is None:
            self._memory = ProcessMemory(self.pid)
        return self._memory

    @staticmethod
    def _has_private_pages(vma: LiveVMA) -> bool:
        return not (vma.name in SPECIAL_MAPPINGS or vma.shared)

    def present_chunks(self, vma: LiveVMA, max_pages: int = 1024):
        """(page addresses, their contents, the CRC-32 of the contents) of the pages worth
        saving, max_pages at a time; the contents are only valid until the next chunk is
        asked for."""
        if not self._has_private_pages(vma):
            return  # kernel-provided or shared: no private pages to save
        if self._stream is None and not self._stream_at and self.delta is None:
            self._start_stream(max_pages)
        at = self._stream_at.get(id(vma), -1)
        if self._stream is None or at <= self._last_at:
            # not in the stream's order (asked twice, or out of order): read on its own
            self._end_stream()
            addrs = self._process_memory().pages_to_dump(vma.entry)
            yield from self._chunks(addrs, max_pages, drop_zero=vma.file is None)
            return
        self._last_at = at             # (the stream's chunks of VMAs never asked for are dropped)
        while self._next is not None and self._stream_at[id(self._next[0])] <= at:
            got_vma, chunk = self._next
            if got_vma is vma:
                yield chunk
            self._next = next(self._stream, None)   # (the chunk's buffer is reused from here)

    def _start_stream(self, max_pages: int) -> None:
        work = [v for v in self.vmas if self._has_private_pages(v)]
        self._stream_at = {id(v): i for i, v in enumerate(work)}
        self._stream = self._all_chunks(work, max_pages)
        self._next = next(self._stream, None)

    def _end_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()                # its reader thread ends, its buffers go back
            self._stream, self._next = None, None

    def _all_chunks(self, work: list, max_pages: int):
        """(vma, (page addresses, contents, CRC)) for the pages worth saving of the VMAs of
        ``work``, in order: present_chunks across VMAs. A helper thread reads one chunk ahead
        of the consumer, across VMA boundaries, and scans each VMA's pages (PAGEMAP_SCAN)
        when it comes to it: a small VMA costs the writer no read and no scan of its own,
        and a big one's first chunk is read while the one before is written."""
        memory = self._process_memory()
        parts_of: dict[int, list] = {}

        scanned: dict[int, array] = {}     # small VMAs' pages, scanned a run of them at once
        order = {id(v): n for n, v in enumerate(self.vmas)}

        def small(i: int) -> bool:
            return work[i].end - work[i].start < AHEAD_MIN_BYTES

        def job(i: int, j: int, buf):
            vma = work[i]
            if j == 0:
                if small(i) and i not in scanned:
                    k = i
                    # (only neighbours, in the VMA list and in memory: the scan walks the
                    # span between them; and only where a scan costs per page present)
                    while memory.scans_spans() and k + 1 < len(work) and small(k + 1) and \
                            order[id(work[k + 1])] == order[id(work[k])] + 1 and \
                            work[k + 1].start - work[k].end <= AHEAD_MIN_BYTES:
                        k += 1
                    for n, addrs in enumerate(memory.pages_to_dump_many(
                            [v.entry for v in work[i:k + 1]])):
                        scanned[i + n] = addrs
                addrs = scanned.pop(i) if i in scanned else memory.pages_to_dump(vma.entry)
                parts_of[i] = [addrs[k:k + max_pages] for k in range(0, len(addrs), max_pages)]
            parts = parts_of[i]
            # an all-zero anonymous page reads back as zeros: the model saves none either
            return _fill(memory, parts[j], buf, vma.file is None) if parts else None

        def after(i: int, j: int):
            if j + 1 < len(parts_of[i]):
                return i, j + 1
            return (i + 1, 0) if i + 1 < len(work) else None

        if not work:
            return
        bufs = _ChunkBuffers.take(max_pages * PAGE)
        reader = None
        try:
            reader = _ReadAhead(f"ckptsim-read-{self.pid}")
            pos, n = (0, 0), 0
            got = job(0, 0, bufs[0])
            while pos is not None:
                nxt = after(*pos)
                # a small VMA is scanned and read here, when it comes: handing it to the
                # helper and waiting for it cost more than that (a wake-up of its CPU)
                ahead = nxt is not None and (nxt[1] or work[nxt[0]].end - work[nxt[0]].start
                                             >= AHEAD_MIN_BYTES)
                if ahead:
                    reader.submit(job, *nxt, bufs[(n + 1) % 2])
                if got is not None and len(got[0]):
                    yield work[pos[0]], got
                if nxt is not None:
                    got = reader.result() if ahead else job(*nxt, bufs[(n + 1) % 2])
                pos, n = nxt, n + 1
        finally:
            if reader is not None:
                reader.close()
            _ChunkBuffers.give_back(bufs)

    # -- incremental images (backend/incremental.py sets ``delta``) --------------------------
    def private_ranges(self) -> list[tuple[int, int]]:
        return [(v.start, v.end) for v in self.vmas if self._has_private_pages(v)]

    def present_runs(self) -> list[tuple[int, int]]:
        """[start, end) runs of the private pages worth saving now (present or swapped)."""
        memory = self._process_memory()
        return [run for v in self.vmas if self._has_private_pages(v)
                for run in memory.regions(v.entry)]

    def dropped_ranges(self) -> list[tuple[int, int]]:
        return list(self.delta.drops) if self.delta is not None else []

    def dirty_chunks(self, vma: LiveVMA, max_pages: int = 1024):
        """The delta's pages of ``vma`` (all-zero ones included), read now, max_pages at a
        time; only these pages are read."""
        if self.delta is None or not self._has_private_pages(vma):
            return
        from .incremental import pages_in
        yield from self._chunks(pages_in(self.delta.pages, vma.start, vma.end), max_pages,
                                drop_zero=False)

    def _chunks(self, addrs: array, max_pages: int, drop_zero: bool):
        if not len(addrs):
            return
        memory = self._process_memory()
        parts = [addrs[i:i + max_pages] for i in range(0, len(addrs), max_pages)]

        def fill(part: array, buf: bytearray):
            return _fill(memory, part, buf, drop_zero)

        bufs = _ChunkBuffers.take(max_pages * PAGE)
        try:
            if len(parts) == 1:
                part, view, crc = fill(parts[0], bufs[0])
                if len(part):
                    yield part, view, crc
                return
            # Two buffers: a helper thread reads chunk k+1 (process_vm_readv releases the
            # GIL) while the consumer writes chunk k; chunk k's buffer is refilled only once
            # the consumer has asked for the chunk after it. A read the helper has not
            # started when it is needed is done here (never wait for an idle helper).
            reader = _ReadAhead(f"ckptsim-read-{self.pid}")
            try:
                part, view, crc = fill(parts[0], bufs[0])
                for k in range(len(parts)):
                    if k:
                        part, view, crc = reader.result()
                    if k + 1 < len(parts):
                        reader.submit(fill, parts[k + 1], bufs[(k + 1) % 2])
                    if len(part):
                        yield part, view, crc
            finally:
                reader.close()
        finally:
            _ChunkBuffers.give_back(bufs)

    def close(self) -> None:
        self._end_stream()
        if self._memory is not None:
            self._memory.close()
            self._memory = None


def _fill(memory: ProcessMemory, part: array, buf, drop_zero: bool):
    """``part``'s pages read into ``buf``: (their addresses, their contents, CRC-32), the
    all-zero ones dropped with ``drop_zero``. The image's CRC of the pages is taken here,
    while they are in this core's cache and off the writer's thread
    (ImageWriter.write_pages(data_crc=))."""
    size = len(part) * PAGE
    memory.read_pages(part, out=memoryview(buf)[:size])
    if drop_zero:
        part, view = drop_zero_pages(part, buf, size)
    else:
        view = memoryview(buf)[:size]
    return part, view, crc32(view)


class _PageCount:
    """``Shmem.pages`` as kinds/memory.py's save_shmem reads it: only values() is counted."""

    def __init__(self, n: int):
        self.n = n

    def values(self):
        return itertools.repeat(True, self.n)   # one non-ZERO_PAGE marker per saved page


class LiveShmem:
    """A shared anonymous segment (MAP_SHARED|MAP_ANONYMOUS, /dev/zero shared): Shmem's
    attributes (size, pages, present_pages). One object per (dev, inode) of the mapping,
    whichever processes of the tree map it, so it is saved once.

    The pages saved are those the segment holds: the data ranges of the segment's shmem file
    (SEEK_DATA/SEEK_HOLE on /proc/PID/map_files/..., which also sees pages written by a
    process that exited or unmapped it) together with the present or swapped pages of every
    mapping in the tree (backend.memory's scan of the shared kinds). They are read with
    preadv from the segment file, or, when map_files cannot be opened, with
    process_vm_readv through a mapping of the tree (backend.memory)."""

    def __init__(self, key: tuple):
        self.key = key                          # (dev, inode) of the mapping
        self.mappers: list[tuple[int, object]] = []   # (pid, smaps entry)
        self._ranges: list[tuple[int, int]] | None = None   # byte offsets [a, b), merged
        self._size = 0

    def add(self, pid: int, entry) -> None:
        self.mappers.append((pid, entry))

    def _path(self, pid: int, m) -> str:
        return f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"

    def _open(self) -> int | None:
        for pid, entry in self.mappers:
            try:
                return os.open(self._path(pid, entry.mapping), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
        return None

    def _scan(self) -> None:
        ranges = []
        size = 0
        for pid, entry in self.mappers:
            m = entry.mapping
            size = max(size, m.offset + m.size)
            with ProcessMemory(pid) as pm:
                ranges.extend((m.offset + a - m.start, m.offset + b - m.start)
                              for a, b in pm.regions(entry))
        fd = self._open()
        if fd is not None:
            try:
                size = max(size, os.fstat(fd).st_size)
                off = 0
                while off < size:
                    try:
                        a = os.lseek(fd, off, os.SEEK_DATA)
                    except OSError as e:
                        if e.errno == errno.ENXIO:     # no data past off
                            break
                        raise
                    b = min(os.lseek(fd, a, os.SEEK_HOLE), size)
                    ranges.append((a & ~(PAGE - 1), (b + PAGE - 1) & ~(PAGE - 1)))
                    off = b
            finally:
                os.close(fd)
        merged: list[tuple[int, int]] = []
        for a, b in sorted(ranges):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._ranges, self._size = merged, size
        self._ranges = self._without_zero_pages()

    def _without_zero_pages(self) -> list[tuple[int, int]]:
        """The ranges without their all-zero pages, found by reading them once: a missing
        page of a segment reads as zeros, and the model saves none (save_shmem), so a replay
        of the image gives back the same SHMEM record."""
        kept: list[tuple[int, int]] = []
        for part, offsets, nonzero in self._read_chunks(1024, drop_zero=True):
            if len(nonzero) == len(offsets):     # the usual case: no zero page in this chunk
                runs = part
            else:
                runs = [(off, off + PAGE) for off in nonzero]
            for a, b in runs:
                if kept and kept[-1][1] == a:
                    kept[-1] = (kept[-1][0], b)
                else:
                    kept.append((a, b))
        return kept

    @property
    def size(self) -> int:
        if self._ranges is None:
            self._scan()
        return self._size

    @property
    def pages(self) -> _PageCount:
        if self._ranges is None:
            self._scan()
        return _PageCount(sum(b - a for a, b in self._ranges) // PAGE)

    def present_pages(self, max_pages: int = 1024):
        """Yield (array('Q') of byte offsets, their contents), at most max_pages at a time;
        the contents are only valid until the next chunk is asked for."""
        if self._ranges is None:
            self._scan()
        for _, offsets, out in self._read_chunks(max_pages):
            yield offsets, out

    def _read_chunks(self, max_pages: int, drop_zero: bool = False):
        """(ranges, offsets, contents) per chunk; ``drop_zero``: offsets and contents without
        the all-zero pages (the ranges stay as read)."""
        if not self._ranges:
            return
        buf = bytearray(max_pages * PAGE)
        view = memoryview(buf)
        fd = self._open()
        memories: dict[int, ProcessMemory] = {}
        try:
            for part in self._chunks(max_pages):
                offsets = array("Q")
                for a, b in part:
                    offsets.extend(range(a, b, PAGE))
                out = view[:len(offsets) * PAGE]
                if fd is not None:
                    self._pread(fd, part, out)
                else:
                    self._read_mapped(part, out, memories)
                if drop_zero:
                    nonzero, out = drop_zero_pages(offsets, buf, len(out))
                    yield part, offsets, nonzero
                else:
                    yield part, offsets, out
        finally:
            if fd is not None:
                os.close(fd)
            for pm in memories.values():
                pm.close()

    def _chunks(self, max_pages: int):
        limit = max_pages * PAGE
        part, used = [], 0
        for a, b in self._ranges:
            while a < b:
                take = min(b - a, limit - used)
                part.append((a, a + take))
                used += take
                a += take
                if used == limit:
                    yield part
                    part, used = [], 0
        if part:
            yield part

    def _pread(self, fd: int, part, out: memoryview) -> None:
        pos = 0
        for a, b in part:
            while a < b:
                got = os.preadv(fd, [out[pos:pos + b - a]], a)
                if got <= 0:            # past the segment's end (a shrunk segment): zeros
                    out[pos:pos + b - a] = bytes(b - a)
                    pos += b - a
                    break
                pos += got
                a += got

    def _read_mapped(self, part, out: memoryview, memories: dict) -> None:
        """Without the segment file: each range through a mapping of the tree that covers it."""
        pos = 0
        for a, b in part:
            for pid, entry in self.mappers:
                m = entry.mapping
                if m.offset <= a and b <= m.offset + m.size:
                    pm = memories.get(pid) or memories.setdefault(pid, ProcessMemory(pid))
                    start = m.start + a - m.offset
                    pm.read_pages(array("Q", range(start, start + b - a, PAGE)),
                                  out=out[pos:pos + b - a])
                    break
            else:
                raise Unsupported(f"shared anonymous segment {self.key[0][0]:02x}:"
                                  f"{self.key[0][1]:02x} inode {self.key[1]}: pages at "
                                  f"offset {a:#x} are mapped by no task of the tree and "
                                  "/proc/PID/map_files cannot be read")
            pos += b - a

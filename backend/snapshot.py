"""What a live checkpoint saves of each task, gathered from /proc and ptrace.

The objects built here are what the resource kinds (``ckptsim/kinds``) save: the small ones
are the model's own types (Cred, SigHand, SignalStruct, ThreadSignals), the others stand in
for model objects with the same attributes (LiveMM for MM, LiveFile for File, ...), so one
save function per kind writes both model and live images. Memory is not copied here: LiveMM
reads pages in bounded chunks while the image is written.

Every task must be stopped (``backend.ptrace.seized``) while this runs. Anything the live
backend cannot save yet raises Unsupported, naming the task, the fd or mapping and its kind.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import os
import queue
import struct
import threading
from array import array

from ckptsim.errors import CkptsimError
from ckptsim.kinds.cpu_x86 import X86State
from ckptsim.kinds.memory import SPECIAL_MAPPINGS
from ckptsim.model.creds import Cred
from ckptsim.model.signals import AltStack, SigAction, SigHand, SigInfo, SignalStruct, SigPending, ThreadSignals

from . import elf_ids, kabi, proc, ptrace
from .memory import ProcessMemory, VmaKind, classify, describe, drop_zero_pages

RLIM_INFINITY_U64 = (1 << 64) - 1
MAX_UNLINKED_CONTENTS = 1 << 30
PAGE = 4096
# Character devices without state of their own: saved by path, opened again on restart.
REOPENABLE_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"})


class Unsupported(CkptsimError):
    """Something in the tree the live backend cannot checkpoint yet (named precisely)."""


# -- stand-ins for model objects --------------------------------------------------------------
class LiveFileType:
    def __init__(self, kind: str, seekable: bool):
        self.kind, self.seekable = kind, seekable


class LiveInode:
    """An unlinked-but-open file's inode: saved by contents."""

    def __init__(self, ino: int, kind: str, mode: int, data: bytes):
        self.ino, self.kind, self.mode, self.data, self.nlink = ino, kind, mode, data, 0


class LiveFile:
    """An open file description (File's attributes as kinds/files.py reads them)."""

    def __init__(self, kind: str, flags: int, pos: int, path: str, *, seekable: bool = True,
                 private=None, inode: LiveInode | None = None):
        self.ftype = LiveFileType(kind, seekable)
        self.flags, self.pos, self.path = flags, pos, path
        self.private, self.inode = private, inode

    def linked_path(self, kernel) -> str | None:
        return None if self.inode is not None else self.path


class LivePipe:
    """A pipe's buffer, copied with tee(2) so that the live pipe keeps its data."""

    def __init__(self, capacity: int, buffer: bytes, fifo: bool):
        self.capacity, self.buffer = capacity, buffer
        self.inode = True if fifo else None  # kinds/pipes.py: a FIFO has an inode


class LiveDir:
    def __init__(self, deleted: bool):
        self.nlink = 0 if deleted else 1


class LiveFs:
    def __init__(self, root: str, cwd: str, umask: int):
        self.root_path, self.cwd_path = root.removesuffix(" (deleted)"), cwd.removesuffix(" (deleted)")
        self.root, self.cwd = LiveDir(root.endswith(" (deleted)")), LiveDir(cwd.endswith(" (deleted)"))
        self.umask = umask


class LiveFdTable:
    def __init__(self, entries: list[tuple[int, LiveFile, bool]]):
        self.entries = entries

    def items(self):
        return self.entries


# VmFlags mnemonics of smaps and Linux's vm_flags bits (include/linux/mm.h)
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
    _kept: list[bytearray] = []

    @classmethod
    def take(cls, size: int) -> list[bytearray]:
        with cls._lock:
            bufs, cls._kept = [b for b in cls._kept if len(b) == size], []
        while len(bufs) < 2:
            bufs.append(bytearray(size))
        return bufs

    @classmethod
    def give_back(cls, bufs: list[bytearray]) -> None:
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
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

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
        """(page addresses, their contents) of the pages worth saving, max_pages at a time;
        the contents are only valid until the next chunk is asked for."""
        if not self._has_private_pages(vma):
            return  # kernel-provided or shared: no private pages to save
        addrs = self._process_memory().pages_to_dump(vma.entry)
        # an all-zero anonymous page reads back as zeros: the model saves none either
        yield from self._chunks(addrs, max_pages, drop_zero=vma.file is None)

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
            size = len(part) * PAGE
            memory.read_pages(part, out=memoryview(buf)[:size])
            if drop_zero:
                return drop_zero_pages(part, buf, size)
            return part, memoryview(buf)[:size]

        bufs = _ChunkBuffers.take(max_pages * PAGE)
        try:
            if len(parts) == 1:
                part, view = fill(parts[0], bufs[0])
                if len(part):
                    yield part, view
                return
            # Two buffers: a helper thread reads chunk k+1 (process_vm_readv releases the
            # GIL) while the consumer writes chunk k; chunk k's buffer is refilled only once
            # the consumer has asked for the chunk after it. A read the helper has not
            # started when it is needed is done here (never wait for an idle helper).
            reader = _ReadAhead(f"ckptsim-read-{self.pid}")
            try:
                part, view = fill(parts[0], bufs[0])
                for k in range(len(parts)):
                    if k:
                        part, view = reader.result()
                    if k + 1 < len(parts):
                        reader.submit(fill, parts[k + 1], bufs[(k + 1) % 2])
                    if len(part):
                        yield part, view
            finally:
                reader.close()
        finally:
            _ChunkBuffers.give_back(bufs)

    def close(self) -> None:
        if self._memory is not None:
            self._memory.close()
            self._memory = None


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


class LiveTask:
    """One thread, with what the kinds save per task; ``cpu`` is None (x86 state instead)."""

    ns = None

    def __init__(self, tid: int, process: "LiveProcess"):
        self.tid = tid
        self.process = process
        self.cpu = None
        self.x86: X86State | None = None
        self.sigstate: ThreadSignals | None = None
        self.comm = ""
        self.state = "running"
        self.exit_signal = 17
        self.exit_code = 0
        self.pdeath_signal = 0

    def __getattr__(self, name):
        if name in ("cred", "mm", "files", "fs", "sighand", "signal"):
            return getattr(self.process, name)
        raise AttributeError(name)


class LiveProcess:
    def __init__(self, pid: int):
        self.pid = pid
        self.threads: list[LiveTask] = []
        self.cred = self.mm = self.files = self.fs = self.sighand = self.signal = None
        self.stat: proc.Stat | None = None
        self.zombie = False


# -- gathering --------------------------------------------------------------------------------
def _siginfo(raw: bytes) -> SigInfo:
    signo, _errno, code = struct.unpack_from("<iii", raw, 0)
    pid, uid = struct.unpack_from("<iI", raw, 16)
    (value,) = struct.unpack_from("<Q", raw, 24)
    return SigInfo(signo, code, pid, uid, value)


def _cred(status: proc.Status, securebits: int) -> Cred:
    uid, euid, suid, fsuid = status.uid
    gid, egid, sgid, fsgid = status.gid
    return Cred(uid=uid, euid=euid, suid=suid, fsuid=fsuid, gid=gid, egid=egid, sgid=sgid,
                fsgid=fsgid, groups=tuple(sorted(status.groups)), cap_inheritable=status.cap_inh,
                cap_permitted=status.cap_prm, cap_effective=status.cap_eff,
                cap_bounding=status.cap_bnd, securebits=securebits)


def _handlers(tid: int) -> SigHand:
    """Every signal's action, read inside the task: 64 rt_sigaction calls injected as one
    batch, each writing its own slot of one scratch area that is read back at once. All 64
    are read: a SIG_DFL action, which /proc's SigCgt/SigIgn do not show, may still hold
    flags, a mask and a restorer (sigaction(SIG_DFL) with flags; SA_RESETHAND after it
    fired), and the image keeps them."""
    size = kabi.KERNEL_SIGACTION_SIZE
    try:
        with ptrace.stack_scratch(tid, size * 64) as addr:
            ptrace.inject_syscalls(tid, [(kabi.SYS_rt_sigaction, sig, 0, addr + (sig - 1) * size, 8)
                                         for sig in range(1, 65)])
            raw = ptrace.read_memory(tid, addr, size * 64)
    except ptrace.PtraceError as e:
        if e.errno != errno.EFAULT:
            raise
        raw = b""           # not 2 KiB of stack below rsp (a small altstack): one slot
        with ptrace.stack_scratch(tid, size) as addr:
            for sig in range(1, 65):
                ptrace.inject_syscall(tid, kabi.SYS_rt_sigaction, sig, 0, addr, 8)
                raw += ptrace.read_memory(tid, addr, size)
    return SigHand([SigAction(handler, flags, mask, restorer)
                    for handler, flags, restorer, mask in struct.iter_unpack("<QQQQ", raw)])


def _rseq(tid: int) -> tuple[int, int, int] | None:
    """The thread's restartable-sequences registration (pointer, size, signature), if any."""
    conf = kabi.ptrace_rseq_configuration()
    try:
        ptrace._ptrace(kabi.PTRACE_GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(conf),
                       ctypes.addressof(conf))
    except ptrace.PtraceError:
        return None
    if not conf.rseq_abi_pointer:
        return None
    return conf.rseq_abi_pointer, conf.rseq_abi_size, conf.signature


def _altstack(tid: int) -> AltStack:
    with ptrace.stack_scratch(tid, kabi.STACK_T_SIZE) as addr:
        ptrace.inject_syscall(tid, kabi.SYS_sigaltstack, 0, addr)
        sp, flags, size = struct.unpack("<Qi4xQ", ptrace.read_memory(tid, addr, kabi.STACK_T_SIZE))
    return AltStack(sp, size, flags)


def _rlimits(pid: int) -> list[tuple[int, int]]:
    out = []
    for lim in proc.read_limits(pid)[:16]:
        soft = RLIM_INFINITY_U64 if lim.soft < 0 else lim.soft
        hard = RLIM_INFINITY_U64 if lim.hard < 0 else lim.hard
        out.append((soft, hard))
    return out


def _pipe_contents(pid: int, fd: int, ino: int) -> tuple[int, bytes]:
    """(capacity, buffered bytes) of the pipe behind ``fd``, left intact: a new read end is
    opened through /proc and tee(2) duplicates the buffer into a private pipe."""
    src = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
    r, w = os.pipe()
    try:
        capacity = fcntl.fcntl(src, fcntl.F_GETPIPE_SZ)
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, capacity)
        try:
            n = kabi.syscall(kabi.SYS_tee, src, w, capacity, kabi.SPLICE_F_NONBLOCK,
                             what=f"tee of pipe:[{ino}]")
        except OSError as e:
            if e.errno != errno.EAGAIN:  # EAGAIN: the pipe is empty
                raise
            n = 0
        data = os.read(r, n) if n else b""
        return capacity, data
    finally:
        for f in (src, r, w):
            os.close(f)


class Gatherer:
    """Builds LiveProcess objects for a seized tree, sharing what is shared."""

    def __init__(self, log):
        self.log = log
        self.files: dict[tuple, LiveFile] = {}    # (pid, fd) of the first holder -> file
        self.file_keys: list[tuple[int, int, LiveFile, tuple]] = []
        self.pipes: dict[int, LivePipe] = {}
        self.mapped: dict[tuple, LiveFile] = {}
        self.shmems: dict[tuple, LiveShmem] = {}  # (dev, inode) -> shared anonymous segment
        self.in_flight_fds: list[int] = []        # our fds of files in flight (SCM_RIGHTS)

    def close(self) -> None:
        """Close the fds of the files in flight (kept for kcmp while the tree is gathered)."""
        fds, self.in_flight_fds = self.in_flight_fds, []
        for fd in fds:
            os.close(fd)

    def __del__(self):
        self.close()

    def process(self, pid: int, tids: list[int]) -> LiveProcess:
        p = LiveProcess(pid)
        p.stat = proc.read_stat(pid)
        status = proc.read_status(pid)
        leader = tids[0] if pid not in tids else pid
        securebits = ptrace.inject_syscall(leader, kabi.SYS_prctl, kabi.PR_GET_SECUREBITS, 0, 0, 0, 0)
        p.cred = _cred(status, securebits)
        p.sighand = _handlers(leader)
        p.signal = SignalStruct(_rlimits(pid))
        p.signal.shared_pending = SigPending([_siginfo(r) for r in ptrace.peek_siginfo(leader, shared=True)])
        p.fs = LiveFs(proc.read_root(pid) or "/", proc.read_cwd(pid) or "/",
                      status.umask if status.umask is not None else 0o022)
        p.files = self._fdtable(pid)
        p.mm = self._mm(pid, p.stat)
        for tid in sorted(tids, key=lambda t: (t != pid, t)):
            p.threads.append(self._thread(p, tid))
        return p

    def zombie(self, pid: int) -> LiveProcess:
        p = LiveProcess(pid)
        p.zombie = True
        p.stat = proc.read_stat(pid)
        task = LiveTask(pid, p)
        task.state, task.comm = "zombie", p.stat.comm
        task.exit_code, task.exit_signal = p.stat.exit_code, p.stat.exit_signal
        p.threads.append(task)
        return p

    def _thread(self, p: LiveProcess, tid: int) -> LiveTask:
        t = LiveTask(tid, p)
        stat = proc.read_stat(tid) if tid == p.pid else p.stat
        t.comm = proc.read_comm(tid)          # each thread's own name (/proc/TID/comm)
        t.state = "stopped" if stat.state in ("T",) else "running"
        t.exit_signal = p.stat.exit_signal if tid == p.pid else -1
        regs = ptrace.get_regs(tid)
        in_syscall = ptrace.syscall_state(regs) is not None
        t.x86 = X86State(regs.as_dict(), ptrace.get_xstate(tid), int(in_syscall),
                         _rseq(tid))
        pending = SigPending([_siginfo(r) for r in ptrace.peek_siginfo(tid, shared=False)])
        t.sigstate = ThreadSignals(ptrace.get_sigmask(tid), pending, _altstack(tid))
        return t

    # -- files ------------------------------------------------------------------------------
    def _same_file(self, pid: int, fd: int, key: tuple) -> LiveFile | None:
        """The already-seen description that (pid, fd) shares, found with kcmp(KCMP_FILE)."""
        for other_pid, other_fd, file, other_key in self.file_keys:
            if other_key == key and kabi.syscall(kabi.SYS_kcmp, pid, other_pid, kabi.KCMP_FILE,
                                                 fd, other_fd, what="kcmp") == 0:
                return file
        return None

    def _fdtable(self, pid: int) -> LiveFdTable:
        entries = []
        for info in proc.read_fds(pid):
            key = (info.dev, info.ino, info.kind)
            file = self._same_file(pid, info.fd, key)
            if file is None:
                file = self._file(pid, info)
                self.file_keys.append((pid, info.fd, file, key))
            entries.append((info.fd, file, info.cloexec))
        return LiveFdTable(entries)

    def _file(self, pid: int, info: proc.FdInfo) -> LiveFile:
        flags = info.flags & ~os.O_CLOEXEC
        kind = info.kind
        if kind in (proc.FdKind.REGULAR, proc.FdKind.DIRECTORY):
            inode = None
            if info.deleted:
                inode = self._unlinked(pid, info)
            return LiveFile("regular" if kind is proc.FdKind.REGULAR else "dir", flags, info.pos,
                            info.path, inode=inode)
        if kind is proc.FdKind.CHAR_DEVICE and info.path in REOPENABLE_DEVICES:
            return LiveFile("regular", flags, 0, info.path, seekable=False)
        if kind in (proc.FdKind.PIPE, proc.FdKind.FIFO):
            pipe = self.pipes.get(info.ino)
            if pipe is None:
                capacity, data = _pipe_contents(pid, info.fd, info.ino)
                pipe = self.pipes[info.ino] = LivePipe(capacity, data, kind is proc.FdKind.FIFO)
            # an unlinked FIFO: its inode saved (no contents: the bytes are the pipe's)
            inode = (LiveInode(info.ino, "fifo", info.mode & 0o7777, b"")
                     if kind is proc.FdKind.FIFO and info.deleted else None)
            return LiveFile("pipe" if kind is proc.FdKind.PIPE else "fifo", flags, 0, info.path,
                            seekable=False, private=pipe, inode=inode)
        if kind is proc.FdKind.SOCKET:   # AF_UNIX; other families are refused there
            from .sockets import for_gatherer
            return for_gatherer(self).file(pid, info)
        raise Unsupported(f"task {pid}: fd {info.fd} is a {kind.value} ({info.target}), which the "
                          "live backend cannot checkpoint yet")

    def in_flight(self, fd: int, holder: int, where: str) -> LiveFile:
        """The File of a file in flight (SCM_RIGHTS) in a queue of task ``holder``, which a
        peek brought into this process as ``fd``: the same LiveFile as a task's fd on the same
        description (kcmp), else gathered as a task's fd would be. Takes ``fd`` over: it stays
        open until close(), so that fds of the tree met later are compared with it."""
        self.in_flight_fds.append(fd)
        me = os.getpid()
        info = proc.read_fd(me, fd)
        key = (info.dev, info.ino, info.kind)
        file = self._same_file(me, fd, key)
        if file is None:
            if info.kind is proc.FdKind.SOCKET:
                from .sockets import for_gatherer
                file = for_gatherer(self).file(me, info, seen_from=holder, where=where)
            else:
                try:
                    file = self._file(me, info)
                except Unsupported as e:
                    raise Unsupported(f"{where}: {e}") from None
            self.file_keys.append((me, fd, file, key))
        return file

    def _unlinked(self, pid: int, info: proc.FdInfo) -> LiveInode:
        with open(f"/proc/{pid}/fd/{info.fd}", "rb") as f:
            data = f.read(MAX_UNLINKED_CONTENTS + 1)
        if len(data) > MAX_UNLINKED_CONTENTS:
            raise Unsupported(f"task {pid}: fd {info.fd}: unlinked file larger than 1 GiB")
        return LiveInode(info.ino, "reg", info.mode & 0o7777, data)

    # -- memory ------------------------------------------------------------------------------
    def _mapped_file(self, pid: int, m) -> LiveFile:
        key = (m.dev, m.inode, m.path)
        file = self.mapped.get(key)
        if file is None:
            inode = self._unlinked_mapped(pid, m) if m.deleted else None
            file = self.mapped[key] = LiveFile("regular", os.O_RDONLY, 0, m.path, inode=inode)
        return file

    def _unlinked_mapped(self, pid: int, m) -> LiveInode:
        """The contents of a mapped file that was unlinked, read once through
        /proc/PID/map_files (the whole file: other mappings may show other parts). Pages of a
        shared mapping written through it are in the file; a private mapping's copied pages
        are saved with the mapping."""
        path = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(MAX_UNLINKED_CONTENTS + 1)
        except OSError as e:
            raise Unsupported(f"task {pid}: mapping {describe(m)} of a deleted file: its "
                              f"contents cannot be read through {path}: {e.strerror}") from None
        if len(data) > MAX_UNLINKED_CONTENTS:
            raise Unsupported(f"task {pid}: mapping {describe(m)}: deleted file larger than 1 GiB")
        return LiveInode(m.inode, "reg", mode & 0o7777, data)

    def _mm(self, pid: int, stat: proc.Stat) -> LiveMM:
        vmas = []
        for entry in proc.read_smaps(pid):
            cls = classify(entry)
            m = entry.mapping
            if cls.kind == VmaKind.UNSUPPORTED:
                raise Unsupported(f"task {pid}: mapping {describe(m)}: {cls.reason}")
            if cls.kind == VmaKind.SYSV_SHM:
                raise Unsupported(f"task {pid}: mapping {describe(m)}: a SysV shared memory "
                                  "segment (shmat), which the live backend cannot checkpoint yet")
            file = self._mapped_file(pid, m) if cls.kind in (VmaKind.FILE_PRIVATE, VmaKind.FILE_SHARED) else None
            vmas.append(LiveVMA(entry, file))
            if cls.kind == VmaKind.ANON_SHARED:
                self._shared_anon(pid, entry, vmas[-1])
        exe = proc.read_exe(pid)
        exe_file = None
        if exe:
            exe_file = next((f for f in self.mapped.values() if f.path == exe.removesuffix(" (deleted)")), None)
        mm = LiveMM(pid, stat, vmas, exe_file)
        mm.file_ids, mm.vdso_layout = elf_ids.mm_identities(pid, vmas, exe_file)
        return mm

    def _shared_anon(self, pid: int, entry, vma: LiveVMA) -> None:
        """A shared anonymous mapping names its segment: one LiveShmem per (dev, inode)."""
        m = entry.mapping
        seg = self.shmems.get((m.dev, m.inode))
        if seg is None:
            seg = self.shmems[(m.dev, m.inode)] = LiveShmem((m.dev, m.inode))
        seg.add(pid, entry)
        vma.shmem, vma.pgoff = seg, m.offset >> 12



def _register_with_kinds() -> None:
    """The kinds save these stand-ins with the same functions as the model objects."""
    from ckptsim.kinds import load_all
    from ckptsim.kinds.registry import BY_MODEL_TYPE, also_saves
    load_all()
    if LiveMM not in BY_MODEL_TYPE:
        for kind, t in (("mm", LiveMM), ("file", LiveFile), ("pipe", LivePipe), ("fs", LiveFs),
                        ("file_table", LiveFdTable)):
            also_saves(kind, t)
    if LiveShmem not in BY_MODEL_TYPE:
        also_saves("shmem", LiveShmem)


_register_with_kinds()

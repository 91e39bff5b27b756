"""Which pages of a live process were written since the last checkpoint, without soft-dirty
(this kernel has no CONFIG_MEM_SOFT_DIRTY): userfaultfd write-protection in asynchronous mode
plus the PAGEMAP_SCAN ioctl (Linux 6.7+).

Public API:

    WriteTracker(pid, tid=None, vmas=None, allow_seccomp=False, user_mode_only=None)
        Set up on a process whose thread ``tid`` (default: ``pid``) is in a ptrace stop of
        ours (backend.ptrace.seized). Leaves the target's fd table unchanged.
    .written_pages(reprotect=True) -> array('Q')   page addresses written since the last call
                                                   (or since setup), ascending; re-protects
                                                   them atomically unless reprotect=False
    .changed_vmas() -> VmaChanges(new, gone)       VMAs this tracker cannot vouch for
    .layout(vmas=None) -> Layout(ours, others)     the VMAs it protects now (one smaps read)
    .scan(layout.ours, reprotect, present) -> Scan(written, present)
                                                   the written pages and, with ``present``,
                                                   the present page runs, in one walk
    .untracked -> list[(Mapping, reason)]          private VMAs registration refused
    .close()                                       unregister; the target runs on unaffected

How. A userfaultfd belongs to the mm of the process that creates it, so ``userfaultfd()`` is
injected into the stopped target (retried with UFFD_USER_MODE_ONLY when the target may not
create a kernel-mode one), taken with pidfd_open + pidfd_getfd, and the target's copy closed by
a second injected call. Every later ioctl runs from here: the context acts on its own mm
whoever calls it (verified: API, REGISTER, UNREGISTER and the scans all work from another
process, stopped target or not). UFFDIO_API asks for UFFD_FEATURE_WP_ASYNC (required: the
kernel resolves write faults itself, nobody reads the fd, the target never blocks) and
WP_UNPOPULATED (taken when offered). Every private VMA of a kind the memory dump saves
(anonymous, [heap], [stack], private file; whatever its protection, so that a later mprotect
keeps it tracked) is registered in UFFDIO_REGISTER_MODE_WP.

Protection is applied by a PAGEMAP_SCAN with PM_SCAN_WP_MATCHING and no output vector, not by
UFFDIO_WRITEPROTECT of the whole range: that one allocates page tables for every unpopulated
part (measured here: a 16 GiB sparse mapping got 32 MiB of page tables and took 0.12 s; the
scan takes 0.1 ms and allocates none). Without an output vector the kernel's fast path protects
every PTE of the page tables that exist (a none PTE gets a uffd-wp marker: verified through
pagemap bit 57), while category_anyof PAGE_IS_PRESENT|PAGE_IS_SWAPPED keeps it out of page-table
holes. Nothing is lost in a hole: its first write creates a fresh anonymous page whose PTE has
no uffd-wp bit, which the scan reports as written like a protected page that took its fault.

``written_pages`` is PAGEMAP_SCAN with category_mask PAGE_IS_WRITTEN (and not PAGE_IS_FILE, not
PAGE_IS_PFNZERO, not PAGE_IS_GUARD), anyof PAGE_IS_PRESENT|PAGE_IS_SWAPPED, flags
PM_SCAN_WP_MATCHING|PM_SCAN_CHECK_WPASYNC: the written pages come back and are protected again
in one walk, so no write can fall between the two. ``scan(present=True)`` asks for every
populated page in the same walk (return_mask WRITTEN|PRESENT|SWAPPED; only the written ones
are re-protected), so a checkpoint gets its present runs without a second walk; a swapped
region that is not written may be uffd-wp markers, told apart by their pagemap entries
(``marker_runs``). Anonymous ranges are scanned without PAGE_IS_FILE (they hold no file
pages; asking costs the kernel a page lookup per PTE). The "present" condition is needed: this
kernel reports unpopulated page-table holes of a registered VMA as PAGE_IS_WRITTEN. Writes by
the kernel on the target's behalf (read() into a buffer) and by other processes
(process_vm_writev, /proc/PID/mem) are caught too: they fault the same way.

What the tracker cannot see, and reports through ``changed_vmas``: VMAs mapped after setup,
or moved by mremap (the kernel drops the uffd context of a moved VMA since we do not ask for
UFFD_FEATURE_EVENT_REMAP), or whose registration failed (another userfaultfd of the target
owns it, VM_DROPPABLE...) are ``new``: the incremental dump takes all of their pages. Registered
ranges no longer mapped by one of our VMAs are ``gone``. A VMA that grew (the stack) keeps the
registration and needs nothing. After an exec the old mm is gone: every VMA is new.

Known limits (documented, not detected): a page discarded with MADV_DONTNEED/MADV_FREE after
setup is not "written" (it now reads as zeros: compare the present set with the previous
image); a child forked after setup is not tracked (without UFFD_FEATURE_EVENT_FORK the kernel
clears the registration and the uffd-wp bits in the child: give it its own tracker), and its
copy-on-write writes are its own, not the parent's; under transparent huge pages a first write
into an unpopulated 2 MiB range can bring a whole huge page (512 pages reported written, all
but the written bytes zeros, which the dump drops).

The tracker's fd is O_CLOEXEC in this process. Closing it, even without close() (a crashed
checkpointer), releases the registration: the kernel clears it and the target runs on.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
from array import array
from dataclasses import dataclass, field
from typing import NamedTuple

from backend import kabi
from backend.memory_kinds import classify, describe, VmaKind
from backend.memory_pages import CHUNK_PAGES, PAGE_SHIFT, PAGE_SIZE, _page_addresses
from backend.proc import Mapping, SmapsEntry, read_smaps, read_status
from backend.ptrace import inject_syscall
from ckptsim.errors import CkptsimError

__all__ = ["DirtyTrackingError", "VmaChanges", "Layout", "Scan", "WriteTracker", "TRACKED_KINDS",
           "scan_regions", "marker_runs"]

# the VMA kinds whose pages a write can change privately (backend.memory_kinds)
TRACKED_KINDS = frozenset({VmaKind.ANON_PRIVATE, VmaKind.HEAP, VmaKind.STACK,
                           VmaKind.FILE_PRIVATE})
SCAN_VEC_LEN = 1024                     # page_region entries per PAGEMAP_SCAN call
_REGION_WORDS = ctypes.sizeof(kabi.page_region) // 8
_NOT_DUMPED = kabi.PAGE_IS_FILE | kabi.PAGE_IS_PFNZERO      # the file's or zeros
_POPULATED = kabi.PAGE_IS_PRESENT | kabi.PAGE_IS_SWAPPED
_scan_has_guard = [True]                # PAGE_IS_GUARD is Linux 6.14+: dropped on EINVAL


class DirtyTrackingError(CkptsimError, OSError):
    """Dirty tracking could not be set up or read; ``.errno`` is set, the message names the
    process."""

    def __init__(self, err: int, message: str):
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        return self.strerror


class VmaChanges(NamedTuple):
    """``new``: current VMAs of the tracked kinds that this tracker does not protect (mapped or
    moved after setup, or refused at registration): take all their pages. ``gone``: the
    [start, end) parts of the registered ranges that none of our VMAs maps any more."""
    new: list[Mapping]
    gone: list[tuple[int, int]]

    def __bool__(self) -> bool:
        return bool(self.new or self.gone)


class Layout(NamedTuple):
    """``ours``: [(start, end, file)] the current VMAs this tracker protects, merged per kind
    (``file``: a private file mapping, whose unwritten pages are the file's); ``others``: the
    tracked-kind VMAs it does not protect (VmaChanges.new)."""
    ours: list[tuple[int, int, bool]]
    others: list[Mapping]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return _merge((a, b) for a, b, _ in self.ours)


class Scan(NamedTuple):
    """One walk over a Layout's ranges: ``written`` page addresses (ascending) and, when asked,
    ``present``: the runs of pages worth saving there (present or swapped, uffd-wp markers
    excluded), as backend.memory's scan of those VMAs would give them."""
    written: array
    present: list[tuple[int, int]]


def scan_regions(fd: int, start: int, end: int, *, flags: int, mask: int, inverted: int,
                 anyof: int, return_mask: int, check_wpasync: bool = True) -> array:
    """PAGEMAP_SCAN of the pagemap ``fd`` over [start, end): the matching regions as flat
    (start, end, categories) triples, each page reported once (a full vector's walk_end can
    fall inside what it reported). PAGE_IS_GUARD is excluded when the kernel knows it
    (6.14+). ``check_wpasync``: EPERM if a VMA in the range is not registered for
    asynchronous write-protection. OSError from the ioctl."""
    if _scan_has_guard[0]:
        mask, inverted = mask | kabi.PAGE_IS_GUARD, inverted | kabi.PAGE_IS_GUARD
    vec = (kabi.page_region * SCAN_VEC_LEN)()
    arg = kabi.pm_scan_arg(
        size=ctypes.sizeof(kabi.pm_scan_arg),
        flags=flags | (kabi.PM_SCAN_CHECK_WPASYNC if check_wpasync else 0),
        start=start, end=end, vec=ctypes.addressof(vec), vec_len=SCAN_VEC_LEN,
        category_inverted=inverted, category_mask=mask | inverted,
        category_anyof_mask=anyof, return_mask=return_mask)
    out, words = array("Q"), array("Q")
    last_hi = start
    while arg.start < end:
        try:
            n = fcntl.ioctl(fd, kabi.PAGEMAP_SCAN, arg)
        except OSError as e:
            if e.errno == errno.EINVAL and _scan_has_guard[0]:
                _scan_has_guard[0] = False
                return scan_regions(fd, start, end, flags=flags, mask=mask & ~kabi.PAGE_IS_GUARD,
                                    inverted=inverted & ~kabi.PAGE_IS_GUARD, anyof=anyof,
                                    return_mask=return_mask, check_wpasync=check_wpasync)
            raise
        if n:
            # each call starts past what the last one reported, so only its first region
            # can overlap that (never seen; kept as a guard)
            del words[:]
            words.frombytes(memoryview(vec).cast("B")[:n * _REGION_WORDS * 8])
            words[0] = max(words[0], last_hi)
            out.extend(words if words[0] < words[1] else words[3:])
            last_hi = max(last_hi, words[-2])
        if arg.walk_end <= arg.start:       # no progress: never loop forever
            break
        arg.start = max(arg.walk_end, last_hi)
    return out


def _joined(starts, ends) -> list[tuple[int, int]]:
    """Sorted, disjoint [starts[i], ends[i]) with the adjacent ones joined."""
    if not starts:
        return []
    cut = [i for i, (lo, hi) in enumerate(zip(starts[1:], ends), 1) if lo != hi]
    return list(zip([starts[0]] + [starts[i] for i in cut],
                    [ends[i - 1] for i in cut] + [ends[-1]]))


def _extend_pages(out: array, lo: int, hi: int) -> None:
    for a in range(lo, hi, CHUNK_PAGES * PAGE_SIZE):
        out.frombytes(_page_addresses(a, (min(hi, a + CHUNK_PAGES * PAGE_SIZE) - a) >> PAGE_SHIFT))


# A uffd-wp PTE marker's pagemap entry: swapped (bit 62), not present (63), swap type >= 16
# (bit 4 of byte 0: types real swap areas never reach), swap offset < 8 (bits 8-54 clear;
# bit 55 is soft-dirty). Matched 8 bytes at a time, so a run of markers is one match.
_MARKER_ENTRY = re.compile(
    b"(?:[" + b"".join(re.escape(bytes([b])) for b in range(256) if b & 0x10) +
    b"]\\x00\\x00\\x00\\x00\\x00[\\x00\\x80][\\x40-\\x7f])+", re.DOTALL)


def marker_runs(entries: bytes, start: int) -> list[tuple[int, int]]:
    """The [start, end) runs of uffd-wp markers among ``entries`` (raw pagemap entries of the
    pages from ``start``): PAGEMAP_SCAN calls them swapped; such a page has no private copy.
    One regular-expression match per run of markers, none per page."""
    out, pos = [], 0
    while True:
        m = _MARKER_ENTRY.search(entries, pos)
        if m is None:
            return out
        s = m.start()
        if s % 8:                           # straddles two entries: not an entry of its own
            pos = s + 8 - s % 8
            continue
        out.append((start + (s >> 3) * PAGE_SIZE, start + (m.end() >> 3) * PAGE_SIZE))
        pos = m.end()


def _mapping(vma) -> Mapping:
    return vma.mapping if isinstance(vma, SmapsEntry) else vma


def _merge(ranges) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def _subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]):
    """``ranges`` minus ``holes`` (both sorted, merged)."""
    out = []
    for a, b in ranges:
        for h0, h1 in holes:
            if h1 <= a or h0 >= b:
                continue
            if h0 > a:
                out.append((a, h0))
            a = max(a, h1)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return out


def _overlaps(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(a < end and start < b for a, b in ranges)


@dataclass
class WriteTracker:
    pid: int
    tid: int | None = None
    vmas: list | None = field(default=None, repr=False)   # its smaps entries, if the caller
                                                          # has them (read_smaps)
    allow_seccomp: bool = False         # the caller seized with PTRACE_O_SUSPEND_SECCOMP
    user_mode_only: bool | None = None  # None: only if a plain userfaultfd() is refused
    registered: list[tuple[int, int]] = field(default_factory=list, init=False)
    registered_files: list[tuple[int, int]] = field(default_factory=list, init=False)
    untracked: list[tuple[Mapping, str]] = field(default_factory=list, init=False)
    features: int = field(default=0, init=False)
    _uffd: int | None = field(default=None, init=False, repr=False)
    _pagemap: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.pid = int(self.pid)
        self.tid = self.pid if self.tid is None else int(self.tid)
        try:
            self._check_seccomp()
            self._uffd = self._take_userfaultfd()
            self._pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._api()
            self._register(self.vmas if self.vmas is not None else read_smaps(self.pid))
            for a, b in self.registered:
                self._protect(a, b)
        except BaseException:
            self.close()
            raise
        self.vmas = None                # only needed at setup

    # -- handing a tracker to another process (backend/track.py's daemon) ----------------
    def detach_fds(self) -> tuple[int, int]:
        """Take the (userfaultfd, pagemap) fds out of this tracker without unregistering
        (close() would unregister the ranges in the userfaultfd context another process now
        shares); this tracker is closed afterwards."""
        fds = (self._uffd, self._pagemap)
        self._uffd = self._pagemap = None
        return fds

    def describe(self) -> dict:
        """What adopt() needs besides the fds (JSON-able)."""
        return {"pid": self.pid, "tid": self.tid, "user_mode_only": self.user_mode_only,
                "registered": self.registered, "registered_files": self.registered_files,
                "features": self.features}

    @classmethod
    def adopt(cls, meta: dict, uffd: int, pagemap: int) -> "WriteTracker":
        """A tracker over fds another process set up (``meta``: its describe())."""
        tracker = object.__new__(cls)
        tracker.pid, tracker.tid = int(meta["pid"]), int(meta["tid"])
        tracker.vmas, tracker.allow_seccomp = None, False
        tracker.user_mode_only = meta["user_mode_only"]
        tracker.registered = [tuple(r) for r in meta["registered"]]
        tracker.registered_files = [tuple(r) for r in meta.get("registered_files", [])]
        tracker.untracked, tracker.features = [], int(meta["features"])
        tracker._uffd, tracker._pagemap = uffd, pagemap
        return tracker

    # -- setup ---------------------------------------------------------------------------
    def _error(self, err: int, what: str) -> DirtyTrackingError:
        if not os.path.exists(f"/proc/{self.pid}"):
            err, what = errno.ESRCH, f"{what} (the process is gone)"
        return DirtyTrackingError(err, f"dirty tracking of process {self.pid}: {what}")

    def _check_seccomp(self) -> None:
        # seccomp (strict mode, or a filter) may kill the target on the injected userfaultfd()
        try:
            seccomp = read_status(self.pid).seccomp
        except OSError as e:
            raise self._error(e.errno or errno.ESRCH, "cannot read its status") from None
        if seccomp and not self.allow_seccomp:
            how = "in seccomp strict mode" if seccomp == 1 else "under a seccomp filter"
            raise self._error(errno.EPERM, f"it runs {how}, which may kill it on an injected "
                              "userfaultfd(); seize it with PTRACE_O_SUSPEND_SECCOMP and pass "
                              "allow_seccomp=True")

    def _take_userfaultfd(self) -> int:
        base = os.O_CLOEXEC | os.O_NONBLOCK
        try:
            target_fd = -errno.EPERM
            if not self.user_mode_only:
                target_fd = inject_syscall(self.tid, kabi.SYS_userfaultfd, base, check=False)
            # EPERM: no CAP_SYS_PTRACE and vm.unprivileged_userfaultfd=0
            if target_fd == -errno.EPERM and self.user_mode_only is not False:
                self.user_mode_only = True
                target_fd = inject_syscall(self.tid, kabi.SYS_userfaultfd,
                                           base | kabi.UFFD_USER_MODE_ONLY, check=False)
            elif self.user_mode_only is None:
                self.user_mode_only = False
        except OSError as e:
            raise self._error(e.errno or errno.EIO, f"cannot inject userfaultfd(): {e}") from None
        if target_fd < 0:
            raise self._error(-target_fd, f"userfaultfd() in the target failed: "
                              f"{os.strerror(-target_fd)}")
        pidfd = ours = None
        try:
            pidfd = kabi.syscall(kabi.SYS_pidfd_open, self.pid, 0, what="pidfd_open")
            ours = kabi.syscall(kabi.SYS_pidfd_getfd, pidfd, target_fd, 0, what="pidfd_getfd")
        except OSError as e:
            raise self._error(e.errno or errno.EIO, f"cannot take its userfaultfd: {e}") from None
        finally:
            if pidfd is not None:
                os.close(pidfd)
            try:                        # the target's fd table as it was
                inject_syscall(self.tid, kabi.SYS_close, target_fd)
            except OSError as e:
                if ours is not None:    # not handed back: ours would leak
                    os.close(ours)
                raise self._error(e.errno or errno.EIO, f"cannot close the injected "
                                  f"userfaultfd {target_fd} in the target: {e}") from None
        return ours

    def _api(self) -> None:
        want = kabi.UFFD_FEATURE_WP_ASYNC | kabi.UFFD_FEATURE_WP_UNPOPULATED
        for features in (want, kabi.UFFD_FEATURE_WP_ASYNC):
            api = kabi.uffdio_api(api=kabi.UFFD_API, features=features)
            try:
                fcntl.ioctl(self._uffd, kabi.UFFDIO_API, api)
            except OSError as e:
                if e.errno == errno.EINVAL and features != kabi.UFFD_FEATURE_WP_ASYNC:
                    continue            # UFFDIO_API may be tried once per context only on
                raise self._error(e.errno or errno.EIO,  # success; EINVAL leaves it unset
                                  f"UFFDIO_API: {os.strerror(e.errno or errno.EIO)} (the "
                                  "kernel lacks UFFD_FEATURE_WP_ASYNC, Linux 6.7+)") from None
            self.features = api.features
            return

    def _register(self, vmas) -> None:
        tracked = []
        for vma in vmas:
            m = _mapping(vma)
            kind = classify(vma).kind
            if not m.shared and kind in TRACKED_KINDS:
                tracked.append((m, kind == VmaKind.FILE_PRIVATE))
        for m, file in tracked:
            reg = kabi.uffdio_register(range=kabi.uffdio_range(m.start, m.end - m.start),
                                       mode=kabi.UFFDIO_REGISTER_MODE_WP)
            try:
                fcntl.ioctl(self._uffd, kabi.UFFDIO_REGISTER, reg)
            except OSError as e:
                why = {errno.EBUSY: "another userfaultfd of the process owns it"}.get(
                    e.errno, f"UFFDIO_REGISTER: {os.strerror(e.errno or errno.EIO)}")
                if e.errno in (errno.ESRCH, errno.ENOMEM) or not os.path.exists(
                        f"/proc/{self.pid}"):
                    raise self._error(e.errno or errno.EIO, f"registering {describe(m)}: "
                                      f"{why}") from None
                self.untracked.append((m, why))
                continue
            self.registered.append((m.start, m.end))
            if file:
                self.registered_files.append((m.start, m.end))
        self.registered = _merge(self.registered)
        self.registered_files = _merge(self.registered_files)

    def registered_layout(self) -> Layout:
        """The Layout as registration left it (no smaps read): valid until the target's next
        address-space change (mmap, munmap, mremap, mprotect, brk... or exec)."""
        files = self.registered_files
        ours = [(a, b, False) for a, b in _subtract(self.registered, files)]
        return Layout(sorted(ours + [(a, b, True) for a, b in files]),
                      [m for m, _ in self.untracked])

    # -- scanning ------------------------------------------------------------------------
    def _protect(self, start: int, end: int) -> None:
        """Write-protect every populated page of [start, end): PAGEMAP_SCAN with
        PM_SCAN_WP_MATCHING and no output vector (the kernel's fast path, see the module doc)."""
        mask = inverted = _NOT_DUMPED | (kabi.PAGE_IS_GUARD if _scan_has_guard[0] else 0)
        arg = kabi.pm_scan_arg(
            size=ctypes.sizeof(kabi.pm_scan_arg),
            flags=kabi.PM_SCAN_WP_MATCHING | kabi.PM_SCAN_CHECK_WPASYNC, start=start, end=end,
            vec=0, vec_len=0, category_inverted=inverted, category_mask=mask,
            category_anyof_mask=_POPULATED, return_mask=0)
        while arg.start < end:
            try:
                fcntl.ioctl(self._pagemap, kabi.PAGEMAP_SCAN, arg)
            except OSError as e:
                if e.errno == errno.EINVAL and _scan_has_guard[0]:
                    _scan_has_guard[0] = False
                    return self._protect(start, end)
                raise self._error(e.errno or errno.EIO, f"PAGEMAP_SCAN {start:#x}-{end:#x}: "
                                  f"{os.strerror(e.errno or errno.EIO)}") from None
            if arg.walk_end <= arg.start:   # no progress: never loop forever
                break
            arg.start = arg.walk_end

    def _mm_replaced(self) -> bool:
        """True when the mm we registered in is gone (an exec, or the process exited): our
        pagemap fd is bound to it and answers ESRCH."""
        arg = kabi.pm_scan_arg(size=ctypes.sizeof(kabi.pm_scan_arg), start=0, end=PAGE_SIZE,
                               vec=0, vec_len=0, flags=kabi.PM_SCAN_WP_MATCHING,
                               category_mask=kabi.PAGE_IS_WRITTEN, return_mask=0)
        try:
            fcntl.ioctl(self._pagemap, kabi.PAGEMAP_SCAN, arg)
        except OSError as e:
            return e.errno == errno.ESRCH
        return False

    def layout(self, vmas=None) -> Layout:
        """Which current VMAs this tracker protects (see Layout). ``vmas``: the target's smaps
        entries if the caller has just read them (only their VmFlags tell which VMAs are still
        registered); else smaps is read here."""
        self._require_open()
        if vmas is None:
            try:
                vmas = read_smaps(self.pid)
            except OSError as e:
                raise self._error(e.errno or errno.EIO, f"cannot read smaps: {e}") from None
        elif not all(isinstance(v, SmapsEntry) for v in vmas):
            raise self._error(errno.EINVAL, "vmas must be smaps entries (read_smaps): only "
                              "their VmFlags tell which VMAs are still registered")
        replaced = self._mm_replaced()
        ours: dict[bool, list] = {False: [], True: []}
        others = []
        for vma in vmas:
            m = _mapping(vma)
            kind = classify(vma).kind
            if m.shared or kind not in TRACKED_KINDS:
                continue
            if not replaced and "uw" in vma.vm_flags and \
                    _overlaps(self.registered, m.start, m.end):
                ours[kind == VmaKind.FILE_PRIVATE].append((m.start, m.end))
            else:
                others.append(m)
        return Layout(sorted((a, b, file) for file, ranges in ours.items()
                             for a, b in _merge(ranges)), others)

    def scan(self, ours, reprotect: bool = True, present: bool = False) -> Scan:
        """One PAGEMAP_SCAN walk per range of ``ours`` (Layout.ours): the pages written since
        setup or the last reprotecting scan, protected again in the same walk with
        ``reprotect``; with ``present``, the present runs there too (see Scan)."""
        self._require_open()
        written, runs, maybe_markers = array("Q"), [], []
        flags = kabi.PM_SCAN_WP_MATCHING if reprotect else 0
        want = kabi.PAGE_IS_WRITTEN | (_POPULATED if present else 0)
        for a, b, file in ours:
            # an anonymous VMA holds no file pages: not asking for PAGE_IS_FILE spares the
            # kernel a page lookup per PTE (measured: a 1 GiB walk 16-20 ms -> 4 ms)
            inverted = _NOT_DUMPED if file else kabi.PAGE_IS_PFNZERO
            try:
                regions = scan_regions(self._pagemap, a, b, flags=flags,
                                       mask=0 if present else kabi.PAGE_IS_WRITTEN,
                                       inverted=inverted, anyof=_POPULATED, return_mask=want)
            except OSError as e:
                raise self._error(e.errno or errno.EIO, f"PAGEMAP_SCAN {a:#x}-{b:#x}: "
                                  f"{os.strerror(e.errno or errno.EIO)}") from None
            # whole lists at a time: thousands of regions (mostly single written pages)
            regions = list(zip(regions[0::3], regions[1::3], regions[2::3]))
            runs_written = [(lo, hi) for lo, hi, cat in regions if cat & kabi.PAGE_IS_WRITTEN]
            if all(hi - lo <= 16 * PAGE_SIZE for lo, hi in runs_written):
                written.extend([a for lo, hi in runs_written for a in range(lo, hi, PAGE_SIZE)])
            else:
                for lo, hi in runs_written:
                    _extend_pages(written, lo, hi)
            if present:
                kept = kabi.PAGE_IS_PRESENT | kabi.PAGE_IS_WRITTEN
                runs += [(lo, hi) for lo, hi, cat in regions if cat & kept]
                # swapped and protected: swapped out, or a uffd-wp marker
                maybe_markers += [(lo, hi) for lo, hi, cat in regions if not cat & kept]
        if maybe_markers:           # disjoint from runs: sorting is all a merge needs
            runs = sorted(runs + _subtract(maybe_markers, self._markers(maybe_markers)))
        return Scan(written, _joined([lo for lo, _ in runs], [hi for _, hi in runs]))

    def _markers(self, runs) -> list[tuple[int, int]]:
        out = []
        for lo, hi in runs:
            try:
                raw = os.pread(self._pagemap, ((hi - lo) >> PAGE_SHIFT) * 8,
                               (lo >> PAGE_SHIFT) * 8)
            except OSError as e:
                raise self._error(e.errno or errno.EIO, f"reading pagemap: {e}") from None
            out.extend(marker_runs(raw, lo))
        return out

    def written_pages(self, reprotect: bool = True, vmas=None, layout: Layout | None = None
                      ) -> array:
        """The addresses of the pages written since setup or the last reprotecting call, in
        ascending order (an array('Q')); with ``reprotect`` they are protected again in the
        same walk. Pages of ``changed_vmas().new`` are not included: take them whole.
        ``vmas``: the target's current smaps entries, if the caller has just read them;
        ``layout``: this tracker's Layout, if the caller has it."""
        return self.scan((layout or self.layout(vmas)).ours, reprotect).written

    def changed_vmas(self, vmas=None, layout: Layout | None = None) -> VmaChanges:
        """What the registered layout no longer covers (see VmaChanges)."""
        layout = layout or self.layout(vmas)
        return VmaChanges(new=layout.others, gone=_subtract(self.registered, layout.ranges))

    # -- teardown ------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._uffd is None:
            raise DirtyTrackingError(errno.EBADF, f"dirty tracking of process {self.pid} "
                                     "is closed")

    def close(self) -> None:
        """Unregister every range (the kernel clears the uffd-wp state: later writes are plain
        writes) and close our fds. Needs no stop: the target may be running. Idempotent;
        a target that has exited or exec'd is fine."""
        uffd, self._uffd = self._uffd, None
        if uffd is not None:
            try:
                for a, b in self.registered:
                    try:
                        fcntl.ioctl(uffd, kabi.UFFDIO_UNREGISTER, kabi.uffdio_range(a, b - a))
                    except OSError:     # gone or remapped: the release below clears the rest
                        pass
            finally:
                os.close(uffd)
        pagemap, self._pagemap = self._pagemap, None
        if pagemap is not None:
            os.close(pagemap)

    def __enter__(self) -> "WriteTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

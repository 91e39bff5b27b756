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
in one walk, so no write can fall between the two. The "present" condition is needed: this
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
from array import array
from dataclasses import dataclass, field
from typing import NamedTuple

from backend import kabi
from backend.memory_kinds import classify, describe, VmaKind
from backend.memory_pages import CHUNK_PAGES, PAGE_SHIFT, PAGE_SIZE, _page_addresses
from backend.proc import Mapping, SmapsEntry, read_smaps, read_status
from backend.ptrace import inject_syscall
from ckptsim.errors import CkptsimError

__all__ = ["DirtyTrackingError", "VmaChanges", "WriteTracker", "TRACKED_KINDS"]

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
                self._scan(a, b, kabi.PM_SCAN_WP_MATCHING, 0, _NOT_DUMPED, _POPULATED,
                           collect=False)
        except BaseException:
            self.close()
            raise
        self.vmas = None                # only needed at setup

    # -- setup ---------------------------------------------------------------------------
    def _error(self, err: int, what: str) -> DirtyTrackingError:
        if not os.path.exists(f"/proc/{self.pid}"):
            err, what = errno.ESRCH, f"{what} (the process is gone)"
        return DirtyTrackingError(err, f"dirty tracking of process {self.pid}: {what}")

    def _check_seccomp(self) -> None:
        # a seccomp filter may kill the target on the injected userfaultfd()
        try:
            seccomp = read_status(self.pid).seccomp
        except OSError as e:
            raise self._error(e.errno or errno.ESRCH, "cannot read its status") from None
        if seccomp == 2 and not self.allow_seccomp:
            raise self._error(errno.EPERM, "it runs under a seccomp filter that may kill it "
                              "on an injected userfaultfd(); seize it with "
                              "PTRACE_O_SUSPEND_SECCOMP and pass allow_seccomp=True")

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
        pidfd = None
        try:
            pidfd = kabi.syscall(kabi.SYS_pidfd_open, self.pid, 0, what="pidfd_open")
            return kabi.syscall(kabi.SYS_pidfd_getfd, pidfd, target_fd, 0, what="pidfd_getfd")
        except OSError as e:
            raise self._error(e.errno or errno.EIO, f"cannot take its userfaultfd: {e}") from None
        finally:
            if pidfd is not None:
                os.close(pidfd)
            try:                        # the target's fd table as it was
                inject_syscall(self.tid, kabi.SYS_close, target_fd)
            except OSError as e:
                raise self._error(e.errno or errno.EIO, f"cannot close the injected "
                                  f"userfaultfd {target_fd} in the target: {e}") from None

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
            if not m.shared and classify(vma).kind in TRACKED_KINDS:
                tracked.append(m)
        for m in tracked:
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
        self.registered = _merge(self.registered)

    # -- scanning ------------------------------------------------------------------------
    def _scan(self, start: int, end: int, flags: int, mask: int, inverted: int, anyof: int,
              collect: bool = True) -> array:
        """PAGEMAP_SCAN over [start, end) with PM_SCAN_CHECK_WPASYNC; the matching pages as
        an array('Q') when ``collect`` (built per run, never per page)."""
        out = array("Q")
        if _scan_has_guard[0]:
            mask |= kabi.PAGE_IS_GUARD
            inverted |= kabi.PAGE_IS_GUARD
        vec = (kabi.page_region * (SCAN_VEC_LEN if collect else 1))()
        arg = kabi.pm_scan_arg(
            size=ctypes.sizeof(kabi.pm_scan_arg), flags=flags | kabi.PM_SCAN_CHECK_WPASYNC,
            start=start, end=end, vec=ctypes.addressof(vec) if collect else 0,
            vec_len=SCAN_VEC_LEN if collect else 0, category_inverted=inverted,
            category_mask=mask | inverted, category_anyof_mask=anyof,
            return_mask=kabi.PAGE_IS_WRITTEN if collect else 0)
        words = array("Q")
        last_hi = start
        while arg.start < end:
            try:
                n = fcntl.ioctl(self._pagemap, kabi.PAGEMAP_SCAN, arg)
            except OSError as e:
                if e.errno == errno.EINVAL and _scan_has_guard[0]:
                    _scan_has_guard[0] = False
                    return self._scan(start, end, flags, mask & ~kabi.PAGE_IS_GUARD,
                                      inverted & ~kabi.PAGE_IS_GUARD, anyof, collect)
                raise self._error(e.errno or errno.EIO, f"PAGEMAP_SCAN {start:#x}-{end:#x}: "
                                  f"{os.strerror(e.errno or errno.EIO)}") from None
            if collect and n:
                del words[:]
                words.frombytes(memoryview(vec).cast("B")[:n * _REGION_WORDS * 8])
                for lo, hi in zip(words[0::_REGION_WORDS], words[1::_REGION_WORDS]):
                    lo = max(lo, last_hi)         # a full vector's walk_end can fall inside
                    last_hi = max(last_hi, hi)    # what it reported: never report it twice
                    for a in range(lo, hi, CHUNK_PAGES * PAGE_SIZE):
                        out.frombytes(_page_addresses(
                            a, (min(hi, a + CHUNK_PAGES * PAGE_SIZE) - a) >> PAGE_SHIFT))
            if arg.walk_end <= arg.start:   # no progress: never loop forever
                break
            arg.start = max(arg.walk_end, last_hi)
        return out

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

    def _layout(self, vmas=None) -> tuple[list[tuple[int, int]], list[Mapping]]:
        """(the ranges of the current VMAs we protect, the tracked-kind VMAs we do not)."""
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
        ours, others = [], []
        for vma in vmas:
            m = _mapping(vma)
            if m.shared or classify(vma).kind not in TRACKED_KINDS:
                continue
            flags = vma.vm_flags if isinstance(vma, SmapsEntry) else frozenset()
            if not replaced and "uw" in flags and _overlaps(self.registered, m.start, m.end):
                ours.append((m.start, m.end))
            else:
                others.append(m)
        return _merge(ours), others

    def written_pages(self, reprotect: bool = True, vmas=None) -> array:
        """The addresses of the pages written since setup or the last reprotecting call, in
        ascending order (an array('Q')); with ``reprotect`` they are protected again in the
        same walk. Pages of ``changed_vmas().new`` are not included: take them whole.
        ``vmas``: the target's current smaps entries, if the caller has just read them."""
        ours, _ = self._layout(vmas)
        out = array("Q")
        flags = kabi.PM_SCAN_WP_MATCHING if reprotect else 0
        for a, b in ours:
            out.extend(self._scan(a, b, flags, kabi.PAGE_IS_WRITTEN, _NOT_DUMPED, _POPULATED))
        return out

    def changed_vmas(self, vmas=None) -> VmaChanges:
        """What the registered layout no longer covers (see VmaChanges)."""
        ours, others = self._layout(vmas)
        return VmaChanges(new=others, gone=_subtract(self.registered, ours))

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

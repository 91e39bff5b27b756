"""Which kernel features the live backend can use here: ``probe()`` tries each one for real.

Each probe exercises the feature on something it owns (a short-lived forked child, its own
memory, its own fds, a cgroup it creates and removes) and never raises: a failing probe is a
missing feature whose ``detail`` names the errno. Nothing is left behind (the child is killed
and reaped, fds are closed, probe cgroups are removed). All probes together take well under a
second.

    probe() -> list[Feature]
    probed() -> list[Feature]                 probe(), once per process (cached)
    require_must_haves(features) -> None      raises MissingFeatures naming what is missing
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

from ckptsim.errors import CkptsimError

from . import kabi, runcache

__all__ = ["Feature", "MissingFeatures", "probe", "probed", "require_must_haves", "MUST_HAVE",
           "format_table"]

MUST_HAVE = ("ptrace", "process_vm_readv", "pagemap")

# what a missing feature turns off
DISABLES = {
    "ptrace": "live checkpoint: seizing the tree, registers/FPU/sigmask, syscall injection",
    "process_vm_readv": "live checkpoint: bulk memory reads",
    "pagemap": "live checkpoint: choosing the present/anonymous pages to dump",
    "pagemap_scan": "fast page selection (falls back to reading pagemap entries) and "
                    "write-protect dirty tracking",
    "uffd_wp_async": "dirty-page tracking (this kernel has no soft-dirty)",
    "bpf": "live dirty-page collection with an eBPF tracepoint program",
    "btf": "CO-RE eBPF programs (vmlinux BTF)",
    "tracefs": "attaching eBPF programs to tracepoints by name",
    "bpf_tracker": "the eBPF tracker (bcc): incremental dumps fall back to full ones",
    "unix_embryo": "checkpoint of a listener whose not yet accepted connection holds data "
                   "(the BPF iterator over unix sockets reads it; without it such a listener "
                   "is refused)",
    "kcmp": "finding files, mm, fs and sighand shared by several tasks",
    "pidfd_getfd": "taking a target's fds (uffd, pipe and socket queues) into the checkpointer",
    "clone3_set_tid": "restart with the original pids",
    "freezer_v1": "--freezer on a cgroup v1 hierarchy",
    "freezer_v2": "--freezer on cgroup v2 (cgroup.freeze)",
}


@dataclass(frozen=True)
class Feature:
    name: str
    present: bool
    detail: str
    must_have: bool
    disables: str


class MissingFeatures(CkptsimError):
    """A live checkpoint cannot run: one or more must-have kernel features are missing."""

    def __init__(self, missing: list[Feature]):
        self.missing = missing
        parts = [f"{f.name} ({f.detail})" for f in missing]
        super().__init__("live checkpoint needs kernel features that are missing here: "
                         + "; ".join(parts) + " (run `ckptsim check`)")


def _errdetail(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno:
        name = errno.errorcode.get(e.errno, str(e.errno))
        return f"{name}: {os.strerror(e.errno)}"
    return f"{type(e).__name__}: {e}"


# --- a short-lived child shared by the probes that need another process ---------------------

class _Child:
    """A forked child that blocks reading a pipe; killed and reaped on exit. It carries a
    marker buffer (at the same address as ours, fork copies it) for process_vm_readv."""

    MARK = b"ckptsim feature probe \x00\x01\x02\xff"

    def __init__(self):
        self.marker = ctypes.create_string_buffer(self.MARK, len(self.MARK))
        self.r, self.w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:                           # the child: only async-signal-safe calls
            try:
                os.close(self.w)
                os.read(self.r, 1)
            finally:
                os._exit(0)

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, kabi.WALL)


# --- the probes: each returns (present, detail) or raises --------------------------------------

def _probe_ptrace(child: _Child) -> tuple[bool, str]:
    pid = child.pid
    kabi.syscall(kabi.SYS_ptrace, kabi.PTRACE_SEIZE, pid, 0, 0, what=f"PTRACE_SEIZE {pid}")
    try:
        kabi.syscall(kabi.SYS_ptrace, kabi.PTRACE_INTERRUPT, pid, 0, 0, what="PTRACE_INTERRUPT")
        deadline = time.monotonic() + 1.0
        while True:
            wpid, status = os.waitpid(pid, os.WNOHANG | kabi.WALL)
            if wpid:
                break
            if time.monotonic() > deadline:
                return False, "PTRACE_INTERRUPT: the child did not stop within 1 s"
            time.sleep(0.001)
        if not os.WIFSTOPPED(status):
            return False, f"the seized child did not stop (wait status {status:#x})"
        kabi.syscall(kabi.SYS_ptrace, kabi.PTRACE_DETACH, pid, 0, 0, what="PTRACE_DETACH")
    except BaseException:
        # never leave the child traced: killing it ends the trace (close() reaps it)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise
    return True, "PTRACE_SEIZE, PTRACE_INTERRUPT and PTRACE_DETACH on a child"


def _probe_process_vm_readv(child: _Child) -> tuple[bool, str]:
    n = len(child.MARK)
    buf = ctypes.create_string_buffer(n)
    local = kabi.iovec(ctypes.cast(buf, ctypes.c_void_p), n)
    remote = kabi.iovec(ctypes.addressof(child.marker), n)
    got = kabi.syscall(kabi.SYS_process_vm_readv, child.pid, ctypes.byref(local), 1,
                       ctypes.byref(remote), 1, 0, what="process_vm_readv")
    if got != n or buf.raw != child.MARK:
        return False, f"process_vm_readv returned {got} bytes that differ from the child's"
    return True, f"read {n} bytes of a child's memory"


def _probe_pagemap() -> tuple[tuple[bool, str], tuple[bool, str]]:
    """(pagemap, pagemap_scan) from one read-write anonymous mapping of ours."""
    npages = 4
    m = mmap.mmap(-1, npages * mmap.PAGESIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m[0:1] = b"x"                                   # page 0 present, pages 1..3 not
        m[2 * mmap.PAGESIZE:2 * mmap.PAGESIZE + 1] = b"y"   # page 2 present
        anchor = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(anchor)
        del anchor
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                entries = os.pread(fd, 8 * npages, (addr // mmap.PAGESIZE) * 8)
                present = [bool(int.from_bytes(entries[i * 8:i * 8 + 8], "little")
                                & kabi.PM_PRESENT) for i in range(npages)]
                if present == [True, False, True, False]:
                    pm = (True, "the present bits of 4 pages of ours are right")
                else:
                    pm = (False, f"present bits {present}, expected [T, F, T, F]")
            except OSError as e:
                pm = (False, _errdetail(e))
            try:
                scan = _pagemap_scan(fd, addr, npages)
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOTTY):
                    scan = (False, f"{_errdetail(e)} (the kernel has no PAGEMAP_SCAN)")
                else:
                    scan = (False, _errdetail(e))
        finally:
            os.close(fd)
    finally:
        m.close()
    return pm, scan


def _pagemap_scan(fd: int, addr: int, npages: int) -> tuple[bool, str]:
    vec = (kabi.page_region * npages)()
    arg = kabi.pm_scan_arg(size=ctypes.sizeof(kabi.pm_scan_arg), flags=0, start=addr,
                           end=addr + npages * mmap.PAGESIZE, vec=ctypes.addressof(vec),
                           vec_len=npages, category_mask=kabi.PAGE_IS_PRESENT,
                           return_mask=kabi.PAGE_IS_PRESENT)
    n = kabi.syscall(kabi.SYS_ioctl, fd, kabi.PAGEMAP_SCAN, ctypes.byref(arg), what="PAGEMAP_SCAN")
    got = [((vec[i].start - addr) // mmap.PAGESIZE, (vec[i].end - addr) // mmap.PAGESIZE)
           for i in range(n)]
    if got != [(0, 1), (2, 3)]:
        return False, f"PAGEMAP_SCAN found present page ranges {got}, expected [(0, 1), (2, 3)]"
    return True, "PAGEMAP_SCAN found exactly our present pages"


def _probe_uffd_wp() -> tuple[bool, str]:
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = kabi.syscall(kabi.SYS_userfaultfd, flags | kabi.UFFD_USER_MODE_ONLY, what="userfaultfd")
    except OSError as e:
        if e.errno != errno.EINVAL:                     # EINVAL: no UFFD_USER_MODE_ONLY (< 5.11)
            raise
        fd = kabi.syscall(kabi.SYS_userfaultfd, flags, what="userfaultfd")
    try:
        want = kabi.UFFD_FEATURE_WP_ASYNC | kabi.UFFD_FEATURE_WP_UNPOPULATED
        api = kabi.uffdio_api(api=kabi.UFFD_API, features=want)
        kabi.syscall(kabi.SYS_ioctl, fd, kabi.UFFDIO_API, ctypes.byref(api),
                     what="UFFDIO_API with WP_ASYNC|WP_UNPOPULATED")
        if api.features & want != want:
            return False, f"UFFDIO_API answered features {api.features:#x} without WP_ASYNC"
    finally:
        os.close(fd)
    return True, "UFFDIO_API accepted UFFD_FEATURE_WP_ASYNC|WP_UNPOPULATED"


def _probe_bpf() -> tuple[bool, str]:
    prog = ctypes.create_string_buffer(kabi.BPF_PROG_RETURN_ZERO, len(kabi.BPF_PROG_RETURN_ZERO))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = kabi.bpf_attr_prog_load(
        prog_type=kabi.BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt=len(kabi.BPF_PROG_RETURN_ZERO) // kabi.BPF_INSN_SIZE,
        insns=ctypes.addressof(prog), license=ctypes.addressof(lic))
    fd = kabi.syscall(kabi.SYS_bpf, kabi.BPF_PROG_LOAD, ctypes.byref(attr),
                      ctypes.sizeof(attr), what="bpf(BPF_PROG_LOAD)")
    os.close(fd)
    return True, "bpf(BPF_PROG_LOAD) loaded a 2-instruction program"


def _probe_btf() -> tuple[bool, str]:
    path = "/sys/kernel/btf/vmlinux"
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic not in (b"\x9f\xeb", b"\xeb\x9f"):
        return False, f"{path} has no BTF magic"
    return True, f"{path} ({size // 1024} KiB)"


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, options) from /proc/self/mounts."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            p = line.split()
            if len(p) >= 4:
                out.append((p[1].replace("\\040", " "), p[2], p[3]))
    return out


def _probe_tracefs() -> tuple[bool, str]:
    for point, fstype, _ in _mounts():
        if fstype == "tracefs" and point == "/sys/kernel/tracing":
            if os.path.isdir(os.path.join(point, "events")):
                return True, "tracefs mounted at /sys/kernel/tracing"
    return False, ("tracefs is not mounted at /sys/kernel/tracing "
                   "(mount -t tracefs nodev /sys/kernel/tracing)")


def _probe_bpf_tracker() -> tuple[bool, str]:
    # its prerequisites only (root, bcc, headers, tracepoints): compiling takes 0.3-1 s
    from . import bpf_tracker
    present, detail = bpf_tracker.available()
    return present, (detail + " (not compiled by this check)") if present else detail


def _probe_unix_embryo() -> tuple[bool, str]:
    # its prerequisites only (root, bcc, headers, BTF): compiling takes ~0.4 s
    from . import unix_embryo
    present, detail = unix_embryo.available()
    return present, (detail + " (not compiled by this check)") if present else detail


def _probe_kcmp(child: _Child) -> tuple[bool, str]:
    me = os.getpid()
    a = os.dup(child.r)
    try:
        same = kabi.syscall(kabi.SYS_kcmp, me, me, kabi.KCMP_FILE, child.r, a, what="kcmp")
        diff = kabi.syscall(kabi.SYS_kcmp, me, me, kabi.KCMP_FILE, child.r, child.w, what="kcmp")
        # the child inherited our read end across fork: the same open file description
        cross = kabi.syscall(kabi.SYS_kcmp, me, child.pid, kabi.KCMP_FILE, child.r, child.r,
                             what="kcmp with the child")
    finally:
        os.close(a)
    if same != 0 or diff == 0 or cross != 0:
        return False, f"kcmp answered {same}, {diff}, {cross}; expected 0, non-zero, 0"
    return True, "KCMP_FILE on a dup'ed fd, another fd and a child's inherited fd"


def _probe_pidfd_getfd(child: _Child) -> tuple[bool, str]:
    pidfd = os.pidfd_open(child.pid)
    try:
        got = kabi.syscall(kabi.SYS_pidfd_getfd, pidfd, child.r, 0, what="pidfd_getfd")
        try:
            ok = os.fstat(got).st_ino == os.fstat(child.r).st_ino
        finally:
            os.close(got)
    finally:
        os.close(pidfd)
    if not ok:
        return False, "pidfd_getfd returned a different file"
    return True, "pidfd_open + pidfd_getfd took a child's fd"


def _probe_clone3_set_tid() -> tuple[bool, str]:
    # Ask for pid 1, which always exists in our pid namespace: a kernel that honours set_tid
    # (with CAP_CHECKPOINT_RESTORE) fails with EEXIST and creates nothing; one without set_tid
    # rejects the larger struct (E2BIG) or clone3 itself (ENOSYS); EPERM: no capability.
    tids = (ctypes.c_int32 * 1)(1)
    args = kabi.clone_args(exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tids),
                           set_tid_size=1)
    try:
        ret = kabi.syscall(kabi.SYS_clone3, ctypes.byref(args), ctypes.sizeof(args), what="clone3")
    except OSError as e:
        if e.errno == errno.EEXIST:
            return True, "clone3 honours set_tid (asking for pid 1 gave EEXIST)"
        if e.errno == errno.EPERM:
            return False, f"{_errdetail(e)} (set_tid needs CAP_CHECKPOINT_RESTORE)"
        raise
    if ret == 0:                                       # pragma: no cover - cannot happen
        os._exit(127)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(ret, 0)
    return False, f"clone3 with set_tid=[1] created pid {ret} (killed): set_tid was ignored"


def _probe_freezer_v1() -> tuple[bool, str]:
    points = [p for p, t, opts in _mounts() if t == "cgroup" and "freezer" in opts.split(",")]
    if not points:
        return False, "no cgroup v1 hierarchy with the freezer controller is mounted"
    return _probe_cgroup_dir(points[0], "freezer.state")


def _probe_freezer_v2() -> tuple[bool, str]:
    points = [p for p, t, _ in _mounts() if t == "cgroup2"]
    if not points:
        return False, "no cgroup2 hierarchy is mounted"
    return _probe_cgroup_dir(points[0], "cgroup.freeze")


def _probe_cgroup_dir(root: str, control: str) -> tuple[bool, str]:
    """Create a probe cgroup under ``root``, check it has ``control``, remove it."""
    d = os.path.join(root, f"ckptsim-probe-{os.getpid()}")
    os.mkdir(d)
    try:
        if not os.path.exists(os.path.join(d, control)):
            return False, f"a new cgroup under {root} has no {control}"
    finally:
        os.rmdir(d)
    return True, f"{control} in a new cgroup under {root}"


# --- driver -------------------------------------------------------------------------------

def _run(name: str, fn: Callable[[], tuple[bool, str]]) -> Feature:
    try:
        present, detail = fn()
    except Exception as e:          # a probe never raises: a failure is a missing feature
        present, detail = False, _errdetail(e)
    return Feature(name, present, detail, name in MUST_HAVE, DISABLES[name])


def probe(names=None) -> list[Feature]:
    """Probe every feature the live backend may use (or those in ``names``), in a fixed
    order. Only what is asked for is probed: the eBPF tracker's probe imports bcc, which maps
    ~60 MiB of LLVM and costs ~40 ms, and a plain checkpoint needs only the must-haves."""
    wanted = set(DISABLES if names is None else names)
    child: _Child | None = None
    child_err = ""
    if wanted & {"ptrace", "process_vm_readv", "kcmp", "pidfd_getfd"}:
        try:
            child = _Child()
        except OSError as e:
            child_err = f"could not fork a probe child: {_errdetail(e)}"
    pagemap: list = []

    def with_child(fn):
        def run():
            if child is None:
                return False, child_err
            return fn(child)
        return run

    def from_pagemap(index):
        def run():
            if not pagemap:
                try:
                    pagemap.extend(_probe_pagemap())
                except Exception as e:
                    pagemap.extend([(False, _errdetail(e))] * 2)
            return pagemap[index]
        return run

    probes = [("ptrace", with_child(_probe_ptrace)),
              ("process_vm_readv", with_child(_probe_process_vm_readv)),
              ("pagemap", from_pagemap(0)), ("pagemap_scan", from_pagemap(1)),
              ("uffd_wp_async", _probe_uffd_wp), ("bpf", _probe_bpf), ("btf", _probe_btf),
              ("tracefs", _probe_tracefs), ("bpf_tracker", _probe_bpf_tracker),
              ("unix_embryo", _probe_unix_embryo),
              ("kcmp", with_child(_probe_kcmp)), ("pidfd_getfd", with_child(_probe_pidfd_getfd)),
              ("clone3_set_tid", _probe_clone3_set_tid), ("freezer_v1", _probe_freezer_v1),
              ("freezer_v2", _probe_freezer_v2)]
    try:
        return [_run(name, fn) for name, fn in probes if name in wanted]
    finally:
        if child is not None:
            child.close()


_probed: dict = {}          # names (None: all) -> (the probe function, its result)


def probed(names=None) -> list[Feature]:
    """``probe(names)``, run once per process: what the kernel offers cannot change while
    this process runs (a checkpoint calls this every time; probing forks a child). Only a
    result with every must-have it holds present is kept (a missing one may be transient, a
    failed fork); a replaced ``probe`` (tests monkeypatch it) is probed anew."""
    key = None if names is None else tuple(names)
    cached = _probed.get(key)
    if cached is not None and cached[0] is probe:
        return list(cached[1])
    found = probe() if names is None else probe(key)
    if all(f.present for f in found if f.must_have):
        _probed[key] = (probe, tuple(found))
    return found


MUST_HAVES_FILE = "must-haves.json"       # in backend.runcache.cache_dir()


def _must_have_key() -> list:
    """What the must-haves' presence depends on: the kernel (this boot), the caller and the
    ptrace policy (Yama)."""
    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None
    return [read("/proc/sys/kernel/random/boot_id"), os.uname().release, os.geteuid(),
            read("/proc/sys/kernel/yama/ptrace_scope")]


def require_must_haves(features: list[Feature] | None = None) -> None:
    """Raise MissingFeatures if a must-have feature is missing (the process's ``probed()``
    result if not given). A checkpoint is a fresh process each time and the probe forks,
    seizes and kills a child (~3-5 ms): a probe that found them all is remembered for the
    boot, the caller and the ptrace policy (backend.runcache). Should one go missing even so,
    the checkpoint fails with its errno at its own seize (nothing stopped yet) or read (the
    tree is released, as on any error)."""
    if features is None:
        key = _must_have_key()
        if key[0] is not None and runcache.load(MUST_HAVES_FILE) == {"present": key}:
            return
        features = probed(MUST_HAVE)
        if all(f.present for f in features if f.must_have) and key[0] is not None:
            runcache.save(MUST_HAVES_FILE, {"present": key})
    missing = [f for f in features if f.must_have and not f.present]
    if missing:
        raise MissingFeatures(missing)


def format_table(features: list[Feature]) -> str:
    """The `ckptsim check` table: feature, present/missing, detail, what a missing one disables."""
    rows = [("feature", "status", "detail", "a missing one disables")]
    for f in features:
        status = "present" if f.present else ("MISSING" if f.must_have else "missing")
        rows.append((f.name + (" *" if f.must_have else ""), status, f.detail,
                     f.disables))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip() for r in rows]
    lines.append("(* = must have for a live checkpoint)")
    return "\n".join(lines)

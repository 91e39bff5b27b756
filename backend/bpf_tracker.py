"""The eBPF tracker: what tracked process trees did since the last checkpoint, collected live
by the tracepoint programs of ``bpf/tracker.c`` (loaded with bcc, Debian's python3-bpfcc).

Per tracked process (tgid) it keeps: the user pages written (``dirty_pages``), address-space
changes (``mm_events``: mmap, munmap, mremap, mprotect, pkey_mprotect, brk, madvise, shmat,
shmdt, remap_file_pages and the mlock family), rt_sigaction calls (``sig_events``), fd-table
changes and lseek (``fd_events``), the read/write family counted per fd
(``io_counts``), and fork/exec/exit notices (``notices``). Children forked by a tracked
process are tracked from their first instruction; a thread is no new process.

What the dirty set can see: only writes that fault. ``exceptions:page_fault_user`` fires on a
first write to a page that is not present, is the shared zero page, is copy-on-write (after a
fork) or is write-protected (mprotect, userfaultfd-wp); ``page_fault_kernel`` on the same kinds
of pages written by the kernel for the task (read() into a buffer). A write to a present
writable page raises no fault and is NOT seen: the tracker alone knows only first-touch and
COW writes. backend/dirty.py's userfaultfd write-protection makes every first write after a
checkpoint fault; PAGEMAP_SCAN stays the authoritative cross-check (writes by another process,
process_vm_writev, ptrace pokes and get_user_pages writes show in neither tracepoint).
Processes sharing an mm (vfork, CLONE_VM) record their writes under their own tgid.

Results are only complete if nothing was dropped: a full dirty map, a full ring buffer or a
page above 2**48 flag the tgid, and ``dirty_pages``/``mm_events``/``fd_events`` then raise
``TrackerIncomplete`` (the caller falls back to a full dump). Query a tree while it is stopped:
``reset`` forgets everything recorded for the tgid so far (an exited process's record stays
until then). A checkpoint of a whole tree reads every process's pages in one pass over the
map and empties it in the same pass (``dirty_by_tgid(take=True)``, then
``reset_many(tgids, dirty=False)``): a pass visits every bucket of the map (2**19), ~2-5 ms.

    available() -> (bool, reason)        root, bcc, kernel headers, tracefs; no compiling
    Tracker(load_timeout=...)             start(pids) ... stop(); also a context manager

Loading is bounded (``load_timeout``); the programs are attached through perf-event fds, so
they are detached by ``stop()`` and, whatever happens, when this process exits.
"""
from __future__ import annotations

import bisect
import ctypes
import errno
import importlib.util
import os
import re
import sys
import threading
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

from ckptsim.errors import CkptsimError

from . import proc

__all__ = ["available", "Tracker", "TrackerUnavailable", "TrackerIncomplete", "SyscallEvent",
           "Notice", "PROGRAM", "LOAD_TIMEOUT"]

PROGRAM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf",
                       "tracker.c")
LOAD_TIMEOUT = 20.0             # seconds; compiling takes 0.3-1 s here
DEBIAN_BCC = "/usr/lib/python3/dist-packages/bcc"
TRACEFS = "/sys/kernel/tracing"
TRACEPOINTS = ("exceptions/page_fault_user", "exceptions/page_fault_kernel",
               "raw_syscalls/sys_enter", "raw_syscalls/sys_exit", "sched/sched_process_fork",
               "sched/sched_process_exec", "sched/sched_process_exit")
POLL_INTERVAL = 0.05            # seconds between ring-buffer drains of the background thread
DIRTY_BATCH = 65536             # keys per BPF_MAP_LOOKUP_BATCH call

# bpf/tracker.c's constants (the key layout of `dirty`, the kinds and event types)
TGID_SHIFT = 40
KIND_MM, KIND_FD, KIND_SIG = 1, 2, 5
EV_SYSCALL, EV_FORK, EV_EXEC, EV_EXIT = 1, 2, 3, 4
PATH_LEN = 128


class TrackerUnavailable(CkptsimError):
    """The tracker cannot run here; the message says why."""


class TrackerIncomplete(CkptsimError):
    """Something a tracked process did was not recorded: its record cannot be trusted."""


class _Event(ctypes.Structure):
    """bpf/tracker.c's struct event_t."""
    _fields_ = [("type", ctypes.c_uint32), ("tgid", ctypes.c_uint32), ("tid", ctypes.c_uint32),
                ("other", ctypes.c_uint32), ("nr", ctypes.c_int64),
                ("args", ctypes.c_uint64 * 6), ("ret", ctypes.c_int64),
                ("fds", ctypes.c_int32 * 2), ("path", ctypes.c_char * PATH_LEN)]


@dataclass(frozen=True)
class SyscallEvent:
    """One recorded syscall of a tracked thread: its arguments and result (``ret`` < 0 is
    -errno). ``path``: the open family's path; ``fds``: the new fds of pipe/socketpair."""
    tgid: int
    tid: int
    name: str
    args: tuple[int, ...]
    ret: int
    path: str | None = None
    fds: tuple[int, int] | None = None

    def ranges(self) -> list[tuple[int, int]]:
        """The address ranges [start, end) an mm event changed (for mremap: the old range,
        then the new one; for brk: the new break as an empty range). Empty if it failed."""
        if self.ret < 0 and self.name != "brk":
            return []
        a = self.args
        if self.name == "mmap":
            return [(self.ret, self.ret + a[1])]
        if self.name in ("munmap", "mprotect", "pkey_mprotect", "madvise", "mlock", "mlock2",
                         "munlock"):
            return [(a[0], a[0] + a[1])]
        if self.name == "mremap":
            return [(a[0], a[0] + a[1]), (self.ret, self.ret + a[2])]
        if self.name == "brk":
            return [(self.ret, self.ret)]
        return []


@dataclass(frozen=True)
class Notice:
    """A tracked process forked (``child``), exec'd (``filename``; its mm is new: the dirty set
    before the exec means nothing) or exited."""
    kind: str
    tgid: int
    tid: int
    child: int | None = None
    filename: str | None = None


def _import_bcc():
    """bcc's module: from the venv (scripts/setup.sh links it in), else Debian's copy loaded by
    its path alone (not the rest of Debian's dist-packages). Raises TrackerUnavailable."""
    try:
        import bcc                                  # optional: Debian's python3-bpfcc
        return bcc
    except ImportError:
        pass
    init = os.path.join(DEBIAN_BCC, "__init__.py")
    if not os.path.exists(init):
        raise TrackerUnavailable("bcc is not installed (apt-get install python3-bpfcc; "
                                 "scripts/setup.sh does it)")
    try:
        spec = importlib.util.spec_from_file_location("bcc", init,
                                                      submodule_search_locations=[DEBIAN_BCC])
        module = importlib.util.module_from_spec(spec)
        sys.modules["bcc"] = module
        spec.loader.exec_module(module)
        return module
    except Exception as e:  # noqa: BLE001 - libbcc.so missing or broken: unavailable
        sys.modules.pop("bcc", None)
        raise TrackerUnavailable(f"bcc does not import: {type(e).__name__}: {e}") from None


def _headers_dir() -> str:
    return f"/lib/modules/{os.uname().release}/build"


def _why_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root (loading eBPF tracepoint programs needs root)"
    if not os.path.exists(PROGRAM):
        return f"{PROGRAM} is missing"
    if not os.path.isdir(os.path.join(_headers_dir(), "include")):
        return (f"no kernel headers at {_headers_dir()} (scripts/setup.sh links Debian's "
                "linux-headers-amd64 there)")
    for tp in TRACEPOINTS:
        if not os.path.isdir(os.path.join(TRACEFS, "events", tp)):
            return (f"tracepoint {tp.replace('/', ':')} not found under {TRACEFS} "
                    "(tracefs not mounted or the kernel lacks it)")
    try:
        _import_bcc()
    except TrackerUnavailable as e:
        return str(e)
    return None


def available() -> tuple[bool, str]:
    """Whether the tracker can load here, without compiling it: (True, what it uses) or
    (False, why not)."""
    why = _why_unavailable()
    if why:
        return False, why
    return True, (f"bcc {_import_bcc().__version__}, headers {os.path.realpath(_headers_dir())}, "
                  f"tracefs at {TRACEFS}")


def _syscall_names() -> dict[int, str]:
    """Syscall numbers to names, from the header the BPF program was compiled with."""
    header = os.path.join(_headers_dir(), "arch/x86/include/generated/uapi/asm/unistd_64.h")
    with open(header) as f:
        return {int(n): name for name, n in re.findall(r"#define __NR_(\w+)\s+(\d+)", f.read())}


def _key_addresses(keys: list[int]) -> list[int]:
    """`dirty` keys ((tgid << 40) | address >> 8, sorted) -> page addresses: bytes 0-4 of each
    little-endian key are address bytes 1-5; moved with five slice copies, no per-page loop."""
    raw = array("Q", keys).tobytes()
    out = bytearray(len(raw))
    for b in range(5):
        out[b + 1::8] = raw[b::8]
    return array("Q", bytes(out)).tolist()


class Tracker:
    """Loads bpf/tracker.c and tracks process trees; see the module docstring."""

    def __init__(self, *, load_timeout: float = LOAD_TIMEOUT,
                 poll_interval: float = POLL_INTERVAL):
        self.load_timeout = load_timeout
        self.poll_interval = poll_interval
        self._bpf = None
        self._bcc = None
        self._lock = threading.RLock()
        self._names: dict[int, str] = {}
        self._syscalls: dict[int, list[tuple[int, SyscallEvent]]] = {}
        self._notices: list[Notice] = []
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None

    # --- loading -------------------------------------------------------------------------

    def _load(self) -> None:
        why = _why_unavailable()
        if why:
            raise TrackerUnavailable(f"eBPF tracker unavailable: {why}")
        self._bcc = _import_bcc()
        self._names = _syscall_names()
        box: dict = {}
        done = threading.Lock()
        abandoned = []

        def compile_and_attach():
            try:
                bpf = self._bcc.BPF(src_file=PROGRAM.encode())
            except Exception as e:  # noqa: BLE001 - bcc raises plain Exception
                box["error"] = e
                return
            with done:
                if abandoned:                       # the caller gave up: detach at once
                    bpf.cleanup()
                else:
                    box["bpf"] = bpf

        worker = threading.Thread(target=compile_and_attach, name="bpf-tracker-load",
                                  daemon=True)
        worker.start()
        worker.join(self.load_timeout)
        with done:
            if worker.is_alive():
                abandoned.append(True)
                raise TrackerUnavailable(f"eBPF tracker: compiling {PROGRAM} took more than "
                                         f"{self.load_timeout:g} s")
        if "error" in box:
            raise TrackerUnavailable(f"eBPF tracker: {PROGRAM} did not load: {box['error']}")
        self._bpf = box["bpf"]
        try:
            self._bpf[b"events"].open_ring_buffer(self._on_event)
        except BaseException:
            self.stop()
            raise
        self._poller = threading.Thread(target=self._poll, name="bpf-tracker-poll", daemon=True)
        self._poller.start()

    def start(self, pids: Iterable[int]) -> None:
        """Load the programs (once) and track the trees rooted at ``pids``: each process and
        its present descendants, and every child they fork from now on."""
        pids = list(pids)
        for pid in pids:
            if not proc.process_exists(pid):
                raise ProcessLookupError(f"cannot track process {pid}: no such process")
        if self._bpf is None:
            self._load()
        for pid in pids:
            self._track_tree(pid)

    def _track_tree(self, root: int) -> None:
        # Insert a parent before listing its children: a child forked after the insertion is
        # added by the fork program, one forked before is in the listing.
        todo = [root]
        while todo:
            pid = todo.pop()
            self._set_tracked(pid, root)
            try:
                todo.extend(proc.children(pid))
            except proc.ProcessGone:
                continue

    def _set_tracked(self, tgid: int, root: int) -> None:
        table = self._bpf[b"tracked"]
        leaf = table.Leaf()
        leaf.root = root
        table[table.Key(tgid)] = leaf

    def stop(self) -> None:
        """Detach every program and free the maps (idempotent)."""
        self._stopping.set()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join()
        self._poller = None
        with self._lock:
            if self._bpf is not None:
                bpf, self._bpf = self._bpf, None
                bpf.cleanup()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def running(self) -> bool:
        return self._bpf is not None

    def _need(self) -> None:
        if self._bpf is None:
            raise TrackerUnavailable("the eBPF tracker is not started")

    # --- the ring buffer -----------------------------------------------------------------

    def _poll(self) -> None:
        while not self._stopping.wait(self.poll_interval):
            self._drain()

    def _drain(self) -> None:
        with self._lock:
            if self._bpf is not None:
                self._bpf.ring_buffer_consume()

    def _on_event(self, ctx, data, size) -> int:
        ev = _Event.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(_Event)))
        if ev.type == EV_SYSCALL:
            name = self._names.get(ev.nr, f"syscall_{ev.nr}")
            path = ev.path.decode(errors="surrogateescape") if ev.path else None
            fds = tuple(ev.fds) if name in ("pipe", "pipe2", "socketpair") and ev.ret == 0 else None
            event = SyscallEvent(ev.tgid, ev.tid, name, tuple(ev.args), ev.ret, path, fds)
            self._syscalls.setdefault(ev.tgid, []).append((ev.other, event))
        elif ev.type == EV_FORK:
            self._syscalls.pop(ev.other, None)      # a reused pid starts afresh
            self._notices.append(Notice("fork", ev.tgid, ev.tid, child=ev.other))
        elif ev.type == EV_EXEC:
            self._notices.append(Notice("exec", ev.tgid, ev.tid,
                                        filename=ev.path.decode(errors="surrogateescape")))
        elif ev.type == EV_EXIT:
            self._notices.append(Notice("exit", ev.tgid, ev.tid))
        return 0

    # --- queries -------------------------------------------------------------------------

    def tracked(self) -> set[int]:
        """The tgids tracked now (exited ones are dropped by the exit program)."""
        with self._lock:
            self._need()
            return {k.value for k in self._bpf[b"tracked"]}

    def _check_complete(self, tgid: int, what: str) -> None:
        leaf = self._bpf[b"tracked"].get(self._bpf[b"tracked"].Key(tgid))
        if leaf is not None and getattr(leaf, what):
            kind = "dirty pages" if what == "dirty_lost" else "events"
            raise TrackerIncomplete(f"process {tgid}: some {kind} were not recorded (the "
                                    "tracker's map or ring buffer was full): take a full dump")

    def _all_dirty_keys(self, take: bool = False) -> list[int]:
        """Every key of the `dirty` map, sorted, read with BPF_MAP_LOOKUP_BATCH; ``take``:
        deleted in the same pass (BPF_MAP_LOOKUP_AND_DELETE_BATCH)."""
        lib = self._bcc.libbcc.lib
        batch = lib.bpf_lookup_and_delete_batch if take else lib.bpf_lookup_batch
        fd = self._bpf[b"dirty"].map_fd
        keys = (ctypes.c_uint64 * DIRTY_BATCH)()
        values = (ctypes.c_uint8 * DIRTY_BATCH)()
        out = array("Q")
        token_in, token_out = ctypes.c_uint32(0), ctypes.c_uint32(0)
        first = True
        while True:
            count = ctypes.c_uint32(DIRTY_BATCH)
            res = batch(fd, None if first else ctypes.byref(token_in), ctypes.byref(token_out),
                        keys, values, ctypes.byref(count))
            err = ctypes.get_errno()
            out.frombytes(memoryview(keys).cast("B")[:count.value * 8])
            if res != 0:
                if err == errno.ENOENT:             # the end of the map
                    break
                what = "LOOKUP_AND_DELETE" if take else "LOOKUP"
                raise OSError(err, f"BPF_MAP_{what}_BATCH on the dirty map: {os.strerror(err)}")
            token_in.value, first = token_out.value, False
        return sorted(out)

    def _dirty_keys(self, tgid: int) -> list[int]:
        keys = self._all_dirty_keys()
        lo = bisect.bisect_left(keys, tgid << TGID_SHIFT)
        hi = bisect.bisect_left(keys, (tgid + 1) << TGID_SHIFT)
        return keys[lo:hi]

    def dirty_pages(self, tgid: int) -> list[int]:
        """The sorted addresses of the pages ``tgid`` wrote (with a fault, see the module
        docstring) since its last reset. Raises TrackerIncomplete if some were dropped."""
        with self._lock:
            self._need()
            self._check_complete(tgid, "dirty_lost")
            return _key_addresses(self._dirty_keys(tgid))

    def dirty_by_tgid(self, take: bool = False) -> dict[int, list[int] | None]:
        """``dirty_pages`` of every process with a record, in one pass over the map: tgid ->
        sorted page addresses, or None when some of its pages were not recorded. ``take``
        empties the map in the same pass (a checkpoint with the tree stopped: whatever is
        written from then on is the next answer); the lost flags stay until ``reset``."""
        with self._lock:
            self._need()
            keys = self._all_dirty_keys(take)
            table = self._bpf[b"tracked"]
            lost = {k.value for k, leaf in table.items() if leaf.dirty_lost}
            out: dict[int, list[int] | None] = {t: None for t in lost}
            lo = 0
            while lo < len(keys):
                tgid = keys[lo] >> TGID_SHIFT
                hi = bisect.bisect_left(keys, (tgid + 1) << TGID_SHIFT, lo)
                if tgid not in lost:
                    out[tgid] = _key_addresses(keys[lo:hi])
                lo = hi
            return out

    def _events(self, tgid: int, kind: int) -> list[SyscallEvent]:
        with self._lock:
            self._need()
            self._bpf.ring_buffer_consume()
            self._check_complete(tgid, "events_lost")
            return [e for k, e in self._syscalls.get(tgid, []) if k == kind]

    def mm_events(self, tgid: int) -> list[SyscallEvent]:
        """``tgid``'s address-space changes since its last reset, in order."""
        return self._events(tgid, KIND_MM)

    def sig_events(self, tgid: int) -> list[SyscallEvent]:
        """``tgid``'s rt_sigaction calls since its last reset, in order (reads included: the
        tracker does not look at the new action)."""
        return self._events(tgid, KIND_SIG)

    def fd_events(self, tgid: int) -> list[SyscallEvent]:
        """``tgid``'s fd-table changes and lseeks since its last reset, in order."""
        return self._events(tgid, KIND_FD)

    def io_counts(self, tgid: int) -> dict[int, dict[str, int]]:
        """fd -> {syscall name: calls} of ``tgid``'s read/write family since its last reset
        (the fds whose file position may have moved)."""
        with self._lock:
            self._need()
            self._check_complete(tgid, "events_lost")
            out: dict[int, dict[str, int]] = {}
            for k, v in self._bpf[b"io_calls"].items():
                if k.tgid == tgid:
                    name = self._names.get(k.nr, f"syscall_{k.nr}")
                    out.setdefault(k.fd, {})[name] = v.value
            return out

    def notices(self) -> list[Notice]:
        """The fork, exec and exit notices of tracked processes since the last call."""
        with self._lock:
            self._need()
            self._bpf.ring_buffer_consume()
            out, self._notices = self._notices, []
            return out

    def reset(self, tgid: int) -> None:
        """Forget what ``tgid`` did so far (its dirty pages, events, io counts and lost flags);
        call it with the process stopped, right after its checkpoint."""
        self.reset_many([tgid])

    def reset_many(self, tgids: Iterable[int], dirty: bool = True) -> None:
        """``reset`` of several tgids, one pass over each map; ``dirty=False`` leaves the
        dirty map alone (``dirty_by_tgid(take=True)`` emptied it already)."""
        tgids = set(tgids)
        if not tgids:
            return
        with self._lock:
            self._need()
            self._bpf.ring_buffer_consume()
            if dirty:
                keys = [k for k in self._all_dirty_keys() if k >> TGID_SHIFT in tgids]
                if keys:
                    packed = array("Q", keys)
                    buf = (ctypes.c_uint64 * len(keys)).from_buffer(packed)
                    count = ctypes.c_uint32(len(keys))
                    res = self._bcc.libbcc.lib.bpf_delete_batch(self._bpf[b"dirty"].map_fd,
                                                                buf, ctypes.byref(count))
                    if res != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"BPF_MAP_DELETE_BATCH on the dirty map: "
                                           f"{os.strerror(err)}")
            io = self._bpf[b"io_calls"]
            for k in [k for k in io if k.tgid in tgids]:
                del io[k]
            for tgid in tgids:
                self._syscalls.pop(tgid, None)
            table = self._bpf[b"tracked"]
            for tgid in tgids:
                leaf = table.get(table.Key(tgid))
                if leaf is not None and (leaf.dirty_lost or leaf.events_lost):
                    leaf.dirty_lost = leaf.events_lost = 0
                    table[table.Key(tgid)] = leaf

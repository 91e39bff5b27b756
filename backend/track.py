"""Tracking sessions: what a checkpointed live tree wrote since its last checkpoint.

``checkpoint --track PID`` takes a full image and, at the checkpoint instant (the tree still
stopped, backend/dump.checkpoint's ``on_stopped`` hook), arms a session:

- a ``backend.dirty.WriteTracker`` per process (threads share it): userfaultfd write-protection
  in asynchronous mode of every private VMA; PAGEMAP_SCAN with PAGE_IS_WRITTEN is the
  authoritative answer;
- the eBPF tracker (backend/bpf_tracker.py) over the tree, reset in the same stop: it sees each
  first write after the protection as a write fault, and it tracks children forked later
  (whose pages count as all dirty: the uffd side does not cover them until the next arm).

The session outlives the ``checkpoint`` command: a daemon (backend/track_daemon.py, a fresh
Python process that loads bcc itself, so nothing the checkpointer does at exit can detach its
programs) owns the uffd and pagemap fds, handed to it with SCM_RIGHTS, and the BPF objects. It
answers on a UNIX socket in a root-only directory, ``/run/ckptsim/track-<root pid>.sock``
(0600). It ends by itself when every tracked process is gone, on ``stop``, on SIGTERM, and
leaves the tree untraced, unstopped and unslowed (trackers closed: registrations dropped; BPF
programs detached). If it is killed, the kernel drops both with its fds.

Client API (raises NoSession when nobody tracks ``root_pid``):

    connect(root_pid) -> TrackClient
    .dirty() -> DirtyReport         per tgid: pages written since the last arm (the union of
                                    both sources, and each source alone), changed VMAs, flags
    .rearm(seized) -> int           with the tree stopped by ``seized`` (a ptrace.Seized of this
                                    process): reprotect and reset both sources, give new
                                    processes (or ones whose layout changed) a fresh
                                    WriteTracker; the session's new generation
    .checkpoint(seized) -> (DirtyReport, need)
                                    ``dirty`` and ``rearm`` at once, for a checkpoint of the
                                    stopped tree: one page-table walk per protected range
                                    gives the written pages (re-protected in that walk) and
                                    the present runs (ProcessDirty.present); one pass over the
                                    eBPF map takes and resets it. Then, once the image is
                                    written and before the release:
    .finish_checkpoint(seized, need) -> int   fresh WriteTrackers for ``need``; the generation
    .status() -> dict               .stop() -> None (synchronous: everything detached)

    unavailable_reason() -> str | None     why a session cannot run here (not root, no bcc...)
    launch(root_pid) -> TrackClient        start a daemon for a tree (not armed yet: pass
                                           ``client.on_stopped`` to dump.checkpoint)

Wire format: a little-endian u32 length, a JSON header, then the binary blobs the header
lists (page address arrays as raw array('Q') bytes); fds ride on the first bytes (SCM_RIGHTS).
"""
from __future__ import annotations

import bisect
import json
import os
import socket
import struct
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass, field

from ckptsim.errors import CkptsimError

from . import proc

__all__ = ["RUN_DIR", "TrackError", "NoSession", "ProcessDirty", "DirtyReport", "TrackClient",
           "connect", "launch", "socket_path", "unavailable_reason"]

RUN_DIR = "/run/ckptsim"
CLIENT_TIMEOUT = 60.0            # seconds for one answer (a dirty scan of a big tree included)
LAUNCH_TIMEOUT = 40.0            # the daemon compiles and loads bpf/tracker.c (0.3-1 s here)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TrackError(CkptsimError):
    """A tracking session could not be started, armed or asked."""


class NoSession(TrackError):
    """No tracking session exists for that process."""


def socket_path(root_pid: int) -> str:
    return os.path.join(RUN_DIR, f"track-{int(root_pid)}.sock")


def start_time(pid: int) -> int:
    """The process's start time (clock ticks since boot): tells a reused pid apart."""
    return proc.read_stat(pid).start_time


# --- the dirty answer --------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessDirty:
    """What one process (``tgid``) wrote since the session's last arm.

    ``pages``: the pages to dump (sorted array('Q') of page addresses): the union of
    ``uffd_pages`` (PAGEMAP_SCAN PAGE_IS_WRITTEN over the write-protected ranges, authoritative)
    and ``bpf_pages`` (write faults seen by the eBPF tracker). ``new_vmas``: [start, end) of
    private VMAs nobody protected (mapped or moved since): take all their pages. ``gone_vmas``:
    protected ranges no longer mapped. ``covered``: the ranges write-protected at the last arm
    and still ours. ``all_dirty``: the process was not write-protected at all (forked after the
    arm, exec'd, or its setup failed: ``reasons`` says which): dump it whole. ``bpf_complete``
    is False when the eBPF tracker dropped records (the uffd set still stands). ``exec``: it
    exec'd since the arm. From ``checkpoint`` only: ``scanned``, the ranges walked (the
    protected VMAs), and ``present``, the runs of pages worth saving in them at the stop
    (present or swapped, no uffd-wp markers: what backend.memory's scan gives), and
    ``vm_flags_kept``: every VMA whose /proc maps line is unchanged since the last arm has the
    VmFlags it had then (the eBPF tracker saw no mm syscall that can change them);
    ``handlers_kept``: its signal actions are those of the last arm (no process of the tree
    set one since)."""
    tgid: int
    pages: array
    uffd_pages: array
    bpf_pages: array
    new_vmas: list[tuple[int, int]] = field(default_factory=list)
    gone_vmas: list[tuple[int, int]] = field(default_factory=list)
    covered: list[tuple[int, int]] = field(default_factory=list)
    all_dirty: bool = False
    bpf_complete: bool = True
    exec: bool = False
    reasons: tuple[str, ...] = ()
    scanned: list[tuple[int, int]] = field(default_factory=list)
    present: list[tuple[int, int]] | None = None
    vm_flags_kept: bool = False
    handlers_kept: bool = False

    def bpf_in_covered(self) -> array:
        """``bpf_pages`` inside the write-protected ranges: on a process that writes only its
        own memory this equals ``uffd_pages`` (the cross-check). One slice per range."""
        out = array("Q")
        for lo, hi in self.covered:             # sorted, disjoint: the result stays sorted
            out.extend(self.bpf_pages[bisect.bisect_left(self.bpf_pages, lo):
                                      bisect.bisect_left(self.bpf_pages, hi)])
        return out


@dataclass(frozen=True)
class DirtyReport:
    """The session's answer to ``dirty``: ``processes`` by tgid (every tracked live process),
    ``exited``: tgids tracked at the last arm that are gone; ``generation``: how many times the
    session was armed (1 after the first checkpoint)."""
    root: int
    generation: int
    processes: dict[int, ProcessDirty]
    exited: list[int]

    @property
    def complete(self) -> bool:
        """True when every process's dirty set can be trusted as it is (no all-dirty one)."""
        return not any(p.all_dirty for p in self.processes.values())


# --- framing -----------------------------------------------------------------------------------
def send_message(sock: socket.socket, header: dict, blobs=(), fds=()) -> None:
    blobs = [memoryview(b).cast("B") for b in blobs]
    body = json.dumps({**header, "blobs": [len(b) for b in blobs]}).encode()
    data = struct.pack("<I", len(body)) + body
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)
    for b in blobs:
        sock.sendall(b)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("the peer closed the connection")
        got += k
    return bytes(buf)


def recv_message(sock: socket.socket, max_fds: int = 4) -> tuple[dict, list[bytes], list[int]]:
    """(header, blobs, fds); EOFError when the peer closed before a message."""
    first, fds, _, _ = socket.recv_fds(sock, 4, max_fds)
    if not first:
        raise EOFError("the peer closed the connection")
    try:
        head = first + _recv_exactly(sock, 4 - len(first))
        (size,) = struct.unpack("<I", head)
        header = json.loads(_recv_exactly(sock, size))
        blobs = [_recv_exactly(sock, n) for n in header.pop("blobs", [])]
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return header, blobs, fds


def _pages(blob: bytes) -> array:
    out = array("Q")
    out.frombytes(blob)
    return out


def _report(reply: dict, blobs: list[bytes]) -> DirtyReport:
    """A ``dirty`` or ``checkpoint`` reply: per process 3 blobs (union, uffd, bpf pages), and
    a 4th (present runs as flat start, end pairs) with ``scanned``."""
    processes, i = {}, 0
    for p in reply["processes"]:
        union, uffd, bpf = (_pages(b) for b in blobs[i:i + 3])
        i += 3
        present = None
        if "scanned" in p:
            flat = _pages(blobs[i])
            i += 1
            present = list(zip(flat[0::2], flat[1::2]))
        processes[p["tgid"]] = ProcessDirty(
            p["tgid"], union, uffd, bpf, [tuple(r) for r in p["new_vmas"]],
            [tuple(r) for r in p["gone_vmas"]], [tuple(r) for r in p["covered"]],
            p["all_dirty"], p["bpf_complete"], p["exec"], tuple(p["reasons"]),
            [tuple(r) for r in p.get("scanned", ())], present, p.get("vm_flags_kept", False),
            p.get("handlers_kept", False))
    return DirtyReport(reply["root"], reply["generation"], processes, reply["exited"])


# --- availability ------------------------------------------------------------------------------
def unavailable_reason() -> str | None:
    """Why a tracking session cannot run here, or None: root, the eBPF tracker's
    prerequisites (bcc, headers, tracepoints) and the kernel's PAGEMAP_SCAN and uffd-wp."""
    if os.geteuid() != 0:
        return "not root (tracking needs eBPF and userfaultfd in other processes)"
    from . import bpf_tracker, features
    ok, why = bpf_tracker.available()
    if not ok:
        return f"the eBPF tracker is unavailable: {why}"
    found = {f.name: f for f in features.probed()}
    for name in ("pagemap_scan", "uffd_wp_async", "pidfd_getfd"):
        f = found.get(name)
        if f is None or not f.present:
            return f"{name} is missing: {f.detail if f else 'not probed'}"
    return None


# --- the client ----------------------------------------------------------------------------------
class TrackClient:
    """A connection to the session tracking ``root``'s tree (see the module docstring)."""

    def __init__(self, root: int, sock: socket.socket, daemon_pid: int | None = None):
        self.root = root
        self.path = socket_path(root)
        self._sock = sock
        self.daemon_pid = daemon_pid
        self.arm_error: str | None = None        # set by on_stopped when arming failed
        self.spans: dict = {}                    # the daemon's timings of the last checkpoint

    def _ask(self, header: dict, fds=()) -> tuple[dict, list[bytes]]:
        if self._sock is None:
            raise TrackError(f"the tracking session of process {self.root} is closed")
        try:
            send_message(self._sock, header, fds=fds)
            reply, blobs, extra = recv_message(self._sock)
        except (OSError, EOFError) as e:
            self.close()
            raise TrackError(f"tracking session of process {self.root} ({self.path}): "
                             f"{header['op']}: {e or type(e).__name__}") from None
        for fd in extra:
            os.close(fd)
        if "error" in reply:
            raise TrackError(f"tracking session of process {self.root}: {reply['error']}")
        return reply, blobs

    def status(self) -> dict:
        reply, _ = self._ask({"op": "status"})
        return reply

    def dirty(self) -> DirtyReport:
        reply, blobs = self._ask({"op": "dirty"})
        return _report(reply, blobs)

    def checkpoint(self, seized) -> tuple[DirtyReport, list[int]]:
        """For a checkpoint of the tree stopped by ``seized``: what was written since the last
        arm (``dirty``, each process's ``present`` runs included) and the session re-armed in
        the same walk. Returns (report, need): the processes that need a fresh WriteTracker
        (new, exec'd, with VMAs nobody protects), to pass to ``finish_checkpoint`` once the
        image is written (a fresh tracker's protection leaves uffd-wp markers that a process
        saved whole must not see). Whatever the others write from here on, the checkpoint's
        own injected calls included, is the next checkpoint's. ``spans`` keeps the daemon's
        timings (ms)."""
        tgids = sorted(pid for pid, tids in seized.threads.items() if tids)
        reply, blobs = self._ask({"op": "checkpoint", "tgids": tgids})
        self.spans = reply.get("spans", {})
        return _report(reply, blobs), list(reply["need"])

    def finish_checkpoint(self, seized, need) -> int:
        """The end of ``checkpoint``, the tree still stopped: fresh WriteTrackers for ``need``
        (as ``rearm`` makes them). Returns the session's generation."""
        tgids = sorted(pid for pid, tids in seized.threads.items() if tids)
        failed = self._adopt_fresh(need, seized)
        reply, _ = self._ask({"op": "commit", "tgids": tgids, "collected": True,
                              "fresh": list(need),
                              "failed": {str(k): v for k, v in failed.items()}})
        return reply["generation"]

    def rearm(self, seized) -> int:
        """Re-arm with the tree stopped by ``seized`` (a backend.ptrace.Seized of this process,
        every live process of the tree in it): processes whose layout is unchanged are
        reprotected in place; the others (new, exec'd, with new VMAs) get a fresh WriteTracker
        made here, where the tracer is, and handed over; then the eBPF records are reset.
        Returns the new generation. A process whose WriteTracker cannot be made stays
        tracked as all dirty (the reason is in ``dirty()``)."""
        tgids = sorted(pid for pid, tids in seized.threads.items() if tids)
        reply, _ = self._ask({"op": "begin", "tgids": tgids})
        failed = self._adopt_fresh(reply["need"], seized)
        reply, _ = self._ask({"op": "commit", "tgids": tgids,
                              "failed": {str(k): v for k, v in failed.items()}})
        return reply["generation"]

    def _adopt_fresh(self, tgids, seized) -> dict[int, str]:
        """A WriteTracker made here (where the tracer is) for each of ``tgids``, handed to
        the daemon; {tgid: why} for those that could not be made."""
        from .dirty import DirtyTrackingError, WriteTracker
        failed: dict[int, str] = {}
        for tgid in tgids:
            try:
                tracker = WriteTracker(tgid, tid=seized.threads[tgid][0])
            except (DirtyTrackingError, OSError) as e:
                failed[tgid] = str(e)
                continue
            meta = {"op": "adopt", **tracker.describe(),
                    "untracked": [[m.start, m.end, why] for m, why in tracker.untracked]}
            fds = tracker.detach_fds()
            try:
                self._ask(meta, fds=fds)
            finally:
                for fd in fds:               # the daemon holds its copies; ours may go
                    os.close(fd)
        return failed

    def on_stopped(self, seized, processes) -> None:
        """backend.dump.checkpoint's hook: arm at the checkpoint instant. Never raises (the
        image is complete): a failure is kept in ``arm_error``."""
        try:
            self.rearm(seized)
        except Exception as e:          # noqa: BLE001 - reported by the caller, image kept
            self.arm_error = str(e) or type(e).__name__

    def stop(self) -> None:
        """End the session: every WriteTracker closed, the BPF programs detached, before this
        returns; the daemon exits."""
        self._ask({"op": "stop"})
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> TrackClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_socket(root: int) -> socket.socket | None:
    """A connection to the session socket of ``root``, or None if there is none (a stale
    socket is removed)."""
    path = socket_path(root)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(CLIENT_TIMEOUT)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        if isinstance(e, ConnectionRefusedError):
            try:
                os.unlink(path)              # a daemon that died without cleaning up
            except FileNotFoundError:
                pass
        return None
    except PermissionError:
        sock.close()
        raise TrackError(f"the tracking session socket {path} is root's only") from None
    return sock


def connect(root_pid: int) -> TrackClient:
    """The session tracking the tree at ``root_pid``; NoSession if there is none (or only one
    for an earlier process with that pid)."""
    root = int(root_pid)
    sock = _open_socket(root)
    if sock is None:
        raise NoSession(f"no tracking session for process {root} (no daemon at "
                        f"{socket_path(root)}; start one with checkpoint --track {root})")
    client = TrackClient(root, sock)
    status = client.status()
    client.daemon_pid = status["daemon"]
    try:
        same = start_time(root) == status["root_start"]
    except (OSError, proc.ProcessGone):
        same = False
    if not same:
        client.stop()
        raise NoSession(f"no tracking session for process {root}: the session at "
                        f"{socket_path(root)} tracked an earlier process with that pid")
    return client


def launch(root_pid: int, *, timeout: float = LAUNCH_TIMEOUT) -> TrackClient:
    """Start a daemon for the tree at ``root_pid`` (it loads the eBPF tracker and tracks the
    tree from now on) and return a client to it, not armed yet: arm it while the tree is
    stopped (``rearm`` or ``on_stopped``). A daemon that is never armed exits when this
    client's connection closes. Raises TrackError (nothing left behind)."""
    root = int(root_pid)
    sock = _open_socket(root)
    if sock is not None:
        sock.close()
        raise TrackError(f"process {root} already has a tracking session ({socket_path(root)})")
    read_end, write_end = os.pipe()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (_REPO, os.environ.get("PYTHONPATH")) if p)}
    try:
        starter = subprocess.Popen(
            [sys.executable, "-m", "backend.track_daemon", str(root), str(write_end)],
            pass_fds=[write_end], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, env=env, cwd="/")
    finally:
        os.close(write_end)
    try:
        line = _read_line(read_end, timeout)
    finally:
        os.close(read_end)
        try:
            starter.wait(timeout=5)          # the daemon's first process forks and exits
        except subprocess.TimeoutExpired:
            starter.kill()
            starter.wait()
    if not line.startswith("READY "):
        raise TrackError(f"tracking session for process {root}: "
                         f"{line.partition(' ')[2] or 'the daemon did not start'}")
    daemon_pid = int(line.split()[1])
    sock = _open_socket(root)
    if sock is None:
        raise TrackError(f"tracking session for process {root}: the daemon ({daemon_pid}) "
                         f"is not listening at {socket_path(root)}")
    return TrackClient(root, sock, daemon_pid)


def _read_line(fd: int, timeout: float) -> str:
    """The first line written to the pipe ``fd`` ('' on EOF or timeout)."""
    import select
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return ""
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


"""The daemon of a tracking session (backend/track.py): started by ``track.launch`` as

    python -m backend.track_daemon ROOT_PID READY_FD

It forks once (the starter exits, so the daemon is nobody's child but init's), loads the eBPF
tracker itself (bcc state never crosses a fork or belongs to the checkpointer), tracks the tree
at ROOT_PID, listens on ``/run/ckptsim/track-ROOT_PID.sock`` and writes ``READY <pid> <socket>``
(or ``ERROR <why>``) to READY_FD. Requests, one connection at a time:

    checkpoint {tgids}    the tree is stopped for a checkpoint: ``dirty`` (with each process's
                          present page runs in its protected ranges) and, in the same walk
                          and map pass, re-protected and reset; the generation moves on now
                          (a checkpoint that fails later leaves no session state that could
                          pass for its parent's); which tgids need a fresh WriteTracker
                          (their old one is closed). Once the image is written: adopt, then
                          commit {collected: true, fresh: need}
    begin {tgids}         the tree is stopped by the client: which tgids need a fresh
                          WriteTracker (new, exec'd, or with VMAs nobody protects); their old
                          trackers are closed now (a second uffd could not register the ranges)
    adopt {meta} + fds    a WriteTracker the client set up (uffd fd, pagemap fd)
    commit {tgids, failed}  reprotect the kept trackers, reset the eBPF records: armed
    dirty / status / stop

It ends when every tracked process is gone, on ``stop``, on SIGTERM/SIGINT/SIGHUP, and when the
launcher's connection closes before the first arm; on every path the trackers are closed
(registrations dropped) and the BPF programs detached.
"""
from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from array import array
from collections import namedtuple
from dataclasses import dataclass

from backend import proc
from backend.bpf_tracker import Tracker, TrackerIncomplete
from backend.dirty import DirtyTrackingError, Layout, WriteTracker
from backend.track import RUN_DIR, recv_message, send_message, socket_path, start_time

IDLE_TICK = 0.2              # seconds between checks that the tree still lives
CLIENT_IDLE = 300.0          # an armed session drops a client silent for this long
NOT_PROTECTED_FORKED = "forked after the last checkpoint: not write-protected"


def _keeps_layout(event) -> bool:
    """An mm syscall that leaves the VMAs as they are: madvise (a zapped page shows in the
    present scan; a split keeps the registration) and brk(0), which only asks for the break
    (seen between every two checkpoints of the C bench target)."""
    return event.name == "madvise" or (event.name == "brk" and event.args[0] == 0)


# madvise advice that changes no vm_flags bit at all (the rest sets or clears one: sr, rr, dc,
# dd, hg, mg, wf...; a split shows in the maps lines)
_FLAG_KEEPING_ADVICE = frozenset({
    3, 4, 8, 9,         # MADV_WILLNEED, MADV_DONTNEED, MADV_FREE, MADV_REMOVE
    20, 21, 22, 23, 24,  # MADV_COLD, MADV_PAGEOUT, MADV_POPULATE_READ/WRITE, MADV_DONTNEED_LOCKED
})


def _keeps_vm_flags(event) -> bool:
    """An mm syscall after which a VMA whose /proc maps line is unchanged still has the VmFlags
    it had: brk (a moved break changes the [heap] line) and madvise with advice that changes
    no flag. Anything else (mmap over the same range, mprotect there and back, the mlock
    family) may change them with the line as it was."""
    return event.name == "brk" or (event.name == "madvise"
                                   and event.args[2] in _FLAG_KEEPING_ADVICE)


_Span = namedtuple("_Span", "start end")      # a VMA of a Layout's ``others``


class _Stop(Exception):
    """A signal asked the daemon to end."""


@dataclass
class _Process:
    start: int                          # start time: a reused pid is another process
    tracker: WriteTracker | None = None
    reason: str | None = None           # why it has no tracker
    exec: bool = False
    untracked: list | None = None       # [start, end, why] the tracker could not register
    layout: Layout | None = None        # the tracker's Layout, kept while no mm syscall of the
                                        # process (eBPF) can have changed it: no smaps read


class _InThread:
    """``fn(*args, **kwargs)`` in a thread; ``result()`` waits and returns or raises."""

    def __init__(self, fn, *args, **kwargs):
        self._box: dict = {}

        def run():
            try:
                self._box["value"] = fn(*args, **kwargs)
            except BaseException as e:      # noqa: BLE001 - re-raised by result()
                self._box["error"] = e

        self._thread = threading.Thread(target=run, name="track-daemon-worker", daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]


def _alive(tgid: int, start: int | None = None) -> bool:
    try:
        st = proc.read_stat(tgid)
    except (OSError, proc.ProcessGone):
        return False
    return st.state not in ("Z", "X") and (start is None or st.start_time == start)


def _covered(registered, gone) -> list[tuple[int, int]]:
    """``registered`` minus the ``gone`` ranges (both sorted, merged)."""
    out = []
    for a, b in registered:
        for g0, g1 in gone:
            if g1 <= a or g0 >= b:
                continue
            if g0 > a:
                out.append((a, g0))
            a = max(a, g1)
        if a < b:
            out.append((a, b))
    return out


class Daemon:
    def __init__(self, root: int):
        self.root = root
        self.root_start = start_time(root)
        self.path = socket_path(root)
        self.procs: dict[int, _Process] = {}
        self.armed: set[int] = set()
        self.generation = 0
        self.armed_at = 0.0
        self.bpf: Tracker | None = None
        self.listener: socket.socket | None = None
        self._inode = None
        self._log = None
        self.troubled = False           # an error was logged: the log is kept

    # -- setup and teardown ------------------------------------------------------------------
    def setup(self) -> None:
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        st = os.lstat(RUN_DIR)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise RuntimeError(f"{RUN_DIR} is not a directory owned by uid {os.geteuid()}")
        os.chmod(RUN_DIR, 0o700)
        self._log = open(os.path.join(RUN_DIR, f"track-{self.root}.log"), "a", buffering=1)
        self.bpf = Tracker()
        self.bpf.start([self.root])         # from now on: forks of the tree are tracked
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        listener.listen(8)
        self.listener, self._inode = listener, os.stat(self.path).st_ino
        self.log(f"tracking {self.root}")

    def log(self, line: str, error: bool = False) -> None:
        self.troubled |= error
        if self._log is not None:
            self._log.write(f"{time.strftime('%H:%M:%S')} [{os.getpid()}] {line}\n")

    def cleanup(self) -> None:
        """The socket removed first (no client reaches a daemon that is ending), then every
        tracker closed and the programs detached."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        for p in self.procs.values():
            if p.tracker is not None:
                p.tracker.close()
                p.tracker = None
        if self.bpf is not None:
            self.bpf.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
            if not self.troubled:           # kept only to explain an error
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(RUN_DIR, f"track-{self.root}.log"))

    # -- the loop --------------------------------------------------------------------------------
    def tree_gone(self) -> bool:
        if self.bpf.tracked():
            return False
        return not any(_alive(t, p.start) for t, p in self.procs.items())

    def serve(self) -> None:
        """Answer every connected client, one request at a time, until the tree is gone, a
        ``stop``, or the launcher left without arming (no client left at generation 0)."""
        clients: dict[socket.socket, float] = {}        # connection -> its last request
        seen_client = False
        try:
            while True:
                if self.tree_gone():
                    self.log("the tree is gone")
                    return
                ready = select.select([self.listener, *clients], [], [], IDLE_TICK)[0]
                if not ready:
                    self._drain_notices()
                    now = time.monotonic()
                    for conn in [c for c, t in clients.items()
                                 if self.generation and now - t > CLIENT_IDLE]:
                        del clients[conn]
                        conn.close()
                for conn in ready:
                    if conn is self.listener:
                        new, _ = self.listener.accept()
                        new.settimeout(60.0)            # a half-sent request cannot hang us
                        clients[new], seen_client = time.monotonic(), True
                        continue
                    clients[conn] = time.monotonic()
                    outcome = self._answer(conn)
                    if outcome == "stop":
                        return
                    if outcome == "closed":
                        del clients[conn]
                        conn.close()
                if seen_client and not clients and self.generation == 0:
                    self.log("the launcher left before arming")
                    return
        finally:
            for conn in clients:
                conn.close()

    def _answer(self, conn: socket.socket) -> str | None:
        """Read and answer one request: "closed" (the client went), "stop" or None."""
        try:
            header, _, fds = recv_message(conn)
        except (EOFError, OSError):
            return "closed"
        op = header.get("op")
        blobs: list = []
        if op != "adopt":               # only adopt takes fds
            for fd in fds:
                os.close(fd)
        try:
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                raise ValueError(f"unknown request {op!r}")
            reply, blobs = handler(header, fds) if op == "adopt" else handler(header)
        except Exception as e:          # noqa: BLE001 - answered, the session goes on
            self.log(f"{op}: {traceback.format_exc()}", error=True)
            reply = {"error": f"{op}: {e}"}
        try:
            send_message(conn, reply, blobs)
        except OSError:
            return "stop" if op == "stop" and "error" not in reply else "closed"
        return "stop" if op == "stop" and "error" not in reply else None

    def _drain_notices(self) -> None:
        for n in self.bpf.notices():
            p = self.procs.get(n.tgid)
            if n.kind == "exec" and p is not None:
                p.exec = True

    # -- requests ---------------------------------------------------------------------------------
    def op_status(self, header):
        processes = {str(t): {"write_protected": p.tracker is not None, "reason": p.reason,
                              "untracked": p.untracked or []}
                     for t, p in sorted(self.procs.items())}
        return {"root": self.root, "root_start": self.root_start, "daemon": os.getpid(),
                "socket": self.path, "generation": self.generation,
                "armed_at": self.armed_at, "processes": processes,
                "bpf_tracked": sorted(self.bpf.tracked())}, []

    def op_dirty(self, header):
        self._drain_notices()
        out, blobs, exited = [], [], []
        bpf_dirty = self.bpf.dirty_by_tgid()
        for tgid in sorted(set(self.procs) | self.bpf.tracked()):
            p = self.procs.get(tgid)
            if not _alive(tgid, p.start if p else None):
                if tgid in self.armed:
                    exited.append(tgid)
                continue
            entry, pages = self._process_dirty(
                tgid, p, bpf_dirty, self._scan(tgid, p, False, self._layout_kept(tgid, p)),
                False)
            out.append(entry)
            blobs.extend(pages)
        return {"root": self.root, "generation": self.generation, "processes": out,
                "exited": exited}, blobs

    def op_checkpoint(self, header):
        """See the module docstring. ``spans`` (ms) say where the time went."""
        began = time.perf_counter()
        # first: a checkpoint that fails from here on has re-protected pages its parent's
        # record does not cover; the next one against that parent must be a full image
        self.generation += 1
        self._drain_notices()
        tgids = [int(t) for t in header["tgids"]]
        # decided first: the eBPF map pass below holds the tracker's lock meanwhile
        kept = {t for t in tgids if self._layout_kept(t, self.procs.get(t))}
        flags_kept = {t for t in tgids if self._vm_flags_kept(t)}
        handlers_kept = self._handlers_kept(tgids)
        spans: dict = {}
        taking = _InThread(self._timed, spans, "bpf_take", self.bpf.dirty_by_tgid, take=True)
        try:
            scans = {t: self._scan(t, self.procs.get(t), True, t in kept, spans) for t in tgids}
        finally:
            bpf_dirty = taking.result()     # both sides released the GIL: they overlap
        out, blobs, need = [], [], []
        for tgid in tgids:
            p = self.procs.get(tgid)
            entry, pages = self._process_dirty(tgid, p, bpf_dirty, scans[tgid], True)
            entry["vm_flags_kept"] = tgid in flags_kept
            entry["handlers_kept"] = tgid in handlers_kept
            out.append(entry)
            blobs.extend(pages)
            if entry.pop("fresh"):
                if p is not None and p.tracker is not None:
                    p.tracker.close()
                    p.tracker, p.reason = None, "not re-armed (the checkpointer went away)"
                need.append(tgid)
        exited = sorted(t for t in self.armed if t not in tgids)
        self._forget(tgids)
        mark = time.perf_counter()
        # a process that gets a fresh tracker is reset when it has one (commit)
        self.bpf.reset_many((set(tgids) - set(need)) | self.armed, dirty=False)
        spans["bpf_reset"] = time.perf_counter() - mark
        self.armed, self.armed_at = set(tgids), time.time()
        spans["total"] = time.perf_counter() - began
        return {"root": self.root, "generation": self.generation, "processes": out,
                "exited": exited, "need": need,
                "spans": {k: round(v * 1000, 3) for k, v in spans.items()}}, blobs

    def _layout_kept(self, tgid: int, p: _Process | None) -> bool:
        """Whether ``tgid``'s kept Layout still holds: the eBPF tracker tracks it, recorded
        all its events, and saw no mm syscall since the last arm that can change it."""
        if p is None or p.layout is None or tgid not in self.bpf.tracked():
            return False
        try:
            return all(_keeps_layout(e) for e in self.bpf.mm_events(tgid))
        except TrackerIncomplete:
            return False

    def _vm_flags_kept(self, tgid: int) -> bool:
        """Whether every VMA of ``tgid`` whose maps line is as at the last arm has the VmFlags
        it had then (the eBPF tracker saw all its events, none of which can change them)."""
        if tgid not in self.bpf.tracked():
            return False
        try:
            return all(_keeps_vm_flags(e) for e in self.bpf.mm_events(tgid))
        except TrackerIncomplete:
            return False

    def _handlers_kept(self, tgids) -> set[int]:
        """The processes whose signal actions are as at the last arm: no process of the tree
        set one since (a process may share its table with another: CLONE_SIGHAND), as the
        eBPF tracker, which saw all their events, says. An rt_sigaction that only reads (no
        new action: the checkpointer's own injected ones) or failed changes nothing."""
        tracked = self.bpf.tracked()
        try:
            for t in tgids:
                if t not in tracked or any(e.args[1] and e.ret == 0
                                           for e in self.bpf.sig_events(t)):
                    return set()
        except TrackerIncomplete:
            return set()
        return set(tgids)

    def _layout(self, p: _Process, kept: bool) -> Layout:
        """The tracker's Layout: the one kept from the last smaps read or registration, if
        ``kept`` (``_layout_kept``), else read now (smaps walks every page table: ~15 ms at
        1 GiB)."""
        if not kept or p.layout is None:
            p.layout = None
            p.layout = p.tracker.layout()
        return p.layout

    def _scan(self, tgid: int, p: _Process | None, stopped: bool, kept: bool,
              spans: dict | None = None):
        """(layout, Scan), re-protecting and with present runs when ``stopped``; or the
        error that makes the process all dirty; None without a tracker (or after an exec).
        A kept layout the scan refuses (EPERM: a VMA in it is not ours any more) is read
        again."""
        if p is None or p.tracker is None or p.exec:
            return None
        mark = time.perf_counter()
        try:
            layout = self._layout(p, kept)
            try:
                scan = p.tracker.scan(layout.ours, reprotect=stopped, present=stopped)
            except DirtyTrackingError as e:
                if not kept or e.errno != errno.EPERM:
                    raise
                kept, layout = False, self._layout(p, False)
                scan = p.tracker.scan(layout.ours, reprotect=stopped, present=stopped)
        except (DirtyTrackingError, OSError) as e:
            return e
        finally:
            if spans is not None:
                spans[f"scan {tgid}" + ("" if kept else " (smaps read)")] = \
                    time.perf_counter() - mark
        return layout, scan

    @staticmethod
    def _timed(spans: dict, name: str, fn, *args, **kwargs):
        mark = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spans[name] = time.perf_counter() - mark

    def _process_dirty(self, tgid: int, p: _Process | None, bpf_dirty: dict, scanned_now,
                       stopped: bool):
        """One process's entry and blobs (see track._report); ``scanned_now``: what _scan
        gave; ``stopped``: for ``checkpoint`` (present runs)."""
        reasons: list[str] = []
        uffd, present = array("Q"), array("Q")
        new = gone = covered = scanned = []
        all_dirty = fresh = False
        if isinstance(scanned_now, tuple):
            layout, scan = scanned_now
            uffd = scan.written
                # a non-reprotecting scan past one full region vector repeated pages once
                # (5611 addresses, 5164 distinct, at 1 GiB): scan_regions reports each once
            for lo, hi in scan.present or ():
                present.extend((lo, hi))
            scanned = layout.ranges
            new = [(m.start, m.end) for m in layout.others]
            gone = _covered(p.tracker.registered, scanned)     # registered - scanned
            covered = _covered(p.tracker.registered, gone)
            fresh = bool(new)
        elif scanned_now is not None:
            all_dirty = fresh = True
            reasons.append(str(scanned_now))
        else:
            all_dirty = fresh = True
            reasons.append(p.reason if p is not None and p.reason else NOT_PROTECTED_FORKED)
        if p is not None and p.exec:
            all_dirty = fresh = True
            reasons.append("exec'd since the last checkpoint: a new address space")
        bpf_complete = True
        bpf = bpf_dirty.get(tgid, [])
        if bpf is None:
            bpf, bpf_complete = [], False
            reasons.append(f"process {tgid}: some dirty pages were not recorded (the tracker's "
                           "map was full): take a full dump")
        bpf = array("Q", bpf)
        union = uffd if not len(bpf) else array("Q", sorted(set(uffd).union(bpf)))
        entry = {"tgid": tgid, "new_vmas": new, "gone_vmas": gone, "covered": covered,
                 "all_dirty": all_dirty, "bpf_complete": bpf_complete,
                 "exec": bool(p is not None and p.exec), "reasons": reasons}
        if not stopped:
            return entry, [union, uffd, bpf]
        entry.update(scanned=scanned, fresh=fresh)
        return entry, [union, uffd, bpf, present]

    def _forget(self, tgids) -> None:
        """Trackers of processes that left the tree are closed."""
        for tgid in set(self.procs) - set(tgids):
            p = self.procs.pop(tgid)
            if p.tracker is not None:
                p.tracker.close()

    def op_begin(self, header):
        self._drain_notices()
        tgids = [int(t) for t in header["tgids"]]
        need = []
        for tgid in tgids:
            p = self.procs.get(tgid)
            if p is not None and p.tracker is not None and not p.exec:
                try:
                    layout = self._layout(p, self._layout_kept(tgid, p))
                    if not p.tracker.changed_vmas(layout=layout).new:
                        continue              # kept: reprotected in place at commit
                except (DirtyTrackingError, OSError):
                    pass
            if p is not None and p.tracker is not None:
                p.tracker.close()
                p.tracker, p.reason = None, "not re-armed (the checkpointer went away)"
            need.append(tgid)
        self._forget(tgids)
        return {"need": need}, []

    def op_adopt(self, header, fds):
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"adopt needs 2 fds (uffd, pagemap), got {len(fds)}")
        tracker = WriteTracker.adopt(header, *fds)      # owns the fds from here
        tgid = tracker.pid
        try:
            started = start_time(tgid)
        except BaseException:
            tracker.close()
            raise
        old = self.procs.get(tgid)
        if old is not None and old.tracker is not None:
            old.tracker.close()
        untracked = header.get("untracked") or []
        layout = Layout(tracker.registered_layout().ours, [_Span(a, b) for a, b, _ in untracked])
        self.procs[tgid] = _Process(started, tracker, None, False, untracked, layout)
        return {"adopted": tgid}, []

    def op_commit(self, header):
        """Armed: with ``collected`` (after ``checkpoint``) only the adopted trackers and the
        processes without one are settled, and the eBPF records of the ``fresh`` ones (the
        checkpoint's ``need``) reset now that their trackers protect them; else the kept
        trackers are re-protected and the eBPF records reset here."""
        self._drain_notices()
        tgids = [int(t) for t in header["tgids"]]
        failed = {int(k): v for k, v in header.get("failed", {}).items()}
        collected = bool(header.get("collected"))
        for tgid in tgids:
            p = self.procs.get(tgid)
            if p is None:
                p = self.procs[tgid] = _Process(start_time(tgid))
            if p.tracker is not None and p.tracker.pid == tgid and tgid not in failed:
                if not collected:         # adopted ones: no-op, just set up
                    p.tracker.written_pages(
                        reprotect=True, layout=self._layout(p, self._layout_kept(tgid, p)))
            elif p.tracker is None:
                p.reason = failed.get(tgid, "not write-protected: no tracker could be set up")
            p.exec = False
        missing = [t for t in tgids if t not in self.bpf.tracked()]
        if missing:
            self.bpf.start(missing)
        if collected:
            self.bpf.reset_many(int(t) for t in header.get("fresh", ()))
        else:
            self.bpf.reset_many(set(tgids) | self.armed)  # exited ones too: records freed
            self.generation += 1
        self.armed = set(tgids)
        self.armed_at = time.time()
        self.log(f"armed generation {self.generation}: {len(tgids)} processes, "
                 f"{sum(1 for t in tgids if self.procs[t].tracker)} write-protected")
        return {"generation": self.generation}, []

    def op_stop(self, header):
        self.cleanup()
        self.log("stopped on request")
        return {"stopped": True}, []


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str]) -> int:
    root, ready = int(argv[0]), int(argv[1])
    if os.fork():
        os._exit(0)                     # the starter: the daemon is reparented to init
    os.chdir("/")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_stop)
    daemon = None
    try:
        daemon = Daemon(root)
        daemon.setup()
        os.write(ready, f"READY {os.getpid()} {daemon.path}\n".encode())
        os.close(ready)
        ready = None
        daemon.serve()
    except _Stop as e:
        if daemon is not None:
            daemon.log(f"ended by {e}")
    except BaseException as e:          # noqa: BLE001 - one line to the launcher or the log
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if ready is not None:
            os.write(ready, f"ERROR {message}\n".encode())
        elif daemon is not None:
            daemon.log(traceback.format_exc(), error=True)
        return 1
    finally:
        if daemon is not None:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            daemon.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

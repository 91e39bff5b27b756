"""The daemon of a tracking session (backend/track.py): started by ``track.launch`` as

    python -m backend.track_daemon ROOT_PID READY_FD

It forks once (the starter exits, so the daemon is nobody's child but init's), loads the eBPF
tracker itself (bcc state never crosses a fork or belongs to the checkpointer), tracks the tree
at ROOT_PID, listens on ``/run/ckptsim/track-ROOT_PID.sock`` and writes ``READY <pid> <socket>``
(or ``ERROR <why>``) to READY_FD. Requests, one connection at a time:

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
import os
import select
import signal
import socket
import stat
import sys
import time
import traceback
from array import array
from dataclasses import dataclass

from backend import proc
from backend.bpf_tracker import Tracker, TrackerIncomplete
from backend.dirty import DirtyTrackingError, WriteTracker
from backend.proc import read_smaps
from backend.track import RUN_DIR, recv_message, send_message, socket_path, start_time

IDLE_TICK = 0.2              # seconds between checks that the tree still lives
CLIENT_IDLE = 300.0          # an armed session drops a client silent for this long
NOT_PROTECTED_FORKED = "forked after the last checkpoint: not write-protected"


class _Stop(Exception):
    """A signal asked the daemon to end."""


@dataclass
class _Process:
    start: int                          # start time: a reused pid is another process
    tracker: WriteTracker | None = None
    reason: str | None = None           # why it has no tracker
    exec: bool = False
    untracked: list | None = None       # [start, end, why] the tracker could not register


def _alive(tgid: int, start: int | None = None) -> bool:
    try:
        st = proc.read_stat(tgid)
    except (OSError, proc.ProcessGone):
        return False
    return st.state not in ("Z", "X") and (start is None or st.start_time == start)


def _adopt(meta: dict, uffd: int, pagemap: int) -> WriteTracker:
    """A WriteTracker over fds the client set up, its fields as WriteTracker.__post_init__
    leaves them (backend.dirty has no constructor for this)."""
    tracker = object.__new__(WriteTracker)
    tracker.pid, tracker.tid = int(meta["pid"]), int(meta["tid"])
    tracker.vmas, tracker.allow_seccomp = None, False
    tracker.user_mode_only = meta["user_mode_only"]
    tracker.registered = [tuple(r) for r in meta["registered"]]
    tracker.untracked, tracker.features = [], int(meta["features"])
    tracker._uffd, tracker._pagemap = uffd, pagemap
    return tracker


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
        for tgid in sorted(set(self.procs) | self.bpf.tracked()):
            p = self.procs.get(tgid)
            if not _alive(tgid, p.start if p else None):
                if tgid in self.armed:
                    exited.append(tgid)
                continue
            entry, pages = self._process_dirty(tgid, p)
            out.append(entry)
            blobs.extend(pages)
        return {"root": self.root, "generation": self.generation, "processes": out,
                "exited": exited}, blobs

    def _process_dirty(self, tgid: int, p: _Process | None):
        reasons: list[str] = []
        uffd = array("Q")
        new = gone = covered = []
        all_dirty = False
        if p is not None and p.tracker is not None:
            try:
                vmas = read_smaps(tgid)
                # a non-reprotecting scan past one full region vector repeats pages here
                # (measured: 5611 addresses, 5164 distinct, at 1 GiB): sorted and distinct
                uffd = array("Q", sorted(set(p.tracker.written_pages(reprotect=False,
                                                                     vmas=vmas))))
                changes = p.tracker.changed_vmas(vmas)
                new = [(m.start, m.end) for m in changes.new]
                gone = changes.gone
                covered = _covered(p.tracker.registered, gone)
            except (DirtyTrackingError, OSError) as e:
                all_dirty = True
                reasons.append(str(e))
        else:
            all_dirty = True
            reasons.append(p.reason if p is not None and p.reason else NOT_PROTECTED_FORKED)
        if p is not None and p.exec:
            all_dirty = True
            reasons.append("exec'd since the last checkpoint: a new address space")
        bpf_complete = True
        try:
            bpf = array("Q", self.bpf.dirty_pages(tgid))
        except TrackerIncomplete as e:
            bpf, bpf_complete = array("Q"), False
            reasons.append(str(e))
        union = array("Q", sorted(set(uffd).union(bpf)))
        entry = {"tgid": tgid, "new_vmas": new, "gone_vmas": gone, "covered": covered,
                 "all_dirty": all_dirty, "bpf_complete": bpf_complete,
                 "exec": bool(p is not None and p.exec), "reasons": reasons}
        return entry, [union, uffd, bpf]

    def op_begin(self, header):
        self._drain_notices()
        tgids = [int(t) for t in header["tgids"]]
        need = []
        for tgid in tgids:
            p = self.procs.get(tgid)
            if p is not None and p.tracker is not None and not p.exec:
                try:
                    if not p.tracker.changed_vmas().new:
                        continue              # kept: reprotected in place at commit
                except (DirtyTrackingError, OSError):
                    pass
            if p is not None and p.tracker is not None:
                p.tracker.close()
                p.tracker, p.reason = None, "not re-armed (the checkpointer went away)"
            need.append(tgid)
        for tgid in set(self.procs) - set(tgids):         # left the tree
            p = self.procs.pop(tgid)
            if p.tracker is not None:
                p.tracker.close()
        return {"need": need}, []

    def op_adopt(self, header, fds):
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"adopt needs 2 fds (uffd, pagemap), got {len(fds)}")
        tracker = _adopt(header, *fds)      # owns the fds from here
        tgid = tracker.pid
        try:
            started = start_time(tgid)
        except BaseException:
            tracker.close()
            raise
        old = self.procs.get(tgid)
        if old is not None and old.tracker is not None:
            old.tracker.close()
        self.procs[tgid] = _Process(started, tracker, None, False,
                                    header.get("untracked") or [])
        return {"adopted": tgid}, []

    def op_commit(self, header):
        self._drain_notices()
        tgids = [int(t) for t in header["tgids"]]
        failed = {int(k): v for k, v in header.get("failed", {}).items()}
        for tgid in tgids:
            p = self.procs.get(tgid)
            if p is None:
                p = self.procs[tgid] = _Process(start_time(tgid))
            if p.tracker is not None and p.tracker.pid == tgid and tgid not in failed:
                p.tracker.written_pages(reprotect=True)   # adopted ones: no-op, just set up
            elif p.tracker is None:
                p.reason = failed.get(tgid, "not write-protected: no tracker could be set up")
            p.exec = False
        missing = [t for t in tgids if t not in self.bpf.tracked()]
        if missing:
            self.bpf.start(missing)
        for tgid in set(tgids) | self.armed:   # exited ones too: their records are freed
            self.bpf.reset(tgid)
        self.armed = set(tgids)
        self.generation += 1
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

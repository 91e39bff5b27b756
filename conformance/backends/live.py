"""The live Linux backend's side of the conformance suite: scenarios as real processes.

A scenario's program runs in ``backend.interp`` (a Python interpreter of the op list doing
the real system calls) as the init of a new pid namespace (``unshare --pid --fork``), so the
pids it sees are those of the model's container (1 for the init, then 2, 3...). Its file
system is the real one, with ``/data`` and ``/tmp`` replaced by a per-run temporary
directory: every string argument of the program that starts with ``/data/`` or ``/tmp/`` is
rewritten to ``<run dir>/data/...`` and ``<run dir>/tmp/...`` (and abstract unix socket
names get a per-run suffix, as they are global to the network namespace); visible_state shows
paths rewritten back. The backend talks with the tasks through files in ``<run dir>/ctl``
(see backend/interp.py): nothing the backend holds open is shared with the tree.

``start`` returns once every task waits at its point or blocks, and the tree is quiet;
``checkpoint`` is backend.dump.checkpoint (a container checkpoint with leak detection when the
scenario asks for one, CHECKPOINT_SUBTREE otherwise); ``check_image`` decodes the image and
replays it in the model with the round trip. ``resume``/``verdict`` release the points and
collect the program's own checks (they run the program to its end without a restart).

``restart`` is backend.restore.job.restart_image in a new pid namespace: the container init
(pid 1 in the image) is restored as pid 1 of a new namespace, a child of this process; from
then on ``run.root`` is the restored init and ``run.restored`` what the restart made, and
``kill``/``resume`` wait for that child instead of `unshare`. RESTART_GHOST and
RESTART_TASKSELF restarts end the same way (conformance/backends/live_restart_flags.py).
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ..backend import Backend, CheckpointFailed
from ..scenario import Scenario
from .live_incremental import IncrementalSteps
from .live_restart_flags import RestartFlags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT = 20.0
QUIET_POLLS = 3          # the tree must look the same this many polls in a row
POLL = 0.02
OWN_UID_BASE, OWN_UID_SPAN = 0x40000000, 0x3fff0000   # uids far above any in /etc/passwd
END_TIMEOUT = 20.0


class LiveRun:
    def __init__(self, scenario: Scenario, tmp: str):
        self.scenario = scenario
        self.tmp = tmp
        self.ctl = os.path.join(tmp, "ctl")
        self.proc: subprocess.Popen | None = None   # the `unshare` process (outside the tree)
        self.root = 0                                # the container init's global pid
        self.seen: set[int] = set()                  # every global pid seen in the tree
        self.release_fd: int | None = None
        self.leak_fd: int | None = None
        self.exit_status: int | None = None
        self.restored = None                         # backend.restore.job.Restored
        self.session = None                          # backend.track.TrackClient (incremental)


SOCKET_NAME_OPS = {"bind", "connect", "sendto", "sendmsg"}
DATA_OPS = {"store", "check", "check_mem", "emit"}   # texts, not paths


def rewrite(value, tmp: str, tag: str = ""):
    """A program argument with /data and /tmp moved under ``tmp`` (and, with ``tag``, an
    abstract socket name made unique to the run)."""
    if isinstance(value, str):
        for top in ("/data", "/tmp"):
            if value == top or value.startswith(top + "/"):
                return tmp + value
        if tag and value.startswith("\0"):
            return value + "." + tag
    return value


def rewrite_program(ops: list, tmp: str, tag: str) -> list:
    out = []
    for reg, name, *args in ops:
        if name == "ckpt_point":
            args = []       # steps are the backend's: release_step wakes the waiting tasks once
        if name not in DATA_OPS:
            args = [rewrite(a, tmp, tag if name in SOCKET_NAME_OPS else "") for a in args]
        out.append([reg, name, *args])
    return out


def _merge_anonymous(vmas: list[list]) -> list[list]:
    """Adjacent anonymous mappings with the same protection as one: a process cannot tell
    them apart, and the kernel keeps them apart or merges them by history (a heap split by a
    fork stays two VMAs; mapped afresh by a restart, the two parts merge)."""
    out: list[list] = []
    for vma in vmas:
        last = out[-1] if out else None
        if (last is not None and last[1] == vma[0] and last[2] == vma[2]
                and last[3] == vma[3] and vma[3] in ("", "[heap]")):
            last[1] = vma[1]
        else:
            out.append(list(vma))
    return out


def _env() -> dict:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": REPO,
            "PYTHONDONTWRITEBYTECODE": "1"}


_uids_given = iter(range(1 << 20))


def _fresh_uid() -> int:
    """A uid no process has now (real, effective, saved or filesystem): this process's pid
    and a count, above the ranges in use, skipping any that /proc shows in use."""
    in_use = _uids_in_use()
    while True:
        uid = OWN_UID_BASE + ((os.getpid() << 10) + next(_uids_given)) % OWN_UID_SPAN
        if uid not in in_use:
            return uid


def _uids_in_use() -> set[int]:
    uids: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uids.update(int(u) for u in line.split()[1:])
                        break
        except OSError:
            continue
    return uids


class LiveBackend(IncrementalSteps, RestartFlags, Backend):
    name = "live"
    can_restart = True

    # -- what can run ------------------------------------------------------------------------
    def unsupported(self, scenario: Scenario) -> str | None:
        from backend.interp import unsupported_op
        if scenario.incremental:
            from backend import track
            why = track.unavailable_reason()
            if why is not None:
                return f"incremental checkpoints need a tracking session: {why}"
        if scenario.unpriv_level is not None:
            return ("needs kernel.ckpt_unpriv_allowed (the seed's sysctl): there is no such "
                    "sysctl on Linux")
        if scenario.caller_uid != 0:
            return f"an unprivileged checkpoint caller (uid {scenario.caller_uid}): the live checkpoint runs as root"
        if not scenario.freeze:
            return ("the live checkpoint stops the tree itself (ptrace): an unfrozen tree is "
                    "not refused with EBUSY")
        from ckptsim.image import core
        if scenario.restart_flags & ~(core.RESTART_FROZEN | core.RESTART_GHOST
                                      | core.RESTART_TASKSELF):
            return (f"restart flags {scenario.restart_flags:#x}: the live restart supports "
                    "RESTART_FROZEN, RESTART_GHOST and RESTART_TASKSELF")
        if scenario.restart_flags & core.RESTART_TASKSELF and scenario.restart_flags != core.RESTART_TASKSELF:
            return "RESTART_TASKSELF with other restart flags: the process itself becomes the task"
        if scenario.needs:
            return f"needs {', '.join(sorted(scenario.needs))}: the live backend has none of them"
        if shutil.which("unshare") is None:
            return "no unshare(1): the live backend runs each scenario in a new pid namespace"
        for op in scenario.program:
            why = unsupported_op(op)
            if why is not None:
                return why
        return None

    # -- start --------------------------------------------------------------------------------
    def start(self, scenario: Scenario) -> LiveRun:
        tmp = tempfile.mkdtemp(prefix="ckl-")
        os.chmod(tmp, 0o755)
        run = LiveRun(scenario, tmp)
        try:
            for d in ("data", "tmp", "ctl"):
                os.mkdir(os.path.join(tmp, d))
                # tasks of any uid write there; sticky: nobody renames what another made
                # (the interpreter builds and loads a library under ctl)
                os.chmod(os.path.join(tmp, d), 0o1777 if d == "ctl" else 0o777)
            report = os.path.join(run.ctl, "report")
            open(report, "wb").close()
            os.chmod(report, 0o666)
            os.mkfifo(os.path.join(run.ctl, "release"), 0o666)
            os.chmod(os.path.join(run.ctl, "release"), 0o666)
            for path, text in scenario.files:
                full = rewrite(path, tmp, "")
                with open(full, "w") as f:
                    f.write(text)
                os.chmod(full, 0o666)
            prog = os.path.join(run.ctl, "program.json")
            with open(prog, "w") as f:
                json.dump(rewrite_program(scenario.ops, tmp, os.path.basename(tmp)), f)
            env = _env()
            from backend.interp import OWN_UID_ENV, needs_own_uid
            if needs_own_uid(scenario.ops):
                env[OWN_UID_ENV] = str(_fresh_uid())
            # a self-checkpointing program's helper works inside the namespace: it needs a
            # /proc of its pid namespace (as the seed's restart --pidns remounts /proc)
            own_proc = ["--mount-proc"] if scenario.self_image is not None else []
            run.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", *own_proc, sys.executable, "-m",
                 "backend.interp", prog, run.ctl], cwd="/", env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            run.root = self._find_root(run)
            self._wait_quiet(run)
            if scenario.leak is not None:
                self._take_leak(run)
        except BaseException:
            self.cleanup(run)
            raise
        return run

    def _find_root(self, run: LiveRun) -> int:
        from backend import proc
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                kids = proc.children(run.proc.pid)
            except proc.ProcessGone:
                kids = []
            if kids:
                run.seen.add(kids[0])
                return kids[0]
            if run.proc.poll() is not None:
                err = run.proc.stderr.read().decode(errors="replace").strip()
                raise CheckpointFailed(errno.ECHILD, f"the scenario did not start: {err or run.proc.returncode}")
            time.sleep(POLL)
        raise CheckpointFailed(errno.ETIMEDOUT, "the scenario's init did not appear")

    def tree(self, run: LiveRun) -> list[int]:
        from backend import proc
        try:
            pids = proc.subtree(run.root)
        except proc.ProcessGone:
            return []
        run.seen.update(pids)
        return pids

    def _snapshot(self, run: LiveRun):
        from backend import proc
        out = []
        for pid in self.tree(run):
            for tid in proc.list_threads(pid) if proc.process_exists(pid) else []:
                try:
                    st = proc.read_stat(tid)
                except proc.ProcessGone:
                    continue
                out.append((tid, st.state))
        with open(os.path.join(run.ctl, "report"), "rb") as f:
            reports = f.read().count(b"\n")
        return tuple(out), reports

    def _wait_quiet(self, run: LiveRun) -> None:
        """Until every task sleeps (at its point or blocked) and nothing changes for a while."""
        deadline = time.monotonic() + START_TIMEOUT
        last, same = None, 0
        while time.monotonic() < deadline:
            snap = self._snapshot(run)
            busy = any(state not in ("S", "Z", "T", "t", "D") for _, state in snap[0])
            if not busy and snap == last:
                same += 1
                if same >= QUIET_POLLS:
                    return
            else:
                same = 0
            last = snap
            if not snap[0]:
                return  # the tree has ended already (the verdict tells why)
            time.sleep(POLL)
        raise CheckpointFailed(errno.ETIMEDOUT, f"the tree of {run.root} did not settle at its points "
                                                f"within {START_TIMEOUT:.0f} s")

    def _take_leak(self, run: LiveRun) -> None:
        """Hold a duplicate of the init's fd ``leak`` outside the tree (pidfd_getfd)."""
        from backend import kabi
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        pidfd = libc.syscall(kabi.SYS_pidfd_open, run.root, 0)
        if pidfd < 0:
            raise CheckpointFailed(ctypes.get_errno(), f"pidfd_open({run.root})")
        try:
            fd = libc.syscall(kabi.SYS_pidfd_getfd, pidfd, run.scenario.leak, 0)
            if fd < 0:
                raise CheckpointFailed(ctypes.get_errno(), f"pidfd_getfd of fd {run.scenario.leak} of {run.root}")
            run.leak_fd = fd
        finally:
            os.close(pidfd)

    # -- what the world sees --------------------------------------------------------------
    def visible_state(self, run: LiveRun) -> dict:
        from backend import proc
        names: dict = {}

        def name_of(key, kind: str) -> str:
            return names.setdefault(key, f"{kind}#{len(names) + 1}")

        def back(path: str) -> str:
            return path[len(run.tmp):] if path.startswith(run.tmp + "/") else path

        status = {}
        for pid in self.tree(run):
            try:
                status[pid] = proc.read_status(pid)
            except proc.ProcessGone:
                pass
        # numbers in the container's namespace (the root's level; a task in a nested
        # namespace also shows its inner pids, which the restart must give back too)
        level = len(status[run.root].nspid) - 1 if run.root in status else 0

        def at_level(numbers) -> int:
            return numbers[level] if len(numbers) > level else 0
        vpid = {pid: at_level(st.nspid) for pid, st in status.items()}
        tasks, fds, maps, signals = {}, {}, {}, {}
        for pid, st in status.items():
            v = vpid[pid]
            tasks[v] = {"tgid": at_level(st.nstgid), "ppid": vpid.get(st.ppid, 0),
                        "pgid": at_level(st.nspgid), "sid": at_level(st.nssid),
                        "inner_pids": list(st.nspid[level + 1:]),
                        "state": "zombie" if st.state == "Z" else "running", "comm": st.name,
                        "threads": st.threads, "uid": list(st.uid), "gid": list(st.gid)}
            if st.state == "Z":
                continue
            try:
                table = {}
                for f in proc.read_fds(pid):
                    table[f.fd] = {"file": name_of(("file", pid, f.fd, f.ino, f.pos), "file"),
                                   "kind": f.kind.value, "flags": f.flags, "pos": f.pos,
                                   "cloexec": f.cloexec, "path": back(f.path),
                                   "object": name_of(("ino", f.dev, f.ino), f.kind.value)}
                fds[v] = {"fds": table}
                maps[v] = {"vmas": _merge_anonymous(
                    [[m.start, m.end, m.perms, back(m.path)] for m in proc.read_maps(pid)])}
            except proc.ProcessGone:
                continue
            signals[v] = {"blocked": st.sigblk, "pending": st.sigpnd, "shared_pending": st.shdpnd,
                          "ignored": st.sigign, "caught": st.sigcgt}
        return {"tasks": tasks, "fds": fds, "maps": maps, "signals": signals}

    # -- C/R ----------------------------------------------------------------------------------
    def checkpoint(self, run: LiveRun, parent: bytes | None = None) -> bytes:
        """A full image; for an incremental scenario with tracking armed at it, and with
        ``parent`` an incremental image against it (backend/incremental.py)."""
        from backend import dump
        from ckptsim.cr.context import CheckpointError
        if not run.root or not self.tree(run):
            raise CheckpointFailed(errno.ESRCH, "the scenario's tree has ended before its checkpoint")
        buf = io.BytesIO()
        try:
            tracking = self._tracking(run, parent) if run.scenario.incremental else None
            dump.checkpoint(run.root, buf, run.scenario.checkpoint_flags, tracking=tracking)
        except CheckpointError as e:
            raise CheckpointFailed(e.errno, str(e)) from None
        if tracking is not None and (tracking.arm_error or tracking.generation is None):
            raise CheckpointFailed(errno.EIO, f"the tracking session was not armed: "
                                              f"{tracking.arm_error}")
        return buf.getvalue()

    def self_image(self, run: LiveRun, path: str) -> bytes:
        """The image the program's own checkpoint op wrote to ``path`` (rewritten). The data
        dir is writable by all: only a regular file of root or the program's uid that nobody
        else may write is taken (no link followed), as images are written (0600)."""
        import stat
        try:
            fd = os.open(rewrite(path, run.tmp), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise CheckpointFailed(e.errno or errno.EIO,
                                   f"the self-checkpoint's image {path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            owners = {0, os.geteuid()} | ({os.stat(f"/proc/{run.root}").st_uid}
                                         if os.path.exists(f"/proc/{run.root}") else set())
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners \
                    or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise CheckpointFailed(errno.EPERM, f"the self-checkpoint's image {path} is not "
                                                    "a regular 0600-style file of the program's")
            return f.read()

    def check_image(self, run, image: bytes, ancestors=()) -> list[str]:
        from ckptsim.cr.context import CheckpointError
        from ckptsim.cr.replay import replay
        from ckptsim.errors import ImageError
        from ckptsim.image import decode_all
        from ckptsim.kinds import load_all
        load_all()          # a self-checkpoint's image was written elsewhere: no kind known yet
        try:
            decode_all(image)
            report = replay(image, roundtrip=True, chain=list(ancestors) or None)
        except (ImageError, CheckpointError) as e:
            return [f"image does not replay: {e}"]
        problems = [f"replay invariant: {p}" for p in report.problems]
        if report.roundtrip != "identical":
            problems.append(f"image round trip: {report.roundtrip}")
        return problems

    def reports(self, run: LiveRun) -> list[dict]:
        try:
            with open(os.path.join(run.ctl, "report"), "rb") as f:
                lines = f.read().split(b"\n")[:-1]   # a line still being written: later
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"kind": "error", "pid": 0, "message": f"bad report line {line!r}"})
        return out

    def reported_problems(self, run: LiveRun) -> list[str]:
        """Failed checks, unsupported ops and interpreter errors reported so far."""
        problems = []
        for r in self.reports(run):
            if r["kind"] == "FAIL":
                problems.append(f"check failed in pid {r['pid']}: {r['label']}: got {r['got']!r}, want {r['want']!r}")
            elif r["kind"] == "unsupported":
                problems.append(f"pid {r['pid']}: {r['reason']}")
            elif r["kind"] == "error":
                problems.append(f"interpreter error in pid {r['pid']}: {r['message']}")
        return problems

    def kill(self, run: LiveRun) -> None:
        """SIGKILL the init (the pid namespace dies with it) and reap it (`unshare`, or the
        restored init, this process's child)."""
        self._end_session(run)
        if run.restored is not None:
            self._kill_restored(run)
            return
        if run.proc is None:
            return
        if run.proc.poll() is None and run.root:
            try:
                os.kill(run.root, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            run.proc.wait(timeout=END_TIMEOUT)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait()
        if run.exit_status is None:
            run.exit_status = run.proc.returncode
        if run.proc.stderr is not None:
            run.proc.stderr.close()
        self._wait_gone(run)

    def _kill_restored(self, run: LiveRun) -> None:
        child = run.restored.child
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reap_restored(run, END_TIMEOUT)
        self._wait_gone(run)

    def _reap_restored(self, run: LiveRun, timeout: float) -> None:
        """Wait (at most ``timeout``) for the restored init; its status as Popen reports one."""
        child = run.restored.child
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                run.exit_status = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                                   else os.WEXITSTATUS(status))
                return
            if time.monotonic() > deadline:
                return
            time.sleep(POLL)

    def _wait_gone(self, run: LiveRun) -> None:
        deadline = time.monotonic() + END_TIMEOUT
        while time.monotonic() < deadline:
            alive = [p for p in run.seen if os.path.exists(f"/proc/{p}")]
            if not alive:
                return
            time.sleep(POLL)

    def restart(self, run, image: bytes, ancestors=()) -> None:
        from backend.restore.job import restart_image
        from ckptsim.cr.context import CheckpointError
        from ckptsim.errors import CkptsimError
        from ckptsim.image import core
        frozen = bool(run.scenario.restart_flags & core.RESTART_FROZEN)
        try:
            if run.scenario.restart_flags & core.RESTART_GHOST:
                restored = self._restart_ghost(run, image, frozen, _env())
            elif run.scenario.restart_flags & core.RESTART_TASKSELF:
                restored = self._restart_taskself(image)
            else:
                restored = restart_image(image, pidns=True, frozen=frozen,
                                         chain=list(ancestors) or None)
        except (CheckpointError, CkptsimError, OSError) as e:
            raise CheckpointFailed(getattr(e, "errno", None) or errno.EIO, str(e)) from None
        if run.proc is not None and run.proc.stderr is not None:
            run.proc.stderr.close()
        run.restored = restored
        run.root = restored.root
        run.seen.update(restored.pids.values())
        run.seen.add(restored.child)
        run.exit_status = None
        if not frozen:
            self._wait_quiet(run)

    def is_frozen(self, run) -> bool:
        from backend import proc
        states = [proc.read_stat(pid).state for pid in self.tree(run)]
        return bool(states) and all(s in ("T", "t", "Z") for s in states)

    def thaw(self, run) -> None:
        for pid in self.tree(run):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._wait_quiet(run)

    def resume(self, run: LiveRun) -> None:
        """Release every point (now and later) and let the program run to its end."""
        if run.release_fd is None:
            run.release_fd = os.open(os.path.join(run.ctl, "release"), os.O_RDWR | os.O_CLOEXEC)
        if run.leak_fd is not None:
            os.close(run.leak_fd)
            run.leak_fd = None
        if run.restored is not None:
            self._reap_restored(run, END_TIMEOUT)
            return
        try:
            run.proc.wait(timeout=END_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        if run.proc.returncode is not None:
            run.exit_status = run.proc.returncode

    def verdict(self, run: LiveRun) -> list[str]:
        problems = self.reported_problems(run)
        if run.exit_status is None:
            problems.append(f"container init did not finish within {END_TIMEOUT:.0f} s")
        elif run.exit_status != 0:
            problems.append(f"container init exited with status {run.exit_status}"
                            if run.exit_status > 0 else f"container init killed by signal {-run.exit_status}")
        return problems

    def _end_session(self, run: LiveRun) -> None:
        from backend import track
        from backend.incremental import LastCheckpoint
        session, run.session = run.session, None
        if session is not None:
            try:
                session.stop()
            except track.TrackError:
                session.close()
            LastCheckpoint.forget(session.root)

    def cleanup(self, run: LiveRun) -> None:
        try:
            self._end_session(run)
            self.kill(run)
        finally:
            for attr in ("release_fd", "leak_fd"):
                fd = getattr(run, attr)
                if fd is not None:
                    os.close(fd)
                    setattr(run, attr, None)
            shutil.rmtree(run.tmp, ignore_errors=True)

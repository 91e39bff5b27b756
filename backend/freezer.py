"""Stop a live tree with the cgroup freezer (``checkpoint --freezer``), as Linux-CR's
checkpoint(1) did, and still get every thread into a ptrace stop for its registers.

Public API:

    hierarchy(version=None) -> Hierarchy        the freezer to use: v1 (a cgroup v1 hierarchy
                                                with the freezer controller) when mounted,
                                                else v2 (cgroup.freeze); FreezerError if neither
    frozen_seized(root, *, version=None, timeout=10.0, options=ptrace.DEFAULT_OPTIONS)
                                                context manager -> ptrace.Seized: every thread of
                                                the tree at ``root`` stopped (as ptrace.seized),
                                                the tree moved through a temporary cgroup
    TempCgroup(h)                               the temporary cgroup itself (create, move_in,
                                                freeze, thaw, wait_frozen, thread_ids,
                                                move_back, remove)
    FreezerError                                an OSError (errno set) with a one-line message

How the tree is stopped (the order matters, it was measured on this kernel, Linux 6.18):
 1. a temporary cgroup ``ckptsim-<our pid>-<random hex>`` is made at the top of the
    hierarchy; each process's original cgroup is read from /proc/PID/cgroup;
 2. every process of the tree is moved into it (cgroup.procs: all its threads at once; a
    thread cloned afterwards starts in its creator's cgroup, i.e. ours);
 3. the cgroup is frozen (v1: freezer.state FROZEN, polled until it reads FROZEN, not
    FREEZING; v2: cgroup.freeze 1, polled until cgroup.events says "frozen 1");
 4. the tree is listed again: a process forked between the first listing and its parent's
    move (so still in its old cgroup, still running) is moved in too - moving a task into a
    frozen cgroup freezes it - and 3-4 repeat until every thread of every process of the
    tree is in the cgroup and the cgroup is frozen. Frozen tasks cannot fork: the set is final;
 5. every thread is PTRACE_SEIZEd and PTRACE_INTERRUPTed *while frozen* (both work on a frozen
    task: they only set trap bits and wake it);
 6. the cgroup is thawed, and only then are the ptrace stops waited for. With v1 a frozen
    task sits in the refrigerator (TASK_FROZEN), which the interrupt's wake-up does not end:
    its PTRACE_INTERRUPT trap is taken right after the thaw, on its way out of the kernel,
    before it returns to user space (a task frozen inside a sleep wakes with TIF_SIGPENDING,
    the syscall returns -ERESTART*, exactly as with a plain ptrace interrupt). With v2 the
    frozen task sits in the signal path's freezer trap, and a pending ptrace trap takes
    precedence there, so the stop is reached while still frozen; the thaw is then a no-op
    for tasks in a ptrace stop. Either way the tree never runs user code between the freeze
    and the ptrace stops.
The dump then runs on ptrace-stopped threads exactly as without --freezer. On exit - normal,
exception, Ctrl-C (SIGINT/SIGTERM/SIGHUP/SIGQUIT are held back while this runs) - in this
order: thaw (so that pending interrupts land and no task stays frozen), move every process
back to its original cgroup (while still ptrace-stopped, so none forks into the temporary
cgroup), detach every thread, move back anything still in the temporary cgroup (a task forked
after all, e.g. on an error path, goes to the root process's original cgroup) and remove it.
If the checkpointer itself is SIGKILLed half-way, the kernel detaches the tracees but the tree
may stay frozen in ``ckptsim-<pid>-*``: ``echo THAWED > .../freezer.state`` (v1) or
``echo 0 > .../cgroup.freeze`` (v2) and move the tasks back by hand.

Limits: the original cgroup is recorded per process (a v1 process whose threads sat in
different freezer cgroups comes back with all its threads in the leader's); the hierarchy's
mount is assumed to show its root (no cgroup namespace in between); a tree containing the
checkpointer itself (e.g. pid 1's) is refused before anything is frozen.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Iterator

from ckptsim.errors import CkptsimError

from . import kabi, proc, ptrace

__all__ = ["FreezerError", "Hierarchy", "TempCgroup", "hierarchy", "frozen_seized"]

DEFAULT_TIMEOUT = 10.0
_SHIELD = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}


class FreezerError(CkptsimError, OSError):
    """The cgroup freezer could not be used; ``.errno`` set, a one-line message."""

    def __init__(self, err: int, message: str):
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        return self.strerror


@dataclass(frozen=True)
class Hierarchy:
    version: int            # 1 or 2
    mount: str              # where the hierarchy is mounted

    @property
    def name(self) -> str:
        return "cgroup v1 freezer" if self.version == 1 else "cgroup v2"


def _mounts() -> list[tuple[str, str, list[str]]]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            p = line.split()
            if len(p) >= 4:
                out.append((p[1].replace("\\040", " "), p[2], p[3].split(",")))
    return out


def hierarchy(version: int | None = None) -> Hierarchy:
    """The freezer hierarchy to use: ``version`` 1 or 2, or None for v1 when a v1 hierarchy
    with the freezer controller is mounted, else v2. FreezerError (ENOSYS) if none works."""
    if version not in (None, 1, 2):
        raise FreezerError(errno.EINVAL, f"unknown cgroup freezer version {version!r}")
    mounts = _mounts()
    found = {}
    for point, fstype, opts in mounts:
        if fstype == "cgroup" and "freezer" in opts and 1 not in found:
            if os.path.exists(os.path.join(point, "freezer.state")) or os.path.exists(
                    os.path.join(point, "cgroup.procs")):
                found[1] = Hierarchy(1, point)
        elif fstype == "cgroup2" and 2 not in found:
            found[2] = Hierarchy(2, point)
    for v in ((version,) if version else (1, 2)):
        if v in found:
            return found[v]
    wanted = {None: "no cgroup v1 hierarchy with the freezer controller and no cgroup2",
              1: "no cgroup v1 hierarchy with the freezer controller",
              2: "no cgroup2 hierarchy"}[version]
    raise FreezerError(errno.ENOSYS, f"--freezer: {wanted} is mounted (mount -t cgroup -o "
                                     "freezer none /sys/fs/cgroup/freezer, or mount -t cgroup2 "
                                     "none /sys/fs/cgroup)")


def _write(path: str, value: str, what: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise FreezerError(e.errno or errno.EIO, f"{what}: writing {value!r} to {path}: "
                                                 f"{os.strerror(e.errno or errno.EIO)}") from None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def original_cgroup(h: Hierarchy, pid: int) -> str | None:
    """The cgroup of ``pid`` in hierarchy ``h`` (a path from the hierarchy's root), from
    /proc/PID/cgroup; None if the process is gone."""
    try:
        text = _read(f"/proc/{pid}/cgroup")
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        hid, controllers, path = line.split(":", 2)
        if h.version == 2 and hid == "0" and controllers == "":
            return path
        if h.version == 1 and "freezer" in controllers.split(","):
            return path
    raise FreezerError(errno.ENOENT, f"process {pid} is in no {h.name} cgroup "
                                     f"(/proc/{pid}/cgroup)")


class TempCgroup:
    """A temporary freezer cgroup under the hierarchy's root."""

    def __init__(self, h: Hierarchy):
        self.h = h
        self.name = f"ckptsim-{os.getpid()}-{os.urandom(4).hex()}"
        self.path = os.path.join(h.mount, self.name)
        self.created = False
        self.frozen = False
        self.origins: dict[int, str] = {}      # pid -> its original cgroup path

    def create(self) -> None:
        try:
            os.mkdir(self.path, 0o700)
        except OSError as e:
            raise FreezerError(e.errno or errno.EIO, f"--freezer: cannot create {self.path}: "
                                                     f"{os.strerror(e.errno or errno.EIO)}") from None
        self.created = True
        control = "freezer.state" if self.h.version == 1 else "cgroup.freeze"
        if not os.path.exists(os.path.join(self.path, control)):
            raise FreezerError(errno.ENOSYS, f"--freezer: {self.path} has no {control}")

    def _cg_path(self, rel: str) -> str:
        return os.path.join(self.h.mount, rel.lstrip("/"))

    def move_in(self, pid: int) -> bool:
        """Move process ``pid`` (all its threads) in, remembering where it was. False if it
        is gone (or a zombie: it has nothing left to freeze)."""
        if pid not in self.origins:
            origin = original_cgroup(self.h, pid)
            if origin is None:
                return False
            if origin.rstrip("/") == "/" + self.name:
                raise FreezerError(errno.EBUSY, f"process {pid} is already in {self.path}")
            self.origins[pid] = origin
        try:
            _write(os.path.join(self.path, "cgroup.procs"), str(pid), f"--freezer: process {pid}")
        except FreezerError as e:
            if e.errno == errno.ESRCH:      # gone, or a zombie
                return False
            raise
        return True

    def thread_ids(self) -> set[int]:
        """Every thread in the cgroup (v1: tasks; v2: cgroup.threads)."""
        name = "tasks" if self.h.version == 1 else "cgroup.threads"
        return {int(x) for x in _read(os.path.join(self.path, name)).split()}

    def freeze(self) -> None:
        self.frozen = True                  # set first: thawed on every path from here on
        if self.h.version == 1:
            _write(os.path.join(self.path, "freezer.state"), "FROZEN", "--freezer")
        else:
            _write(os.path.join(self.path, "cgroup.freeze"), "1", "--freezer")

    def thaw(self) -> None:
        if self.h.version == 1:
            _write(os.path.join(self.path, "freezer.state"), "THAWED", "--freezer")
        else:
            _write(os.path.join(self.path, "cgroup.freeze"), "0", "--freezer")
        self.frozen = False

    def is_frozen(self) -> bool:
        if self.h.version == 1:
            return _read(os.path.join(self.path, "freezer.state")).strip() == "FROZEN"
        return "frozen 1" in _read(os.path.join(self.path, "cgroup.events")).splitlines()

    def wait_frozen(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while not self.is_frozen():
            if time.monotonic() > deadline:
                stuck = []
                for tid in sorted(self.thread_ids()):
                    with contextlib.suppress(OSError):
                        for line in _read(f"/proc/{tid}/status").splitlines():
                            if line.startswith("State:"):
                                stuck.append(f"{tid} {line.split(None, 1)[1]}")
                raise FreezerError(errno.ETIMEDOUT, f"--freezer: the tree did not freeze within "
                                                    f"{timeout:g} s (threads: {', '.join(stuck)})")
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def move_back(self, pids=None) -> list[str]:
        """Move processes back to their original cgroups; the errors (one line each)."""
        errors = []
        for pid in (self.origins if pids is None else pids):
            origin = self.origins.get(pid)
            if origin is None:
                continue
            try:
                _write(os.path.join(self._cg_path(origin), "cgroup.procs"), str(pid),
                       f"--freezer: moving process {pid} back")
            except FreezerError as e:
                if e.errno != errno.ESRCH:
                    errors.append(str(e))
        return errors

    def remove(self, fallback: str | None, timeout: float = 5.0) -> list[str]:
        """Move anything left (tasks forked into the cgroup) to ``fallback`` and rmdir it."""
        errors: list[str] = []
        if not self.created:
            return errors
        deadline = time.monotonic() + timeout
        while True:
            try:
                left = [int(x) for x in _read(os.path.join(self.path, "cgroup.procs")).split()]
            except FileNotFoundError:
                self.created = False
                return errors
            for pid in left:
                origin = self.origins.get(pid, fallback)
                if origin is not None:
                    with contextlib.suppress(FreezerError):
                        _write(os.path.join(self._cg_path(origin), "cgroup.procs"), str(pid),
                               "--freezer")
            try:
                os.rmdir(self.path)
                self.created = False
                return errors
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    errors.append(f"--freezer: cannot remove {self.path}: {os.strerror(e.errno)}")
                    return errors
            time.sleep(0.01)                 # exiting tasks still counted: try again


def _freeze_tree(cg: TempCgroup, root: int, timeout: float) -> list[int]:
    """Steps 2-4 of the module doc; returns the tree's pids (pre-order) once all are frozen."""
    me = os.getpid()
    while True:
        pids = proc.subtree(root)
        if me in pids:
            raise FreezerError(errno.EINVAL, f"the tree of process {root} contains the "
                                             f"checkpointer (pid {me}) itself")
        inside = cg.thread_ids()
        missing = [pid for pid in pids
                   if any(t not in inside and not _is_zombie(t) for t in _threads(pid))]
        if not missing and cg.frozen:
            return pids         # waited for below, and nothing moved in since: all frozen
        for pid in missing:
            if not cg.move_in(pid) and any(not _is_zombie(t) for t in _threads(pid)):
                raise FreezerError(errno.EBUSY, f"--freezer: cannot move process {pid} into "
                                                f"{cg.path}")
        if not cg.frozen:
            cg.freeze()
        cg.wait_frozen(timeout)


def _threads(pid: int) -> list[int]:
    try:
        return proc.list_threads(pid)
    except proc.ProcessGone:
        return []


def _is_zombie(tid: int) -> bool:
    try:
        return proc.read_stat(tid).state in ("Z", "X")
    except proc.ProcessGone:
        return True


def _seize_frozen(seized: ptrace.Seized, pids: list[int], cg: TempCgroup) -> None:
    """Steps 5-6: seize and interrupt every thread while frozen, thaw, collect the stops.
    Fills ``seized`` as ptrace.Seized.add would (threads, stops, zombies)."""
    batch: list[tuple[int, int]] = []
    for pid in pids:
        seized.threads.setdefault(pid, [])
        seized.zombies.setdefault(pid, [])
        for tid in _threads(pid):
            if tid in seized._known:
                continue
            seized._known.add(tid)
            seized._traced.append(tid)          # recorded first: released on every path
            try:
                ptrace.seize(tid, seized.options)
            except ptrace.ThreadGone:
                continue
            except ptrace.PtraceError as e:
                if e.errno == errno.EPERM and "zombie" in e.strerror:
                    seized.zombies[pid].append(tid)
                    continue
                raise ptrace.PtraceError(e.errno, f"process {pid}: {e.strerror}") from None
            try:
                kabi.syscall(kabi.SYS_ptrace, kabi.PTRACE_INTERRUPT, tid, 0, 0,
                             what=f"PTRACE_INTERRUPT of tid {tid}")
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise
            batch.append((pid, tid))
    cg.thaw()
    for pid, tid in batch:
        try:
            seized.stops[tid] = ptrace.wait_stop(tid, seized.timeout)
        except ptrace.ThreadGone:
            continue
        seized.threads[pid].append(tid)
    for pid in pids:
        seized.threads[pid].sort()
        seized.zombies[pid].sort()
        if not seized.threads[pid] and not seized.zombies[pid]:
            del seized.threads[pid], seized.zombies[pid]   # exited meanwhile


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SHIELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def frozen_seized(root: int, *, version: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                  options: int = ptrace.DEFAULT_OPTIONS) -> Iterator[ptrace.Seized]:
    """Freeze the tree at ``root`` in a temporary cgroup, then ptrace-stop every thread of it
    (see the module doc for the order); yields a ptrace.Seized like ptrace.seized(). On exit,
    whatever happened: thawed, back in the original cgroups, detached, the cgroup removed."""
    h = hierarchy(version)
    cg = TempCgroup(h)
    seized = ptrace.Seized(options=options, timeout=timeout)
    try:
        with _shielded():                       # Ctrl-C waits until the tree is stopped
            cg.create()
            pids = _freeze_tree(cg, root, timeout)
            _seize_frozen(seized, pids, cg)
        yield seized
    except BaseException:
        with contextlib.suppress(FreezerError):  # the first error is the one to report
            _cleanup(cg, seized, root)
        raise
    _cleanup(cg, seized, root)


def _cleanup(cg: TempCgroup, seized: ptrace.Seized, root: int) -> None:
    errors: list[str] = []
    deferred: BaseException | None = None
    with _shielded():
        if cg.created:
            try:
                cg.thaw()                       # idempotent; first, so interrupts can land
            except FreezerError as e:
                errors.append(str(e))
            errors += cg.move_back()            # while still ptrace-stopped: nothing forks
        try:
            seized.release_all()
        except KeyboardInterrupt as e:          # noqa: PERF203 - delivered to another thread
            deferred = e
        except Exception as e:                  # noqa: BLE001 - still remove the cgroup
            errors.append(str(e))
        errors += cg.remove(cg.origins.get(root) or (next(iter(cg.origins.values()), None)))
    if deferred is not None:
        raise deferred
    if errors:
        raise FreezerError(errno.EIO, "; ".join(errors))

"""Task syscalls: clone/fork, exit, wait, exec, sessions and process groups, freezer."""
from __future__ import annotations

import errno
import posixpath

from ..errors import kerr
from .sched import Blocked
from .shared import Shared
from .task import Cgroup, Pid, PidNamespace, Task

CLONE_VM = 0x100
CLONE_FS = 0x200
CLONE_FILES = 0x400
CLONE_SIGHAND = 0x800
CLONE_PARENT = 0x8000
CLONE_THREAD = 0x10000
CLONE_NEWPID = 0x20000000
CLONE_KNOWN = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_PARENT | CLONE_THREAD | CLONE_NEWPID

WNOHANG = 1
SIGCHLD = 17
SIGKILL = 9


def exit_status(code: int) -> int:
    """The wait status of a normal exit with ``code``."""
    return (code & 0xFF) << 8


class TaskOps:
    """Mixin of Kernel: the task-tree syscalls."""

    # -- lookup -------------------------------------------------------------------------
    def find_task(self, caller: Task, nr: int) -> Task:
        """The task with pid ``nr`` in the caller's pid namespace (ESRCH if none)."""
        pid = caller.ns.pids.get(nr)
        task = self.task_by_pid.get(pid) if pid is not None else None
        if task is None or task.state == "dead":
            raise kerr(errno.ESRCH, f"no task {nr}")
        return task

    def observed_pid(self, t: Task) -> int:
        """The task's tgid as the task itself sees it (what getpid returns)."""
        return t.leader.pid.nr_in(t.ns)

    def getpid(self, t: Task) -> int:
        return self.observed_pid(t)

    def gettid(self, t: Task) -> int:
        return t.pid.nr_in(t.ns)

    def getppid(self, t: Task) -> int:
        parent = t.leader.parent
        return parent.leader.pid.nr_in(t.ns) if parent is not None else 0

    def getpgid(self, t: Task, nr: int = 0) -> int:
        target = t if nr == 0 else self.find_task(t, nr)
        return target.leader.pgrp.nr_in(t.ns)

    def getsid(self, t: Task, nr: int = 0) -> int:
        target = t if nr == 0 else self.find_task(t, nr)
        return target.leader.session.nr_in(t.ns)

    def live_tasks(self) -> list[Task]:
        """Every task that is not reaped, in global-id order."""
        return sorted((t for t in self.task_by_pid.values() if t.state != "dead"), key=lambda t: t.tid)

    # -- creation ---------------------------------------------------------------------------
    def new_pid(self, ns: PidNamespace, set_tid: list[int] | None = None) -> Pid:
        """Allocate a pid in ``ns`` and each ancestor. ``set_tid`` is clone3's, innermost first."""
        chain = ns.ancestry()
        wanted = list(set_tid or [])
        if len(wanted) > len(chain):
            raise kerr(errno.EINVAL, f"set_tid has {len(wanted)} levels, namespace depth is {len(chain)}")
        numbers = []
        for depth, level_ns in enumerate(reversed(chain)):  # innermost first, as clone3
            want = wanted[depth] if depth < len(wanted) and wanted[depth] else None
            numbers.append((level_ns, level_ns.alloc_nr(want)))
        return Pid(numbers[::-1])

    def clone(self, t: Task, flags: int = 0, set_tid: list[int] | None = None) -> Task:
        if flags & ~CLONE_KNOWN:
            raise kerr(errno.EINVAL, f"unknown clone flags {flags & ~CLONE_KNOWN:#x}")
        if flags & CLONE_THREAD and not flags & CLONE_SIGHAND:
            raise kerr(errno.EINVAL, "CLONE_THREAD needs CLONE_SIGHAND")
        if flags & CLONE_SIGHAND and not flags & CLONE_VM:
            raise kerr(errno.EINVAL, "CLONE_SIGHAND needs CLONE_VM")
        if flags & CLONE_NEWPID and flags & CLONE_THREAD:
            raise kerr(errno.EINVAL, "CLONE_NEWPID with CLONE_THREAD")
        if t.state != "running":
            raise kerr(errno.ESRCH, "caller is exiting")
        ns = PidNamespace(t.ns) if flags & CLONE_NEWPID else t.ns
        if ns.reaper is not None and ns.reaper.state != "running" and not flags & CLONE_NEWPID:
            raise kerr(errno.ENOMEM, "pid namespace init has exited")
        if set_tid and not self.capable(t, 40):  # CAP_CHECKPOINT_RESTORE
            raise kerr(errno.EPERM, "set_tid needs CAP_CHECKPOINT_RESTORE")
        child = Task(self, self.new_pid(ns, set_tid), t.comm)
        if flags & CLONE_NEWPID:
            ns.reaper = child
        self.task_by_pid[child.pid] = child
        child.mm = t.mm.get() if flags & CLONE_VM else t.mm.fork_copy(self)
        child.files = Shared.get(t.files) if flags & CLONE_FILES else t.files.fork_copy(self)
        child.fs = t.fs.get() if flags & CLONE_FS else t.fs.fork_copy()
        child.sighand = t.sighand.get() if flags & CLONE_SIGHAND else t.sighand.fork_copy()
        child.signal = t.signal.get() if flags & CLONE_THREAD else t.signal.fork_copy()
        child.sigstate = t.sigstate.fork_copy(shares_vm=bool(flags & CLONE_VM))
        child.cred = t.cred
        child.cpu = t.cpu.copy()
        child.program = t.program
        child.cgroup = t.cgroup
        if child.cgroup is not None:
            child.cgroup.members.append(child)
        if flags & CLONE_THREAD:
            child.leader = t.leader
            t.leader.threads.append(child)
            child.threads = []
            child.exit_signal = -1
        else:
            parent = t.leader.parent if flags & CLONE_PARENT else t.leader
            if parent is None:
                raise kerr(errno.EINVAL, "CLONE_PARENT from a task without a parent")
            child.parent = parent
            parent.children.append(child)
            child.pgrp = t.leader.pgrp.attach()
            child.session = t.leader.session.attach()
        return child

    def fork(self, t: Task) -> int:
        return self.clone(t).pid.nr_in(t.ns)

    # -- exit and wait ------------------------------------------------------------------------
    def exit(self, t: Task, code: int = 0) -> None:
        """exit(2): this thread ends; the group ends with its last thread."""
        self._exit_thread(t, exit_status(code))

    def exit_group(self, t: Task, code: int = 0) -> None:
        self.do_group_exit(t, exit_status(code))

    def do_group_exit(self, t: Task, wait_status: int) -> None:
        """End every thread of t's group; the group's wait status is ``wait_status``."""
        leader = t.leader
        for thread in [th for th in leader.threads if th is not leader] + [leader]:
            if thread.state not in ("zombie", "dead"):
                self._exit_thread(thread, wait_status)

    def _exit_thread(self, t: Task, wait_status: int) -> None:
        if t.state in ("zombie", "dead"):
            raise kerr(errno.ESRCH, f"task {t.tid} already exited")
        t.exit_code = wait_status
        for attr in ("mm", "files", "fs", "sighand"):
            obj = getattr(t, attr)
            if obj is not None:
                setattr(t, attr, None)
                obj.put(self)
        leader = t.leader
        if t is not leader:
            leader.threads.remove(t)
            t.state = "dead"
            self._forget(t)
            if leader.state == "zombie" and len(leader.threads) == 1:
                self._group_exited(leader)
            return
        t.state = "zombie"
        if len(leader.threads) == 1:
            self._group_exited(leader)

    def _group_exited(self, leader: Task) -> None:
        """The last thread of a group is gone: reparent children, notify the parent."""
        ns = leader.ns
        if ns.reaper is leader:
            # A pid namespace dies with its init: every other task in it is killed.
            for other in self.live_tasks():
                if other is not leader and other.ns.level >= ns.level and other.pid.nr_in(ns):
                    if other.state == "running" or other.state == "stopped":
                        self.do_group_exit(other, SIGKILL)
        for child in list(leader.children):
            self._reparent(child, leader)
        parent = leader.parent
        autoreap = parent is None or leader.exit_signal < 0 or self.ignores_sigchld(parent)
        if parent is not None and leader.exit_signal > 0:
            self.send_signal(parent, leader.exit_signal)
        if autoreap:
            self._reap(leader)

    def _reparent(self, child: Task, dying: Task) -> None:
        # The dying task's namespace decides (Linux's find_new_reaper): a child that is the
        # init of a nested namespace is its own ns's reaper and must not become its own child.
        reaper = dying.ns.reaper
        while reaper is not None and (reaper is dying or reaper.state != "running"):
            ns = reaper.ns.parent
            reaper = ns.reaper if ns is not None else None
        dying.children.remove(child)
        child.parent = reaper
        if reaper is None:
            if child.state == "zombie":
                self._reap(child)
            return
        reaper.children.append(child)
        if child.state == "zombie":
            if self.ignores_sigchld(reaper):
                self._reap(child)
            else:
                self.send_signal(reaper, SIGCHLD)

    def ignores_sigchld(self, parent: Task) -> bool:
        sighand = parent.leader.sighand
        return sighand is not None and sighand.action(SIGCHLD).handler == 1  # SIG_IGN

    def _reap(self, leader: Task) -> None:
        if leader.parent is not None:
            leader.parent.children.remove(leader)
            leader.parent = None
        leader.state = "dead"
        if leader.signal is not None:
            sig, leader.signal = leader.signal, None
            sig.put(self)
        for pid in (leader.pgrp, leader.session):
            if pid is not None:
                pid.detach()
        leader.pgrp = leader.session = None
        self._forget(leader)

    def _forget(self, t: Task) -> None:
        if t.cgroup is not None:
            t.cgroup.members.remove(t)
            t.cgroup = None
        if t.signal is not None and t is not t.leader:
            sig, t.signal = t.signal, None
            sig.put(self)
        self.task_by_pid.pop(t.pid, None)
        t.pid.detach()

    def wait4(self, t: Task, pid: int = -1, options: int = 0) -> tuple[int, int]:
        """Reap a zombie child: (pid as seen by t, wait status); (0, 0) with WNOHANG."""
        leader = t.leader
        candidates = leader.children
        if pid > 0:
            candidates = [c for c in candidates if c.pid.nr_in(t.ns) == pid]
        elif pid == 0:
            candidates = [c for c in candidates if c.pgrp is leader.pgrp]
        elif pid < -1:
            candidates = [c for c in candidates if c.pgrp.nr_in(t.ns) == -pid]
        if not candidates:
            raise kerr(errno.ECHILD, "no such child")
        for child in candidates:
            if child.state == "zombie" and len(child.threads) == 1:
                nr, status = child.pid.nr_in(t.ns), child.exit_code
                self._reap(child)
                return nr, status
        if options & WNOHANG:
            return 0, 0
        raise Blocked("wait4")

    # -- exec -------------------------------------------------------------------------------
    def execve(self, t: Task, path: str) -> int:
        """Run the program stored in the file at ``path`` (a JSON list of operations)."""
        fd = self.open(t, path, 0)
        exe = t.files.get(fd).get()
        self.close(t, fd)
        try:
            program = self.load_program(exe)
        except ValueError as e:
            exe.put(self)
            raise kerr(errno.ENOEXEC, f"{path}: {e}") from None
        leader = t.leader
        for thread in [th for th in leader.threads if th is not t]:
            self._exit_thread(thread, SIGKILL)
        if t is not leader:
            raise kerr(errno.EINVAL, "execve from a non-leader thread is not modelled")
        if t.mm.refs > 1:
            old, t.mm = t.mm, type(t.mm).new(self)
            old.put(self)
        t.mm.exec_reset(self, exe)
        exe.put(self)
        if t.files.refs > 1:
            old, t.files = t.files, t.files.fork_copy(self)
            old.put(self)
        t.files.close_on_exec(self)
        if t.sighand.refs > 1:
            old, t.sighand = t.sighand, t.sighand.fork_copy()
            old.put(self)
        t.sighand.reset_for_exec()
        t.sigstate.reset_for_exec()
        t.cred = t.cred.after_exec()
        t.comm = posixpath.basename(path)[:15]
        t.program = program
        t.cpu = type(t.cpu)()
        return 0

    # -- sessions and groups ---------------------------------------------------------------
    def setsid(self, t: Task) -> int:
        leader = t.leader
        if any(task.leader.pgrp is leader.pid for task in self.live_tasks() if task.leader.pgrp):
            raise kerr(errno.EPERM, "caller is a process group leader")
        old_pgrp, old_session = leader.pgrp, leader.session
        leader.pgrp = leader.pid.attach()
        leader.session = leader.pid.attach()
        old_pgrp.detach()
        old_session.detach()
        return leader.pid.nr_in(t.ns)

    def setpgid(self, t: Task, nr: int = 0, pgid: int = 0) -> int:
        target = t.leader if nr == 0 else self.find_task(t, nr).leader
        if target is not t.leader and target.parent is not t.leader:
            raise kerr(errno.ESRCH, f"{nr} is neither the caller nor its child")
        if target.session is not t.leader.session:
            raise kerr(errno.EPERM, "target is in another session")
        if target.session is target.pid:
            raise kerr(errno.EPERM, "target is a session leader")
        if pgid < 0:
            raise kerr(errno.EINVAL, f"pgid {pgid}")
        if pgid == 0 or pgid == target.pid.nr_in(t.ns):
            new = target.pid
        else:
            new = t.ns.pids.get(pgid)
            members = [x for x in self.live_tasks() if x.leader.pgrp is new and new is not None]
            if not members or members[0].leader.session is not target.session:
                raise kerr(errno.EPERM, f"no process group {pgid} in the caller's session")
        old, target.pgrp = target.pgrp, new.attach()
        old.detach()
        return 0

    # -- freezer cgroup ------------------------------------------------------------------
    def cgroup(self, path: str) -> Cgroup:
        try:
            return self.cgroups[path]
        except KeyError:
            raise kerr(errno.ENOENT, f"no cgroup {path}") from None

    def cgroup_create(self, t: Task, path: str) -> int:
        parent_path = posixpath.dirname(path.rstrip("/")) or "/"
        if path in self.cgroups:
            raise kerr(errno.EEXIST, path)
        parent = self.cgroup(parent_path)
        self.cgroups[path] = Cgroup(posixpath.basename(path), parent)
        return 0

    def cgroup_attach(self, t: Task, path: str, nr: int = 0) -> int:
        cg = self.cgroup(path)
        target = t if nr == 0 else self.find_task(t, nr)
        for thread in list(target.leader.threads):
            if thread.cgroup is not None:
                thread.cgroup.members.remove(thread)
            thread.cgroup = cg
            cg.members.append(thread)
        return 0

    def freeze(self, t: Task, path: str) -> int:
        self.cgroup(path).frozen = True
        return 0

    def thaw(self, t: Task, path: str) -> int:
        self.cgroup(path).frozen = False
        return 0

    def capable(self, t: Task, cap: int) -> bool:
        return bool(t.cred.cap_effective >> cap & 1)

"""Tasks, pids and pid namespaces, and the freezer cgroup."""
from __future__ import annotations

import errno
from dataclasses import dataclass, field

from ..errors import kerr

PID_MAX = 4 * 1024 * 1024
NR_REGS = 64  # the model CPU's registers


class PidNamespace:
    """A pid namespace: numbers are allocated upwards and never reused while in use."""

    def __init__(self, parent: PidNamespace | None):
        self.parent = parent
        self.level = 0 if parent is None else parent.level + 1
        self.pids: dict[int, Pid] = {}
        self.last_pid = 0
        self.reaper: Task | None = None  # the namespace's init (pid 1), once created

    def ancestry(self) -> list[PidNamespace]:
        """This namespace and its ancestors, root first."""
        chain, ns = [], self
        while ns is not None:
            chain.append(ns)
            ns = ns.parent
        return chain[::-1]

    def alloc_nr(self, wanted: int | None = None) -> int:
        if wanted is not None:
            if not 0 < wanted < PID_MAX:
                raise kerr(errno.EINVAL, f"pid {wanted} out of range")
            if wanted in self.pids:
                raise kerr(errno.EEXIST, f"pid {wanted} is in use")
            self.last_pid = max(self.last_pid, wanted)
            return wanted
        nr = self.last_pid + 1
        while nr in self.pids:
            nr += 1
        if nr >= PID_MAX:
            raise kerr(errno.EAGAIN, "pid space exhausted")
        self.last_pid = nr
        return nr


class Pid:
    """A struct pid: one number per namespace level, alive while tasks or groups use it."""

    def __init__(self, numbers: list[tuple[PidNamespace, int]]):
        self.numbers = numbers
        self.users = 0
        for ns, nr in numbers:
            ns.pids[nr] = self

    @property
    def ns(self) -> PidNamespace:
        return self.numbers[-1][0]

    def nr_in(self, ns: PidNamespace) -> int:
        """The number as seen from ``ns``; 0 if this pid is not visible there."""
        if ns.level < len(self.numbers) and self.numbers[ns.level][0] is ns:
            return self.numbers[ns.level][1]
        return 0

    def attach(self) -> Pid:
        self.users += 1
        return self

    def detach(self) -> None:
        self.users -= 1
        if self.users == 0:
            for ns, nr in self.numbers:
                if ns.pids.get(nr) is self:
                    del ns.pids[nr]


class Cgroup:
    """A freezer cgroup (v1 semantics): FROZEN stops every member from running."""

    def __init__(self, name: str, parent: Cgroup | None = None):
        self.name = name
        self.parent = parent
        self.frozen = False
        self.members: list[Task] = []

    @property
    def path(self) -> str:
        return "/" if self.parent is None else self.parent.path.rstrip("/") + "/" + self.name

    def is_frozen(self) -> bool:
        cg = self
        while cg is not None:
            if cg.frozen:
                return True
            cg = cg.parent
        return False


@dataclass
class Cpu:
    """The model's CPU state: a program counter into the task's program and NR_REGS registers.

    ``in_syscall`` marks a task stopped inside a blocking syscall (it re-runs on resume).
    """

    pc: int = 0
    regs: list[int] = field(default_factory=lambda: [0] * NR_REGS)
    in_syscall: bool = False

    def copy(self) -> Cpu:
        return Cpu(self.pc, list(self.regs), self.in_syscall)


class Task:
    """A task (a thread). Thread-group-wide state lives on the leader and shared objects."""

    def __init__(self, kernel, pid: Pid, comm: str):
        self.kernel = kernel
        self.pid = pid.attach()
        self.tid = pid.numbers[0][1]  # the global id: the number in the root namespace
        self.comm = comm
        self.leader: Task = self
        self.threads: list[Task] = [self]   # meaningful on the leader
        self.parent: Task | None = None     # a thread-group leader
        self.children: list[Task] = []      # thread-group leaders
        self.state = "running"              # running | stopped | zombie | dead
        self.exit_code = 0                  # wait status once a zombie
        self.exit_signal = 17               # SIGCHLD
        self.pdeath_signal = 0
        self.pgrp: Pid | None = None
        self.session: Pid | None = None
        self.cgroup: Cgroup | None = None
        self.cpu = Cpu()
        self.program: list | None = None
        self.ptraced_by: Task | None = None
        self.ckpt_ctx = None                # set while a restart is restoring this task
        # Resources (set by TaskOps from each area's module).
        self.mm = None
        self.files = None
        self.fs = None
        self.sighand = None
        self.signal = None
        self.sigstate = None
        self.cred = None

    # -- identity ---------------------------------------------------------------------------
    @property
    def ns(self) -> PidNamespace:
        """The pid namespace this task's pid lives in (its active pid namespace)."""
        return self.pid.ns

    def nr_in(self, ns: PidNamespace) -> int:
        return self.pid.nr_in(ns)

    @property
    def tgid_pid(self) -> Pid:
        return self.leader.pid

    def is_leader(self) -> bool:
        return self.leader is self

    @property
    def is_zombie(self) -> bool:
        return self.state == "zombie"

    @property
    def frozen(self) -> bool:
        return self.cgroup is not None and self.cgroup.is_frozen()

    def runnable(self) -> bool:
        return (self.state == "running" and not self.frozen and self.program is not None
                and self.ckpt_ctx is None)

    def __repr__(self) -> str:
        return f"<Task {self.tid} {self.comm} {self.state}>"

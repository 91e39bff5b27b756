"""The modelled machine: every area's syscalls on one object, and its scheduler."""
from __future__ import annotations

import random

from ..errors import kerr

from .creds import Cred, CredOps
from .mm import MM, MMOps
from .mm_dirty import MadviseOps
from .pipe import PipeOps
from .program import Interpreter, encode_program
from .sched import Blocked
from .signals import SigHand, SignalOps, SignalStruct, ThreadSignals
from .task import Cgroup, PidNamespace, Task
from .tasks_ops import TaskOps
from .unix import UnixOps
from .vfs import FdTable, FileOps, FileSystem, FsContext


class Deadlock(Exception):
    """Every task that is not frozen or stopped is blocked."""


class Kernel(TaskOps, MMOps, MadviseOps, FileOps, PipeOps, UnixOps, SignalOps, CredOps, Interpreter):
    """A deterministic model of the kernel state checkpoint/restart deals with.

    ``seed`` drives the scheduler; nothing depends on wall-clock time or object addresses.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.rng = random.Random(seed)
        self.ticks = 0
        self.output: list[tuple] = []
        self.sysctl = {"kernel.ckpt_unpriv_allowed": 1}
        self.next_crid = 1
        self.checkpoints_taken = 0
        self.points_released = False  # see the program operation ckpt_point
        self.released_steps = 0       # ckpt_point steps released so far (incremental runs)
        # image_id -> ImageLink (cr/incremental.py) of the images this kernel wrote or
        # restarted from: what an incremental checkpoint names as its parent.
        self.image_links: dict = {}
        self.task_by_pid: dict = {}
        self.vfs = FileSystem()
        self.root_ns = PidNamespace(None)
        self.cgroups = {"/": Cgroup("")}
        self.init = self._spawn_init()

    def _spawn_init(self) -> Task:
        init = Task(self, self.new_pid(self.root_ns), "init")
        self.root_ns.reaper = init
        self.task_by_pid[init.pid] = init
        init.pgrp = init.pid.attach()
        init.session = init.pid.attach()
        init.mm = MM.new(self)
        init.files = FdTable()
        init.fs = FsContext(self.vfs.root)
        init.sighand = SigHand()
        init.signal = SignalStruct()
        init.sigstate = ThreadSignals()
        init.cred = Cred.root()
        init.cgroup = self.cgroups["/"]
        init.cgroup.members.append(init)
        return init

    # -- helpers for scenarios and tests -----------------------------------------------------
    def install_program(self, path: str, ops: list, mode: int = 0o755) -> None:
        """Create an executable file holding ``ops`` (see program.py)."""
        fd = self.open(self.init, path, 0o1101, mode)  # O_WRONLY|O_CREAT|O_TRUNC
        self.write(self.init, fd, encode_program(ops))
        self.close(self.init, fd)

    def spawn(self, path: str, ops: list | None = None, parent: Task | None = None,
              flags: int = 0) -> Task:
        """fork+exec from ``parent`` (init by default), as a shell would."""
        if ops is not None:
            self.install_program(path, ops)
        child = self.clone(parent or self.init, flags)
        self.execve(child, path)
        return child

    def checkpoint_to_file(self, t: Task, out: int | None, pid: int, path: str, flags: int = 0) -> int:
        """The program operation ``checkpoint``: an image of the tree at ``pid`` into ``path``.

        The caller is saved as if the call had returned 0, so that a restarted self-checkpoint
        sees 0 where the original run sees the positive crid (Linux-CR's fork-like contract).
        """
        from ..cr.api import checkpoint
        from ..cr.context import CheckpointError

        fd = self.open(t, path, 0o1101, 0o600)  # O_WRONLY|O_CREAT|O_TRUNC, mode 0600
        saved = t.cpu.copy()
        t.cpu.pc += 1
        if out is not None:
            t.cpu.regs[out] = 0
        try:
            return checkpoint(self, t, pid, fd, flags)
        except CheckpointError as e:
            raise kerr(e.errno, e.message) from None
        finally:
            t.cpu = saved
            self.close(t, fd)

    # -- scheduler -------------------------------------------------------------------------
    def runnable(self) -> list[Task]:
        return [t for t in self.live_tasks() if t.runnable()]

    def step(self) -> Task | None:
        """Run one operation of one task chosen by the seeded scheduler; None if all blocked."""
        ready = self.runnable()
        self.rng.shuffle(ready)
        for t in ready:
            self.ticks += 1
            self.deliver_signals(t)
            if not t.runnable():
                return t
            try:
                self.run_op(t)
            except Blocked:
                continue
            return t
        return None

    def run(self, max_steps: int = 100_000) -> int:
        """Run until nothing is runnable, everything left is blocked, or ``max_steps``."""
        steps = 0
        while steps < max_steps:
            if self.step() is None:
                break
            steps += 1
        return steps

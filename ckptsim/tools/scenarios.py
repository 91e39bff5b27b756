"""Built-in model scenarios: small containers that reach a checkpoint point.

A scenario installs programs in a fresh Kernel, starts a container init (a task in a new pid
namespace, in its own freezer cgroup), runs the seeded scheduler for a number of steps, then
freezes the container. ``prepare(name, seed)`` returns (kernel, container init).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..model.kernel import Kernel
from ..model.tasks_ops import CLONE_NEWPID

PROT_RW = 0x3
MAP_PRIVATE_ANON = 0x22
MAP_SHARED_ANON = 0x21
O_RDWR_CREAT_APPEND = os.O_RDWR | os.O_CREAT | os.O_APPEND
CGROUP = "/ct"


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    program: list
    steps: int  # scheduler steps before the checkpoint point


def counter_program(loops: int = 40) -> list:
    """Counts down, keeping state in memory, a file and a pipe; emits every tick."""
    return [
        [0, "mmap", 0, 8192, PROT_RW, MAP_PRIVATE_ANON],
        [1, "open", "/data/counter.log", O_RDWR_CREAT_APPEND, 0o644],
        [2, "pipe", 3],
        [None, "set", 5, loops],
        [None, "store", "$r0", "tick"],                 # 4: loop
        [None, "write", "$r1", "$r0", 4],
        [None, "write", "$r3", "$r0", 4],
        [6, "read", "$r2", "$r0", 2],
        [None, "add", 5, -1],
        [None, "emit", "$r5"],
        [None, "jnz", 5, 4],
        [None, "emit_mem", "$r0", 4],
    ]


def family_program() -> list:
    """A parent with children sharing a pipe and a mapping; one child exits (a zombie)."""
    return [
        [0, "mmap", 0, 4096, PROT_RW, MAP_SHARED_ANON],
        [1, "pipe", 2],
        [None, "store", "$r0", "shared"],
        [3, "fork"],
        [None, "jnz", 3, 7],            # parent jumps to 7
        [None, "store", "$r0", "child!"],  # 5: child writes the shared page, then exits
        [None, "exit_group", 3],
        [4, "fork"],                    # 7: parent forks a second child
        [None, "jnz", 4, 12],
        [None, "write", "$r2", "$r0", 6],  # 9: second child writes into the pipe and loops
        [6, "read", "$r1", "$r0", 1],       # blocks on its own pipe read once drained
        [None, "emit", "$r6"],
        [None, "setsid"],               # 12: parent becomes... (EPERM as init: stored -errno)
        [7, "read", "$r1", "$r0", 3],
        [None, "emit_mem", "$r0", 6],
        [8, "read", "$r1", "$r0", 64],
    ]


def signals_program() -> list:
    """Handlers, a blocked mask and queued real-time signals with values."""
    return [
        [None, "sigaction", 10, 0x401000, 0x10000000, 0],  # SIGUSR1, SA_RESTART
        [None, "sigaction", 12, 1, 0, 0],                   # SIGUSR2 ignored
        [None, "sigprocmask", 0, 1 << 33],                  # block SIGRTMIN (34)
        [1, "getpid"],
        [None, "sigqueue", "$r1", 34, 7],
        [None, "sigqueue", "$r1", 34, 8],
        [None, "kill", "$r1", 10],
        [2, "pipe", 3],
        [4, "read", "$r2", 0, 1],                           # blocks: the checkpoint point
    ]


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("counter", "one task counting in memory, a file and a pipe", counter_program(), 30),
    Scenario("family", "a parent, a zombie child, a child blocked on a pipe, a shared mapping",
             family_program(), 60),
    Scenario("signals", "handlers, a blocked mask, pending real-time signals with values",
             signals_program(), 40),
)}


def prepare(name: str, seed: int = 0, steps: int | None = None) -> tuple[Kernel, object]:
    """Run scenario ``name`` up to its checkpoint point; the container is left frozen."""
    scenario = SCENARIOS[name]
    kernel = Kernel(seed)
    init = kernel.init
    kernel.mkdir(init, "/bin", 0o755)
    kernel.mkdir(init, "/data", 0o755)
    kernel.install_program(f"/bin/{name}", scenario.program)
    kernel.cgroup_create(init, CGROUP)
    root = kernel.spawn(f"/bin/{name}", flags=CLONE_NEWPID)
    kernel.cgroup_attach(init, CGROUP, root.pid.nr_in(init.ns))
    kernel.run(scenario.steps if steps is None else steps)
    kernel.freeze(init, CGROUP)
    return kernel, root


def names() -> list[str]:
    return sorted(SCENARIOS)



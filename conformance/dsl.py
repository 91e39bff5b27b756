"""A small builder for scenario programs (the op lists of ckptsim/model/program.py).

    p = Program()
    buf = p.mmap(0, 4096, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS)
    p.store(buf, "hello")
    p.ckpt()                              # the checkpoint point
    p.check_mem(buf, "hello", "buffer survives")

Every syscall method returns the register holding its result (a ``Reg``), usable as an
argument of later operations. Registers are allocated from r1..r63 (r0 is the builder's scratch
register, r15 receives wait statuses); a program that needs more fails at build time.

Forks: ``child = p.fork()`` then ``with p.child(child): ...`` puts the child's code in the
block (the child exits with status 0 at its end unless the block exits itself); the parent
skips the block. ``p.wait_child(child)`` reaps it and checks that it exited with 0.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
PROT_RW = PROT_READ | PROT_WRITE
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x1, 0x2, 0x10, 0x20
MAP_PRIVATE_ANON = MAP_PRIVATE | MAP_ANONYMOUS
MAP_SHARED_ANON = MAP_SHARED | MAP_ANONYMOUS
O_RDONLY, O_WRONLY, O_RDWR = os.O_RDONLY, os.O_WRONLY, os.O_RDWR
O_CREAT, O_TRUNC, O_APPEND, O_CLOEXEC, O_NONBLOCK = (os.O_CREAT, os.O_TRUNC, os.O_APPEND,
                                                     os.O_CLOEXEC, os.O_NONBLOCK)
SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET = 1, 2, 5
AF_UNIX = 1
PAGE = 4096
NR_REGS = 64
SCRATCH_REG = 0
STATUS_REG = 15


@dataclass(frozen=True)
class Reg:
    n: int

    def __str__(self) -> str:
        return f"$r{self.n}"


@dataclass(frozen=True)
class Label:
    name: str


class ProgramError(Exception):
    """A scenario program that cannot be built (out of registers, unknown label...)."""


def _arg(value):
    if isinstance(value, Reg):
        return str(value)
    if isinstance(value, bytes):
        return value.decode()
    return value


class Program:
    def __init__(self):
        self.ops: list[list] = []
        self.labels: dict[str, int] = {}
        self._next_reg = 1
        self._next_label = 0
        self.checks_after_point = 0
        self.points = 0
        self.steps = 0          # the highest checkpoint step a point waits for

    # -- registers, labels, raw ops ----------------------------------------------------------
    def reg(self) -> Reg:
        if self._next_reg == STATUS_REG:
            self._next_reg += 1
        if self._next_reg >= NR_REGS:
            raise ProgramError(f"a scenario program may use at most {NR_REGS - 2} registers")
        r = Reg(self._next_reg)
        self._next_reg += 1
        return r

    def label(self, name: str | None = None) -> Label:
        if name is None:
            name = f"L{self._next_label}"
            self._next_label += 1
        return Label(name)

    def place(self, label: Label) -> None:
        if label.name in self.labels:
            raise ProgramError(f"label {label.name} placed twice")
        self.labels[label.name] = len(self.ops)

    def raw(self, out: Reg | int | None, name: str, *args) -> None:
        out_n = out.n if isinstance(out, Reg) else out
        self.ops.append([out_n, name, *(_arg(a) if not isinstance(a, Label) else a for a in args)])

    def call(self, name: str, *args) -> Reg:
        """A syscall whose result goes to a new register."""
        r = self.reg()
        self.raw(r, name, *args)
        return r

    def do(self, name: str, *args) -> None:
        """A syscall whose result is not kept."""
        self.raw(None, name, *args)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self.call(name, *args)

    # -- pseudo-operations ---------------------------------------------------------------
    def emit(self, *values) -> None:
        self.raw(None, "emit", *values)

    def set(self, reg: Reg, value: int) -> None:
        self.raw(None, "set", reg.n, value)

    def add(self, reg: Reg, value: int) -> None:
        self.raw(None, "add", reg.n, value)

    def store(self, addr, text: str) -> None:
        self.raw(None, "store", addr, text)

    def jnz(self, reg: Reg, label: Label) -> None:
        self.raw(None, "jnz", reg.n, label)

    def jump(self, label: Label) -> None:
        self.raw(None, "set", SCRATCH_REG, 1)
        self.raw(None, "jnz", SCRATCH_REG, label)

    def ckpt(self, step: int = 1) -> None:
        """The checkpoint point: the runner checkpoints while every task waits at one.
        ``step`` (incremental scenarios): the runner checkpoints at step 1, lets the tasks on
        to their step-2 points, checkpoints again (an incremental image), and so on."""
        if step < 1:
            raise ProgramError(f"checkpoint step {step}: steps count from 1")
        self.raw(None, "ckpt_point", *([step] if step > 1 else []))
        self.points += 1
        self.steps = max(self.steps, step)

    def check(self, a, cmp: str, b, label: str) -> None:
        self.raw(None, "check", a, cmp, b, label)
        if self.points:
            self.checks_after_point += 1

    def check_mem(self, addr, text: str, label: str) -> None:
        self.raw(None, "check_mem", addr, text, label)
        if self.points:
            self.checks_after_point += 1

    # -- common sequences ---------------------------------------------------------------
    def pipe(self) -> tuple[Reg, Reg]:
        r, w = self.reg(), self.reg()
        self.raw(r, "pipe", w.n)
        return r, w

    def stack_vma(self) -> tuple[Reg, Reg]:
        """Start and end of the main stack's VMA ([stack] in maps): where the kernel put it."""
        start, end = self.reg(), self.reg()
        self.raw(start, "stack_vma", end.n)
        return start, end

    def socketpair(self, sock_type: int) -> tuple[Reg, Reg]:
        a, b = self.reg(), self.reg()
        self.raw(a, "socketpair", sock_type, b.n)
        return a, b

    def write_text(self, fd, buf, text: str) -> Reg:
        """Store ``text`` at ``buf`` and write it to ``fd``; returns the byte count register."""
        self.store(buf, text)
        return self.call("write", fd, buf, len(text.encode()))

    def read_check(self, fd, buf, text: str, label: str) -> None:
        """Read len(text) bytes from ``fd`` into ``buf`` and check they are ``text``."""
        n = len(text.encode())
        got = self.call("read", fd, buf, n)
        self.check(got, "==", n, f"{label}: byte count")
        self.check_mem(buf, text, label)

    def fork(self) -> Reg:
        return self.call("fork")

    @contextmanager
    def child(self, pid_reg: Reg):
        """The block runs in the child only (fork returned 0 there); it ends with exit(0)."""
        parent = self.label()
        self.jnz(pid_reg, parent)
        yield
        self.do("exit_group", 0)
        self.place(parent)

    def wait_child(self, pid_reg: Reg, status: int = 0, label: str = "child exit status") -> None:
        got = self.call("wait4", pid_reg)
        self.check(got, "==", pid_reg, f"{label}: reaped pid")
        self.check(Reg(STATUS_REG), "==", (status & 0xFF) << 8, label)

    def exit(self, code: int = 0) -> None:
        self.do("exit_group", code)

    # -- result --------------------------------------------------------------------------
    def build(self) -> list[list]:
        out = []
        for op in self.ops:
            resolved = []
            for a in op:
                if isinstance(a, Label):
                    if a.name not in self.labels:
                        raise ProgramError(f"label {a.name} is never placed")
                    resolved.append(self.labels[a.name])
                else:
                    resolved.append(a)
            out.append(resolved)
        return out

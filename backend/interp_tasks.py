"""Tasks and the program break of the live interpreter (backend/interp.py).

- ``fork`` without flags (or SIGCHLD) is os.fork(): the child is a copy of the interpreter.
- ``fork`` with CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD (optionally
  CLONE_SYSVSEM) is a real thread of this process (a pthread made by Python's _thread, whose
  clone has those flags plus glibc's SETTLS/PARENT_SETTID/CHILD_CLEARTID): it runs the same op
  list from the op after the fork with a copy of the registers (the fork's output register 0),
  and the parent gets its tid. Its signal mask is the creator's (pthread_create keeps it), its
  masks and private pending signals are its own (rt_sigprocmask and tgkill are per thread).
- ``fork`` with CLONE_VM alone (or | SIGCHLD) is a second process sharing the whole address
  space: Python cannot run in it (one heap, one GIL, one thread-local block shared by two
  processes), so the child runs a C mini-interpreter of the op list (backend/interp_clonevm.py,
  which refuses the fork before cloning when the child could reach an op it does not run).
  Other clone flags are refused by ``clone_refusal``: CLONE_VM with some other sharing but
  not CLONE_THREAD, CLONE_NEWPID with anything but an exit signal, and the other namespace
  flags, are not run.
- ``fork`` with CLONE_NEWPID (and optionally SIGCHLD) is a fork into a new pid namespace, whose
  pid 1 the child is: unshare(CLONE_NEWPID), os.fork(), then the parent goes back to its own
  pid namespace for its later children (setns to /proc/thread-self/ns/pid, its active one).
  The child is that namespace's init as on Linux: signals without a handler sent from inside
  the namespace do not reach it, and its children die when it exits.
- ``exit`` is exit(2) (SYS_exit): only the calling thread ends, and the process ends with its
  last thread, as in the model; ``exit_group`` (and the end of the program) ends them all.
- ``brk`` is the raw brk syscall. The program owns the break because the interpreter runs
  with glibc's malloc kept off it: ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=0`` (set by
  ``main`` before anything is allocated) makes every allocation of the main arena an mmap,
  so glibc never calls sbrk (a glibc sbrk after the program moved the break would move it
  back: glibc caches the break it last set). ``BreakOwner`` checks it: the break must still
  be the kernel's start_brk when the interpreter starts (else brk is refused as unsupported),
  and where the program last put it at every later brk (else an interpreter error names both
  values, and the op still runs).
"""
from __future__ import annotations

import _thread
import ctypes
import os
import signal
import threading

from . import kabi
from .interp_clonevm import clone_vm, gcc_missing, is_clone_vm
from .interp_libc import STATUS_REG, Unsupported, libc_call

CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM = 0x10000, 0x40000
THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD
NEWPID_FORKS = (kabi.CLONE_NEWPID, kabi.CLONE_NEWPID | signal.SIGCHLD)
MALLOC_TUNABLE = "glibc.malloc.mmap_threshold=0"


def clone_refusal(flags: int, rest=()) -> str | None:
    """Why ``["fork", flags, ...]`` cannot run in the interpreter, or None."""
    if rest:
        return f"unsupported op fork: extra clone arguments {list(rest)}"
    if flags in (0, signal.SIGCHLD):
        return None
    if flags & ~CLONE_SYSVSEM == THREAD_FLAGS:
        return None
    if flags in NEWPID_FORKS:
        return None
    if is_clone_vm(flags):
        return gcc_missing()
    if flags & CLONE_VM and not flags & CLONE_THREAD:
        return (f"unsupported op fork: clone flags {flags:#x} (CLONE_VM without CLONE_THREAD runs "
                f"with CLONE_VM alone or | SIGCHLD: a child of a C mini-interpreter sharing only "
                f"the address space; sharing files, fs or signal handlers too, or another exit "
                f"signal, is not run)")
    return (f"unsupported op fork: clone flags {flags:#x} (the interpreter runs plain forks and "
            f"threads with CLONE_VM|FS|FILES|SIGHAND|THREAD and forks into a new pid namespace "
            f"with CLONE_NEWPID alone; other namespaces and partial sharing are not run)")


def _start_brk() -> int:
    """The kernel's start_brk of this process (/proc/self/stat field 47)."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[47 - 3])


class BreakOwner:
    """Where the program's break must be (per process: fork copies it, threads share it)."""

    def __init__(self):
        self.expected: int | None = None
        self.refusal: str | None = None

    def start(self) -> None:
        if MALLOC_TUNABLE not in os.environ.get("GLIBC_TUNABLES", "").split(":"):
            self.refusal = (f"unsupported op brk: the interpreter was started without "
                            f"GLIBC_TUNABLES={MALLOC_TUNABLE}, so glibc's malloc may own the break")
            return
        start, now = _start_brk(), libc_call("syscall", kabi.SYS_brk, 0)
        if start != now:
            self.refusal = (f"unsupported op brk: the break moved before the program ran "
                            f"({start:#x} -> {now:#x}): glibc's malloc used it")
            return
        self.expected = now

    def brk(self, addr: int) -> tuple[int, str | None]:
        """The brk syscall's result, and what is wrong when the break was not where the
        program left it (the op still runs: the program's own checks say more)."""
        if self.refusal is not None:
            raise Unsupported(self.refusal)
        now = libc_call("syscall", kabi.SYS_brk, 0)
        problem = None
        if now != self.expected:
            problem = (f"the break is at {now:#x}, the program left it at {self.expected:#x}: "
                       f"moved by something else than the program (glibc's malloc is off it: "
                       f"a restart that lost the exact break?)")
        self.expected = libc_call("syscall", kabi.SYS_brk, addr)
        return self.expected, problem


BREAK = BreakOwner()


class TaskOps:
    """fork/threads, exit, wait4 and brk of Interp (a mixin: needs ``thread_copy`` and
    ``run_guarded``)."""

    def op_fork(self, out, flags=0, *rest):
        why = clone_refusal(flags, rest)
        if why is not None:
            raise Unsupported(why)
        if flags & CLONE_THREAD:
            return self._spawn_thread(out)
        from .interp_signals import PROCESS
        if flags in NEWPID_FORKS:
            return self._fork_newpid(out)
        if is_clone_vm(flags):   # the child runs C, never this Python (interp_clonevm.py)
            return clone_vm(self.ops, self.pc, self.regs, out, self.control_dir)
        pid = os.fork()
        if pid == 0:
            PROCESS.lock = threading.Lock()   # another thread may have held it at the fork
            if out is not None:
                self.regs[out] = 0
        return pid if pid else None

    def _fork_newpid(self, out) -> int | None:
        """fork(2) into a new pid namespace (the child is its pid 1); this thread's later
        children stay in its own namespace. A failure is the fork's -errno."""
        from .interp_signals import PROCESS
        own = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        err = libc_call("syscall", kabi.SYS_unshare, kabi.CLONE_NEWPID)
        if err < 0:
            os.close(own)
            return err                        # e.g. -EPERM without CAP_SYS_ADMIN
        try:
            pid = os.fork()
        except OSError as e:
            pid = -e.errno
        if pid == 0:
            os.close(own)                     # the child holds nothing of the parent's
            PROCESS.lock = threading.Lock()
            if out is not None:
                self.regs[out] = 0
            return None
        back = libc_call("syscall", kabi.SYS_setns, own, kabi.CLONE_NEWPID)
        os.close(own)
        if back < 0:   # every later child would land in the new namespace: say so
            self.report("error", message=f"op {self.pc} fork: setns back to this task's own "
                                         f"pid namespace failed: {os.strerror(-back)}")
        return pid

    def _spawn_thread(self, out) -> int:
        child = self.thread_copy(out)
        started = _thread.allocate_lock()
        started.acquire()
        box = {}

        def body():
            box["tid"] = libc_call("gettid")
            started.release()
            child.run_guarded()

        _thread.start_new_thread(body, ())
        started.acquire()
        return box["tid"]

    def op_wait4(self, out, pid=-1, options=0):
        status = ctypes.c_int()
        res = libc_call("wait4", pid, ctypes.byref(status), options, None)
        self.regs[STATUS_REG] = status.value & ((1 << 64) - 1) if res > 0 else 0
        return res

    def op_exit_group(self, out, code=0):
        self.drain_signals()
        os._exit(code & 0xFF)

    def op_exit(self, out, code=0):
        """exit(2): this thread only (the process ends with its last thread)."""
        self.drain_signals()
        libc_call("syscall", kabi.SYS_exit, code & 0xFF)

    def op_brk(self, out, addr=0):
        result, problem = BREAK.brk(addr)
        if problem is not None:
            self.report("error", message=f"op {self.pc} brk: {problem}")
        return result

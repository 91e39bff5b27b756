"""Restored tasks under construction: traced stub processes that run syscalls we inject.

A stub is a process (or thread) that this restorer traces from birth and that never runs code
of its own: the seed is a child that execs the image's executable under PTRACE_TRACEME and so
stops before its first instruction; every other stub is made by a clone3 injected into its
parent stub (PTRACE_O_TRACEFORK/CLONE attach it at once). Each process gets a *trampoline*:
one page, at an address that no VMA of the image uses, holding ``syscall; int3``. An injected
syscall sets rip to the trampoline, rax and the arguments, and runs PTRACE_SYSCALL to the
syscall's entry stop and on to its exit stop, where the stub stays until the next one. The
rest of the trampoline page is scratch memory for the syscalls' in/out structures.

Once the trampoline holds that code (``set_trampoline``), an injected syscall costs one stop
instead of two: PTRACE_CONT runs the syscall and stops at the int3's SIGTRAP, which is never
delivered. The kernel forces that SIGTRAP, and forcing it while SIGTRAP is blocked or ignored
resets its action to SIG_DFL: so a stub whose process has another SIGTRAP action, or that
holds a pending SIGTRAP, goes back to the two syscall stops (``int3_stops = False``), and so
does the syscall that unmaps the trampoline itself.

Unlike backend/ptrace.inject_syscall (which must leave a live thread exactly as it found it),
nothing here is saved or put back: a stub's registers are only ever its final ones, set last.
Every wait is a blocking waitpid; a job-wide watchdog (``Watchdog``) kills every stub if the
restore hangs, which ends any wait with ThreadGone.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
import time

from backend import kabi
from backend.ptrace import PtraceError, ThreadGone, _ptrace, get_regs, set_regs, signed

PAGE = 4096
TRAMPOLINE_CODE = b"\x0f\x05\xcc"          # syscall; int3
SCRATCH_OFFSET = 64                         # scratch data starts here in the trampoline page
BATCH_OFFSET = 2048                         # ... up to here; then a batch's results and code
SCRATCH_SIZE = BATCH_OFFSET - SCRATCH_OFFSET
BATCH_MAX = 22                              # syscalls per batch: 8 bytes of result, 79 of code
BATCH_CODE_OFFSET = BATCH_OFFSET + 8 * BATCH_MAX + 80
# x86-64: mov REG, imm64 for rax and the six argument registers; mov [rip + disp32], rax
_MOV_IMM64 = (b"\x48\xb8", b"\x48\xbf", b"\x48\xbe", b"\x48\xba", b"\x49\xba", b"\x49\xb8",
              b"\x49\xb9")
_STORE_RAX = b"\x48\x89\x05"
assert BATCH_CODE_OFFSET + BATCH_MAX * (7 * 10 + 2 + 7) + 1 <= PAGE
STUB_OPTIONS = (kabi.PTRACE_O_TRACESYSGOOD | kabi.PTRACE_O_EXITKILL | kabi.PTRACE_O_TRACEFORK
                | kabi.PTRACE_O_TRACECLONE | kabi.PTRACE_O_TRACEVFORK)
_U64 = (1 << 64) - 1
_SYSCALL_STOP = signal.SIGTRAP | 0x80
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


class StubError(PtraceError):
    """A step of building a restored task failed: errno and a message naming the task."""


def _wait(tid: int) -> int:
    try:
        _, status = os.waitpid(tid, kabi.WALL)
    except ChildProcessError:
        raise ThreadGone(tid, f"stub {tid} is gone") from None
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        how = (f"exit {os.WEXITSTATUS(status)}" if os.WIFEXITED(status)
               else f"signal {signal.Signals(os.WTERMSIG(status)).name}")
        raise ThreadGone(tid, f"stub {tid} died ({how})")
    return status


class Stub:
    """One traced thread being restored. ``pid`` is its tgid, ``tid`` its thread id, both as
    this restorer sees them; ``tramp`` the trampoline page's address in its address space."""

    def __init__(self, pid: int, tid: int, tramp: int = 0, int3_stops: bool = False):
        self.pid, self.tid, self.tramp = pid, tid, tramp
        self.int3_stops = int3_stops and bool(tramp)
        self._regs = get_regs(tid)
        self.injected = 0
        self.last_event: int | None = None
        self.dropped_signals: list[int] = []
        self._mem_fd: int | None = None

    # -- stops ---------------------------------------------------------------------------------
    @classmethod
    def adopt(cls, tid: int, pid: int | None = None, tramp: int = 0,
              int3_stops: bool = False) -> "Stub":
        """Take a freshly traced thread at its first stop (exec SIGTRAP, or the SIGSTOP an
        auto-attached clone starts with); the signal is never delivered."""
        status = _wait(tid)
        if not os.WIFSTOPPED(status):
            raise StubError(errno.ECHILD, f"stub {tid}: unexpected wait status {status:#x}")
        return cls(pid if pid is not None else tid, tid, tramp, int3_stops)

    def set_trampoline(self, addr: int) -> None:
        """The page at ``addr`` (mapped rwx) becomes the trampoline: its code is written."""
        self.write(addr, TRAMPOLINE_CODE)
        self.tramp = addr
        self.int3_stops = True

    # -- memory --------------------------------------------------------------------------------
    _with_mem: list["Stub"] = []        # stubs holding their mem fd, oldest first
    MAX_MEM_FDS = 64                    # a tree of thousands must not run out of fds

    def _mem(self) -> int:
        """/proc/TID/mem, opened once: it stays bound to the address space it was opened on,
        which a stub keeps from its adoption (after its exec) to its detach (a few ms per
        restart went to opening it for every write). At most MAX_MEM_FDS stay open."""
        if self._mem_fd is None:
            if len(Stub._with_mem) >= self.MAX_MEM_FDS:
                Stub._with_mem[0].close_mem()
            self._mem_fd = os.open(f"/proc/{self.tid}/mem", os.O_RDWR | os.O_CLOEXEC)
            Stub._with_mem.append(self)
        return self._mem_fd

    def close_mem(self) -> None:
        if self._mem_fd is not None:
            os.close(self._mem_fd)
            self._mem_fd = None
            Stub._with_mem.remove(self)

    @classmethod
    def close_mems(cls, tids) -> None:
        """Close the mem fds of the stubs of ``tids`` (a failed restart: never detached)."""
        for stub in [s for s in cls._with_mem if s.tid in tids]:
            stub.close_mem()

    def __del__(self):
        self.close_mem()

    def write(self, addr: int, data) -> None:
        if os.pwrite(self._mem(), data, addr) != len(data):
            raise StubError(errno.EIO, f"stub {self.tid}: short write at {addr:#x}")

    def read(self, addr: int, size: int) -> bytes:
        return os.pread(self._mem(), size, addr)

    @property
    def scratch(self) -> int:
        return self.tramp + SCRATCH_OFFSET

    def put_scratch(self, data: bytes, offset: int = 0) -> int:
        """Copy ``data`` into the scratch area (at ``offset``); returns its address."""
        if offset + len(data) > SCRATCH_SIZE:
            raise StubError(errno.E2BIG, f"stub {self.tid}: {len(data)} bytes do not fit the "
                                         "scratch page")
        addr = self.scratch + offset
        self.write(addr, data)
        return addr

    # -- syscalls ------------------------------------------------------------------------------
    def syscall(self, nr: int, *args: int, what: str = "", check: bool = True,
                exit_stop: bool = False) -> int:
        """Run syscall ``nr`` in the stub; returns rax (raises StubError on -errno with
        ``check``). The stub ends stopped at the trampoline's int3, or at the syscall's exit
        stop (without int3 stops, or with ``exit_stop``: a syscall that unmaps the int3)."""
        if not self.tramp:
            raise StubError(errno.EINVAL, f"stub {self.tid}: no trampoline yet")
        regs = self._regs
        regs.rip, regs.rax, regs.orig_rax = self.tramp, nr & _U64, _U64
        for name, value in zip(_ARG_REGS, args):
            setattr(regs, name, int(value) & _U64)
        set_regs(self.tid, regs)
        if self.int3_stops and not exit_stop:
            event, result = self._resume_to_int3()
        else:
            self._resume_to_syscall_stop()          # entry
            event = self._resume_to_syscall_stop()  # exit (a fork event may come between)
            result = signed(get_regs(self.tid).rax)
        self.injected += 1
        self.last_event = event
        if check and -kabi.MAX_ERRNO <= result < 0:
            raise StubError(-result, f"{what or f'syscall {nr}'} in pid {self.pid}"
                                     f"{'' if self.tid == self.pid else f' (tid {self.tid})'}: "
                                     f"{os.strerror(-result)}")
        return result

    def syscalls(self, calls: list[tuple]) -> list[int]:
        """Run ``calls`` ((nr, (args...), what) each, in order) with one stop per BATCH_MAX:
        a code sequence in the trampoline page makes them one after the other and keeps each
        result. Returns the results; raises StubError naming the first that failed (the ones
        after it ran too: a failure ends the restart anyway). Without int3 stops, one by one.
        For syscalls that create no process and leave the trampoline in place."""
        if not self.int3_stops:
            return [self.syscall(nr, *args, what=what) for nr, args, what in calls]
        results: list[int] = []
        for k in range(0, len(calls), BATCH_MAX):
            results += self._batch(calls[k:k + BATCH_MAX])
        return results

    def _batch(self, calls: list[tuple]) -> list[int]:
        base = self.tramp + BATCH_OFFSET
        code = bytearray()
        start = self.tramp + BATCH_CODE_OFFSET
        for i, (nr, args, _) in enumerate(calls):
            for prefix, value in zip(_MOV_IMM64, (nr,) + tuple(args)):
                code += prefix + (int(value) & _U64).to_bytes(8, "little")
            code += b"\x0f\x05" + _STORE_RAX
            code += ((base + 8 * i) - (start + len(code) + 4)).to_bytes(4, "little", signed=True)
        code += b"\xcc"                                      # int3
        self.write(start, bytes(code))
        regs = self._regs
        regs.rip, regs.orig_rax = start, _U64
        set_regs(self.tid, regs)
        self._resume_to_int3(start + len(code))
        raw = self.read(base, 8 * len(calls))
        results = [signed(int.from_bytes(raw[8 * i:8 * i + 8], "little"))
                   for i in range(len(calls))]
        self.injected += len(calls)
        for (nr, _, what), result in zip(calls, results):
            if -kabi.MAX_ERRNO <= result < 0:
                raise StubError(-result, f"{what or f'syscall {nr}'} in pid {self.pid}"
                                         f"{'' if self.tid == self.pid else f' (tid {self.tid})'}"
                                         f": {os.strerror(-result)}")
        return results

    def _resume_to_int3(self, done_at: int = 0) -> tuple[int | None, int]:
        """PTRACE_CONT until the SIGTRAP of an int3 that leaves rip at ``done_at`` (by
        default: the trampoline's); returns the new child's pid if a fork/clone event stop
        came first, and rax."""
        child = None
        done_at = done_at or self.tramp + len(TRAMPOLINE_CODE)
        while True:
            _ptrace(kabi.PTRACE_CONT, self.tid, 0, 0)      # 0: a stopped-for signal is dropped
            status = _wait(self.tid)
            if os.WSTOPSIG(status) == signal.SIGTRAP and not status >> 16:
                regs = get_regs(self.tid)
                if regs.rip == done_at:
                    return child, signed(regs.rax)
            child = self._other_stop(status, child)

    def _resume_to_syscall_stop(self) -> int | None:
        """PTRACE_SYSCALL until a syscall stop; returns the new child's pid if a fork/clone
        event stop came first (its child is auto-attached)."""
        child = None
        while True:
            _ptrace(kabi.PTRACE_SYSCALL, self.tid, 0, 0)   # 0: a stopped-for signal is dropped
            status = _wait(self.tid)
            if os.WSTOPSIG(status) == _SYSCALL_STOP:
                return child
            child = self._other_stop(status, child)

    def _other_stop(self, status: int, child: int | None) -> int | None:
        """A stop on the way to the one awaited: a fork/clone event (returns the new child's
        pid) or a signal, which is dropped (returns ``child`` unchanged)."""
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if sig == signal.SIGTRAP and event in (kabi.PTRACE_EVENT_FORK,
                                               kabi.PTRACE_EVENT_CLONE,
                                               kabi.PTRACE_EVENT_VFORK):
            msg = ctypes.c_ulong()
            _ptrace(kabi.PTRACE_GETEVENTMSG, self.tid, 0, ctypes.addressof(msg))
            return msg.value
        if sig in (signal.SIGSTOP, signal.SIGTRAP) and event:
            raise StubError(errno.EINVAL, f"stub {self.tid}: unexpected event {event} "
                                          "during a syscall")
        # A signal-delivery-stop: SIGCHLD of a child stub made a zombie, or a signal sent
        # from outside to a process that does not exist yet as far as the world knows.
        # Stubs have no handlers and no pending state worth keeping: it is dropped (the
        # restored pending signals are queued last, with every signal blocked). A signal
        # the kernel raises again at once (a fault on the way back to user mode) would
        # loop for ever: that is an error.
        self.dropped_signals.append(sig)
        if len(self.dropped_signals) > 64 and \
                self.dropped_signals[-64:].count(sig) == 64:
            raise StubError(errno.EFAULT, f"stub {self.tid}: signal {sig} keeps coming back"
                                          " (a fault the kernel raises on each resume)")
        return child

    # -- the end -------------------------------------------------------------------------------
    def unregister_rseq(self) -> None:
        """Drop the process's restartable-sequences registration (glibc makes one at start):
        once its memory is unmapped, the kernel would fault on it at every return to user
        mode. Only a stub that has run (a restart in place of the caller) has one."""
        conf = kabi.ptrace_rseq_configuration()
        try:
            _ptrace(kabi.PTRACE_GET_RSEQ_CONFIGURATION, self.tid, ctypes.sizeof(conf),
                    ctypes.addressof(conf))
        except PtraceError:
            return
        if conf.rseq_abi_pointer:
            self.syscall(kabi.SYS_rseq, conf.rseq_abi_pointer, conf.rseq_abi_size,
                         kabi.RSEQ_FLAG_UNREGISTER, conf.signature, what="rseq unregister")

    def set_final_regs(self, regs: kabi.user_regs_struct) -> None:
        self._regs = regs
        set_regs(self.tid, regs)

    def detach(self, sig: int = 0) -> None:
        self.close_mem()
        _ptrace(kabi.PTRACE_DETACH, self.tid, 0, sig)


class Watchdog:
    """Kills every pid it was told about if ``disarm`` does not come within ``timeout``: on
    a thread of its own, or (``own_thread=False``) on one the caller has, which calls run()
    (a thread start can cost milliseconds on a busy machine)."""

    def __init__(self, timeout: float, own_thread: bool = True):
        self.pids: list[int] = []
        self.fired = False
        self._deadline = time.monotonic() + timeout
        self._disarmed = threading.Event()
        if own_thread:
            threading.Thread(target=self.run, daemon=True, name="restore-watchdog").start()

    def run(self) -> None:
        """Wait for disarm() until the deadline; then kill."""
        if not self._disarmed.wait(max(0.0, self._deadline - time.monotonic())):
            self._fire()

    def _fire(self) -> None:
        self.fired = True
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def disarm(self) -> None:
        self._disarmed.set()

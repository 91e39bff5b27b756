"""Running syscalls inside a stopped tracee (the injection half of backend.ptrace).

Public API (every name is also importable from backend.ptrace, where callers usually take
it from):

    inject_syscall(tid, nr, *args, check=True) -> int      one syscall inside a stopped thread
    inject_syscalls(tid, calls, check=True) -> list[int]   several, registers and mask saved
                                                           and restored once for the batch
    run_code(tid, addr, args) -> regs                      machine code ending in int3, run
                                                           inside the thread in one stop
    find_syscall_insn(tid) -> int                          a `syscall` instruction to point at
    stack_scratch(tid, size)                               context manager: scratch memory below
                                                           the thread's red zone, bytes restored
    read_memory(tid, addr, size) -> bytes                  through /proc/TID/mem

``tid`` must be in an interrupt or group stop, as backend.ptrace.seized() leaves it; see
inject_syscall for how its state is kept exactly.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
from typing import Iterable, Iterator, Sequence

from backend import kabi
from backend.ptrace import (
    _ALL_SIGNALS, _U64, DEFAULT_TIMEOUT, PtraceError, Stop, ThreadGone, _ptrace, _shielded,
    get_regs, get_siginfo, get_sigmask, set_regs, set_sigmask, signed, syscall_state,
    wait_stop,
)

__all__ = ["inject_syscall", "inject_syscalls", "run_code", "find_syscall_insn",
           "stack_scratch", "read_memory", "write_memory"]

_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
_insn_cache: dict[int, int] = {}


def read_memory(tid: int, addr: int, size: int) -> bytes:
    """``size`` bytes of the tracee's memory at ``addr`` (through /proc/TID/mem: it also reads
    pages the tracee may not, such as the out-buffers of injected syscalls on its stack)."""
    return _read_mem(tid, addr, size)


def _read_mem(tid: int, addr: int, size: int) -> bytes:
    fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, addr)
    finally:
        os.close(fd)


def write_memory(tid: int, addr: int, data: bytes) -> None:
    """Write ``data`` at ``addr`` through /proc/TID/mem (which may write read-only pages)."""
    _write_mem(tid, addr, data)


def _write_mem(tid: int, addr: int, data: bytes) -> None:
    fd = os.open(f"/proc/{tid}/mem", os.O_WRONLY | os.O_CLOEXEC)
    try:
        if os.pwrite(fd, data, addr) != len(data):
            raise PtraceError(errno.EIO, f"tid {tid}: short write at {addr:#x}")
    finally:
        os.close(fd)


def find_syscall_insn(tid: int) -> int:
    """The address of a `syscall` instruction (0f 05) in an executable mapping of ``tid``:
    the [vdso] first (its clock_gettime fallbacks have one), else any r-x mapping. The bytes
    need not be an instruction boundary of the mapping's code: the CPU decodes from rip."""
    addr = _insn_cache.get(tid)
    if addr is not None:
        with contextlib.suppress(OSError):
            if _read_mem(tid, addr, 2) == b"\x0f\x05":
                return addr
    try:
        with open(f"/proc/{tid}/maps") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        raise ThreadGone(tid, f"tid {tid} is gone") from None
    exe = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 5 or "x" not in parts[1] or parts[1][0] != "r":
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        name = parts[5] if len(parts) > 5 else ""
        if name == "[vsyscall]":
            continue                                  # emulated: not executable for us
        exe.append((name != "[vdso]", start, end))
    for _, start, end in sorted(exe):
        with contextlib.suppress(OSError):
            data = _read_mem(tid, start, min(end - start, 1 << 20))
            i = data.find(b"\x0f\x05")
            if i >= 0:
                _insn_cache[tid] = start + i
                return start + i
    raise PtraceError(errno.ENOEXEC, f"tid {tid}: no syscall instruction in any executable "
                                     "mapping")


def _resume_to_event_stop(tid: int, timeout: float) -> Stop:
    """From a syscall stop, go back to a PTRACE_EVENT_STOP trap in the signal path: the
    interrupt sets TIF_SIGPENDING, so on the way out the kernel enters get_signal(), traps,
    and - once resumed for good - runs its syscall-restart logic on the registers we put back."""
    _ptrace(kabi.PTRACE_INTERRUPT, tid)
    _ptrace(kabi.PTRACE_CONT, tid, 0, 0)
    return wait_stop(tid, timeout)


def inject_syscall(tid: int, nr: int, *args: int, check: bool = True,
                   timeout: float = DEFAULT_TIMEOUT) -> int:
    """Run syscall ``nr`` with ``args`` (at most 6 ints) inside the stopped thread ``tid`` and
    return its result (a negative -errno, or with ``check`` an OSError naming tid and nr).

    ``tid`` must be in an interrupt or group stop (what seized() gives). How: save the regs
    and the signal mask; block every signal (PTRACE_SETSIGMASK) so that nothing is dequeued
    meanwhile; point rip at a `syscall` instruction (find_syscall_insn), rax = nr,
    orig_rax = -1 (so the kernel's restart logic leaves these registers alone), args in rdi,
    rsi, rdx, r10, r8, r9; PTRACE_SYSCALL to the entry stop and again to the exit stop; read
    rax. Then put back the exact saved registers and mask, and PTRACE_INTERRUPT + PTRACE_CONT
    so the thread traps again in the signal path with those registers: the stop it is in
    afterwards is the same kind as before, and a thread that was inside an interrupted
    syscall (orig_rax = nr, rax = -ERESTART*, rip past the syscall) is restarted by the
    kernel after detach exactly as if nothing had happened. A group-stopped thread reports
    its group stop again.

    Exception: a thread stopped inside a mask-swapping syscall (sigsuspend, ppoll...) keeps
    its mask untouched (setting it would drop the saved mask); resuming it restores the
    saved mask early, which is harmless since the syscall is restarted and swaps again. If a
    signal becomes deliverable during such an injection (or SIGSTOP, which no mask blocks,
    arrives), it is delivered first (as the kernel would have) and the injection retried
    from the new stop.

    Don't inject syscalls that change the blocked mask (use set_sigmask), that block, or
    that use the restart block (nanosleep, poll with a timeout, futex waits)."""
    return inject_syscalls(tid, [(nr, *args)], check=check, timeout=timeout)[0]


def inject_syscalls(tid: int, calls: Iterable[Sequence[int]], *, check: bool = True,
                    timeout: float = DEFAULT_TIMEOUT, _attempts: int = 5) -> list[int]:
    """Run each ``(nr, *args)`` of ``calls`` in order inside the stopped thread ``tid``, as
    inject_syscall does for one, and return their results in order. The registers and mask
    are saved, and the thread put back into its stop, once for the whole batch: from the
    exit stop of one call the thread goes straight to the entry stop of the next, so a call
    costs two stops instead of three. With ``check``, the first failing call ends the batch
    (the later ones are not run) and raises once the thread is back as it was."""
    calls = [tuple(int(a) for a in call) for call in calls]
    for call in calls:
        if not 1 <= len(call) <= 7:
            raise TypeError(f"inject_syscall: a syscall number and at most 6 arguments, "
                            f"got {len(call) - 1} arguments")
    if not calls:
        return []
    si = kabi.siginfo_t.from_buffer_copy(get_siginfo(tid))
    if (si.si_code >> 8) != kabi.PTRACE_EVENT_STOP:
        raise PtraceError(errno.EINVAL, f"tid {tid}: can inject a syscall only in an interrupt "
                                        f"or group stop (si_code {si.si_code:#x})")
    results: list[int] = []
    failed = None
    with _shielded():
        saved = get_regs(tid)
        state = syscall_state(saved)
        swapping = state is not None and state.nr in kabi.MASK_SWAPPING_SYSCALLS
        saved_mask = None if swapping else get_sigmask(tid)
        insn = find_syscall_insn(tid)
        if saved_mask is not None:
            set_sigmask(tid, _ALL_SIGNALS)
        phase = "before"       # before / running / entry / exit / done: see _abort_injection
        try:
            for nr, *args in calls:
                regs = saved.copy()
                regs.rip = insn
                regs.rax = nr & _U64
                regs.orig_rax = _U64             # -1: not in a syscall, nothing to restart
                for name, value in zip(_ARG_REGS, args):
                    setattr(regs, name, value & _U64)
                set_regs(tid, regs)
                # 1. to the syscall-entry stop (a group stop met meanwhile is passed through)
                while True:
                    _ptrace(kabi.PTRACE_SYSCALL, tid)
                    phase = "running"
                    stop = wait_stop(tid, timeout, deliver=False)
                    if stop.kind == "syscall":
                        break
                    phase = "before"
                    if stop.kind == "signal":    # see the doc of inject_syscall
                        set_regs(tid, saved)
                        if saved_mask is not None:
                            set_sigmask(tid, saved_mask)
                        _ptrace(kabi.PTRACE_INTERRUPT, tid)
                        _ptrace(kabi.PTRACE_CONT, tid, 0, stop.signal)
                        wait_stop(tid, timeout)
                        phase = "done"
                        if _attempts <= 1:
                            raise PtraceError(errno.EAGAIN, f"tid {tid}: signals kept arriving "
                                                            f"during syscall {nr} injection")
                        rest = calls[len(results):]
                        results += inject_syscalls(tid, rest, check=check, timeout=timeout,
                                                   _attempts=_attempts - 1)
                        return results
                    if stop.kind not in ("interrupt", "group"):
                        raise PtraceError(errno.EINVAL, f"tid {tid}: unexpected {stop.kind} "
                                                        f"stop while injecting syscall {nr}")
                phase = "entry"
                # 2. to the syscall-exit stop
                _ptrace(kabi.PTRACE_SYSCALL, tid)
                phase = "running"
                stop = wait_stop(tid, timeout, deliver=False)
                if stop.kind != "syscall":
                    raise PtraceError(errno.EINVAL, f"tid {tid}: {stop.kind} stop instead of "
                                                    f"the exit of injected syscall {nr}")
                phase = "exit"
                result = signed(get_regs(tid).rax)
                results.append(result)
                if check and -kabi.MAX_ERRNO <= result < 0:
                    failed = (nr, result)
                    break
            # 3. back to the saved state, in a PTRACE_EVENT_STOP trap
            set_regs(tid, saved)
            if saved_mask is not None:
                set_sigmask(tid, saved_mask)
            _resume_to_event_stop(tid, timeout)
            phase = "done"
        finally:
            if phase != "done":
                _abort_injection(tid, phase, saved, saved_mask, timeout)
    if failed is not None:
        nr, result = failed
        raise PtraceError(-result, f"tid {tid}: injected syscall {nr} failed: "
                                   f"{os.strerror(-result)}")
    return results


_SIGTRAP_BIT = 1 << (5 - 1)


class CodeRefused(PtraceError):
    """run_code did not run the code (the thread's state does not allow it) and left the
    thread exactly as it was: the caller takes another way."""


def run_code(tid: int, addr: int, args: Sequence[int] = (), *,
             timeout: float = DEFAULT_TIMEOUT) -> kabi.user_regs_struct:
    """Run the machine code at ``addr`` (in an executable mapping of the tracee; it must end
    with int3) inside the stopped thread ``tid``, with ``args`` in rdi, rsi, rdx, r10, r8,
    r9, and return the registers at the int3. One resume instead of two stops per syscall:
    a loop of syscalls in the code costs one ptrace stop.

    Every signal is blocked meanwhile except SIGTRAP: int3 raises a forced SIGTRAP, and a
    forced signal that is blocked has its action reset to SIG_DFL by the kernel
    (force_sig_info_to_task); unblocked, the tracer sees it in a signal-delivery-stop and
    discards it. The kernel still resets a SIGTRAP action of SIG_IGN: the caller, who knows
    the action, puts it back. Raises CodeRefused, the thread untouched, when it sits in a
    mask-swapping syscall (its mask cannot be set) or has a SIGTRAP pending (it would be
    taken for the int3); a signal that arrives anyway is handed back to the kernel as
    inject_syscalls does, and CodeRefused raised."""
    si = kabi.siginfo_t.from_buffer_copy(get_siginfo(tid))
    if (si.si_code >> 8) != kabi.PTRACE_EVENT_STOP:
        raise PtraceError(errno.EINVAL, f"tid {tid}: can run code only in an interrupt or "
                                        f"group stop (si_code {si.si_code:#x})")
    with _shielded():
        saved = get_regs(tid)
        state = syscall_state(saved)
        if state is not None and state.nr in kabi.MASK_SWAPPING_SYSCALLS:
            raise CodeRefused(errno.EAGAIN, f"tid {tid} is in syscall {state.nr}, which swaps "
                                            f"its signal mask")
        if _pending_signals(tid) & _SIGTRAP_BIT:
            raise CodeRefused(errno.EAGAIN, f"tid {tid} has a SIGTRAP pending")
        saved_mask = get_sigmask(tid)
        regs = saved.copy()
        regs.rip = addr
        regs.orig_rax = _U64                     # not in a syscall: nothing to restart
        for name, value in zip(_ARG_REGS, args):
            setattr(regs, name, value & _U64)
        set_sigmask(tid, _ALL_SIGNALS & ~_SIGTRAP_BIT)
        set_regs(tid, regs)
        resumed = False
        try:
            _ptrace(kabi.PTRACE_CONT, tid, 0, 0)
            resumed = True
            stop = wait_stop(tid, timeout, deliver=False)
            resumed = False
            ours = stop.kind == "signal" and stop.signal == signal.SIGTRAP and \
                kabi.siginfo_t.from_buffer_copy(get_siginfo(tid)).si_code == kabi.SI_KERNEL
            after = get_regs(tid) if ours else None
        finally:
            if resumed:        # not collected (timeout, exit): best effort, as _abort_injection
                with contextlib.suppress(PtraceError):
                    _ptrace(kabi.PTRACE_INTERRUPT, tid)
                    stop = wait_stop(tid, timeout, deliver=False)
            with contextlib.suppress(PtraceError):
                set_regs(tid, saved)
                set_sigmask(tid, saved_mask)
        if ours:
            _resume_to_event_stop(tid, timeout)      # the SIGTRAP is discarded
            return after
        if stop.kind == "signal":                    # somebody else's: delivered as it would be
            _ptrace(kabi.PTRACE_INTERRUPT, tid)
            _ptrace(kabi.PTRACE_CONT, tid, 0, stop.signal)
            wait_stop(tid, timeout)
        elif stop.kind == "syscall" or stop.kind == "event":
            _resume_to_event_stop(tid, timeout)
        raise CodeRefused(errno.EAGAIN, f"tid {tid}: {stop.kind} stop (signal {stop.signal}) "
                                        f"instead of the int3 of the code at {addr:#x}")


def _pending_signals(tid: int) -> int:
    """SigPnd | ShdPnd of the thread, from /proc/TID/status."""
    pending = 0
    with open(f"/proc/{tid}/status", "rb") as f:
        for line in f:
            if line.startswith((b"SigPnd:", b"ShdPnd:")):
                pending |= int(line.split()[1], 16)
    return pending


def _abort_injection(tid: int, phase: str, saved, saved_mask, timeout: float) -> None:
    """Best effort to put a thread whose injection failed half-way back as it was."""
    with contextlib.suppress(PtraceError):
        if phase == "running":                       # resumed, stop not collected
            stop = wait_stop(tid, timeout, deliver=False)
            phase = "entry" if stop.kind == "syscall" else "before"
        if phase == "entry":                         # skip the syscall: orig_rax = -1
            regs = get_regs(tid)
            regs.orig_rax = _U64
            set_regs(tid, regs)
            _ptrace(kabi.PTRACE_SYSCALL, tid)
            wait_stop(tid, timeout, deliver=False)
            phase = "exit"
        set_regs(tid, saved)
        if saved_mask is not None:
            set_sigmask(tid, saved_mask)
        if phase == "exit":
            _resume_to_event_stop(tid, timeout)


@contextlib.contextmanager
def stack_scratch(tid: int, size: int) -> Iterator[int]:
    """Yield the address of ``size`` bytes of scratch memory in the stopped thread's stack,
    below its 128-byte red zone (16-byte aligned), for injected syscalls' in/out buffers.
    The original bytes are written back on exit."""
    rsp = get_regs(tid).rsp
    addr = (rsp - 128 - size - 64) & ~0xF
    try:
        original = _read_mem(tid, addr, size)
    except OSError:
        original = b""
    if len(original) != size:
        raise PtraceError(errno.EFAULT, f"tid {tid}: stack below {rsp:#x} is not readable")
    try:
        yield addr
    finally:
        _write_mem(tid, addr, original)

"""A thin layer over ptrace(2) for the live backend: stop threads, read their CPU and signal
state, run a syscall inside a stopped thread, and always let them go again.

Public API (tids are kernel thread ids; a process's leader tid is its pid):

    seize(tid, options=DEFAULT_OPTIONS)                PTRACE_SEIZE (the thread keeps running)
    interrupt_and_wait(tid, timeout=10.0) -> Stop      PTRACE_INTERRUPT, wait for the stop
    wait_stop(tid, timeout=10.0) -> Stop               wait for the next ptrace stop
    detach(tid, sig=0)                                 PTRACE_DETACH (tid must be stopped)
    release(tid, timeout=10.0) -> bool                 detach whatever its state (idempotent)
    seized(pids, options=..., timeout=10.0)            context manager -> Seized: every thread
                                                       of every process stopped; ALWAYS detached
    get_regs(tid) / set_regs(tid, regs)                kabi.user_regs_struct (PTRACE_GETREGS)
    get_fs_gs_base(tid) -> (fs_base, gs_base)
    get_xstate(tid) -> bytes / set_xstate(tid, data)   XSAVE area (NT_X86_XSTATE); 512 bytes
                                                       (FXSAVE, PTRACE_GETFPREGS) without XSAVE
    get_fpregs(tid) -> bytes                           the 512-byte FXSAVE image
    get_sigmask(tid) -> int / set_sigmask(tid, mask)   blocked signals (bit sig-1)
    get_siginfo(tid) -> bytes                          siginfo of the current stop
    peek_siginfo(tid, shared=False) -> list[bytes]     pending siginfos (128 bytes each), in
                                                       queue order: private or shared queue
    syscall_state(regs) -> SyscallState | None         the syscall a stopped thread sits in
    inject_syscall(tid, nr, *args, check=True) -> int  run one syscall inside a stopped thread
    inject_syscalls(tid, calls, check=True) -> list    several, state saved/restored once
    stack_scratch(tid, size)                           context manager: scratch memory below
                                                       the thread's red zone, bytes restored
    find_syscall_insn(tid) / read_memory(tid, addr, size)
(the injection functions live in backend/ptrace_inject.py and are importable from here too).

Errors are PtraceError (an OSError with .errno, and a one-line message naming the tid);
ThreadGone (errno ESRCH) when a thread exited under us.

The tracer is a *thread*: every call for a given tracee must come from the thread that
seized it (normally the main thread).

Stops. After seize + interrupt_and_wait a thread is in one of:
  * "interrupt": the PTRACE_INTERRUPT trap (PTRACE_EVENT_STOP, SIGTRAP);
  * "group": a group-stop (PTRACE_EVENT_STOP with the stop signal): the process was stopped
    (SIGSTOP, SIGTSTP...) before or while we seized it; after detach it is stopped again;
  * "exit": PTRACE_EVENT_EXIT (DEFAULT_OPTIONS has PTRACE_O_TRACEEXIT): the thread is exiting;
    its registers are still readable, nothing can be injected.
A signal-delivery-stop met on the way is never kept: the signal is handed back to the kernel
(PTRACE_CONT with it), which delivers it exactly as it would have without us (a handler frame
is set up, or the default action runs), and the thread then traps on our pending interrupt.
So a kept stop never holds a dequeued signal that would be lost; pending signals stay in the
queues where peek_siginfo() sees them.

Options. DEFAULT_OPTIONS = PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACEEXIT. TRACESYSGOOD is always
added (inject_syscall tells its syscall stops from SIGTRAP by it). PTRACE_O_EXITKILL is never
used: if the checkpointer dies, the kernel detaches its tracees and they run on.

Threads stopped inside a syscall. An interrupted blocking syscall (read, nanosleep, pause...)
stops with orig_rax = the syscall number, rax = -ERESTARTSYS / -ERESTARTNOINTR /
-ERESTARTNOHAND / -ERESTART_RESTARTBLOCK and rip just past the `syscall` instruction; the
kernel rewrites this (rip -= 2, rax = orig_rax or __NR_restart_syscall) *after* the stop,
when the thread resumes without a handler to run. Nothing here touches that state:
syscall_state() reports it, detach() leaves it to the kernel, and inject_syscall() puts the
exact saved registers back and returns the thread to a PTRACE_EVENT_STOP trap in the signal
path (see inject_syscall), so the kernel's restart logic still runs afterwards.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from backend import kabi
from ckptsim.errors import CkptsimError

__all__ = [
    "DEFAULT_OPTIONS", "PtraceError", "ThreadGone", "Stop", "SyscallState", "Seized",
    "seize", "interrupt_and_wait", "wait_stop", "detach", "release", "seized",
    "get_regs", "set_regs", "get_fs_gs_base", "get_xstate", "set_xstate", "get_fpregs",
    "get_sigmask", "set_sigmask", "get_siginfo", "peek_siginfo", "syscall_state",
    "inject_syscall", "inject_syscalls", "find_syscall_insn", "stack_scratch", "read_memory",
    "list_threads",
]

DEFAULT_OPTIONS = kabi.PTRACE_O_TRACESYSGOOD | kabi.PTRACE_O_TRACEEXIT
DEFAULT_TIMEOUT = 10.0
_U64 = (1 << 64) - 1
_ALL_SIGNALS = _U64
_SYSCALL_STOP = signal.SIGTRAP | 0x80
_FIRST_RECHECK, _LAST_RECHECK = 0.0002, 0.005   # seconds between re-checks of a slow stop
# A stop usually comes within tens of microseconds (an injected syscall's round trip): a
# waiter that went to sleep meanwhile leaves its CPU idle, and waking it again costs as
# much as the stop itself (64 injected calls: ~6 ms sleeping, ~3.2 ms when it first polls
# WNOHANG for up to this long)
SPIN_S = 50e-6
# Signals that would kill the tracer mid-way; blocked while we restore tracees.
_SHIELD = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}

_REQ_NAMES = {v: k for k, v in vars(kabi).items()
              if k.startswith("PTRACE_") and not k.startswith(("PTRACE_O_", "PTRACE_EVENT_",
                                                                "PTRACE_SYSCALL_INFO_",
                                                                "PTRACE_PEEKSIGINFO_"))}


class PtraceError(CkptsimError, OSError):
    """A ptrace operation failed; ``.errno`` is set and the message names the tid."""

    def __init__(self, err: int, message: str):
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        return self.strerror


class ThreadGone(PtraceError):
    """The thread exited (or was killed) while we worked on it."""

    def __init__(self, tid: int, message: str):
        super().__init__(errno.ESRCH, message)
        self.tid = tid


def signed(v: int) -> int:
    """A u64 register value as the signed long the kernel means."""
    return v - (1 << 64) if v & (1 << 63) else v


def _ptrace(req: int, tid: int, addr=0, data=0) -> int:
    try:
        return kabi.syscall(kabi.SYS_ptrace, req, tid, addr, data)
    except OSError as e:
        err = e.errno or errno.EIO
        raise PtraceError(err, f"ptrace({_REQ_NAMES.get(req, hex(req))}) on tid {tid}: "
                               f"{os.strerror(err)}") from None


def _status_fields(tid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{tid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        return {}


def _describe(tid: int) -> str:
    st = _status_fields(tid)
    if not st:
        return "gone"
    wchan = ""
    with contextlib.suppress(OSError):
        with open(f"/proc/{tid}/wchan") as f:
            wchan = f.read().strip()
    return f"state {st.get('State', '?')}" + (f", wchan {wchan}" if wchan not in ("", "0") else "")


def _traced_by_us(tid: int) -> bool:
    return _status_fields(tid).get("TracerPid") == str(os.getpid())


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Block SIGINT/SIGTERM/SIGHUP/SIGQUIT in this thread while tracees are being restored; they
    are delivered (KeyboardInterrupt...) as soon as the tracees are consistent again."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SHIELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --------------------------------------------------------------------------------------------
# Stops
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stop:
    """A ptrace stop as waitpid reported it. ``kind``: "interrupt", "group", "exit", "event"
    (a fork/clone/exec/... event the options asked for), "syscall" (syscall entry/exit stop)
    or "signal" (a signal-delivery-stop; only returned when wait_stop(deliver=False))."""
    tid: int
    kind: str
    signal: int
    event: int = 0


def _decode(tid: int, status: int) -> Stop:
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        how = (f"exited with status {os.WEXITSTATUS(status)}" if os.WIFEXITED(status)
               else f"was killed by signal {os.WTERMSIG(status)}")
        raise ThreadGone(tid, f"tid {tid} {how}")
    if not os.WIFSTOPPED(status):  # pragma: no cover - WCONTINUED is never asked for
        raise PtraceError(errno.EINVAL, f"tid {tid}: unexpected wait status {status:#x}")
    sig, event = os.WSTOPSIG(status), status >> 16
    if event == kabi.PTRACE_EVENT_STOP:
        return Stop(tid, "interrupt" if sig == signal.SIGTRAP else "group", sig, event)
    if event == kabi.PTRACE_EVENT_EXIT:
        return Stop(tid, "exit", sig, event)
    if event:
        return Stop(tid, "event", sig, event)
    if sig == _SYSCALL_STOP:
        return Stop(tid, "syscall", sig)
    return Stop(tid, "signal", sig)


def _try_wait(tid: int) -> int | None:
    """waitpid(tid, __WALL | WNOHANG): the status, or None while nothing is reported."""
    try:
        wpid, status = os.waitpid(tid, kabi.WALL | os.WNOHANG)
    except ChildProcessError:
        raise ThreadGone(tid, f"tid {tid} is gone (or not traced by this process)") from None
    return status if wpid else None


def _timed_out(tid: int, timeout: float) -> PtraceError:
    return PtraceError(errno.ETIMEDOUT, f"tid {tid} did not stop within {timeout:g} s "
                                        f"({_describe(tid)})")


def _waitpid(tid: int, timeout: float) -> int:
    """waitpid(tid, __WALL) with a timeout (a thread in uninterruptible sleep, or a vfork
    parent waiting for its child, does not stop until that ends; a killed group leader is
    not reported while its traced sub-threads are unreaped zombies).

    waitpid itself has no timeout, so the wait sleeps in sigtimedwait for the SIGCHLD that
    the kernel sends the tracer thread on every ptrace stop and exit of its tracees: it
    wakes as soon as the stop happens (no sleep granularity per wait). SIGCHLD is blocked in
    this thread meanwhile, so that it is queued rather than discarded. This is used only
    when SIGCHLD is SIG_DFL (it would be discarded anyway) and not already blocked here (a
    caller that collects it with sigwait/signalfd keeps it). A SIGCHLD taken by another
    thread, or not sent (SIGCHLD ignored), costs at most the current re-check interval:
    0.2 ms doubling to 5 ms, as the plain sleeping poll used otherwise."""
    status = spin_wait(lambda: _try_wait(tid))
    if status is not None:
        return status
    deadline = time.monotonic() + timeout
    if signal.getsignal(signal.SIGCHLD) is signal.SIG_DFL:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        if signal.SIGCHLD not in old:
            try:
                return _wait_woken_by_sigchld(tid, deadline, timeout)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return _wait_polling(tid, deadline, timeout)


def spin_wait(try_wait, limit: float = SPIN_S):
    """``try_wait()`` until it gives something other than None, for ``limit`` seconds at
    most (see SPIN_S); its last answer."""
    end = time.perf_counter() + limit
    while True:
        got = try_wait()
        if got is not None or time.perf_counter() > end:
            return got


def _wait_woken_by_sigchld(tid: int, deadline: float, timeout: float) -> int:
    recheck = _FIRST_RECHECK
    while True:
        status = _try_wait(tid)
        if status is not None:
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(tid, timeout)
        if signal.sigtimedwait((signal.SIGCHLD,), min(left, recheck)) is None:
            recheck = min(recheck * 2, _LAST_RECHECK)   # missed or never sent: poll slower


def _wait_polling(tid: int, deadline: float, timeout: float) -> int:
    delay = _FIRST_RECHECK
    while True:
        status = _try_wait(tid)
        if status is not None:
            return status
        if time.monotonic() > deadline:
            raise _timed_out(tid, timeout)
        time.sleep(delay)
        delay = min(delay * 2, _LAST_RECHECK)


def wait_stop(tid: int, timeout: float = DEFAULT_TIMEOUT, *, deliver: bool = True) -> Stop:
    """Wait for the next ptrace stop of ``tid``. With ``deliver`` (the default), a
    signal-delivery-stop is passed on to the kernel (the signal is delivered as it would have
    been without us) and the wait goes on to the pending PTRACE_INTERRUPT trap; without it,
    the signal-delivery-stop is returned as kind "signal". Raises ThreadGone if it exits."""
    while True:
        stop = _decode(tid, _waitpid(tid, timeout))
        if stop.kind != "signal" or not deliver:
            return stop
        _ptrace(kabi.PTRACE_INTERRUPT, tid)       # make sure a trap follows the delivery
        _ptrace(kabi.PTRACE_CONT, tid, 0, stop.signal)


def seize(tid: int, options: int = DEFAULT_OPTIONS) -> None:
    """PTRACE_SEIZE ``tid`` (it keeps running). PTRACE_O_TRACESYSGOOD is always added."""
    try:
        _ptrace(kabi.PTRACE_SEIZE, tid, 0, options | kabi.PTRACE_O_TRACESYSGOOD)
    except PtraceError as e:
        st = _status_fields(tid)
        if e.errno == errno.ESRCH or not st:
            raise ThreadGone(tid, f"cannot seize tid {tid}: no such thread") from None
        if e.errno == errno.EPERM:
            if st.get("State", "").startswith(("Z", "X")):
                why = "it is a zombie"
            elif st.get("TracerPid", "0") != "0":
                who = st["TracerPid"]
                why = "it is already traced by " + ("this process" if who == str(os.getpid())
                                                    else f"pid {who}")
            elif st.get("Tgid") == str(os.getpid()):
                why = "it is a thread of this process"
            else:
                why = "permission denied"
            raise PtraceError(errno.EPERM, f"cannot seize tid {tid}: {why}") from None
        raise


def interrupt_and_wait(tid: int, timeout: float = DEFAULT_TIMEOUT) -> Stop:
    """PTRACE_INTERRUPT a seized thread and wait until it sits in an interrupt, group or exit
    stop (signals met on the way are delivered, see the module doc)."""
    try:
        _ptrace(kabi.PTRACE_INTERRUPT, tid)
    except PtraceError as e:
        if e.errno == errno.ESRCH:
            raise ThreadGone(tid, f"tid {tid} is gone (or not seized by this thread)") from None
        raise
    return wait_stop(tid, timeout)


def detach(tid: int, sig: int = 0) -> None:
    """PTRACE_DETACH a stopped tracee, delivering ``sig`` (0: none)."""
    _ptrace(kabi.PTRACE_DETACH, tid, 0, sig)


def release(tid: int, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Make sure this process no longer traces ``tid``, whatever state it is in: detach it if
    it is stopped; if it is running traced, interrupt it first; reap it if it exited traced.
    Idempotent. Returns True if it was traced by us and has been detached."""
    try:
        detach(tid)
        return True
    except PtraceError as e:
        if e.errno != errno.ESRCH:
            raise
    # ESRCH: not traced by us, gone, or traced by us but not in a ptrace-stop
    if not _traced_by_us(tid):
        return False
    try:
        interrupt_and_wait(tid, timeout)
    except ThreadGone:
        return False
    detach(tid)
    return True


# --------------------------------------------------------------------------------------------
# Seizing whole processes
# --------------------------------------------------------------------------------------------
def list_threads(pid: int) -> list[int]:
    """The tids of process ``pid`` (from /proc/PID/task)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        raise ThreadGone(pid, f"no process {pid}") from None


@dataclass
class Seized:
    """What seized() stopped. ``threads[pid]``: the stopped tids of each process (sorted);
    ``stops[tid]``: the Stop each is in; ``zombies[pid]``: its zombie tids (not traceable)."""
    options: int = DEFAULT_OPTIONS
    timeout: float = DEFAULT_TIMEOUT
    threads: dict[int, list[int]] = field(default_factory=dict)
    stops: dict[int, Stop] = field(default_factory=dict)
    zombies: dict[int, list[int]] = field(default_factory=dict)
    _traced: list[int] = field(default_factory=list)   # every tid we seized, in order
    _known: set[int] = field(default_factory=set)

    def tids(self) -> list[int]:
        return [t for pid in self.threads for t in self.threads[pid]]

    def add(self, pid: int) -> list[int]:
        """Seize and stop every thread of process ``pid``, re-reading /proc/PID/task until no
        new thread shows up (a stopped thread cannot create one, and a clone that completed
        before the stop is visible there). Returns the stopped tids."""
        pid = int(pid)
        if pid <= 0:
            raise PtraceError(errno.EINVAL, f"cannot seize pid {pid}: not a process id")
        if pid == os.getpid():
            raise PtraceError(errno.EPERM, f"cannot seize pid {pid}: it is this process")
        if pid in self.threads:
            return self.threads[pid]
        mine: list[int] = []
        zombies: list[int] = []
        while True:
            new = [t for t in list_threads(pid) if t not in self._known]
            if not new:
                break
            batch = []
            for tid in new:
                self._known.add(tid)
                self._traced.append(tid)            # recorded first: released even if
                try:                                 # interrupted right after the seize
                    seize(tid, self.options)
                except ThreadGone:
                    continue
                except PtraceError as e:
                    if e.errno == errno.EPERM and "zombie" in e.strerror:
                        zombies.append(tid)
                        continue
                    raise PtraceError(e.errno, f"process {pid}: {e.strerror}") from None
                batch.append(tid)
            for tid in batch:                        # interrupt them all, then wait for each
                with contextlib.suppress(PtraceError):
                    _ptrace(kabi.PTRACE_INTERRUPT, tid)
            for tid in batch:
                try:
                    self.stops[tid] = wait_stop(tid, self.timeout)
                    mine.append(tid)
                except ThreadGone:
                    continue
        if not mine and not zombies:
            raise ThreadGone(pid, f"process {pid} exited while being seized")
        self.threads[pid] = sorted(mine)
        self.zombies[pid] = sorted(zombies)
        return self.threads[pid]

    def let_go(self, tid: int) -> None:
        """Detach ``tid`` now (from its exit stop, it goes on exiting) and forget it."""
        release(tid, self.timeout)
        if tid in self._traced:
            self._traced.remove(tid)
        self.stops.pop(tid, None)
        for tids in self.threads.values():
            if tid in tids:
                tids.remove(tid)

    def release_all(self) -> None:
        """Detach every thread this object seized, whatever happened. Ctrl-C during it is
        deferred (and re-raised) until every thread is released."""
        errors: list[str] = []
        deferred: BaseException | None = None
        with _shielded():
            todo = list(reversed(self._traced))
            while todo:
                tid = todo[-1]
                try:
                    release(tid, self.timeout)
                except KeyboardInterrupt as e:       # only if another thread got the signal
                    deferred = e
                    continue
                except Exception as e:               # noqa: BLE001 - keep releasing the others
                    errors.append(str(e))
                todo.pop()
        self._traced.clear()
        self._known.clear()
        self.stops.clear()
        self.threads.clear()
        if deferred is not None:
            raise deferred
        if errors:
            raise PtraceError(errno.EIO, "could not detach every thread: " + "; ".join(errors))


@contextlib.contextmanager
def seized(pids: Iterable[int] | int, *, options: int = DEFAULT_OPTIONS,
           timeout: float = DEFAULT_TIMEOUT) -> Iterator[Seized]:
    """Seize and stop every thread of every process in ``pids``; on exit — normal, exception or
    KeyboardInterrupt — detach all of them (the processes run on, a group-stopped one stays
    stopped). More processes can be added inside with ``.add(pid)``."""
    if isinstance(pids, int):
        pids = [pids]
    s = Seized(options=options, timeout=timeout)
    try:
        for pid in pids:
            s.add(pid)
        yield s
    finally:
        s.release_all()


# --------------------------------------------------------------------------------------------
# Registers and signal state
# --------------------------------------------------------------------------------------------
def get_regs(tid: int) -> kabi.user_regs_struct:
    regs = kabi.user_regs_struct()
    _ptrace(kabi.PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def set_regs(tid: int, regs: kabi.user_regs_struct) -> None:
    _ptrace(kabi.PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


def get_fs_gs_base(tid: int) -> tuple[int, int]:
    regs = get_regs(tid)
    return regs.fs_base, regs.gs_base


def get_fpregs(tid: int) -> bytes:
    fp = kabi.user_fpregs_struct()
    _ptrace(kabi.PTRACE_GETFPREGS, tid, 0, ctypes.addressof(fp))
    return bytes(fp)


_xstate_size = 16384       # grows if the kernel fills the whole buffer


def get_xstate(tid: int) -> bytes:
    """The thread's XSAVE area (PTRACE_GETREGSET NT_X86_XSTATE), as long as the kernel's
    user xstate size. Without XSAVE: the 512-byte FXSAVE image of PTRACE_GETFPREGS (which is
    also the first 512 bytes of an XSAVE area, so callers can tell the two by the length)."""
    global _xstate_size
    while True:
        buf = ctypes.create_string_buffer(_xstate_size)
        iov = kabi.iovec(ctypes.addressof(buf), _xstate_size)
        try:
            _ptrace(kabi.PTRACE_GETREGSET, tid, kabi.NT_X86_XSTATE, ctypes.addressof(iov))
        except PtraceError as e:
            if e.errno in (errno.EINVAL, errno.ENODEV, errno.EIO):
                return get_fpregs(tid)
            raise
        if iov.iov_len < _xstate_size:
            return buf.raw[:iov.iov_len]
        _xstate_size *= 2


def set_xstate(tid: int, data: bytes) -> None:
    """Write back what get_xstate() returned."""
    buf = ctypes.create_string_buffer(bytes(data), len(data))
    if len(data) == ctypes.sizeof(kabi.user_fpregs_struct):
        _ptrace(kabi.PTRACE_SETFPREGS, tid, 0, ctypes.addressof(buf))
        return
    iov = kabi.iovec(ctypes.addressof(buf), len(data))
    _ptrace(kabi.PTRACE_SETREGSET, tid, kabi.NT_X86_XSTATE, ctypes.addressof(iov))


def get_sigmask(tid: int) -> int:
    """The blocked-signal mask (bit sig-1). While the thread sits in a mask-swapping syscall
    (sigsuspend, ppoll, pselect6, epoll_pwait...), this is the syscall's temporary mask."""
    mask = ctypes.c_uint64()
    _ptrace(kabi.PTRACE_GETSIGMASK, tid, kabi.SIGSET_SIZE, ctypes.addressof(mask))
    return mask.value


def set_sigmask(tid: int, mask: int) -> None:
    """PTRACE_SETSIGMASK (SIGKILL/SIGSTOP are dropped by the kernel). Note: it also clears a
    pending restore of a mask-swapping syscall's saved mask."""
    m = ctypes.c_uint64(mask & _U64)
    _ptrace(kabi.PTRACE_SETSIGMASK, tid, kabi.SIGSET_SIZE, ctypes.addressof(m))


def get_siginfo(tid: int) -> bytes:
    """The 128-byte siginfo of the current stop (PTRACE_GETSIGINFO)."""
    si = kabi.siginfo_t()
    _ptrace(kabi.PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(si))
    return bytes(si)


def peek_siginfo(tid: int, shared: bool = False) -> list[bytes]:
    """Every pending signal's siginfo (128 bytes each, queue order), without dequeuing:
    the thread's private queue, or with ``shared`` its process's shared queue. Call it with
    every thread of the process stopped, or another thread may dequeue meanwhile."""
    batch = 64
    buf = (ctypes.c_uint8 * (kabi.SIGINFO_SIZE * batch))()
    args = kabi.peeksiginfo_args(0, kabi.PTRACE_PEEKSIGINFO_SHARED if shared else 0, batch)
    out: list[bytes] = []
    while True:
        args.off = len(out)
        n = _ptrace(kabi.PTRACE_PEEKSIGINFO, tid, ctypes.addressof(args), ctypes.addressof(buf))
        if n <= 0:
            return out
        raw = bytes(memoryview(buf)[:n * kabi.SIGINFO_SIZE])
        out.extend(raw[i:i + kabi.SIGINFO_SIZE] for i in range(0, len(raw), kabi.SIGINFO_SIZE))


@dataclass(frozen=True)
class SyscallState:
    """A thread stopped in the signal path of an interrupted syscall: ``nr`` (orig_rax) and
    the kernel's restart code (ERESTARTSYS...). On resume without a handler the kernel
    re-executes it (ERESTART_RESTARTBLOCK: through restart_syscall); a handler run turns
    ERESTARTNOHAND (and ERESTARTSYS without SA_RESTART) into EINTR."""
    nr: int
    restart: int


def syscall_state(regs: kabi.user_regs_struct) -> SyscallState | None:
    nr, ret = signed(regs.orig_rax), signed(regs.rax)
    if nr >= 0 and -ret in kabi.RESTART_ERRNOS:
        return SyscallState(nr, -ret)
    return None


# --------------------------------------------------------------------------------------------
# Syscall injection: backend/ptrace_inject.py, importable from here too (loaded on first use,
# since it is built on this module)
# --------------------------------------------------------------------------------------------
_INJECTION_NAMES = frozenset({"inject_syscall", "inject_syscalls", "find_syscall_insn",
                              "stack_scratch", "read_memory", "_read_mem", "_write_mem",
                              "_resume_to_event_stop", "_abort_injection", "_insn_cache"})


def __getattr__(name: str):
    if name in _INJECTION_NAMES:
        from backend import ptrace_inject
        return getattr(ptrace_inject, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

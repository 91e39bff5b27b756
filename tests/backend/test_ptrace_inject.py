"""backend.ptrace_inject (syscall injection) and backend.ptrace's waits, against real
processes; and backend.snapshot._handlers, which reads every signal action with one batch.

Every test ends by checking that no thread of its target is traced or in a ptrace stop."""
from __future__ import annotations

import errno
import os
import signal
import struct
import threading
import time

import pytest

from backend import kabi, ptrace, ptrace_inject, snapshot
from backend.proc import read_status
from ckptsim.model.signals import SigAction, SigHand


@pytest.fixture
def ptt(c_target):
    return c_target("ptrace_target")


@pytest.fixture
def sigactions(c_target):
    return c_target("sigactions")


def handlers_one_call_each(tid: int) -> SigHand:
    """The reference: what _handlers did before the batch, one injected rt_sigaction per
    signal into one 32-byte scratch slot, read back after each call."""
    actions = []
    with ptrace.stack_scratch(tid, kabi.KERNEL_SIGACTION_SIZE) as addr:
        for sig in range(1, 65):
            ptrace.inject_syscall(tid, kabi.SYS_rt_sigaction, sig, 0, addr, 8)
            raw = ptrace.read_memory(tid, addr, kabi.KERNEL_SIGACTION_SIZE)
            handler, flags, restorer, mask = struct.unpack("<QQQQ", raw)
            actions.append(SigAction(handler, flags, mask, restorer))
    return SigHand(actions)


def test_the_injection_names_stay_importable_from_ptrace():
    from backend.ptrace import (find_syscall_insn, inject_syscall, inject_syscalls,  # noqa: F401
                                read_memory, stack_scratch)
    assert ptrace.inject_syscall is ptrace_inject.inject_syscall
    assert ptrace.inject_syscalls is ptrace_inject.inject_syscalls
    assert ptrace._read_mem is ptrace_inject._read_mem
    with pytest.raises(AttributeError):
        ptrace.no_such_name


def test_a_batch_returns_every_result_and_leaves_the_thread_as_it_was(ptt, start_target,
                                                                     check_untraced):
    t = start_target(ptt, "tick", 1)
    with ptrace.seized(t.pid) as s:
        for tid in s.tids():
            before = ptrace.get_regs(tid).as_dict()
            mask = ptrace.get_sigmask(tid)
            calls = [(kabi.SYS_gettid,), (kabi.SYS_getpid,), (kabi.SYS_kill, t.pid, 0)] * 5
            assert ptrace.inject_syscalls(tid, calls) == [tid, t.pid, 0] * 5
            assert ptrace.inject_syscalls(tid, []) == []
            assert ptrace.get_regs(tid).as_dict() == before
            assert ptrace.get_sigmask(tid) == mask
    check_untraced(t.pid)


def test_a_failing_call_ends_the_batch_and_raises_naming_it(ptt, start_target, check_untraced):
    t = start_target(ptt, "tick")
    with ptrace.seized(t.pid):
        before = ptrace.get_regs(t.pid).as_dict()
        calls = [(kabi.SYS_getpid,), (kabi.SYS_kill, t.pid, 99), (kabi.SYS_kill, t.pid, 0)]
        with pytest.raises(ptrace.PtraceError) as e:
            ptrace.inject_syscalls(t.pid, calls)
        assert e.value.errno == errno.EINVAL
        assert f"tid {t.pid}: injected syscall {kabi.SYS_kill} failed" in str(e.value)
        assert ptrace.inject_syscalls(t.pid, calls, check=False) == [t.pid, -errno.EINVAL, 0]
        assert ptrace.get_regs(t.pid).as_dict() == before
        with pytest.raises(TypeError):
            ptrace.inject_syscalls(t.pid, [(kabi.SYS_getpid, 1, 2, 3, 4, 5, 6, 7)])
    check_untraced(t.pid)


def test_batched_handlers_equal_one_call_per_signal(sigactions, start_target, check_untraced):
    t = start_target(sigactions)
    with ptrace.seized(t.pid):
        batched = snapshot._handlers(t.pid)
        reference = handlers_one_call_each(t.pid)
    check_untraced(t.pid)
    assert batched.actions == reference.actions
    acts = {sig: batched.actions[sig - 1] for sig in range(1, 65)}
    # what the target set, so the comparison covers every kind of action
    usr1 = acts[signal.SIGUSR1]
    want = kabi.SA_SIGINFO | kabi.SA_RESTART | kabi.SA_RESTORER
    assert usr1.handler > 1 and usr1.flags & want == want and usr1.restorer
    assert usr1.mask == kabi.sigbit(signal.SIGWINCH) | kabi.sigbit(signal.SIGRTMIN + 2)
    assert acts[signal.SIGPIPE].handler == kabi.SIG_IGN
    assert acts[signal.SIGHUP].handler == kabi.SIG_IGN
    assert acts[signal.SIGHUP].mask == kabi.sigbit(signal.SIGINT)
    # SIG_DFL actions that still carry flags, a mask and a restorer: /proc shows none of it
    status = read_status(t.pid)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR2):
        a = acts[sig]
        assert a.handler == kabi.SIG_DFL and a.flags and a.restorer, (sig, a)
        assert not (status.sigcgt | status.sigign) & kabi.sigbit(sig)
    assert acts[signal.SIGTERM].mask == kabi.sigbit(signal.SIGQUIT) | kabi.sigbit(signal.SIGRTMIN + 5)
    assert acts[signal.SIGUSR2].flags & kabi.SA_RESETHAND
    # the untouched ones are plain SIG_DFL, with nothing else
    assert acts[signal.SIGSEGV] == SigAction(kabi.SIG_DFL, 0, 0, 0)
    assert {sig for sig, a in acts.items() if a.handler > 1} == {
        signal.SIGUSR1, signal.SIGRTMIN + 3, signal.SIGRTMAX}


def test_the_wait_wakes_on_sigchld_without_sleeping(ptt, start_target, check_untraced,
                                                    monkeypatch):
    """200 injected getpid calls with time.sleep made to fail: every wait is woken by the
    stop's SIGCHLD (or finds the stop already there)."""
    t = start_target(ptt, "tick")

    def no_sleep(_s):
        raise AssertionError("the wait slept")
    with ptrace.seized(t.pid):
        monkeypatch.setattr(ptrace.time, "sleep", no_sleep)
        start = time.monotonic()
        assert ptrace.inject_syscalls(t.pid, [(kabi.SYS_getpid,)] * 200) == [t.pid] * 200
        took = time.monotonic() - start
        monkeypatch.undo()
    check_untraced(t.pid)
    assert took < 2.0, f"200 injected calls took {took:.2f} s"
    assert signal.SIGCHLD not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_a_stop_that_never_comes_times_out_with_sigchld_or_polling(ptt, start_target,
                                                                   check_untraced):
    """A seized thread that is running (never interrupted) reports no stop: the wait ends
    with ETIMEDOUT after its timeout, through the SIGCHLD path and through the sleeping poll
    (used when this thread already blocks SIGCHLD)."""
    t = start_target(ptt, "tick")
    ptrace.seize(t.pid)
    try:
        for blocked in (False, True):
            old = signal.pthread_sigmask(signal.SIG_BLOCK if blocked else signal.SIG_UNBLOCK,
                                         {signal.SIGCHLD})
            try:
                start = time.monotonic()
                with pytest.raises(ptrace.PtraceError) as e:
                    ptrace.wait_stop(t.pid, timeout=0.3)
                took = time.monotonic() - start
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            assert e.value.errno == errno.ETIMEDOUT and f"tid {t.pid}" in str(e.value)
            assert 0.3 <= took < 2.0
    finally:
        ptrace.release(t.pid)
    check_untraced(t.pid)


def test_a_sigchld_taken_by_another_thread_only_slows_the_wait(ptt, start_target,
                                                              check_untraced):
    """Another thread that collects SIGCHLD itself (sigwait) can take the stop's signal: the
    wait still returns, through its bounded re-check."""
    t = start_target(ptt, "tick")
    stop = threading.Event()

    def thief():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        while not stop.is_set():
            signal.sigtimedwait((signal.SIGCHLD,), 0.01)
    th = threading.Thread(target=thief)
    th.start()
    try:
        with ptrace.seized(t.pid):
            assert ptrace.inject_syscalls(t.pid, [(kabi.SYS_getpid,)] * 30) == [t.pid] * 30
    finally:
        stop.set()
        th.join()
    check_untraced(t.pid)


# -- backend/snapshot_signals.py: the 64 actions read by machine code in one stop ------------
from backend import snapshot_signals  # noqa: E402


def _set_action(tid: int, sig: int, handler: int, flags: int = 0) -> None:
    with ptrace.stack_scratch(tid, kabi.KERNEL_SIGACTION_SIZE) as addr:
        ptrace_inject.write_memory(tid, addr, struct.pack("<QQQQ", handler, flags, 0, 0))
        ptrace.inject_syscall(tid, kabi.SYS_rt_sigaction, sig, addr, 0, 8)


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_the_code_reads_what_the_injection_reads_and_leaves_no_trace(sigactions, start_target,
                                                                     check_untraced, monkeypatch):
    t = start_target(sigactions)
    with ptrace.seized(t.pid):
        regs, mask, maps = ptrace.get_regs(t.pid).as_dict(), ptrace.get_sigmask(t.pid), _maps(t.pid)
        reference = handlers_one_call_each(t.pid)
        monkeypatch.setattr(snapshot_signals, "_read_by_injection", None)   # the code, or fail
        assert snapshot_signals.read_handlers(t.pid).actions == reference.actions
        monkeypatch.undo()
        assert ptrace.get_regs(t.pid).as_dict() == regs and ptrace.get_sigmask(t.pid) == mask
        assert _maps(t.pid) == maps                     # its two pages are gone again
        assert handlers_one_call_each(t.pid).actions == reference.actions
    check_untraced(t.pid)
    assert not read_status(t.pid).sigpnd & kabi.sigbit(signal.SIGTRAP)


def test_an_ignored_sigtrap_stays_ignored(ptt, start_target, check_untraced, monkeypatch):
    """The int3's forced SIGTRAP resets a SIG_IGN action to SIG_DFL: it is put back."""
    t = start_target(ptt, "tick")
    with ptrace.seized(t.pid):
        _set_action(t.pid, signal.SIGTRAP, kabi.SIG_IGN, kabi.SA_RESTART)
        monkeypatch.setattr(snapshot_signals, "_read_by_injection", None)
        got = snapshot_signals.read_handlers(t.pid).actions[signal.SIGTRAP - 1]
        monkeypatch.undo()
        after = handlers_one_call_each(t.pid).actions[signal.SIGTRAP - 1]
    check_untraced(t.pid)
    assert got.handler == kabi.SIG_IGN and got.flags & kabi.SA_RESTART
    assert after == got
    assert read_status(t.pid).sigign & kabi.sigbit(signal.SIGTRAP)


def test_a_pending_sigtrap_or_no_room_for_pages_means_injected_calls(ptt, start_target,
                                                                    check_untraced, monkeypatch):
    import resource
    t = start_target(ptt, "tick")
    used = []
    real = snapshot_signals._read_by_injection
    monkeypatch.setattr(snapshot_signals, "_read_by_injection",
                        lambda tid: used.append(tid) or real(tid))
    with ptrace.seized(t.pid):
        reference = handlers_one_call_each(t.pid)
        maps = _maps(t.pid)
        # no address space left for the two pages: mmap fails, nothing is left mapped
        soft, hard = resource.prlimit(t.pid, resource.RLIMIT_AS)
        vm_size = int(next(ln for ln in open(f"/proc/{t.pid}/status") if ln.startswith("VmSize:")).split()[1])
        resource.prlimit(t.pid, resource.RLIMIT_AS, (vm_size * 1024, hard))
        try:
            assert snapshot_signals.read_handlers(t.pid).actions == reference.actions
        finally:
            resource.prlimit(t.pid, resource.RLIMIT_AS, (soft, hard))
        assert used == [t.pid] and _maps(t.pid) == maps
        # a SIGTRAP pending (blocked by the thread): the code would take it for its int3
        mask = ptrace.get_sigmask(t.pid)
        ptrace.set_sigmask(t.pid, mask | kabi.sigbit(signal.SIGTRAP))
        os.kill(t.pid, signal.SIGTRAP)
        assert snapshot_signals.read_handlers(t.pid).actions == reference.actions
        assert used == [t.pid, t.pid]
        assert read_status(t.pid).shdpnd & kabi.sigbit(signal.SIGTRAP)   # still pending
        # (left blocked: the target is SIGKILLed by pid at teardown, not killed by SIGTRAP)

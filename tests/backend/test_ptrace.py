"""backend.ptrace against real processes (tests/backend/targets/ptrace_target.c).

Every test ends by checking that no thread of its target is traced or in a ptrace stop."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import time

import pytest

from backend import kabi, ptrace

SIG35 = 35        # SIGRTMIN+1 for glibc: blocked by the target


@pytest.fixture
def ptt(c_target):
    return c_target("ptrace_target")


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def maps(pid: int) -> list[tuple[int, int, str, str]]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


def mapping_of(pid: int, addr: int):
    for m in maps(pid):
        if m[0] <= addr < m[1]:
            return m
    return None


def ticks(t, n: int = 1, timeout: float = 10.0) -> list[int]:
    """The next ``n`` tick numbers the target prints (fails if it stops ticking)."""
    got = []
    while len(got) < n:
        line = t.readline(timeout)
        assert line is not None, f"target {t.pid} stopped ticking (got {got})"
        if line.startswith("tick "):
            got.append(int(line.split()[1]))
    return got


def wait_in_syscall(pid: int, nr: int, timeout: float = 10.0) -> None:
    """Poll /proc/PID/syscall until the thread sits in syscall ``nr`` (a handshake: the
    target enters it right after its READY line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/syscall") as f:
            if f.read().split()[0] == str(nr):
                return
        time.sleep(0.002)
    pytest.fail(f"process {pid} never blocked in syscall {nr}")


@contextlib.contextmanager
def seized_spinning(t, timeout: float = 10.0):
    """seized(t.pid), once the "spin" target's main thread has reached its loop (right after
    its READY line it may still be in printf's write)."""
    deadline = time.monotonic() + timeout
    while True:
        with ptrace.seized(t.pid) as s:
            if ptrace.get_regs(t.pid).rip == t.info["spin"]:
                yield s
                return
        assert time.monotonic() < deadline, f"target {t.pid} never reached its spin loop"
        time.sleep(0.001)


def rt_sigqueue(pid: int, sig: int, value: int, tid: int | None = None) -> None:
    """sigqueue(3) (or pthread_sigqueue to ``tid``): SI_QUEUE with our pid and ``value``."""
    si = kabi.siginfo_t()
    si.si_signo, si.si_code = sig, kabi.SI_QUEUE
    si.f.rt.pid, si.f.rt.uid, si.f.rt.sigval = os.getpid(), os.getuid(), value
    if tid is None:
        kabi.syscall(kabi.SYS_rt_sigqueueinfo, pid, sig, ctypes.byref(si))
    else:
        kabi.syscall(kabi.SYS_rt_tgsigqueueinfo, pid, tid, sig, ctypes.byref(si))


# --------------------------------------------------------------------------------------------
def test_seize_interrupt_detach_leaves_target_running(ptt, start_target, check_untraced):
    t = start_target(ptt, "tick")
    before = ticks(t, 3)[-1]
    with ptrace.seized([t.pid]) as s:
        assert s.threads == {t.pid: [t.pid]}
        assert s.stops[t.pid].kind == "interrupt"
        st = status(t.pid)
        assert st["TracerPid"] == str(os.getpid()) and st["State"].startswith("t")
        t.drain()
        assert t.readline(timeout=0.2) is None, "the target printed while stopped"
    check_untraced(t.pid)
    after = ticks(t, 3)
    assert after[0] > before and after == list(range(after[0], after[0] + 3))
    check_untraced(t.pid)


def test_registers_match_what_the_target_reports(ptt, start_target, check_untraced):
    t = start_target(ptt, "spin")
    with seized_spinning(t) as s:
        assert s.stops[t.pid].kind == "interrupt"
        regs = ptrace.get_regs(t.pid)
        assert regs.rip == t.info["spin"]          # the one-instruction loop
        assert regs.r12 == t.info["magic"]
        assert ptrace.syscall_state(regs) is None  # stopped in user mode
        text = mapping_of(t.pid, regs.rip)
        assert text and "x" in text[2] and text[3].endswith("ptrace_target")
        stack = mapping_of(t.pid, regs.rsp)
        assert stack and stack[3] == "[stack]"
        assert 0 < t.info["local"] - regs.rsp < 4096   # main's frame is just above
        assert ptrace.get_fs_gs_base(t.pid) == (t.info["tp"], regs.gs_base)
        assert regs.fs_base == t.info["tp"]
        xs = ptrace.get_xstate(t.pid)
        # the legacy area (x87, MXCSR, XMM0-15: bytes 0..415) is the FXSAVE image; bytes
        # 464..511 of an XSAVE area carry the kernel's software-reserved xstate info
        assert len(xs) > 512 and xs[:416] == ptrace.get_fpregs(t.pid)[:416]
        mxcsr = int.from_bytes(xs[24:28], "little")
        assert mxcsr == 0x1F80                   # the default the target never changed
    check_untraced(t.pid)
    # it spins on: seized again, it is at the same instruction with the same r12
    with ptrace.seized(t.pid):
        regs = ptrace.get_regs(t.pid)
        assert (regs.rip, regs.r12) == (t.info["spin"], t.info["magic"])
    check_untraced(t.pid)


def test_every_thread_is_seized(ptt, start_target, check_untraced):
    t = start_target(ptt, "tick", 3)
    with ptrace.seized([t.pid]) as s:
        tids = ptrace.list_threads(t.pid)
        assert len(tids) == 4
        assert s.threads[t.pid] == tids == s.tids()
        for tid in tids:
            st = status(tid)
            assert st["TracerPid"] == str(os.getpid()) and st["State"].startswith("t"), tid
            assert s.stops[tid].kind == "interrupt"
    check_untraced(t.pid)
    ticks(t, 2)
    check_untraced(t.pid)


def test_threads_created_while_seizing_are_caught(ptt, start_target, check_untraced):
    t = start_target(ptt, "churn", 2)     # 2 lasting threads, and short-lived ones all along
    most = 0
    for _ in range(5):
        with ptrace.seized([t.pid]) as s:
            live = ptrace.list_threads(t.pid)
            assert len(live) >= 3
            most = max(most, len(live))
            assert set(live) <= set(s.threads[t.pid]) | set(s.zombies[t.pid])
            for tid in live:
                if tid in s.stops:
                    assert status(tid)["State"].startswith("t"), tid
        check_untraced(t.pid)
    assert most > 3, "no short-lived thread was ever caught: the target did not churn"
    check_untraced(t.pid)


def test_peek_siginfo_sees_queued_blocked_signals(ptt, start_target, check_untraced):
    t = start_target(ptt, "tick", 1)
    rt_sigqueue(t.pid, SIG35, 1234)                 # to the process: shared queue
    rt_sigqueue(t.pid, SIG35, 4321)                 # rt signals queue twice
    rt_sigqueue(t.pid, signal.SIGUSR2, 5678, tid=t.pid)   # to the main thread: private
    with ptrace.seized(t.pid) as s:
        shared = [kabi.siginfo_t.from_buffer_copy(b) for b in ptrace.peek_siginfo(t.pid, True)]
        private = [kabi.siginfo_t.from_buffer_copy(b) for b in ptrace.peek_siginfo(t.pid)]
        other = [tid for tid in s.tids() if tid != t.pid][0]
        assert ptrace.peek_siginfo(other) == []
        assert ptrace.peek_siginfo(other, shared=True) == ptrace.peek_siginfo(t.pid, True)
    check_untraced(t.pid)
    assert [(i.si_signo, i.si_code, i.f.rt.pid, i.f.rt.uid, i.f.rt.sigval) for i in shared] == [
        (SIG35, kabi.SI_QUEUE, os.getpid(), os.getuid(), 1234),
        (SIG35, kabi.SI_QUEUE, os.getpid(), os.getuid(), 4321)]
    assert [(i.si_signo, i.si_code, i.f.rt.sigval) for i in private] == [
        (signal.SIGUSR2, kabi.SI_QUEUE, 5678)]
    # peeking did not dequeue them
    st = status(t.pid)
    assert int(st["ShdPnd"], 16) == kabi.sigbit(SIG35)
    assert int(st["SigPnd"], 16) == kabi.sigbit(signal.SIGUSR2)


def test_sigmask_matches_proc_status(ptt, start_target, check_untraced):
    t = start_target(ptt, "tick", 1)
    with ptrace.seized(t.pid) as s:
        for tid in s.tids():
            mask = ptrace.get_sigmask(tid)
            assert mask == int(status(tid)["SigBlk"], 16)
            assert mask & kabi.sigbit(signal.SIGUSR2) and mask & kabi.sigbit(SIG35)
            assert not mask & kabi.sigbit(signal.SIGUSR1)
    check_untraced(t.pid)


def test_inject_getpid_in_user_mode(ptt, start_target, check_untraced):
    t = start_target(ptt, "spin")
    with seized_spinning(t):
        before = ptrace.get_regs(t.pid).as_dict()
        mask = ptrace.get_sigmask(t.pid)
        assert ptrace.inject_syscall(t.pid, kabi.SYS_getpid) == t.pid
        assert ptrace.inject_syscall(t.pid, kabi.SYS_gettid) == t.pid
        assert ptrace.get_regs(t.pid).as_dict() == before
        assert ptrace.get_sigmask(t.pid) == mask
        assert ptrace.get_siginfo(t.pid)[8:12] == (signal.SIGTRAP | 0x8000).to_bytes(4, "little")
        with pytest.raises(ptrace.PtraceError) as e:    # kill(pid, 0) with a bad signal: EINVAL
            ptrace.inject_syscall(t.pid, kabi.SYS_kill, t.pid, 99)
        assert e.value.errno == errno.EINVAL
        assert ptrace.inject_syscall(t.pid, kabi.SYS_kill, t.pid, 99, check=False) == -errno.EINVAL
        assert ptrace.get_regs(t.pid).as_dict() == before
    check_untraced(t.pid)
    with ptrace.seized(t.pid):     # still spinning at its loop
        regs = ptrace.get_regs(t.pid)
        assert (regs.rip, regs.r12) == (t.info["spin"], t.info["magic"])
    check_untraced(t.pid)


def test_inject_in_a_thread_and_in_an_interrupted_sleep(ptt, start_target, check_untraced):
    t = start_target(ptt, "tick", 2)
    with ptrace.seized(t.pid) as s:
        for tid in s.tids():
            before = ptrace.get_regs(tid).as_dict()
            assert ptrace.inject_syscall(tid, kabi.SYS_gettid) == tid
            assert ptrace.inject_syscall(tid, kabi.SYS_getpid) == t.pid
            assert ptrace.get_regs(tid).as_dict() == before
    check_untraced(t.pid)
    a, b = ticks(t, 2)
    assert b == a + 1
    check_untraced(t.pid)


def test_inject_into_a_blocked_read_then_the_read_restarts(ptt, start_target, check_untraced):
    t = start_target(ptt, "block")
    wait_in_syscall(t.pid, kabi.SYS_read)
    with ptrace.seized(t.pid):
        regs = ptrace.get_regs(t.pid)
        assert ptrace.syscall_state(regs) == ptrace.SyscallState(kabi.SYS_read,
                                                                 kabi.ERESTARTSYS)
        assert ptrace.inject_syscall(t.pid, kabi.SYS_getpid) == t.pid
        assert ptrace.get_regs(t.pid).as_dict() == regs.as_dict()
    check_untraced(t.pid)
    t.write(b"x")          # the read was restarted: it returns the byte, not -512 or EINTR
    assert t.readline() == "got x"
    check_untraced(t.pid)


def test_inject_rt_sigaction_reads_the_handler(ptt, start_target, check_untraced):
    t = start_target(ptt, "tick")
    with ptrace.seized(t.pid):
        size = ctypes.sizeof(kabi.kernel_sigaction)
        with ptrace.stack_scratch(t.pid, size) as addr:
            saved = ptrace._read_mem(t.pid, addr, size)
            assert ptrace.inject_syscall(t.pid, kabi.SYS_rt_sigaction, signal.SIGUSR1, 0, addr,
                                         kabi.SIGSET_SIZE) == 0
            act = kabi.kernel_sigaction.from_buffer_copy(ptrace._read_mem(t.pid, addr, size))
            ptrace.inject_syscall(t.pid, kabi.SYS_rt_sigaction, signal.SIGUSR2, 0, addr,
                                  kabi.SIGSET_SIZE)
            dfl = kabi.kernel_sigaction.from_buffer_copy(ptrace._read_mem(t.pid, addr, size))
        assert ptrace._read_mem(t.pid, addr, size) == saved      # scratch bytes restored
    check_untraced(t.pid)
    assert act.sa_handler == t.info["handler"]
    want = kabi.SA_SIGINFO | kabi.SA_RESTART | kabi.SA_RESTORER
    assert act.sa_flags & want == want
    assert act.sa_mask == kabi.sigbit(signal.SIGWINCH)
    assert mapping_of(t.pid, act.sa_restorer)[2][2] == "x"   # glibc's __restore_rt
    assert dfl.sa_handler == kabi.SIG_DFL
    ticks(t, 2)
    check_untraced(t.pid)


def test_detach_on_exception_and_keyboard_interrupt(ptt, start_target, check_untraced):
    t = start_target(ptt, "tick", 1)
    with pytest.raises(ZeroDivisionError):
        with ptrace.seized(t.pid):
            1 / 0
    check_untraced(t.pid)
    with pytest.raises(KeyboardInterrupt):
        with ptrace.seized(t.pid):
            raise KeyboardInterrupt
    check_untraced(t.pid)
    ticks(t, 2)
    check_untraced(t.pid)


def test_group_stopped_target_stays_stopped(ptt, start_target, check_untraced):
    t = start_target(ptt, "tick")
    os.kill(t.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while not status(t.pid)["State"].startswith("T"):
        assert time.monotonic() < deadline, "SIGSTOP did not stop the target"
        time.sleep(0.002)
    os.kill(t.pid, signal.SIGUSR1)      # handled, unblocked: pending until SIGCONT
    usr1 = kabi.sigbit(signal.SIGUSR1)
    with ptrace.seized(t.pid) as s:
        assert s.stops[t.pid].kind == "group" and s.stops[t.pid].signal == signal.SIGSTOP
        before = ptrace.get_regs(t.pid).as_dict()
        assert ptrace.inject_syscall(t.pid, kabi.SYS_getpid) == t.pid
        # the injection ran with every signal blocked: SIGUSR1 was not delivered meanwhile
        assert int(status(t.pid)["ShdPnd"], 16) == usr1
        assert ptrace.get_regs(t.pid).as_dict() == before
        assert ptrace.get_siginfo(t.pid)[8:12] == (signal.SIGSTOP | 0x8000).to_bytes(4, "little")
    check_untraced(t.pid)
    assert int(status(t.pid)["ShdPnd"], 16) == usr1
    # detach wakes it to re-enter the group stop: 'R' for a moment under load, then 'T'
    deadline = time.monotonic() + 10
    while not status(t.pid)["State"].startswith("T"):
        assert time.monotonic() < deadline, "the target did not return to its group stop"
        time.sleep(0.002)
    t.drain()
    assert t.readline(timeout=0.1) is None, "the group-stopped target ran after detach"
    os.kill(t.pid, signal.SIGCONT)
    ticks(t, 2)
    check_untraced(t.pid)


def test_bad_pids_are_refused_cleanly(ptt, start_target, check_untraced):
    t = start_target(ptt, "tick")
    gone = t.pid
    with pytest.raises(ptrace.PtraceError) as e:
        with ptrace.seized([t.pid, 0x3FFFFFFF]):
            pass
    assert "no process 1073741823" in str(e.value) and e.value.errno == errno.ESRCH
    check_untraced(gone)                            # the first one was released
    with pytest.raises(ptrace.PtraceError, match="this process"):
        with ptrace.seized(os.getpid()):
            pass
    with ptrace.seized(t.pid):
        with pytest.raises(ptrace.PtraceError, match="already traced by this process"):
            ptrace.seize(t.pid)
    check_untraced(t.pid)
    ticks(t, 1)


def test_a_signal_met_while_stopping_is_delivered_not_lost(ptt, start_target, check_untraced):
    t = start_target(ptt, "tick")
    try:
        ptrace.seize(t.pid)                  # traced and running: a signal makes it stop
        os.kill(t.pid, signal.SIGUSR1)       # handled (SA_SIGINFO|SA_RESTART), unblocked
        deadline = time.monotonic() + 10
        while not status(t.pid)["State"].startswith("t"):     # its signal-delivery-stop
            assert time.monotonic() < deadline, "no signal-delivery-stop"
            time.sleep(0.002)
        stop = ptrace.interrupt_and_wait(t.pid)
        assert stop.kind == "interrupt"
        # the kernel delivered SIGUSR1 as without us, then trapped at the handler's entry
        regs = ptrace.get_regs(t.pid)
        assert regs.rip == t.info["handler"]
        assert regs.rdi == signal.SIGUSR1
        assert not int(status(t.pid)["SigPnd"], 16) & kabi.sigbit(signal.SIGUSR1)
        assert not int(status(t.pid)["ShdPnd"], 16) & kabi.sigbit(signal.SIGUSR1)
    finally:
        ptrace.release(t.pid)
    check_untraced(t.pid)
    ticks(t, 2)                              # the handler returned, the nanosleep restarted
    check_untraced(t.pid)


@pytest.mark.parametrize("as_root", [False, True], ids=["child", "root"])
def test_a_thread_seized_while_exiting_is_let_go_and_its_process_saved_as_a_zombie(as_root):
    """dump._let_exiting_go: a process whose only thread is in its exit stop (it was exiting
    as the tree was stopped) is let go on exiting; it is then a zombie of its stopped parent
    (here: us), with no thread left to gather, and no longer traced."""
    import subprocess
    import sys
    from backend.dump import _let_exiting_go
    from backend.snapshot import Unsupported
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE)
    try:
        with ptrace.seized(p.pid) as s:
            ptrace._ptrace(kabi.PTRACE_CONT, p.pid, 0, 0)   # runs on, traced
            p.stdin.close()                                 # ... and exits: its exit stop
            s.stops[p.pid] = ptrace.wait_stop(p.pid, 10.0)
            assert s.stops[p.pid].kind == "exit"
            if as_root:                                     # nothing would be left to save
                with pytest.raises(Unsupported, match=f"the root {p.pid} was exiting"):
                    _let_exiting_go(s, p.pid)
                return
            _let_exiting_go(s, os.getpid())
            assert s.threads[p.pid] == [] and p.pid not in s.stops
            with open(f"/proc/{p.pid}/stat") as f:
                assert f.read().rpartition(")")[2].split()[0] == "Z"
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
    assert p.returncode == 0


def test_an_exiting_process_with_children_is_refused():
    """Letting it end would hand its children to a reaper outside the tree."""
    import subprocess
    import sys
    from backend.dump import _let_exiting_go
    from backend.snapshot import Unsupported
    code = ("import subprocess, sys; c = subprocess.Popen(['sleep', '60']); "
            "print(c.pid, flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    grandchild = int(p.stdout.readline())
    try:
        with ptrace.seized(p.pid) as s:
            ptrace._ptrace(kabi.PTRACE_CONT, p.pid, 0, 0)
            p.stdin.close()
            s.stops[p.pid] = ptrace.wait_stop(p.pid, 10.0)
            assert s.stops[p.pid].kind == "exit"
            with pytest.raises(Unsupported, match="its children would leave the tree"):
                _let_exiting_go(s, os.getpid())
    finally:
        os.kill(grandchild, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        p.stdout.close()

"""Signals: syscalls, permission and errno cases, queues, delivery and default actions."""
import errno

import pytest
from hypothesis import given, settings, strategies as st

from ckptsim.errors import ModelError
from ckptsim.model.creds import Cred, CredOps
from ckptsim.model.signals import (
    MINSIGSTKSZ, RLIM_INFINITY, RLIMIT_NOFILE, RLIMIT_SIGPENDING, RLIMIT_STACK, SA_NOCLDSTOP,
    SA_NODEFER, SA_ONSTACK, SA_RESETHAND, SA_RESTART, SI_QUEUE, SI_TKILL, SI_USER, SIG_BLOCK,
    SIG_DFL, SIG_IGN, SIG_SETMASK, SIG_UNBLOCK, SIGABRT, SIGCHLD, SIGCONT, SIGHUP, SIGINT,
    SIGKILL, SIGPIPE, SIGRTMIN, SIGSEGV, SIGSTOP, SIGTERM, SIGTSTP, SIGUSR1, SIGUSR2, SIGWINCH,
    SS_AUTODISARM, SS_DISABLE, SS_ONSTACK, AltStack, SigAction, SigHand, SignalOps, SigInfo,
    SignalStruct, SigPending, ThreadSignals, default_action, sigbit, sigmask)
from ckptsim.model.task import PidNamespace, Task
from ckptsim.model.tasks_ops import CLONE_SIGHAND, CLONE_THREAD, CLONE_VM, TaskOps

H = 0x401000  # a handler address


class MiniKernel(TaskOps, SignalOps, CredOps):
    """Tasks, signals and creds only: used until the whole Kernel imports."""

    def __init__(self):
        self.output, self.task_by_pid = [], {}
        self.root_ns = PidNamespace(None)
        init = Task(self, self.new_pid(self.root_ns), "init")
        self.root_ns.reaper = init
        self.task_by_pid[init.pid] = init
        init.pgrp, init.session = init.pid.attach(), init.pid.attach()
        init.sighand, init.signal, init.sigstate = SigHand(), SignalStruct(), ThreadSignals()
        init.cred = Cred.root()
        self.init = init

    def clone(self, t, flags=0):
        child = Task(self, self.new_pid(t.ns), t.comm)
        self.task_by_pid[child.pid] = child
        child.sighand = t.sighand.get() if flags & CLONE_SIGHAND else t.sighand.fork_copy()
        child.signal = t.signal.get() if flags & CLONE_THREAD else t.signal.fork_copy()
        child.sigstate = t.sigstate.fork_copy()
        child.cred = t.cred
        if flags & CLONE_THREAD:
            child.leader, child.threads, child.exit_signal = t.leader, [], -1
            t.leader.threads.append(child)
        else:
            child.parent = t.leader
            t.leader.children.append(child)
            child.pgrp, child.session = t.leader.pgrp.attach(), t.leader.session.attach()
        return child


def make_kernel():
    try:
        from ckptsim.model.kernel import Kernel
    except ImportError:
        return MiniKernel()
    return Kernel()


@pytest.fixture
def k():
    return make_kernel()


def proc(k, parent=None, cred=None):
    child = k.clone(parent or k.init)
    if cred is not None:
        child.cred = cred
    return child


def thread(k, t):
    return k.clone(t, CLONE_VM | CLONE_SIGHAND | CLONE_THREAD)


def pid_of(k, t):
    return k.observed_pid(t)


def err(fn, *args):
    with pytest.raises(ModelError) as exc:
        fn(*args)
    return exc.value.errno


def handled_output(k):
    return [o for o in k.output if o[0] == "signal"]


# -- sigaction ---------------------------------------------------------------------------------
def test_sigaction_set_query_and_old(k):
    t = proc(k)
    assert k.sigaction(t, SIGUSR1) == SigAction()
    old = k.sigaction(t, SIGUSR1, H, SA_RESTART, sigmask(SIGUSR2, SIGKILL, SIGSTOP), 0x77)
    assert old == SigAction()
    assert k.sigaction(t, SIGUSR1) == SigAction(H, SA_RESTART, sigmask(SIGUSR2), 0x77)
    assert k.sigaction(t, SIGKILL) == SigAction()  # querying is fine


@pytest.mark.parametrize("sig", [0, -1, 65, SIGKILL, SIGSTOP])
def test_sigaction_einval(k, sig):
    t = proc(k)
    assert err(k.sigaction, t, sig, SIG_IGN) == errno.EINVAL


def test_sigaction_bad_handler(k):
    assert err(k.sigaction, proc(k), SIGUSR1, -5) == errno.EFAULT


def test_setting_ignore_discards_pending_even_when_blocked(k):
    t = proc(k)
    other = thread(k, t)
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGUSR1))
    other.sigstate.blocked = sigmask(SIGUSR1)
    k.kill(t, pid_of(k, t), SIGUSR1)
    k.tgkill(t, pid_of(k, t), k.gettid(other), SIGUSR1)
    assert k.sigpending(t) == sigmask(SIGUSR1) and len(other.sigstate.pending) == 1
    k.sigaction(t, SIGUSR1, SIG_IGN)
    assert k.sigpending(t) == 0 and len(other.sigstate.pending) == 0


# -- masks ---------------------------------------------------------------------------------------
def test_sigprocmask(k):
    t = proc(k)
    assert k.sigprocmask(t, SIG_BLOCK, sigmask(SIGUSR1, SIGKILL, SIGSTOP)) == 0
    assert k.sigprocmask(t, SIG_BLOCK) == sigmask(SIGUSR1)  # no mask: query
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGUSR2))
    assert k.sigprocmask(t, SIG_UNBLOCK, sigmask(SIGUSR1)) == sigmask(SIGUSR1, SIGUSR2)
    assert k.sigprocmask(t, SIG_SETMASK, (1 << 64) - 1) == sigmask(SIGUSR2)
    assert t.sigstate.blocked == ((1 << 64) - 1) & ~sigmask(SIGKILL, SIGSTOP)
    assert err(k.sigprocmask, t, 3, 0) == errno.EINVAL


def test_sigpending_reports_blocked_only(k):
    t = proc(k)
    k.sigaction(t, SIGUSR1, H)
    k.sigaction(t, SIGUSR2, H)
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGUSR1, SIGUSR2))
    k.kill(t, pid_of(k, t), SIGUSR1)
    k.tgkill(t, pid_of(k, t), k.gettid(t), SIGUSR2)  # private queue
    assert k.sigpending(t) == sigmask(SIGUSR1, SIGUSR2)
    k.sigprocmask(t, SIG_SETMASK, sigmask(SIGUSR2))
    assert k.sigpending(t) == sigmask(SIGUSR2)


# -- kill and permission -----------------------------------------------------------------------
def test_kill_errors(k):
    t = proc(k, cred=Cred.user(1000))
    other = proc(k, cred=Cred.user(2000))
    assert err(k.kill, t, 99999, SIGTERM) == errno.ESRCH
    assert err(k.kill, t, pid_of(k, other), 65) == errno.EINVAL
    assert err(k.kill, t, pid_of(k, other), -1) == errno.EINVAL
    assert err(k.kill, t, pid_of(k, other), SIGTERM) == errno.EPERM
    assert err(k.kill, t, pid_of(k, other), 0) == errno.EPERM  # signal 0 checks permission
    assert err(k.kill, t, -99999, SIGTERM) == errno.ESRCH
    assert other.state == "running"


def test_kill_zero_checks_only(k):
    t = proc(k)
    k.sigaction(t, SIGUSR1, H)
    assert k.kill(k.init, pid_of(k, t), 0) == 0
    assert len(t.signal.shared_pending) == 0


def test_kill_same_uid_and_cap_kill(k):
    a = proc(k, cred=Cred.user(1000))
    b = proc(k, cred=Cred.user(1000))
    k.sigaction(b, SIGUSR1, H)
    k.kill(a, pid_of(k, b), SIGUSR1)
    assert b.signal.shared_pending.items == [SigInfo(SIGUSR1, SI_USER, pid_of(k, a), 1000, 0)]
    k.kill(k.init, pid_of(k, a), SIGTERM)  # root has CAP_KILL
    assert a.signal.shared_pending.mask == sigbit(SIGTERM)


def test_sigcont_allowed_within_session(k):
    a = proc(k, cred=Cred.user(1000))
    b = proc(k, cred=Cred.user(2000))  # same session as init and a
    k.kill(a, pid_of(k, b), SIGCONT)
    assert err(k.kill, a, pid_of(k, b), SIGUSR1) == errno.EPERM


def test_kill_pgrp_and_own_group(k):
    a = proc(k)
    b = proc(k, parent=a)
    c = proc(k)
    for t in (a, b, c):
        k.sigaction(t, SIGUSR1, H)
    k.setpgid(k.init, pid_of(k, a), pid_of(k, a))
    k.setpgid(a, pid_of(k, b), pid_of(k, a))
    k.kill(c, -pid_of(k, a), SIGUSR1)
    assert [t.signal.shared_pending.mask for t in (a, b, c)] == [sigbit(SIGUSR1)] * 2 + [0]
    k.kill(c, 0, SIGUSR2)  # c's own process group (init's): queued, delivered when run
    assert c.signal.shared_pending.mask == sigbit(SIGUSR2)
    assert a.signal.shared_pending.mask == sigbit(SIGUSR1)


def test_kill_pgrp_all_denied_is_eperm(k):
    a = proc(k, cred=Cred.user(1))
    k.setpgid(k.init, pid_of(k, a), pid_of(k, a))
    u = proc(k, cred=Cred.user(2))
    assert err(k.kill, u, -pid_of(k, a), SIGTERM) == errno.EPERM


def test_kill_all(k):
    a = proc(k, cred=Cred.user(1))
    b = proc(k, cred=Cred.user(1))
    c = proc(k, cred=Cred.user(2))
    for t in (a, b, c):
        k.sigaction(t, SIGUSR1, H)
    assert k.kill(a, -1, SIGUSR1) == 0
    assert b.signal.shared_pending.mask == sigbit(SIGUSR1)
    assert a.signal.shared_pending.mask == 0  # not the caller
    assert c.signal.shared_pending.mask == 0  # EPERM is silent for kill(-1)
    assert k.init.signal.shared_pending.mask == 0  # never init


def test_kill_zombie_succeeds_without_effect(k):
    t = proc(k)
    k.exit_group(t, 3)
    assert t.state == "zombie"
    assert k.kill(k.init, pid_of(k, t), SIGTERM) == 0


def test_tgkill(k):
    t = proc(k)
    th = thread(k, t)
    k.sigaction(t, SIGUSR1, H)
    k.tgkill(k.init, pid_of(k, t), k.gettid(th), SIGUSR1)
    assert th.sigstate.pending.items[0].code == SI_TKILL
    assert t.sigstate.pending.mask == 0 and t.signal.shared_pending.mask == 0
    assert err(k.tgkill, k.init, pid_of(k, k.init), k.gettid(th), SIGUSR1) == errno.ESRCH
    assert err(k.tgkill, k.init, 0, k.gettid(th), SIGUSR1) == errno.EINVAL
    assert err(k.tgkill, k.init, pid_of(k, t), -3, SIGUSR1) == errno.EINVAL
    assert err(k.tgkill, k.init, pid_of(k, t), 99999, SIGUSR1) == errno.ESRCH
    u = proc(k, cred=Cred.user(9))
    assert err(k.tgkill, u, pid_of(k, t), k.gettid(th), SIGUSR1) == errno.EPERM


# -- queues --------------------------------------------------------------------------------------
def test_standard_signals_coalesce_keeping_first_info(k):
    t = proc(k)
    k.sigaction(t, SIGUSR1, H)
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGUSR1))
    k.sigqueue(k.init, pid_of(k, t), SIGUSR1, 11)
    k.sigqueue(k.init, pid_of(k, t), SIGUSR1, 22)
    k.kill(k.init, pid_of(k, t), SIGUSR1)
    assert t.signal.shared_pending.items == [SigInfo(SIGUSR1, SI_QUEUE, 1, 0, 11)]
    k.sigprocmask(t, SIG_SETMASK, 0)
    k.deliver_signals(t)
    assert handled_output(k) == [("signal", pid_of(k, t), SIGUSR1, 11, "stack")]


def test_rt_signals_queue_every_value_in_order(k):
    t = proc(k)
    rt = SIGRTMIN + 2
    k.sigaction(t, rt, H)
    k.sigaction(t, SIGRTMIN, H)
    k.sigprocmask(t, SIG_BLOCK, sigmask(rt, SIGRTMIN))
    for value in (5, 6, 7):
        k.sigqueue(k.init, pid_of(k, t), rt, value)
    k.kill(k.init, pid_of(k, t), rt)
    k.sigqueue(k.init, pid_of(k, t), SIGRTMIN, 1)
    assert [i.value for i in t.signal.shared_pending.items] == [5, 6, 7, 0, 1]
    k.sigprocmask(t, SIG_SETMASK, 0)
    k.deliver_signals(t)
    tg = pid_of(k, t)
    assert handled_output(k) == [("signal", tg, SIGRTMIN, 1, "stack")] + [
        ("signal", tg, rt, v, "stack") for v in (5, 6, 7, 0)]


def test_sigqueue_errors_and_rlimit(k):
    t = proc(k)
    rt = SIGRTMIN
    k.sigaction(t, rt, H)
    assert err(k.sigqueue, k.init, 0, rt, 1) == errno.ESRCH
    assert err(k.sigqueue, k.init, pid_of(k, t), 70, 1) == errno.EINVAL
    assert k.sigqueue(k.init, pid_of(k, t), 0, 1) == 0
    k.setrlimit(t, RLIMIT_SIGPENDING, 2, 2)
    k.sigqueue(k.init, pid_of(k, t), rt, 1)
    k.sigqueue(k.init, pid_of(k, t), rt, 2)
    assert err(k.sigqueue, k.init, pid_of(k, t), rt, 3) == errno.EAGAIN
    u = proc(k, cred=Cred.user(4))
    assert err(k.sigqueue, u, pid_of(k, t), rt, 1) == errno.EPERM


def test_ignored_signals_are_dropped_at_send_time(k):
    t = proc(k)
    k.kill(k.init, pid_of(k, t), SIGCHLD)   # default-ignored
    k.sigaction(t, SIGUSR1, SIG_IGN)
    k.kill(k.init, pid_of(k, t), SIGUSR1)
    assert len(t.signal.shared_pending) == 0
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGWINCH))  # blocked: kept until unblocked
    k.kill(k.init, pid_of(k, t), SIGWINCH)
    assert k.sigpending(t) == sigmask(SIGWINCH)
    k.sigprocmask(t, SIG_SETMASK, 0)
    assert k.deliver_signals(t) == [("ignore", SIGWINCH)]
    assert t.state == "running"


def test_sigpending_object():
    q = SigPending()
    assert q.add(SigInfo(SIGINT)) and not q.add(SigInfo(SIGINT, value=3))
    assert q.add(SigInfo(40, value=1)) and q.add(SigInfo(40, value=2))
    assert q.mask == sigmask(SIGINT, 40) and len(q) == 3
    assert q.take(40).value == 1
    q.discard(sigmask(40))
    assert q.items == [SigInfo(SIGINT)] and q.copy() == q and q.copy() is not q


# -- delivery ----------------------------------------------------------------------------------
def test_delivery_order_private_first_then_lowest(k):
    t = proc(k)
    for sig in (SIGHUP, SIGINT, SIGUSR1):
        k.sigaction(t, sig, H)
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGHUP, SIGINT, SIGUSR1))
    k.kill(k.init, pid_of(k, t), SIGHUP)
    k.tgkill(k.init, pid_of(k, t), k.gettid(t), SIGUSR1)
    k.tgkill(k.init, pid_of(k, t), k.gettid(t), SIGINT)
    k.sigprocmask(t, SIG_SETMASK, 0)
    assert k.has_deliverable_signal(t)
    assert k.deliver_signals(t) == [("handler", SIGINT), ("handler", SIGUSR1), ("handler", SIGHUP)]
    assert not k.has_deliverable_signal(t)


def test_blocked_signal_waits(k):
    t = proc(k)
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGTERM))
    k.kill(k.init, pid_of(k, t), SIGTERM)
    assert k.deliver_signals(t) == [] and t.state == "running"


def test_shared_signal_goes_to_a_thread_not_blocking_it(k):
    t = proc(k)
    th = thread(k, t)
    k.sigaction(t, SIGUSR1, H)
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGUSR1))
    k.kill(k.init, pid_of(k, t), SIGUSR1)
    assert k.deliver_signals(t) == []
    assert k.deliver_signals(th) == [("handler", SIGUSR1)]


def test_handler_mask_is_restored_and_resethand(k):
    t = proc(k)
    k.sigaction(t, SIGUSR1, H, SA_RESETHAND | SA_NODEFER, sigmask(SIGUSR2))
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGHUP))
    k.kill(k.init, pid_of(k, t), SIGUSR1)
    k.deliver_signals(t)
    assert t.sigstate.blocked == sigmask(SIGHUP)
    assert k.sigaction(t, SIGUSR1).handler == SIG_DFL


def test_altstack_used_only_with_sa_onstack(k):
    t = proc(k)
    k.sigaltstack(t, (0x7000, 8192, 0))
    k.sigaction(t, SIGUSR1, H, SA_ONSTACK)
    k.sigaction(t, SIGUSR2, H)
    k.kill(k.init, pid_of(k, t), SIGUSR1)
    k.kill(k.init, pid_of(k, t), SIGUSR2)
    k.deliver_signals(t)
    assert [o[4] for o in handled_output(k)] == ["altstack", "stack"]
    k.sigaltstack(t, (0, 0, SS_DISABLE))
    k.kill(k.init, pid_of(k, t), SIGUSR1)
    k.deliver_signals(t)
    assert handled_output(k)[-1][4] == "stack"


def test_default_terminate_and_core(k):
    t = proc(k)
    k.kill(k.init, pid_of(k, t), SIGTERM)
    assert k.deliver_signals(t) == [("exit", SIGTERM)]
    assert t.state == "zombie" and t.exit_code == SIGTERM
    u = proc(k)
    th = thread(k, u)
    k.kill(k.init, pid_of(k, u), SIGSEGV)
    k.deliver_signals(th)
    assert u.state == "zombie" and u.exit_code == SIGSEGV | 0x80
    assert default_action(SIGABRT) == "core" and default_action(SIGPIPE) == "terminate"
    assert default_action(SIGRTMIN) == "terminate" and default_action(SIGCONT) == "ignore"


def test_stop_and_cont(k):
    parent = proc(k)
    k.sigaction(parent, SIGCHLD, H)
    t = proc(k, parent=parent)
    th = thread(k, t)
    k.kill(k.init, pid_of(k, t), SIGSTOP)
    assert k.deliver_signals(th) == [("stop", SIGSTOP)]
    assert t.state == th.state == "stopped"
    stopped = parent.signal.shared_pending.items[-1]
    assert (stopped.signo, stopped.code, stopped.value) == (SIGCHLD, 5, SIGSTOP)  # CLD_STOPPED
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGCONT))  # SIGCONT resumes even when blocked
    k.kill(k.init, pid_of(k, t), SIGCONT)
    assert t.state == th.state == "running"
    assert k.sigpending(t) == sigmask(SIGCONT)
    assert len(parent.signal.shared_pending) == 1  # CLD_CONTINUED coalesced with CLD_STOPPED


def test_sigcont_with_handler_resumes_and_runs_it(k):
    t = proc(k)
    k.sigaction(t, SIGCONT, H)
    k.kill(k.init, pid_of(k, t), SIGTSTP)
    k.deliver_signals(t)
    assert t.state == "stopped"
    k.kill(k.init, pid_of(k, t), SIGCONT)
    assert t.state == "running"
    assert k.deliver_signals(t) == [("handler", SIGCONT)]


def test_stop_and_cont_cancel_each_other(k):
    t = proc(k)
    k.sigaction(t, SIGCONT, H)
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGTSTP, SIGCONT))
    k.kill(k.init, pid_of(k, t), SIGTSTP)
    k.kill(k.init, pid_of(k, t), SIGCONT)
    assert k.sigpending(t) == sigmask(SIGCONT)
    k.kill(k.init, pid_of(k, t), SIGTSTP)
    assert k.sigpending(t) == sigmask(SIGTSTP)


def test_sigkill_wakes_a_stopped_task(k):
    t = proc(k)
    k.kill(k.init, pid_of(k, t), SIGSTOP)
    k.deliver_signals(t)
    k.kill(k.init, pid_of(k, t), SIGKILL)
    assert t.state == "running"
    assert k.deliver_signals(t) == [("exit", SIGKILL)] and t.exit_code == SIGKILL


def test_sa_nocldstop(k):
    parent = proc(k)
    k.sigaction(parent, SIGCHLD, H, SA_NOCLDSTOP)
    child = proc(k, parent=parent)
    k.kill(parent, pid_of(k, child), SIGSTOP)
    k.deliver_signals(child)
    assert child.state == "stopped" and len(parent.signal.shared_pending) == 0


def test_send_signal_internal(k):
    t = proc(k, cred=Cred.user(5))
    assert k.send_signal(t, SIGPIPE)
    assert t.signal.shared_pending.items == [SigInfo(SIGPIPE, 0x80)]
    assert not k.send_signal(t, SIGPIPE)  # coalesced
    k.deliver_signals(t)
    assert t.exit_code == SIGPIPE
    assert not k.send_signal(t, SIGUSR1)  # zombie: nothing to queue
    with pytest.raises(ModelError):
        k.send_signal(t, 0)


# -- altstack ----------------------------------------------------------------------------------
def test_sigaltstack(k):
    t = proc(k)
    assert k.sigaltstack(t) == AltStack(0, 0, SS_DISABLE)
    assert k.sigaltstack(t, (0x1000, MINSIGSTKSZ, SS_ONSTACK)) == AltStack(0, 0, SS_DISABLE)
    assert k.sigaltstack(t) == AltStack(0x1000, MINSIGSTKSZ, 0)
    assert err(k.sigaltstack, t, (0x1000, MINSIGSTKSZ - 1, 0)) == errno.ENOMEM
    assert err(k.sigaltstack, t, (0x1000, 4096, 8)) == errno.EINVAL
    k.sigaltstack(t, AltStack(0x2000, 4096, SS_AUTODISARM))
    assert t.sigstate.altstack == AltStack(0x2000, 4096, SS_AUTODISARM)
    k.sigaltstack(t, (5, 5, SS_DISABLE))
    assert t.sigstate.altstack == AltStack(0, 0, SS_DISABLE)


# -- fork / exec / rlimits ---------------------------------------------------------------------
def test_fork_copies():
    hand = SigHand()
    hand.set_action(SIGUSR1, SigAction(H, SA_RESTART))
    copy = hand.fork_copy()
    copy.set_action(SIGUSR1, SigAction())
    assert hand.action(SIGUSR1).handler == H and copy.refs == 1
    sig = SignalStruct()
    sig.rlimits[RLIMIT_NOFILE] = (10, 20)
    sig.shared_pending.add(SigInfo(SIGUSR1))
    child = sig.fork_copy()
    assert child.rlimits[RLIMIT_NOFILE] == (10, 20) and len(child.shared_pending) == 0
    ts = ThreadSignals(blocked=7, altstack=AltStack(1, 4096, 0))
    ts.pending.add(SigInfo(SIGINT))
    c = ts.fork_copy()
    assert (c.blocked, len(c.pending), c.altstack) == (7, 0, AltStack(1, 4096, 0))
    assert ts.fork_copy(shares_vm=True).altstack == AltStack()


def test_exec_reset():
    hand = SigHand()
    hand.set_action(SIGUSR1, SigAction(H, SA_RESTART, 5, 9))
    hand.set_action(SIGINT, SigAction(SIG_IGN, SA_RESTART))
    hand.reset_for_exec()
    assert hand.action(SIGUSR1) == SigAction()
    assert hand.action(SIGINT) == SigAction(SIG_IGN)
    ts = ThreadSignals(blocked=3, altstack=AltStack(1, 4096, 0))
    ts.reset_for_exec()
    assert ts.altstack == AltStack() and ts.blocked == 3


def test_rlimits(k):
    t = proc(k, cred=Cred.user(3))
    assert k.getrlimit(t, RLIMIT_STACK) == (8 << 20, RLIM_INFINITY)
    assert k.getrlimit(t, RLIMIT_NOFILE) == (1024, 4096)
    assert err(k.getrlimit, t, 16) == errno.EINVAL
    assert err(k.setrlimit, t, RLIMIT_NOFILE, 10, 5) == errno.EINVAL
    k.setrlimit(t, RLIMIT_NOFILE, 10, 100)
    assert err(k.setrlimit, t, RLIMIT_NOFILE, 10, 200) == errno.EPERM
    assert err(k.setrlimit, k.init, RLIMIT_NOFILE, 10, 1 << 30) == errno.EPERM


# -- property: pending sets against a reference model ------------------------------------------
SIGS = [SIGHUP, SIGINT, SIGUSR1, SIGUSR2, SIGCHLD, SIGRTMIN, SIGRTMIN + 1, 64]
IGNORED = {SIGCHLD}
op_strategy = st.one_of(
    st.tuples(st.just("kill"), st.sampled_from(SIGS)),
    st.tuples(st.just("tgkill"), st.sampled_from(SIGS)),
    st.tuples(st.just("sigqueue"), st.sampled_from(SIGS), st.integers(0, 1000)),
    st.tuples(st.just("mask"), st.sampled_from([SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK]),
              st.sets(st.sampled_from(SIGS))),
    st.tuples(st.just("deliver")),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op_strategy, max_size=40))
def test_pending_matches_reference_model(ops):
    k = MiniKernel()
    t = proc(k)
    for sig in SIGS:
        if sig not in IGNORED:
            k.sigaction(t, sig, H)
    tg = pid_of(k, t)
    blocked = 0
    queues = {"private": [], "shared": []}  # lists of (sig, value)

    def enqueue(queue, sig, value):
        if sig in IGNORED and not blocked & sigbit(sig):
            return
        if sig < 32 and any(s == sig for s, _ in queues[queue]):
            return
        queues[queue].append((sig, value))

    expected_output = []
    for op in ops:
        if op[0] == "kill":
            k.kill(t, tg, op[1])
            enqueue("shared", op[1], 0)
        elif op[0] == "tgkill":
            k.tgkill(t, tg, k.gettid(t), op[1])
            enqueue("private", op[1], 0)
        elif op[0] == "sigqueue":
            k.sigqueue(t, tg, op[1], op[2])
            enqueue("shared", op[1], op[2])
        elif op[0] == "mask":
            mask = sigmask(*op[2])
            k.sigprocmask(t, op[1], mask)
            blocked = {SIG_BLOCK: blocked | mask, SIG_UNBLOCK: blocked & ~mask,
                       SIG_SETMASK: mask}[op[1]]
        else:
            k.deliver_signals(t)
            while True:
                ready = [(q, s) for q in ("private", "shared") for s, _ in queues[q]
                         if not blocked & sigbit(s)]
                if not ready:
                    break
                queue = "private" if any(q == "private" for q, _ in ready) else "shared"
                sig = min(s for q, s in ready if q == queue)
                index = next(i for i, (s, _) in enumerate(queues[queue]) if s == sig)
                _, value = queues[queue].pop(index)
                if sig not in IGNORED:
                    expected_output.append(("signal", tg, sig, value, "stack"))
        all_pending = 0
        for q in queues.values():
            for s, _ in q:
                all_pending |= sigbit(s)
        assert k.sigpending(t) == all_pending & blocked
        assert [(i.signo, i.value) for i in t.sigstate.pending.items] == queues["private"]
        assert [(i.signo, i.value) for i in t.signal.shared_pending.items] == queues["shared"]
    assert handled_output(k) == expected_output


def test_namespace_init_ignores_signals_without_handler(k):
    assert not k.send_signal(k.init, SIGTERM)
    assert k.kill(k.init, 1, SIGKILL) == 0 and k.init.state == "running"
    assert len(k.init.signal.shared_pending) == 0
    k.sigprocmask(k.init, SIG_BLOCK, sigmask(SIGTERM))  # blocked: queued, dropped on delivery
    k.kill(k.init, 1, SIGTERM)
    k.sigprocmask(k.init, SIG_SETMASK, 0)
    assert k.deliver_signals(k.init) == [("ignore", SIGTERM)] and k.init.state == "running"
    k.sigaction(k.init, SIGUSR1, H)
    k.kill(k.init, 1, SIGUSR1)
    assert k.deliver_signals(k.init) == [("handler", SIGUSR1)]

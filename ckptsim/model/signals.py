"""Signals: handler tables, pending queues, masks, the alternate stack, and delivery.

Objects (as in Linux):
- ``SigHand`` (shared by CLONE_SIGHAND): the 64 sigactions;
- ``SignalStruct`` (one per thread group): the shared pending queue, rlimits, group state;
- ``ThreadSignals`` (``task.sigstate``, per thread): blocked mask, private queue, altstack.

Pending queues: a standard signal (1-31) is pending at most once (a second send while one is
pending is dropped, the first siginfo is kept); a real-time signal (32-64) queues every
instance with its own siginfo, in order.

Delivery (``deliver_signals``) is called by the scheduler before a task runs its next
operation. A handler is modelled as running atomically at that moment: its only effect is a
``("signal", tgid, sig, value, stack)`` tuple in ``kernel.output``. Assumption about blocked
syscalls: nothing is raised here; the scheduler re-runs the interrupted syscall after
delivery, i.e. every handler behaves as if SA_RESTART were set (an EINTR model would be the
scheduler's decision, using ``last_delivery_interrupts``).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, replace

from ..errors import kerr
from .creds import CAP_SYS_RESOURCE, may_kill
from .shared import Shared
from .signals_defs import *  # noqa: F401,F403 (numbers, flags, rlimits: re-exported from here)


# -- data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SigAction:
    handler: int = SIG_DFL       # SIG_DFL, SIG_IGN or a handler address
    flags: int = 0
    mask: int = 0
    restorer: int = 0


@dataclass(frozen=True)
class SigInfo:
    signo: int
    code: int = SI_USER
    pid: int = 0                 # the sender's pid as seen by the receiver (0: kernel)
    uid: int = 0
    value: int = 0               # sigqueue's sival_int/sival_ptr (0 for others)


@dataclass(frozen=True)
class AltStack:
    sp: int = 0
    size: int = 0
    flags: int = SS_DISABLE

    @property
    def enabled(self) -> bool:
        return not self.flags & SS_DISABLE and self.size > 0


class SigPending:
    """A pending queue: siginfos in arrival order; standard signals at most once each."""

    def __init__(self, items=()):
        self.items: list[SigInfo] = list(items)

    @property
    def mask(self) -> int:
        out = 0
        for info in self.items:
            out |= sigbit(info.signo)
        return out

    def has(self, sig: int) -> bool:
        return any(info.signo == sig for info in self.items)

    def add(self, info: SigInfo) -> bool:
        """Queue ``info``; False if a standard signal was already pending (coalesced)."""
        if not is_rt(info.signo) and self.has(info.signo):
            return False
        self.items.append(info)
        return True

    def take(self, sig: int) -> SigInfo:
        """Remove and return the oldest instance of ``sig``."""
        for i, info in enumerate(self.items):
            if info.signo == sig:
                return self.items.pop(i)
        raise KeyError(sig)

    def discard(self, mask: int) -> None:
        """Drop every instance of the signals in ``mask``."""
        self.items = [info for info in self.items if not sigbit(info.signo) & mask]

    def copy(self) -> SigPending:
        return SigPending(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __eq__(self, other) -> bool:
        return isinstance(other, SigPending) and self.items == other.items

    def __repr__(self) -> str:
        return f"SigPending({self.items})"


class SigHand(Shared):
    """The table of 64 sigactions (index ``sig - 1``)."""

    def __init__(self, actions=None):
        super().__init__()
        self.actions: list[SigAction] = list(actions) if actions else [SigAction()] * NSIG

    def action(self, sig: int) -> SigAction:
        return self.actions[sig - 1]

    def set_action(self, sig: int, act: SigAction) -> None:
        self.actions[sig - 1] = act

    def fork_copy(self) -> SigHand:
        return SigHand(self.actions)

    def reset_for_exec(self) -> None:
        """``flush_signal_handlers``: handlers become SIG_DFL, SIG_IGN stays; flags cleared."""
        self.actions = [SigAction(SIG_IGN if a.handler == SIG_IGN else SIG_DFL)
                        for a in self.actions]


class SignalStruct(Shared):
    """Thread-group-wide signal state."""

    def __init__(self, rlimits=DEFAULT_RLIMITS):
        super().__init__()
        self.shared_pending = SigPending()
        self.rlimits: list[tuple[int, int]] = list(rlimits)
        self.group_exit = False           # set once the group is dying (fatal signal/exit_group)
        self.group_exit_code = 0
        self.group_stopped = False        # stopped by a stop signal (until SIGCONT/SIGKILL)

    def fork_copy(self) -> SignalStruct:
        return SignalStruct(self.rlimits)


class ThreadSignals:
    """Per-thread signal state: ``task.sigstate``."""

    def __init__(self, blocked: int = 0, pending: SigPending | None = None,
                 altstack: AltStack = AltStack()):
        self.blocked = blocked
        self.pending = pending if pending is not None else SigPending()
        self.altstack = altstack

    def fork_copy(self, shares_vm: bool = False) -> ThreadSignals:
        """The child's state: same mask, nothing pending; the altstack is kept unless the
        child shares the parent's memory (a thread), where it would clobber the parent's."""
        return ThreadSignals(self.blocked, None, AltStack() if shares_vm else self.altstack)

    def reset_for_exec(self) -> None:
        """execve clears the alternate stack (mask and pending signals survive exec)."""
        self.altstack = AltStack()


# -- syscalls and delivery ----------------------------------------------------------------
def _live_threads(t) -> list:
    return [th for th in t.leader.threads if th.state in ("running", "stopped")]


def _unkillable(t) -> bool:
    """SIGNAL_UNKILLABLE: a pid namespace's init ignores signals it has no handler for."""
    return t.ns.reaper is t.leader


def _signal_struct(t) -> SignalStruct | None:
    return t.signal if t.signal is not None else t.leader.signal


class SignalOps:
    """Mixin of Kernel: the signal syscalls, ``send_signal`` and ``deliver_signals``."""

    # -- handlers and masks -----------------------------------------------------------------
    def sigaction(self, t, sig: int, handler: int | None = None, flags: int = 0, mask: int = 0,
                  restorer: int = 0) -> SigAction:
        """Install a handler (``handler=None`` only queries); returns the old action."""
        if not valid_signal(sig):
            raise kerr(errno.EINVAL, f"no signal {sig}")
        old = t.sighand.action(sig)
        if handler is None:
            return old
        if sigbit(sig) & UNBLOCKABLE:
            raise kerr(errno.EINVAL, f"{SIGNAL_NAMES[sig]} cannot be caught or ignored")
        if not 0 <= handler < 1 << 64:
            raise kerr(errno.EFAULT, f"handler {handler:#x}")
        new = SigAction(handler, flags & 0xFFFFFFFF, mask & FULL_MASK & ~UNBLOCKABLE, restorer)
        t.sighand.set_action(sig, new)
        if self._handler_ignores(new, sig):
            # POSIX: making a pending signal ignored discards it, even while blocked.
            self._discard_everywhere(t, sigbit(sig))
        return old

    def sigprocmask(self, t, how: int, mask: int | None = None) -> int:
        """Change the blocked mask (``mask=None`` only queries); returns the old one."""
        st: ThreadSignals = t.sigstate
        old = st.blocked
        if mask is None:
            return old
        mask &= FULL_MASK
        if how == SIG_BLOCK:
            new = old | mask
        elif how == SIG_UNBLOCK:
            new = old & ~mask
        elif how == SIG_SETMASK:
            new = mask
        else:
            raise kerr(errno.EINVAL, f"sigprocmask how={how}")
        st.blocked = new & ~UNBLOCKABLE
        return old

    def sigpending(self, t) -> int:
        """Signals pending for the thread or its group and blocked by the thread."""
        pending = t.sigstate.pending.mask | _signal_struct(t).shared_pending.mask
        return pending & t.sigstate.blocked

    def sigaltstack(self, t, ss=None) -> AltStack:
        """Set the alternate stack (``ss``: AltStack or (sp, size, flags)); returns the old one.

        Handlers run atomically here, so a task is never on its altstack while calling this
        and the Linux EPERM ("changing the stack while running on it") cannot happen.
        """
        st: ThreadSignals = t.sigstate
        old = st.altstack
        if ss is None:
            return old
        sp, size, flags = (ss.sp, ss.size, ss.flags) if isinstance(ss, AltStack) else ss
        mode = flags & ~SS_AUTODISARM
        if mode not in (0, SS_ONSTACK, SS_DISABLE):
            raise kerr(errno.EINVAL, f"ss_flags {flags:#x}")
        if mode == SS_DISABLE:
            st.altstack = AltStack(0, 0, SS_DISABLE | (flags & SS_AUTODISARM))
        else:
            if size < MINSIGSTKSZ:
                raise kerr(errno.ENOMEM, f"ss_size {size} < MINSIGSTKSZ")
            # SS_ONSTACK on input means "enable", like 0 (what sigaltstack reports back).
            st.altstack = AltStack(sp, size, flags & SS_AUTODISARM)
        return old

    # -- rlimits ------------------------------------------------------------------------------
    def getrlimit(self, t, resource: int) -> tuple[int, int]:
        if not 0 <= resource < RLIM_NLIMITS:
            raise kerr(errno.EINVAL, f"no rlimit {resource}")
        return _signal_struct(t).rlimits[resource]

    def setrlimit(self, t, resource: int, cur: int, maximum: int) -> int:
        if not 0 <= resource < RLIM_NLIMITS:
            raise kerr(errno.EINVAL, f"no rlimit {resource}")
        if not 0 <= cur <= maximum <= RLIM_INFINITY:
            raise kerr(errno.EINVAL, f"rlimit cur {cur} > max {maximum}")
        limits = _signal_struct(t).rlimits
        if maximum > limits[resource][1] and not t.cred.has_cap(CAP_SYS_RESOURCE):
            raise kerr(errno.EPERM, "raising a hard limit needs CAP_SYS_RESOURCE")
        if resource == RLIMIT_NOFILE and maximum > NR_OPEN:
            raise kerr(errno.EPERM, f"RLIMIT_NOFILE above nr_open {NR_OPEN}")
        limits[resource] = (cur, maximum)
        return 0

    # -- sending ------------------------------------------------------------------------------
    def kill(self, t, pid: int, sig: int) -> int:
        """kill(2): pid>0 a process, 0 the caller's group, -1 everyone allowed, <-1 a group."""
        if not 0 <= sig <= NSIG:
            raise kerr(errno.EINVAL, f"no signal {sig}")
        if pid > 0:
            self._kill_process(t, self.find_task(t, pid), sig, SI_USER)
            return 0
        if pid == 0:
            return self._kill_pgrp(t, t.leader.pgrp, sig)
        if pid == -1:
            return self._kill_all(t, sig)
        pgrp = t.ns.pids.get(-pid)
        if pgrp is None:
            raise kerr(errno.ESRCH, f"no process group {-pid}")
        return self._kill_pgrp(t, pgrp, sig)

    def tgkill(self, t, tgid: int, tid: int, sig: int) -> int:
        """Send ``sig`` to one thread (its private queue)."""
        if tgid <= 0 or tid <= 0 or not 0 <= sig <= NSIG:
            raise kerr(errno.EINVAL, f"tgkill({tgid}, {tid}, {sig})")
        target = self.find_task(t, tid)
        if target.leader.pid.nr_in(t.ns) != tgid:
            raise kerr(errno.ESRCH, f"thread {tid} is not in thread group {tgid}")
        self._check_kill(t, target, sig)
        if sig and target.state in ("running", "stopped"):
            self.send_signal(target, sig, self._user_info(t, target, sig, SI_TKILL), group=False,
                             force=t.leader.pid.nr_in(target.ns) == 0)
        return 0

    def sigqueue(self, t, pid: int, sig: int, value: int) -> int:
        """sigqueue(3)/rt_sigqueueinfo: send with a value; EAGAIN past RLIMIT_SIGPENDING."""
        if not 0 <= sig <= NSIG:
            raise kerr(errno.EINVAL, f"no signal {sig}")
        if pid <= 0:
            raise kerr(errno.ESRCH, f"sigqueue to pid {pid}")
        # sival is a 64-bit union (int or pointer): keep the value as the u64 it is.
        self._kill_process(t, self.find_task(t, pid), sig, SI_QUEUE, value & (1 << 64) - 1)
        return 0

    def send_signal(self, target, sig: int, info: SigInfo | None = None, group: bool = True,
                    limited: bool = False, force: bool = False) -> bool:
        """Queue ``sig`` for ``target``'s thread group (or the thread itself if not ``group``).

        The kernel-internal entry (SIGCHLD, SIGPIPE...): no permission check. Applies the
        send-time rules of ``prepare_signal``: stop signals cancel a pending SIGCONT, SIGCONT
        cancels pending stops and resumes a stopped group, SIGKILL wakes it, ignored signals
        are dropped, and so is any signal a namespace init has no handler for unless
        ``force`` (SIGKILL/SIGSTOP from an ancestor namespace). Returns whether a new instance
        was queued. With ``limited``, an rt signal past RLIMIT_SIGPENDING fails with EAGAIN
        (sigqueue); other senders override the limit.
        """
        if not valid_signal(sig):
            raise kerr(errno.EINVAL, f"no signal {sig}")
        info = info or SigInfo(sig, SI_KERNEL)
        threads = _live_threads(target)
        if not threads or (not group and target not in threads):
            return False
        signal = _signal_struct(target)
        if signal is None or signal.group_exit:
            return False
        receiver = target if target in threads else threads[0]
        bit = sigbit(sig)
        if bit & STOP_SIGNALS:
            self._discard_everywhere(receiver, sigbit(SIGCONT))
        elif sig == SIGCONT:
            self._discard_everywhere(receiver, STOP_SIGNALS)
            if signal.group_stopped:
                self._resume_group(receiver, notify=True)
        elif sig == SIGKILL and signal.group_stopped:
            self._resume_group(receiver, notify=False)
        if self._ignored(receiver, sig, force):
            return False
        if limited and is_rt(sig):
            limit = signal.rlimits[RLIMIT_SIGPENDING][0]
            if self._queued_count(receiver) >= limit:
                raise kerr(errno.EAGAIN, f"RLIMIT_SIGPENDING ({limit}) reached")
        pending = signal.shared_pending if group else receiver.sigstate.pending
        return pending.add(info)

    # -- delivery -----------------------------------------------------------------------------
    def has_deliverable_signal(self, t) -> bool:
        """Whether ``deliver_signals(t)`` would act (the scheduler's wake-up test)."""
        return self._next_signal(t) is not None

    def deliver_signals(self, t) -> list[tuple[str, int]]:
        """Deliver every deliverable signal of ``t`` now; returns what happened, in order:
        ("ignore"|"handler"|"stop"|"exit", sig). Stops at a stop or a fatal signal."""
        done: list[tuple[str, int]] = []
        while t.state == "running" and not _signal_struct(t).group_exit:
            picked = self._next_signal(t)
            if picked is None:
                break
            sig, pending = picked
            info = pending.take(sig)
            act = t.sighand.action(sig)
            if act.handler == SIG_IGN:
                done.append(("ignore", sig))
                continue
            if act.handler != SIG_DFL:
                self._run_handler(t, sig, info, act)
                done.append(("handler", sig))
                continue
            action = default_action(sig)
            if action == "ignore" or (_unkillable(t) and not sigbit(sig) & UNBLOCKABLE):
                done.append(("ignore", sig))
            elif action == "stop":
                self._stop_group(t, sig)
                done.append(("stop", sig))
                break
            else:
                self._die_by_signal(t, sig | (0x80 if action == "core" else 0))
                done.append(("exit", sig))
                break
        return done

    # -- internals ----------------------------------------------------------------------------
    def _next_signal(self, t):
        """The lowest unblocked pending signal, private queue first: (sig, queue) or None."""
        if t.sigstate is None:
            return None
        deliverable = ~t.sigstate.blocked | UNBLOCKABLE
        for pending in (t.sigstate.pending, _signal_struct(t).shared_pending):
            ready = pending.mask & deliverable
            if ready:
                return (ready & -ready).bit_length(), pending
        return None

    def _run_handler(self, t, sig: int, info: SigInfo, act: SigAction) -> None:
        """The handler runs atomically: block sa_mask (+sig), show its effect, sigreturn."""
        st: ThreadSignals = t.sigstate
        saved = st.blocked
        during = act.mask | (0 if act.flags & SA_NODEFER else sigbit(sig))
        st.blocked = (saved | during) & ~UNBLOCKABLE
        stack = "altstack" if act.flags & SA_ONSTACK and st.altstack.enabled else "stack"
        observed = getattr(self, "observed_pid", None)
        tgid = observed(t) if observed is not None else t.tid
        self.output.append(("signal", tgid, sig, info.value, stack))
        if act.flags & SA_RESETHAND:
            t.sighand.set_action(sig, replace(act, handler=SIG_DFL))
        st.blocked = saved

    def _stop_group(self, t, sig: int) -> None:
        signal = _signal_struct(t)
        signal.group_stopped = True
        for thread in _live_threads(t):
            thread.state = "stopped"
        self._notify_parent(t, CLD_STOPPED, sig)

    def _resume_group(self, t, notify: bool) -> None:
        _signal_struct(t).group_stopped = False
        for thread in _live_threads(t):
            if thread.state == "stopped":
                thread.state = "running"
        if notify:
            self._notify_parent(t, CLD_CONTINUED, SIGCONT)

    def _notify_parent(self, t, code: int, status: int) -> None:
        """SIGCHLD with CLD_STOPPED/CLD_CONTINUED, unless the parent set SA_NOCLDSTOP.
        (The child's status goes in ``SigInfo.value``.)"""
        parent = t.leader.parent
        if parent is None or parent.leader.sighand is None:
            return
        if parent.leader.sighand.action(SIGCHLD).flags & SA_NOCLDSTOP:
            return
        info = SigInfo(SIGCHLD, code, t.leader.pid.nr_in(parent.ns), t.cred.uid, status)
        self.send_signal(parent, SIGCHLD, info)

    def _die_by_signal(self, t, wait_status: int) -> None:
        signal = _signal_struct(t)
        signal.group_exit = True
        signal.group_exit_code = wait_status
        group_exit = getattr(self, "do_group_exit", None)
        if group_exit is not None:
            group_exit(t, wait_status)       # TaskOps: takes a wait status
        else:
            self.exit_group(t, wait_status)

    @staticmethod
    def _handler_ignores(act: SigAction, sig: int) -> bool:
        return act.handler == SIG_IGN or (act.handler == SIG_DFL and default_action(sig) == "ignore")

    def _ignored(self, t, sig: int, force: bool = False) -> bool:
        """``sig_ignored``: dropped at send time unless the receiving thread blocks it."""
        if t.sigstate.blocked & sigbit(sig):
            return False
        act = t.sighand.action(sig)
        if act.handler == SIG_DFL and _unkillable(t):
            return not (force and sigbit(sig) & UNBLOCKABLE)
        return self._handler_ignores(act, sig)

    def _discard_everywhere(self, t, mask: int) -> None:
        _signal_struct(t).shared_pending.discard(mask)
        for thread in _live_threads(t):
            thread.sigstate.pending.discard(mask)

    def _queued_count(self, t) -> int:
        return len(_signal_struct(t).shared_pending) + sum(
            len(th.sigstate.pending) for th in _live_threads(t))

    def _user_info(self, sender, target, sig: int, code: int, value: int = 0) -> SigInfo:
        return SigInfo(sig, code, sender.leader.pid.nr_in(target.ns), sender.cred.uid, value)

    def _check_kill(self, sender, target, sig: int) -> None:
        """``check_kill_permission``: same group, kill_ok_by_cred, or SIGCONT in the session."""
        if sender.leader is target.leader or may_kill(sender.cred, target.cred):
            return
        if sig == SIGCONT and sender.leader.session is target.leader.session:
            return
        raise kerr(errno.EPERM, f"task {sender.tid} may not signal task {target.tid}")

    def _kill_process(self, t, target, sig: int, code: int, value: int = 0) -> None:
        """Signal ``target``'s thread group from user space (zombies accept and drop it)."""
        self._check_kill(t, target, sig)
        if sig:
            info = self._user_info(t, target, sig, code, value)
            from_ancestor = t.leader.pid.nr_in(target.ns) == 0
            self.send_signal(target, sig, info, group=True, limited=code == SI_QUEUE,
                             force=from_ancestor)

    def _kill_pgrp(self, t, pgrp, sig: int) -> int:
        """``__kill_pgrp_info``: success if any member was signalled, else the last error."""
        members = [p for p in self.live_tasks() if p.is_leader() and p.pgrp is pgrp]
        if pgrp is None or not members:
            raise kerr(errno.ESRCH, "no such process group")
        success, last_error = False, None
        for member in members:
            try:
                self._kill_process(t, member, sig, SI_USER)
                success = True
            except OSError as e:
                last_error = e
        if not success:
            raise last_error
        return 0

    def _kill_all(self, t, sig: int) -> int:
        """kill(-1): every visible process but the namespace's init and the caller's group.
        Like Linux, EPERM from every target still returns 0; no target at all is ESRCH."""
        count, error = 0, None
        for p in self.live_tasks():
            if not p.is_leader() or p.pid.nr_in(t.ns) <= 1 or p is t.leader:
                continue
            count += 1
            try:
                self._kill_process(t, p, sig, SI_USER)
                error = None
            except OSError as e:
                if e.errno != errno.EPERM:
                    error = e
        if not count:
            raise kerr(errno.ESRCH, "no process to signal")
        if error is not None:
            raise error
        return 0

"""Conformance scenarios: signals.

What a program can see of its signal state from the inside: sigprocmask's and sigpending's
results, wait statuses, and the effect of a disposition on the task itself. sigaction and
sigaltstack return objects that a program cannot keep (non-int results are dropped), and the
model's handler run only appends to ``kernel.output``, so handlers are checked by their
consequence: a child whose handler survived the restart lives through ``kill(self, sig)``, one
whose handler was lost dies of the default action, and its parent sees that in the wait
status. The container init is immune to default actions (SIGNAL_UNKILLABLE), so the
dispositions under test live in children.
"""
import errno

from ..dsl import *  # noqa: F401,F403
from ..scenario import scenario  # noqa: F401

U64 = (1 << 64) - 1
SIGUSR1, SIGUSR2, SIGTERM, SIGCHLD = 10, 12, 15, 17
SIGRT = 40                      # a real-time signal (SIGRTMIN+6 for glibc)
SIG_DFL, SIG_IGN = 0, 1
HANDLER = 0x401000              # a handler address (the model runs handlers atomically)
SA_SIGINFO, SA_RESTART, SA_RESETHAND = 0x4, 0x10000000, 0x80000000
SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK = 0, 1, 2
RLIMIT_SIGPENDING = 11
CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000   # VM FS FILES SIGHAND THREAD


def bit(*sigs: int) -> int:
    out = 0
    for sig in sigs:
        out |= 1 << (sig - 1)
    return out


def err(code: int) -> int:
    return -code & U64


def _mask_is(p, want: int, label: str) -> None:
    """sigprocmask(SIG_BLOCK, 0) changes nothing and returns the blocked mask."""
    p.check(p.sigprocmask(SIG_BLOCK, 0), "==", want, label)


def _wait_killed(p, child, sig: int, label: str) -> None:
    """Reap ``child`` and check that it was killed by ``sig`` (wait status = the signal)."""
    got = p.wait4(child)
    p.check(got, "==", child, f"{label}: reaped pid")
    p.check(Reg(STATUS_REG), "==", sig, label)


def _kill_self(p, sig: int) -> None:
    me = p.getpid()
    p.check(p.kill(me, sig), "==", 0, f"kill(self, {sig})")


@scenario("signals", "handlers installed before the point still catch their signals")
def sig_handlers_kept(p):
    child = p.fork()
    with p.child(child):
        for sig, flags in ((SIGUSR1, SA_RESTART), (SIGUSR2, SA_SIGINFO), (SIGTERM, 0),
                           (SIGRT, SA_SIGINFO | SA_RESTART)):
            p.do("sigaction", sig, HANDLER, flags, bit(SIGUSR2))
        p.ckpt()
        for sig in (SIGUSR1, SIGUSR2, SIGTERM, SIGRT):
            _kill_self(p, sig)        # a lost handler means death by the default action
    p.ckpt()
    p.wait_child(child, 0, "the child survived its four signals (handlers kept)")


@scenario("signals", "SIG_IGN survives: a child ignores SIGTERM and SIGUSR1 sent after restart")
def sig_ignored_kept(p):
    child = p.fork()
    with p.child(child):
        p.do("sigaction", SIGTERM, SIG_IGN)
        p.do("sigaction", SIGUSR1, SIG_IGN)
        p.ckpt()
        _kill_self(p, SIGTERM)
        _kill_self(p, SIGUSR1)
        p.do("sigprocmask", SIG_BLOCK, bit(SIGUSR1))
        p.check(p.sigpending(), "==", 0, "an ignored signal is dropped when sent, not queued")
    p.ckpt()
    p.wait_child(child, 0, "the child ignored both signals")


@scenario("signals", "SIG_IGN for SIGCHLD in the init survives: children are reaped automatically")
def sig_sigchld_ignored_autoreap(p):
    p.do("sigaction", SIGCHLD, SIG_IGN)
    p.ckpt()
    child = p.fork()
    with p.child(child):
        pass
    got = p.wait4(child)
    p.check(got, "==", err(errno.ECHILD), "the child was reaped by the kernel (SIGCHLD ignored)")


@scenario("signals", "after restart, one child dies of SIGTERM's default action; its sibling "
                     "keeps the handler inherited from the parent")
def sig_default_kills_child(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    r, w = p.pipe()
    p.do("sigaction", SIGTERM, HANDLER, SA_RESTART, 0)   # both children inherit it
    dies = p.fork()
    with p.child(dies):
        p.do("sigaction", SIGTERM, SIG_DFL)
        p.ckpt()
        p.read(r, buf, 1)               # blocks until killed
        p.check(0, "==", 1, "the SIG_DFL child survived SIGTERM")
    lives = p.fork()
    with p.child(lives):
        p.ckpt()
        p.read_check(r, buf, "g", "the handler child reads on after SIGTERM")
    p.ckpt()
    p.check(p.kill(dies, SIGTERM), "==", 0, "kill the SIG_DFL child")
    _wait_killed(p, dies, SIGTERM, "the SIG_DFL child was killed by SIGTERM")
    p.check(p.kill(lives, SIGTERM), "==", 0, "signal the handler child")
    p.write_text(w, buf, "g")
    p.wait_child(lives, 0, "the handler child survived SIGTERM")


@scenario("signals", "blocked masks of the init and of a child differ and are kept")
def sig_blocked_masks(p):
    parent_mask = bit(SIGUSR1, SIGUSR2, SIGRT)
    child_mask = bit(SIGUSR1, SIGTERM, SIGRT)
    p.do("sigprocmask", SIG_SETMASK, parent_mask)
    child = p.fork()
    with p.child(child):
        _mask_is(p, parent_mask, "the child inherited the mask")
        p.do("sigprocmask", SIG_UNBLOCK, bit(SIGUSR2))
        p.do("sigprocmask", SIG_BLOCK, bit(SIGTERM))
        p.ckpt()
        _mask_is(p, child_mask, "the child's mask after restart")
        old = p.sigprocmask(SIG_SETMASK, 0)
        p.check(old, "==", child_mask, "SIG_SETMASK returns the restored mask")
        _mask_is(p, 0, "the mask can be cleared")
    p.ckpt()
    _mask_is(p, parent_mask, "the init's mask after restart")
    p.wait_child(child)


@scenario("signals", "pending standard signals of the init (blocked, sent to itself) are kept")
def sig_pending_standard(p):
    p.do("sigprocmask", SIG_BLOCK, bit(SIGUSR1, SIGTERM, SIGUSR2))
    _kill_self(p, SIGUSR1)
    _kill_self(p, SIGTERM)
    p.do("sigaction", SIGUSR1, HANDLER, 0, 0)
    p.ckpt()
    p.check(p.sigpending(), "==", bit(SIGUSR1, SIGTERM), "sigpending after restart")
    p.do("sigprocmask", SIG_UNBLOCK, bit(SIGUSR1))   # the handler runs
    p.check(p.sigpending(), "==", bit(SIGTERM), "SIGUSR1 was delivered on unblock")
    p.do("sigprocmask", SIG_BLOCK, bit(SIGUSR1))
    p.check(p.sigpending(), "==", bit(SIGTERM), "and is not pending again")


@scenario("signals", "a pending signal with a handler is delivered when a child unblocks it")
def sig_pending_handler_child(p):
    child = p.fork()
    with p.child(child):
        p.do("sigaction", SIGUSR1, HANDLER, SA_RESTART, 0)
        p.do("sigprocmask", SIG_BLOCK, bit(SIGUSR1))
        _kill_self(p, SIGUSR1)
        p.ckpt()
        p.check(p.sigpending(), "==", bit(SIGUSR1), "SIGUSR1 pending after restart")
        p.do("sigprocmask", SIG_UNBLOCK, bit(SIGUSR1))   # handler, or death if it was lost
        p.do("sigprocmask", SIG_BLOCK, bit(SIGUSR1))
        p.check(p.sigpending(), "==", 0, "SIGUSR1 was consumed by its handler")
    p.ckpt()
    p.wait_child(child, 0, "the child's handler caught the pending SIGUSR1")


@scenario("signals", "a pending SIGTERM with the default action kills the child on unblock")
def sig_pending_default_fatal(p):
    child = p.fork()
    with p.child(child):
        p.do("sigprocmask", SIG_BLOCK, bit(SIGTERM))
        _kill_self(p, SIGTERM)
        p.ckpt()
        p.check(p.sigpending(), "==", bit(SIGTERM), "SIGTERM pending after restart")
        p.do("sigprocmask", SIG_UNBLOCK, bit(SIGTERM))
        p.check(0, "==", 1, "the child outlived its pending SIGTERM")
    p.ckpt()
    _wait_killed(p, child, SIGTERM, "the pending SIGTERM killed the child")


@scenario("signals", "a standard signal sent twice while blocked is pending once")
def sig_pending_standard_coalesced(p):
    child = p.fork()
    with p.child(child):
        # SA_RESETHAND: the first delivery runs the handler, a second would kill the child
        p.do("sigaction", SIGUSR2, HANDLER, SA_RESETHAND, 0)
        p.do("sigprocmask", SIG_BLOCK, bit(SIGUSR2))
        _kill_self(p, SIGUSR2)
        _kill_self(p, SIGUSR2)
        p.ckpt()
        p.check(p.sigpending(), "==", bit(SIGUSR2), "SIGUSR2 pending after restart")
        p.do("sigprocmask", SIG_UNBLOCK, bit(SIGUSR2))
    p.ckpt()
    p.wait_child(child, 0, "one SIGUSR2 was delivered, not two")


@scenario("signals", "two instances of a real-time signal queued with values are both kept")
def sig_pending_rt_queued(p):
    child = p.fork()
    with p.child(child):
        # SA_RESETHAND: the first instance runs the handler, the second kills the child;
        # a restart that kept only one instance lets the child live.
        p.do("sigaction", SIGRT, HANDLER, SA_SIGINFO | SA_RESETHAND, 0)
        p.do("sigprocmask", SIG_BLOCK, bit(SIGRT))
        me = p.getpid()
        p.check(p.sigqueue(me, SIGRT, 111), "==", 0, "sigqueue 111")
        p.check(p.sigqueue(me, SIGRT, 222), "==", 0, "sigqueue 222")
        p.ckpt()
        p.check(p.sigpending(), "==", bit(SIGRT), "the rt signal is pending after restart")
        p.do("sigprocmask", SIG_UNBLOCK, bit(SIGRT))
        p.check(0, "==", 1, "the child outlived the second instance")
    p.ckpt()
    _wait_killed(p, child, SIGRT, "the second queued instance killed the child")


@scenario("signals", "RLIMIT_SIGPENDING and the queued count survive: one more sigqueue is EAGAIN")
def sig_rt_queue_limit(p):
    p.do("setrlimit", RLIMIT_SIGPENDING, 3, 3)
    p.do("sigprocmask", SIG_BLOCK, bit(SIGRT, SIGRT + 1))
    me = p.getpid()
    p.check(p.sigqueue(me, SIGRT, 1), "==", 0, "sigqueue 1")
    p.check(p.sigqueue(me, SIGRT + 1, 2), "==", 0, "sigqueue 2")
    p.check(p.sigqueue(me, SIGRT, 3), "==", 0, "sigqueue 3")
    p.ckpt()
    p.check(p.sigpending(), "==", bit(SIGRT, SIGRT + 1), "both rt signals pending")
    me2 = p.getpid()
    p.check(p.sigqueue(me2, SIGRT, 4), "==", err(errno.EAGAIN),
            "three queued signals fill RLIMIT_SIGPENDING=3")
    p.do("sigaction", SIGRT, HANDLER, 0, 0)
    p.do("sigaction", SIGRT + 1, HANDLER, 0, 0)
    p.do("sigprocmask", SIG_UNBLOCK, bit(SIGRT, SIGRT + 1))
    p.check(p.sigqueue(me2, SIGRT, 5), "==", 0, "room again once they are delivered")


@scenario("signals", "a signal sent right after restart to a child blocked in read")
def sig_sent_after_restart(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    r, w = p.pipe()
    child = p.fork()
    with p.child(child):
        p.do("close", w)
        p.do("sigaction", SIGUSR1, HANDLER, SA_RESTART, 0)
        p.ckpt()
        p.read_check(r, buf, "go", "the read goes on after the handler")
    p.do("close", r)
    p.ckpt()
    p.check(p.kill(child, SIGUSR1), "==", 0, "signal the child")
    p.write_text(w, buf, "go")
    p.wait_child(child, 0, "the child caught SIGUSR1 sent after restart")


@scenario("signals", "SA_RESETHAND survives: the handler runs once, the second signal kills")
def sig_resethand(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    r, w = p.pipe()
    child = p.fork()
    with p.child(child):
        p.do("close", r)
        p.do("sigaction", SIGUSR2, HANDLER, SA_RESETHAND | SA_RESTART, 0)
        p.ckpt()
        _kill_self(p, SIGUSR2)            # runs the handler and resets it to SIG_DFL
        p.write_text(w, buf, "1")         # proof that the child lived through the first one
        _kill_self(p, SIGUSR2)            # the default action: death
        p.write_text(w, buf, "2")
    p.do("close", w)
    p.ckpt()
    p.store(buf, "..")
    got = p.read(r, buf, 2)
    p.check(got, "==", 1, "one byte: the child survived exactly the first SIGUSR2")
    p.check_mem(buf, "1.", "the byte the child wrote between its two signals")
    _wait_killed(p, child, SIGUSR2, "the second SIGUSR2 killed the child")


@scenario("signals", "a thread's private pending signal and the group's shared one stay apart")
def sig_thread_pending(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    r, w = p.pipe()
    p.do("sigprocmask", SIG_BLOCK, bit(SIGUSR1, SIGUSR2))
    tid = p.call("fork", CLONE_THREAD_FLAGS)
    main = p.label()
    p.jnz(tid, main)
    # the thread
    p.ckpt()
    p.check(p.sigpending(), "==", bit(SIGUSR1, SIGUSR2),
            "the thread sees its own SIGUSR1 and the group's SIGUSR2")
    _mask_is(p, bit(SIGUSR1, SIGUSR2), "the thread's mask")
    p.write_text(w, buf, "t")
    p.do("exit", 0)                      # the thread alone
    p.place(main)
    me = p.getpid()
    p.check(p.tgkill(me, tid, SIGUSR1), "==", 0, "tgkill the thread")
    p.check(p.kill(me, SIGUSR2), "==", 0, "kill the process")
    p.ckpt()
    p.check(p.sigpending(), "==", bit(SIGUSR2),
            "the main thread sees only the process-wide SIGUSR2")
    p.read_check(r, buf, "t", "the thread did its checks")


@scenario("signals", "SIGCHLD of a child that exited before the point is pending; the zombie "
                     "is reaped after restart")
def sig_sigchld_pending(p):
    p.do("sigprocmask", SIG_BLOCK, bit(SIGCHLD))
    child = p.fork()
    with p.child(child):
        p.exit(3)
    p.ckpt()
    p.check(p.sigpending(), "==", bit(SIGCHLD), "SIGCHLD pending after restart")
    p.wait_child(child, 3, "the zombie's exit status")


SA_ONSTACK = 0x08000000
ALTSTACK_SP, ALTSTACK_SIZE = 0x30000000, 4 * PAGE


@scenario("signals", "a sigaltstack and an SA_ONSTACK handler survive: the altstack is compared "
                     "by the runner's visible state, the handler keeps the child alive")
def sig_altstack(p):
    child = p.fork()
    with p.child(child):
        stack = p.mmap(ALTSTACK_SP, ALTSTACK_SIZE, PROT_RW, MAP_PRIVATE_ANON | MAP_FIXED)
        p.check(stack, "==", ALTSTACK_SP, "the alternate stack is mapped where asked")
        p.do("sigaltstack", [ALTSTACK_SP, ALTSTACK_SIZE, 0])
        p.do("sigaction", SIGUSR1, HANDLER, SA_ONSTACK, 0)
        p.ckpt()
        _kill_self(p, SIGUSR1)  # a lost handler means death by the default action
        bad = p.call("sigaltstack", [ALTSTACK_SP, 1024, 0])
        p.check(bad, "==", (-12) & (2**64 - 1), "a too-small altstack is still refused (ENOMEM)")
    p.ckpt()
    p.wait_child(child, 0, "the child survived SIGUSR1 on its alternate stack")

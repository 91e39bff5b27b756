"""Signal state: SIGHAND (handler table), SIGNAL (+ shared SIGPENDING), and per task
SIGNAL_TASK (blocked) + SIGPENDING (private queue) + SIGALTSTACK.

Pending queues are saved item by item in queue order, so restart rebuilds them exactly: the
same order, every queued real-time instance with its value, and one siginfo per pending
standard signal (a duplicate standard signal in an image is refused: it cannot exist).
"""
from __future__ import annotations

from ..image.schema import ENUMS, layout
from ..image.types import ObjType
from ..model.signals import (
    NSIG, RLIM_NLIMITS, SA_FLAG_NAMES, SIGNAL_NAMES, SS_AUTODISARM, SS_DISABLE, UNBLOCKABLE,
    AltStack, SigAction, SigHand, SigInfo, SignalStruct, SigPending, ThreadSignals, sigbit)
from .registry import Kind, register

ENUMS["signal"] = dict(SIGNAL_NAMES)
ENUMS["sigset"] = {sigbit(sig): name for sig, name in SIGNAL_NAMES.items()}
ENUMS["sa_flags"] = dict(SA_FLAG_NAMES)
ENUMS["ss_flags"] = {1: "SS_ONSTACK", SS_DISABLE: "SS_DISABLE", SS_AUTODISARM: "SS_AUTODISARM"}
ENUMS["signal_flags"] = {1: "GROUP_STOPPED", 2: "GROUP_EXIT"}

SIGNAL_GROUP_STOPPED = 0x1
SIGNAL_GROUP_EXIT = 0x2

SIGHAND = layout(601, "SIGHAND", [("nsig", "u32"), ("pad", "u32")], var=[
    ("handler", "u64", "hex"), ("flags", "u64", "flags:sa_flags"), ("restorer", "u64", "hex"),
    ("mask", "u64", "flags:sigset"),
], max_var=NSIG * 32, subsystem="signal")
SIGNAL = layout(602, "SIGNAL", [
    ("flags", "u32", "flags:signal_flags"), ("group_exit_code", "u32", "hex"),
    ("nlimits", "u32"), ("pad", "u32"),
], var=[("cur", "u64"), ("max", "u64")], max_var=RLIM_NLIMITS * 16, subsystem="signal")
SIGNAL_TASK = layout(603, "SIGNAL_TASK", [("blocked", "u64", "flags:sigset")], subsystem="signal")
SIGPENDING = layout(604, "SIGPENDING", [("nr_pending", "u32"), ("pad", "u32")], var=[
    ("signo", "u32", "enum:signal"), ("code", "i32"), ("pid", "i32"), ("uid", "u32"),
    ("value", "u64", "hex"),
], max_var=1 << 22, subsystem="signal")
SIGALTSTACK = layout(605, "SIGALTSTACK", [
    ("ss_sp", "u64", "hex"), ("ss_size", "u64"), ("ss_flags", "u32", "flags:ss_flags"),
    ("pad", "u32"),
], subsystem="signal")


# -- SIGHAND -----------------------------------------------------------------------------------
def save_sighand(ctx, sighand: SigHand) -> None:
    ctx.write(SIGHAND, nsig=NSIG, pad=0,
              var=[(a.handler, a.flags, a.restorer, a.mask) for a in sighand.actions])


def load_sighand(ctx) -> SigHand:
    rec = ctx.read(SIGHAND)
    if rec["nsig"] != NSIG or len(rec.var) != NSIG:
        raise ctx.image_error(f"SIGHAND holds {len(rec.var)} actions, expected {NSIG}")
    actions = []
    for sig, (handler, flags, restorer, mask) in enumerate(rec.var, 1):
        if sigbit(sig) & UNBLOCKABLE and handler != 0:
            raise ctx.image_error(f"{SIGNAL_NAMES[sig]} has a handler")
        if flags >> 32 or mask & UNBLOCKABLE:
            raise ctx.image_error(f"{SIGNAL_NAMES[sig]}: bad flags {flags:#x} or mask {mask:#x}")
        actions.append(SigAction(handler, flags, mask, restorer))
    return SigHand(actions)


# -- pending queues ---------------------------------------------------------------------------------
def save_pending(ctx, pending: SigPending) -> None:
    ctx.write(SIGPENDING, nr_pending=len(pending), pad=0,
              var=[(i.signo, i.code, i.pid, i.uid, i.value) for i in pending.items])


def load_pending(ctx) -> SigPending:
    rec = ctx.read(SIGPENDING)
    if rec["nr_pending"] != len(rec.var):
        raise ctx.image_error(f"SIGPENDING says {rec['nr_pending']} items, holds {len(rec.var)}")
    pending = SigPending()
    for signo, code, pid, uid, value in rec.var:
        if not 1 <= signo <= NSIG:
            raise ctx.image_error(f"pending signal {signo} out of range")
        if not pending.add(SigInfo(signo, code, pid, uid, value)):
            raise ctx.image_error(f"standard signal {SIGNAL_NAMES[signo]} pending twice")
    return pending


# -- SIGNAL --------------------------------------------------------------------------------------
def save_signal(ctx, signal: SignalStruct) -> None:
    flags = (SIGNAL_GROUP_STOPPED if signal.group_stopped else 0) | (
        SIGNAL_GROUP_EXIT if signal.group_exit else 0)
    ctx.write(SIGNAL, flags=flags, group_exit_code=signal.group_exit_code,
              nlimits=len(signal.rlimits), pad=0, var=list(signal.rlimits))
    save_pending(ctx, signal.shared_pending)


def load_signal(ctx) -> SignalStruct:
    rec = ctx.read(SIGNAL)
    if rec["nlimits"] != RLIM_NLIMITS or len(rec.var) != RLIM_NLIMITS:
        raise ctx.image_error(f"SIGNAL holds {len(rec.var)} rlimits, expected {RLIM_NLIMITS}")
    if rec["flags"] & ~(SIGNAL_GROUP_STOPPED | SIGNAL_GROUP_EXIT):
        raise ctx.image_error(f"unknown SIGNAL flags {rec['flags']:#x}")
    for resource, (cur, maximum) in enumerate(rec.var):
        if cur > maximum:
            raise ctx.image_error(f"rlimit {resource}: cur {cur} > max {maximum}")
    signal = SignalStruct([tuple(pair) for pair in rec.var])
    signal.group_stopped = bool(rec["flags"] & SIGNAL_GROUP_STOPPED)
    signal.group_exit = bool(rec["flags"] & SIGNAL_GROUP_EXIT)
    signal.group_exit_code = rec["group_exit_code"]
    signal.shared_pending = load_pending(ctx)
    return signal


# -- per task --------------------------------------------------------------------------------------
def save_task_signals(ctx, task) -> None:
    st: ThreadSignals = task.sigstate
    ctx.write(SIGNAL_TASK, blocked=st.blocked)
    save_pending(ctx, st.pending)
    alt = st.altstack
    ctx.write(SIGALTSTACK, ss_sp=alt.sp, ss_size=alt.size, ss_flags=alt.flags, pad=0)


def load_task_signals(ctx, task) -> None:
    blocked = ctx.read(SIGNAL_TASK)["blocked"]
    if blocked & UNBLOCKABLE:
        raise ctx.image_error(f"blocked mask {blocked:#x} holds SIGKILL or SIGSTOP")
    pending = load_pending(ctx)
    rec = ctx.read(SIGALTSTACK)
    flags = rec["ss_flags"]
    if flags & ~(SS_DISABLE | SS_AUTODISARM):
        raise ctx.image_error(f"ss_flags {flags:#x}")
    if flags & SS_DISABLE and (rec["ss_sp"] or rec["ss_size"]):
        raise ctx.image_error("a disabled altstack with a stack")
    task.sigstate = ThreadSignals(blocked, pending, AltStack(rec["ss_sp"], rec["ss_size"], flags))


register(Kind(name="sighand", objtype=ObjType.SIGHAND, model_types=(SigHand,),
              layouts=(SIGHAND,), save_object=save_sighand, load_object=load_sighand,
              doc="the 64 sigactions shared by CLONE_SIGHAND tasks"))
register(Kind(name="signal", objtype=ObjType.SIGNAL, model_types=(SignalStruct,),
              layouts=(SIGNAL, SIGPENDING), save_object=save_signal, load_object=load_signal,
              doc="per thread group: rlimits, group stop/exit state, the shared pending queue"))
register(Kind(name="signals", layouts=(SIGNAL_TASK, SIGALTSTACK), task_order=20,
              save_task=save_task_signals, load_task=load_task_signals,
              doc="per thread: blocked mask, private pending queue, alternate signal stack"))

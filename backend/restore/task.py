"""Per-task state of a restored task: signals, credentials, limits, name, registers.

What the model restore of the image says each task holds (``ckptsim/model``: SigHand,
ThreadSignals, SignalStruct, Cred; ``task.x86`` from kinds/cpu_x86.py) is put into the stub:

  * handlers: rt_sigaction per signal whose action is not the default (per process);
  * rlimits: prlimit64 from the restorer (per process); a limit above what the caller may
    set fails the restart (EPERM), it is never silently lowered;
  * the alternate signal stack and the thread's name (per thread);
  * credentials (per thread, after everything that needs the stub's privileges): refused
    with EPERM when the caller could not set them itself (see ``check_creds``);
  * registers, XSAVE state and fs/gs base last; a thread checkpointed inside an interrupted
    syscall restarts it (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND: rip back over the
    `syscall` instruction, rax = the syscall number) or sees EINTR (ERESTART_RESTARTBLOCK:
    its restart block was kernel memory of the old process), as Linux decides when no
    handler runs;
  * pending signals: queued with rt_tgsigqueueinfo / rt_sigqueueinfo while every signal is
    blocked, then the saved mask is set with PTRACE_SETSIGMASK just before detaching.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct

from backend import kabi, proc
from backend.ptrace import set_sigmask, set_xstate
from ckptsim.kinds.cpu_x86 import X86_REGS
from ckptsim.model.signals import SIG_DFL
from .stub import Stub, StubError

NSIG = 64
_ALL = (1 << 64) - 1
_U64 = (1 << 64) - 1


def restore_handlers(stub: Stub, sighand) -> None:
    for sig in range(1, NSIG + 1):
        act = sighand.action(sig)
        if sig in kabi.UNBLOCKABLE_SIGNALS or (act.handler == SIG_DFL and not act.flags
                                                and not act.mask):
            continue
        addr = stub.put_scratch(struct.pack("<QQQQ", act.handler & _U64, act.flags & _U64,
                                            act.restorer & _U64, act.mask & _U64), 0)
        stub.syscall(kabi.SYS_rt_sigaction, sig, addr, 0, 8, what=f"rt_sigaction({sig})")


def int3_stops_safe(task, pending: bool) -> bool:
    """Whether injected syscalls may stop at the trampoline's int3 in ``task`` (stub.py): its
    SIGTRAP action is the default (the forced SIGTRAP would reset another one while blocked
    or ignored) and, with ``pending``, it holds no pending SIGTRAP (which that SIGTRAP's
    unblocking would let a stub take)."""
    if task.sighand.action(signal.SIGTRAP).handler != SIG_DFL:
        return False
    if pending:
        queued = list(task.sigstate.pending.items) + list(task.signal.shared_pending.items)
        return all(info.signo != signal.SIGTRAP for info in queued)
    return True


def restore_rlimits(pid: int, rlimits) -> None:
    for resource, (soft, hard) in enumerate(rlimits):
        new = (ctypes.c_uint64 * 2)(soft & _U64, hard & _U64)
        old = (ctypes.c_uint64 * 2)()
        kabi.syscall(kabi.SYS_prlimit64, pid, resource, 0, ctypes.byref(old))
        if (old[0], old[1]) == (new[0], new[1]):
            continue
        try:
            kabi.syscall(kabi.SYS_prlimit64, pid, resource, ctypes.byref(new), 0)
        except OSError as e:
            raise StubError(e.errno, f"pid {pid}: cannot set rlimit {resource} to "
                                     f"({soft}, {hard}): {os.strerror(e.errno)} (the caller may "
                                     "not raise a hard limit)") from None


def restore_thread_basics(stub: Stub, task) -> None:
    alt = task.sigstate.altstack if task.sigstate is not None else None
    if alt is not None and (alt.size or alt.sp):
        addr = stub.put_scratch(struct.pack("<QiiQ", alt.sp, alt.flags & ~1, 0, alt.size), 0)
        stub.syscall(kabi.SYS_sigaltstack, addr, 0, what="sigaltstack")
    if task.comm:
        addr = stub.put_scratch(task.comm.encode()[:15] + b"\0", 0)
        stub.syscall(kabi.SYS_prctl, kabi.PR_SET_NAME, addr, 0, 0, 0, what="prctl(PR_SET_NAME)")


def check_creds(creds) -> None:
    """EPERM unless the caller could set every one of ``creds`` itself: other ids need
    CAP_SETUID/CAP_SETGID, and no capability beyond the caller's permitted set."""
    me = proc.read_status(os.getpid())
    permitted, effective = me.cap_prm, me.cap_eff
    uids = {os.getuid(), os.geteuid()}
    gids = {os.getgid(), os.getegid()}
    for cred in creds:
        if not effective & (1 << kabi.CAP_SETUID) and {cred.uid, cred.euid, cred.suid} - uids:
            raise StubError(errno.EPERM, f"the image asks for uid {cred.uid}: the caller may "
                                         "not set it (no CAP_SETUID)")
        if not effective & (1 << kabi.CAP_SETGID) and ({cred.gid, cred.egid, cred.sgid} - gids
                                                  or set(cred.groups) - set(os.getgroups())):
            raise StubError(errno.EPERM, f"the image asks for gid {cred.gid} or other groups: "
                                         "the caller may not set them (no CAP_SETGID)")
        extra = (cred.cap_permitted | cred.cap_effective | cred.cap_inheritable) & ~permitted
        if extra:
            raise StubError(errno.EPERM, f"the image asks for capabilities {extra:#x} beyond "
                                         "the caller's")




def restore_creds(stub: Stub, cred) -> None:
    """Set ``cred`` in the stub (it runs as the caller until now). Order: the bounding set
    and securebits while the stub still has every capability (with KEEP_CAPS, so that the
    uid change below keeps the permitted set), then groups, gids, uids, the three capability
    sets, and KEEP_CAPS back as the image has it."""
    for cap in range(kabi.CAP_LAST_CAP + 1):
        if not cred.cap_bounding >> cap & 1:
            stub.syscall(kabi.SYS_prctl, kabi.PR_CAPBSET_DROP, cap, 0, 0, 0,
                         what=f"prctl(PR_CAPBSET_DROP, {cap})")
    stub.syscall(kabi.SYS_prctl, kabi.PR_SET_SECUREBITS,
                 cred.securebits | kabi.SECBIT_KEEP_CAPS, 0, 0, 0, what="prctl(PR_SET_SECUREBITS)")
    data = struct.pack(f"<{len(cred.groups)}I", *cred.groups)
    addr = stub.put_scratch(data or b"\0", 0)
    stub.syscall(kabi.SYS_setgroups, len(cred.groups), addr, what="setgroups")
    stub.syscall(kabi.SYS_setresgid, cred.gid, cred.egid, cred.sgid, what="setresgid")
    stub.syscall(kabi.SYS_setresuid, cred.uid, cred.euid, cred.suid, what="setresuid")
    hdr = kabi.user_cap_header(version=kabi.LINUX_CAPABILITY_VERSION_3, pid=0)
    data = (kabi.user_cap_data * 2)()
    for i in range(2):
        data[i].effective = (cred.cap_effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (cred.cap_permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (cred.cap_inheritable >> (32 * i)) & 0xFFFFFFFF
    hdr_addr = stub.put_scratch(bytes(hdr), 0)
    data_addr = stub.put_scratch(bytes(data), 64)
    stub.syscall(kabi.SYS_capset, hdr_addr, data_addr, what="capset")
    if not cred.securebits & kabi.SECBIT_KEEP_CAPS:
        stub.syscall(kabi.SYS_prctl, kabi.PR_SET_KEEPCAPS, 0, 0, 0, 0,
                     what="prctl(PR_SET_KEEPCAPS, 0)")


def caller_cred_matches(cred) -> bool:
    """Whether ``cred`` is exactly what a stub has from the caller (then nothing is set)."""
    me = proc.read_status(os.getpid())
    uids, gids, groups = me.uid[:3], me.gid[:3], tuple(sorted(me.groups))
    caps = (me.cap_inh, me.cap_prm, me.cap_eff, me.cap_bnd)
    return (uids == (cred.uid, cred.euid, cred.suid) and gids == (cred.gid, cred.egid, cred.sgid)
            and groups == tuple(sorted(cred.groups))
            and caps == (cred.cap_inheritable, cred.cap_permitted, cred.cap_effective,
                         cred.cap_bounding)
            and cred.securebits == 0)


def final_regs(x86, task=None) -> kabi.user_regs_struct:
    """The registers to resume with, syscall restart decided as Linux does without a
    handler to run."""
    regs = kabi.user_regs_struct(**{name: x86.regs[name] & _U64 for name in X86_REGS})
    nr = regs.orig_rax if regs.orig_rax < (1 << 63) else -1
    ret = regs.rax - (1 << 64) if regs.rax >= (1 << 63) else regs.rax
    if nr >= 0 and -ret in (kabi.ERESTARTSYS, kabi.ERESTARTNOINTR, kabi.ERESTARTNOHAND,
                            kabi.ERESTART_RESTARTBLOCK):
        if -ret == kabi.ERESTARTNOINTR or task is None or not _handler_interrupts(task, -ret):
            regs.rip -= 2
            regs.rax = nr
            if -ret == kabi.ERESTART_RESTARTBLOCK:
                _resume_from_remaining(regs, nr)
        else:
            regs.rax = (-errno.EINTR) & _U64
    regs.orig_rax = _U64
    return regs


def _resume_from_remaining(regs, nr: int) -> None:
    """A relative sleep interrupted with a remaining-time pointer: the kernel wrote the time
    left there (it is in the saved memory), so the restarted call sleeps only that long, as
    Linux's restart block would. Other restart-block calls (poll, futex waits, sleeps without
    the pointer) start again with their original timeout: they may wait longer, never fail."""
    if nr == kabi.SYS_nanosleep and regs.rsi:
        regs.rdi = regs.rsi
    elif nr == kabi.SYS_clock_nanosleep and regs.r10:
        regs.rdx = regs.r10




def _handler_interrupts(task, code: int) -> bool:
    """Whether a handler runs first on resume (an unblocked pending signal with a handler),
    making the syscall return EINTR as Linux's handle_signal decides: always for
    ERESTARTNOHAND and ERESTART_RESTARTBLOCK, without SA_RESTART for ERESTARTSYS."""
    pending = list(task.sigstate.pending.items) + list(task.signal.shared_pending.items)
    for info in pending:
        if task.sigstate.blocked >> (info.signo - 1) & 1:
            continue
        act = task.sighand.action(info.signo)
        if act.handler in (0, 1):        # SIG_DFL, SIG_IGN: no handler runs
            continue
        if code == kabi.ERESTARTSYS and act.flags & kabi.SA_RESTART:
            return False
        return True
    return False


def _siginfo(info) -> bytes:
    raw = bytearray(128)
    struct.pack_into("<iii", raw, 0, info.signo, 0, info.code)
    struct.pack_into("<iIQ", raw, 16, info.pid, info.uid, info.value & _U64)
    return bytes(raw)


def queue_pending(stub: Stub, task, leader: bool, vpid: int, vtid: int) -> None:
    """Queue the task's pending signals (every signal blocked meanwhile); the shared queue
    with the leader. ``vpid``/``vtid``: the task's own ids in its namespace (the kernel lets
    a task queue any siginfo to itself only)."""
    set_sigmask(stub.tid, _ALL)
    queues = [(task.sigstate.pending.items, True)]
    if leader:
        queues.append((task.signal.shared_pending.items, False))
    for items, private in queues:
        for info in items:
            addr = stub.put_scratch(_siginfo(info), 0)
            if private:
                stub.syscall(kabi.SYS_rt_tgsigqueueinfo, vpid, vtid, info.signo, addr,
                             what=f"rt_tgsigqueueinfo({info.signo})")
            else:
                stub.syscall(kabi.SYS_rt_sigqueueinfo, vpid, info.signo, addr,
                             what=f"rt_sigqueueinfo({info.signo})")


def restore_rseq(stub: Stub, task) -> None:
    """Register the thread's restartable sequences area again (the kernel forgot it)."""
    rseq = task.x86.rseq if task.x86 is not None else None
    if rseq is not None:
        ptr, size, sig = rseq
        stub.syscall(kabi.SYS_rseq, ptr, size, 0, sig, what="rseq registration")


def set_cpu(stub: Stub, task) -> None:
    """Registers and XSAVE state; the signal mask last (the stub keeps all signals blocked
    until then)."""
    x86 = task.x86
    if x86 is None:
        raise StubError(errno.EINVAL, f"task {stub.tid} has no x86-64 state in the image "
                                      "(a model image cannot run on Linux)")
    set_xstate(stub.tid, x86.xstate)
    stub.set_final_regs(final_regs(x86, task))
    unblockable = sum(kabi.sigbit(sig) for sig in kabi.UNBLOCKABLE_SIGNALS)
    set_sigmask(stub.tid, task.sigstate.blocked & ~unblockable)

"""Signals: sigaction flags, sigprocmask/sigaltstack constants, si_code values, the kernel's
struct sigaction, stack_t and 128-byte siginfo, and kernel sigset bit helpers."""

from __future__ import annotations

import ctypes

from .syscalls import c_u8, c_u32, c_u64

# --------------------------------------------------------------------------------------------
# Signals (include/uapi/asm-generic/signal-defs.h, siginfo.h; x86_64 sigaction)
# --------------------------------------------------------------------------------------------
NSIG = 64                 # _NSIG: signals 1..64
SIGSET_SIZE = 8           # sizeof(kernel sigset_t): the sigsetsize argument of rt_sig*()
SIGINFO_SIZE = 128

# the model defines these with Linux's values (the image stores sigaction flags as they are);
# one definition, which the model cannot take from here (ckptsim never imports backend)
from ckptsim.model.signals_defs import (  # noqa: E402,F401
    SA_NOCLDSTOP, SA_NOCLDWAIT, SA_NODEFER, SA_ONSTACK, SA_RESETHAND, SA_RESTART, SA_RESTORER,
    SA_SIGINFO, SIG_DFL, SIG_IGN)

SA_UNSUPPORTED = 0x00000400
SA_EXPOSE_TAGBITS = 0x00000800
UNBLOCKABLE_SIGNALS = {9, 19}  # SIGKILL, SIGSTOP: never caught, blocked or ignored

SIG_BLOCK = 0
SIG_UNBLOCK = 1
SIG_SETMASK = 2

SS_ONSTACK = 1
SS_DISABLE = 2
SS_AUTODISARM = 1 << 31

SI_USER = 0
SI_KERNEL = 0x80
SI_QUEUE = -1
SI_TIMER = -2
SI_MESGQ = -3
SI_ASYNCIO = -4
SI_SIGIO = -5
SI_TKILL = -6
SI_DETHREAD = -7
SI_ASYNCNL = -60

CLD_EXITED = 1
CLD_KILLED = 2
CLD_DUMPED = 3
CLD_TRAPPED = 4
CLD_STOPPED = 5
CLD_CONTINUED = 6

TRAP_BRKPT = 1
TRAP_TRACE = 2


class kernel_sigaction(ctypes.Structure):
    """The x86_64 kernel's struct sigaction as rt_sigaction(2) takes it (not glibc's)."""
    _fields_ = [("sa_handler", c_u64), ("sa_flags", c_u64), ("sa_restorer", c_u64),
                ("sa_mask", c_u64)]


class stack_t(ctypes.Structure):
    _fields_ = [("ss_sp", c_u64), ("ss_flags", ctypes.c_int), ("ss_size", c_u64)]


KERNEL_SIGACTION_SIZE = 32   # struct kernel_sigaction on x86-64: handler, flags, restorer, mask
STACK_T_SIZE = 24            # stack_t: ss_sp, ss_flags (int, padded), ss_size


class _si_kill(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_int), ("uid", c_u32)]


class _si_timer(ctypes.Structure):
    _fields_ = [("tid", ctypes.c_int), ("overrun", ctypes.c_int), ("sigval", c_u64)]


class _si_rt(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_int), ("uid", c_u32), ("sigval", c_u64)]


class _si_chld(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_int), ("uid", c_u32), ("status", ctypes.c_int),
                ("utime", ctypes.c_long), ("stime", ctypes.c_long)]


class _si_fault(ctypes.Structure):
    _fields_ = [("addr", c_u64)]


class _si_poll(ctypes.Structure):
    _fields_ = [("band", ctypes.c_long), ("fd", ctypes.c_int)]


class _si_sys(ctypes.Structure):
    _fields_ = [("call_addr", c_u64), ("syscall", ctypes.c_int), ("arch", c_u32)]


class _si_fields(ctypes.Union):
    _fields_ = [("kill", _si_kill), ("timer", _si_timer), ("rt", _si_rt), ("chld", _si_chld),
                ("fault", _si_fault), ("poll", _si_poll), ("sys", _si_sys),
                ("raw", c_u8 * (SIGINFO_SIZE - 16))]


class siginfo_t(ctypes.Structure):
    """The kernel's 128-byte siginfo (x86_64: the union starts at offset 16)."""
    _fields_ = [("si_signo", ctypes.c_int), ("si_errno", ctypes.c_int), ("si_code", ctypes.c_int),
                ("_pad0", ctypes.c_int), ("f", _si_fields)]


assert ctypes.sizeof(siginfo_t) == SIGINFO_SIZE


def sigbit(sig: int) -> int:
    """The bit of signal `sig` in a kernel sigset (signal 1 is bit 0)."""
    return 1 << (sig - 1)


def sigset_to_list(mask: int) -> list[int]:
    return [s for s in range(1, NSIG + 1) if mask & sigbit(s)]

"""Signal numbers and sets, the constants of the signal syscalls (sigaction flags,
sigprocmask's ``how``, sigaltstack, si_code), default actions, and the RLIMIT table.

Part of ``signals.py``, which re-exports all of it: import these names from there.
"""
from __future__ import annotations

NSIG = 64
(SIGHUP, SIGINT, SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGKILL, SIGUSR1, SIGSEGV,
 SIGUSR2, SIGPIPE, SIGALRM, SIGTERM, SIGSTKFLT, SIGCHLD, SIGCONT, SIGSTOP, SIGTSTP, SIGTTIN,
 SIGTTOU, SIGURG, SIGXCPU, SIGXFSZ, SIGVTALRM, SIGPROF, SIGWINCH, SIGIO, SIGPWR,
 SIGSYS) = range(1, 32)
KERNEL_SIGRTMIN = 32        # the kernel queues 32..64; glibc keeps 32 and 33 for itself
SIGRTMIN = 34
SIGRTMAX = 64

_STANDARD_NAMES = ("HUP INT QUIT ILL TRAP ABRT BUS FPE KILL USR1 SEGV USR2 PIPE ALRM TERM "
                   "STKFLT CHLD CONT STOP TSTP TTIN TTOU URG XCPU XFSZ VTALRM PROF WINCH IO "
                   "PWR SYS").split()
SIGNAL_NAMES = {sig: "SIG" + name for sig, name in enumerate(_STANDARD_NAMES, 1)}
SIGNAL_NAMES.update({sig: f"SIGRT{sig - KERNEL_SIGRTMIN}" for sig in range(32, 65)})

SIG_DFL = 0
SIG_IGN = 1

SA_NOCLDSTOP = 0x00000001
SA_NOCLDWAIT = 0x00000002
SA_SIGINFO = 0x00000004
SA_RESTORER = 0x04000000
SA_ONSTACK = 0x08000000
SA_RESTART = 0x10000000
SA_NODEFER = 0x40000000
SA_RESETHAND = 0x80000000
SA_FLAG_NAMES = {value: name for name, value in globals().items() if name.startswith("SA_")}

SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK = 0, 1, 2

SS_ONSTACK = 1
SS_DISABLE = 2
SS_AUTODISARM = 1 << 31
MINSIGSTKSZ = 2048

# si_code values (include/uapi/asm-generic/siginfo.h)
SI_USER = 0
SI_KERNEL = 0x80
SI_QUEUE = -1
SI_TKILL = -6
CLD_EXITED, CLD_KILLED, CLD_DUMPED, CLD_TRAPPED, CLD_STOPPED, CLD_CONTINUED = range(1, 7)

FULL_MASK = (1 << NSIG) - 1


def sigbit(sig: int) -> int:
    """The bit of ``sig`` in a sigset (bit sig-1, as Linux's sigset_t)."""
    return 1 << (sig - 1)


def sigmask(*sigs: int) -> int:
    out = 0
    for sig in sigs:
        out |= sigbit(sig)
    return out


UNBLOCKABLE = sigmask(SIGKILL, SIGSTOP)
STOP_SIGNALS = sigmask(SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU)
DEFAULT_IGNORE = sigmask(SIGCHLD, SIGURG, SIGWINCH, SIGCONT)
DEFAULT_COREDUMP = sigmask(SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGSEGV,
                           SIGXCPU, SIGXFSZ, SIGSYS)


def valid_signal(sig: int) -> bool:
    return 1 <= sig <= NSIG


def is_rt(sig: int) -> bool:
    return sig >= KERNEL_SIGRTMIN


def default_action(sig: int) -> str:
    """``"ignore"``, ``"stop"``, ``"core"`` or ``"terminate"``."""
    bit = sigbit(sig)
    if bit & DEFAULT_IGNORE:
        return "ignore"
    if bit & STOP_SIGNALS:
        return "stop"
    if bit & DEFAULT_COREDUMP:
        return "core"
    return "terminate"


# -- RLIMITs (the per-group resource limits live in SignalStruct, as in Linux) ------------
RLIM_INFINITY = (1 << 64) - 1
RLIMIT_NAMES = ("CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NPROC", "NOFILE", "MEMLOCK",
                "AS", "LOCKS", "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO", "RTTIME")
(RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_DATA, RLIMIT_STACK, RLIMIT_CORE, RLIMIT_RSS, RLIMIT_NPROC,
 RLIMIT_NOFILE, RLIMIT_MEMLOCK, RLIMIT_AS, RLIMIT_LOCKS, RLIMIT_SIGPENDING, RLIMIT_MSGQUEUE,
 RLIMIT_NICE, RLIMIT_RTPRIO, RLIMIT_RTTIME) = range(16)
RLIM_NLIMITS = 16
NR_OPEN = 1024 * 1024
# Linux computes NPROC and SIGPENDING at boot from RAM (max_threads / 2); the model fixes one.
BOOT_TASK_LIMIT = 31_388
DEFAULT_RLIMITS = (
    (RLIM_INFINITY, RLIM_INFINITY),          # CPU
    (RLIM_INFINITY, RLIM_INFINITY),          # FSIZE
    (RLIM_INFINITY, RLIM_INFINITY),          # DATA
    (8 * 1024 * 1024, RLIM_INFINITY),        # STACK (_STK_LIM)
    (0, RLIM_INFINITY),                      # CORE
    (RLIM_INFINITY, RLIM_INFINITY),          # RSS
    (BOOT_TASK_LIMIT, BOOT_TASK_LIMIT),      # NPROC
    (1024, 4096),                            # NOFILE (INR_OPEN_CUR, INR_OPEN_MAX)
    (8 * 1024 * 1024, 8 * 1024 * 1024),      # MEMLOCK (MLOCK_LIMIT)
    (RLIM_INFINITY, RLIM_INFINITY),          # AS
    (RLIM_INFINITY, RLIM_INFINITY),          # LOCKS
    (BOOT_TASK_LIMIT, BOOT_TASK_LIMIT),      # SIGPENDING
    (819200, 819200),                        # MSGQUEUE (MQ_BYTES_MAX)
    (0, 0),                                  # NICE
    (0, 0),                                  # RTPRIO
    (RLIM_INFINITY, RLIM_INFINITY),          # RTTIME
)

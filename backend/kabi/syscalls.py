"""Syscall numbers, kernel-internal errno values, the ctypes integer types the other
submodules use, ioctl number encoding and the ``syscall()`` helper."""

from __future__ import annotations

import ctypes
import os
import platform

if platform.machine() != "x86_64":  # pragma: no cover - the project targets x86_64 only
    raise ImportError(f"backend.kabi describes the x86_64 kernel ABI, not {platform.machine()}")

c_u8, c_u16, c_u32, c_u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
c_s32, c_s64 = ctypes.c_int32, ctypes.c_int64

# --------------------------------------------------------------------------------------------
# Syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl), by number
# --------------------------------------------------------------------------------------------
SYS_read = 0
SYS_write = 1
SYS_close = 3
SYS_lseek = 8
SYS_mmap = 9
SYS_mprotect = 10
SYS_munmap = 11
SYS_brk = 12
SYS_rt_sigaction = 13
SYS_rt_sigprocmask = 14
SYS_rt_sigreturn = 15
SYS_ioctl = 16
SYS_pread64 = 17
SYS_pwrite64 = 18
SYS_mremap = 25
SYS_madvise = 28
SYS_dup = 32
SYS_pause = 34
SYS_nanosleep = 35
SYS_getitimer = 36
SYS_setitimer = 38
SYS_getpid = 39
SYS_sendmsg = 46
SYS_recvmsg = 47
SYS_clone = 56
SYS_fork = 57
SYS_vfork = 58
SYS_execve = 59
SYS_exit = 60
SYS_wait4 = 61
SYS_kill = 62
SYS_fcntl = 72
SYS_getcwd = 79
SYS_fchdir = 81
SYS_umask = 95
SYS_getrlimit = 97
SYS_ptrace = 101
SYS_setpgid = 109
SYS_getppid = 110
SYS_setsid = 112
SYS_setgroups = 116
SYS_setresuid = 117
SYS_setresgid = 119
SYS_getpgid = 121
SYS_getsid = 124
SYS_capset = 126
SYS_rt_sigpending = 127
SYS_rt_sigtimedwait = 128
SYS_rt_sigqueueinfo = 129
SYS_rt_sigsuspend = 130
SYS_sigaltstack = 131
SYS_prctl = 157
SYS_arch_prctl = 158
SYS_chroot = 161
SYS_gettid = 186
SYS_tkill = 200
SYS_futex = 202
SYS_set_tid_address = 218
SYS_restart_syscall = 219
SYS_clock_nanosleep = 230
SYS_exit_group = 231
SYS_tgkill = 234
SYS_waitid = 247
SYS_openat = 257
SYS_pselect6 = 270
SYS_ppoll = 271
SYS_unshare = 272                          # with CLONE_FS: a thread's own cwd (sockets.py)
SYS_set_robust_list = 273
SYS_get_robust_list = 274
SYS_tee = 276
SYS_epoll_pwait = 281
SYS_dup3 = 292
SYS_rt_tgsigqueueinfo = 297
SYS_prlimit64 = 302
SYS_setns = 308                            # back to its own pid namespace after a CLONE_NEWPID fork (interp_tasks.py)
SYS_process_vm_readv = 310
SYS_process_vm_writev = 311
SYS_kcmp = 312
SYS_memfd_create = 319
SYS_bpf = 321
SYS_userfaultfd = 323
SYS_io_pgetevents = 333
SYS_rseq = 334
SYS_pidfd_send_signal = 424
SYS_pidfd_open = 434
SYS_clone3 = 435
SYS_close_range = 436
SYS_pidfd_getfd = 438
SYS_epoll_pwait2 = 441

# Syscalls that swap the signal mask for their duration (saved_sigmask + TIF_RESTORE_SIGMASK):
# while a thread sits in one of them, PTRACE_GETSIGMASK reports the temporary mask.
MASK_SWAPPING_SYSCALLS = frozenset({SYS_rt_sigsuspend, SYS_ppoll, SYS_pselect6, SYS_epoll_pwait,
                                    SYS_epoll_pwait2, SYS_io_pgetevents})

# Kernel-internal "restart" return values a stopped thread can show in rax (as -value) while it
# sits in the signal path of an interrupted syscall (include/linux/errno.h).
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ENOIOCTLCMD = 515
ERESTART_RESTARTBLOCK = 516
RESTART_ERRNOS = frozenset({ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK})
MAX_ERRNO = 4095  # a syscall return value in [-4095, -1] is -errno


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# --------------------------------------------------------------------------------------------
# ioctl number encoding (include/uapi/asm-generic/ioctl.h)
# --------------------------------------------------------------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: int | str, nr: int, size: int) -> int:
    if isinstance(typ, str):
        typ = ord(typ)
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _IO(typ, nr):
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ, nr, size):
    return _IOC(_IOC_READ, typ, nr, size)


def _IOW(typ, nr, size):
    return _IOC(_IOC_WRITE, typ, nr, size)


def _IOWR(typ, nr, size):
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, size)


# --------------------------------------------------------------------------------------------
# The syscall() helper
# --------------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_U64 = (1 << 64) - 1


def _arg(a):
    """Python int -> a full 64-bit C argument (ctypes would pass a bare int as a 32-bit int)."""
    if a is None:
        return ctypes.c_ulong(0)
    if isinstance(a, bool):
        return ctypes.c_ulong(int(a))
    if isinstance(a, int):
        return ctypes.c_ulong(a & _U64)
    return a  # a ctypes object, pointer or byref()


def syscall(nr: int, *args, what: str | None = None) -> int:
    """Call syscall `nr` with up to six arguments (ints, ctypes objects, byref()/pointers).

    Returns the (non-negative) result; on failure raises OSError with the errno, its text
    naming `what` (default: the syscall number)."""
    if len(args) > 6:
        raise TypeError(f"syscall {nr}: at most 6 arguments, got {len(args)}")
    ctypes.set_errno(0)
    ret = _libc.syscall(ctypes.c_long(nr), *[_arg(a) for a in args])
    if ret == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, f"{os.strerror(err)} [{what or f'syscall {nr}'}]")
    return ret

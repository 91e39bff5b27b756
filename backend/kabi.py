"""Raw Linux kernel ABI for x86_64: the ONE place for syscall numbers, ptrace requests, ioctl
numbers, struct layouts and constants that Python's os/signal modules lack.

Owned by the ptrace developer. Others: append your constants in a clearly separated section at
the end of the file, with a comment naming your module; keep edits small and append-only.

Everything here is plain data plus one helper, `syscall(nr, *args)`, which calls libc's
syscall() with errno checked and raises OSError (with the errno) on failure.
"""

from __future__ import annotations

import ctypes
import os
import platform

if platform.machine() != "x86_64":  # pragma: no cover - the project targets x86_64 only
    raise ImportError(f"backend.kabi describes the x86_64 kernel ABI, not {platform.machine()}")

c_u8, c_u16, c_u32, c_u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
c_s32, c_s64 = ctypes.c_int32, ctypes.c_int64

# --------------------------------------------------------------------------------------------
# Syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)
# --------------------------------------------------------------------------------------------
SYS_read = 0
SYS_write = 1
SYS_close = 3
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
SYS_pselect6 = 270
SYS_ppoll = 271
SYS_mremap = 25
SYS_madvise = 28
SYS_dup = 32
SYS_pause = 34
SYS_nanosleep = 35
SYS_getitimer = 36
SYS_setitimer = 38
SYS_getpid = 39
SYS_clone = 56
SYS_fork = 57
SYS_vfork = 58
SYS_execve = 59
SYS_exit = 60
SYS_wait4 = 61
SYS_kill = 62
SYS_fcntl = 72
SYS_getcwd = 79
SYS_getrlimit = 97
SYS_ptrace = 101
SYS_getppid = 110
SYS_getpgid = 121
SYS_getsid = 124
SYS_rt_sigpending = 127
SYS_rt_sigtimedwait = 128
SYS_rt_sigqueueinfo = 129
SYS_rt_sigsuspend = 130
SYS_sigaltstack = 131
SYS_prctl = 157
SYS_arch_prctl = 158
SYS_gettid = 186
SYS_tkill = 200
SYS_futex = 202
SYS_set_tid_address = 218
SYS_restart_syscall = 219
SYS_clock_nanosleep = 230
SYS_exit_group = 231
SYS_epoll_pwait = 281
SYS_tgkill = 234
SYS_waitid = 247
SYS_set_robust_list = 273
SYS_get_robust_list = 274
SYS_rt_tgsigqueueinfo = 297
SYS_prlimit64 = 302
SYS_process_vm_readv = 310
SYS_process_vm_writev = 311
SYS_kcmp = 312
SYS_memfd_create = 319
SYS_userfaultfd = 323
SYS_rseq = 334
SYS_io_pgetevents = 333
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

# --------------------------------------------------------------------------------------------
# ptrace (include/uapi/linux/ptrace.h, arch/x86/include/uapi/asm/ptrace-abi.h)
# --------------------------------------------------------------------------------------------
PTRACE_TRACEME = 0
PTRACE_PEEKTEXT = 1
PTRACE_PEEKDATA = 2
PTRACE_PEEKUSER = 3
PTRACE_POKETEXT = 4
PTRACE_POKEDATA = 5
PTRACE_POKEUSER = 6
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_GETFPREGS = 14
PTRACE_SETFPREGS = 15
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_ARCH_PRCTL = 30
PTRACE_SYSEMU = 31
PTRACE_SYSEMU_SINGLESTEP = 32
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACEVFORK = 0x4
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEVFORKDONE = 0x20
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_TRACESECCOMP = 0x80
PTRACE_O_EXITKILL = 0x100000
PTRACE_O_SUSPEND_SECCOMP = 0x200000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_VFORK_DONE = 5
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_SECCOMP = 7
PTRACE_EVENT_STOP = 128

PTRACE_PEEKSIGINFO_SHARED = 1

PTRACE_SYSCALL_INFO_NONE = 0
PTRACE_SYSCALL_INFO_ENTRY = 1
PTRACE_SYSCALL_INFO_EXIT = 2
PTRACE_SYSCALL_INFO_SECCOMP = 3

# ELF note types for PTRACE_GETREGSET / SETREGSET (include/uapi/linux/elf.h)
NT_PRSTATUS = 1
NT_PRFPREG = 2
NT_X86_XSTATE = 0x202

# wait() flags missing from os
WALL = 0x40000000        # __WALL: wait for all children, clone or not
WNOTHREAD = 0x20000000   # __WNOTHREAD
# (__WCLONE is 0x80000000; it does not fit os.waitpid's C int and __WALL covers it)

# arch_prctl codes
ARCH_SET_GS = 0x1001
ARCH_SET_FS = 0x1002
ARCH_GET_FS = 0x1003
ARCH_GET_GS = 0x1004
ARCH_MAP_VDSO_X32 = 0x2001
ARCH_MAP_VDSO_32 = 0x2002
ARCH_MAP_VDSO_64 = 0x2003


class user_regs_struct(ctypes.Structure):
    """struct user_regs_struct (arch/x86/include/asm/user_64.h): PTRACE_GETREGS, NT_PRSTATUS."""
    _fields_ = [(n, c_u64) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
        "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
        "gs_base", "ds", "es", "fs", "gs")]

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name, _ in self._fields_}

    def copy(self) -> "user_regs_struct":
        return user_regs_struct.from_buffer_copy(self)


class user_fpregs_struct(ctypes.Structure):
    """struct user_i387_struct: the 512-byte FXSAVE image (PTRACE_GETFPREGS, NT_PRFPREG)."""
    _fields_ = [("cwd", c_u16), ("swd", c_u16), ("ftw", c_u16), ("fop", c_u16),
                ("rip", c_u64), ("rdp", c_u64), ("mxcsr", c_u32), ("mxcr_mask", c_u32),
                ("st_space", c_u32 * 32), ("xmm_space", c_u32 * 64), ("padding", c_u32 * 24)]


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class peeksiginfo_args(ctypes.Structure):
    _fields_ = [("off", c_u64), ("flags", c_u32), ("nr", c_s32)]


class ptrace_syscall_info(ctypes.Structure):
    """struct ptrace_syscall_info (PTRACE_GET_SYSCALL_INFO); the union is left as raw u64s:
    entry = nr, args[6]; exit = rval (s64), is_error (u8); seccomp = nr, args[6], ret_data."""
    _fields_ = [("op", c_u8), ("pad", c_u8 * 3), ("arch", c_u32),
                ("instruction_pointer", c_u64), ("stack_pointer", c_u64), ("data", c_u64 * 8)]


AUDIT_ARCH_X86_64 = 0xC000003E

# --------------------------------------------------------------------------------------------
# Signals (include/uapi/asm-generic/signal-defs.h, siginfo.h; x86_64 sigaction)
# --------------------------------------------------------------------------------------------
NSIG = 64                 # _NSIG: signals 1..64
SIGSET_SIZE = 8           # sizeof(kernel sigset_t): the sigsetsize argument of rt_sig*()
SIGINFO_SIZE = 128

SA_NOCLDSTOP = 0x00000001
SA_NOCLDWAIT = 0x00000002
SA_SIGINFO = 0x00000004
SA_RESTORER = 0x04000000
SA_ONSTACK = 0x08000000
SA_RESTART = 0x10000000
SA_NODEFER = 0x40000000
SA_RESETHAND = 0x80000000
SA_UNSUPPORTED = 0x00000400
SA_EXPOSE_TAGBITS = 0x00000800

SIG_DFL = 0
SIG_IGN = 1

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

# --------------------------------------------------------------------------------------------
# clone3 (include/uapi/linux/sched.h)
# --------------------------------------------------------------------------------------------
CLONE_NEWTIME = 0x00000080
CLONE_VM = 0x00000100
CLONE_FS = 0x00000200
CLONE_FILES = 0x00000400
CLONE_SIGHAND = 0x00000800
CLONE_PIDFD = 0x00001000
CLONE_PTRACE = 0x00002000
CLONE_VFORK = 0x00004000
CLONE_PARENT = 0x00008000
CLONE_THREAD = 0x00010000
CLONE_NEWNS = 0x00020000
CLONE_SYSVSEM = 0x00040000
CLONE_SETTLS = 0x00080000
CLONE_PARENT_SETTID = 0x00100000
CLONE_CHILD_CLEARTID = 0x00200000
CLONE_DETACHED = 0x00400000
CLONE_UNTRACED = 0x00800000
CLONE_CHILD_SETTID = 0x01000000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_IO = 0x80000000
CLONE_CLEAR_SIGHAND = 0x100000000
CLONE_INTO_CGROUP = 0x200000000


class clone_args(ctypes.Structure):
    _fields_ = [(n, c_u64) for n in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


CLONE_ARGS_SIZE_VER2 = 88
assert ctypes.sizeof(clone_args) == CLONE_ARGS_SIZE_VER2

# --------------------------------------------------------------------------------------------
# kcmp (include/uapi/linux/kcmp.h)
# --------------------------------------------------------------------------------------------
KCMP_FILE = 0
KCMP_VM = 1
KCMP_FILES = 2
KCMP_FS = 3
KCMP_SIGHAND = 4
KCMP_IO = 5
KCMP_SYSVSEM = 6
KCMP_EPOLL_TFD = 7


class kcmp_epoll_slot(ctypes.Structure):
    _fields_ = [("efd", c_u32), ("tfd", c_u32), ("toff", c_u32)]


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
# pagemap and PAGEMAP_SCAN (include/uapi/linux/fs.h, Linux 6.7+; absent from Debian 12 headers)
# --------------------------------------------------------------------------------------------
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PAGE_IS_GUARD = 1 << 8

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1


class page_region(ctypes.Structure):
    _fields_ = [("start", c_u64), ("end", c_u64), ("categories", c_u64)]


class pm_scan_arg(ctypes.Structure):
    _fields_ = [(n, c_u64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


assert ctypes.sizeof(pm_scan_arg) == 96 and ctypes.sizeof(page_region) == 24
PAGEMAP_SCAN = _IOWR("f", 16, ctypes.sizeof(pm_scan_arg))

# --------------------------------------------------------------------------------------------
# userfaultfd (include/uapi/linux/userfaultfd.h)
# --------------------------------------------------------------------------------------------
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", c_u64), ("features", c_u64), ("ioctls", c_u64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", c_u64), ("len", c_u64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_u64), ("ioctls", c_u64)]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_u64)]


UFFDIO_API = _IOWR(UFFD_API, 0x3F, ctypes.sizeof(uffdio_api))
UFFDIO_REGISTER = _IOWR(UFFD_API, 0x00, ctypes.sizeof(uffdio_register))
UFFDIO_UNREGISTER = _IOR(UFFD_API, 0x01, ctypes.sizeof(uffdio_range))
UFFDIO_WRITEPROTECT = _IOWR(UFFD_API, 0x06, ctypes.sizeof(uffdio_writeprotect))


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", c_u64), ("src", c_u64), ("len", c_u64), ("mode", c_u64),
                ("copy", ctypes.c_int64)]


UFFDIO_COPY = _IOWR(UFFD_API, 0x03, ctypes.sizeof(uffdio_copy))
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0

# --------------------------------------------------------------------------------------------
# prctl (include/uapi/linux/prctl.h)
# --------------------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_GET_NAME = 16
PR_GET_SECCOMP = 21
PR_CAPBSET_READ = 23
PR_SET_MM = 35
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_GET_TID_ADDRESS = 40
PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42

PR_SET_MM_START_CODE = 1
PR_SET_MM_END_CODE = 2
PR_SET_MM_START_DATA = 3
PR_SET_MM_END_DATA = 4
PR_SET_MM_START_STACK = 5
PR_SET_MM_START_BRK = 6
PR_SET_MM_BRK = 7
PR_SET_MM_ARG_START = 8
PR_SET_MM_ARG_END = 9
PR_SET_MM_ENV_START = 10
PR_SET_MM_ENV_END = 11
PR_SET_MM_AUXV = 12
PR_SET_MM_EXE_FILE = 13
PR_SET_MM_MAP = 14
PR_SET_MM_MAP_SIZE = 15


class prctl_mm_map(ctypes.Structure):
    _fields_ = [(n, c_u64) for n in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
        "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
        ("auxv_size", c_u32), ("exe_fd", c_u32)]


assert ctypes.sizeof(prctl_mm_map) == 104

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


def sigbit(sig: int) -> int:
    """The bit of signal `sig` in a kernel sigset (signal 1 is bit 0)."""
    return 1 << (sig - 1)


def sigset_to_list(mask: int) -> list[int]:
    return [s for s in range(1, NSIG + 1) if mask & sigbit(s)]

# --------------------------------------------------------------------------------------------
# backend/memory.py: CamelCase names it uses (same structs as above)
# --------------------------------------------------------------------------------------------
IOVec = iovec
PageRegion = page_region
PmScanArg = pm_scan_arg

# --------------------------------------------------------------------------------------------
# backend/features.py: the bpf(2) probe (include/uapi/linux/bpf.h)
# --------------------------------------------------------------------------------------------
SYS_bpf = 321
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SOCKET_FILTER = 1


class bpf_attr_prog_load(ctypes.Structure):
    """The head of union bpf_attr as BPF_PROG_LOAD reads it (the kernel zero-fills the rest)."""
    _fields_ = [("prog_type", c_u32), ("insn_cnt", c_u32), ("insns", c_u64), ("license", c_u64),
                ("log_level", c_u32), ("log_size", c_u32), ("log_buf", c_u64),
                ("kern_version", c_u32), ("prog_flags", c_u32)]


# "r0 = 0; exit": BPF_ALU64|BPF_MOV|BPF_K (0xb7) dst r0 imm 0, then BPF_JMP|BPF_EXIT (0x95)
BPF_PROG_RETURN_ZERO = bytes.fromhex("b700000000000000" "9500000000000000")
BPF_INSN_SIZE = 8

# --------------------------------------------------------------------------------------------
# backend/snapshot.py: copying a pipe's buffer without consuming it, securebits
# --------------------------------------------------------------------------------------------
SYS_tee = 276
SPLICE_F_NONBLOCK = 0x02
PR_GET_SECUREBITS = 27
KERNEL_SIGACTION_SIZE = 32   # struct kernel_sigaction on x86-64: handler, flags, restorer, mask
STACK_T_SIZE = 24            # stack_t: ss_sp, ss_flags (int, padded), ss_size

# --------------------------------------------------------------------------------------------
# backend/sockets.py: AF_UNIX sockets through NETLINK_SOCK_DIAG (include/uapi/linux/netlink.h,
# sock_diag.h, unix_diag.h), SO_PEEK_OFF, the unix socket states (include/net/tcp_states.h)
# --------------------------------------------------------------------------------------------
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300          # NLM_F_ROOT | NLM_F_MATCH
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_ALIGNTO = 4
NLA_ALIGNTO = 4


class nlmsghdr(ctypes.Structure):
    _fields_ = [("nlmsg_len", c_u32), ("nlmsg_type", c_u16), ("nlmsg_flags", c_u16),
                ("nlmsg_seq", c_u32), ("nlmsg_pid", c_u32)]


class nlattr(ctypes.Structure):
    _fields_ = [("nla_len", c_u16), ("nla_type", c_u16)]


class unix_diag_req(ctypes.Structure):
    _fields_ = [("sdiag_family", c_u8), ("sdiag_protocol", c_u8), ("pad", c_u16),
                ("udiag_states", c_u32), ("udiag_ino", c_u32), ("udiag_show", c_u32),
                ("udiag_cookie", c_u32 * 2)]


class unix_diag_msg(ctypes.Structure):
    _fields_ = [("udiag_family", c_u8), ("udiag_type", c_u8), ("udiag_state", c_u8),
                ("pad", c_u8), ("udiag_ino", c_u32), ("udiag_cookie", c_u32 * 2)]


class unix_diag_vfs(ctypes.Structure):
    _fields_ = [("udiag_vfs_ino", c_u32), ("udiag_vfs_dev", c_u32)]   # dev: kernel MKDEV(ma, mi)


class unix_diag_rqlen(ctypes.Structure):
    _fields_ = [("udiag_rqueue", c_u32), ("udiag_wqueue", c_u32)]


assert ctypes.sizeof(nlmsghdr) == 16 and ctypes.sizeof(unix_diag_req) == 24
assert ctypes.sizeof(unix_diag_msg) == 16

UDIAG_SHOW_NAME = 0x01
UDIAG_SHOW_VFS = 0x02
UDIAG_SHOW_PEER = 0x04
UDIAG_SHOW_ICONS = 0x08
UDIAG_SHOW_RQLEN = 0x10
UDIAG_SHOW_MEMINFO = 0x20
UDIAG_SHOW_UID = 0x40

UNIX_DIAG_NAME = 0
UNIX_DIAG_VFS = 1
UNIX_DIAG_PEER = 2
UNIX_DIAG_ICONS = 3
UNIX_DIAG_RQLEN = 4
UNIX_DIAG_MEMINFO = 5
UNIX_DIAG_SHUTDOWN = 6
UNIX_DIAG_UID = 7

SK_MEMINFO_RMEM_ALLOC = 0
SK_MEMINFO_RCVBUF = 1
SK_MEMINFO_WMEM_ALLOC = 2
SK_MEMINFO_SNDBUF = 3

TCP_ESTABLISHED = 1
TCP_CLOSE = 7
TCP_LISTEN = 10

SO_PEEK_OFF = 42
KDEV_MINORBITS = 20          # the kernel's dev_t (s_dev, udiag_vfs_dev): major << 20 | minor

# --------------------------------------------------------------------------------------------
# backend/restore: syscalls injected into restored tasks, recvmsg with SCM_RIGHTS, mmap flags
# --------------------------------------------------------------------------------------------
SYS_lseek = 8
SYS_sendmsg = 46
SYS_recvmsg = 47
SYS_setsid = 112
SYS_setpgid = 109
SYS_setresuid = 117
SYS_setresgid = 119
SYS_setgroups = 116
SYS_capset = 126
SYS_fchdir = 81
SYS_chroot = 161
SYS_dup3 = 292
SYS_openat = 257

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_GROWSDOWN, MAP_NORESERVE, MAP_FIXED_NOREPLACE = 0x100, 0x4000, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_POPULATE_READ = 22                  # Linux 5.14
TASK_SIZE_X86_64 = (1 << 47) - 4096      # the highest user address + 1 (4-level paging)
O_CLOEXEC = 0o2000000
F_GETFL, F_SETFL, F_SETFD, F_SETPIPE_SZ = 3, 4, 2, 1031
FD_CLOEXEC = 1
SOL_SOCKET = 1
SCM_RIGHTS = 1


class msghdr(ctypes.Structure):
    _fields_ = [("msg_name", c_u64), ("msg_namelen", c_u32), ("pad0", c_u32),
                ("msg_iov", c_u64), ("msg_iovlen", c_u64), ("msg_control", c_u64),
                ("msg_controllen", c_u64), ("msg_flags", c_u32), ("pad1", c_u32)]


assert ctypes.sizeof(msghdr) == 56
CMSG_HDR_SIZE = 16           # struct cmsghdr: cmsg_len (size_t), cmsg_level, cmsg_type (int)


class user_cap_header(ctypes.Structure):
    _fields_ = [("version", c_u32), ("pid", ctypes.c_int32)]


class user_cap_data(ctypes.Structure):
    _fields_ = [("effective", c_u32), ("permitted", c_u32), ("inheritable", c_u32)]


LINUX_CAPABILITY_VERSION_3 = 0x20080522

# --------------------------------------------------------------------------------------------
# Yama ptrace permission (include/uapi/linux/prctl.h; Documentation/admin-guide/LSM/Yama.rst):
# a self-checkpoint lets its helper (not its ancestor) trace it
# --------------------------------------------------------------------------------------------
PR_SET_PTRACER = 0x59616D61
PR_SET_PTRACER_NONE = 0
PR_SET_PTRACER_ANY = (1 << 64) - 1
YAMA_PTRACE_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"

# --------------------------------------------------------------------------------------------
# backend/restore: restartable sequences (include/uapi/linux/ptrace.h, linux/rseq.h)
# --------------------------------------------------------------------------------------------
RSEQ_FLAG_UNREGISTER = 1


class ptrace_rseq_configuration(ctypes.Structure):
    _fields_ = [("rseq_abi_pointer", c_u64), ("rseq_abi_size", c_u32), ("signature", c_u32),
                ("flags", c_u32), ("pad", c_u32)]


assert ctypes.sizeof(ptrace_rseq_configuration) == 24

# --------------------------------------------------------------------------------------------
# backend/restore: credentials and the rest of what task.py and files.py set
# (include/uapi/linux/capability.h, securebits.h, prctl.h)
# --------------------------------------------------------------------------------------------
SYS_umask = 95
SYS_unshare = 272                          # with CLONE_FS: a thread's own cwd (sockets.py)
SYS_setns = 308                            # back to its own pid namespace after a CLONE_NEWPID fork (interp_tasks.py)
CAP_SETGID, CAP_SETUID = 6, 7
CAP_LAST_CAP = 40
SECBIT_KEEP_CAPS = 1 << 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
UNBLOCKABLE_SIGNALS = {9, 19}              # SIGKILL, SIGSTOP: never caught, blocked or ignored

# --------------------------------------------------------------------------------------------
# BTF (include/uapi/linux/btf.h), read by backend/unix_embryo_btf.py for struct offsets
# --------------------------------------------------------------------------------------------
import struct as _struct  # noqa: E402 - this section's own import

BTF_MAGIC = 0xEB9F
BTF_HEADER = _struct.Struct("<HBBIIIII")   # magic, version, flags, hdr_len, type/str off+len
BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_ARRAY, BTF_KIND_STRUCT, BTF_KIND_UNION = 1, 2, 3, 4, 5
BTF_KIND_ENUM, BTF_KIND_FWD, BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST = 6, 7, 8, 9, 10
BTF_KIND_RESTRICT, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO, BTF_KIND_VAR = 11, 12, 13, 14
BTF_KIND_DATASEC, BTF_KIND_FLOAT, BTF_KIND_DECL_TAG, BTF_KIND_TYPE_TAG = 15, 16, 17, 18
BTF_KIND_ENUM64 = 19
BTF_KIND_MODIFIERS = frozenset({BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST,
                                BTF_KIND_RESTRICT, BTF_KIND_TYPE_TAG})
# bytes after struct btf_type (12 bytes): (fixed, per vlen entry)
BTF_TRAILER = {BTF_KIND_INT: (4, 0), BTF_KIND_ARRAY: (12, 0), BTF_KIND_STRUCT: (0, 12),
               BTF_KIND_UNION: (0, 12), BTF_KIND_ENUM: (0, 8), BTF_KIND_FUNC_PROTO: (0, 8),
               BTF_KIND_VAR: (4, 0), BTF_KIND_DATASEC: (0, 12), BTF_KIND_DECL_TAG: (4, 0),
               BTF_KIND_ENUM64: (0, 12)}

# --------------------------------------------------------------------------------------------
# backend/unix_embryo_prog.py: loading a cached BPF iterator with raw bpf(2), without bcc
# (include/uapi/linux/bpf.h; SYS_bpf and BPF_PROG_LOAD are in the features.py section above)
# --------------------------------------------------------------------------------------------
BPF_MAP_CREATE = 0
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_LINK_CREATE = 28
BPF_ITER_CREATE = 33
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_ITER = 28                  # enum bpf_attach_type
BPF_ANY = 0                          # map update flags
BPF_OBJ_NAME_LEN = 16
BPF_LOG_LEVEL_1 = 1
BPF_INSN = _struct.Struct("<BBhi")   # struct bpf_insn: code, dst_reg:4|src_reg:4, off, imm
BPF_LD_IMM64 = 0x18                  # BPF_LD|BPF_IMM|BPF_DW: two instruction slots
BPF_PSEUDO_MAP_FD = 1                # ld_imm64 src_reg: imm is a map fd


class bpf_attr_map_create(ctypes.Structure):
    _fields_ = [("map_type", c_u32), ("key_size", c_u32), ("value_size", c_u32),
                ("max_entries", c_u32), ("map_flags", c_u32), ("inner_map_fd", c_u32),
                ("numa_node", c_u32), ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN)]


class bpf_attr_map_elem(ctypes.Structure):
    """BPF_MAP_*_ELEM and BPF_MAP_GET_NEXT_KEY (``value`` is ``next_key`` for the latter)."""
    _fields_ = [("map_fd", c_u32), ("pad", c_u32), ("key", c_u64), ("value", c_u64),
                ("flags", c_u64)]


class bpf_attr_prog_load_btf(ctypes.Structure):
    """BPF_PROG_LOAD up to the attach target fields (tracing programs need them)."""
    _fields_ = [("prog_type", c_u32), ("insn_cnt", c_u32), ("insns", c_u64), ("license", c_u64),
                ("log_level", c_u32), ("log_size", c_u32), ("log_buf", c_u64),
                ("kern_version", c_u32), ("prog_flags", c_u32),
                ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN), ("prog_ifindex", c_u32),
                ("expected_attach_type", c_u32), ("prog_btf_fd", c_u32),
                ("func_info_rec_size", c_u32), ("func_info", c_u64), ("func_info_cnt", c_u32),
                ("line_info_rec_size", c_u32), ("line_info", c_u64), ("line_info_cnt", c_u32),
                ("attach_btf_id", c_u32), ("attach_prog_fd", c_u32), ("core_relo_cnt", c_u32)]


class bpf_attr_link_create(ctypes.Structure):
    _fields_ = [("prog_fd", c_u32), ("target_fd", c_u32), ("attach_type", c_u32),
                ("flags", c_u32), ("iter_info", c_u64), ("iter_info_len", c_u32),
                ("pad", c_u32)]


class bpf_attr_iter_create(ctypes.Structure):
    _fields_ = [("link_fd", c_u32), ("flags", c_u32)]


assert ctypes.sizeof(bpf_attr_map_create) == 44 and bpf_attr_map_create.map_name.offset == 28
assert ctypes.sizeof(bpf_attr_map_elem) == 32
assert ctypes.sizeof(bpf_attr_prog_load_btf) == 120
assert bpf_attr_prog_load_btf.attach_btf_id.offset == 108
assert bpf_attr_prog_load_btf.expected_attach_type.offset == 68
assert ctypes.sizeof(bpf_attr_link_create) == 32 and bpf_attr_link_create.iter_info.offset == 16
assert ctypes.sizeof(bpf_attr_iter_create) == 8 and BPF_INSN.size == 8

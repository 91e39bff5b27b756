"""ptrace(2): requests, options and events, PTRACE_GET_SYSCALL_INFO, the register sets
(user_regs_struct, the FXSAVE image, NT_* regset notes), wait() flags, arch_prctl codes, Yama's
ptrace permission and PTRACE_GET_RSEQ_CONFIGURATION."""

from __future__ import annotations

import ctypes

from .syscalls import c_s32, c_u8, c_u16, c_u32, c_u64

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


class peeksiginfo_args(ctypes.Structure):
    _fields_ = [("off", c_u64), ("flags", c_u32), ("nr", c_s32)]


class ptrace_syscall_info(ctypes.Structure):
    """struct ptrace_syscall_info (PTRACE_GET_SYSCALL_INFO); the union is left as raw u64s:
    entry = nr, args[6]; exit = rval (s64), is_error (u8); seccomp = nr, args[6], ret_data."""
    _fields_ = [("op", c_u8), ("pad", c_u8 * 3), ("arch", c_u32),
                ("instruction_pointer", c_u64), ("stack_pointer", c_u64), ("data", c_u64 * 8)]


AUDIT_ARCH_X86_64 = 0xC000003E

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


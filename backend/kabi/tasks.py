"""Tasks: clone3 flags (namespaces included) and struct clone_args, kcmp, prctl (PR_SET_MM
and struct prctl_mm_map among them), and credentials (capget/capset, capabilities,
securebits)."""

from __future__ import annotations

import ctypes

from .syscalls import c_u32, c_u64

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
# prctl (include/uapi/linux/prctl.h)
# --------------------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_GET_NAME = 16
PR_GET_SECCOMP = 21
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
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
# Credentials: what backend/restore's task.py and files.py set
# (include/uapi/linux/capability.h, securebits.h; their prctl codes are in the list above)
# --------------------------------------------------------------------------------------------


class user_cap_header(ctypes.Structure):
    _fields_ = [("version", c_u32), ("pid", ctypes.c_int32)]


class user_cap_data(ctypes.Structure):
    _fields_ = [("effective", c_u32), ("permitted", c_u32), ("inheritable", c_u32)]


LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_SETGID, CAP_SETUID = 6, 7
CAP_LAST_CAP = 40
SECBIT_KEEP_CAPS = 1 << 4

"""The interpreter's primitives (backend/interp.py): libc calls by name with ``-errno`` results,
its own memory through process_vm_readv/writev, and the kernel structs its ops pass.

Calls go through libc by name so file descriptors get exactly the flags the program asks for
(Python's own os.open, os.pipe, socket.accept... would add O_CLOEXEC).
"""
from __future__ import annotations

import ctypes
import os

U64 = (1 << 64) - 1
STATUS_REG = 15
NR_REGS = 64
EXIT_UNSUPPORTED = 125
EXIT_ERROR = 126
SIG_DFL, SIG_IGN = 0, 1

_libc = ctypes.CDLL(None, use_errno=True)

# libc functions by name: (restype, result is an address/ssize_t (64-bit) or an int)
_L, _I, _P = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
_FUNCS = {
    "open": _I, "close": _I, "read": _L, "write": _L, "pread64": _L, "pwrite64": _L,
    "lseek64": _L, "dup": _I, "dup2": _I, "dup3": _I, "fcntl": _I, "pipe2": _I, "mkfifo": _I,
    "mkdir": _I, "unlink": _I, "chdir": _I, "ftruncate64": _I, "umask": _I,
    "mmap64": _P, "munmap": _I, "mprotect": _I, "mremap": _P, "madvise": _I,
    "socket": _I, "socketpair": _I, "bind": _I, "listen": _I, "connect": _I, "accept4": _I,
    "send": _L, "recv": _L, "sendto": _L, "shutdown": _I,
    "kill": _I, "tgkill": _I, "sigqueue": _I,
    "setsid": _I, "setpgid": _I, "getpid": _I, "getppid": _I, "getpgid": _I, "getsid": _I,
    "gettid": _I, "wait4": _I, "getuid": _I, "geteuid": _I, "getgid": _I, "getegid": _I,
    "setuid": _I, "setgid": _I, "setresuid": _I, "setresgid": _I, "setgroups": _I,
    "setrlimit": _I, "prctl": _I, "capset": _I, "sigaltstack": _I, "syscall": _L,
    "process_vm_readv": _L, "process_vm_writev": _L,
}


def libc_fn(name):
    f = getattr(_libc, name)
    f.restype = _FUNCS[name]
    return f


class Unsupported(Exception):
    """An op the interpreter cannot do faithfully."""


def s64(v: int) -> int:
    v &= U64
    return v - (1 << 64) if v >> 63 else v


def c_args(*vals):
    out = []
    for v in vals:
        if isinstance(v, int):
            out.append(ctypes.c_long(s64(v)))
        elif isinstance(v, str):
            out.append(v.encode("utf-8", "surrogateescape"))
        else:
            out.append(v)
    return out


def libc_call(name, *vals) -> int:
    """A libc call: its result, or -errno when it failed (result -1 / MAP_FAILED)."""
    ctypes.set_errno(0)
    res = libc_fn(name)(*c_args(*vals))
    if res is None:
        res = 0
    if _FUNCS[name] is _P:
        res = res & U64
        if res == U64:
            return -ctypes.get_errno()
        return res
    if res == -1:
        return -ctypes.get_errno()
    return res


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def mem_read(addr: int, n: int) -> bytes:
    """n bytes of this process's memory at addr; OSError(EFAULT) when it cannot be read."""
    if n == 0:
        return b""
    buf = ctypes.create_string_buffer(n)
    local, remote = Iovec(ctypes.addressof(buf), n), Iovec(addr & U64, n)
    got = libc_call("process_vm_readv", os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got < 0:
        raise OSError(-got, os.strerror(-got))
    if got != n:
        raise OSError(14, "short read")
    return buf.raw


def mem_write(addr: int, data: bytes) -> None:
    if not data:
        return
    buf = ctypes.create_string_buffer(data, len(data))
    local, remote = Iovec(ctypes.addressof(buf), len(data)), Iovec(addr & U64, len(data))
    got = libc_call("process_vm_writev", os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got < 0:
        raise OSError(-got, os.strerror(-got))
    if got != len(data):
        raise OSError(14, "short write")


def sockaddr_un(name: str) -> tuple[ctypes.Array, int]:
    raw = name.encode("utf-8", "surrogateescape")
    buf = ctypes.create_string_buffer(2 + 108)
    ctypes.memmove(buf, (1).to_bytes(2, "little") + raw, 2 + len(raw))
    # an abstract name (leading NUL) is exactly its bytes; a path name ends with its NUL
    return buf, 2 + len(raw) + (0 if raw.startswith(b"\0") else 1)


class StackT(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


class KSigaction(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_ulong), ("flags", ctypes.c_ulong),
                ("restorer", ctypes.c_ulong), ("mask", ctypes.c_ulong)]


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]

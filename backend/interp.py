"""Run a scenario program (the JSON op list of ckptsim/model/program.py) as a REAL process.

    python3 -m backend.interp PROGRAM.json CONTROL_DIR
    run_program(ops, control_dir)          # the same, in the calling process (never returns)

The conformance suite's live backend (conformance/backends/live.py) starts this as the init
of a new pid namespace. Every operation is done with the real system call (through libc by
name, so file descriptors get exactly the flags the program asks for: Python's own os.open,
os.pipe, socket.accept... would add O_CLOEXEC); a failing call puts ``-errno`` (as an
unsigned 64-bit value) in the output register, as the model does. Memory is the process's
own: ``mmap`` maps at the addresses the program gives, ``store``/``check_mem``/``emit_mem``
go through process_vm_writev/readv on the process itself, so a bad address gives EFAULT (a
failed check) instead of a crash.

Talking to the backend happens through CONTROL_DIR, never through an inherited descriptor
(a descriptor shared with the backend would be a leak for a container checkpoint, and would
show in the tree's fd tables):
- ``report``: each report is one JSON line appended (open, write, close):
  ``{"kind": "FAIL", "pid", "label", "got", "want"}`` for a failed check, ``{"kind": "emit",
  "pid", "values"}``, ``{"kind": "point", "pid"}`` when a task reaches its checkpoint point,
  ``{"kind": "unsupported", "pid", "op", "reason"}`` (the task then exits with status 125),
  ``{"kind": "error", "pid", "message"}`` for an interpreter failure (exit status 126);
- ``release``: a FIFO. A task at its point blocks opening it for reading until the backend
  opens it for writing (and keeps it open: a later point passes at once).

The interpreter starts with no descriptors open (as the model's container init) and every
signal at its default disposition (Python ignores SIGPIPE and SIGXFSZ and catches SIGINT).

Not done (the task reports "unsupported op NAME: reason" and exits 125): ``sigaction`` with a
handler address (handlers are addresses in the model's program, there is no code there),
``fork`` with clone flags (CLONE_THREAD/CLONE_VM need a second interpreter thread sharing
this one's state; CLONE_NEWPID would change where every later child goes), ``brk`` (the
interpreter's malloc owns the heap), the model's ``checkpoint`` op (self-checkpoint), cgroup
operations, and any op not listed in OPS.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

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
    "mmap64": _P, "munmap": _I, "mprotect": _I, "mremap": _P,
    "socket": _I, "socketpair": _I, "bind": _I, "listen": _I, "connect": _I, "accept4": _I,
    "send": _L, "recv": _L, "sendto": _L, "shutdown": _I,
    "kill": _I, "tgkill": _I, "sigqueue": _I,
    "setsid": _I, "setpgid": _I, "getpid": _I, "getppid": _I, "getpgid": _I, "getsid": _I,
    "gettid": _I, "wait4": _I, "getuid": _I, "geteuid": _I, "getgid": _I, "getegid": _I,
    "setuid": _I, "setgid": _I, "setresuid": _I, "setresgid": _I, "setgroups": _I,
    "setrlimit": _I, "prctl": _I, "capset": _I, "sigaltstack": _I, "syscall": _L,
    "process_vm_readv": _L, "process_vm_writev": _L,
}


def _fn(name):
    f = getattr(_libc, name)
    f.restype = _FUNCS[name]
    return f


class Unsupported(Exception):
    """An op the interpreter cannot do faithfully."""


def _s64(v: int) -> int:
    v &= U64
    return v - (1 << 64) if v >> 63 else v


def _args(*vals):
    out = []
    for v in vals:
        if isinstance(v, int):
            out.append(ctypes.c_long(_s64(v)))
        elif isinstance(v, str):
            out.append(v.encode("utf-8", "surrogateescape"))
        else:
            out.append(v)
    return out


def _call(name, *vals) -> int:
    """A libc call: its result, or -errno when it failed (result -1 / MAP_FAILED)."""
    ctypes.set_errno(0)
    res = _fn(name)(*_args(*vals))
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


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def mem_read(addr: int, n: int) -> bytes:
    """n bytes of this process's memory at addr; OSError(EFAULT) when it cannot be read."""
    if n == 0:
        return b""
    buf = ctypes.create_string_buffer(n)
    local, remote = _Iovec(ctypes.addressof(buf), n), _Iovec(addr & U64, n)
    got = _call("process_vm_readv", os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got < 0:
        raise OSError(-got, os.strerror(-got))
    if got != n:
        raise OSError(14, "short read")
    return buf.raw


def mem_write(addr: int, data: bytes) -> None:
    if not data:
        return
    buf = ctypes.create_string_buffer(data, len(data))
    local, remote = _Iovec(ctypes.addressof(buf), len(data)), _Iovec(addr & U64, len(data))
    got = _call("process_vm_writev", os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got < 0:
        raise OSError(-got, os.strerror(-got))
    if got != len(data):
        raise OSError(14, "short write")


def _sockaddr_un(name: str) -> tuple[ctypes.Array, int]:
    raw = name.encode("utf-8", "surrogateescape")
    buf = ctypes.create_string_buffer(2 + 108)
    ctypes.memmove(buf, (1).to_bytes(2, "little") + raw, 2 + len(raw))
    # an abstract name (leading NUL) is exactly its bytes; a path name ends with its NUL
    return buf, 2 + len(raw) + (0 if raw.startswith(b"\0") else 1)


class _Stack(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


class _KSigaction(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_ulong), ("flags", ctypes.c_ulong),
                ("restorer", ctypes.c_ulong), ("mask", ctypes.c_ulong)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_COMPARE = {"==": int.__eq__, "!=": int.__ne__, "<": int.__lt__, "<=": int.__le__,
            ">": int.__gt__, ">=": int.__ge__}


def _json_value(v):
    if isinstance(v, bytes):
        return v.decode("latin-1")
    return v


class Interp:
    def __init__(self, ops: list, control_dir: str):
        self.ops = ops
        self.regs = [0] * NR_REGS
        self.pc = 0
        self.report_path = os.path.join(control_dir, "report")
        self.release_path = os.path.join(control_dir, "release")

    # -- reports ----------------------------------------------------------------------------
    def report(self, kind: str, **fields) -> None:
        line = json.dumps({"kind": kind, "pid": os.getpid(), **fields}, default=repr) + "\n"
        fd = os.open(self.report_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    # -- the loop ---------------------------------------------------------------------------
    def arg(self, v):
        if isinstance(v, str) and v.startswith("$r"):
            return self.regs[int(v[2:])]
        return v

    def run(self):
        while self.pc < len(self.ops):
            out, name, *raw = self.ops[self.pc]
            args = [self.arg(a) for a in raw]
            try:
                result = self.dispatch(out, name, args)
            except OSError as e:
                result = -(e.errno or 5)
            if name == "jnz" and result is not None:
                self.pc = result
                continue
            if out is not None and result is not None:
                self.regs[out] = result & U64
            self.pc += 1
        os._exit(0)

    def dispatch(self, out, name, args):
        method = getattr(self, "op_" + name, None)
        if method is None:
            raise Unsupported(f"unsupported op {name}: the live interpreter does not run it")
        return method(out, *args)

    # -- pseudo-operations --------------------------------------------------------------------
    def op_emit(self, out, *values):
        self.report("emit", values=[_json_value(v) for v in values])

    def op_emit_mem(self, out, addr, n):
        self.report("emit", values=[_json_value(mem_read(addr, n))])

    def op_check(self, out, a, cmp, b, label):
        if not _COMPARE[cmp](a & U64, b & U64):
            self.report("FAIL", label=label, got=a, want=f"{cmp} {b}")

    def op_check_mem(self, out, addr, text, label):
        want = text.encode()
        try:
            got = mem_read(addr, len(want))
        except OSError as e:
            got = f"fault: errno {e.errno}"
        if got != want:
            self.report("FAIL", label=label, got=_json_value(got), want=text)

    def op_ckpt_point(self, out):
        self.report("point")
        fd = os.open(self.release_path, os.O_RDONLY | os.O_CLOEXEC)  # blocks until released
        os.close(fd)

    def op_store(self, out, addr, text):
        mem_write(addr, text.encode())

    def op_set(self, out, reg, value):
        self.regs[reg] = value & U64

    def op_add(self, out, reg, value):
        self.regs[reg] = (self.regs[reg] + value) & U64

    def op_jnz(self, out, reg, target):
        return target if self.regs[reg] else None

    # -- files ------------------------------------------------------------------------------
    def op_open(self, out, path, flags, mode=0o644):
        return _call("open", path, flags, mode)

    def op_close(self, out, fd):
        return _call("close", fd)

    def op_read(self, out, fd, addr, n):
        return _call("read", fd, addr, n)

    def op_write(self, out, fd, addr, n):
        return _call("write", fd, addr, n)

    def op_pread(self, out, fd, addr, n, off):
        return _call("pread64", fd, addr, n, off)

    def op_pwrite(self, out, fd, addr, n, off):
        return _call("pwrite64", fd, addr, n, off)

    def op_lseek(self, out, fd, off, whence):
        return _call("lseek64", fd, off, whence)

    def op_dup(self, out, fd):
        return _call("dup", fd)

    def op_dup2(self, out, old, new):
        return _call("dup2", old, new)

    def op_dup3(self, out, old, new, flags):
        return _call("dup3", old, new, flags)

    def op_fcntl(self, out, fd, cmd, arg=0):
        return _call("fcntl", fd, cmd, arg)

    def _pair(self, fn, out, reg2, *vals):
        fds = (ctypes.c_int * 2)()
        res = _call(fn, fds, *vals) if fn == "pipe2" else _call(fn, *vals, fds)
        if res < 0:
            return res
        self.regs[reg2] = fds[1]
        return fds[0]

    def op_pipe(self, out, reg2):
        return self._pair("pipe2", out, reg2, 0)

    def op_pipe2(self, out, flags, reg2):
        return self._pair("pipe2", out, reg2, flags)

    def op_mkfifo(self, out, path, mode=0o666):
        return _call("mkfifo", path, mode)

    def op_mkdir(self, out, path, mode=0o777):
        return _call("mkdir", path, mode)

    def op_unlink(self, out, path):
        return _call("unlink", path)

    def op_chdir(self, out, path):
        return _call("chdir", path)

    def op_ftruncate(self, out, fd, length):
        return _call("ftruncate64", fd, length)

    def op_umask(self, out, mask):
        return _call("umask", mask)

    # -- memory -----------------------------------------------------------------------------
    def op_mmap(self, out, addr, length, prot, flags, fd=-1, off=0):
        return _call("mmap64", addr, length, prot, flags, fd, off)

    def op_munmap(self, out, addr, length):
        return _call("munmap", addr, length)

    def op_mprotect(self, out, addr, length, prot):
        return _call("mprotect", addr, length, prot)

    def op_mremap(self, out, old, old_len, new_len, flags, new_addr=0):
        return _call("mremap", old, old_len, new_len, flags, new_addr)

    def op_brk(self, out, *args):
        raise Unsupported("unsupported op brk: the interpreter's malloc owns the program break")

    # -- sockets (AF_UNIX) ------------------------------------------------------------------
    def op_socket(self, out, family, sock_type, protocol=0):
        return _call("socket", family, sock_type, protocol)

    def op_socketpair(self, out, sock_type, *rest):
        reg2 = rest[-1]
        protocol = rest[0] if len(rest) > 1 else 0
        return self._pair("socketpair", out, reg2, 1, sock_type, protocol)

    def op_bind(self, out, fd, name):
        buf, n = _sockaddr_un(name)
        return _call("bind", fd, buf, n)

    def op_connect(self, out, fd, name):
        buf, n = _sockaddr_un(name)
        return _call("connect", fd, buf, n)

    def op_listen(self, out, fd, backlog):
        return _call("listen", fd, backlog)

    def op_accept(self, out, fd, flags=0):
        return _call("accept4", fd, None, None, flags)

    def op_send(self, out, fd, addr, n, flags=0):
        return _call("send", fd, addr, n, flags)

    def op_recv(self, out, fd, addr, n, flags=0):
        return _call("recv", fd, addr, n, flags)

    def op_sendto(self, out, fd, addr, n, name, flags=0):
        buf, alen = _sockaddr_un(name)
        return _call("sendto", fd, addr, n, flags, buf, alen)

    def op_shutdown(self, out, fd, how):
        return _call("shutdown", fd, how)

    def _sock(self, fd):
        import socket
        return socket.socket(fileno=fd)

    def op_sendmsg(self, out, fd, addr, n, fds=(), flags=0, name=None):
        import array
        import socket
        data = mem_read(addr, n)
        fds = [self.arg(f) for f in fds]
        s = self._sock(fd)
        try:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            dest = (name.encode("utf-8", "surrogateescape"),) if name else ()
            return s.sendmsg([data], anc, flags, *dest)
        finally:
            s.detach()

    def op_recvmsg(self, out, fd, n, flags=0):
        import socket
        s = self._sock(fd)
        try:
            data, anc, _flags, _addr = s.recvmsg(n, socket.CMSG_SPACE(64 * 4), flags)
        finally:
            s.detach()
        return None  # as the model: the bytes are dropped, the fds are installed

    # -- signals ----------------------------------------------------------------------------
    def op_sigaction(self, out, sig, handler=None, flags=0, mask=0, restorer=0):
        if handler is not None and handler not in (SIG_DFL, SIG_IGN):
            raise Unsupported(f"unsupported op sigaction: handler {handler:#x} is an address in the "
                              f"model's program; the live interpreter has no code there")
        new = None
        if handler is not None:
            new = _KSigaction(handler, flags & 0xFFFFFFFF & ~0x04000000, 0, mask & U64)
        old = _KSigaction()
        from . import kabi
        res = _call("syscall", kabi.SYS_rt_sigaction, sig, ctypes.byref(new) if new else None,
                    ctypes.byref(old), 8)
        return res if res < 0 else None

    def op_sigprocmask(self, out, how, mask=None):
        from . import kabi
        new = ctypes.c_uint64(mask & U64) if mask is not None else None
        old = ctypes.c_uint64()
        res = _call("syscall", kabi.SYS_rt_sigprocmask, how, ctypes.byref(new) if new is not None else None,
                    ctypes.byref(old), 8)
        return res if res < 0 else old.value

    def op_sigpending(self, out):
        from . import kabi
        got = ctypes.c_uint64()
        res = _call("syscall", kabi.SYS_rt_sigpending, ctypes.byref(got), 8)
        return res if res < 0 else got.value

    def op_sigaltstack(self, out, ss=None):
        new = _Stack(ss[0], ss[2], ss[1]) if ss is not None else None
        old = _Stack()
        res = _call("sigaltstack", ctypes.byref(new) if new else None, ctypes.byref(old))
        return res if res < 0 else None

    def op_kill(self, out, pid, sig):
        return _call("kill", pid, sig)

    def op_tgkill(self, out, tgid, tid, sig):
        return _call("tgkill", tgid, tid, sig)

    def op_sigqueue(self, out, pid, sig, value):
        return _call("sigqueue", pid, sig, ctypes.c_void_p(value & U64))

    def op_setrlimit(self, out, resource, cur, maximum):
        lim = (ctypes.c_uint64 * 2)(cur & U64, maximum & U64)
        return _call("setrlimit", resource, lim)

    # -- tasks ------------------------------------------------------------------------------
    def op_fork(self, out, flags=0, *rest):
        if flags not in (0, signal.SIGCHLD) or rest:
            raise Unsupported(f"unsupported op fork: clone flags {flags:#x} (threads, CLONE_VM and "
                              f"new pid namespaces are not run by the live interpreter)")
        pid = os.fork()
        if pid == 0 and out is not None:
            self.regs[out] = 0
        return pid if pid else None

    def op_wait4(self, out, pid=-1, options=0):
        status = ctypes.c_int()
        res = _call("wait4", pid, ctypes.byref(status), options, None)
        self.regs[STATUS_REG] = status.value & U64 if res > 0 else 0
        return res

    def op_exit_group(self, out, code=0):
        os._exit(code & 0xFF)

    op_exit = op_exit_group  # the interpreter is single-threaded: its only thread ends it all

    def _simple(name):
        def op(self, out, *args):
            return _call(name, *args)
        return op

    for _n in ("setsid", "setpgid", "getpid", "getppid", "getpgid", "getsid", "gettid", "getuid",
               "geteuid", "getgid", "getegid", "setuid", "setgid", "setresuid", "setresgid"):
        locals()["op_" + _n] = _simple(_n)
    del _n

    def op_setgroups(self, out, groups):
        arr = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
        return _call("setgroups", len(groups), arr)

    def op_capset(self, out, effective, permitted, inheritable):
        hdr = _CapHeader(0x20080522, 0)
        data = (_CapData * 2)(_CapData(effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF),
                              _CapData(effective >> 32, permitted >> 32, inheritable >> 32))
        return _call("capset", ctypes.byref(hdr), data)

    def op_set_keepcaps(self, out, keep):
        return _call("prctl", 8, keep, 0, 0, 0)  # PR_SET_KEEPCAPS

    def op_checkpoint(self, out, *args):
        raise Unsupported("unsupported op checkpoint: a self-checkpoint is the model's op; a live "
                          "process has no checkpoint(2)")


UNSUPPORTED_ALWAYS = {"brk": "the interpreter's malloc owns the program break",
                      "checkpoint": "a self-checkpoint is the model's op; a live process has no checkpoint(2)"}


def unsupported_op(op) -> str | None:
    """Why the interpreter cannot run ``op`` (decided from the op alone), or None."""
    out, name, *args = op
    if name in UNSUPPORTED_ALWAYS:
        return f"unsupported op {name}: {UNSUPPORTED_ALWAYS[name]}"
    if not hasattr(Interp, "op_" + name):
        return f"unsupported op {name}: the live interpreter does not run it"
    if name == "sigaction" and len(args) > 1 and args[1] not in (SIG_DFL, SIG_IGN):
        return "unsupported op sigaction: a handler address (no code at the model's addresses)"
    if name == "fork" and args and args[0] not in (0, signal.SIGCHLD):
        return f"unsupported op fork: clone flags {args[0]:#x} (threads, CLONE_VM, new pid namespaces)"
    return None


def _reset_process() -> None:
    """Start as the model's container init: no descriptors, default signal dispositions."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    os.closerange(0, 1 << 16)


def run_program(ops: list, control_dir: str):
    """Run ``ops`` in this process; never returns (exits with the program's status)."""
    it = Interp(ops, control_dir)
    try:
        _reset_process()
        it.run()
    except Unsupported as e:
        it.report("unsupported", op=it.ops[it.pc][1], reason=str(e))
        os._exit(EXIT_UNSUPPORTED)
    except BaseException as e:  # noqa: BLE001 - anything else is reported, never a traceback
        try:
            it.report("error", message=f"op {it.pc} {it.ops[it.pc] if it.pc < len(it.ops) else ''}: "
                                       f"{type(e).__name__}: {e}")
        finally:
            os._exit(EXIT_ERROR)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python3 -m backend.interp PROGRAM.json CONTROL_DIR", file=sys.stderr)
        sys.exit(2)
    try:
        with open(argv[0], "rb") as f:
            ops = json.load(f)
        if not isinstance(ops, list):
            raise ValueError("a program is a JSON list of operations")
    except (OSError, ValueError) as e:
        print(f"interp: {argv[0]}: {e}", file=sys.stderr)
        sys.exit(2)
    run_program(ops, argv[1])


if __name__ == "__main__":
    main()

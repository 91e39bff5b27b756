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

Signal handlers (real dispositions running a few instructions of machine code, reported as
``{"kind": "signal", ...}``) are in backend/interp_signals.py; threads, exit and brk (the
program owns the break: glibc's malloc is kept off it) in backend/interp_tasks.py.

Not done (the task reports "unsupported op NAME: reason" and exits 125): ``fork`` with clone
flags other than a plain fork, a thread or a new pid namespace's init (CLONE_NEWPID; see
interp_tasks.clone_refusal), cgroup operations, and any op with no ``op_`` method. The model's
``checkpoint`` op is backend.api.checkpoint (a self-checkpoint for pid 0: its helper needs a
/proc of the caller's pid namespace, see backend/api.py).
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

from .interp_libc import (EXIT_ERROR, EXIT_UNSUPPORTED, NR_REGS, U64, CapData, CapHeader,
                          Unsupported, libc_call, mem_read, mem_write, sockaddr_un)
from .interp_signals import PROCESS, SignalOps
from .interp_tasks import BREAK, MALLOC_TUNABLE, TaskOps, clone_refusal

_COMPARE = {"==": int.__eq__, "!=": int.__ne__, "<": int.__lt__, "<=": int.__le__,
            ">": int.__gt__, ">=": int.__ge__}


def _json_value(v):
    if isinstance(v, bytes):
        return v.decode("latin-1")
    return v


class Interp(SignalOps, TaskOps):
    def __init__(self, ops: list, control_dir: str):
        self.ops = ops
        self.regs = [0] * NR_REGS
        self.pc = 0
        self.control_dir = control_dir
        self.report_path = os.path.join(control_dir, "report")
        self.release_path = os.path.join(control_dir, "release")

    def thread_copy(self, out) -> "Interp":
        """The interpreter of a new thread: this one's registers (``out`` = 0), at the next op."""
        child = Interp(self.ops, self.control_dir)
        child.regs = list(self.regs)
        if out is not None:
            child.regs[out] = 0
        child.pc = self.pc + 1
        return child

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
            self.drain_signals()
        self.op_exit_group(None, 0)

    def run_guarded(self):
        """``run``, reporting an unsupported op or an interpreter failure (never returns)."""
        try:
            self.run()
        except Unsupported as e:
            self.report("unsupported", op=self.ops[self.pc][1], reason=str(e))
            os._exit(EXIT_UNSUPPORTED)
        except BaseException as e:  # noqa: BLE001 - anything else is reported, never a traceback
            try:
                where = self.ops[self.pc] if self.pc < len(self.ops) else ""
                self.report("error", message=f"op {self.pc} {where}: {type(e).__name__}: {e}")
            finally:
                os._exit(EXIT_ERROR)

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

    def op_stack_vma(self, out, end_reg):
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip().endswith("[stack]"):
                    start, end = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
                    self.regs[end_reg] = end
                    return start
        return -14   # EFAULT, as the model: no [stack]

    def op_set(self, out, reg, value):
        self.regs[reg] = value & U64

    def op_add(self, out, reg, value):
        self.regs[reg] = (self.regs[reg] + value) & U64

    def op_jnz(self, out, reg, target):
        return target if self.regs[reg] else None

    # -- files ------------------------------------------------------------------------------
    def op_open(self, out, path, flags, mode=0o644):
        return libc_call("open", path, flags, mode)

    def op_close(self, out, fd):
        return libc_call("close", fd)

    def op_read(self, out, fd, addr, n):
        return libc_call("read", fd, addr, n)

    def op_write(self, out, fd, addr, n):
        return libc_call("write", fd, addr, n)

    def op_pread(self, out, fd, addr, n, off):
        return libc_call("pread64", fd, addr, n, off)

    def op_pwrite(self, out, fd, addr, n, off):
        return libc_call("pwrite64", fd, addr, n, off)

    def op_lseek(self, out, fd, off, whence):
        return libc_call("lseek64", fd, off, whence)

    def op_dup(self, out, fd):
        return libc_call("dup", fd)

    def op_dup2(self, out, old, new):
        return libc_call("dup2", old, new)

    def op_dup3(self, out, old, new, flags):
        return libc_call("dup3", old, new, flags)

    def op_fcntl(self, out, fd, cmd, arg=0):
        return libc_call("fcntl", fd, cmd, arg)

    def _pair(self, fn, out, reg2, *vals):
        fds = (ctypes.c_int * 2)()
        res = libc_call(fn, fds, *vals) if fn == "pipe2" else libc_call(fn, *vals, fds)
        if res < 0:
            return res
        self.regs[reg2] = fds[1]
        return fds[0]

    def op_pipe(self, out, reg2):
        return self._pair("pipe2", out, reg2, 0)

    def op_pipe2(self, out, flags, reg2):
        return self._pair("pipe2", out, reg2, flags)

    def op_mkfifo(self, out, path, mode=0o666):
        return libc_call("mkfifo", path, mode)

    def op_mkdir(self, out, path, mode=0o777):
        return libc_call("mkdir", path, mode)

    def op_unlink(self, out, path):
        return libc_call("unlink", path)

    def op_chdir(self, out, path):
        return libc_call("chdir", path)

    def op_ftruncate(self, out, fd, length):
        return libc_call("ftruncate64", fd, length)

    def op_umask(self, out, mask):
        return libc_call("umask", mask)

    # -- memory -----------------------------------------------------------------------------
    def op_mmap(self, out, addr, length, prot, flags, fd=-1, off=0):
        return libc_call("mmap64", addr, length, prot, flags, fd, off)

    def op_munmap(self, out, addr, length):
        return libc_call("munmap", addr, length)

    def op_mprotect(self, out, addr, length, prot):
        return libc_call("mprotect", addr, length, prot)

    def op_mremap(self, out, old, old_len, new_len, flags, new_addr=0):
        return libc_call("mremap", old, old_len, new_len, flags, new_addr)

    def op_madvise(self, out, addr, length, advice):
        return libc_call("madvise", addr, length, advice)

    # -- sockets (AF_UNIX) ------------------------------------------------------------------
    def op_socket(self, out, family, sock_type, protocol=0):
        return libc_call("socket", family, sock_type, protocol)

    def op_socketpair(self, out, sock_type, *rest):
        reg2 = rest[-1]
        protocol = rest[0] if len(rest) > 1 else 0
        return self._pair("socketpair", out, reg2, 1, sock_type, protocol)

    def op_bind(self, out, fd, name):
        buf, n = sockaddr_un(name)
        return libc_call("bind", fd, buf, n)

    def op_connect(self, out, fd, name):
        buf, n = sockaddr_un(name)
        return libc_call("connect", fd, buf, n)

    def op_listen(self, out, fd, backlog):
        return libc_call("listen", fd, backlog)

    def op_accept(self, out, fd, flags=0):
        return libc_call("accept4", fd, None, None, flags)

    def op_send(self, out, fd, addr, n, flags=0):
        return libc_call("send", fd, addr, n, flags)

    def op_recv(self, out, fd, addr, n, flags=0):
        return libc_call("recv", fd, addr, n, flags)

    def op_sendto(self, out, fd, addr, n, name, flags=0):
        buf, alen = sockaddr_un(name)
        return libc_call("sendto", fd, addr, n, flags, buf, alen)

    def op_shutdown(self, out, fd, how):
        return libc_call("shutdown", fd, how)

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

    def _simple(name):
        def op(self, out, *args):
            return libc_call(name, *args)
        return op

    for _n in ("setsid", "setpgid", "getpid", "getppid", "getpgid", "getsid", "gettid", "getuid",
               "geteuid", "getgid", "getegid", "setuid", "setgid", "setresuid", "setresgid"):
        locals()["op_" + _n] = _simple(_n)
    del _n

    def op_setgroups(self, out, groups):
        arr = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
        return libc_call("setgroups", len(groups), arr)

    def op_capset(self, out, effective, permitted, inheritable):
        hdr = CapHeader(0x20080522, 0)
        data = (CapData * 2)(CapData(effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF),
                              CapData(effective >> 32, permitted >> 32, inheritable >> 32))
        return libc_call("capset", ctypes.byref(hdr), data)

    def op_set_keepcaps(self, out, keep):
        return libc_call("prctl", 8, keep, 0, 0, 0)  # PR_SET_KEEPCAPS

    def op_checkpoint(self, out, pid, path, flags):
        """The model's checkpoint op: backend.api.checkpoint into ``path``, opened (and closed
        after) as the model does; pid 0 is a self-checkpoint, which returns 0 in a process
        restarted from its image. A failure is -errno."""
        from ckptsim.cr.context import CheckpointError
        from .api import checkpoint
        fd = libc_call("open", path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        if fd < 0:
            return fd
        try:
            return checkpoint(pid, fd, flags, -1)
        except CheckpointError as e:
            return -(e.errno or 5)
        finally:
            os.close(fd)


RLIMIT_SIGPENDING = 11
OWN_UID_ENV = "CKPTSIM_INTERP_UID"
UNSUPPORTED_ALWAYS: dict[str, str] = {}


def unsupported_op(op) -> str | None:
    """Why the interpreter cannot run ``op`` (decided from the op alone), or None."""
    out, name, *args = op
    if name in UNSUPPORTED_ALWAYS:
        return f"unsupported op {name}: {UNSUPPORTED_ALWAYS[name]}"
    if not hasattr(Interp, "op_" + name):
        return f"unsupported op {name}: the live interpreter does not run it"
    if name == "fork" and args:
        return clone_refusal(args[0], args[1:])
    return None


def needs_own_uid(ops) -> bool:
    """Whether the program must run under a uid no other process has.

    Linux counts queued signals per real uid of a user namespace (SigQ in /proc/PID/status:
    every root process of the machine), the model per thread group: under a uid of its own
    the two counts are the same, and RLIMIT_SIGPENDING means what the scenario expects.
    """
    return any(op[1] == "setrlimit" and len(op) > 2 and op[2] == RLIMIT_SIGPENDING for op in ops)


def _take_own_uid() -> None:
    uid = os.environ.get(OWN_UID_ENV)
    if uid is None:
        return
    uid = int(uid)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    libc_call("prctl", 4, 1, 0, 0, 0)   # PR_SET_DUMPABLE: a uid change cleared it


def _reset_process() -> None:
    """Start as the model's container init: no descriptors, default signal dispositions."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)      # through glibc's sigaction: SA_RESTORER set
    PROCESS.learn_restorer()
    BREAK.start()
    os.closerange(0, 1 << 16)
    _take_own_uid()


def run_program(ops: list, control_dir: str):
    """Run ``ops`` in this process; never returns (exits with the program's status)."""
    it = Interp(ops, control_dir)
    try:
        _reset_process()
    except BaseException as e:  # noqa: BLE001
        it.report("error", message=f"interpreter start: {type(e).__name__}: {e}")
        os._exit(EXIT_ERROR)
    it.run_guarded()


def _malloc_off_brk_env() -> dict | None:
    """The environment to re-exec with when glibc's malloc could still use the break."""
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    if MALLOC_TUNABLE in tunables:
        return None
    return {**os.environ, "GLIBC_TUNABLES": ":".join(tunables + [MALLOC_TUNABLE])}


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
    env = _malloc_off_brk_env()
    if env is not None:   # before anything else runs: the program will own the break
        os.execve(sys.executable, [sys.executable, "-m", "backend.interp", *argv], env)
    run_program(ops, argv[1])


if __name__ == "__main__":
    main()

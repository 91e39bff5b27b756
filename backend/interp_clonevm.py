"""CLONE_VM children of the live interpreter (backend/interp.py), run without Python.

``fork`` with CLONE_VM alone (or | SIGCHLD) is a second PROCESS sharing the whole address
space. Python cannot run in it: both processes would share one heap, one GIL and glibc's
thread-local block (errno, malloc's arenas). So the child runs ``interp_clonevm.c``: a small
C interpreter of the same op list, compiled with gcc at first use into a shared library
(``clonevm-HASH.so`` in CONTROL_DIR, else in the temp dir) and loaded with ctypes. The
parent calls ``ckv_clone``, which does the raw clone syscall with CLONE_VM | SIGCHLD (the
model's exit signal: a plain wait4 reaps the child) on a stack the parent mmap'd, and gets
the pid; the child runs from the op after the fork with a copy of the registers (the fork's
output register 0) and never calls libc (inline syscalls only, its own formatting).

The child runs: set, add, jnz, store, check, check_mem, ckpt_point, emit, exit, exit_group
and the plain-number syscalls of ``SYSCALLS`` (numbers from backend/kabi/). Its reports
are the lines Interp.report writes. Before cloning, ``plan`` follows every op the child can
reach (jnz on a register whose value is known at the fork goes one way only) and refuses
the fork, naming the op, when one of them is anything else.

Everything the child uses (its stack below a PROT_NONE guard page, the context with its
registers, the encoded program, its scratch) is one anonymous mapping made per fork and
never unmapped; the library stays loaded: both are part of the address space a checkpoint
saves. Not done: a child of a process with caught signals (a handler would record into the
parent's ring, interp_signals.py) is refused.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import shutil
import subprocess
import tempfile

from . import kabi
from .interp_libc import EXIT_ERROR, NR_REGS, U64, Unsupported, libc_call

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interp_clonevm.c")
CLONE_VM = kabi.CLONE_VM
SIGCHLD = 17
PAGE = 4096
STACK_BYTES = 64 * 1024

# -D macros of the C file (the one definition of its codes)
OPS = {"set": 1, "add": 2, "jnz": 3, "store": 4, "check": 5, "check_mem": 6, "ckpt_point": 7,
       "emit": 8, "exit_group": 9, "exit": 10}
OP_SYSCALL = 11
TAGS = {"A_REG": 0, "A_IMM": 1, "A_STR": 2, "A_JSON": 3}
CMPS = {"==": 0, "!=": 1, "<": 2, "<=": 3, ">": 4, ">=": 5}
CMP_MACROS = {"==": "CMP_EQ", "!=": "CMP_NE", "<": "CMP_LT", "<=": "CMP_LE", ">": "CMP_GT",
              ">=": "CMP_GE"}
A_REG, A_IMM, A_STR, A_JSON = TAGS.values()

# op name -> (syscall number, required args, defaults of the optional ones), as Interp's op_*
SYSCALLS = {
    "read": (kabi.SYS_read, 3, ()), "write": (kabi.SYS_write, 3, ()),
    "pread": (kabi.SYS_pread64, 4, ()), "pwrite": (kabi.SYS_pwrite64, 4, ()),
    "lseek": (kabi.SYS_lseek, 3, ()), "close": (kabi.SYS_close, 1, ()),
    "dup": (kabi.SYS_dup, 1, ()), "dup3": (kabi.SYS_dup3, 3, ()),
    "fcntl": (kabi.SYS_fcntl, 2, (0,)),
    "mmap": (kabi.SYS_mmap, 4, (-1, 0)), "munmap": (kabi.SYS_munmap, 2, ()),
    "mprotect": (kabi.SYS_mprotect, 3, ()), "mremap": (kabi.SYS_mremap, 4, (0,)),
    "madvise": (kabi.SYS_madvise, 3, ()),
    "getpid": (kabi.SYS_getpid, 0, ()), "getppid": (kabi.SYS_getppid, 0, ()),
    "gettid": (kabi.SYS_gettid, 0, ()), "getpgid": (kabi.SYS_getpgid, 1, ()),
    "getsid": (kabi.SYS_getsid, 1, ()), "setsid": (kabi.SYS_setsid, 0, ()),
    "setpgid": (kabi.SYS_setpgid, 2, ()), "umask": (kabi.SYS_umask, 1, ()),
    "kill": (kabi.SYS_kill, 2, ()), "tgkill": (kabi.SYS_tgkill, 3, ()),
}
RUNS = ", ".join(list(OPS) + sorted(SYSCALLS))


class CkvCtx(ctypes.Structure):
    """struct ckv_ctx of interp_clonevm.c (same order, all 64-bit)."""
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "pc", "nops", "op_index", "words", "strs",
        "report_path", "release_path", "scratch", "scratch_len", "stack_top",
        "clone_flags", "report_flags", "release_flags",
        "nr_clone", "nr_exit", "nr_exit_group", "nr_openat", "nr_write", "nr_close", "nr_getpid",
        "nr_process_vm_readv", "nr_process_vm_writev", "exit_error")] + [("regs", ctypes.c_uint64 * NR_REGS)]


def is_clone_vm(flags: int) -> bool:
    return flags in (CLONE_VM, CLONE_VM | SIGCHLD)


# -- the library ---------------------------------------------------------------------------
def _cflags() -> list[str]:
    defs = {**{"OP_" + n.upper(): v for n, v in OPS.items()}, "OP_POINT": OPS["ckpt_point"],
            "OP_SYSCALL": OP_SYSCALL, **TAGS, **{CMP_MACROS[k]: v for k, v in CMPS.items()},
            "NR_REGS": NR_REGS}
    return (["-O2", "-shared", "-fPIC", "-nostdlib", "-ffreestanding", "-fno-builtin",
             "-fno-stack-protector", "-fno-tree-loop-distribute-patterns", "-fvisibility=hidden",
             "-Wall", "-Wl,--no-undefined", "-Wl,-z,now", "-Wl,-z,noexecstack"]
            + [f"-D{k}={v}" for k, v in sorted(defs.items())])


def gcc_missing() -> str | None:
    if shutil.which("gcc") is None:
        return ("unsupported op fork: a CLONE_VM child runs a C mini-interpreter compiled at "
                "first use, and gcc is not installed (not on PATH)")
    return None


_LIB: ctypes.CDLL | None = None


def _private_dir(control_dir: str) -> str:
    """A directory only this uid can write, for the library it will load: CONTROL_DIR is
    writable by everybody (tasks of other uids report there), so the library goes into a
    subdirectory made 0700 here, checked to be a real directory of ours that nobody else may
    write; CONTROL_DIR must then be sticky (the live backend makes it so), else a fresh temp
    dir is used."""
    st = os.stat(control_dir)
    if not os.access(control_dir, os.W_OK) or (st.st_mode & 0o002 and not st.st_mode & 0o1000):
        # not writable, or writable by all without the sticky bit (anyone could rename our
        # directory away and put theirs in its place): a fresh private temp dir
        return tempfile.mkdtemp(prefix="ckptsim-clonevm-")
    d = os.path.join(os.path.abspath(control_dir), f"clonevm-lib-{os.getuid()}")
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise Unsupported(f"unsupported op fork: {d} is not a private directory of uid "
                          f"{os.getuid()}: the CLONE_VM mini-interpreter is not built there")
    return d


def compile_library(control_dir: str) -> str:
    """The path of the mini-interpreter's library, compiled into a private directory of
    CONTROL_DIR (_private_dir) unless already there (its name holds a hash of the source and
    the flags)."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    flags = _cflags()
    tag = hashlib.sha256(source + "\0".join(flags).encode()).hexdigest()[:16]
    path = os.path.join(_private_dir(control_dir), f"clonevm-{tag}.so")
    if os.path.exists(path):
        return path
    why = gcc_missing()
    if why:
        raise Unsupported(why)
    tmp = f"{path}.{os.getpid()}.tmp"
    res = subprocess.run(["gcc", *flags, "-o", tmp, SOURCE], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True)
    if res.returncode != 0:
        first = (res.stderr.strip().splitlines() or ["no message"])[0]
        raise Unsupported(f"unsupported op fork: compiling the CLONE_VM mini-interpreter "
                          f"failed (gcc exit {res.returncode}): {first}")
    os.rename(tmp, path)              # atomic: another process may compile the same
    return path


def library(control_dir: str) -> ctypes.CDLL:
    """The loaded mini-interpreter (compiled at the first CLONE_VM fork of this process)."""
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL(compile_library(control_dir))
        lib.ckv_clone.restype = ctypes.c_long
        lib.ckv_clone.argtypes = [ctypes.c_void_p]
        _LIB = lib
    return _LIB


# -- what the child may reach --------------------------------------------------------------
def _reg_of(v) -> int | None:
    """The register a "$rN" argument names (None: not a register); refused when out of range."""
    if not (isinstance(v, str) and v.startswith("$r")):
        return None
    try:
        n = int(v[2:])
    except ValueError:
        raise Unsupported(f"bad register {v!r}") from None
    if not 0 <= n < NR_REGS:
        raise Unsupported(f"register {v} out of range")
    return n


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v, what: str) -> None:
    if _reg_of(v) is None and not (_is_int(v) and -(1 << 63) <= v <= U64):
        raise Unsupported(f"{what} {v!r} is not a register or a 64-bit number")


def _literal_reg(v, what: str) -> int:
    if not (_is_int(v) and 0 <= v < NR_REGS):
        raise Unsupported(f"{what} {v!r} is not a register number")
    return v


def _text(v, what: str) -> None:
    if not isinstance(v, str) or _reg_of(v) is not None:
        raise Unsupported(f"{what} {v!r} is not a text")


def _validate(op, nops: int) -> None:
    """Raise Unsupported when the mini-interpreter cannot run ``op`` exactly as Interp does."""
    out, name, *args = op
    if out is not None:
        _literal_reg(out, "output register")
    if name in ("set", "add"):
        if len(args) != 2:
            raise Unsupported(f"{len(args)} arguments")
        _literal_reg(args[0], "register")
        _number(args[1], "value")
    elif name == "jnz":
        if len(args) != 2:
            raise Unsupported(f"{len(args)} arguments")
        _literal_reg(args[0], "register")
        if not (_is_int(args[1]) and 0 <= args[1] <= nops):
            raise Unsupported(f"jump target {args[1]!r}")
    elif name == "store":
        if len(args) != 2:
            raise Unsupported(f"{len(args)} arguments")
        _number(args[0], "address")
        _text(args[1], "text")
    elif name == "check":
        if len(args) != 4 or args[1] not in CMPS:
            raise Unsupported(f"arguments {args!r}")
        _number(args[0], "value")
        _number(args[2], "value")
    elif name == "check_mem":
        if len(args) != 3:
            raise Unsupported(f"{len(args)} arguments")
        _number(args[0], "address")
        _text(args[1], "text")
    elif name == "ckpt_point":
        if args:
            raise Unsupported("checkpoint steps (the live backend passes none)")
    elif name == "emit":
        for v in args:
            if _is_int(v):
                _number(v, "value")
            _reg_of(v)
    elif name in ("exit", "exit_group"):
        if len(args) > 1:
            raise Unsupported(f"{len(args)} arguments")
        for v in args:
            _number(v, "exit code")
    elif name in SYSCALLS:
        _nr, need, defaults = SYSCALLS[name]
        if not need <= len(args) <= need + len(defaults):
            raise Unsupported(f"{len(args)} arguments (it takes {need} to {need + len(defaults)})")
        for v in args:
            _number(v, "argument")
    else:
        raise Unsupported(f"the child's mini-interpreter runs only {RUNS}")


def _writes(op) -> int | None:
    """The register ``op`` sets to a value unknown before it runs (None: none)."""
    out, name, *args = op
    if name in SYSCALLS:
        return out
    return None


def plan(ops: list, start: int, regs: list[int]) -> set[int]:
    """The ops the child can reach from ``start`` with registers ``regs`` (a constant
    propagation: a register is known until a syscall or a merge of two different values
    makes it unknown); Unsupported, naming the op, when one of them cannot run in C."""
    states: dict[int, tuple] = {}
    work = [(start, tuple(regs))]
    while work:
        pc, st = work.pop()
        if pc >= len(ops):
            continue
        old = states.get(pc)
        if old is not None:
            merged = tuple(a if a == b else None for a, b in zip(old, st))
            if merged == old:
                continue
            st = merged
        states[pc] = st
        op = ops[pc]
        try:
            _validate(op, len(ops))
        except Unsupported as e:
            raise Unsupported(f"unsupported op fork: the CLONE_VM child would run op {pc} "
                              f"{op[1]}: {e}") from None
        out, name, *args = op
        regs_now = list(st)
        if name in ("set", "add"):
            r, v = args
            src = _reg_of(v)
            val = regs_now[src] if src is not None else v & U64
            if name == "add":
                val = None if val is None or regs_now[r] is None else (regs_now[r] + val) & U64
            regs_now[r] = val
        elif name == "jnz":
            known = regs_now[args[0]]
            if known is None or known:
                work.append((args[1], st))
            if not known:
                work.append((pc + 1, st))
            continue
        elif name in ("exit", "exit_group"):
            continue
        w = _writes(op)
        if w is not None:
            regs_now[w] = None
        work.append((pc + 1, tuple(regs_now)))
    return set(states)


# -- encoding -----------------------------------------------------------------------------
class _Blob:
    def __init__(self):
        self.data = bytearray()

    def add(self, raw: bytes) -> tuple[int, int]:
        off = len(self.data)
        self.data += raw + b"\0"
        return off, len(raw)


def _arg_words(v, blob: _Blob, as_json: bool = False) -> list[int]:
    r = _reg_of(v)
    if r is not None:
        return [A_REG, r, 0]
    if _is_int(v) and not as_json:
        return [A_IMM, v & U64, 1 if v < 0 else 0]
    if isinstance(v, bytes):
        v = v.decode("latin-1")      # as Interp's _json_value
    off, n = blob.add(json.dumps(v, default=repr).encode())
    return [A_JSON, off, n]


def _str_words(text: str, blob: _Blob) -> list[int]:
    off, n = blob.add(text.encode())
    return [A_STR, off, n]


def encode(ops: list, reachable: set[int]) -> tuple[list[int], list[int], _Blob]:
    """(op_index, words, strings) of the program for the C side; an op the child cannot
    reach is encoded as code 0 (its interpreter reports an error if it ever gets there)."""
    index, words, blob = [], [], _Blob()
    for pc, op in enumerate(ops):
        index.append(len(words))
        out, name, *args = op
        if pc not in reachable:
            words += [0, -1, 0, 0]
            continue
        extra, enc = 0, []
        if name == "check":
            a, cmp, b, label = args
            extra = CMPS[cmp]
            enc = [_arg_words(a, blob), _arg_words(b, blob), _arg_words(label, blob, True),
                   _str_words(cmp, blob)]
        elif name == "check_mem":
            addr, text, label = args
            enc = [_arg_words(addr, blob), _str_words(text, blob), _arg_words(text, blob, True),
                   _arg_words(label, blob, True)]
        elif name == "store":
            enc = [_arg_words(args[0], blob), _str_words(args[1], blob)]
        elif name in ("exit", "exit_group"):
            enc = [_arg_words(args[0] if args else 0, blob)]
        elif name in SYSCALLS:
            nr, need, defaults = SYSCALLS[name]
            extra = nr
            full = list(args) + list(defaults[len(args) - need:])
            enc = [_arg_words(v, blob) for v in full]
        else:                          # set, add, jnz, ckpt_point, emit
            enc = [_arg_words(v, blob) for v in args]
        code = OP_SYSCALL if name in SYSCALLS else OPS[name]
        words += [code, -1 if out is None else out, len(enc), extra]
        for e in enc:
            words += e
    return index, words, blob


# -- the fork ------------------------------------------------------------------------------
def _handler_refusal() -> str | None:
    from .interp_signals import PROCESS
    if PROCESS.ring is None:
        return None
    for sig in PROCESS.siginfo:
        cur = (ctypes.c_uint64 * 4)()
        if libc_call("syscall", kabi.SYS_rt_sigaction, sig, None, cur, 8) == 0 \
                and cur[0] == PROCESS.ring.handler:
            return (f"unsupported op fork: CLONE_VM child of a process catching signal {sig}: "
                    f"its handler would record into the parent's ring (shared memory) and be "
                    f"reported as the parent's")
    return None


def _mmap(size: int) -> int:
    addr = libc_call("mmap64", 0, size, kabi.PROT_READ | kabi.PROT_WRITE,
                     kabi.MAP_PRIVATE | kabi.MAP_ANONYMOUS, -1, 0)
    if addr < 0:
        raise OSError(-addr, "mmap of the CLONE_VM child's memory")
    return addr


def _round(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def clone_vm(ops: list, fork_pc: int, regs: list[int], out, control_dir: str) -> int:
    """Start the CLONE_VM child of the fork at ``fork_pc``: its pid (or -errno)."""
    why = _handler_refusal()
    if why:
        raise Unsupported(why)
    child_regs = list(regs)
    if out is not None:
        child_regs[out] = 0
    reachable = plan(ops, fork_pc + 1, child_regs)
    lib = library(control_dir)
    index, words, blob = encode(ops, reachable)
    ctl = os.path.abspath(control_dir)
    report_off, _ = blob.add(os.path.join(ctl, "report").encode())
    release_off, _ = blob.add(os.path.join(ctl, "release").encode())
    longest = max([len(ops[pc][3].encode()) for pc in reachable if ops[pc][1] == "check_mem"] or [0])
    # half for check_mem's read, half for a report line: any line is under 7 bytes per blob byte
    scratch_len = 2 * _round(max(longest, 8 * len(blob.data) + 64 * len(words) + 4096))
    ctx_off = PAGE + STACK_BYTES
    index_off = ctx_off + _round(ctypes.sizeof(CkvCtx))
    words_off = index_off + 8 * len(index)
    strs_off = words_off + 8 * len(words)
    scratch_off = _round(strs_off + len(blob.data))
    base = _mmap(scratch_off + scratch_len)
    libc_call("mprotect", base, PAGE, 0)              # a guard page below the child's stack
    ctypes.memmove(base + index_off, (ctypes.c_uint64 * len(index))(*index), 8 * len(index))
    ctypes.memmove(base + words_off, (ctypes.c_uint64 * len(words))(*(w & U64 for w in words)),
                   8 * len(words))
    ctypes.memmove(base + strs_off, bytes(blob.data), len(blob.data))
    ctx = CkvCtx.from_address(base + ctx_off)
    ctx.pc, ctx.nops = fork_pc + 1, len(ops)
    ctx.op_index, ctx.words, ctx.strs = base + index_off, base + words_off, base + strs_off
    ctx.report_path, ctx.release_path = base + strs_off + report_off, base + strs_off + release_off
    ctx.scratch, ctx.scratch_len = base + scratch_off, scratch_len
    ctx.stack_top = base + ctx_off
    ctx.clone_flags = CLONE_VM | SIGCHLD
    ctx.report_flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    ctx.release_flags = os.O_RDONLY | os.O_CLOEXEC
    ctx.nr_clone, ctx.nr_exit, ctx.nr_exit_group = kabi.SYS_clone, kabi.SYS_exit, kabi.SYS_exit_group
    ctx.nr_openat, ctx.nr_write, ctx.nr_close = kabi.SYS_openat, kabi.SYS_write, kabi.SYS_close
    ctx.nr_getpid = kabi.SYS_getpid
    ctx.nr_process_vm_readv = kabi.SYS_process_vm_readv
    ctx.nr_process_vm_writev = kabi.SYS_process_vm_writev
    ctx.exit_error = EXIT_ERROR
    for i, v in enumerate(child_regs):
        ctx.regs[i] = v & U64
    return lib.ckv_clone(base + ctx_off)

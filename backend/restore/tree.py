"""The restored tree's processes: pids as in the image, parents, sessions, groups, zombies.

The seed is the one process this restorer forks itself (clone3, so that it can choose the pid
and a new pid namespace): it execs the image root's executable under PTRACE_TRACEME and stops
before running any of it. Every other process is a clone3 injected into its parent stub, with
``set_tid`` = its pid in the image, so the kernel's parent links are the image's. Sessions and
groups are made the way the original processes made them: a session leader calls setsid(), a
group leader setpgid(0, 0), a member setpgid(0, pgid) once its leader exists.

Pid namespaces (``pidns``):
  * new (the default) and the image root is pid 1 (a container image): the seed is the root,
    pid 1 of a new pid namespace;
  * new and the root has another pid: the seed becomes a minimal init for the new namespace
    (``REAPER_CODE``: wait4 until no child is left, then exit) and the root is its child with
    its own pid;
  * current (``pidns=False``): the seed is the root, with its pid in this namespace; a pid in
    use is a clear EBUSY naming it.
A process in a pid namespace nested below the image root's (TREE's ``depth`` > 0) is cloned
with its numbers in every level (``set_tid`` of depth + 1 entries, the innermost first); the
init of a nested namespace (inner pid 1, one level below its parent) with CLONE_NEWPID too.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct

from backend import kabi
from backend.ptrace import _ptrace
from .stub import PAGE, TRAMPOLINE_CODE, STUB_OPTIONS, Stub, StubError

# A pid namespace's init, in x86-64 machine code (it runs in the trampoline page, which is
# writable): reap children until none is left, then exit with the root's status (its exit
# code, or 128 + the signal that killed it). Assembled from (GNU as, Intel syntax):
#       xor ebx, ebx
#   loop:
#       mov eax, 61 ; mov rdi, -1 ; lea rsi, [rip + status] ; xor edx, edx ; xor r10d, r10d
#       syscall                        # wait4(-1, &status, 0, NULL)
#       cmp rax, -10 ; je done         # ECHILD
#       cmp eax, ROOT ; jne loop       # ROOT: the root's pid, patched in at REAPER_ROOT_AT
#       mov ebx, [rip + status] ; jmp loop
#   done:
#       mov edi, ebx ; and edi, 0x7f ; jz exited ; add edi, 128 ; jmp out
#   exited:
#       mov edi, ebx ; shr edi, 8 ; and edi, 0xff
#   out:
#       mov eax, 231 ; syscall         # exit_group
#   status: .long 0
REAPER_CODE = bytes.fromhex(
    "31dbb83d00000048c7c7ffffffff488d353d00000031d24531d20f054883f8f6740f3d4433221175d98b1d"
    "23000000ebd189df83e77f740881c780000000eb0b89dfc1ef0881e7ff000000b8e70000000f0500000000")
REAPER_ROOT_AT = 0x23
assert REAPER_CODE[REAPER_ROOT_AT:REAPER_ROOT_AT + 4] == bytes.fromhex("44332211")

THREAD_FLAGS = (kabi.CLONE_VM | kabi.CLONE_FS | kabi.CLONE_FILES | kabi.CLONE_SIGHAND
                | kabi.CLONE_THREAD | kabi.CLONE_SYSVSEM)


def _clone_args(flags: int, exit_signal: int, pid: int) -> tuple[kabi.clone_args, ctypes.Array]:
    tids = (ctypes.c_int32 * 1)(pid)
    args = kabi.clone_args(flags=flags, exit_signal=exit_signal,
                           set_tid=ctypes.addressof(tids) if pid else 0,
                           set_tid_size=1 if pid else 0)
    return args, tids


# The seed's spawner, in x86-64 machine code run in the restorer (through ctypes): like
# posix_spawn, a clone3 with CLONE_VM (no copy of the restorer's address space, which a fork
# helper and its clone took ~3-5 ms to make, and no Python in the child), and CLONE_VFORK
# unless it is an EarlySeed (whose caller runs on meanwhile), whose
# child, with every signal blocked, resets each signal's action to SIG_DFL (an ignored one
# would survive the exec into every restored task), calls PTRACE_TRACEME, sets the signal
# mask to exec with, and execs. Assembled from (GNU as, Intel syntax):
#   spawn:                      # long spawn(struct clone_args *, size_t, struct _SpawnData *)
#       mov r9, rdx ; mov eax, 435 ; syscall ; test rax, rax ; jz child ; ret
#   child:
#       mov ebx, 1
#   again:
#       cmp ebx, 9 ; je next ; cmp ebx, 19 ; je next
#       mov eax, 13 ; mov edi, ebx ; mov rsi, r9 ; xor edx, edx ; mov r10d, 8 ; syscall
#   next:
#       inc ebx ; cmp ebx, 64 ; jbe again                # rt_sigaction(sig, &dfl, 0, 8)
#       mov eax, 101 ; xor edi, edi ; xor esi, esi ; xor edx, edx ; xor r10d, r10d ; syscall
#       mov eax, 14 ; mov edi, 2 ; lea rsi, [r9 + 56] ; xor edx, edx ; mov r10d, 8 ; syscall
#       mov eax, 59 ; mov rdi, [r9 + 32] ; mov rsi, [r9 + 40] ; mov rdx, [r9 + 48] ; syscall
#       mov eax, 231 ; mov edi, 127 ; syscall            # the exec failed
# The child touches no stack (none is given: it shares the caller's, which, without
# CLONE_VFORK, goes on using it: so the child must never push, call or take a signal frame:
# every signal is blocked until the exec's mask is set, and each action is SIG_DFL by then)
# and no memory but _SpawnData, which lives until the exec was seen (the caller returns
# after it, or an EarlySeed keeps it).
SPAWN_CODE = bytes.fromhex(
    "4989d1b8b30100000f054885c07401c3bb0100000083fb09741983fb137414b80d00000089df4c89ce31d2"
    "41ba080000000f05ffc383fb4076dbb86500000031ff31f631d24531d20f05b80e000000bf020000004"
    "98d713831d241ba080000000f05b83b000000498b7920498b7128498b51300f05b8e7000000bf7f0000000f05")


class _SpawnData(ctypes.Structure):
    _fields_ = [("default_action", ctypes.c_uint64 * 4),  # struct sigaction: SIG_DFL
                ("path", ctypes.c_void_p), ("argv", ctypes.c_void_p), ("envp", ctypes.c_void_p),
                ("mask", ctypes.c_uint64)]


_spawner = None
_ALL_SIGNALS = signal.valid_signals()


def _spawn_function():
    """SPAWN_CODE in an executable page of its own, as a C function (made once)."""
    global _spawner
    if _spawner is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long)
        page = libc.mmap(None, PAGE, kabi.PROT_READ | kabi.PROT_WRITE,
                         kabi.MAP_PRIVATE | kabi.MAP_ANONYMOUS, -1, 0)
        if page in (None, ctypes.c_void_p(-1).value):
            raise StubError(ctypes.get_errno(), "cannot map the seed's spawner")
        ctypes.memmove(page, SPAWN_CODE, len(SPAWN_CODE))
        if libc.mprotect(ctypes.c_void_p(page), PAGE, kabi.PROT_READ | kabi.PROT_EXEC):
            raise StubError(ctypes.get_errno(), "cannot make the seed's spawner executable")
        _spawner = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p, ctypes.c_size_t,
                                    ctypes.c_void_p)(page)
    return _spawner


def spawn_seed(exe: str, pid: int, new_pidns: bool) -> int:
    """Make the seed (clone3 with ``pid``, 0 for any) that execs ``exe`` traced by us;
    returns its pid. The caller must adopt() it. (The calling thread is suspended until the
    exec, which is what makes sharing its address space with the child safe.)"""
    return _spawn(exe, pid, new_pidns, vfork=True)[0]


class EarlySeed:
    """A seed spawned without waiting for its exec, so that the exec runs while the restorer
    decodes the image (the same spawn, without CLONE_VFORK: the child touches no stack and
    no memory but its spawn data, which this object keeps until ``adopt``). Made from a
    quick look at the image (``seed_hint``); the job takes it only if the decoded image
    agrees. ``kill()`` ends it (the job's clean-up does once it was taken)."""

    def __init__(self, exe: str, pid: int, new_pidns: bool):
        self.exe, self.pid_wanted, self.new_pidns = exe, pid, new_pidns
        self.pid, self._keep = _spawn(exe, pid, new_pidns, vfork=False)

    def adopted(self) -> None:
        """The exec (or the child's end) was seen: the spawn data may go."""
        self._keep = None

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, kabi.WALL)
        except ChildProcessError:
            pass
        self._keep = None


def seed_hint(data) -> tuple[str, int] | None:
    """(the image root's executable, its pid) from the image's first records, before it is
    decoded: up to the first MM record (the root's: tasks come in tree order, and an object
    is defined before the record that names it). None where the image does not say (a
    zombie root, no executable, a damaged image: the decode reports those)."""
    from ckptsim.errors import ImageError
    from ckptsim.image import core
    from ckptsim.image.codec import ImageReader
    from ckptsim.image.types import ObjType
    from ckptsim.kinds import load_all
    load_all()                     # (the kinds' record layouts)
    try:
        reader = ImageReader(data, checksum=False)
        header = reader.next()
        if header.name != "HEADER" or not header["image_flags"] & core.IMAGE_LIVE \
                or header["arch"] != core.ARCH_X86_64:
            return None                # refused by the decode, never exec'd
        names: dict[int, str] = {}
        last_file = root = 0
        while not reader.at_end():
            rec = reader.next()
            if rec.name == "OBJREF":
                last_file = rec["objref"] if rec["objtype"] == ObjType.FILE else 0
            elif rec.name == "FILE_NAME" and last_file:
                names[last_file] = rec.var
            elif rec.name == "TREE":
                if not rec.var:
                    return None
                root = rec.var[0][0]
            elif rec.name == "MM":
                exe = names.get(rec["exe_objref"])
                return (exe, root) if exe and root > 0 else None
            elif rec.name in ("PGARR", "TAIL", "ERROR"):
                return None
    except (ImageError, ValueError, IndexError, KeyError):
        return None
    return None


def _spawn(exe: str, pid: int, new_pidns: bool, vfork: bool) -> tuple[int, tuple]:
    """The seed's spawn: (its pid, the data it reads until its exec)."""
    if "\0" in exe or not exe.startswith("/"):
        raise StubError(errno.EINVAL, f"the executable path {exe!r} is not usable (absolute, "
                                      "without NUL bytes)")
    if not os.access(exe, os.X_OK):
        raise StubError(errno.ENOENT, f"the executable {exe} is missing or not executable")
    path = ctypes.create_string_buffer(os.fsencode(exe))
    argv = (ctypes.c_void_p * 2)(ctypes.addressof(path), None)
    entries = [k + b"=" + v for k, v in os.environb.items()]
    env = ctypes.create_string_buffer(b"\0".join(entries) + b"\0")    # one block, NUL-ended
    at, offsets = ctypes.addressof(env), []
    for entry in entries:
        offsets.append(at)
        at += len(entry) + 1
    envp = (ctypes.c_void_p * (len(offsets) + 1))(*offsets, None)
    flags = kabi.CLONE_VM | (kabi.CLONE_VFORK if vfork else 0) \
        | (kabi.CLONE_NEWPID if new_pidns else 0)
    args, tids = _clone_args(flags, 0, pid)
    spawn = _spawn_function()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
    try:
        data = _SpawnData(path=ctypes.addressof(path), argv=ctypes.addressof(argv),
                          envp=ctypes.addressof(envp),
                          mask=sum(1 << (int(sig) - 1) for sig in old))
        child = spawn(ctypes.addressof(args), ctypes.sizeof(args), ctypes.addressof(data))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if child == -errno.EEXIST:
        raise StubError(errno.EBUSY, f"pid {pid} is in use in this pid namespace "
                                     "(restart with a new pid namespace: --pidns)")
    if child < 0:
        raise StubError(-child, f"cannot create the first restored process: "
                                f"{os.strerror(-child)}")
    return child, (path, argv, env, envp, args, tids, data)


def map_trampoline(stub: Stub, addr: int) -> None:
    """Map the trampoline page at ``addr`` in the seed (children inherit it), using a syscall
    instruction of the seed's own vdso for this first call."""
    from backend.ptrace import find_syscall_insn
    stub.tramp = find_syscall_insn(stub.tid)
    got = stub.syscall(kabi.SYS_mmap, addr, PAGE, kabi.PROT_READ | kabi.PROT_WRITE | kabi.PROT_EXEC,
                       kabi.MAP_PRIVATE | kabi.MAP_ANONYMOUS | kabi.MAP_FIXED_NOREPLACE,
                       -1, 0, what="mmap of the trampoline")
    if got != addr:
        raise StubError(errno.EEXIST, f"trampoline landed at {got:#x}, not {addr:#x}")
    stub.set_trampoline(addr)


def set_options(tid: int) -> None:
    _ptrace(kabi.PTRACE_SETOPTIONS, tid, 0, STUB_OPTIONS)


def clone_child(parent: Stub, pid: int, flags: int = 0, exit_signal: int = signal.SIGCHLD,
                what: str = "", inner: tuple[int, ...] | list[int] = ()) -> Stub:
    """Inject clone3 into ``parent``: a child (or, with THREAD_FLAGS, a thread) with ``pid``
    in the restart's pid namespace and ``inner`` (outermost first) in the namespaces nested
    below it, if any (with CLONE_NEWPID, the last one is 1: the child is the init of a new
    one); returns its stub, stopped at its first stop."""
    args, tids = _clone_args(flags, exit_signal, 0)
    set_tid = [*reversed(inner), pid]            # clone3 wants the innermost first
    tid_addr = parent.scratch + 256
    args.set_tid, args.set_tid_size = tid_addr, len(set_tid)
    parent.put_scratch(struct.pack(f"<{len(set_tid)}i", *set_tid), 256)
    args_addr = parent.put_scratch(bytes(args), 0)
    try:
        parent.syscall(kabi.SYS_clone3, args_addr, ctypes.sizeof(args),
                       what=what or f"clone3 of {pid}")
    except StubError as e:
        if e.errno == errno.EEXIST:
            where = f" (and {'/'.join(map(str, inner))} below)" if inner else ""
            raise StubError(errno.EBUSY, f"pid {pid}{where} is in use (restart with a new pid "
                                         "namespace: --pidns)") from None
        raise
    child = parent.last_event
    if child is None:
        raise StubError(errno.ECHILD, f"clone3 of {pid} in {parent.pid}: no fork event")
    stub = Stub.adopt(child, parent.pid if flags & kabi.CLONE_THREAD else child, parent.tramp,
                      parent.int3_stops)
    return stub


def become_reaper(stub: Stub, keep: tuple[int, int], root_pid: int) -> None:
    """Turn the seed into the new namespace's init: only the trampoline page stays, holding
    REAPER_CODE (waiting for ``root_pid``, the root's pid in the namespace); it runs once
    detached."""
    start, end = keep
    for lo, hi in ((0, start), (end, kabi.TASK_SIZE_X86_64)):
        if hi > lo:
            stub.syscall(kabi.SYS_munmap, lo, hi - lo, what="munmap in the namespace init")
    stub.syscall(kabi.SYS_close_range, 0, 0xFFFFFFFF, 0, what="close_range in the init")
    code = bytearray(REAPER_CODE)
    code[REAPER_ROOT_AT:REAPER_ROOT_AT + 4] = struct.pack("<I", root_pid)
    stub.write(start + 16, bytes(code))
    regs = stub._regs
    regs.rip, regs.orig_rax, regs.rax = start + 16, (1 << 64) - 1, 0
    stub.set_final_regs(regs)

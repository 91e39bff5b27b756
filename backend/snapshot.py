"""What a live checkpoint saves of each task, gathered from /proc and ptrace.

The objects built here are what the resource kinds (``ckptsim/kinds``) save: the small ones
are the model's own types (Cred, SigHand, SignalStruct, ThreadSignals), the others stand in
for model objects with the same attributes (LiveMM for MM, LiveFile for File, ...), so one
save function per kind writes both model and live images. Memory is not copied here: LiveMM
reads pages in bounded chunks while the image is written.

Every task must be stopped (``backend.ptrace.seized``) while this runs. Anything the live
backend cannot save yet raises Unsupported, naming the task, the fd or mapping and its kind.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import struct
import time

from ckptsim.kinds.cpu_x86 import X86State
from ckptsim.model.creds import Cred
from ckptsim.model.signals import AltStack, SigInfo, SignalStruct, SigPending, ThreadSignals

from . import elf_ids, kabi, proc, ptrace
from .memory import VmaKind, classify, describe
from .snapshot_mm import LiveMM, LiveShmem, LiveVMA, Unsupported  # noqa: F401 (re-exported)
from .snapshot_signals import read_handlers as _handlers

RLIM_INFINITY_U64 = (1 << 64) - 1
MAX_UNLINKED_CONTENTS = 1 << 30
PAGE = 4096
# Character devices without state of their own: saved by path, opened again on restart.
REOPENABLE_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"})


# -- stand-ins for model objects --------------------------------------------------------------
class LiveFileType:
    def __init__(self, kind: str, seekable: bool):
        self.kind, self.seekable = kind, seekable


class LiveInode:
    """An unlinked-but-open file's inode: saved by contents."""

    def __init__(self, ino: int, kind: str, mode: int, data: bytes):
        self.ino, self.kind, self.mode, self.data, self.nlink = ino, kind, mode, data, 0


class LiveFile:
    """An open file description (File's attributes as kinds/files.py reads them)."""

    def __init__(self, kind: str, flags: int, pos: int, path: str, *, seekable: bool = True,
                 private=None, inode: LiveInode | None = None):
        self.ftype = LiveFileType(kind, seekable)
        self.flags, self.pos, self.path = flags, pos, path
        self.private, self.inode = private, inode

    def linked_path(self, kernel) -> str | None:
        return None if self.inode is not None else self.path


class LivePipe:
    """A pipe's buffer, copied with tee(2) so that the live pipe keeps its data."""

    def __init__(self, capacity: int, buffer: bytes, fifo: bool):
        self.capacity, self.buffer = capacity, buffer
        self.inode = True if fifo else None  # kinds/pipes.py: a FIFO has an inode


class LiveDir:
    def __init__(self, deleted: bool):
        self.nlink = 0 if deleted else 1


class LiveFs:
    def __init__(self, root: str, cwd: str, umask: int):
        self.root_path, self.cwd_path = root.removesuffix(" (deleted)"), cwd.removesuffix(" (deleted)")
        self.root, self.cwd = LiveDir(root.endswith(" (deleted)")), LiveDir(cwd.endswith(" (deleted)"))
        self.umask = umask


class LiveFdTable:
    def __init__(self, entries: list[tuple[int, LiveFile, bool]]):
        self.entries = entries

    def items(self):
        return self.entries


# VmFlags mnemonics of smaps and Linux's vm_flags bits (include/linux/mm.h)
class LiveTask:
    """One thread, with what the kinds save per task; ``cpu`` is None (x86 state instead)."""

    ns = None

    def __init__(self, tid: int, process: "LiveProcess"):
        self.tid = tid
        self.process = process
        self.cpu = None
        self.x86: X86State | None = None
        self.sigstate: ThreadSignals | None = None
        self.comm = ""
        self.state = "running"
        self.exit_signal = 17
        self.exit_code = 0
        self.pdeath_signal = 0

    def __getattr__(self, name):
        if name in ("cred", "mm", "files", "fs", "sighand", "signal"):
            return getattr(self.process, name)
        raise AttributeError(name)


class LiveProcess:
    def __init__(self, pid: int):
        self.pid = pid
        self.threads: list[LiveTask] = []
        self.cred = self.mm = self.files = self.fs = self.sighand = self.signal = None
        self.stat: proc.Stat | None = None
        self.zombie = False


# -- gathering --------------------------------------------------------------------------------
def _siginfo(raw: bytes) -> SigInfo:
    signo, _errno, code = struct.unpack_from("<iii", raw, 0)
    pid, uid = struct.unpack_from("<iI", raw, 16)
    (value,) = struct.unpack_from("<Q", raw, 24)
    return SigInfo(signo, code, pid, uid, value)


def _cred(status: proc.Status, securebits: int) -> Cred:
    uid, euid, suid, fsuid = status.uid
    gid, egid, sgid, fsgid = status.gid
    return Cred(uid=uid, euid=euid, suid=suid, fsuid=fsuid, gid=gid, egid=egid, sgid=sgid,
                fsgid=fsgid, groups=tuple(sorted(status.groups)), cap_inheritable=status.cap_inh,
                cap_permitted=status.cap_prm, cap_effective=status.cap_eff,
                cap_bounding=status.cap_bnd, securebits=securebits)


def _rseq(tid: int) -> tuple[int, int, int] | None:
    """The thread's restartable-sequences registration (pointer, size, signature), if any."""
    conf = kabi.ptrace_rseq_configuration()
    try:
        ptrace._ptrace(kabi.PTRACE_GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(conf),
                       ctypes.addressof(conf))
    except ptrace.PtraceError:
        return None
    if not conf.rseq_abi_pointer:
        return None
    return conf.rseq_abi_pointer, conf.rseq_abi_size, conf.signature


def _program_break(pid: int, fallback: int) -> int:
    """The exact program break (brk(0) inside the process): the [heap] mapping's end is only
    its page-rounded value, and not even that once mprotect has split the heap."""
    try:
        got = ptrace.inject_syscall(pid, kabi.SYS_brk, 0, check=False)
    except ptrace.PtraceError:
        return fallback                       # a leader that has exited: no injection
    return got if got > 0 else fallback


def _altstack(tid: int) -> AltStack:
    with ptrace.stack_scratch(tid, kabi.STACK_T_SIZE) as addr:
        ptrace.inject_syscall(tid, kabi.SYS_sigaltstack, 0, addr)
        sp, flags, size = struct.unpack("<Qi4xQ", ptrace.read_memory(tid, addr, kabi.STACK_T_SIZE))
    return AltStack(sp, size, flags)


def _rlimits(pid: int) -> list[tuple[int, int]]:
    out = []
    for lim in proc.read_limits(pid)[:16]:
        soft = RLIM_INFINITY_U64 if lim.soft < 0 else lim.soft
        hard = RLIM_INFINITY_U64 if lim.hard < 0 else lim.hard
        out.append((soft, hard))
    return out


def _pipe_contents(pid: int, fd: int, ino: int) -> tuple[int, bytes]:
    """(capacity, buffered bytes) of the pipe behind ``fd``, left intact: a new read end is
    opened through /proc and tee(2) duplicates the buffer into a private pipe."""
    src = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
    r, w = os.pipe()
    try:
        capacity = fcntl.fcntl(src, fcntl.F_GETPIPE_SZ)
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, capacity)
        try:
            n = kabi.syscall(kabi.SYS_tee, src, w, capacity, kabi.SPLICE_F_NONBLOCK,
                             what=f"tee of pipe:[{ino}]")
        except OSError as e:
            if e.errno != errno.EAGAIN:  # EAGAIN: the pipe is empty
                raise
            n = 0
        data = os.read(r, n) if n else b""
        return capacity, data
    finally:
        for f in (src, r, w):
            os.close(f)


_UNSHARED = ((kabi.KCMP_FILES, "its own file table (unshare(CLONE_FILES))"),
             (kabi.KCMP_FS, "its own cwd, root and umask (unshare(CLONE_FS))"))


_SECCOMP_MODES = {1: "strict mode", 2: "a filter"}


def _refuse_seccomp(pid: int, tids: list[int]) -> None:
    """A thread under seccomp: the image holds no seccomp state (a restart would run it
    unconfined), and a syscall the checkpoint injects could kill it. Refused, by thread."""
    for tid in tids:
        try:
            mode = proc.read_status(tid).seccomp
        except proc.ProcessGone:
            continue
        if mode:
            raise Unsupported(f"task {pid}: thread {tid} runs under seccomp "
                              f"({_SECCOMP_MODES.get(mode, f'mode {mode}')}): the image does not "
                              "hold seccomp filters, a restart would run it unconfined; not "
                              "supported")


def _refuse_unshared_threads(pid: int, leader: int, tids: list[int]) -> None:
    """The image holds one file table and one fs per process (as Linux-CR's did): a thread
    that unshared its own would be saved with its leader's, silently wrong. kcmp says."""
    for tid in tids:
        if tid == leader:
            continue
        for kind, what in _UNSHARED:
            if kabi.syscall(kabi.SYS_kcmp, leader, tid, kind, 0, 0, what="kcmp") != 0:
                raise Unsupported(f"task {pid}: thread {tid} has {what}; an image holds one "
                                  "per process: not supported")


def address_space_owners(pids: list[int]) -> dict[int, int]:
    """{pid: the first process of ``pids`` (in their order) with the same address space} for
    each process that shares its mm with an earlier one (clone(CLONE_VM) without
    CLONE_THREAD, a vfork child before its exec)."""
    return sharing_owners(pids, kabi.KCMP_VM)


def sharing_owners(pids: list[int], kind: int) -> dict[int, int]:
    """address_space_owners for any kcmp ``kind`` (KCMP_VM, KCMP_FILES, KCMP_FS,
    KCMP_SIGHAND). kcmp orders the objects, so sorting finds equal ones in O(n log n) calls;
    a kernel that gives no order (kcmp answers 3) is compared pair by pair. Zombies have none
    of them (kcmp finds every two equal): left out, as is a process gone meanwhile or one
    this caller may not compare (the seize notices)."""
    unordered = []
    position = {p: i for i, p in enumerate(pids)}

    def kcmp_vm(a: int, b: int) -> int | None:
        try:
            return kabi.syscall(kabi.SYS_kcmp, a, b, kind, 0, 0, what="kcmp")
        except OSError:
            return None

    def order(a: int, b: int) -> int:
        got = kcmp_vm(a, b)
        if got in (0, 1, 2):
            return (0, -1, 1)[got] or (position[a] > position[b]) - (position[a] < position[b])
        if got == 3:
            unordered.append(True)
        return -1 if a < b else int(a > b)

    def has_mm(p: int) -> bool:
        try:
            return proc.read_stat(p).state not in ("Z", "X")
        except proc.ProcessGone:
            return False
    ranked = sorted(filter(has_mm, pids), key=functools.cmp_to_key(order))
    pairs = (zip(ranked, ranked[1:]) if not unordered else
             ((a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]))
    root: dict[int, int] = {}                # union-find over the equal pairs

    def find(p: int) -> int:
        while root.get(p, p) != p:
            p = root[p]
        return p
    for a, b in pairs:
        if kcmp_vm(a, b) == 0 and has_mm(a) and has_mm(b):     # not turned zombies meanwhile
            ra, rb = find(a), find(b)
            if ra != rb:        # the group's root: its first process in ``pids``' order
                first, other = sorted((ra, rb), key=position.__getitem__)
                root[other] = first
    return {p: find(p) for p in list(root) if find(p) != p}


_VFORK_WCHAN = ("kernel_clone", "wait_for_vfork_done", "do_fork")


def _in_vfork(pid: int) -> bool:
    """Whether a thread of ``pid`` (the parent of a child sharing its mm) waits in vfork for
    that child: state D in kernel_clone's wait_for_vfork_done, where no ptrace stop reaches
    it until the child execs or exits (any thread may have called vfork or posix_spawn).
    wchan may read 0 for a moment and a thread on its way into the wait still runs: looked
    at again for up to 50 ms; a thread that stays in D all along counts as waiting (the
    seize could not stop it either)."""
    waiting = False
    for _ in range(50):
        try:
            states = {tid: proc.read_stat(tid).state for tid in proc.list_threads(pid)}
        except proc.ProcessGone:
            return False
        for tid in (t for t, st in states.items() if st == "D"):
            try:
                with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                    if f.read().strip() in _VFORK_WCHAN:
                        return True
            except OSError:
                pass
        waiting = "D" in states.values()
        if not waiting and "R" not in states.values():
            return False
        time.sleep(0.001)
    return waiting


def refuse_vfork_sharing(pids: list[int]) -> None:
    """Before the tree is touched: a vfork parent (sharing its mm with a child that has not
    exec'd yet) waits in the kernel, where no ptrace stop reaches it: refused, naming both."""
    for later, first in address_space_owners(pids).items():
        for parent, child in ((first, later), (later, first)):
            try:
                is_parent = proc.read_stat(child).ppid == parent
            except proc.ProcessGone:
                continue
            if is_parent and _in_vfork(parent):
                raise Unsupported(f"process {parent} waits in vfork for process {child}, which "
                                  "shares its address space and has not exec'd yet: a vfork "
                                  "parent cannot be stopped; not supported")


_PER_PROCESS = ((kabi.KCMP_FILES, "one fd table"), (kabi.KCMP_FS, "one cwd/root/umask"),
                (kabi.KCMP_SIGHAND, "one signal handler table"))


def refuse_shared_tables(pids: list[int]) -> None:
    """Processes (not threads) sharing an fd table, fs or handler table (clone with
    CLONE_FILES, CLONE_FS or CLONE_SIGHAND): the image holds one of each per process, so
    they would come back with copies of their own, silently. Refused, naming both."""
    for kind, what in _PER_PROCESS:
        for later, first in sharing_owners(pids, kind).items():
            raise Unsupported(f"processes {first} and {later} share {what} (clone without "
                              "CLONE_THREAD): an image holds one per process; not supported")


def refuse_seccomp(seized_threads: dict) -> None:
    """_refuse_seccomp for every seized process, before anything is injected into any."""
    for pid, tids in seized_threads.items():
        _refuse_seccomp(pid, tids)


class Gatherer:
    """Builds LiveProcess objects for a seized tree, sharing what is shared."""

    def __init__(self, log):
        self.log = log
        self.files: dict[tuple, LiveFile] = {}    # (pid, fd) of the first holder -> file
        self.file_keys: list[tuple[int, int, LiveFile, tuple]] = []
        self.pipes: dict[int, LivePipe] = {}
        self.mapped: dict[tuple, LiveFile] = {}
        self.shmems: dict[tuple, LiveShmem] = {}  # (dev, inode) -> shared anonymous segment
        self.in_flight_fds: list[int] = []        # our fds of files in flight (SCM_RIGHTS)
        # (pid, start time) -> {Mapping: VmFlags} known to hold for unchanged maps lines
        # (an incremental checkpoint's Tracking.known_vm_flags), or None
        self.known_vm_flags = None
        self.known_handlers = None                # likewise, (pid, start time) -> SigHand
        self.mm_owner: dict[int, int] = {}        # address_space_owners of the seized tree
        self.mms: dict[int, LiveMM] = {}          # pid -> its LiveMM, as gathered

    def close(self) -> None:
        """Close the fds of the files in flight (kept for kcmp while the tree is gathered)."""
        fds, self.in_flight_fds = self.in_flight_fds, []
        for fd in fds:
            os.close(fd)

    def __del__(self):
        self.close()

    def process(self, pid: int, tids: list[int]) -> LiveProcess:
        """``mm_owner`` (address_space_owners of the seized tree): a process sharing the mm
        of one gathered before gets that LiveMM (the image holds it once, one objref)."""
        p = LiveProcess(pid)
        p.stat = proc.read_stat(pid)
        status = proc.read_status(pid)
        leader = tids[0] if pid not in tids else pid
        securebits = ptrace.inject_syscall(leader, kabi.SYS_prctl, kabi.PR_GET_SECUREBITS, 0, 0, 0, 0)
        p.cred = _cred(status, securebits)
        known = self.known_handlers(pid, p.stat.start_time) if self.known_handlers else None
        p.sighand = known or _handlers(leader)
        # (after the handlers: reading them maps and unmaps two pages of code in the target)
        vmas_ahead = proc.read_smaps_flags_ahead(pid) \
            if not self.known_vm_flags and self.mm_owner.get(pid) not in self.mms else None
        p.signal = SignalStruct(_rlimits(pid))
        p.signal.shared_pending = SigPending([_siginfo(r) for r in ptrace.peek_siginfo(leader, shared=True)])
        p.fs = LiveFs(proc.read_root(pid) or "/", proc.read_cwd(pid) or "/",
                      status.umask if status.umask is not None else 0o022)
        _refuse_unshared_threads(pid, leader, tids)
        p.files = self._fdtable(pid)
        owner = self.mm_owner.get(pid)
        p.mm = self.mms[owner] if owner in self.mms else self._mm(pid, p.stat, vmas_ahead)
        self.mms.setdefault(pid, p.mm)
        for tid in sorted(tids, key=lambda t: (t != pid, t)):
            p.threads.append(self._thread(p, tid))
        return p

    def zombie(self, pid: int) -> LiveProcess:
        p = LiveProcess(pid)
        p.zombie = True
        p.stat = proc.read_stat(pid)
        task = LiveTask(pid, p)
        task.state, task.comm = "zombie", p.stat.comm
        task.exit_code, task.exit_signal = p.stat.exit_code, p.stat.exit_signal
        p.threads.append(task)
        return p

    def _thread(self, p: LiveProcess, tid: int) -> LiveTask:
        t = LiveTask(tid, p)
        stat = proc.read_stat(tid) if tid == p.pid else p.stat
        t.comm = proc.read_comm(tid)          # each thread's own name (/proc/TID/comm)
        t.state = "stopped" if stat.state in ("T",) else "running"
        t.exit_signal = p.stat.exit_signal if tid == p.pid else -1
        regs = ptrace.get_regs(tid)
        in_syscall = ptrace.syscall_state(regs) is not None
        t.x86 = X86State(regs.as_dict(), ptrace.get_xstate(tid), int(in_syscall),
                         _rseq(tid))
        pending = SigPending([_siginfo(r) for r in ptrace.peek_siginfo(tid, shared=False)])
        t.sigstate = ThreadSignals(ptrace.get_sigmask(tid), pending, _altstack(tid))
        return t

    # -- files ------------------------------------------------------------------------------
    def _same_file(self, pid: int, fd: int, key: tuple) -> LiveFile | None:
        """The already-seen description that (pid, fd) shares, found with kcmp(KCMP_FILE)."""
        for other_pid, other_fd, file, other_key in self.file_keys:
            if other_key == key and kabi.syscall(kabi.SYS_kcmp, pid, other_pid, kabi.KCMP_FILE,
                                                 fd, other_fd, what="kcmp") == 0:
                return file
        return None

    def _fdtable(self, pid: int) -> LiveFdTable:
        entries = []
        for info in proc.read_fds(pid):
            key = (info.dev, info.ino, info.kind)
            file = self._same_file(pid, info.fd, key)
            if file is None:
                file = self._file(pid, info)
                self.file_keys.append((pid, info.fd, file, key))
            entries.append((info.fd, file, info.cloexec))
        return LiveFdTable(entries)

    def _file(self, pid: int, info: proc.FdInfo) -> LiveFile:
        flags = info.flags & ~os.O_CLOEXEC
        kind = info.kind
        if kind in (proc.FdKind.REGULAR, proc.FdKind.DIRECTORY):
            inode = None
            if info.deleted:
                inode = self._unlinked(pid, info)
            return LiveFile("regular" if kind is proc.FdKind.REGULAR else "dir", flags, info.pos,
                            info.path, inode=inode)
        if kind is proc.FdKind.CHAR_DEVICE and info.path in REOPENABLE_DEVICES:
            return LiveFile("regular", flags, 0, info.path, seekable=False)
        if kind in (proc.FdKind.PIPE, proc.FdKind.FIFO):
            pipe = self.pipes.get(info.ino)
            if pipe is None:
                capacity, data = _pipe_contents(pid, info.fd, info.ino)
                pipe = self.pipes[info.ino] = LivePipe(capacity, data, kind is proc.FdKind.FIFO)
            # an unlinked FIFO: its inode saved (no contents: the bytes are the pipe's)
            inode = (LiveInode(info.ino, "fifo", info.mode & 0o7777, b"")
                     if kind is proc.FdKind.FIFO and info.deleted else None)
            return LiveFile("pipe" if kind is proc.FdKind.PIPE else "fifo", flags, 0, info.path,
                            seekable=False, private=pipe, inode=inode)
        if kind is proc.FdKind.SOCKET:   # AF_UNIX; other families are refused there
            from .sockets import for_gatherer
            return for_gatherer(self).file(pid, info)
        raise Unsupported(f"task {pid}: fd {info.fd} is a {kind.value} ({info.target}), which the "
                          "live backend cannot checkpoint yet")

    def in_flight(self, fd: int, holder: int, where: str) -> LiveFile:
        """The File of a file in flight (SCM_RIGHTS) in a queue of task ``holder``, which a
        peek brought into this process as ``fd``: the same LiveFile as a task's fd on the same
        description (kcmp), else gathered as a task's fd would be. Takes ``fd`` over: it stays
        open until close(), so that fds of the tree met later are compared with it."""
        self.in_flight_fds.append(fd)
        me = os.getpid()
        info = proc.read_fd(me, fd)
        key = (info.dev, info.ino, info.kind)
        file = self._same_file(me, fd, key)
        if file is None:
            if info.kind is proc.FdKind.SOCKET:
                from .sockets import for_gatherer
                file = for_gatherer(self).file(me, info, seen_from=holder, where=where)
            else:
                try:
                    file = self._file(me, info)
                except Unsupported as e:
                    raise Unsupported(f"{where}: {e}") from None
            self.file_keys.append((me, fd, file, key))
        return file

    def _unlinked(self, pid: int, info: proc.FdInfo) -> LiveInode:
        with open(f"/proc/{pid}/fd/{info.fd}", "rb") as f:
            data = f.read(MAX_UNLINKED_CONTENTS + 1)
        if len(data) > MAX_UNLINKED_CONTENTS:
            raise Unsupported(f"task {pid}: fd {info.fd}: unlinked file larger than 1 GiB")
        return LiveInode(info.ino, "reg", info.mode & 0o7777, data)

    # -- memory ------------------------------------------------------------------------------
    def _mapped_file(self, pid: int, m) -> LiveFile:
        key = (m.dev, m.inode, m.path)
        file = self.mapped.get(key)
        if file is None:
            inode = self._unlinked_mapped(pid, m) if m.deleted else None
            file = self.mapped[key] = LiveFile("regular", os.O_RDONLY, 0, m.path, inode=inode)
        return file

    def _unlinked_mapped(self, pid: int, m) -> LiveInode:
        """The contents of a mapped file that was unlinked, read once through
        /proc/PID/map_files (the whole file: other mappings may show other parts). Pages of a
        shared mapping written through it are in the file; a private mapping's copied pages
        are saved with the mapping."""
        path = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(MAX_UNLINKED_CONTENTS + 1)
        except OSError as e:
            raise Unsupported(f"task {pid}: mapping {describe(m)} of a deleted file: its "
                              f"contents cannot be read through {path}: {e.strerror}") from None
        if len(data) > MAX_UNLINKED_CONTENTS:
            raise Unsupported(f"task {pid}: mapping {describe(m)}: deleted file larger than 1 GiB")
        return LiveInode(m.inode, "reg", mode & 0o7777, data)

    def _vma_entries(self, pid: int, stat: proc.Stat, ahead=None) -> list:
        """The VMAs with their VmFlags: from smaps (a page-table walk: ~15 ms at 1 GiB; begun
        early when ``ahead``), or from /proc/PID/maps when every line is one whose VmFlags
        are known."""
        if ahead is not None:
            return ahead()
        known = self.known_vm_flags(pid, stat.start_time) if self.known_vm_flags else None
        if known:
            maps = proc.read_maps(pid)
            flags = [known.get(m) for m in maps]
            if None not in flags:
                return [proc.SmapsEntry(m, vm_flags=f) for m, f in zip(maps, flags)]
        return proc.read_smaps_flags(pid)

    def _mm(self, pid: int, stat: proc.Stat, vmas_ahead=None) -> LiveMM:
        vmas = []
        for entry in self._vma_entries(pid, stat, vmas_ahead):
            cls = classify(entry)
            m = entry.mapping
            if cls.kind == VmaKind.UNSUPPORTED:
                raise Unsupported(f"task {pid}: mapping {describe(m)}: {cls.reason}")
            if cls.kind == VmaKind.SYSV_SHM:
                raise Unsupported(f"task {pid}: mapping {describe(m)}: a SysV shared memory "
                                  "segment (shmat), which the live backend cannot checkpoint yet")
            file = self._mapped_file(pid, m) if cls.kind in (VmaKind.FILE_PRIVATE, VmaKind.FILE_SHARED) else None
            vmas.append(LiveVMA(entry, file))
            if cls.kind == VmaKind.ANON_SHARED:
                self._shared_anon(pid, entry, vmas[-1])
        exe = proc.read_exe(pid)
        exe_file = None
        if exe:
            exe_file = next((f for f in self.mapped.values() if f.path == exe.removesuffix(" (deleted)")), None)
        mm = LiveMM(pid, stat, vmas, exe_file)
        mm.brk = _program_break(pid, mm.brk)
        mm.file_ids, mm.vdso_layout = elf_ids.mm_identities(pid, vmas, exe_file)
        return mm

    def _shared_anon(self, pid: int, entry, vma: LiveVMA) -> None:
        """A shared anonymous mapping names its segment: one LiveShmem per (dev, inode)."""
        m = entry.mapping
        seg = self.shmems.get((m.dev, m.inode))
        if seg is None:
            seg = self.shmems[(m.dev, m.inode)] = LiveShmem((m.dev, m.inode))
        seg.add(pid, entry)
        vma.shmem, vma.pgoff = seg, m.offset >> 12



def _register_with_kinds() -> None:
    """The kinds save these stand-ins with the same functions as the model objects."""
    from ckptsim.kinds import load_all
    from ckptsim.kinds.registry import BY_MODEL_TYPE, also_saves
    load_all()
    if LiveMM not in BY_MODEL_TYPE:
        for kind, t in (("mm", LiveMM), ("file", LiveFile), ("pipe", LivePipe), ("fs", LiveFs),
                        ("file_table", LiveFdTable)):
            also_saves(kind, t)
    if LiveShmem not in BY_MODEL_TYPE:
        also_saves("shmem", LiveShmem)


_register_with_kinds()

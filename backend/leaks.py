"""Leak detection for whole-container checkpoints of live trees (``checkpoint --container``,
no CHECKPOINT_SUBTREE), after Linux-CR's rules.

Public API:

    require_container_init(pid)          CheckpointError(EINVAL) unless ``pid`` is pid 1 of its
                                         pid namespace (NSpid in /proc/PID/status ends with
                                         1), ESRCH if there is no such process
    find_leaks(pids) -> list[str]        every object the tree ``pids`` (its processes, all
                                         stopped) shares with a process outside it, one line
                                         each, in a stable order; [] when there is none
    check(pids, log=None)                find_leaks; logs every line through ``log(line)``,
                                         raises LeakError (errno EBUSY, the first line)
    LeakError                            an OSError (EBUSY) whose message is the first leak;
                                         ``.leaks`` holds them all

What counts as a leak (an object of the container that a process outside it references, so
that a restart could not give it back its sharing):

- an open file description of the tree also open in an outside process: regular files,
  directories, devices, anon-inode files (eventfd, epoll...) by kcmp(KCMP_FILE) - two
  independent open()s of one file are not a leak, one description reached from both sides
  is (inherited, passed with SCM_RIGHTS, taken with pidfd_getfd). Candidates are found cheaply
  first: the outside fds whose stat() (through /proc/PID/fd/N) has the same (dev, ino);
- a pipe or FIFO whose *inode* is open outside (either end, or opened again through
  /proc/PID/fd or the FIFO's path): the buffer is shared;
- a socket whose inode is open outside; an AF_UNIX socket of the tree connected to a peer that
  no task of the tree holds (the peer's outside holder is named when one has it open), or a
  listener with a pending connection from outside (sock_diag, backend/sockets.py; sockets of
  our network namespace). A peer that no process at all holds while sockets of the tree have
  files in flight (fdinfo's scm_fds) is taken to be one of them: the gathering saves it with
  the queue that carries it (a peer in flight in an outside queue at the same time is not
  told apart);
- an mm, files table, fs struct (cwd/root/umask) or signal-handler table shared with an
  outside process (kcmp KCMP_VM / KCMP_FILES / KCMP_FS / KCMP_SIGHAND, each process of the
  tree against every process of the machine that is not a zombie or a kernel thread);
- a shared memory segment (a MAP_SHARED mapping of shmem: /dev/zero, SysV, memfd or a deleted
  file) that an outside process maps too (same (dev, inode) in its /proc/PID/maps).

Scope and limits: "outside" is every other process of the machine, the checkpointer included
(an fd it holds on the tree's pipe is a leak). Processes are compared by their thread-group
leader: a thread that unshared its files or fs table from its leader is refused by the
gathering (backend/snapshot.py), so it never needs a look of its own. Regular files shared through the page cache (both sides opening or mapping the same path)
are not leaks: they are saved by path. Processes the checkpointer may not kcmp (EPERM) are
skipped. Cost: one stat per fd of the machine, plus 4 kcmp calls per (tree process, outside
process) pair - a few milliseconds on a machine with a few hundred processes.
"""
from __future__ import annotations

import errno
import os
import stat as _stat
from typing import Callable, Iterable

from ckptsim.cr.context import CheckpointError
from ckptsim.errors import CkptsimError

from . import kabi, proc

__all__ = ["LeakError", "require_container_init", "find_leaks", "check"]

PF_KTHREAD = 0x00200000
_SHARED_STRUCTS = ((kabi.KCMP_VM, "address space (mm)"), (kabi.KCMP_FILES, "files table"),
                   (kabi.KCMP_FS, "fs struct (cwd, root, umask)"),
                   (kabi.KCMP_SIGHAND, "signal handlers"))
_SHMEM_PREFIXES = ("/dev/zero", "/SYSV", "/memfd:", "/dev/shm/")


class LeakError(CkptsimError, OSError):
    """The container shares objects with the outside; errno EBUSY, message: the first leak."""

    def __init__(self, leaks: list[str]):
        OSError.__init__(self, errno.EBUSY, leaks[0])
        self.leaks = leaks

    def __str__(self) -> str:
        return self.strerror


def require_container_init(pid: int) -> None:
    """EINVAL unless ``pid`` is the init (pid 1) of its pid namespace; ESRCH if it is gone."""
    try:
        status = proc.read_status(pid) if pid > 0 else None
    except proc.ProcessGone:
        status = None
    if status is None:
        raise CheckpointError(errno.ESRCH, f"no process {pid}")
    nspid = status.nspid or (status.pid,)
    if nspid[-1] != 1:
        raise CheckpointError(errno.EINVAL, f"process {pid} is not a container init (it is pid "
                                            f"{nspid[-1]} in its pid namespace, not 1): a "
                                            "container checkpoint needs the init of a pid "
                                            "namespace; use a subtree checkpoint")


def _kcmp(pid1: int, pid2: int, kind: int, idx1: int = 0, idx2: int = 0) -> bool | None:
    """True if the two objects are the same, False if not, None if kcmp may not tell."""
    try:
        return kabi.syscall(kabi.SYS_kcmp, pid1, pid2, kind, idx1, idx2, what="kcmp") == 0
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.ESRCH, errno.EBADF, errno.EINVAL):
            return None
        raise


def _all_pids() -> list[int]:
    return sorted(int(n) for n in os.listdir("/proc") if n.isdigit())


def _comm(pid: int) -> str:
    try:
        return proc.read_comm(pid)
    except (proc.ProcessGone, OSError):
        return "?"


def _live_user_process(pid: int) -> bool:
    """Not a zombie, not a kernel thread (those have no mm, files or fs to share)."""
    try:
        st = proc.read_stat(pid)
    except (proc.ProcessGone, OSError):
        return False
    return st.state not in ("Z", "X") and not (st.flags & PF_KTHREAD)


def _fds(pid: int) -> list[tuple[int, os.stat_result]]:
    """(fd, stat of the open file) of every fd of ``pid``; [] if it is gone."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return []
    out = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            out.append((int(name), os.stat(f"{base}/{name}")))
        except OSError:
            continue                        # closed meanwhile, or not stat-able
    return sorted(out, key=lambda x: x[0])


def _describe(pid: int, fd: int, st: os.stat_result) -> str:
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        target = f"inode {st.st_ino}"
    if _stat.S_ISFIFO(st.st_mode) and target.startswith("/"):
        return f"FIFO {target}"
    if _stat.S_ISREG(st.st_mode):
        return f"file {target}"
    return target


def _by_inode(st: os.stat_result) -> bool:
    """Pipes, FIFOs and sockets: any outside reference to the inode is a leak."""
    return _stat.S_ISFIFO(st.st_mode) or _stat.S_ISSOCK(st.st_mode)


def _shmem_mappings(pid: int) -> dict[tuple[int, int], str]:
    out = {}
    try:
        maps = proc.read_maps(pid)
    except (proc.ProcessGone, OSError):
        return out
    for m in maps:
        if m.shared and m.inode and (m.path.startswith(_SHMEM_PREFIXES) or m.deleted):
            out[(m.dev, m.inode)] = m.path
    return out


def find_leaks(pids: Iterable[int], own_fds: Iterable[int] = ()) -> list[str]:
    """See the module doc. ``pids``: the processes of the tree (stopped). ``own_fds``: this
    checkpointer's image and log fds, which are no leak when the tree holds the same files (a
    self-checkpoint writes to the caller's fd; the seed's leak check counted one reference
    each for the image and the log file the same way)."""
    tree = list(dict.fromkeys(int(p) for p in pids))
    mine = {(os.getpid(), fd) for fd in own_fds}
    members = set(tree)
    outside = [p for p in _all_pids() if p not in members]
    leaks: list[str] = []

    # -- open files -------------------------------------------------------------------------
    tree_fds = {p: _fds(p) for p in tree}
    wanted: dict[tuple[int, int], list[tuple[int, int, os.stat_result]]] = {}
    sock_inodes: dict[int, tuple[int, int]] = {}      # socket inode -> (pid, fd) in the tree
    for p in tree:
        for fd, st in tree_fds[p]:
            wanted.setdefault((st.st_dev, st.st_ino), []).append((p, fd, st))
            if _stat.S_ISSOCK(st.st_mode):
                sock_inodes.setdefault(st.st_ino, (p, fd))
    peers = _unix_peers(sock_inodes) if sock_inodes else {}
    peer_inodes = {peer for _, _, peer in peers}
    holders: dict[tuple[int, int], list[tuple[int, int]]] = {}
    outside_socks: dict[int, tuple[int, int]] = {}
    for q in outside:
        for ofd, st in _fds(q):
            key = (st.st_dev, st.st_ino)
            if key in wanted and (q, ofd) not in mine:
                holders.setdefault(key, []).append((q, ofd))
            if _stat.S_ISSOCK(st.st_mode) and st.st_ino in peer_inodes:
                outside_socks.setdefault(st.st_ino, (q, ofd))
    for key, inside in wanted.items():
        seen: set[int] = set()
        for q, ofd in holders.get(key, ()):
            for p, fd, st in inside:
                if q in seen:
                    break
                if _by_inode(st) or _kcmp(p, q, kabi.KCMP_FILE, fd, ofd):
                    what = "open" if _by_inode(st) else "the same open file"
                    leaks.append(f"{_describe(p, fd, st)} (fd {fd} of task {p}) is also {what} "
                                 f"in process {q} ({_comm(q)}, fd {ofd}) outside the container")
                    seen.add(q)

    # -- unix socket peers --------------------------------------------------------------------
    carrying: bool | None = None        # the tree's sockets have files in flight
    for ino, how, peer in peers:
        if peer in sock_inodes:
            continue
        p, fd = sock_inodes[ino]
        holder = outside_socks.get(peer)
        if holder is None:
            if carrying is None:
                carrying = any(_files_in_flight(q, qfd) for q, qfd in
                               ((q, qfd) for q in tree for qfd, st in tree_fds[q]
                                if _stat.S_ISSOCK(st.st_mode)))
            if carrying:
                continue    # held by nobody: in flight in a queue of the tree (the gathering saves it)
        where = (f"held by process {holder[0]} ({_comm(holder[0])}, fd {holder[1]}) outside the "
                 "container" if holder else "which no task of the container holds")
        leaks.append(f"socket:[{ino}] (fd {fd} of task {p}) {how} socket:[{peer}], {where}")

    # -- shared kernel structures -------------------------------------------------------------
    live_tree = [p for p in tree if _live_user_process(p)]
    live_outside = [q for q in outside if _live_user_process(q)] if live_tree else []
    for p in live_tree:
        for q in live_outside:
            for kind, name in _SHARED_STRUCTS:
                if _kcmp(p, q, kind):
                    leaks.append(f"task {p} shares its {name} with process {q} ({_comm(q)}) "
                                 "outside the container")

    # -- shared memory segments ---------------------------------------------------------------
    shm: dict[tuple[int, int], tuple[int, str]] = {}
    for p in live_tree:
        for key, path in _shmem_mappings(p).items():
            shm.setdefault(key, (p, path))
    if shm:
        for q in live_outside:
            for key in _shmem_mappings(q).keys() & shm.keys():
                p, path = shm[key]
                leaks.append(f"shared memory {path} (mapped by task {p}) is also mapped by "
                             f"process {q} ({_comm(q)}) outside the container")
    return leaks


def _files_in_flight(pid: int, fd: int) -> bool:
    """The socket ``fd`` of ``pid`` has files in flight in its queue (fdinfo's scm_fds)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("scm_fds:"):
                    return line.split()[1] != "0"
    except (OSError, IndexError):
        pass
    return False


def _unix_peers(sock_inodes: dict[int, tuple[int, int]]) -> list[tuple[int, str, int]]:
    """(tree socket inode, relation, other socket inode) for each AF_UNIX peer and each
    pending connection of a listener (sock_diag of our network namespace)."""
    from .sockets import diag_dump
    try:
        diag = diag_dump()
    except OSError:
        return []
    out = []
    for ino in sorted(sock_inodes):
        d = diag.get(ino)
        if d is None:
            continue
        if d.peer:
            out.append((ino, "is connected to", d.peer))
        out.extend((ino, "has a pending connection from", c) for c in d.icons if c)
    return out


def check(pids: Iterable[int], log: Callable[[str], None] | None = None,
          own_fds: Iterable[int] = ()) -> None:
    """Raise LeakError (EBUSY, the first leak) if the tree shares anything with the outside;
    every leak is passed to ``log`` first. ``own_fds``: see find_leaks."""
    leaks = find_leaks(pids, own_fds)
    if leaks:
        for line in leaks:
            if log is not None:
                log(line)
        raise LeakError(leaks)

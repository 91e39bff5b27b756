"""/proc/PID/fd and /proc/PID/fdinfo as typed entries (part of the backend/proc.py readers;
every name here is importable from backend.proc too).

    read_fds(pid) -> list[FdInfo]           every open fd
    read_fd(pid, fd) -> FdInfo              one
"""
from __future__ import annotations

import enum
import errno
import os
import re
import stat as _stat
from dataclasses import dataclass

from backend.proc_base import _DELETED, ProcessGone, _listdir, _path, process_exists

class FdKind(enum.Enum):
    REGULAR = "regular"
    DIRECTORY = "directory"
    PIPE = "pipe"               # an anonymous pipe: target "pipe:[INO]"
    FIFO = "fifo"               # a named pipe opened by path
    SOCKET = "socket"           # target "socket:[INO]"
    ANON_INODE = "anon_inode"   # eventfd, epoll, signalfd, timerfd, userfaultfd, bpf-map...
    CHAR_DEVICE = "char_device"
    BLOCK_DEVICE = "block_device"
    SYMLINK = "symlink"         # an O_PATH|O_NOFOLLOW fd on a symlink
    OTHER = "other"             # e.g. a bare "net:[...]"/"mnt:[...]" namespace fd


@dataclass(frozen=True)
class FdInfo:
    """One open fd. ``target`` is the raw readlink of /proc/PID/fd/N; ``path`` is the file's
    path without " (deleted)" for path-named files, "" otherwise; ``anon_name`` is the
    anon_inode name without brackets ("eventfd", "eventpoll", "[userfaultfd]" -> "userfaultfd").
    ``flags`` is the f_flags from fdinfo (octal there); ``mode``/``dev``/``rdev`` come from a
    stat() through the magic link (0 when the fd vanished in between). ``extra`` keeps the
    kind-specific fdinfo lines (eventfd-count, tfd..., in order) as (key, value) pairs."""
    fd: int
    target: str
    kind: FdKind
    pos: int
    flags: int
    mnt_id: int
    ino: int
    path: str = ""
    deleted: bool = False
    anon_name: str = ""
    mode: int = 0
    dev: int = 0
    rdev: int = 0
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def access_mode(self) -> int:
        return self.flags & os.O_ACCMODE

    @property
    def cloexec(self) -> bool:
        return bool(self.flags & os.O_CLOEXEC)


_BRACKET_INO = re.compile(r"^([a-z_]+):\[(\d+)\]$")


def _classify(target: str, st: os.stat_result | None) -> tuple[FdKind, str, bool, str]:
    """(kind, path, deleted, anon_name) for a readlink target and the stat of the fd."""
    if target.startswith("anon_inode:"):
        name = target[len("anon_inode:"):]
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        return FdKind.ANON_INODE, "", False, name
    m = _BRACKET_INO.match(target)
    if m:
        kind = {"pipe": FdKind.PIPE, "socket": FdKind.SOCKET}.get(m.group(1), FdKind.OTHER)
        return kind, "", False, ""
    if not target.startswith("/"):
        return FdKind.OTHER, "", False, ""
    path, deleted = target, False
    if path.endswith(_DELETED):
        path, deleted = path[:-len(_DELETED)], True
    kind = FdKind.OTHER
    if st is not None:
        mode = st.st_mode
        if _stat.S_ISREG(mode):
            kind = FdKind.REGULAR
        elif _stat.S_ISDIR(mode):
            kind = FdKind.DIRECTORY
        elif _stat.S_ISFIFO(mode):
            kind = FdKind.FIFO
        elif _stat.S_ISSOCK(mode):
            kind = FdKind.SOCKET
        elif _stat.S_ISCHR(mode):
            kind = FdKind.CHAR_DEVICE
        elif _stat.S_ISBLK(mode):
            kind = FdKind.BLOCK_DEVICE
        elif _stat.S_ISLNK(mode):
            kind = FdKind.SYMLINK
    return kind, path, deleted, ""


def _parse_fdinfo(text: str) -> tuple[int, int, int, int, tuple[tuple[str, str], ...]]:
    pos = flags = mnt_id = ino = 0
    extra: list[tuple[str, str]] = []
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if not sep:
            continue
        v = v.strip()
        if k == "pos":
            pos = int(v)
        elif k == "flags":
            flags = int(v, 8)
        elif k == "mnt_id":
            mnt_id = int(v)
        elif k == "ino":
            ino = int(v)
        else:
            extra.append((k, v))
    return pos, flags, mnt_id, ino, tuple(extra)


def _read_one_fd(pid: int, fd: int) -> FdInfo | None:
    """None if the fd was closed while we looked (the process itself still exists)."""
    link = _path(pid, f"fd/{fd}")
    try:
        target = os.readlink(link)
        with open(_path(pid, f"fdinfo/{fd}"), "rb") as f:
            info = f.read().decode("utf-8", "surrogateescape")
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):
            if e.errno == errno.ESRCH or not process_exists(pid):
                raise ProcessGone(pid, f"fd {fd}") from None
            return None
        raise
    try:
        # stat through the magic link: the open file itself, even when unlinked
        st: os.stat_result | None = os.stat(link)
    except OSError:
        st = None
    pos, flags, mnt_id, ino, extra = _parse_fdinfo(info)
    kind, path, deleted, anon = _classify(target, st)
    if not ino and st is not None:
        ino = st.st_ino
    if not ino:
        m = _BRACKET_INO.match(target)
        if m:
            ino = int(m.group(2))
    return FdInfo(fd=fd, target=target, kind=kind, pos=pos, flags=flags, mnt_id=mnt_id,
                  ino=ino, path=path, deleted=deleted, anon_name=anon,
                  mode=st.st_mode if st else 0, dev=st.st_dev if st else 0,
                  rdev=st.st_rdev if st else 0, extra=extra)


def read_fd(pid: int, fd: int) -> FdInfo:
    """One fd of ``pid``; FileNotFoundError naming the pid and fd when it is not open."""
    info = _read_one_fd(pid, fd)
    if info is None:
        raise FileNotFoundError(errno.EBADF, f"process {pid} has no fd {fd}")
    return info


def read_fds(pid: int) -> list[FdInfo]:
    """Every open fd of ``pid``, by fd number. An fd closed while we read is left out."""
    fds = sorted(int(n) for n in _listdir(pid, "fd") if n.isdigit())
    out = []
    for fd in fds:
        info = _read_one_fd(pid, fd)
        if info is not None:
            out.append(info)
    return out

"""Names of UNIX domain sockets (part of ``unix.py``, which re-exports them).

A socket bound to a path owns a ``SocketInode`` in the file system; abstract names (a leading
NUL) live in a per-kernel table. Here: that inode, the table, and bind, unbind, autobind and
lookup (``find_socket``, Linux's unix_find_other).
"""
from __future__ import annotations

import errno
import posixpath
import stat
from typing import TYPE_CHECKING

from ..errors import kerr
from .vfs import Inode, kernel_filesystem
from .vfs_ops import MAY_WRITE, permitted

if TYPE_CHECKING:
    from .unix import UnixSocket

UNIX_PATH_MAX = 108


class SocketInode(Inode):
    """The file system node a socket is bound to (S_IFSOCK); ``bound`` is the live socket."""

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0):
        super().__init__(ino, "sock", mode, uid, gid)
        self.bound: UnixSocket | None = None

    @property
    def st_mode(self) -> int:
        return stat.S_IFSOCK | self.mode


# -- names: abstract names per kernel, path names on socket inodes -------------------------

def abstract_names(kernel) -> dict[bytes, UnixSocket]:
    names = getattr(kernel, "unix_abstract_names", None)
    if names is None:
        names = kernel.unix_abstract_names = {}
    return names


def filesystem(kernel):
    fs = getattr(kernel, "vfs", None)
    return fs if fs is not None else kernel_filesystem(kernel)


def normalize_address(addr) -> str | bytes:
    """A sockaddr_un as Python's socket module writes it: str path, or bytes starting with NUL
    for an abstract name; ``""`` asks bind for an automatic abstract name."""
    if isinstance(addr, str):
        addr = addr.encode("utf-8", "surrogateescape")
    if not isinstance(addr, (bytes, bytearray)):
        raise kerr(errno.EINVAL, f"bad AF_UNIX address {addr!r}")
    addr = bytes(addr)
    if len(addr) > UNIX_PATH_MAX:
        raise kerr(errno.EINVAL, f"address of {len(addr)} bytes is longer than {UNIX_PATH_MAX}")
    if addr.startswith(b"\0"):
        return addr
    path = addr.split(b"\0", 1)[0]   # the kernel stops a path at its first NUL
    return path.decode("utf-8", "surrogateescape")


def bind_path(kernel, sock: UnixSocket, parent, leaf: str, full: str,
              mode: int = 0o777, uid: int = 0, gid: int = 0) -> SocketInode:
    """Create the socket inode ``parent/leaf`` (absolute ``full``) and bind ``sock`` to it."""
    if parent is None or parent.nlink == 0:
        raise kerr(errno.ENOENT, f"no directory for {full}")
    if not parent.is_dir():
        raise kerr(errno.ENOTDIR, f"{posixpath.dirname(full)} is not a directory")
    if not leaf or leaf in parent.children:
        raise kerr(errno.EADDRINUSE, f"{full} exists")
    fs = filesystem(kernel)
    inode = SocketInode(fs.next_ino, mode, uid, gid)
    fs.next_ino += 1   # FileSystem.new_inode only builds dir/reg/fifo inodes
    fs.link(parent, leaf, inode)
    inode.bound = sock
    sock.inode, sock.bound_path = inode, full
    return inode


def bind_absolute(kernel, sock: UnixSocket, full: str, mode: int = 0o777) -> SocketInode:
    """bind to an absolute path without a task (restart)."""
    parent = filesystem(kernel).lookup(posixpath.dirname(full))
    return bind_path(kernel, sock, parent, posixpath.basename(full), full, mode)


def unbind(kernel, sock: UnixSocket) -> None:
    """Forget the name: the path inode stays in the tree (connect then gets ECONNREFUSED)."""
    if isinstance(sock.address, bytes):
        names = abstract_names(kernel)
        if names.get(sock.address) is sock:
            del names[sock.address]
    if sock.inode is not None and sock.inode.bound is sock:
        sock.inode.bound = None


def autobind_name(kernel) -> bytes:
    """Linux's autobind: an abstract name of five hex digits, the first free one."""
    names = abstract_names(kernel)
    nr = getattr(kernel, "unix_autobind_next", 0)
    for _ in range(1 << 20):
        name = b"\0%05x" % nr
        nr = (nr + 1) & 0xFFFFF
        if name not in names:
            kernel.unix_autobind_next = nr
            return name
    raise kerr(errno.ENOSPC, "no free autobind name")


def find_socket(kernel, t, addr, sock_type: int) -> UnixSocket:
    """The live socket bound to ``addr`` (unix_find_other)."""
    addr = normalize_address(addr)
    if addr == "":
        raise kerr(errno.EINVAL, "empty address")
    if isinstance(addr, bytes):
        other = abstract_names(kernel).get(addr)
        if other is None:
            raise kerr(errno.ECONNREFUSED, f"no socket bound to abstract {addr[1:]!r}")
    else:
        lk = kernel._lookup(t, addr)   # FileOps' path walk (cwd, root, search permission)
        if lk.inode is None:
            raise kerr(errno.ENOENT, f"{lk.path} does not exist")
        if not permitted(getattr(t, "cred", None), lk.inode, MAY_WRITE):
            raise kerr(errno.EACCES, f"{lk.path}: no write permission on the socket")
        other = lk.inode.bound if isinstance(lk.inode, SocketInode) else None
        if other is None:
            raise kerr(errno.ECONNREFUSED, f"no socket is bound to {lk.path}")
    if other.type != sock_type:
        raise kerr(errno.EPROTOTYPE, "socket types differ")
    return other

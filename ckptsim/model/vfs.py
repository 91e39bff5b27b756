"""The in-memory file system and the per-task file objects.

Objects (syscalls are in ``vfs_ops.FileOps``, re-exported here):

- ``Inode``: a directory, regular file or FIFO. Regular data is a ``bytearray``; the mm area maps
  file pages through ``read_at``/``write_at``/``truncate``. An unlinked inode (``nlink == 0``)
  lives on as long as some ``File`` points at it.
- ``FileSystem``: the tree (``kernel.vfs``), inode number allocation, path lookups that
  ignore permissions (for C/R and tests).
- ``FileType``: per-kind operations of an open file (read/write/lseek/release...). Regular
  files and directories are here, pipes and FIFOs in ``pipe.py``; sockets register theirs in
  ``FILE_TYPES`` under the kind ``"socket"``.
- ``File`` (Shared): the open file description: inode, flags, pos, ftype, private, path.
- ``FdTable`` (Shared): fd -> (File, close-on-exec). Each slot holds one reference of its File.
- ``FsContext`` (Shared): root, cwd (inode + path), umask.
"""
from __future__ import annotations

import errno
import os
import stat

from ..errors import kerr
from .shared import Shared

O_ACCMODE = os.O_ACCMODE
# Status flags F_SETFL may change (fs/fcntl.c SETFL_MASK); the rest are fixed at open.
SETFL_MASK = os.O_APPEND | os.O_NONBLOCK | os.O_ASYNC | os.O_DIRECT | os.O_NOATIME
# Flags that only matter during open and are not kept in f_flags (fs/open.c).
OPEN_ONLY_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_CLOEXEC
NR_OPEN_DEFAULT = 1024  # RLIMIT_NOFILE soft limit

KIND_DIR, KIND_REG, KIND_FIFO = "dir", "reg", "fifo"
_KIND_IFMT = {KIND_DIR: stat.S_IFDIR, KIND_REG: stat.S_IFREG, KIND_FIFO: stat.S_IFIFO}


def readable(flags: int) -> bool:
    return (flags & O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)


def writable(flags: int) -> bool:
    return (flags & O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)


class Inode:
    """A file system object. ``mode`` holds the permission bits only; ``st_mode`` adds the type."""

    def __init__(self, ino: int, kind: str, mode: int, uid: int = 0, gid: int = 0):
        self.ino = ino
        self.kind = kind
        self.mode = mode & 0o7777
        self.uid = uid
        self.gid = gid
        self.nlink = 0              # set by the FileSystem when linked
        self.data = bytearray()     # regular files
        self.children: dict[str, Inode] = {}  # directories
        self.parent: Inode | None = None      # directories: for ".."
        self.pipe = None            # FIFOs: the Pipe while some File has it open
        # FIFOs: tasks blocked in open(), counted as peers the way Linux counts them.
        self.fifo_waiting = {"r": set(), "w": set()}

    @property
    def st_mode(self) -> int:
        return _KIND_IFMT[self.kind] | self.mode

    @property
    def size(self) -> int:
        return len(self.data) if self.kind == KIND_REG else 0

    def is_dir(self) -> bool:
        return self.kind == KIND_DIR

    def read_at(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0:
            raise kerr(errno.EINVAL, "negative offset or count")
        return bytes(self.data[offset:offset + n])

    def write_at(self, offset: int, data) -> int:
        """Write ``data`` at ``offset``, zero-filling a hole past the end."""
        if offset < 0:
            raise kerr(errno.EINVAL, "negative offset")
        size = len(self.data)
        if offset > size:
            self.data.extend(bytes(offset - size))
        self.data[offset:offset + len(data)] = data
        return len(data)

    def truncate(self, n: int) -> None:
        if n < 0:
            raise kerr(errno.EINVAL, "negative length")
        size = len(self.data)
        if n < size:
            del self.data[n:]
        else:
            self.data.extend(bytes(n - size))

    def __repr__(self) -> str:
        return f"<Inode {self.ino} {self.kind} {self.mode:o} nlink={self.nlink}>"


class FileSystem:
    """The tree of inodes. Inode numbers are allocated in order (deterministic)."""

    ROOT_INO = 2

    # Anonymous inodes (pipefs, sockfs) are numbered apart, so that restoring a pipe does
    # not move the numbering of the file system the image's snapshot recorded.
    ANON_INO_BASE = 1 << 32

    def __init__(self):
        self.next_ino = self.ROOT_INO
        self.next_anon_ino = self.ANON_INO_BASE
        self.root = self.new_inode(KIND_DIR, 0o755)
        self.root.nlink = 2
        self.root.parent = self.root

    def new_inode(self, kind: str, mode: int, uid: int = 0, gid: int = 0) -> Inode:
        inode = Inode(self.next_ino, kind, mode, uid, gid)
        self.next_ino += 1
        return inode

    def new_anon_inode(self, kind: str, mode: int, uid: int = 0, gid: int = 0) -> Inode:
        inode = Inode(self.next_anon_ino, kind, mode, uid, gid)
        self.next_anon_ino += 1
        return inode

    def link(self, parent: Inode, name: str, inode: Inode) -> None:
        """Enter ``inode`` as ``parent/name`` (the caller checked that the name is free)."""
        parent.children[name] = inode
        if inode.kind == KIND_DIR:
            inode.parent = parent
            inode.nlink = 2
            parent.nlink += 1
        else:
            inode.nlink += 1

    def unlink(self, parent: Inode, name: str) -> Inode:
        inode = parent.children.pop(name)
        if inode.kind == KIND_DIR:
            inode.nlink = 0
            parent.nlink -= 1
        else:
            inode.nlink -= 1
        return inode

    def lookup(self, path: str) -> Inode | None:
        """The inode at an absolute, normalized path (no permission checks), or None."""
        node = self.root
        for name in split_path(path):
            if node.kind != KIND_DIR:
                return None
            node = node.parent if name == ".." else node.children.get(name)
            if node is None:
                return None
        return node

    def walk(self):
        """Yield ``(path, inode)`` for every linked inode, in sorted path order, root first."""
        out = [("/", self.root)]
        stack = [("", self.root)]
        while stack:
            prefix, node = stack.pop()
            for name, child in node.children.items():
                path = f"{prefix}/{name}"
                out.append((path, child))
                if child.kind == KIND_DIR:
                    stack.append((path, child))
        out.sort(key=lambda item: item[0])
        return out

    def path_of(self, inode: Inode) -> str | None:
        """The path of a linked inode (searching the tree), or None if it is not linked."""
        for path, node in self.walk():
            if node is inode:
                return path
        return None


def split_path(path: str) -> list[str]:
    return [c for c in path.split("/") if c and c != "."]


def kernel_filesystem(kernel) -> FileSystem:
    """The kernel's file system (``kernel.vfs``), created on first use."""
    fs = getattr(kernel, "vfs", None)
    if fs is None:
        fs = FileSystem()
        kernel.vfs = fs
    return fs


class FileType:
    """Operations of one kind of open file; ``File.ftype`` points at a (shared) instance.

    ``kind`` is one of "regular", "dir", "pipe", "fifo", "socket"; ``seekable`` says whether
    ``lseek``/``pread``/``pwrite`` make sense. Every method receives the kernel, the calling task
    (``None`` for ``release``) and the ``File``. The defaults give Linux's errnos for a file that
    does not support the operation. Read and write follow the blocking convention: raise
    ``Blocked`` unless ``file.flags & O_NONBLOCK``, then ``kerr(EAGAIN)``.
    """

    kind = "regular"
    seekable = False

    def read(self, kernel, t, file: "File", n: int) -> bytes:
        raise kerr(errno.EINVAL, f"{self.kind} file does not support read")

    def write(self, kernel, t, file: "File", data) -> int:
        raise kerr(errno.EINVAL, f"{self.kind} file does not support write")

    def pread(self, kernel, t, file: "File", n: int, offset: int) -> bytes:
        raise kerr(errno.ESPIPE, f"{self.kind} file is not seekable")

    def pwrite(self, kernel, t, file: "File", data, offset: int) -> int:
        raise kerr(errno.ESPIPE, f"{self.kind} file is not seekable")

    def lseek(self, kernel, file: "File", offset: int, whence: int) -> int:
        raise kerr(errno.ESPIPE, f"{self.kind} file is not seekable")

    def stat(self, file: "File") -> dict:
        inode = file.inode
        if inode is None:
            return {"st_ino": 0, "st_mode": 0, "st_nlink": 1, "st_size": 0, "st_uid": 0, "st_gid": 0}
        return {"st_ino": inode.ino, "st_mode": inode.st_mode, "st_nlink": inode.nlink,
                "st_size": inode.size, "st_uid": inode.uid, "st_gid": inode.gid}

    def release(self, kernel, file: "File") -> None:
        """The last reference of ``file`` went away: drop what it holds (e.g. ``private``)."""


def _seek(file: "File", offset: int, whence: int, size: int) -> int:
    if whence == os.SEEK_SET:
        new = offset
    elif whence == os.SEEK_CUR:
        new = file.pos + offset
    elif whence == os.SEEK_END:
        new = size + offset
    else:
        raise kerr(errno.EINVAL, f"bad whence {whence}")
    if new < 0:
        raise kerr(errno.EINVAL, f"resulting offset {new} is negative")
    file.pos = new
    return new


class RegularType(FileType):
    kind = "regular"
    seekable = True

    def read(self, kernel, t, file, n):
        data = file.inode.read_at(file.pos, n)
        file.pos += len(data)
        return data

    def write(self, kernel, t, file, data):
        if file.flags & os.O_APPEND:
            file.pos = file.inode.size
        written = file.inode.write_at(file.pos, data)
        file.pos += written
        return written

    def pread(self, kernel, t, file, n, offset):
        return file.inode.read_at(offset, n)

    def pwrite(self, kernel, t, file, data, offset):
        # Linux quirk kept on purpose: pwrite on an O_APPEND file appends.
        if file.flags & os.O_APPEND:
            offset = file.inode.size
        return file.inode.write_at(offset, data)

    def lseek(self, kernel, file, offset, whence):
        return _seek(file, offset, whence, file.inode.size)


class DirType(FileType):
    kind = "dir"
    seekable = True

    def read(self, kernel, t, file, n):
        raise kerr(errno.EISDIR, "read on a directory")

    def lseek(self, kernel, file, offset, whence):
        return _seek(file, offset, whence, 0)


REGULAR = RegularType()
DIRECTORY = DirType()
# FileType singletons by kind; pipe.py adds "pipe"/"fifo", the socket area adds "socket".
FILE_TYPES: dict[str, FileType] = {"regular": REGULAR, "dir": DIRECTORY}


class File(Shared):
    """An open file description, shared by dup and fork (position and status flags)."""

    def __init__(self, inode: Inode | None, flags: int, ftype: FileType, private=None,
                 path: str = ""):
        super().__init__()
        self.inode = inode
        self.flags = flags & ~OPEN_ONLY_FLAGS
        self.pos = 0
        self.ftype = ftype
        self.private = private
        self.path = path   # absolute path at open time (there is no rename)

    @property
    def kind(self) -> str:
        return self.ftype.kind

    def readable(self) -> bool:
        return readable(self.flags)

    def writable(self) -> bool:
        return writable(self.flags)

    def release(self, kernel) -> None:
        self.ftype.release(kernel, self)

    def linked_path(self, kernel) -> str | None:
        """The path that names this file's inode now, or None if the inode is unlinked."""
        inode = self.inode
        if inode is None or inode.nlink == 0:
            return None
        vfs = kernel_filesystem(kernel)
        if self.path and vfs.lookup(self.path) is inode:
            return self.path
        return vfs.path_of(inode)

    def __repr__(self) -> str:
        return f"<File {self.kind} {self.path or ''} flags={self.flags:#o} pos={self.pos} refs={self.refs}>"


class FdTable(Shared):
    """fd -> File; each slot owns one reference of its File."""

    def __init__(self, limit: int = NR_OPEN_DEFAULT):
        super().__init__()
        self.limit = limit
        self.fds: dict[int, File] = {}
        self.cloexec: set[int] = set()

    def alloc_fd(self, start: int = 0) -> int:
        fd = start
        while fd in self.fds:
            fd += 1
        if fd >= self.limit:
            raise kerr(errno.EMFILE, f"no free descriptor below {self.limit}")
        return fd

    def install(self, file: File, fd: int | None = None, cloexec: bool = False) -> int:
        """Enter ``file`` (taking over one of its references) at ``fd`` or the lowest free fd.

        On error the reference stays with the caller.
        """
        if fd is None:
            fd = self.alloc_fd()
        elif fd < 0 or fd >= self.limit:
            raise kerr(errno.EMFILE, f"fd {fd} beyond the limit {self.limit}")
        elif fd in self.fds:
            raise kerr(errno.EBUSY, f"fd {fd} is in use")
        self.fds[fd] = file
        self.set_cloexec(fd, cloexec)
        return fd

    def get(self, fd: int | None = None):
        """``get(fd)`` is the File at ``fd`` (EBADF if none); ``get()`` takes a reference of
        the table itself, as for every Shared object (CLONE_FILES, restart)."""
        if fd is None:
            return Shared.get(self)
        file = self.fds.get(fd)
        if file is None:
            raise kerr(errno.EBADF, f"fd {fd} is not open")
        return file

    def is_cloexec(self, fd: int) -> bool:
        self.get(fd)
        return fd in self.cloexec

    def set_cloexec(self, fd: int, on: bool) -> None:
        self.get(fd)
        if on:
            self.cloexec.add(fd)
        else:
            self.cloexec.discard(fd)

    def close(self, kernel, fd: int) -> None:
        file = self.get(fd)
        del self.fds[fd]
        self.cloexec.discard(fd)
        file.put(kernel)

    def items(self):
        """``(fd, file, cloexec)`` in fd order."""
        return [(fd, self.fds[fd], fd in self.cloexec) for fd in sorted(self.fds)]

    def __len__(self) -> int:
        return len(self.fds)

    def fork_copy(self, kernel) -> "FdTable":
        child = FdTable(self.limit)
        for fd, file, cloexec in self.items():
            child.fds[fd] = file.get()
            if cloexec:
                child.cloexec.add(fd)
        return child

    def close_on_exec(self, kernel) -> None:
        for fd in sorted(self.cloexec):
            self.close(kernel, fd)

    def release(self, kernel) -> None:
        for fd in sorted(self.fds):
            self.close(kernel, fd)


class FsContext(Shared):
    """A task's root, cwd and umask (Linux's fs_struct)."""

    def __init__(self, root: Inode, cwd: Inode | None = None, cwd_path: str = "/",
                 umask: int = 0o022, root_path: str = "/"):
        super().__init__()
        self.root = root
        self.root_path = root_path
        self.cwd = cwd if cwd is not None else root
        self.cwd_path = cwd_path
        self.umask = umask

    @classmethod
    def new(cls, filesystem: FileSystem) -> "FsContext":
        return cls(filesystem.root)

    def fork_copy(self) -> "FsContext":
        return FsContext(self.root, self.cwd, self.cwd_path, self.umask, self.root_path)

    def __repr__(self) -> str:
        return f"<FsContext cwd={self.cwd_path} root={self.root_path} umask={self.umask:o}>"


def __getattr__(name: str):
    """``FileOps`` (the syscalls, next door in vfs_ops.py) is re-exported lazily: vfs_ops
    imports this module, so importing it here at load time made vfs_ops unimportable first."""
    if name == "FileOps":
        from .vfs_ops import FileOps
        return FileOps
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Inode", "FileSystem", "FileType", "File", "FdTable", "FsContext", "FileOps",
           "FILE_TYPES", "REGULAR", "DIRECTORY", "kernel_filesystem", "SETFL_MASK"]

"""File syscalls (``FileOps``, a Kernel mixin): open/close/read/write, fd juggling, directories.

Every method takes the calling task ``t`` first; it uses ``t.files`` (FdTable), ``t.fs``
(FsContext) and ``t.cred`` (``fsuid``/``fsgid``/``groups``; fsuid 0 or CAP_DAC_OVERRIDE
bypasses permission bits). FIFOs are opened through ``self.fifo_open`` (``PipeOps``).
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ..errors import kerr
from .vfs import (DIRECTORY, KIND_DIR, KIND_FIFO, KIND_REG, REGULAR, SETFL_MASK, File, Inode,
                  kernel_filesystem, readable, writable)

MAY_EXEC, MAY_WRITE, MAY_READ = 1, 2, 4
CAP_DAC_OVERRIDE = 1
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL = 0, 1, 2, 3, 4
F_DUPFD_CLOEXEC = 1030
FD_CLOEXEC = 1


@dataclass
class Lookup:
    """Result of a path walk: the final inode (None if absent), its parent dir and name."""
    parent: Inode | None
    name: str
    inode: Inode | None
    path: str            # absolute, normalized
    must_be_dir: bool    # trailing "/" (or a final "." / "..")


def permitted(cred, inode: Inode, mask: int) -> bool:
    """Linux's generic_permission on the mode bits; root (or DAC override) bypasses."""
    if cred is None or cred.fsuid == 0 or getattr(cred, "cap_effective", 0) >> CAP_DAC_OVERRIDE & 1:
        return True
    if cred.fsuid == inode.uid:
        bits = inode.mode >> 6
    elif inode.gid == cred.fsgid or inode.gid in getattr(cred, "groups", ()):
        bits = inode.mode >> 3
    else:
        bits = inode.mode
    return (bits & 7 & mask) == mask


def _access_mask(flags: int) -> int:
    mask = 0
    if readable(flags):
        mask |= MAY_READ
    if writable(flags) or flags & os.O_TRUNC:
        mask |= MAY_WRITE
    return mask


class FileOps:
    """File and directory syscalls of the Kernel."""

    # --- path walking -------------------------------------------------------------------
    def _lookup(self, t, path: str) -> Lookup:
        if not path:
            raise kerr(errno.ENOENT, "empty path")
        fsctx = t.fs
        if path.startswith("/"):
            node, comps = fsctx.root, []
        else:
            node, comps = fsctx.cwd, [c for c in fsctx.cwd_path.split("/") if c]
        parts = [p for p in path.split("/") if p]
        must_be_dir = path.endswith("/") or (bool(parts) and parts[-1] in (".", ".."))
        if not parts:
            return Lookup(None, "", node, "/" + "/".join(comps), True)
        for name in parts[:-1]:
            node = self._step(t, node, name, comps)
        if node.kind != KIND_DIR:
            raise kerr(errno.ENOTDIR, f"{path}: a component is not a directory")
        if not permitted(t.cred, node, MAY_EXEC):
            raise kerr(errno.EACCES, f"{path}: search permission denied")
        name = parts[-1]
        if name in (".", ".."):
            target = self._step(t, node, name, comps)
            return Lookup(None, name, target, "/" + "/".join(comps), True)
        return Lookup(node, name, node.children.get(name), "/" + "/".join(comps + [name]),
                      must_be_dir)

    def _step(self, t, node: Inode, name: str, comps: list[str]) -> Inode:
        if node.kind != KIND_DIR:
            raise kerr(errno.ENOTDIR, f"{'/'.join(comps)} is not a directory")
        if not permitted(t.cred, node, MAY_EXEC):
            raise kerr(errno.EACCES, f"search permission denied in /{'/'.join(comps)}")
        if name == ".":
            return node
        if name == "..":
            if node is t.fs.root or node.parent is None:
                return node
            if comps:
                comps.pop()
            return node.parent
        child = node.children.get(name)
        if child is None:
            raise kerr(errno.ENOENT, f"/{'/'.join(comps + [name])} does not exist")
        comps.append(name)
        return child

    def _create(self, t, lk: Lookup, kind: str, mode: int) -> Inode:
        """Create ``lk.name`` in ``lk.parent`` (checked: absent) with the umask applied."""
        parent = lk.parent
        if parent is None or parent.nlink == 0:
            raise kerr(errno.ENOENT, f"{lk.path}: parent directory was removed")
        if not permitted(t.cred, parent, MAY_WRITE | MAY_EXEC):
            raise kerr(errno.EACCES, f"{lk.path}: no write permission on the directory")
        fs = kernel_filesystem(self)
        inode = fs.new_inode(kind, mode & ~t.fs.umask, t.cred.fsuid, t.cred.fsgid)
        fs.link(parent, lk.name, inode)
        return inode

    def _file_of(self, t, fd: int) -> File:
        return t.files.get(fd)

    # --- open / close -------------------------------------------------------------------
    def open(self, t, path: str, flags: int, mode: int = 0o644) -> int:
        t.files.alloc_fd()  # Linux reserves the fd first: EMFILE wins over lookup errors
        lk = self._lookup(t, path)
        inode = lk.inode
        created = False
        if inode is None:
            if not flags & os.O_CREAT:
                raise kerr(errno.ENOENT, f"{path} does not exist")
            if lk.must_be_dir:
                raise kerr(errno.EISDIR, f"{path}: O_CREAT with a trailing slash")
            inode = self._create(t, lk, KIND_REG, mode)
            created = True
        else:
            if flags & os.O_CREAT and flags & os.O_EXCL:
                raise kerr(errno.EEXIST, f"{path} exists")
            if inode.kind == KIND_DIR:
                if flags & os.O_CREAT or writable(flags):
                    raise kerr(errno.EISDIR, f"{path} is a directory")
            else:
                if flags & os.O_DIRECTORY or lk.must_be_dir:
                    raise kerr(errno.ENOTDIR, f"{path} is not a directory")
            if not permitted(t.cred, inode, _access_mask(flags)):
                raise kerr(errno.EACCES, f"{path}: permission denied")
        if inode.kind == KIND_FIFO:
            file = self.fifo_open(t, inode, flags, lk.path)
        else:
            if inode.kind == KIND_REG and flags & os.O_TRUNC and not created:
                inode.truncate(0)
            ftype = DIRECTORY if inode.kind == KIND_DIR else REGULAR
            file = File(inode, flags, ftype, path=lk.path)
        return self._install_new(t, file, bool(flags & os.O_CLOEXEC))

    def _install_new(self, t, file: File, cloexec: bool, fd: int | None = None) -> int:
        """Install a freshly made File (refs 1); on failure the File is dropped."""
        try:
            return t.files.install(file, fd, cloexec)
        except Exception:
            file.put(self)
            raise

    def close(self, t, fd: int) -> int:
        t.files.close(self, fd)
        return 0

    # --- data ---------------------------------------------------------------------------
    def read(self, t, fd: int, n: int) -> bytes:
        file = self._file_of(t, fd)
        if not file.readable():
            raise kerr(errno.EBADF, f"fd {fd} is not open for reading")
        if n < 0:
            raise kerr(errno.EINVAL, "negative count")
        return file.ftype.read(self, t, file, n)

    def write(self, t, fd: int, data) -> int:
        file = self._file_of(t, fd)
        if not file.writable():
            raise kerr(errno.EBADF, f"fd {fd} is not open for writing")
        return file.ftype.write(self, t, file, data)

    def pread(self, t, fd: int, n: int, offset: int) -> bytes:
        file = self._file_of(t, fd)
        if not file.readable():
            raise kerr(errno.EBADF, f"fd {fd} is not open for reading")
        if n < 0 or (offset < 0 and file.ftype.seekable):
            raise kerr(errno.EINVAL, "negative count or offset")
        return file.ftype.pread(self, t, file, n, offset)

    def pwrite(self, t, fd: int, data, offset: int) -> int:
        file = self._file_of(t, fd)
        if not file.writable():
            raise kerr(errno.EBADF, f"fd {fd} is not open for writing")
        if offset < 0 and file.ftype.seekable:
            raise kerr(errno.EINVAL, "negative offset")
        return file.ftype.pwrite(self, t, file, data, offset)

    def lseek(self, t, fd: int, offset: int, whence: int) -> int:
        file = self._file_of(t, fd)
        return file.ftype.lseek(self, file, offset, whence)

    def ftruncate(self, t, fd: int, length: int) -> int:
        file = self._file_of(t, fd)
        if length < 0:
            raise kerr(errno.EINVAL, "negative length")
        if file.kind != "regular" or not file.writable():
            raise kerr(errno.EINVAL, f"fd {fd} is not a regular file open for writing")
        file.inode.truncate(length)
        return 0

    def fstat(self, t, fd: int) -> dict:
        file = self._file_of(t, fd)
        return file.ftype.stat(file)

    def stat(self, t, path: str) -> dict:
        lk = self._lookup(t, path)
        inode = lk.inode
        if inode is None:
            raise kerr(errno.ENOENT, f"{path} does not exist")
        if lk.must_be_dir and inode.kind != KIND_DIR:
            raise kerr(errno.ENOTDIR, f"{path} is not a directory")
        return {"st_ino": inode.ino, "st_mode": inode.st_mode, "st_nlink": inode.nlink,
                "st_size": inode.size, "st_uid": inode.uid, "st_gid": inode.gid}

    # --- descriptors --------------------------------------------------------------------
    def dup(self, t, fd: int) -> int:
        file = self._file_of(t, fd)
        newfd = t.files.alloc_fd()  # before taking the reference: EMFILE must not leak one
        return t.files.install(file.get(), newfd)

    def dup2(self, t, oldfd: int, newfd: int) -> int:
        return self._dup_to(t, oldfd, newfd, False)

    def dup3(self, t, oldfd: int, newfd: int, flags: int) -> int:
        if flags & ~os.O_CLOEXEC:
            raise kerr(errno.EINVAL, f"dup3 flags {flags:#x}")
        if oldfd == newfd:
            raise kerr(errno.EINVAL, "dup3 with oldfd == newfd")
        return self._dup_to(t, oldfd, newfd, bool(flags & os.O_CLOEXEC))

    def _dup_to(self, t, oldfd: int, newfd: int, cloexec: bool) -> int:
        file = self._file_of(t, oldfd)
        if newfd < 0 or newfd >= t.files.limit:
            raise kerr(errno.EBADF, f"fd {newfd} out of range")
        if oldfd == newfd:
            return newfd
        file.get()  # before closing newfd, which may hold the last other reference
        if newfd in t.files.fds:
            t.files.close(self, newfd)
        return t.files.install(file, newfd, cloexec)

    def fcntl(self, t, fd: int, cmd: int, arg: int = 0) -> int:
        file = self._file_of(t, fd)
        if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
            if arg < 0 or arg >= t.files.limit:
                raise kerr(errno.EINVAL, f"F_DUPFD start {arg} out of range")
            newfd = t.files.alloc_fd(arg)
            return t.files.install(file.get(), newfd, cmd == F_DUPFD_CLOEXEC)
        if cmd == F_GETFD:
            return FD_CLOEXEC if t.files.is_cloexec(fd) else 0
        if cmd == F_SETFD:
            t.files.set_cloexec(fd, bool(arg & FD_CLOEXEC))
            return 0
        if cmd == F_GETFL:
            return file.flags
        if cmd == F_SETFL:
            file.flags = (file.flags & ~SETFL_MASK) | (arg & SETFL_MASK)
            return 0
        raise kerr(errno.EINVAL, f"fcntl command {cmd} is not modelled")

    # --- directories --------------------------------------------------------------------
    def mkdir(self, t, path: str, mode: int = 0o777) -> int:
        lk = self._lookup(t, path)
        if lk.inode is not None:
            raise kerr(errno.EEXIST, f"{path} exists")
        self._create(t, lk, KIND_DIR, mode)
        return 0

    def mkfifo(self, t, path: str, mode: int = 0o666) -> int:
        lk = self._lookup(t, path)
        if lk.inode is not None:
            raise kerr(errno.EEXIST, f"{path} exists")
        if lk.must_be_dir:
            raise kerr(errno.ENOENT, f"{path}: trailing slash on a non-directory")
        self._create(t, lk, KIND_FIFO, mode)
        return 0

    def unlink(self, t, path: str) -> int:
        lk = self._lookup(t, path)
        inode = lk.inode
        if inode is None:
            raise kerr(errno.ENOENT, f"{path} does not exist")
        if inode.kind == KIND_DIR:
            raise kerr(errno.EISDIR, f"{path} is a directory")
        if lk.must_be_dir:
            raise kerr(errno.ENOTDIR, f"{path} is not a directory")
        if not permitted(t.cred, lk.parent, MAY_WRITE | MAY_EXEC):
            raise kerr(errno.EACCES, f"{path}: no write permission on the directory")
        kernel_filesystem(self).unlink(lk.parent, lk.name)
        return 0

    def rmdir(self, t, path: str) -> int:
        lk = self._lookup(t, path)
        inode = lk.inode
        if lk.name == ".":
            raise kerr(errno.EINVAL, "rmdir of '.'")
        if lk.name == "..":
            raise kerr(errno.ENOTEMPTY, "rmdir of '..'")
        if inode is None:
            raise kerr(errno.ENOENT, f"{path} does not exist")
        if inode.kind != KIND_DIR:
            raise kerr(errno.ENOTDIR, f"{path} is not a directory")
        if lk.parent is None or inode is t.fs.root:
            raise kerr(errno.EBUSY, f"{path} is a root")
        if inode.children:
            raise kerr(errno.ENOTEMPTY, f"{path} is not empty")
        if not permitted(t.cred, lk.parent, MAY_WRITE | MAY_EXEC):
            raise kerr(errno.EACCES, f"{path}: no write permission on the directory")
        kernel_filesystem(self).unlink(lk.parent, lk.name)
        return 0

    def chdir(self, t, path: str) -> int:
        lk = self._lookup(t, path)
        inode = lk.inode
        if inode is None:
            raise kerr(errno.ENOENT, f"{path} does not exist")
        if inode.kind != KIND_DIR:
            raise kerr(errno.ENOTDIR, f"{path} is not a directory")
        if not permitted(t.cred, inode, MAY_EXEC):
            raise kerr(errno.EACCES, f"{path}: search permission denied")
        t.fs.cwd = inode
        t.fs.cwd_path = lk.path
        return 0

    def getcwd(self, t) -> str:
        if t.fs.cwd.nlink == 0:
            raise kerr(errno.ENOENT, "the current directory was removed")
        return t.fs.cwd_path

    def umask(self, t, mask: int) -> int:
        old = t.fs.umask
        t.fs.umask = mask & 0o777
        return old

"""Open files of restored tasks: the restorer opens or creates each open file description
once (with the caller's privileges), then the transport installs it at each fd that holds
it, in every task that holds it. Also the cwd and root.

Kinds handled here: regular files and directories by path (flags without O_CREAT/O_TRUNC/
O_EXCL, then the saved position), device files by path, unlinked-but-open regular files
(recreated from their saved contents at their old path and unlinked again, so that the fd
reads "<path> (deleted)" as before; a path that exists now is refused rather than
overwritten). Other kinds are refused with a message naming the task, the fd and the kind.
"""
from __future__ import annotations

import errno
import fcntl
import os

from backend import kabi
from .stub import Stub, StubError

_OPEN_ONLY = os.O_CREAT | os.O_TRUNC | os.O_EXCL | os.O_CLOEXEC | os.O_NOCTTY


class FileFactory:
    """The restorer's fd for each model File (one open file description per File)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._by_file: dict[int, int] = {}
        self._by_path: dict[tuple[str, int], int] = {}
        self._keep: list = []                  # model objects whose id() keys the caches
        self._pipes: dict[int, tuple[int, int]] = {}   # id(Pipe) -> (read fd, write fd)

    def close(self) -> None:
        ends = [fd for pair in self._pipes.values() for fd in pair]
        self._pipes.clear()
        for fd in list(self._by_file.values()) + list(self._by_path.values()) + ends:
            try:
                os.close(fd)
            except OSError:
                pass
        self._by_file.clear()
        self._by_path.clear()

    def open_path(self, file, mode: int) -> int:
        """A fresh description of the file a mapping or the exe names (not the fd's own)."""
        path = file.path
        key = (path, mode)
        fd = self._by_path.get(key)
        if fd is None:
            if file.linked_path(self.kernel) is None:
                raise StubError(errno.EOPNOTSUPP, f"{path}: a mapping of a deleted file "
                                                  "cannot be restored live yet")
            try:
                fd = os.open(path, mode | os.O_CLOEXEC)
            except OSError as e:
                raise StubError(e.errno, f"cannot open {path}: {e.strerror}") from None
            self._by_path[key] = fd
        return fd

    def fd_for(self, file, where: str) -> int:
        fd = self._by_file.get(id(file))
        if fd is None:
            fd = self._create(file, where)
            self._by_file[id(file)] = fd
            self._keep.append(file)
        return fd

    def _create(self, file, where: str) -> int:
        kind = file.kind
        if kind in ("regular", "dir"):
            return self._open_regular(file, where)
        if kind in ("pipe", "fifo"):
            return self._open_pipe_end(file, where)
        raise StubError(errno.EOPNOTSUPP, f"{where}: {kind} files cannot be restored live yet")

    def _open_regular(self, file, where: str) -> int:
        flags = (file.flags & ~_OPEN_ONLY) | os.O_CLOEXEC
        path = file.path
        if file.linked_path(self.kernel) is None:
            return self._recreate_unlinked(file, flags, where)
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise StubError(e.errno, f"{where}: cannot open {path}: {e.strerror}") from None
        if file.pos:
            try:
                os.lseek(fd, file.pos, os.SEEK_SET)
            except OSError as e:
                os.close(fd)
                raise StubError(e.errno, f"{where}: cannot seek {path} to {file.pos}") from None
        return fd

    def _pipe(self, file, where: str) -> tuple[int, int]:
        """The restorer's two ends of the pipe behind ``file``, made once per Pipe, holding
        its buffered bytes and its capacity. For a FIFO both are opened on the path (the
        read end first, non-blocking, so that neither open waits for the other)."""
        pipe = file.private
        ends = self._pipes.get(id(pipe))
        if ends is not None:
            return ends
        try:
            if file.kind == "fifo":
                r = os.open(file.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                w = os.open(file.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            else:
                r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._pipes[id(pipe)] = (r, w)
            self._keep.append(pipe)
            if pipe.capacity:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, max(pipe.capacity, len(pipe.buffer)))
            if pipe.buffer and os.write(w, bytes(pipe.buffer)) != len(pipe.buffer):
                raise OSError(errno.EAGAIN, "short write of the buffered bytes")
        except OSError as e:
            raise StubError(e.errno or errno.EIO, f"{where}: cannot recreate the {file.kind}"
                                                  f" {file.path or ''}: {e.strerror or e}") \
                from None
        return self._pipes[id(pipe)]

    def _open_pipe_end(self, file, where: str) -> int:
        """A description of its own for this end (status flags are per description): a
        /proc/self/fd reopen of the restorer's end with the saved flags."""
        r, w = self._pipe(file, where)
        end = w if (file.flags & os.O_ACCMODE) == os.O_WRONLY else r
        flags = (file.flags & ~_OPEN_ONLY) | os.O_CLOEXEC
        try:
            return os.open(f"/proc/self/fd/{end}", flags)
        except OSError as e:
            raise StubError(e.errno, f"{where}: cannot reopen the {file.kind}: "
                                     f"{e.strerror}") from None

    def _recreate_unlinked(self, file, flags: int, where: str) -> int:
        path = file.path
        inode = file.inode
        if inode is None or inode.kind != "regular":
            raise StubError(errno.EOPNOTSUPP, f"{where}: an unlinked {getattr(inode, 'kind', '?')}"
                                              " cannot be restored live")
        try:
            fd = os.open(path, (flags & ~os.O_ACCMODE) | os.O_RDWR | os.O_CREAT | os.O_EXCL,
                         inode.mode & 0o7777)
        except FileExistsError:
            raise StubError(errno.EEXIST, f"{where}: {path} was unlinked when checkpointed "
                                          "and exists again: not overwritten") from None
        except OSError as e:
            raise StubError(e.errno, f"{where}: cannot recreate {path}: {e.strerror}") from None
        try:
            os.unlink(path)
            data = bytes(inode.read_at(0, inode.size))
            if data:
                os.pwrite(fd, data, 0)
            os.lseek(fd, file.pos, os.SEEK_SET)
            if (flags & os.O_ACCMODE) != os.O_RDWR:
                # the description must have the saved access mode: reopen through /proc
                again = os.open(f"/proc/self/fd/{fd}", flags)
                os.lseek(again, file.pos, os.SEEK_SET)
                os.close(fd)
                fd = again
        except OSError as e:
            os.close(fd)
            raise StubError(e.errno, f"{where}: cannot recreate {path}: {e.strerror}") from None
        return fd


def restore_fdtable(stub: Stub, fdtable, factory: FileFactory, transport) -> None:
    """Install every fd of ``fdtable`` in ``stub`` (whose own fds are closed first, all but
    the transport's)."""
    if transport.fd > 0:
        stub.syscall(kabi.SYS_close_range, 0, transport.fd - 1, 0, what="close_range")
    stub.syscall(kabi.SYS_close_range, transport.fd + 1, 0xFFFFFFFF, 0, what="close_range")
    for fd in sorted(fdtable.fds):
        file = fdtable.fds[fd]
        where = f"pid {stub.pid} fd {fd}"
        if fd == transport.fd:
            raise StubError(errno.EINVAL, f"{where}: collides with the restorer's transport")
        local = factory.fd_for(file, where)
        transport.install(stub, local, fd, fd in fdtable.cloexec, where)


def restore_fs_context(stub: Stub, fs, factory: FileFactory, transport) -> None:
    """cwd and root (chroot when the root is not /), and the umask."""
    def dir_fd(path: str, what: str) -> int:
        try:
            local = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StubError(e.errno, f"pid {stub.pid}: its {what} {path}: {e.strerror}") from None
        try:
            return transport.send(stub, local, f"{what} {path}")
        finally:
            os.close(local)

    if fs.root_path not in ("", "/"):
        fd = dir_fd(fs.root_path, "root")
        stub.syscall(kabi.SYS_fchdir, fd, what="fchdir to the root")
        stub.syscall(kabi.SYS_chroot, stub.put_scratch(b".\0", 0), what="chroot")
        stub.syscall(kabi.SYS_close, fd, what="close")
    fd = dir_fd(fs.cwd_path, "cwd")
    stub.syscall(kabi.SYS_fchdir, fd, what="fchdir to the cwd")
    stub.syscall(kabi.SYS_close, fd, what="close")
    stub.syscall(95, fs.umask, what="umask")        # SYS_umask

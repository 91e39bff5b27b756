"""Open files of restored tasks: the restorer opens or creates each open file description
once (with the caller's privileges), then the transport installs it at each fd that holds
it, in every task that holds it (so a description shared by dup or fork is shared again:
position and status flags included). Also the cwd and root.

Kinds handled here:
- regular files, directories and the stateless character devices the checkpoint saves by path
  (/dev/null...): opened by path with the saved flags (without O_CREAT/O_TRUNC/O_EXCL), then
  the saved position; the saved status flags must be what the kernel shows afterwards;
- unlinked-but-open regular files (and mappings of them, ``open_path``): the inode is made
  once from its saved contents, at its old path with O_EXCL and unlinked at once, so that
  every fd reads "<path> (deleted)" as before and every description and mapping of it shares
  one inode (each description is a /proc/self/fd reopen). A path that exists now is refused
  rather than overwritten;
- pipes: one pipe2() per pipe holding the buffered bytes and its capacity; the restorer keeps
  both ends until the restart ends, so a pipe restored with one end only reads EOF or writes
  EPIPE as before. FIFOs: opened on their path (which must be a FIFO);
- AF_UNIX sockets: sockets.py (a socket has one description: its socket).
Anything else is refused with a message naming the task (its pid in the image), the fd and
the kind.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import termios

from backend import kabi, proc
from .stub import Stub, StubError

_OPEN_ONLY = os.O_CREAT | os.O_TRUNC | os.O_EXCL | os.O_CLOEXEC | os.O_NOCTTY
_LARGEFILE = 0o100000      # forced by open() on 64-bit; never set on a pipe2() description
_SETFL = os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME
_WRITE_CHUNK = 1 << 24
_O_TMPFILE = 0o20200000    # __O_TMPFILE | O_DIRECTORY: kept in f_flags of an O_TMPFILE file
_NOT_REOPENED = _O_TMPFILE | os.O_NOFOLLOW


class FileFactory:
    """The restorer's fd for each model File (one open file description per File)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._by_file: dict[int, int] = {}
        self._by_path: dict[tuple[str, int], int] = {}
        self._keep: list = []                  # model objects whose id() keys the caches
        self._pipes: dict[int, tuple[int, int]] = {}   # id(Pipe) -> (read fd, write fd)
        self._ends_given: set[int] = set()
        self._unlinked: dict[int, int] = {}    # id(Inode) -> O_RDWR fd of the recreated inode
        self._sockets = None                   # sockets.SocketFactory, made on first use

    def close(self) -> None:
        fds = set(self._by_file.values()) | set(self._by_path.values()) \
            | {fd for pair in self._pipes.values() for fd in pair} | set(self._unlinked.values())
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for cache in (self._pipes, self._by_file, self._by_path, self._unlinked):
            cache.clear()
        if self._sockets is not None:
            self._sockets.close()
            self._sockets = None

    def abort(self) -> None:
        """After a failed restart (job.py's abort, before close): the socket files this
        restart bound go too, so that nothing it made is left behind."""
        if self._sockets is not None:
            self._sockets.abort()

    def open_path(self, file, mode: int) -> int:
        """A fresh description of the file a mapping or the exe names (not the fd's own)."""
        path = file.path
        key = (path, mode) if file.linked_path(self.kernel) is not None else (id(file.inode), mode)
        fd = self._by_path.get(key)
        if fd is None:
            where = f"the mapping of {path}"
            if file.linked_path(self.kernel) is None:
                fd = self._reopen(self._unlinked_inode(file, where), mode | os.O_CLOEXEC,
                                  where)
            else:
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
        if kind == "socket":
            if self._sockets is None:
                from .sockets import SocketFactory
                self._sockets = SocketFactory(self)
            return self._sockets.fd_for(file, where)
        raise StubError(errno.EOPNOTSUPP, f"{where}: {kind} files cannot be restored live yet")

    # -- regular files, directories, devices ------------------------------------------------
    def _open_regular(self, file, where: str) -> int:
        flags = (file.flags & ~_OPEN_ONLY) | os.O_CLOEXEC
        if file.flags & os.O_ASYNC:
            raise StubError(errno.EOPNOTSUPP, f"{where}: {file.path} is open with O_ASYNC: "
                                              "its signal owner is not in the image")
        path = file.path
        linked = file.linked_path(self.kernel)
        if linked is None:
            # a reopen through /proc cannot carry O_NOFOLLOW, nor the O_TMPFILE bits of a
            # file made by O_TMPFILE (its name "/dir/#ino" is recreated like any other's)
            fd = self._reopen(self._unlinked_inode(file, where), flags & ~_NOT_REOPENED,
                              where)
        else:
            try:
                fd = os.open(path, flags)
            except OSError as e:
                raise StubError(e.errno, f"{where}: cannot open {path}: {e.strerror}") from None
        try:
            if file.pos and file.ftype.seekable:
                os.lseek(fd, file.pos, os.SEEK_SET)
            _check_flags(fd, file.flags, where, path, linked is None)
        except OSError as e:
            os.close(fd)
            raise StubError(e.errno, f"{where}: cannot seek {path} to {file.pos}: "
                                     f"{e.strerror}") from None
        except StubError:
            os.close(fd)
            raise
        return fd

    def _unlinked_inode(self, file, where: str) -> int:
        """An O_RDWR fd of the unlinked inode behind ``file``, recreated once per inode from
        its saved contents at its old path (O_EXCL), then unlinked again."""
        inode = file.inode
        fd = self._unlinked.get(id(inode))
        if fd is not None:
            return fd
        if inode is None or inode.kind != "reg":
            raise StubError(errno.EOPNOTSUPP, f"{where}: an unlinked "
                                              f"{getattr(inode, 'kind', 'file')} {file.path} "
                                              "cannot be restored live")
        path = file.path
        if not path.startswith("/"):
            raise StubError(errno.EOPNOTSUPP, f"{where}: an unlinked file without a path "
                                              f"({path!r}) cannot be restored live")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
        except FileExistsError:
            raise StubError(errno.EEXIST, f"{where}: {path} was unlinked when checkpointed "
                                          "and exists again: not overwritten") from None
        except OSError as e:
            raise StubError(e.errno, f"{where}: cannot recreate {path}: {e.strerror}") from None
        try:
            os.unlink(path)
            os.fchmod(fd, inode.mode & 0o7777)
            _write_all(fd, memoryview(inode.data))
        except OSError as e:
            os.close(fd)
            raise StubError(e.errno, f"{where}: cannot recreate {path}: {e.strerror}") from None
        self._unlinked[id(inode)] = fd
        self._keep.append(inode)
        return fd

    @staticmethod
    def _reopen(fd: int, flags: int, where: str) -> int:
        """A new description of the file behind the restorer's ``fd`` (its name kept)."""
        try:
            return os.open(f"/proc/self/fd/{fd}", flags)
        except OSError as e:
            raise StubError(e.errno, f"{where}: cannot reopen: {e.strerror}") from None

    # -- pipes and FIFOs --------------------------------------------------------------------
    def _pipe(self, file, where: str) -> tuple[int, int]:
        """The restorer's two ends of the pipe behind ``file``, made once per Pipe, holding
        its buffered bytes and its capacity. For a FIFO both are opened on the path (the
        read end first, non-blocking, so that neither open waits for the other)."""
        pipe = file.private
        ends = self._pipes.get(id(pipe))
        if ends is not None:
            return ends
        r = w = -1
        try:
            if file.kind == "fifo":
                unlinked = file.linked_path(self.kernel) is None
                if unlinked:         # made again at its old path, opened, unlinked again
                    try:
                        os.mkfifo(file.path, 0o600)
                    except FileExistsError:
                        raise StubError(errno.EEXIST, f"{where}: the FIFO {file.path} was "
                                        "unlinked when checkpointed and the path exists again:"
                                        " not replaced") from None
                try:
                    r = os.open(file.path,
                                os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
                finally:
                    if unlinked:
                        os.unlink(file.path)
                if not stat.S_ISFIFO(os.fstat(r).st_mode):
                    raise StubError(errno.EINVAL, f"{where}: {file.path} is not a FIFO any more")
                w = os.open(f"/proc/self/fd/{r}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                if _queued(r):
                    raise StubError(errno.EBUSY, f"{where}: the FIFO {file.path} holds data "
                                                 "written by a process outside the restart")
            else:
                r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._pipes[id(pipe)] = (r, w)
            self._keep.append(pipe)
            if pipe.capacity:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, max(pipe.capacity, len(pipe.buffer)))
            if pipe.buffer and os.write(w, bytes(pipe.buffer)) != len(pipe.buffer):
                raise OSError(errno.EAGAIN, "short write of the buffered bytes")
        except OSError as e:
            if id(pipe) not in self._pipes:
                for fd in (r, w):
                    if fd >= 0:
                        os.close(fd)
            raise StubError(e.errno or errno.EIO, f"{where}: cannot recreate the {file.kind}"
                                                  f" {file.path or ''}: {e.strerror or e}") \
                from None
        return self._pipes[id(pipe)]

    def _open_pipe_end(self, file, where: str) -> int:
        """A description of its own for this end (status flags are per description)."""
        r, w = self._pipe(file, where)
        end = w if (file.flags & os.O_ACCMODE) == os.O_WRONLY else r
        flags = (file.flags & ~_OPEN_ONLY) | os.O_CLOEXEC
        try:
            if file.kind == "pipe" and end not in self._ends_given and \
                    not file.flags & _LARGEFILE:
                # the pipe2() description itself: a reopen would carry O_LARGEFILE, which
                # open() forces and pipe2() descriptions never have
                self._ends_given.add(end)
                fd = os.dup(end)
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_CLOEXEC)
                return fd
            return os.open(f"/proc/self/fd/{end}", flags)
        except OSError as e:
            raise StubError(e.errno, f"{where}: cannot reopen the {file.kind}: "
                                     f"{e.strerror}") from None


def _queued(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def _write_all(fd: int, data: memoryview) -> None:
    """pwrite ``data`` at 0 in pieces of at most 16 MiB (a large pwrite may be short)."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:done + _WRITE_CHUNK], done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


def _check_flags(fd: int, want: int, where: str, path: str, reopened: bool) -> None:
    """The status flags open() did not set (or set differently) are set with F_SETFL; what
    still differs is an error, never a silent change of the file's behaviour."""
    have = fcntl.fcntl(fd, fcntl.F_GETFL)
    if (have ^ want) & _SETFL:
        fcntl.fcntl(fd, fcntl.F_SETFL, (have & ~_SETFL) | (want & _SETFL))
        have = fcntl.fcntl(fd, fcntl.F_GETFL)
    if reopened:
        want &= ~_NOT_REOPENED
    differ = (have ^ want) & ~(_LARGEFILE | _OPEN_ONLY)
    if differ:
        raise StubError(errno.EINVAL, f"{where}: {path} reopened with flags {have:#o}, the "
                                      f"image says {want:#o}")


def image_pid(stub: Stub) -> int:
    """The stub's pid in its innermost pid namespace: the image's pid (clone3 set_tid)."""
    try:
        return proc.read_status(stub.pid).nspid[-1]
    except (proc.ProcessGone, IndexError):
        return stub.pid


def restore_fdtable(stub: Stub, fdtable, factory: FileFactory, transport) -> None:
    """Install every fd of ``fdtable`` in ``stub`` (whose own fds are closed first, all but
    the transport's)."""
    if transport.fd > 0:
        stub.syscall(kabi.SYS_close_range, 0, transport.fd - 1, 0, what="close_range")
    stub.syscall(kabi.SYS_close_range, transport.fd + 1, 0xFFFFFFFF, 0, what="close_range")
    pid = image_pid(stub)
    for fd in sorted(fdtable.fds):
        file = fdtable.fds[fd]
        where = f"pid {pid} fd {fd} ({file.kind})"
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
    stub.syscall(kabi.SYS_umask, fs.umask, what="umask")

"""The in-memory file system, open file descriptions, fd tables and the file syscalls."""
from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given, settings, strategies as st

from ckptsim.errors import ModelError
from ckptsim.model.creds import Cred
from ckptsim.model.pipe import PipeOps
from ckptsim.model.vfs import (FdTable, File, FileOps, FsContext, REGULAR, kernel_filesystem)
from ckptsim.model.vfs_ops import F_DUPFD, F_DUPFD_CLOEXEC, F_GETFD, F_GETFL, F_SETFD, F_SETFL

RDWR_CREAT = os.O_RDWR | os.O_CREAT


class _Task:
    def __init__(self, files, fs, cred):
        self.files, self.fs, self.cred = files, fs, cred


class _MiniKernel(FileOps, PipeOps):
    """FileOps + PipeOps alone, for when the full Kernel cannot be imported."""


def make_kernel():
    """(kernel, task): the real Kernel's init when it imports, else a minimal mixin."""
    try:
        from ckptsim.model.kernel import Kernel
        k = Kernel()
        return k, k.init
    except ImportError:
        k = _MiniKernel()
        fs = kernel_filesystem(k)
        return k, _Task(FdTable(), FsContext.new(fs), Cred())


def second_task(k, t, share_files=False):
    """A forked-like task: a copy of the fd table (or the same one) and of the fs context."""
    files = t.files.get() if share_files else t.files.fork_copy(k)
    return _Task(files, t.fs.fork_copy(), t.cred)


def user_cred(uid=1000):
    return Cred(uid=uid, euid=uid, suid=uid, fsuid=uid, gid=uid, egid=uid, sgid=uid, fsgid=uid)


@pytest.fixture
def kt():
    return make_kernel()


def errno_of(fn, *args):
    with pytest.raises(ModelError) as ei:
        fn(*args)
    return ei.value.errno


# --- open / create -----------------------------------------------------------------------

def test_open_create_write_read_roundtrip(kt):
    k, t = kt
    fd = k.open(t, "/f", RDWR_CREAT)
    assert k.write(t, fd, b"hello world") == 11
    assert k.lseek(t, fd, 0, os.SEEK_SET) == 0
    assert k.read(t, fd, 5) == b"hello"
    assert k.read(t, fd, 100) == b" world"
    assert k.read(t, fd, 100) == b""
    assert k.fstat(t, fd)["st_size"] == 11


def test_open_errors(kt):
    k, t = kt
    assert errno_of(k.open, t, "/nope", os.O_RDONLY) == errno.ENOENT
    assert errno_of(k.open, t, "", os.O_RDONLY) == errno.ENOENT
    k.close(t, k.open(t, "/f", RDWR_CREAT))
    assert errno_of(k.open, t, "/f", RDWR_CREAT | os.O_EXCL) == errno.EEXIST
    assert errno_of(k.open, t, "/f/x", RDWR_CREAT) == errno.ENOTDIR
    assert errno_of(k.open, t, "/f/", os.O_RDONLY) == errno.ENOTDIR
    assert errno_of(k.open, t, "/f", os.O_RDONLY | os.O_DIRECTORY) == errno.ENOTDIR
    k.mkdir(t, "/d")
    assert errno_of(k.open, t, "/d", os.O_WRONLY) == errno.EISDIR
    assert errno_of(k.open, t, "/d", os.O_RDONLY | os.O_CREAT) == errno.EISDIR
    assert errno_of(k.open, t, "/new/", RDWR_CREAT) == errno.EISDIR
    assert errno_of(k.open, t, "/missing/x", RDWR_CREAT) == errno.ENOENT
    fd = k.open(t, "/d", os.O_RDONLY | os.O_DIRECTORY)
    assert errno_of(k.read, t, fd, 1) == errno.EISDIR


def test_open_trunc_and_append(kt):
    k, t = kt
    fd = k.open(t, "/f", RDWR_CREAT)
    k.write(t, fd, b"abcdef")
    k.close(t, fd)
    fd = k.open(t, "/f", os.O_WRONLY | os.O_APPEND)
    k.write(t, fd, b"gh")
    assert k.lseek(t, fd, 0, os.SEEK_CUR) == 8
    k.lseek(t, fd, 0, os.SEEK_SET)
    k.write(t, fd, b"ij")   # O_APPEND ignores the position
    assert k.stat(t, "/f")["st_size"] == 10
    fd2 = k.open(t, "/f", os.O_WRONLY | os.O_TRUNC)
    assert k.fstat(t, fd2)["st_size"] == 0


def test_permissions(kt):
    k, t = kt
    k.close(t, k.open(t, "/ro", RDWR_CREAT, 0o444))
    k.mkdir(t, "/locked", 0o700)
    k.close(t, k.open(t, "/locked/in", RDWR_CREAT))
    k.close(t, k.open(t, "/ro", os.O_RDWR))       # root bypasses the mode bits
    user = _Task(FdTable(), t.fs.fork_copy(), user_cred())
    assert errno_of(k.open, user, "/ro", os.O_WRONLY) == errno.EACCES
    assert errno_of(k.open, user, "/ro", os.O_RDONLY | os.O_TRUNC) == errno.EACCES
    k.close(user, k.open(user, "/ro", os.O_RDONLY))
    assert errno_of(k.open, user, "/locked/in", os.O_RDONLY) == errno.EACCES
    assert errno_of(k.chdir, user, "/locked") == errno.EACCES
    assert errno_of(k.open, user, "/locked/new", RDWR_CREAT) == errno.EACCES
    assert errno_of(k.mkdir, user, "/ud") == errno.EACCES   # / is 0755 root
    assert errno_of(k.unlink, user, "/ro") == errno.EACCES


def test_umask_and_owner(kt):
    k, t = kt
    t.fs.umask = 0o027
    fd = k.open(t, "/m", RDWR_CREAT, 0o666)
    st = k.fstat(t, fd)
    assert st["st_mode"] & 0o777 == 0o640
    assert st["st_mode"] & 0o170000 == 0o100000
    assert k.umask(t, 0o022) == 0o027


def test_emfile(kt):
    k, t = kt
    t.files.limit = 8
    fd = k.open(t, "/f", RDWR_CREAT)
    while len(t.files) < 8:
        k.dup(t, fd)
    assert errno_of(k.open, t, "/f", os.O_RDONLY) == errno.EMFILE
    assert errno_of(k.dup, t, fd) == errno.EMFILE
    assert errno_of(k.pipe, t) == errno.EMFILE
    file = t.files.get(fd)
    assert file.refs == 8   # nothing leaked by the failures


# --- read/write/seek ---------------------------------------------------------------------

def test_access_mode_checks(kt):
    k, t = kt
    fd = k.open(t, "/f", os.O_WRONLY | os.O_CREAT)
    assert errno_of(k.read, t, fd, 1) == errno.EBADF
    assert errno_of(k.pread, t, fd, 1, 0) == errno.EBADF
    rfd = k.open(t, "/f", os.O_RDONLY)
    assert errno_of(k.write, t, rfd, b"x") == errno.EBADF
    assert errno_of(k.pwrite, t, rfd, b"x", 0) == errno.EBADF
    assert errno_of(k.ftruncate, t, rfd, 0) == errno.EINVAL
    assert errno_of(k.read, t, 99, 1) == errno.EBADF
    assert errno_of(k.write, t, -1, b"") == errno.EBADF
    assert errno_of(k.close, t, 99) == errno.EBADF


def test_lseek_and_holes(kt):
    k, t = kt
    fd = k.open(t, "/f", RDWR_CREAT)
    k.write(t, fd, b"abc")
    assert k.lseek(t, fd, -1, os.SEEK_END) == 2
    assert k.lseek(t, fd, 2, os.SEEK_CUR) == 4
    assert errno_of(k.lseek, t, fd, -10, os.SEEK_CUR) == errno.EINVAL
    assert errno_of(k.lseek, t, fd, 0, 42) == errno.EINVAL
    assert k.lseek(t, fd, 6, os.SEEK_SET) == 6
    k.write(t, fd, b"Z")
    assert k.pread(t, fd, 10, 0) == b"abc\0\0\0Z"
    assert errno_of(k.pread, t, fd, 1, -1) == errno.EINVAL


def test_pread_pwrite_keep_position(kt):
    k, t = kt
    fd = k.open(t, "/f", RDWR_CREAT)
    k.write(t, fd, b"0123456789")
    k.lseek(t, fd, 3, os.SEEK_SET)
    assert k.pwrite(t, fd, b"XY", 5) == 2
    assert k.pread(t, fd, 4, 4) == b"4XY7"
    assert k.lseek(t, fd, 0, os.SEEK_CUR) == 3


def test_ftruncate(kt):
    k, t = kt
    fd = k.open(t, "/f", RDWR_CREAT)
    k.write(t, fd, b"abcdef")
    k.ftruncate(t, fd, 2)
    assert k.pread(t, fd, 10, 0) == b"ab"
    k.ftruncate(t, fd, 4)
    assert k.pread(t, fd, 10, 0) == b"ab\0\0"
    assert errno_of(k.ftruncate, t, fd, -1) == errno.EINVAL
    d = k.open(t, "/", os.O_RDONLY)
    assert errno_of(k.ftruncate, t, d, 0) == errno.EINVAL


def test_inode_helpers():
    fs = kernel_filesystem(_MiniKernel())
    ino = fs.new_inode("reg", 0o644)
    ino.write_at(4096, b"x")
    assert ino.size == 4097 and ino.read_at(4095, 3) == b"\0x"
    ino.truncate(1)
    assert ino.read_at(0, 10) == b"\0"
    with pytest.raises(ModelError):
        ino.read_at(-1, 1)


# --- dup, fcntl, sharing -----------------------------------------------------------------

def test_dup_shares_position_and_flags(kt):
    k, t = kt
    fd = k.open(t, "/f", RDWR_CREAT)
    k.write(t, fd, b"abcdef")
    k.lseek(t, fd, 0, os.SEEK_SET)
    d = k.dup(t, fd)
    assert k.read(t, d, 2) == b"ab"
    assert k.read(t, fd, 2) == b"cd"
    k.fcntl(t, d, F_SETFL, os.O_NONBLOCK)
    assert k.fcntl(t, fd, F_GETFL) & os.O_NONBLOCK


def test_fork_shares_position(kt):
    k, t = kt
    fd = k.open(t, "/f", RDWR_CREAT)
    k.write(t, fd, b"abcdef")
    k.lseek(t, fd, 0, os.SEEK_SET)
    child = second_task(k, t)
    assert t.files.get(fd).refs == 2
    assert k.read(t=child, fd=fd, n=3) == b"abc"
    assert k.read(t, fd, 3) == b"def"
    k.close(child, fd)
    assert t.files.get(fd).refs == 1
    # the child's own opens are private
    own = k.open(child, "/f", os.O_RDONLY)
    assert k.read(child, own, 1) == b"a"


def test_dup2_dup3(kt):
    k, t = kt
    a = k.open(t, "/a", RDWR_CREAT)
    b = k.open(t, "/b", RDWR_CREAT)
    file_b = t.files.get(b)
    assert k.dup2(t, a, b) == b
    assert t.files.get(b) is t.files.get(a)
    assert file_b.refs == 0   # closed by dup2
    assert k.dup2(t, a, a) == a
    assert errno_of(k.dup2, t, 77, 5) == errno.EBADF
    assert errno_of(k.dup2, t, a, -1) == errno.EBADF
    assert errno_of(k.dup2, t, a, 1024) == errno.EBADF
    assert errno_of(k.dup3, t, a, a, 0) == errno.EINVAL
    assert errno_of(k.dup3, t, a, 9, 1) == errno.EINVAL
    assert k.dup3(t, a, 9, os.O_CLOEXEC) == 9
    assert k.fcntl(t, 9, F_GETFD) == 1
    assert k.dup2(t, 9, 10) == 10 and k.fcntl(t, 10, F_GETFD) == 0


def test_fcntl(kt):
    k, t = kt
    fd = k.open(t, "/f", RDWR_CREAT | os.O_CLOEXEC)
    assert k.fcntl(t, fd, F_GETFD) == 1
    k.fcntl(t, fd, F_SETFD, 0)
    assert k.fcntl(t, fd, F_GETFD) == 0
    assert k.fcntl(t, fd, F_GETFL) & os.O_ACCMODE == os.O_RDWR
    assert not k.fcntl(t, fd, F_GETFL) & os.O_CREAT     # open-only flags are not kept
    k.fcntl(t, fd, F_SETFL, os.O_APPEND | os.O_WRONLY)  # access mode cannot change
    assert k.fcntl(t, fd, F_GETFL) & (os.O_ACCMODE | os.O_APPEND) == os.O_RDWR | os.O_APPEND
    assert k.fcntl(t, fd, F_DUPFD, 10) == 10
    n = k.fcntl(t, fd, F_DUPFD_CLOEXEC, 10)
    assert n == 11 and k.fcntl(t, n, F_GETFD) == 1
    assert errno_of(k.fcntl, t, fd, F_DUPFD, 5000) == errno.EINVAL
    assert errno_of(k.fcntl, t, fd, 9999) == errno.EINVAL
    assert errno_of(k.fcntl, t, 99, F_GETFD) == errno.EBADF


def test_fdtable_api(kt):
    k, t = kt
    file = File(None, os.O_RDONLY, REGULAR)
    table = FdTable()
    assert table.install(file, 5, cloexec=True) == 5
    assert table.install(file.get()) == 0
    assert [(fd, c) for fd, _, c in table.items()] == [(0, False), (5, True)]
    with pytest.raises(ModelError) as ei:
        table.install(file, 5)
    assert ei.value.errno == errno.EBUSY
    copy = table.fork_copy(k)
    assert file.refs == 4
    copy.close_on_exec(k)
    assert [fd for fd, _, _ in copy.items()] == [0] and file.refs == 3
    copy.put(k)
    table.put(k)
    assert file.refs == 0


# --- directories, unlink ------------------------------------------------------------------

def test_mkdir_chdir_getcwd_relative(kt):
    k, t = kt
    k.mkdir(t, "/a")
    k.mkdir(t, "/a/b")
    k.chdir(t, "/a/b")
    assert k.getcwd(t) == "/a/b"
    k.close(t, k.open(t, "f", RDWR_CREAT))
    assert k.stat(t, "/a/b/f")["st_size"] == 0
    k.chdir(t, "../..")
    assert k.getcwd(t) == "/"
    k.chdir(t, "..")   # .. of the root is the root
    assert k.getcwd(t) == "/"
    k.chdir(t, "a/./b/../b")
    assert k.getcwd(t) == "/a/b"
    assert errno_of(k.chdir, t, "/zz") == errno.ENOENT
    assert errno_of(k.chdir, t, "f") == errno.ENOTDIR
    assert errno_of(k.mkdir, t, "/a") == errno.EEXIST
    assert errno_of(k.mkdir, t, "/q/r") == errno.ENOENT
    assert k.stat(t, "/a")["st_nlink"] == 3


def test_rmdir(kt):
    k, t = kt
    k.mkdir(t, "/a")
    k.close(t, k.open(t, "/a/f", RDWR_CREAT))
    assert errno_of(k.rmdir, t, "/a") == errno.ENOTEMPTY
    assert errno_of(k.rmdir, t, "/a/f") == errno.ENOTDIR
    assert errno_of(k.rmdir, t, "/zz") == errno.ENOENT
    assert errno_of(k.rmdir, t, "/") == errno.EBUSY
    assert errno_of(k.rmdir, t, "/a/.") == errno.EINVAL
    k.unlink(t, "/a/f")
    k.chdir(t, "/a")
    k.rmdir(t, "/a")
    assert errno_of(k.getcwd, t) == errno.ENOENT
    assert errno_of(k.open, t, "g", RDWR_CREAT) == errno.ENOENT


def test_unlink(kt):
    k, t = kt
    k.mkdir(t, "/d")
    assert errno_of(k.unlink, t, "/d") == errno.EISDIR
    assert errno_of(k.unlink, t, "/nope") == errno.ENOENT
    k.close(t, k.open(t, "/f", RDWR_CREAT))
    assert errno_of(k.unlink, t, "/f/") == errno.ENOTDIR
    k.unlink(t, "/f")
    assert errno_of(k.stat, t, "/f") == errno.ENOENT


def test_unlinked_but_open_stays_alive(kt):
    k, t = kt
    fd = k.open(t, "/tmpf", RDWR_CREAT)
    k.write(t, fd, b"secret")
    k.unlink(t, "/tmpf")
    assert k.fstat(t, fd)["st_nlink"] == 0
    k.lseek(t, fd, 0, os.SEEK_SET)
    assert k.read(t, fd, 10) == b"secret"
    # a new file at the same path is a different inode
    fd2 = k.open(t, "/tmpf", RDWR_CREAT)
    assert k.fstat(t, fd2)["st_ino"] != k.fstat(t, fd)["st_ino"]
    assert k.read(t, fd2, 10) == b""


def test_filesystem_walk_sorted(kt):
    k, t = kt
    k.mkdir(t, "/b")
    k.mkdir(t, "/a")
    k.close(t, k.open(t, "/a-x", RDWR_CREAT))
    k.close(t, k.open(t, "/a/z", RDWR_CREAT))
    paths = [p for p, _ in kernel_filesystem(k).walk()]
    assert paths == sorted(paths) and paths[0] == "/"
    assert paths.index("/a") < paths.index("/a/z")


def test_fs_context_fork_copy_is_private(kt):
    k, t = kt
    k.mkdir(t, "/w")
    child = second_task(k, t)
    k.chdir(child, "/w")
    child.fs.umask = 0o077
    assert k.getcwd(t) == "/" and t.fs.umask != 0o077


# --- a random sequence against a reference model -------------------------------------------

_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2), st.binary(max_size=40)),
    st.tuples(st.just("read"), st.integers(0, 2), st.integers(0, 50)),
    st.tuples(st.just("seek"), st.integers(0, 2), st.integers(-20, 60), st.sampled_from([0, 1, 2])),
    st.tuples(st.just("pwrite"), st.integers(0, 2), st.binary(max_size=20), st.integers(0, 70)),
    st.tuples(st.just("trunc"), st.integers(0, 2), st.integers(0, 80)),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_random_ops_match_reference(ops):
    k = _MiniKernel()
    t = _Task(FdTable(), FsContext.new(kernel_filesystem(k)), Cred())
    first = k.open(t, "/f", RDWR_CREAT)
    fds = [first, k.dup(t, first), k.open(t, "/f", os.O_RDWR)]
    # Reference: one bytearray, and a position per open file description (fds 0,1 share).
    data = bytearray()
    pos = {0: 0, 1: 0}
    desc = [0, 0, 1]
    for op in ops:
        kind, which = op[0], op[1]
        fd, d = fds[which], desc[which]
        if kind == "write":
            p = pos[d]
            if p > len(data):
                data.extend(bytes(p - len(data)))
            data[p:p + len(op[2])] = op[2]
            pos[d] = p + len(op[2])
            assert k.write(t, fd, op[2]) == len(op[2])
        elif kind == "read":
            want = bytes(data[pos[d]:pos[d] + op[2]])
            pos[d] += len(want)
            assert k.read(t, fd, op[2]) == want
        elif kind == "seek":
            base = {0: 0, 1: pos[d], 2: len(data)}[op[3]]
            new = base + op[2]
            if new < 0:
                assert errno_of(k.lseek, t, fd, op[2], op[3]) == errno.EINVAL
            else:
                pos[d] = new
                assert k.lseek(t, fd, op[2], op[3]) == new
        elif kind == "pwrite":
            off = op[3]
            if off > len(data):
                data.extend(bytes(off - len(data)))
            data[off:off + len(op[2])] = op[2]
            assert k.pwrite(t, fd, op[2], off) == len(op[2])
        else:
            n = op[2]
            del data[n:]
            data.extend(bytes(n - len(data)))
            k.ftruncate(t, fd, n)
        assert k.pread(t, fd, 1000, 0) == bytes(data)

"""The files, fs and file-system-snapshot kinds: save and restore through the real codec and
contexts (objects checkpointed one by one, restored into a fresh Kernel)."""
from __future__ import annotations

import errno
import io
import os

import pytest

from ckptsim.cr.context import CheckpointContext, Log, RestartContext, RestartError
from ckptsim.image.codec import ImageReader
from ckptsim.image.types import ObjType
from ckptsim.kinds import files, fs as fs_kind, pipes  # noqa: F401  (registers the kinds)
from ckptsim.model.kernel import Kernel
from ckptsim.model.vfs import FdTable, FsContext

RDWR_CREAT = os.O_RDWR | os.O_CREAT


def checkpoint_objects(k, objs):
    """Write the FS snapshot and ``objs`` (one ctx.ref each); return (image, leaks)."""
    buf = io.BytesIO()
    ctx = CheckpointContext(k, k.init, k.init, [k.init], buf, Log())
    files.save_filesystem(ctx, k.vfs)
    refs = [ctx.ref(o) for o in objs]
    ctx.writer.finish()
    return buf.getvalue(), refs, ctx.leaks()


def restore_objects(image, refs, otypes, k2=None, restore_fs=True):
    """Restore into ``k2`` (a fresh Kernel by default); the table's references are dropped."""
    k2 = k2 or Kernel()
    rctx = RestartContext(k2, k2.init, ImageReader(image), Log(), restore_fs)
    files.load_filesystem(rctx, k2.vfs)
    rctx.peek()   # loads every OBJREF up to the tail
    objs = [rctx.obj(r, t) for r, t in zip(refs, otypes)]
    for o in objs:
        o.get()   # the "task" references
    for _, o in sorted(rctx.objects.items()):
        o.put(k2)
    return k2, objs


def roundtrip_table(k, table):
    image, refs, leaks = checkpoint_objects(k, [table])
    assert leaks == []
    k2, (table2,) = restore_objects(image, refs, [ObjType.FILE_TABLE])
    return k2, table2, image


def task_with(k2, table):
    t = k2.init
    old = t.files
    t.files = table
    old.put(k2)
    return t


def test_fd_table_with_shared_descriptions():
    k = Kernel()
    t = k.init
    k.mkdir(t, "/data")
    fd = k.open(t, "/data/f", RDWR_CREAT)
    k.write(t, fd, b"0123456789")
    k.lseek(t, fd, 4, os.SEEK_SET)
    k.dup2(t, fd, 7)
    other = k.open(t, "/data/f", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    app = k.open(t, "/data/f", os.O_WRONLY | os.O_APPEND)
    d = k.open(t, "/data", os.O_RDONLY | os.O_DIRECTORY)
    k2, table2, _ = roundtrip_table(k, t.files)
    t2 = task_with(k2, table2)
    assert [x for x, _, _ in table2.items()] == [fd, other, app, d, 7]
    assert table2.get(fd) is table2.get(7)
    assert table2.get(fd).refs == 2 and table2.get(other).refs == 1
    assert table2.is_cloexec(other) and not table2.is_cloexec(fd)
    assert table2.get(other).flags & os.O_NONBLOCK
    assert table2.get(app).flags & os.O_APPEND
    assert k2.read(t2, fd, 3) == b"456"
    assert k2.read(t2, 7, 3) == b"789"          # position still shared
    k2.write(t2, app, b"!")
    assert k2.pread(t2, other, 20, 0) == b"0123456789!"
    assert table2.get(d).kind == "dir"


def test_pipe_with_data_shared_by_both_ends():
    k = Kernel()
    t = k.init
    r, w = k.pipe(t)
    k.write(t, w, b"buffered bytes")
    k.dup(t, w)
    image, refs, leaks = checkpoint_objects(k, [t.files])
    assert leaks == []
    names = [rec.name for rec in list(ImageReader(image).records())]
    assert names.count("PIPE_BUF") == 1        # the buffer is saved once
    k2, (table2,) = restore_objects(image, refs, [ObjType.FILE_TABLE])
    t2 = task_with(k2, table2)
    pipe = table2.get(r).private
    assert pipe is table2.get(w).private
    assert (pipe.readers, pipe.writers, pipe.refs, pipe.capacity) == (1, 1, 2, 65536)
    assert table2.get(r).inode is table2.get(w).inode
    assert k2.read(t2, r, 100) == b"buffered bytes"
    k2.close(t2, w)
    k2.close(t2, w + 1)
    assert k2.read(t2, r, 1) == b""


def test_fifo_roundtrip():
    k = Kernel()
    t = k.init
    k.mkfifo(t, "/ff")
    a = k.open(t, "/ff", os.O_RDWR)
    b = k.open(t, "/ff", os.O_RDONLY)
    k.write(t, a, b"fifo data")
    k2, table2, _ = roundtrip_table(k, t.files)
    t2 = task_with(k2, table2)
    inode = k2.vfs.lookup("/ff")
    assert inode.kind == "fifo" and inode.pipe is table2.get(a).private
    assert table2.get(b).private is inode.pipe
    assert k2.read(t2, b, 100) == b"fifo data"
    # a new open of the FIFO joins the restored pipe
    c = k2.open(t2, "/ff", os.O_WRONLY | os.O_NONBLOCK)
    k2.write(t2, c, b"more")
    assert k2.read(t2, a, 100) == b"more"


def test_unlinked_but_open_file_is_saved_by_contents_once():
    k = Kernel()
    t = k.init
    fd = k.open(t, "/scratch", RDWR_CREAT)
    fd2 = k.open(t, "/scratch", os.O_RDONLY)
    k.write(t, fd, b"gone but open")
    k.unlink(t, "/scratch")
    image, refs, leaks = checkpoint_objects(k, [t.files])
    recs = [rec for rec in list(ImageReader(image).records()) if rec.name == "FILE_UNLINKED"]
    assert [rec["has_data"] for rec in recs] == [1, 0]
    k2, (table2,) = restore_objects(image, refs, [ObjType.FILE_TABLE])
    t2 = task_with(k2, table2)
    assert k2.vfs.lookup("/scratch") is None
    inode = table2.get(fd).inode
    assert inode is table2.get(fd2).inode and inode.nlink == 0
    assert k2.read(t2, fd2, 100) == b"gone but open"
    assert k2.fstat(t2, fd)["st_nlink"] == 0


def test_unlinked_but_open_file_keeps_the_path_it_was_opened_by():
    k = Kernel()
    t = k.init
    fd = k.open(t, "/scratch", RDWR_CREAT)
    k.write(t, fd, b"x")
    k.unlink(t, "/scratch")
    image, refs, _ = checkpoint_objects(k, [t.files])
    k2, (table2,) = restore_objects(image, refs, [ObjType.FILE_TABLE])
    assert table2.get(fd).path == "/scratch" and table2.get(fd).inode.nlink == 0
    assert k2.vfs.lookup("/scratch") is None


def test_refused_flags_on_restart():
    k = Kernel()
    t = k.init
    fd = k.open(t, "/f", RDWR_CREAT)
    t.files.get(fd).flags |= os.O_TRUNC   # a corrupted or hostile image
    image, refs, _ = checkpoint_objects(k, [t.files])
    with pytest.raises(RestartError) as ei:
        restore_objects(image, refs, [ObjType.FILE_TABLE])
    assert ei.value.errno == errno.EINVAL


def test_missing_file_on_restart_is_enoent():
    k = Kernel()
    t = k.init
    k.open(t, "/only-here", RDWR_CREAT)
    image, refs, _ = checkpoint_objects(k, [t.files])
    with pytest.raises(RestartError) as ei:
        restore_objects(image, refs, [ObjType.FILE_TABLE], restore_fs=False)
    assert ei.value.errno == errno.ENOENT


def test_leak_of_a_file_shared_outside():
    k = Kernel()
    t = k.init
    fd = k.open(t, "/f", RDWR_CREAT)
    outside = FdTable()
    outside.install(t.files.get(fd).get())
    _, _, leaks = checkpoint_objects(k, [t.files])
    assert leaks and "usage leak" in leaks[0]


def test_fs_context_roundtrip():
    k = Kernel()
    t = k.init
    k.mkdir(t, "/a")
    k.mkdir(t, "/a/b")
    k.chdir(t, "/a/b")
    t.fs.umask = 0o077
    image, refs, leaks = checkpoint_objects(k, [t.fs])
    assert leaks == []
    k2, (fs2,) = restore_objects(image, refs, [ObjType.FS])
    assert isinstance(fs2, FsContext)
    assert (fs2.cwd_path, fs2.root_path, fs2.umask) == ("/a/b", "/", 0o077)
    assert fs2.cwd is k2.vfs.lookup("/a/b") and fs2.root is k2.vfs.root


def test_fs_context_with_removed_cwd_fails():
    from ckptsim.cr.context import CheckpointError
    k = Kernel()
    t = k.init
    k.mkdir(t, "/a")
    k.chdir(t, "/a")
    k.rmdir(t, "/a")
    with pytest.raises(CheckpointError) as ei:
        checkpoint_objects(k, [t.fs])
    assert ei.value.errno == errno.EBADF


def test_filesystem_snapshot_into_a_used_kernel():
    k = Kernel()
    t = k.init
    k.mkdir(t, "/etc", 0o750)
    fd = k.open(t, "/etc/conf", RDWR_CREAT, 0o600)
    k.write(t, fd, b"x=1")
    k.mkfifo(t, "/etc/ff")
    ino = k.stat(t, "/etc/conf")["st_ino"]
    image, _, _ = checkpoint_objects(k, [])
    k2 = Kernel()
    t2 = k2.init
    k2.mkdir(t2, "/stale")
    k2.close(t2, k2.open(t2, "/etc", RDWR_CREAT))   # a file where a directory must be
    _, _ = restore_objects(image, [], [], k2)
    assert k2.vfs.lookup("/stale") is None
    st = k2.stat(t2, "/etc/conf")
    assert st["st_ino"] == ino and st["st_mode"] & 0o777 == 0o600
    assert k2.stat(t2, "/etc")["st_mode"] & 0o777 == 0o750
    assert k2.vfs.lookup("/etc/ff").kind == "fifo"
    assert k2.pread(t2, k2.open(t2, "/etc/conf", os.O_RDONLY), 10, 0) == b"x=1"
    assert [p for p, _ in k2.vfs.walk()] == [p for p, _ in k.vfs.walk()]
    assert k2.vfs.next_ino >= k.vfs.next_ino


def test_snapshot_is_read_but_not_applied_without_restore_fs():
    k = Kernel()
    k.mkdir(k.init, "/only-in-image")
    image, _, _ = checkpoint_objects(k, [])
    k2 = Kernel()
    restore_objects(image, [], [], k2, restore_fs=False)
    assert k2.vfs.lookup("/only-in-image") is None


def test_end_to_end_through_the_api():
    """checkpoint() a task with files and a pipe, restart() it into a fresh Kernel."""
    from ckptsim.cr import api
    from ckptsim.image import core
    k = Kernel()
    c = k.clone(k.init, 0)
    fd = k.open(c, "/f", RDWR_CREAT)
    k.write(c, fd, b"abc")
    k.lseek(c, fd, 1, os.SEEK_SET)
    r, w = k.pipe(c)
    k.write(c, w, b"pp")
    k.cgroup_create(k.init, "/ct")
    k.cgroup_attach(k.init, "/ct", c.tid)
    k.freeze(k.init, "/ct")  # an external checkpoint needs its tasks frozen
    buf = io.BytesIO()
    api.checkpoint(k, k.init, c.tid, buf, core.CHECKPOINT_SUBTREE)
    k2 = Kernel()
    t2 = api.restart_tasks(k2, k2.init, 0, buf.getvalue(), 0, restore_fs=True)[0]
    assert k2.read(t2, fd, 10) == b"bc"
    assert k2.read(t2, r, 10) == b"pp"


def test_filesystem_snapshot_with_a_socket_inode():
    """A socket bound to a path is an S_IFSOCK inode: the snapshot saves and recreates it
    (it raised KeyError 'sock' in save_filesystem)."""
    from ckptsim.model.unix import SocketInode
    k = Kernel()
    t = k.init
    k.mkdir(t, "/tmp", 0o777)
    s = k.socket(t, 1, 1)
    k.bind(t, s, "/tmp/srv.sock")
    ino = k.stat(t, "/tmp/srv.sock")["st_ino"]
    image, _, _ = checkpoint_objects(k, [])
    k2, _ = restore_objects(image, [], [])
    inode = k2.vfs.lookup("/tmp/srv.sock")
    assert isinstance(inode, SocketInode) and inode.bound is None and inode.ino == ino
    assert k2.stat(k2.init, "/tmp/srv.sock")["st_mode"] & 0o170000 == 0o140000   # S_IFSOCK
    with pytest.raises(OSError) as e:   # nobody is bound to it in the fresh kernel
        k2.connect(k2.init, k2.socket(k2.init, 1, 1), "/tmp/srv.sock")
    assert e.value.errno == errno.ECONNREFUSED

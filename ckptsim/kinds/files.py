"""Files: the fd table (FILE_TABLE/FILE_DESC), open file descriptions (FILE + name or contents)
and the container's file-system snapshot (FS_SNAPSHOT/FS_INODE/FS_DATA).

An fd slot holds one reference of its File, so every slot is one ``ctx.ref(file)``; a File is
written once (OBJREF + FILE + FILE_NAME, or FILE_UNLINKED + the FILE_NAME it was opened by). A pipe/FIFO File refers to its Pipe
(kinds/pipes.py) and a socket File to its socket (the unix kind) by objref, each written before
the FILE record that names it. Unlike Linux-CR, an unlinked-but-open inode is saved by contents
(once per inode per image) and restored as an unlinked inode.

A live image has no file-system snapshot: when it is replayed into a fresh model
(``restore_fs``), every path it names that does not exist yet is created as a placeholder
(``lookup_or_placeholder``): parents as directories, the file as an empty regular file (a
directory when opened with O_DIRECTORY, a FIFO for a FIFO file).
"""
from __future__ import annotations

import errno
import os
import posixpath

from ..image.schema import ENUMS, layout
from ..image.types import ObjType
from ..model.pipe import FIFO_TYPE, PIPE_TYPE, open_pipe_file
from ..model.vfs import (DIRECTORY, FILE_TYPES, KIND_DIR, KIND_FIFO, KIND_REG, NR_OPEN_DEFAULT,
                         REGULAR, FdTable, File, FileSystem, Inode, kernel_filesystem, readable,
                         writable)
from ..model.unix import SocketInode
from .registry import Kind, register

F_TYPE_GENERIC, F_TYPE_PIPE, F_TYPE_FIFO, F_TYPE_SOCKET = 1, 2, 3, 4
ENUMS["f_type"] = {F_TYPE_GENERIC: "GENERIC", F_TYPE_PIPE: "PIPE", F_TYPE_FIFO: "FIFO",
                   F_TYPE_SOCKET: "SOCKET"}
_F_TYPE_OF_KIND = {"regular": F_TYPE_GENERIC, "dir": F_TYPE_GENERIC, "pipe": F_TYPE_PIPE,
                   "fifo": F_TYPE_FIFO, "socket": F_TYPE_SOCKET}
ENUMS["open_flags"] = {flag: name for name, flag in sorted(
    (n, getattr(os, n)) for n in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_EXCL", "O_NOCTTY", "O_TRUNC",
                                  "O_APPEND", "O_NONBLOCK", "O_DSYNC", "O_ASYNC", "O_DIRECT",
                                  "O_DIRECTORY", "O_NOFOLLOW", "O_NOATIME", "O_CLOEXEC", "O_SYNC",
                                  "O_PATH", "O_TMPFILE")) if flag}
ENUMS["f_mode"] = {1: "FMODE_READ", 2: "FMODE_WRITE"}
KIND_SOCK = "sock"   # a socket inode (bind to a path): SocketInode, bound again by kinds/unix
INODE_KINDS = {1: KIND_DIR, 2: KIND_REG, 3: KIND_FIFO, 4: KIND_SOCK}
_INODE_KIND_NUM = {v: k for k, v in INODE_KINDS.items()}
ENUMS["inode_kind"] = {1: "DIR", 2: "REG", 3: "FIFO", 4: "SOCK"}

MAX_CONTENTS = 1 << 30

FILE_TABLE = layout(301, "FILE_TABLE", [("fdt_nfds", "i32")], subsystem="file")
FILE_DESC = layout(302, "FILE_DESC", [
    ("fd_objref", "i32", "objref:FILE"), ("fd_descriptor", "i32"), ("fd_close_on_exec", "u32")],
    subsystem="file")
FILE_NAME = layout(303, "FILE_NAME", [], var="str", subsystem="file")
FILE = layout(304, "FILE", [
    ("f_type", "u16", "enum:f_type"), ("f_mode", "u16", "flags:f_mode"),
    ("f_flags", "u32", "flags:open_flags"), ("f_pos", "i64"),
    ("pipe_objref", "i32", "objref:PIPE"), ("sock_objref", "i32", "objref:SOCK")],
    subsystem="file")
# Contents of an unlinked-but-open inode; ``has_data`` 0 means "same ino as an earlier one".
FILE_UNLINKED = layout(305, "FILE_UNLINKED", [
    ("ino", "u64"), ("kind", "u16", "enum:inode_kind"), ("has_data", "u16"),
    ("mode", "u32", "octal")], var="bytes", max_var=MAX_CONTENTS, subsystem="file")
FS_SNAPSHOT = layout(320, "FS_SNAPSHOT", [("nr_inodes", "u32"), ("pad", "u32"),
                                          ("next_ino", "u64")], subsystem="file")
FS_INODE = layout(321, "FS_INODE", [
    ("ino", "u64"), ("kind", "u16", "enum:inode_kind"), ("pad", "u16"), ("mode", "u32", "octal"),
    ("uid", "u32"), ("gid", "u32")], var="str", subsystem="file")
FS_DATA = layout(322, "FS_DATA", [], var="bytes", max_var=MAX_CONTENTS, subsystem="file")

# Linux-CR refuses these in saved f_flags (rule 10): they only make sense at open time.
REFUSED_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC


def f_mode_of(flags: int) -> int:
    return (1 if readable(flags) else 0) | (2 if writable(flags) else 0)


def _state(ctx) -> dict:
    """Per-checkpoint/restart scratch space of this kind (kept on the context)."""
    state = getattr(ctx, "_files_state", None)
    if state is None:
        state = {"unlinked": {}, "pipe_inodes": {}}
        ctx._files_state = state
    return state


# --- the fd table ------------------------------------------------------------------------

def save_fdtable(ctx, table: FdTable) -> None:
    items = table.items()
    ctx.write(FILE_TABLE, fdt_nfds=len(items))
    for fd, file, cloexec in items:
        ref = ctx.ref(file)   # the slot's reference
        ctx.write(FILE_DESC, fd_objref=ref, fd_descriptor=fd, fd_close_on_exec=int(cloexec))


def load_fdtable(ctx) -> FdTable:
    nfds = ctx.read(FILE_TABLE)["fdt_nfds"]
    if nfds < 0 or nfds > NR_OPEN_DEFAULT:
        ctx.fail(errno.EMFILE, f"fd table with {nfds} descriptors exceeds {NR_OPEN_DEFAULT}")
    table = FdTable()
    ctx.bind(table)
    for _ in range(nfds):
        desc = ctx.read(FILE_DESC)
        fd = desc["fd_descriptor"]
        file = ctx.obj(desc["fd_objref"], ObjType.FILE)
        if file is None:
            ctx.fail(errno.EINVAL, f"fd {fd} names no file")
        if fd < 0 or fd >= table.limit or fd in table.fds:
            ctx.fail(errno.EINVAL, f"fd {fd} is out of range or repeated")
        table.install(file.get(), fd, bool(desc["fd_close_on_exec"]))
    return table


# --- open file descriptions ----------------------------------------------------------------

def _save_inode_ref(ctx, file: File) -> None:
    """FILE_NAME for a linked inode, else FILE_UNLINKED with its contents (once per inode)."""
    path = file.linked_path(ctx.kernel)
    if path is not None:
        ctx.write(FILE_NAME, var=path)
        return
    inode = file.inode
    seen = _state(ctx)["unlinked"]
    first = inode.ino not in seen
    seen[inode.ino] = inode
    data = bytes(inode.data) if first and inode.kind == KIND_REG else b""
    ctx.write(FILE_UNLINKED, ino=inode.ino, kind=_INODE_KIND_NUM[inode.kind], has_data=int(first),
              mode=inode.mode, var=data)
    if file.path:  # the name it was opened by (Linux shows "<path> (deleted)" for the fd)
        ctx.write(FILE_NAME, var=file.path)
    ctx.log(f"unlinked inode {inode.ino} saved by contents ({len(data)} bytes)")


def save_file(ctx, file: File) -> None:
    kind = file.ftype.kind
    f_type = _F_TYPE_OF_KIND.get(kind)
    if f_type is None:
        ctx.fail(errno.EBADF, f"file type {kind!r} cannot be checkpointed")
    pipe_ref = sock_ref = 0
    if f_type in (F_TYPE_PIPE, F_TYPE_FIFO):
        pipe_ref = ctx.ref(file.private)   # the File's reference of its Pipe
    elif f_type == F_TYPE_SOCKET:
        sock_ref = ctx.ref(file.private)   # the File's reference of its socket
    ctx.write(FILE, f_type=f_type, f_mode=f_mode_of(file.flags), f_flags=file.flags,
              f_pos=file.pos if file.ftype.seekable else 0, pipe_objref=pipe_ref,
              sock_objref=sock_ref)
    if f_type in (F_TYPE_GENERIC, F_TYPE_FIFO):
        _save_inode_ref(ctx, file)


# --- placeholders for live images (replay into a fresh model) ---------------------------------

_PLACEHOLDER_MODES = {KIND_DIR: 0o755, KIND_REG: 0o644, KIND_FIFO: 0o644}


def lookup_or_placeholder(ctx, path: str, kind: str) -> Inode | None:
    """The inode at ``path``; when the restart makes placeholders (``ctx.placeholders``: a live
    image, which has no file-system snapshot, replayed with ``restore_fs``) a missing path is
    created first: its missing parents as directories, itself as an inode of ``kind`` (a
    regular file is empty: the image holds no contents of linked files). Each path created is
    appended to ``ctx.placeholders``."""
    vfs = kernel_filesystem(ctx.kernel)
    if not path.startswith("/"):
        return None
    inode = vfs.lookup(path)
    made = getattr(ctx, "placeholders", None)
    if inode is not None or made is None:
        return inode
    node, prefix = vfs.root, ""
    names = [c for c in path.split("/") if c and c != "."]
    if not names or ".." in names:
        return None
    for i, name in enumerate(names):
        prefix += "/" + name
        child = node.children.get(name)
        if child is None:
            last = i == len(names) - 1
            child_kind = kind if last else KIND_DIR
            child = vfs.new_inode(child_kind, _PLACEHOLDER_MODES[child_kind])
            vfs.link(node, name, child)
            made.append(prefix)
        elif child.kind != KIND_DIR and i < len(names) - 1:
            ctx.fail(errno.ENOTDIR, f"placeholder for {path!r}: {prefix} is a {child.kind}, not a directory")
        node = child
    return node


def _load_inode(ctx, expect_kinds: tuple[str, ...], kind_hint: str = KIND_REG) -> tuple[Inode, str]:
    """Read FILE_NAME (look the path up) or FILE_UNLINKED (recreate the unlinked inode).
    ``kind_hint``: what a missing path becomes when the restart makes placeholders."""
    vfs = kernel_filesystem(ctx.kernel)
    if ctx.peek() is FILE_UNLINKED:
        rec = ctx.read(FILE_UNLINKED)
        kind = INODE_KINDS.get(rec["kind"])
        restored = _state(ctx)["unlinked"]
        inode = restored.get(rec["ino"])
        if inode is None:
            if not rec["has_data"] or kind is None:
                ctx.fail(errno.EINVAL, f"unlinked inode {rec['ino']} has no saved contents")
            if ctx.restore_fs:  # a fresh kernel: keep the number the snapshot accounted for
                inode = Inode(rec["ino"], kind, rec["mode"])
            else:
                inode = vfs.new_inode(kind, rec["mode"])   # never linked: nlink stays 0
            inode.data[:] = rec.var
            restored[rec["ino"]] = inode
        path = ""
        if ctx.reader.peek() is FILE_NAME:  # not ctx.peek(): the next object's OBJREF stays put
            path = ctx.read(FILE_NAME).var
    else:
        path = ctx.read(FILE_NAME).var
        inode = lookup_or_placeholder(ctx, path, kind_hint)
        if inode is None:
            ctx.fail(errno.ENOENT, f"file {path!r} does not exist")
    if inode.kind not in expect_kinds:
        ctx.fail(errno.EINVAL, f"file {path or inode.ino} is a {inode.kind}, not {'/'.join(expect_kinds)}")
    return inode, path


def load_file(ctx) -> File:
    rec = ctx.read(FILE)
    f_type, flags = rec["f_type"], rec["f_flags"]
    if flags & REFUSED_FLAGS:
        ctx.fail(errno.EINVAL, f"saved f_flags {flags:#o} hold O_CREAT/O_EXCL/O_NOCTTY/O_TRUNC")
    if rec["f_mode"] != f_mode_of(flags):
        ctx.fail(errno.EINVAL, f"f_mode {rec['f_mode']} does not match f_flags {flags:#o}")
    if f_type == F_TYPE_GENERIC:
        hint = KIND_DIR if flags & os.O_DIRECTORY else KIND_REG
        inode, path = _load_inode(ctx, (KIND_REG, KIND_DIR), hint)
        ftype = DIRECTORY if inode.kind == KIND_DIR else REGULAR
        file = File(inode, flags, ftype, path=path)
    elif f_type == F_TYPE_PIPE:
        pipe = _pipe(ctx, rec)
        inodes = _state(ctx)["pipe_inodes"]   # both ends share one anonymous inode
        inode = inodes.get(rec["pipe_objref"])
        if inode is None:
            inode = inodes[rec["pipe_objref"]] = kernel_filesystem(ctx.kernel).new_anon_inode(KIND_FIFO, 0o600)
        file = open_pipe_file(pipe, flags, PIPE_TYPE, inode)
    elif f_type == F_TYPE_FIFO:
        pipe = _pipe(ctx, rec)
        inode, path = _load_inode(ctx, (KIND_FIFO,), KIND_FIFO)
        if inode.pipe is None:
            pipe.attach(inode)
        elif inode.pipe is not pipe:
            ctx.fail(errno.EBUSY, f"fifo {path} is already open outside the restart")
        file = open_pipe_file(pipe, flags, FIFO_TYPE, inode, path)
    elif f_type == F_TYPE_SOCKET:
        sock = ctx.obj(rec["sock_objref"], ObjType.SOCK)
        ftype = FILE_TYPES.get("socket")
        if sock is None or ftype is None:
            ctx.fail(errno.EINVAL, "socket file without a socket or socket support")
        file = File(None, flags, ftype, private=sock.get())
        attach = getattr(ftype, "restore_file", None)
        if attach is not None:
            attach(ctx.kernel, file)
    else:
        ctx.fail(errno.EINVAL, f"unknown file type {f_type}")
    if file.ftype.seekable:
        file.pos = rec["f_pos"]
    return file


def _pipe(ctx, rec):
    pipe = ctx.obj(rec["pipe_objref"], ObjType.PIPE)
    if pipe is None:
        ctx.fail(errno.EINVAL, "pipe file without a pipe")
    return pipe


# --- the file-system snapshot (container section) --------------------------------------------

def save_filesystem(ctx, fs: FileSystem) -> None:
    """Every linked inode in sorted path order: FS_INODE (+ FS_DATA for regular files)."""
    entries = fs.walk()
    ctx.write(FS_SNAPSHOT, nr_inodes=len(entries), pad=0, next_ino=fs.next_ino)
    for path, inode in entries:
        ctx.write(FS_INODE, ino=inode.ino, kind=_INODE_KIND_NUM[inode.kind], pad=0,
                  mode=inode.mode, uid=inode.uid, gid=inode.gid, var=path)
        if inode.kind == KIND_REG:
            ctx.write(FS_DATA, var=bytes(inode.data))


def load_filesystem(ctx, fs: FileSystem) -> None:
    """Read the snapshot; when the restart asks for it (``ctx.restore_fs``) make ``fs`` match.

    Inodes that exist at the same path with the same kind are updated in place (Files open on
    them stay valid); others are removed or created, keeping the saved inode numbers.
    """
    head = ctx.read(FS_SNAPSHOT)
    wanted: dict[str, tuple] = {}
    for _ in range(head["nr_inodes"]):
        rec = ctx.read(FS_INODE)
        kind = INODE_KINDS.get(rec["kind"])
        if kind is None or not rec.var.startswith("/"):
            ctx.fail(errno.EINVAL, f"bad FS_INODE {rec.var!r}")
        data = bytes(ctx.read(FS_DATA).var) if kind == KIND_REG else b""
        wanted[rec.var] = (rec["ino"], kind, rec["mode"], rec["uid"], rec["gid"], data)
    if not getattr(ctx, "restore_fs", True):
        return
    for path, inode in reversed(fs.walk()):   # children before their directories
        if path == "/":
            continue
        want = wanted.get(path)
        if want is None or want[1] != inode.kind:
            fs.unlink(fs.lookup(posixpath.dirname(path)), posixpath.basename(path))
    for path in sorted(wanted):
        ino, kind, mode, uid, gid, data = wanted[path]
        inode = fs.lookup(path)
        if inode is None:
            parent = fs.lookup(posixpath.dirname(path))
            if parent is None or parent.kind != KIND_DIR:
                ctx.fail(errno.EINVAL, f"FS_INODE {path}: no parent directory")
            if kind == KIND_SOCK:
                inode = SocketInode(ino, mode, uid, gid)
            else:
                inode = Inode(ino, kind, mode, uid, gid)
            fs.link(parent, posixpath.basename(path), inode)
        inode.mode, inode.uid, inode.gid = mode & 0o7777, uid, gid
        if kind == KIND_REG:
            inode.data[:] = data
    fs.next_ino = max(fs.next_ino, head["next_ino"])


register(Kind(name="file_table", objtype=ObjType.FILE_TABLE, model_types=(FdTable,),
              layouts=(FILE_TABLE, FILE_DESC), save_object=save_fdtable, load_object=load_fdtable,
              doc="fd table: FILE_TABLE, then FILE_DESC per fd"))
register(Kind(name="file", objtype=ObjType.FILE, model_types=(File,),
              layouts=(FILE, FILE_NAME, FILE_UNLINKED, FS_SNAPSHOT, FS_INODE, FS_DATA),
              save_object=save_file, load_object=load_file,
              doc="open file description: FILE + FILE_NAME or FILE_UNLINKED; FS snapshot"))

__all__ = ["save_filesystem", "load_filesystem", "FILE_TABLE", "FILE_DESC", "FILE_NAME", "FILE",
           "FILE_UNLINKED", "FS_SNAPSHOT", "FS_INODE", "FS_DATA"]

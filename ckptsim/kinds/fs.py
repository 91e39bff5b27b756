"""A task's fs context (root, cwd, umask): FS{umask} + the root and cwd paths.

The var part is ``root + "\\0" + cwd`` (absolute paths). As in Linux-CR, a removed cwd or root
cannot be named by a path and the checkpoint fails with EBADF. Replaying a live image (no
file-system snapshot) creates a missing root or cwd as a placeholder directory
(``files.lookup_or_placeholder``).
"""
from __future__ import annotations

import errno

from ..image.schema import layout
from ..image.types import ObjType
from ..model.vfs import KIND_DIR, FsContext
from .registry import Kind, register

FS = layout(451, "FS", [("umask", "u32", "octal")], var="str", subsystem="fs")


def save_fs(ctx, fsctx: FsContext) -> None:
    for what, inode in (("root", fsctx.root), ("cwd", fsctx.cwd)):
        if inode.nlink == 0:
            ctx.fail(errno.EBADF, f"the {what} directory was removed")
    ctx.write(FS, umask=fsctx.umask, var=f"{fsctx.root_path}\0{fsctx.cwd_path}")


def load_fs(ctx) -> FsContext:
    rec = ctx.read(FS)
    paths = rec.var.split("\0")
    if len(paths) != 2 or not all(p.startswith("/") for p in paths):
        ctx.fail(errno.EINVAL, f"bad FS paths {rec.var!r}")
    from .files import lookup_or_placeholder   # a live image's replay makes missing dirs
    inodes = []
    for path in paths:
        inode = lookup_or_placeholder(ctx, path, KIND_DIR)
        if inode is None or inode.kind != KIND_DIR:
            ctx.fail(errno.ENOENT, f"directory {path} does not exist")
        inodes.append(inode)
    return FsContext(inodes[0], inodes[1], paths[1], rec["umask"] & 0o777, paths[0])


register(Kind(name="fs", objtype=ObjType.FS, model_types=(FsContext,), layouts=(FS,),
              save_object=save_fs, load_object=load_fs, doc="root, cwd and umask"))

"""Pipes and FIFOs: one PIPE object (capacity, flags) + PIPE_BUF (the buffered bytes).

The Pipe is saved once, by the first File that refers to it (either end of a pipe, or any open
of a FIFO); every such File holds one reference of it. Reader and writer counts are not saved:
they follow from the Files restored on top (``open_pipe_file``).
"""
from __future__ import annotations

import errno

from ..image.schema import ENUMS, layout
from ..image.types import ObjType
from ..model.pipe import Pipe
from .registry import Kind, register

PIPE_IS_FIFO = 0x1
ENUMS["pipe_flags"] = {PIPE_IS_FIFO: "FIFO"}
MAX_PIPE_CAPACITY = 1 << 20   # Linux's /proc/sys/fs/pipe-max-size default

PIPE = layout(350, "PIPE", [("capacity", "u32"), ("flags", "u32", "flags:pipe_flags")],
              subsystem="pipe")
PIPE_BUF = layout(351, "PIPE_BUF", [], var="bytes", max_var=MAX_PIPE_CAPACITY, subsystem="pipe")


def save_pipe(ctx, pipe: Pipe) -> None:
    ctx.write(PIPE, capacity=pipe.capacity, flags=PIPE_IS_FIFO if pipe.inode is not None else 0)
    ctx.write(PIPE_BUF, var=bytes(pipe.buffer))


def load_pipe(ctx) -> Pipe:
    rec = ctx.read(PIPE)
    capacity = rec["capacity"]
    if not 0 < capacity <= MAX_PIPE_CAPACITY:
        ctx.fail(errno.EINVAL, f"pipe capacity {capacity} out of range")
    data = ctx.read(PIPE_BUF).var
    if len(data) > capacity:
        ctx.fail(errno.EINVAL, f"pipe holds {len(data)} bytes, more than its capacity {capacity}")
    return Pipe(capacity, data)


register(Kind(name="pipe", objtype=ObjType.PIPE, model_types=(Pipe,), layouts=(PIPE, PIPE_BUF),
              save_object=save_pipe, load_object=load_pipe,
              doc="pipe/FIFO buffer, shared by both ends"))

"""The pipe kind: PIPE + PIPE_BUF, restored exactly and shared by every File on it."""
from __future__ import annotations

import errno
import io

import pytest

from ckptsim.cr.context import CheckpointContext, Log, RestartContext, RestartError
from ckptsim.image.codec import ImageReader
from ckptsim.image.types import ObjType
from ckptsim.kinds import files, pipes  # noqa: F401  (registers the kinds)
from ckptsim.model.kernel import Kernel
from ckptsim.model.pipe import Pipe


def _roundtrip(pipe, k=None):
    k = k or Kernel()
    buf = io.BytesIO()
    ctx = CheckpointContext(k, k.init, k.init, [k.init], buf, Log())
    ref = ctx.ref(pipe)
    ctx.writer.finish()
    k2 = Kernel()
    rctx = RestartContext(k2, k2.init, ImageReader(buf.getvalue()), Log())
    rctx.peek()
    return rctx.obj(ref, ObjType.PIPE), buf.getvalue()


def test_pipe_contents_and_capacity_restored_exactly():
    pipe = Pipe(capacity=4096, data=b"\x00binary\xffdata")
    restored, _ = _roundtrip(pipe)
    assert bytes(restored.buffer) == b"\x00binary\xffdata"
    assert restored.capacity == 4096 and restored.refs == 1
    assert (restored.readers, restored.writers) == (0, 0)   # the Files count themselves


def test_empty_and_full_pipes():
    assert bytes(_roundtrip(Pipe())[0].buffer) == b""
    full = Pipe(data=bytes(range(256)) * 256)
    assert bytes(_roundtrip(full)[0].buffer) == bytes(range(256)) * 256


def test_overfull_pipe_image_is_refused():
    pipe = Pipe(capacity=8, data=b"0123456789")
    with pytest.raises(RestartError) as ei:
        _roundtrip(pipe)
    assert ei.value.errno == errno.EINVAL

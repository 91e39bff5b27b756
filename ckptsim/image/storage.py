"""Image files on disk: created mode 0600 and written atomically; read without copying.

Images hold process memory, i.e. secrets: a new image is written to a temporary file of mode
0600 in the target directory, synced, then renamed over the target, so a reader never sees a
half-written image and no other user can read it.
"""
from __future__ import annotations

import mmap
import os
import sys
import tempfile


def write_image_file(path: str, data) -> None:
    """Write ``data`` (bytes-like) to ``path`` atomically, mode 0600; ``-`` is stdout."""
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=directory)  # mkstemp creates mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class AtomicImageFile:
    """A binary sink for streaming writers: commit() renames it into place, 0600."""

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        fd, self.tmp = tempfile.mkstemp(prefix=".ckpt-", dir=directory)
        self.file = os.fdopen(fd, "wb")

    def write(self, data) -> int:
        return self.file.write(data)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def read_image_file(path: str):
    """The bytes of an image file (an mmap for regular files: no copy); ``-`` is stdin."""
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

"""The project's exception types.

ModelError carries a Linux errno, as the modelled syscall would return it.
ImageError is the only exception the image decoder raises.
CheckpointError / RestartError are failures of the C/R operations.
"""
from __future__ import annotations

import errno as _errno
import os


class CkptsimError(Exception):
    """Base of every error the tools report as a one-line message."""


class ModelError(CkptsimError, OSError):
    """A modelled syscall failed; ``.errno`` is Linux's errno for the misuse."""

    def __init__(self, err: int, detail: str = ""):
        msg = os.strerror(err) + (f": {detail}" if detail else "")
        OSError.__init__(self, err, msg)
        self.detail = detail

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{name}: {self.strerror}"


def kerr(err: int, detail: str = "") -> ModelError:
    """Build the error a modelled syscall raises: ``raise kerr(errno.EBADF, 'fd 7')``."""
    return ModelError(err, detail)


class ImageError(CkptsimError):
    """A malformed image. Always names the byte offset and the record type."""

    def __init__(self, offset: int, rtype: str | int | None, message: str):
        self.offset = offset
        self.rtype = rtype
        self.message = message
        where = f"at offset {offset}"
        if rtype is not None:
            where += f" (record {rtype})"
        super().__init__(f"bad image {where}: {message}")

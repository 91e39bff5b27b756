"""The low-level access of the /proc readers (backend/proc.py and the modules split from it):
paths, reads that turn a vanished process into ProcessGone, and the kernel's octal escapes."""
from __future__ import annotations

import errno
import os
import re

from ckptsim.errors import CkptsimError

PROC = "/proc"


class ProcessGone(CkptsimError, ProcessLookupError):
    """The process (or thread) ``pid`` does not exist, or vanished while it was being read."""

    def __init__(self, pid: int, what: str = ""):
        self.pid = pid
        msg = f"process {pid} is gone" + (f" (while reading {what})" if what else "")
        ProcessLookupError.__init__(self, errno.ESRCH, msg)

    def __str__(self) -> str:
        return self.strerror


def _path(pid: int, name: str) -> str:
    return f"{PROC}/{int(pid)}/{name}"


def process_exists(pid: int) -> bool:
    """True while ``/proc/PID`` exists (a zombie still exists)."""
    return os.path.exists(f"{PROC}/{int(pid)}")


def _gone_or_raise(pid: int, what: str, exc: OSError) -> None:
    """Translate an OSError met while reading ``/proc/PID/what``: raise ProcessGone when the
    process has vanished, re-raise ``exc`` otherwise."""
    if exc.errno == errno.ESRCH or not process_exists(pid):
        raise ProcessGone(pid, what) from None
    raise exc


def _read_bytes(pid: int, name: str) -> bytes:
    path = _path(pid, name)
    try:
        with open(path, "rb", buffering=0) as f:
            chunks = []
            while True:
                b = f.read(1 << 16)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):
            _gone_or_raise(pid, name, e)
        raise


def _read_text(pid: int, name: str) -> str:
    return _read_bytes(pid, name).decode("utf-8", "surrogateescape")


def _readlink(pid: int, name: str) -> str | None:
    """readlink of /proc/PID/name; None when the link exists but has no target now (a zombie,
    a kernel thread); ProcessGone when the process vanished."""
    try:
        return os.readlink(_path(pid, name))
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):
            if e.errno == errno.ESRCH or not process_exists(pid):
                raise ProcessGone(pid, name) from None
            return None
        raise


def _listdir(pid: int, name: str) -> list[str]:
    try:
        return os.listdir(_path(pid, name))
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):
            _gone_or_raise(pid, name, e)
        raise


_OCTAL_ESC = re.compile(r"\\([0-7]{3})")


def _unescape_octal(s: str) -> str:
    """Undo the kernel's ``\\ooo`` escapes (seq_path escapes a newline in a path as ``\\012``)."""
    if "\\" not in s:
        return s
    return _OCTAL_ESC.sub(lambda m: chr(int(m.group(1), 8)), s)


_DELETED = " (deleted)"

"""Small files the live tools keep between runs (a checkpoint or restart is a fresh process
each time): JSON documents in a private directory, trusted only when the file and its
directory belong to the caller and nobody else may write them, since what they hold decides
what is checked (ELF identities) or skipped (the must-have probe).

    cache_dir() -> str | None        $CKPTSIM_CACHE_DIR ("" keeps nothing), else /run/ckptsim
                                     for root, else $XDG_RUNTIME_DIR/ckptsim or ~/.cache/ckptsim
    load(name) -> object | None      the document, or None (missing, foreign, too big, bad)
    save(name, obj) -> None          atomically, mode 0600, in a 0700 directory; never raises
"""
from __future__ import annotations

import json
import os
import stat
import tempfile

CACHE_ENV = "CKPTSIM_CACHE_DIR"
MAX_FILE = 4 << 20


def cache_dir() -> str | None:
    path = os.environ.get(CACHE_ENV)
    if path is not None:
        return path or None
    if os.geteuid() == 0:
        return "/run/ckptsim"
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ckptsim")


def _trusted(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def load(name: str):
    directory = cache_dir()
    if directory is None:
        return None
    try:
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or not _trusted(st) or st.st_size > MAX_FILE \
                    or not _trusted(os.stat(directory)):
                return None
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def save(name: str, obj) -> None:
    directory = cache_dir()
    if directory is None:
        return
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not _trusted(os.stat(directory)):
            return
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f)
            os.replace(tmp, os.path.join(directory, name))
        except BaseException:
            os.unlink(tmp)
            raise
    except (OSError, TypeError, ValueError):
        return

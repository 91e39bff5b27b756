"""The record of a tracking session's last checkpoint (part of backend/incremental.py, which
re-exports these names): which image the session was last armed at, and per process what the
next incremental checkpoint takes from it (the mm's objref, the present page runs, the VMAs
with their VmFlags, the signal actions). Kept next to the session's socket, mode 0600.

    record_path(root) -> str          /run/ckptsim/track-ROOT.last
    forget_stale()                    removes the records of sessions that have ended
    LastCheckpoint                    .save(root), .load(root), .forget(root)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from . import track


def record_path(root: int) -> str:
    return os.path.join(track.RUN_DIR, f"track-{int(root)}.last")


def forget_stale() -> None:
    """Remove the records of sessions that have ended (no socket any more): the daemon
    removes its socket, not this module's record."""
    try:
        names = os.listdir(track.RUN_DIR)
    except OSError:
        return
    for name in names:
        if name.startswith("track-") and name.endswith(".last") and \
                name.removesuffix(".last") + ".sock" not in names:
            try:
                os.unlink(os.path.join(track.RUN_DIR, name))
            except FileNotFoundError:
                pass


@dataclass
class LastCheckpoint:
    """The image a session was last armed at, and per tgid (mm objref in it, the process's
    start time, its present private page runs then, its VMAs then: the /proc maps fields
    and the VmFlags mnemonics, and its 64 signal actions (handler, flags, mask, restorer);
    either may be None)."""
    image_id: bytes
    crid: int
    checksum: int
    tree: bytes
    generation: int
    daemon: int
    mms: dict[int, tuple[int, int, list]] = field(default_factory=dict)

    def save(self, root: int) -> None:
        path = record_path(root)
        data = json.dumps({"image_id": self.image_id.hex(), "crid": self.crid,
                           "checksum": self.checksum, "tree": self.tree.hex(),
                           "generation": self.generation, "daemon": self.daemon,
                           "mms": {str(t): list(mm) for t, mm in self.mms.items()}})
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
        forget_stale()

    @classmethod
    def load(cls, root: int) -> "LastCheckpoint | None":
        try:
            with open(record_path(root)) as f:
                d = json.load(f)
            return cls(bytes.fromhex(d["image_id"]), d["crid"], d["checksum"],
                       bytes.fromhex(d["tree"]), d["generation"], d["daemon"],
                       {int(t): (mm[0], mm[1], [tuple(r) for r in mm[2]],
                                 mm[3] if len(mm) > 3 else None,
                                 mm[4] if len(mm) > 4 else None)
                        for t, mm in d["mms"].items()})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def forget(root: int) -> None:
        try:
            os.unlink(record_path(root))
        except FileNotFoundError:
            pass


def _vma_record(vmas) -> list:
    """The VMAs as LastCheckpoint keeps them (see Tracking.known_vm_flags)."""
    out = []
    for v in vmas:
        m = v.entry.mapping
        out.append([m.start, m.end, m.perms, m.offset, m.dev[0], m.dev[1], m.inode, m.path,
                    m.deleted, " ".join(sorted(v.entry.vm_flags))])
    return out

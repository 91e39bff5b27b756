"""``ckptsim replay``: restore an image into a fresh model, check invariants, round-trip.

The round trip checkpoints the restored tree again with the input's header identity (crid,
image id, creation time, flags, and the arch, kernel version, uname strings and HEADER_ARCH
of the system that wrote it); the bytes must be identical, for model and live images alike.

Live images (IMAGE_LIVE, written by ``backend/dump.py``) replay too:

- they hold no file-system snapshot: every path they name (files by FILE_NAME, mapped files,
  the executable, root and cwd) is created in the fresh model as a placeholder (directories;
  empty regular files, since a live image holds the contents of unlinked files only; FIFOs;
  the directories of a path a unix socket is bound to, the socket inode being made by the
  bind itself), so the objects restore on top; the summary counts them;
- their tasks carry x86-64 registers and XSAVE state (kinds/cpu_x86.py) instead of a model
  CPU: they are restored with no model program, so they never run in the model;
- their tree holds real pids and 0 for a process group or session outside the tree: the tree
  is restored in a new pid namespace, where the caller's groups read as 0 again;
- the round trip keeps the live header identity and writes no file-system snapshot.

Incremental images replay with their chain (``chain``: an ImageChain, a directory or a list of
images): the chain is restored, and the round trip checkpoints the restored tree again as an
incremental image against the same parent, each mm and segment relative to the same base
with the same pages written and ranges dropped as the input held: the bytes must be identical.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

from ..image import core
from ..image.codec import ImageReader
from ..model.kernel import Kernel
from ..image.schema import LAYOUTS, Record
from .api import HeaderIdentity, checkpoint, restart_job
from .invariants import check_invariants


@dataclass
class ReplayReport:
    tasks: int = 0
    zombies: int = 0
    vmas: int = 0
    pages: int = 0
    fds: int = 0
    live: bool = False
    not_runnable: int = 0                 # live tasks: no model program
    placeholders: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    roundtrip: str | None = None  # None: not asked; "identical" or a description of the difference

    @property
    def ok(self) -> bool:
        return not self.problems and self.roundtrip in (None, "identical")

    def summary(self) -> str:
        lines = [f"restored {self.tasks} tasks ({self.zombies} zombies), {self.vmas} VMAs, "
                 f"{self.pages} pages, {self.fds} fds"]
        if self.live:
            lines.append(f"live image: {self.not_runnable} tasks hold x86-64 state and no model "
                         "program: not runnable in the model")
            lines.append(f"live image: {len(self.placeholders)} paths created as placeholders "
                         "(no file-system snapshot in a live image)")
        if self.problems:
            lines.append(f"invariants: {len(self.problems)} violated")
            lines.extend(f"  {p}" for p in self.problems)
        else:
            lines.append("invariants: all hold")
        if self.roundtrip is not None:
            lines.append(f"roundtrip: {self.roundtrip}")
        return "\n".join(lines)


def replay(data, roundtrip: bool = False, seed: int = 0, chain=None) -> ReplayReport:
    """Restore ``data`` into a fresh Kernel (frozen), check it, optionally re-checkpoint it."""
    header = ImageReader(data).expect(core.HEADER)
    kernel = Kernel(seed)
    tasks, rctx = restart_job(kernel, kernel.init, 0, data, core.RESTART_FROZEN, restore_fs=True,
                              chain=chain)
    report = ReplayReport()
    report.tasks = len(tasks)
    report.zombies = sum(t.state == "zombie" for t in tasks)
    report.live = bool(getattr(rctx, "live", False))
    report.not_runnable = sum(t.state != "zombie" and t.program is None for t in tasks)
    report.placeholders = list(getattr(rctx, "placeholders", None) or [])
    mms = _unique(t.mm for t in tasks)
    report.vmas = sum(len(mm.vmas) for mm in mms)
    report.pages = sum(len(mm.pages) for mm in mms)
    report.fds = sum(len(list(ft.items())) for ft in _unique(t.files for t in tasks))
    report.problems = check_invariants(kernel)
    if roundtrip:
        root = tasks[0]
        buf = io.BytesIO()
        parent = _as_delta(rctx) if header["image_flags"] & core.IMAGE_INCREMENTAL else None
        checkpoint(kernel, kernel.init, root.pid.nr_in(kernel.init.ns), buf, header["uflags"],
                   image_id=header["image_id"], time=header["time"], crid=header["crid"],
                   identity=HeaderIdentity.of_image(data), parent=parent)
        report.roundtrip = _compare(bytes(data), buf.getvalue())
    return report


def _as_delta(rctx):
    """Make the restored objects' dirty tracking say what the incremental image held (changes
    against its parent); returns the parent's link."""
    parent = rctx.chain_links[-1]
    for obj, base, own, drops in rctx.deltas:
        key = (parent.image_id, base) if base else None
        if drops is None:
            obj.set_delta(key, own)          # a shared segment
        else:
            obj.set_delta(key, own, drops)
    return parent


def _unique(objs) -> list:
    seen, out = set(), []
    for obj in objs:
        if obj is not None and id(obj) not in seen:
            seen.add(id(obj))
            out.append(obj)
    return out


def _compare(a: bytes, b: bytes) -> str:
    if a == b:
        return "identical"
    n = min(len(a), len(b))
    first = next((i for i in range(0, n, 4096) if a[i:i + 4096] != b[i:i + 4096]), n)
    while first < n and a[first] == b[first]:
        first += 1
    where = _record_at(a, b, first)
    return (f"DIFFERENT: first difference at byte {first} ({len(a)} bytes in, {len(b)} out)"
            + (f": {where}" if where else ""))


def _record_at(a: bytes, b: bytes, offset: int) -> str:
    """Which record holds ``offset`` in both images, and which of its fields differ."""
    try:
        ra, rb = _record_covering(a, offset), _record_covering(b, offset)
    except Exception:   # noqa: BLE001 - a description only; the verdict stands without it
        return ""
    if ra is None or rb is None:
        return ""
    if ra.layout is not rb.layout:
        return f"record {ra.layout.name} in, {rb.layout.name} out"
    diffs = [f"{k}={ra[k]!r} in, {rb[k]!r} out" for k in ra.values if ra[k] != rb[k]]
    if not diffs and ra.var != rb.var:
        diffs.append(f"variable part {_short(ra.var)} in, {_short(rb.var)} out")
    return f"record {ra.layout.name} at {ra.offset}" + (f" ({'; '.join(diffs)})" if diffs else "")


def _record_covering(data: bytes, offset: int):
    """The record whose bytes hold ``offset``, decoded by its layout alone (framing only)."""
    pos = 0
    while pos + 8 <= len(data):
        rtype = int.from_bytes(data[pos:pos + 4], "little")
        rlen = int.from_bytes(data[pos + 4:pos + 8], "little")
        if rlen < 8:
            return None
        end = pos + rlen + (-rlen & 7)
        if offset < end:
            lay = LAYOUTS.get(rtype)
            if lay is None or rlen < 8 + lay.fixed_size:
                return None
            values = dict(zip((f.name for f in lay.fields),
                              lay.struct.unpack_from(data, pos + 8)))
            return Record(lay, values, bytes(data[pos + 8 + lay.fixed_size:pos + rlen]), pos)
        pos = end
    return None


def _short(var: bytes) -> str:
    text = repr(var)
    return text if len(text) <= 80 else text[:77] + "..."

"""``ckptsim replay``: restore an image into a fresh model, check invariants, round-trip.

The round trip checkpoints the restored tree again with the input's header identity (crid,
image id, creation time, flags); for an image the model wrote, the bytes must be identical.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

from ..image import core
from ..image.codec import ImageReader
from ..model.kernel import Kernel
from .api import checkpoint, restart_tasks
from .invariants import check_invariants


@dataclass
class ReplayReport:
    tasks: int = 0
    zombies: int = 0
    vmas: int = 0
    pages: int = 0
    fds: int = 0
    problems: list[str] = field(default_factory=list)
    roundtrip: str | None = None  # None: not asked; "identical" or a description of the difference

    @property
    def ok(self) -> bool:
        return not self.problems and self.roundtrip in (None, "identical")

    def summary(self) -> str:
        lines = [f"restored {self.tasks} tasks ({self.zombies} zombies), {self.vmas} VMAs, "
                 f"{self.pages} pages, {self.fds} fds"]
        if self.problems:
            lines.append(f"invariants: {len(self.problems)} violated")
            lines.extend(f"  {p}" for p in self.problems)
        else:
            lines.append("invariants: all hold")
        if self.roundtrip is not None:
            lines.append(f"roundtrip: {self.roundtrip}")
        return "\n".join(lines)


def replay(data, roundtrip: bool = False, seed: int = 0) -> ReplayReport:
    """Restore ``data`` into a fresh Kernel (frozen), check it, optionally re-checkpoint it."""
    header = ImageReader(data).expect(core.HEADER)
    kernel = Kernel(seed)
    tasks = restart_tasks(kernel, kernel.init, 0, data, core.RESTART_FROZEN, restore_fs=True)
    report = ReplayReport()
    report.tasks = len(tasks)
    report.zombies = sum(t.state == "zombie" for t in tasks)
    mms = _unique(t.mm for t in tasks)
    report.vmas = sum(len(mm.vmas) for mm in mms)
    report.pages = sum(len(mm.pages) for mm in mms)
    report.fds = sum(len(list(ft.items())) for ft in _unique(t.files for t in tasks))
    report.problems = check_invariants(kernel)
    if roundtrip:
        root = tasks[0]
        buf = io.BytesIO()
        checkpoint(kernel, kernel.init, root.pid.nr_in(kernel.init.ns), buf, header["uflags"],
                   image_id=header["image_id"], time=header["time"], crid=header["crid"])
        report.roundtrip = _compare(bytes(data), buf.getvalue())
    return report


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
    return f"DIFFERENT: first difference at byte {first} ({len(a)} bytes in, {len(b)} out)"


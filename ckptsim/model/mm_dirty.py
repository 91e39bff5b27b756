"""What changed in an address space since its last checkpoint (incremental images).

The model sees every write, so its dirty tracking is exact:

- ``MM._dirty``: private page indexes written (``mm.write``, mremap's moved pages) since the
  last successful checkpoint or restore of this mm;
- ``MM._dropped``: private page indexes whose page was discarded since then (munmap, mremap's
  source, brk shrink, MAP_FIXED replacement, madvise(MADV_DONTNEED)); a page dropped and
  written again is in both;
- ``MM.ckpt_base``: ``(image_id, objref)`` of this mm in the last image that saved it (or that
  it was restored from); None for an mm no image holds (exec'd since, or never saved). A fork
  copies all three: the child differs from the same base by what the parent had changed plus
  what the child changes.

``Shmem`` (mm_pages.py) keeps ``_dirty`` (page offsets written) and ``ckpt_base`` likewise; a
segment never drops pages.
"""
from __future__ import annotations

import errno
from ..errors import kerr
from ..image.types import PAGE_SHIFT, PAGE_SIZE
from .mm_pages import TASK_SIZE, chunked, keys_in, page_align

MADV_DONTNEED = 4


def coalesce(indexes) -> list[tuple[int, int]]:
    """Sorted page indexes -> [(start address, end address)] of their runs."""
    runs: list[tuple[int, int]] = []
    for i in indexes:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return [(lo << PAGE_SHIFT, hi << PAGE_SHIFT) for lo, hi in runs]


class DirtyTracking:
    """Mixin of MM: the changed-page sets and the checkpoint base (see the module doc)."""

    def _init_tracking(self) -> None:
        self._dirty: set[int] = set()
        self._dropped: set[int] = set()
        self.ckpt_base: tuple[bytes, int] | None = None

    def _copy_tracking(self, child) -> None:
        child._dirty, child._dropped = set(self._dirty), set(self._dropped)
        child.ckpt_base = self.ckpt_base

    def _note_dropped(self, indexes) -> None:
        self._dropped.update(indexes)
        self._dirty.difference_update(indexes)

    def dirty_pages(self) -> list[int]:
        """Page addresses written since the last checkpoint (or clear_dirty()), sorted."""
        return [index << PAGE_SHIFT for index in sorted(self._dirty)]

    def dropped_pages(self) -> list[int]:
        """Page addresses whose private page was discarded since then, sorted."""
        return [index << PAGE_SHIFT for index in sorted(self._dropped)]

    def clear_dirty(self) -> None:
        self._dirty, self._dropped = set(), set()

    def checkpointed(self, base: tuple[bytes, int] | None) -> None:
        """A checkpoint (or restore) saved this mm as ``base``: nothing has changed since."""
        self.clear_dirty()
        self.ckpt_base = base

    def set_delta(self, base, dirty_addrs, dropped_ranges) -> None:
        """Make the tracking say: ``dirty_addrs`` written and ``dropped_ranges`` discarded since
        ``base`` (what an incremental image held; replay's round trip re-creates it)."""
        self.ckpt_base = base
        self._dirty = {a >> PAGE_SHIFT for a in dirty_addrs}
        self._dropped = {i for lo, hi in dropped_ranges
                         for i in range(lo >> PAGE_SHIFT, hi >> PAGE_SHIFT)}

    # -- what an incremental image holds --------------------------------------------------
    def private_ranges(self) -> list[tuple[int, int]]:
        return [(v.start, v.end) for v in self.vmas if v.is_private]

    def dropped_ranges(self) -> list[tuple[int, int]]:
        """Drops an incremental image records: dropped, not written again, inside a private
        VMA (elsewhere the VMA list itself says the parent's pages are gone), as address runs."""
        out = []
        for start, end in self.private_ranges():
            lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
            out.extend(coalesce(i for i in keys_in(self._dropped, lo, hi) if i not in self._dirty))
        return out

    def dirty_chunks(self, vma, max_pages: int = 1024):
        """Yield (array('Q') addresses, blob) of the VMA's pages written since the base, in
        address order, zero pages included (the parent may hold other contents there)."""
        if not vma.is_private:
            return
        indexes = keys_in(self._dirty, vma.start >> PAGE_SHIFT, vma.end >> PAGE_SHIFT)
        yield from chunked([i << PAGE_SHIFT for i in indexes], [self.pages[i] for i in indexes],
                           max_pages)


class MadviseOps:
    """madvise(2) of the Kernel: MADV_DONTNEED only (private pages read back as zeros, or as
    the file's for a private file mapping; shared contents stay)."""

    def madvise(self, t, addr: int, length: int, advice: int) -> int:
        if addr % PAGE_SIZE or length < 0:
            raise kerr(errno.EINVAL, f"madvise {addr:#x}+{length:#x}: unaligned")
        if advice != MADV_DONTNEED:
            raise kerr(errno.EINVAL, f"madvise advice {advice} is not modelled (MADV_DONTNEED only)")
        end = addr + page_align(length)
        if end > TASK_SIZE:
            raise kerr(errno.EINVAL, f"madvise {addr:#x}+{length:#x} beyond TASK_SIZE")
        mm = t.mm
        if mm.covered(addr, end) is None:
            raise kerr(errno.ENOMEM, f"madvise {addr:#x}+{length:#x} covers unmapped memory")
        for vma in mm.overlapping(addr, end):
            if vma.is_private:
                mm._drop_pages(max(addr, vma.start), min(end, vma.end))
        return 0


__all__ = ["DirtyTracking", "MadviseOps", "MADV_DONTNEED", "coalesce"]

"""Pages of an image chain as runs: what an incremental restart resolves through the chain.

A ``PageRuns`` holds pages by page index as sorted, non-overlapping runs ``(start, end,
view)``: ``view`` is ``(end - start) * 4096`` bytes, a slice of an image (no copy). Building
one from an image's page chunks, cutting it to a VMA's ranges, dropping ranges and laying a
child image's pages over its parent's cost a few steps per run, not per page: a 1 GiB parent
is one or a few runs, where a dict of pages had 262,144 entries to build and join.

It also answers as a read-only mapping of page index -> 4096-byte view (``in``, ``[]``,
iteration in index order, ``len``), for callers that look at single pages.
"""
from __future__ import annotations

import bisect
from array import array
from operator import sub

from ..image.types import PAGE_SIZE

PAGE_SHIFT = PAGE_SIZE.bit_length() - 1


def index_runs(addrs: array) -> list[tuple[int, int]]:
    """[start, end) page-index runs of consecutive pages in the page addresses ``addrs`` (in
    their order): one pass in C when they are all consecutive, a Python step per run else."""
    n = len(addrs)
    if not n:
        return []
    if n == 1 or array("q", map(sub, addrs[1:], addrs)).count(PAGE_SIZE) == n - 1:
        return [(addrs[0] >> PAGE_SHIFT, (addrs[-1] >> PAGE_SHIFT) + 1)]
    runs, a = [], addrs[0]
    for i in range(1, n):
        if addrs[i] != addrs[i - 1] + PAGE_SIZE:
            runs.append((a >> PAGE_SHIFT, (addrs[i - 1] >> PAGE_SHIFT) + 1))
            a = addrs[i]
    runs.append((a >> PAGE_SHIFT, (addrs[-1] >> PAGE_SHIFT) + 1))
    return runs


class PageRuns:
    __slots__ = ("runs", "_starts")

    def __init__(self, runs=()):
        self.runs: list[tuple[int, int, memoryview]] = list(runs)
        self._starts: list[int] | None = None

    # -- building ------------------------------------------------------------------------
    def add_chunk(self, addrs: array, blob) -> None:
        """Add a page chunk (page addresses, their contents). Chunks come in address order in
        an image; one that does not is laid over what is there (its pages win)."""
        view = memoryview(blob).cast("B")
        new, pos = [], 0
        for start, end in index_runs(addrs):
            n = end - start
            new.append((start, end, view[pos << PAGE_SHIFT:(pos + n) << PAGE_SHIFT]))
            pos += n
        if not new:
            return
        if (not self.runs or new[0][0] >= self.runs[-1][1]) and \
                all(a[1] <= b[0] for a, b in zip(new, new[1:])):
            self.runs.extend(new)
            self._starts = None
        else:
            self.runs = self.overlay(PageRuns(sorted(new, key=lambda r: r[0]))).runs
            self._starts = None

    # -- set operations (each a few steps per run) --------------------------------------
    def restrict(self, ranges, drops=()) -> "PageRuns":
        """The pages inside the address ``ranges`` ([start, end) pairs) and outside ``drops``:
        what a child image inherits of its parent's mm (its private VMAs, minus what it
        dropped)."""
        keep = _merge([(s >> PAGE_SHIFT, e >> PAGE_SHIFT) for s, e in ranges])
        cut = _merge([(s >> PAGE_SHIFT, e >> PAGE_SHIFT) for s, e in drops])
        return PageRuns(_subtract(_intersect(self.runs, keep), cut))

    def overlay(self, top: "PageRuns") -> "PageRuns":
        """These pages with ``top``'s laid over them (top's win where both have one)."""
        if not top.runs:
            return PageRuns(self.runs)
        under = _subtract(self.runs, [(s, e) for s, e, _ in top.runs])
        return PageRuns(sorted(under + top.runs, key=lambda r: r[0]))

    # -- reading -------------------------------------------------------------------------
    def chunks_in(self, lo: int, hi: int) -> list[tuple[array, memoryview]]:
        """(page addresses, contents) per run inside page indexes [lo, hi): views, no copy."""
        out = []
        for start, end, view in _intersect(self.runs, [(lo, hi)]):
            out.append((array("Q", range(start << PAGE_SHIFT, end << PAGE_SHIFT, PAGE_SIZE)),
                        view))
        return out

    def pages_in(self, lo: int, hi: int) -> tuple[array, bytes]:
        """chunks_in joined: (addresses, one blob) of the pages in [lo, hi)."""
        chunks = self.chunks_in(lo, hi)
        addrs = array("Q")
        for a, _ in chunks:
            addrs.extend(a)
        return addrs, b"".join(v for _, v in chunks)

    # -- the mapping interface -------------------------------------------------------------
    def _find(self, index: int) -> int:
        if self._starts is None:
            self._starts = [r[0] for r in self.runs]
        i = bisect.bisect_right(self._starts, index) - 1
        return i if i >= 0 and index < self.runs[i][1] else -1

    def __contains__(self, index) -> bool:
        return isinstance(index, int) and self._find(index) >= 0

    def __getitem__(self, index: int) -> memoryview:
        i = self._find(index)
        if i < 0:
            raise KeyError(index)
        start, _, view = self.runs[i]
        off = (index - start) << PAGE_SHIFT
        return view[off:off + PAGE_SIZE]

    def __iter__(self):
        for start, end, _ in self.runs:
            yield from range(start, end)

    def keys(self):
        return iter(self)

    def values(self):
        return (self[i] for i in self)

    def items(self):
        return ((i, self[i]) for i in self)

    def __len__(self) -> int:
        return sum(end - start for start, end, _ in self.runs)

    def __bool__(self) -> bool:
        return bool(self.runs)

    def __eq__(self, other) -> bool:
        if isinstance(other, PageRuns):
            other = dict(other.items())
        return isinstance(other, dict) and dict(self.items()) == other

    __hash__ = None


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(spans):
        if s >= e:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _clip(run, s: int, e: int):
    start, end, view = run
    a, b = max(start, s), min(end, e)
    return (a, b, view[(a - start) << PAGE_SHIFT:(b - start) << PAGE_SHIFT])


def _intersect(runs, spans):
    """The parts of ``runs`` inside the sorted, disjoint ``spans``."""
    out, j = [], 0
    for run in runs:
        start, end, _ = run
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        k = j
        while k < len(spans) and spans[k][0] < end:
            out.append(_clip(run, spans[k][0], spans[k][1]))
            k += 1
    return out


def _subtract(runs, spans):
    """The parts of ``runs`` outside ``spans`` (merged first)."""
    spans = _merge(list(spans))
    out, j = [], 0
    for run in runs:
        start, end, _ = run
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        pos, k = start, j
        while k < len(spans) and spans[k][0] < end:
            if spans[k][0] > pos:
                out.append(_clip(run, pos, spans[k][0]))
            pos = max(pos, spans[k][1])
            k += 1
        if pos < end:
            out.append(_clip(run, pos, end))
    return out

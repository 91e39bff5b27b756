"""ckptsim/cr/page_runs.py: PageRuns against a dict of pages (the meaning it must keep)."""
from __future__ import annotations

from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from ckptsim.cr.page_runs import PageRuns, index_runs
from ckptsim.image.types import PAGE_SIZE

PAGE = PAGE_SIZE
indexes = st.lists(st.integers(0, 40), unique=True, max_size=30)
spans = st.lists(st.tuples(st.integers(0, 45), st.integers(0, 45)).map(sorted), max_size=4)


def page(tag: int, i: int) -> bytes:
    return bytes([tag, i % 256]) * (PAGE // 2)


def build(idx: list[int], tag: int, chunk: int = 3) -> tuple[PageRuns, dict]:
    """Chunks of ``chunk`` pages in address order, as an image has them."""
    runs, ref = PageRuns(), {}
    idx = sorted(idx)
    for k in range(0, len(idx), chunk):
        part = idx[k:k + chunk]
        runs.add_chunk(array("Q", [i * PAGE for i in part]), b"".join(page(tag, i) for i in part))
        ref.update({i: page(tag, i) for i in part})
    return runs, ref


def as_dict(runs: PageRuns) -> dict:
    return {i: bytes(v) for i, v in runs.items()}


@settings(max_examples=200, deadline=None)
@given(indexes, indexes, spans, spans)
def test_restrict_and_overlay_mean_what_the_dicts_did(base_idx, top_idx, ranges, drops):
    base, base_ref = build(base_idx, 1)
    top, top_ref = build(top_idx, 2, chunk=2)
    assert as_dict(base) == base_ref and len(base) == len(base_ref)
    ranges = [(a * PAGE, b * PAGE) for a, b in ranges]
    drops = [(a * PAGE, b * PAGE) for a, b in drops]
    kept = {i: v for i, v in base_ref.items()
            if any(a <= i * PAGE < b for a, b in ranges)
            and not any(a <= i * PAGE < b for a, b in drops)}
    got = base.restrict(ranges, drops)
    assert as_dict(got) == kept
    assert as_dict(got.overlay(top)) == {**kept, **top_ref}
    for lo, hi in ((0, 50), (5, 17), (30, 31)):
        addrs, blob = got.overlay(top).pages_in(lo, hi)
        want = sorted(i for i in {**kept, **top_ref} if lo <= i < hi)
        assert list(addrs) == [i * PAGE for i in want]
        assert blob == b"".join({**kept, **top_ref}[i] for i in want)
    for i in range(45):
        assert (i in got) == (i in kept)


def test_a_chunk_out_of_order_is_laid_over_and_runs_are_found_in_c_when_consecutive():
    runs, _ = build([10, 11, 12], 1)
    runs.add_chunk(array("Q", [11 * PAGE, 2 * PAGE]), page(3, 11) + page(3, 2))
    assert as_dict(runs) == {2: page(3, 2), 10: page(1, 10), 11: page(3, 11), 12: page(1, 12)}
    assert index_runs(array("Q", [PAGE * i for i in range(5, 1005)])) == [(5, 1005)]
    assert index_runs(array("Q", [0, PAGE, 5 * PAGE, 7 * PAGE, 8 * PAGE])) == [(0, 2), (5, 6), (7, 9)]
    assert [(s, e) for s, e, _ in runs.runs] == [(2, 3), (10, 11), (11, 12), (12, 13)]
    assert runs.chunks_in(0, 100)[1][0].tolist() == [10 * PAGE]

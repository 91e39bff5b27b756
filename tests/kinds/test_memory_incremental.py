"""The model's exact dirty tracking (model/mm_dirty.py) that incremental images rely on."""
import errno

import pytest

from ckptsim.errors import ModelError
from ckptsim.model.kernel import Kernel
from ckptsim.model.mm_dirty import MADV_DONTNEED, coalesce

P, A, S = 4096, 0x10000000, 0x20000000
RW, ANON, SHARED, FIXED = 3, 0x22, 0x21, 0x10


@pytest.fixture
def kt():
    k = Kernel()
    t = k.clone(k.init)
    k.mmap(t, A, 8 * P, RW, ANON | FIXED)
    k.mmap(t, S, 2 * P, RW, SHARED | FIXED)
    return k, t


def test_writes_mark_every_page_they_touch_dirty(kt):
    k, t = kt
    k.mem_write(t, A + P - 2, b"abcd")                         # across pages 0 and 1
    r, w = k.pipe(t)
    k.write(t, w, b"from a pipe")
    k.mem_write(t, A + 5 * P, k.read(t, r, 11))
    assert t.mm.dirty_pages() == [A, A + P, A + 5 * P]
    k.mem_write(t, S + P + 1, b"seg")
    seg = t.mm.find_vma(S).shmem
    assert seg.dirty_offsets() == [P]


def test_dontneed_drops_private_pages_only(kt):
    k, t = kt
    k.mem_write(t, A, b"x" * (3 * P))
    k.mem_write(t, S, b"shared")
    t.mm.clear_dirty()
    assert k.madvise(t, A + P, 2 * P, MADV_DONTNEED) == 0
    assert k.madvise(t, S, P, MADV_DONTNEED) == 0
    assert k.mem_read(t, A + P, 4) == bytes(4) and k.mem_read(t, A, 1) == b"x"
    assert k.mem_read(t, S, 6) == b"shared"
    assert t.mm.dropped_pages() == [A + P, A + 2 * P] and t.mm.dirty_pages() == []
    assert t.mm.dropped_ranges() == [(A + P, A + 3 * P)]
    k.mem_write(t, A + 2 * P, b"y")                             # written again: no drop
    assert t.mm.dropped_ranges() == [(A + P, A + 2 * P)]


def test_dontneed_errors(kt):
    k, t = kt
    for args, err in (((A + 1, P, MADV_DONTNEED), errno.EINVAL), ((A, P, 9), errno.EINVAL),
                      ((A + 7 * P, 4 * P, MADV_DONTNEED), errno.ENOMEM)):
        with pytest.raises(ModelError) as e:
            k.madvise(t, *args)
        assert e.value.errno == err


def test_munmap_mremap_and_dropped_ranges_outside_vmas(kt):
    k, t = kt
    k.mem_write(t, A, b"z" * (8 * P))
    t.mm.clear_dirty()
    k.munmap(t, A + 6 * P, 2 * P)                               # no VMA there any more
    k.mremap(t, A, P, P, 3, A + 0x100 * P)                      # page 0 moves
    assert t.mm.dirty_pages() == [A + 0x100 * P]
    assert t.mm.dropped_pages() == [A, A + 6 * P, A + 7 * P]
    assert t.mm.dropped_ranges() == []                          # both now outside any VMA
    k.mmap(t, A, P, RW, ANON | FIXED)
    assert t.mm.dropped_ranges() == [(A, A + P)]


def test_fork_copies_the_tracking_and_exec_forgets_the_base(kt):
    k, t = kt
    k.mem_write(t, A, b"before")
    t.mm.checkpointed((b"i" * 16, 3))
    k.mem_write(t, A + P, b"parent")
    child = k.clone(t)
    assert child.mm.ckpt_base == (b"i" * 16, 3) and child.mm.dirty_pages() == [A + P]
    k.mem_write(child, A + 2 * P, b"child")
    assert t.mm.dirty_pages() == [A + P]
    k.mkdir(k.init, "/bin", 0o755)
    k.install_program("/bin/x", [[None, "ckpt_point"]])
    k.execve(child, "/bin/x")
    assert child.mm.ckpt_base is None and child.mm.dirty_pages() == []


def test_coalesce():
    assert coalesce([1, 2, 3, 7, 9, 10]) == [(P, 4 * P), (7 * P, 8 * P), (9 * P, 11 * P)]
    assert coalesce([]) == []

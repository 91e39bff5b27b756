"""Address-space model: VMAs, syscalls, COW, shared memory, dirty tracking, checkpoint helpers."""
import errno
import os
import types
from array import array

import pytest
from hypothesis import given, settings, strategies as st

from ckptsim.errors import ModelError
from ckptsim.model.mm import MM, MMOps, VMA
from ckptsim.model.mm_pages import (MAP_ANONYMOUS, MAP_FIXED, MAP_FIXED_NOREPLACE, MAP_PRIVATE,
                                    MAP_SHARED, MMAP_BASE, MREMAP_FIXED, MREMAP_MAYMOVE,
                                    PROT_EXEC, PROT_NONE, PROT_READ, PROT_WRITE, STACK_TOP,
                                    TEXT_START, Shmem)
from ckptsim.model.shared import Shared

P = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


class FakeInode:
    def __init__(self, data=b""):
        self.data = bytearray(data)

    @property
    def size(self):
        return len(self.data)

    def read_at(self, offset, n):
        return bytes(self.data[offset:offset + n])

    def write_at(self, offset, data):
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset:offset + len(data)] = data
        return len(data)


class FakeFile(Shared):
    def __init__(self, data=b"", flags=os.O_RDWR):
        super().__init__()
        self.inode = FakeInode(data)
        self.flags = flags
        self.released = False

    def release(self, kernel):
        self.released = True


class FakeFds:
    def __init__(self):
        self.fds = {}

    def get(self, fd):
        if fd not in self.fds:
            raise ModelError(errno.EBADF, f"fd {fd}")
        return self.fds[fd]


class K(MMOps):
    pass


def task():
    return types.SimpleNamespace(mm=MM.new(None), files=FakeFds())


def errno_of(fn, *args, **kw):
    with pytest.raises(ModelError) as info:
        fn(*args, **kw)
    return info.value.errno


def ranges(mm):
    return [(v.start, v.end, v.prot) for v in mm.vmas]


@pytest.fixture
def k():
    return K()


@pytest.fixture
def t():
    return task()


# ---- mmap -------------------------------------------------------------------------------
def test_mmap_anon_topdown_and_contents(k, t):
    a = k.mmap(t, 0, 3 * P, RW, ANON)
    assert a == MMAP_BASE - 3 * P
    b = k.mmap(t, 0, P, RW, ANON)
    assert b == a - P
    assert t.mm.map_count == 1  # adjacent, same attributes, contiguous pgoff: merged
    assert k.mem_read(t, a, 10) == bytes(10)
    k.mem_write(t, a + P - 2, b"abcd")
    assert k.mem_read(t, a + P - 2, 4) == b"abcd"


def test_mmap_hint_used_when_free(k, t):
    a = k.mmap(t, 0x20000000, 2 * P, RW, ANON)
    assert a == 0x20000000
    b = k.mmap(t, 0x20000000, P, RW, ANON)
    assert b != a


def test_mmap_fixed_replaces(k, t):
    a = k.mmap(t, 0x20000000, 4 * P, RW, ANON)
    k.mem_write(t, a, b"x" * 4 * P)
    k.mmap(t, a + P, P, PROT_READ, ANON | MAP_FIXED)
    assert ranges(t.mm) == [(a, a + P, RW), (a + P, a + 2 * P, PROT_READ), (a + 2 * P, a + 4 * P, RW)]
    assert k.mem_read(t, a + P, 2) == b"\0\0"
    assert k.mem_read(t, a + 2 * P, 1) == b"x"


def test_mmap_errors(k, t):
    assert errno_of(k.mmap, t, 0, 0, RW, ANON) == errno.EINVAL
    assert errno_of(k.mmap, t, 0, P, RW, MAP_ANONYMOUS) == errno.EINVAL
    assert errno_of(k.mmap, t, 0, P, RW, ANON, -1, 100) == errno.EINVAL
    assert errno_of(k.mmap, t, 0x20000001, P, RW, ANON | MAP_FIXED) == errno.EINVAL
    assert errno_of(k.mmap, t, 0, P, 8, ANON) == errno.EINVAL
    assert errno_of(k.mmap, t, 0, P, RW, MAP_PRIVATE, 5) == errno.EBADF
    assert errno_of(k.mmap, t, 0x7FFFFFFFF000, 2 * P, RW, ANON | MAP_FIXED) == errno.ENOMEM
    assert errno_of(k.mmap, t, 0x1000, P, RW, ANON | MAP_FIXED) == errno.EPERM
    assert errno_of(k.mmap, t, 0, 1 << 48, RW, ANON) == errno.ENOMEM
    a = k.mmap(t, 0x20000000, P, RW, ANON)
    assert errno_of(k.mmap, t, a, P, RW, ANON | MAP_FIXED_NOREPLACE) == errno.EEXIST
    t.files.fds[3] = FakeFile(b"r" * P, os.O_WRONLY)
    t.files.fds[4] = FakeFile(b"r" * P, os.O_RDONLY)
    assert errno_of(k.mmap, t, 0, P, PROT_READ, MAP_PRIVATE, 3) == errno.EACCES
    assert errno_of(k.mmap, t, 0, P, RW, MAP_SHARED, 4) == errno.EACCES
    t.files.fds[5] = types.SimpleNamespace(inode=None, flags=os.O_RDWR)
    assert errno_of(k.mmap, t, 0, P, PROT_READ, MAP_PRIVATE, 5) == errno.ENODEV


def test_mmap_no_room(k, t):
    k.mmap(t, 0x10000, MMAP_BASE - 0x10000, PROT_NONE, ANON | MAP_FIXED)
    assert errno_of(k.mmap, t, 0, P, RW, ANON) == errno.ENOMEM


# ---- file mappings ------------------------------------------------------------------------
def test_private_file_mapping_cow(k, t):
    f = FakeFile(b"A" * P + b"B" * P)
    t.files.fds[3] = f
    a = k.mmap(t, 0, 2 * P, RW, MAP_PRIVATE, 3)
    assert f.refs == 2
    assert k.mem_read(t, a + P - 1, 2) == b"AB"
    k.mem_write(t, a + 1, b"zz")
    assert k.mem_read(t, a, 4) == b"Azz" + b"A"
    assert f.inode.data[:4] == b"AAAA"             # private: the file is untouched
    f.inode.data[P:P + 1] = b"C"                   # never-written pages follow the file
    assert k.mem_read(t, a + P, 1) == b"C"
    addrs, blob = t.mm.present_pages(t.mm.vmas[0])
    assert list(addrs) == [a] and bytes(blob[:4]) == b"AzzA"


def test_shared_file_mapping_writes_page_cache(k, t):
    f = FakeFile(b"A" * (P + 10))
    t.files.fds[3] = f
    a = k.mmap(t, 0, 2 * P, RW, MAP_SHARED, 3, 0)
    k.mem_write(t, a + 5, b"hello")
    assert f.inode.data[5:10] == b"hello"
    k.mem_write(t, a + P + 8, b"xyz")                # past EOF: clipped, file not extended
    assert f.inode.size == P + 10 and f.inode.data[P + 8:] == b"xy"
    assert k.mem_read(t, a + P + 8, 4) == b"xy\0\0"
    child = t.mm.fork_copy(k)
    assert f.refs == 3
    k.mem_write(t, a, b"Q")
    assert child.read(a, 1) == b"Q"
    assert list(t.mm.present_pages(t.mm.vmas[0])[0]) == []


def test_file_refs_follow_split_merge_and_release(k, t):
    f = FakeFile(b"x" * 4 * P)
    t.files.fds[3] = f
    a = k.mmap(t, 0, 4 * P, PROT_READ, MAP_PRIVATE, 3)
    assert f.refs == 2
    k.munmap(t, a + P, P)                            # split into two VMAs: two references
    assert t.mm.map_count == 2 and f.refs == 3
    assert [v.pgoff for v in t.mm.vmas] == [0, 2]
    k.mmap(t, a + P, P, PROT_READ, MAP_PRIVATE | MAP_FIXED, 3, P)   # contiguous pgoff: remerge
    assert t.mm.map_count == 1 and f.refs == 2
    t.mm.put(k)
    assert f.refs == 1


def test_mprotect_shared_readonly_file_eacces(k, t):
    t.files.fds[4] = FakeFile(b"r" * P, os.O_RDONLY)
    a = k.mmap(t, 0, P, PROT_READ, MAP_SHARED, 4)
    assert errno_of(k.mprotect, t, a, P, RW) == errno.EACCES
    k.mprotect(t, a, P, PROT_NONE)


# ---- munmap / mprotect split and merge -----------------------------------------------------
def test_munmap_middle_splits_and_drops_pages(k, t):
    a = k.mmap(t, 0, 3 * P, RW, ANON)
    k.mem_write(t, a, b"1" * 3 * P)
    k.munmap(t, a + P, P)
    assert ranges(t.mm) == [(a, a + P, RW), (a + 2 * P, a + 3 * P, RW)]
    assert errno_of(k.mem_read, t, a + P, 1) == errno.EFAULT
    assert (a + P) >> 12 not in t.mm.pages
    k.mmap(t, a + P, P, RW, ANON | MAP_FIXED)
    assert t.mm.map_count == 1
    assert k.mem_read(t, a + P - 1, 3) == b"1\0" + b"\0"


def test_munmap_errors_and_noop(k, t):
    assert errno_of(k.munmap, t, 0x20000001, P) == errno.EINVAL
    assert errno_of(k.munmap, t, 0x20000000, 0) == errno.EINVAL
    assert k.munmap(t, 0x20000000, P) == 0


def test_mprotect_split_merge_and_errors(k, t):
    a = k.mmap(t, 0, 4 * P, RW, ANON)
    k.mprotect(t, a + P, 2 * P, PROT_READ)
    assert ranges(t.mm) == [(a, a + P, RW), (a + P, a + 3 * P, PROT_READ), (a + 3 * P, a + 4 * P, RW)]
    assert errno_of(k.mem_write, t, a + P, b"x") == errno.EFAULT
    k.mprotect(t, a, 4 * P, RW)
    assert t.mm.map_count == 1
    assert errno_of(k.mprotect, t, a + 1, P, RW) == errno.EINVAL
    assert errno_of(k.mprotect, t, a, 8 * P, RW) == errno.ENOMEM
    assert errno_of(k.mprotect, t, a, P, 0x10) == errno.EINVAL
    k.mprotect(t, a, P, PROT_NONE)
    assert errno_of(k.mem_read, t, a, 1) == errno.EFAULT


# ---- mremap -------------------------------------------------------------------------------------
def test_mremap_shrink_grow_in_place_and_move(k, t):
    a = k.mmap(t, 0x20000000, 2 * P, RW, ANON)
    k.mem_write(t, a, b"m" * 2 * P)
    assert k.mremap(t, a, 2 * P, P, 0) == a
    assert ranges(t.mm) == [(a, a + P, RW)]
    assert k.mremap(t, a, P, 3 * P, 0) == a            # room after it: grows in place
    assert k.mem_read(t, a + P - 1, 2) == b"m\0"
    k.mmap(t, a + 3 * P, P, PROT_READ, ANON | MAP_FIXED)
    assert errno_of(k.mremap, t, a, 3 * P, 5 * P, 0) == errno.ENOMEM
    b = k.mremap(t, a, 3 * P, 5 * P, MREMAP_MAYMOVE)
    assert b != a and k.mem_read(t, b, P) == b"m" * P
    assert errno_of(k.mem_read, t, a, 1) == errno.EFAULT
    assert b >> 12 in t.mm.pages and a >> 12 not in t.mm.pages
    assert b in t.mm.dirty_pages()


def test_mremap_fixed_and_errors(k, t):
    a = k.mmap(t, 0x20000000, 2 * P, RW, ANON)
    k.mem_write(t, a, b"q" * 2 * P)
    dst = 0x30000000
    assert k.mremap(t, a, 2 * P, P, MREMAP_MAYMOVE | MREMAP_FIXED, dst) == dst
    assert k.mem_read(t, dst, 2) == b"qq" and t.mm.map_count == 1
    assert errno_of(k.mremap, t, dst, P, P, MREMAP_FIXED, 0x40000000) == errno.EINVAL
    assert errno_of(k.mremap, t, dst, P, P, MREMAP_MAYMOVE | MREMAP_FIXED, dst) == errno.EINVAL
    assert errno_of(k.mremap, t, dst + 1, P, P, 0) == errno.EINVAL
    assert errno_of(k.mremap, t, 0x50000000, P, 2 * P, 0) == errno.EFAULT
    assert errno_of(k.mremap, t, dst, 2 * P, 3 * P, MREMAP_MAYMOVE) == errno.EFAULT
    assert errno_of(k.mremap, t, dst, P, 2 * P, 8) == errno.EINVAL


def test_mremap_file_keeps_pgoff_and_refs(k, t):
    f = FakeFile(bytes(range(256)) * 64)
    t.files.fds[3] = f
    a = k.mmap(t, 0x20000000, 4 * P, PROT_READ, MAP_PRIVATE, 3)
    b = k.mremap(t, a + 2 * P, 2 * P, 2 * P, MREMAP_MAYMOVE | MREMAP_FIXED, 0x30000000)
    assert b == 0x30000000 and t.mm.find_vma(b).pgoff == 2
    assert k.mem_read(t, b, 4) == f.inode.data[2 * P:2 * P + 4]
    assert f.refs == 3


# ---- brk ------------------------------------------------------------------------------------
def test_brk_grow_shrink(k, t):
    t.mm.exec_reset(k, None)
    start = t.mm.start_brk
    assert k.brk(t, 0) == start
    assert t.mm.find_vma(start) is None                # no heap VMA until it grows
    assert k.brk(t, start + 100) == start + 100
    heap = t.mm.find_vma(start)
    assert heap.name == "[heap]" and heap.end == start + P
    k.mem_write(t, start, b"h" * 100)
    assert k.brk(t, start + 3 * P) == start + 3 * P
    assert t.mm.find_vma(start).end == start + 3 * P and k.mem_read(t, start, 1) == b"h"
    assert k.brk(t, start + 10) == start + 10
    assert t.mm.find_vma(start).end == start + P
    k.mmap(t, start + 2 * P, P, RW, ANON | MAP_FIXED)
    assert k.brk(t, start + 4 * P) == start + 10       # collision: unchanged
    assert k.brk(t, start) == start and t.mm.find_vma(start) is None


# ---- exec / fork ------------------------------------------------------------------------------
def test_exec_reset_layout_and_refs(k, t):
    exe = FakeFile(b"\x7fELF" + bytes(5000))
    old = FakeFile(b"o" * P)
    t.files.fds[3] = old
    k.mmap(t, 0, P, PROT_READ, MAP_PRIVATE, 3)
    t.mm.exec_reset(k, exe)
    assert old.refs == 1 and exe.refs == 3
    names = [(v.name, v.file is exe) for v in t.mm.vmas]
    assert names == [(None, True), ("[stack]", False), ("[vdso]", False)]
    text, stack, vdso = t.mm.vmas
    assert (text.start, text.end, text.prot) == (TEXT_START, TEXT_START + 2 * P, PROT_READ | PROT_EXEC)
    assert stack.end == STACK_TOP and stack.vm_flags & 0x100
    assert t.mm.exe_file is exe and t.mm.start_code == TEXT_START
    assert k.mem_read(t, TEXT_START, 4) == b"\x7fELF"
    assert errno_of(k.mem_write, t, TEXT_START, b"x") == errno.EFAULT
    assert list(t.mm.present_pages(vdso)[0]) == []
    t.mm.put(k)
    assert exe.refs == 1


def test_fork_cow_both_directions(k, t):
    a = k.mmap(t, 0, 2 * P, RW, ANON)
    k.mem_write(t, a, b"parent" * 1000)
    child = types.SimpleNamespace(mm=t.mm.fork_copy(k), files=t.files)
    assert k.mem_read(child, a, 6) == b"parent"
    k.mem_write(t, a, b"P2")
    k.mem_write(child, a + P, b"C2")
    assert k.mem_read(t, a, 8) == b"P2rent" + b"pa"
    assert k.mem_read(child, a, 8) == b"parentpa"
    assert k.mem_read(t, a + P, 2) != b"C2" and k.mem_read(child, a + P, 2) == b"C2"


def test_shared_anon_seen_after_fork(k, t):
    a = k.mmap(t, 0, 2 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    seg = t.mm.vmas[0].shmem
    assert isinstance(seg, Shmem) and seg.refs == 1
    child = types.SimpleNamespace(mm=t.mm.fork_copy(k), files=t.files)
    assert seg.refs == 2 and child.mm.vmas[0].shmem is seg
    k.mem_write(t, a + 10, b"from parent")
    k.mem_write(child, a + P, b"from child")
    assert k.mem_read(child, a + 10, 11) == b"from parent"
    assert k.mem_read(t, a + P, 10) == b"from child"
    k.munmap(t, a, P)                                     # split keeps both halves on the segment
    assert seg.refs == 2 and k.mem_read(t, a + P, 4) == b"from"
    child.mm.put(k)
    t.mm.put(k)
    assert seg.refs == 0 and seg.pages == {}


def test_vmas_merge_only_when_compatible(k, t):
    a = k.mmap(t, 0x20000000, P, RW, ANON)
    k.mmap(t, a + P, P, PROT_READ, ANON | MAP_FIXED)
    k.mmap(t, a + 2 * P, P, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED)
    k.mmap(t, a + 3 * P, P, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED)  # other segment
    assert t.mm.map_count == 4
    k.mprotect(t, a + P, P, RW)
    assert t.mm.map_count == 3


# ---- dirty set and checkpoint helpers --------------------------------------------------------------
def test_dirty_set(k, t):
    a = k.mmap(t, 0, 4 * P, RW, ANON)
    k.mem_write(t, a + P - 1, b"xy")
    assert t.mm.dirty_pages() == [a, a + P]
    t.mm.clear_dirty()
    assert t.mm.dirty_pages() == []
    k.mem_write(t, a + 3 * P, b"z")
    assert t.mm.dirty_pages() == [a + 3 * P]
    k.munmap(t, a + 3 * P, P)
    assert t.mm.dirty_pages() == []


def test_present_pages_skip_zero_and_unwritten(k, t):
    a = k.mmap(t, 0, 4 * P, RW, ANON)
    k.mem_write(t, a, b"a")
    k.mem_write(t, a + 2 * P, bytes(P))                  # written, but all zeros
    k.mem_write(t, a + 3 * P, b"d" * P)
    addrs, blob = t.mm.present_pages(t.mm.vmas[0])
    assert addrs == array("Q", [a, a + 3 * P])
    assert len(blob) == 2 * P and blob[:1] == b"a" and blob[P:] == b"d" * P
    chunks = list(t.mm.present_chunks(t.mm.vmas[0], max_pages=1))
    assert [list(c[0]) for c in chunks] == [[a], [a + 3 * P]]


def test_restore_vma_and_install_pages():
    mm = MM.new(None)
    f = FakeFile(b"f" * P)
    mm.restore_vma(0x20000000, 0x20002000, RW, ANON, 0x20000)
    mm.restore_vma(0x20002000, 0x20003000, RW, ANON, 0x20002)   # no merge on restore
    mm.restore_vma(0x30000000, 0x30001000, PROT_READ, MAP_PRIVATE, 0, file=f)
    assert mm.map_count == 3 and f.refs == 2
    mm.install_pages(array("Q", [0x20000000, 0x20002000]), memoryview(b"1" * P + b"2" * P))
    assert mm.read(0x20000000, 1) == b"1" and mm.read(0x20002000, 1) == b"2"
    assert mm.read(0x30000000, 2) == b"ff"
    with pytest.raises(ModelError):
        mm.install_pages(array("Q", [0x40000000]), b"x" * P)
    with pytest.raises(ModelError):
        mm.restore_vma(0x20001000, 0x20005000, RW, ANON)
    with pytest.raises(ValueError):
        mm.install_pages(array("Q", [0x20000000]), b"x")


def test_vma_vm_flags():
    v = VMA(0, P, RW, MAP_SHARED | MAP_ANONYMOUS, maxprot=RW)
    assert v.vm_flags == 0x1 | 0x2 | 0x10 | 0x20 | 0x8 | 0x80


# ---- properties --------------------------------------------------------------------------------
BASE = 0x20000000
NPAGES = 24

op = st.one_of(
    st.tuples(st.just("mmap"), st.integers(0, NPAGES - 1), st.integers(1, 6), st.sampled_from([0, 1, 3, 5])),
    st.tuples(st.just("munmap"), st.integers(0, NPAGES - 1), st.integers(1, 6), st.just(0)),
    st.tuples(st.just("mprotect"), st.integers(0, NPAGES - 1), st.integers(1, 6), st.sampled_from([0, 1, 3])),
    st.tuples(st.just("write"), st.integers(0, NPAGES * P - 1), st.integers(1, 3 * P), st.integers(0, 255)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=40))
def test_random_sequences_keep_invariants(ops):
    k, t = K(), task()
    ref_prot = {}                      # page index -> prot, for mapped pages
    ref_data = {}                      # page index -> bytearray
    for name, a, b, c in ops:
        if name == "mmap":
            n = min(b, NPAGES - a)
            k.mmap(t, BASE + a * P, n * P, c, ANON | MAP_FIXED)
            for i in range(a, a + n):
                ref_prot[i] = c
                ref_data[i] = bytearray(P)
        elif name == "munmap":
            k.munmap(t, BASE + a * P, b * P)
            for i in range(a, a + b):
                ref_prot.pop(i, None)
                ref_data.pop(i, None)
        elif name == "mprotect":
            pages = range(a, a + b)
            if all(i in ref_prot for i in pages):
                k.mprotect(t, BASE + a * P, b * P, c)
                for i in pages:
                    ref_prot[i] = c
            else:
                assert errno_of(k.mprotect, t, BASE + a * P, b * P, c) == errno.ENOMEM
        else:
            pages = range(a // P, (a + b - 1) // P + 1)
            data = bytes([c]) * b
            if all(ref_prot.get(i, 0) & PROT_WRITE for i in pages):
                k.mem_write(t, BASE + a, data)
                flat = bytearray(b"".join(ref_data[i] for i in pages))
                start = a - pages[0] * P
                flat[start:start + b] = data
                for j, i in enumerate(pages):
                    ref_data[i] = flat[j * P:(j + 1) * P]
            else:
                assert errno_of(k.mem_write, t, BASE + a, data) == errno.EFAULT
    vmas = t.mm.vmas
    for v in vmas:
        assert v.start % P == 0 and v.end % P == 0 and v.start < v.end
    for left, right in zip(vmas, vmas[1:]):
        assert left.end <= right.start
        assert not left.can_merge(right)
    mapped = {i: v.prot for v in vmas for i in range((v.start - BASE) // P, (v.end - BASE) // P)}
    assert mapped == ref_prot
    for i, prot in sorted(ref_prot.items()):
        if prot & PROT_READ:
            assert k.mem_read(t, BASE + i * P, P) == bytes(ref_data[i])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["parent", "child"]), st.booleans(),
                          st.integers(0, 8 * P - 1), st.integers(1, 2 * P), st.integers(1, 255)),
                max_size=20))
def test_fork_cow_and_shared_against_reference(writes):
    """Private pages diverge after fork; shared-anon pages stay one copy for both."""
    k, t = K(), task()
    priv = k.mmap(t, 0x20000000, 8 * P, RW, ANON)
    shared = k.mmap(t, 0x30000000, 8 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    k.mem_write(t, priv, b"p" * 8 * P)
    c = types.SimpleNamespace(mm=t.mm.fork_copy(k), files=t.files)
    ref = {"parent": bytearray(b"p" * 8 * P), "child": bytearray(b"p" * 8 * P)}
    ref_shared = bytearray(8 * P)
    for who, to_shared, off, n, byte in writes:
        n = min(n, 8 * P - off)
        data = bytes([byte]) * n
        k.mem_write(t if who == "parent" else c, (shared if to_shared else priv) + off, data)
        (ref_shared if to_shared else ref[who])[off:off + n] = data
    assert k.mem_read(t, priv, 8 * P) == ref["parent"]
    assert k.mem_read(c, priv, 8 * P) == ref["child"]
    assert k.mem_read(t, shared, 8 * P) == ref_shared == k.mem_read(c, shared, 8 * P)

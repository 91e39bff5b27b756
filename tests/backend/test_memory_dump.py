"""backend/memory.py against a real process (tests/backend/targets/memdump.c): which pages are
saved, and that their contents come back exactly, through PAGEMAP_SCAN and through the
/proc/PID/pagemap fallback."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
from array import array

import pytest

from backend import memory
from backend.memory import PAGE_SIZE, MemoryDumpError, VmaKind, classify
from backend.proc import Mapping, SmapsEntry, read_smaps, read_status

WRITTEN = [0, 1, 2, 5, 10, 11, 12, 13, 40, 63]     # as in memdump.c
ZERO_READ, ZERO_WRITTEN, CHILD_COW = 20, 21, 5

def pattern(i: int, g: int) -> bytes:
    """memdump.c's pattern(i, g)."""
    base = (i * 31 + g * 17) % 251
    row = bytes((base + j) % 251 + 1 for j in range(251))
    return (row * (PAGE_SIZE // 251 + 1))[:PAGE_SIZE]


@pytest.fixture(scope="module")
def memdump_exe(c_target):
    return c_target("memdump")     # tests/backend/conftest.py: gcc, once per session


@pytest.fixture(scope="module")
def target(memdump_exe, tmp_path_factory):
    """The running target: {"pid", "child", "anon", "file", "prot", "shared"} (addresses).
    Ended by pid on every path: EOF on stdin, then SIGKILL if it lingers."""
    data = tmp_path_factory.mktemp("memdump-file") / "data"
    data.write_bytes(b"".join(pattern(i, 9) for i in range(8)))
    proc = subprocess.Popen([memdump_exe, str(data)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    info: dict = {"pid": proc.pid}
    try:
        line = proc.stdout.readline().decode()        # the readiness handshake
        assert line, f"target exited early with {proc.wait()}"
        for item in line.split():
            k, v = item.split("=")
            info[k] = int(v) if k == "child" else int(v, 16)
        yield info
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            for pid in (info.get("child"), proc.pid):
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            proc.wait()
        proc.stdout.close()


def vma_at(pid: int, addr: int) -> SmapsEntry:
    for v in read_smaps(pid):
        if v.start <= addr < v.end:
            return v
    raise AssertionError(f"no VMA at {addr:#x} in {pid}")


def pages(base: int, idx) -> array:
    return array("Q", (base + i * PAGE_SIZE for i in idx))


@pytest.fixture(params=["scan", "pagemap"])
def mem(request, target):
    """A ProcessMemory factory using PAGEMAP_SCAN or the pagemap fallback."""
    use_scan = request.param == "scan"
    if use_scan and not memory.pagemap_scan_available():
        pytest.skip("no PAGEMAP_SCAN on this kernel")
    opened = []

    def make(pid):
        pm = memory.ProcessMemory(pid, use_scan=use_scan)
        opened.append(pm)
        return pm
    yield make
    for pm in opened:
        pm.close()


def untouched(pid: int) -> None:
    st = read_status(pid)
    assert st.tracer_pid == 0, f"{pid} is traced"
    assert st.state not in ("T", "t"), f"{pid} is stopped"


# --- which pages --------------------------------------------------------------------------

def test_anon_pages_are_the_written_ones(target, mem):
    pid, base = target["pid"], target["anon"]
    vma = vma_at(pid, base)
    assert vma.start == base and vma.end == base + 64 * PAGE_SIZE
    assert classify(vma).kind == VmaKind.ANON_PRIVATE
    got = mem(pid).pages_to_dump(vma)
    # the read-only page maps the zero page: skipped; the page written with zeros is a real
    # anonymous page to the kernel: kept here, dropped by dump_vma_pages after reading
    assert list(got) == list(pages(base, sorted(WRITTEN + [ZERO_WRITTEN])))
    assert base + ZERO_READ * PAGE_SIZE not in got
    untouched(pid)
    untouched(target["child"])


def test_anon_contents_and_cow_child(target, mem):
    base = target["anon"]
    for pid, child in ((target["pid"], False), (target["child"], True)):
        pm = mem(pid)
        addrs = pm.pages_to_dump(vma_at(pid, base))
        data = pm.read_pages(addrs)
        assert len(data) == len(addrs) * PAGE_SIZE
        for k, a in enumerate(addrs):
            i = (a - base) // PAGE_SIZE
            want = bytes(PAGE_SIZE) if i == ZERO_WRITTEN else \
                pattern(i, 1 if (child and i == CHILD_COW) else 0)
            assert data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] == want, (pid, i)
        assert pm.stats.proc_mem_bytes == 0          # all through process_vm_readv
        assert pm.stats.vm_readv_calls == 1          # 11 pages, several runs, one call


def test_dump_vma_pages_streams_written_pages(target, mem):
    pid, base = target["pid"], target["anon"]
    chunks = []
    n = mem(pid).dump_vma_pages(vma_at(pid, base),
                                lambda addrs, data: chunks.append((array("Q", addrs), bytes(data))))
    assert n == len(WRITTEN)
    got = {a: d[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] for addrs, d in chunks
           for k, a in enumerate(addrs)}
    assert sorted(got) == list(pages(base, WRITTEN))  # the zero-content page is dropped
    for a, page in got.items():
        assert page == pattern((a - base) // PAGE_SIZE, 0)


def test_private_file_mapping_keeps_only_the_cowed_page(target, mem):
    pid, base = target["pid"], target["file"]
    vma = vma_at(pid, base)
    assert classify(vma).kind == VmaKind.FILE_PRIVATE
    assert vma.rss == 8 * PAGE_SIZE                   # all 8 pages present, 7 of them clean
    pm = mem(pid)
    addrs = pm.pages_to_dump(vma)
    assert list(addrs) == [base + 3 * PAGE_SIZE]
    assert bytes(pm.read_pages(addrs)) == pattern(3, 2)
    # no zero dropping for a file mapping: a missing page would read back as the file's
    with pytest.raises(ValueError):
        pm.dump_vma_pages(vma, lambda a, d: None, drop_zero=True)


def test_prot_none_pages_read_through_proc_mem(target, mem):
    pid, base = target["pid"], target["prot"]
    vma = vma_at(pid, base)
    assert vma.mapping.perms == "---p"
    pm = mem(pid)
    prot = pm.pages_to_dump(vma)
    assert list(prot) == list(pages(base, range(4)))
    # mixed batch: readable pages, the PROT_NONE run, readable pages again
    anon = pages(target["anon"], [0, 1])
    more = pages(target["anon"], [40])
    data = pm.read_pages(anon + prot + more)
    want = pattern(0, 0) + pattern(1, 0) + b"".join(pattern(i, 3) for i in range(4)) \
        + pattern(40, 0)
    assert data == want
    assert pm.stats.proc_mem_bytes == 4 * PAGE_SIZE
    untouched(pid)


def test_shared_anonymous_pages(target, mem):
    pid, base = target["pid"], target["shared"]
    vma = vma_at(pid, base)
    assert classify(vma).kind == VmaKind.ANON_SHARED
    pm = mem(pid)
    addrs = pm.pages_to_dump(vma)
    assert list(addrs) == list(pages(base, [0, 2]))
    assert pm.read_pages(addrs) == pattern(0, 4) + pattern(2, 4)


def test_pagemap_fallback_agrees_with_scan(target):
    if not memory.pagemap_scan_available():
        pytest.skip("no PAGEMAP_SCAN on this kernel")
    pid = target["pid"]
    with memory.ProcessMemory(pid, use_scan=True) as a, \
            memory.ProcessMemory(pid, use_scan=False) as b:
        for vma in read_smaps(pid):
            if classify(vma).kind in memory.dump_kinds():
                assert a.regions(vma) == b.regions(vma), memory.describe(vma)


def test_one_shot_wrappers(target):
    pid, base = target["pid"], target["anon"]
    vma = vma_at(pid, base)
    addrs = memory.pages_to_dump(pid, vma)
    assert len(addrs) == len(WRITTEN) + 1
    # any order, duplicates allowed: each page lands in its slot
    order = array("Q", [addrs[3], addrs[0], addrs[3]])
    data = memory.read_pages(pid, order)
    assert data == bytes(memory.read_pages(pid, addrs[3:4])) + \
        bytes(memory.read_pages(pid, addrs[0:1])) + bytes(memory.read_pages(pid, addrs[3:4]))
    # into a caller's buffer (a slice of a bigger one: the snapshot code does that)
    big = bytearray(b"\xee" * (len(addrs) + 2) * PAGE_SIZE)
    view = memoryview(big)[PAGE_SIZE:(len(addrs) + 1) * PAGE_SIZE]
    with memory.ProcessMemory(pid) as pm:
        assert pm.read_pages(addrs, out=view) is view
        with pytest.raises(ValueError, match="read-only"):
            pm.read_pages(addrs, out=bytes(len(addrs) * PAGE_SIZE))
        with pytest.raises(ValueError, match="output buffer"):
            pm.read_pages(addrs, out=bytearray(PAGE_SIZE))
    assert view == memory.read_pages(pid, addrs)
    assert big[:PAGE_SIZE] == big[-PAGE_SIZE:] == b"\xee" * PAGE_SIZE
    seen = []
    memory.dump_vma_pages(pid, vma, lambda a, d: seen.extend(a))
    assert seen == list(pages(base, WRITTEN))
    untouched(pid)


# --- errors -------------------------------------------------------------------------------

def test_bad_input_and_unreadable_pages(target):
    pid = target["pid"]
    with memory.ProcessMemory(pid) as pm:
        with pytest.raises(ValueError, match="not page aligned"):
            pm.read_pages([target["anon"] + 1])
        # an address where nothing is mapped: a clear error naming the pid and the page
        hole = 0x10000
        with pytest.raises(MemoryDumpError) as ei:
            pm.read_pages([hole])
        assert f"process {pid}" in str(ei.value) and f"{hole:#x}" in str(ei.value)
        assert ei.value.errno in (errno.EIO, errno.EFAULT)
    with pytest.raises(MemoryDumpError, match="does not exist"):
        memory.ProcessMemory(2 ** 22 + 12345)


def test_unsupported_mapping_is_refused_by_name(target):
    pid = target["pid"]
    real = vma_at(pid, target["anon"])
    io = SmapsEntry(mapping=real.mapping, vm_flags=frozenset({"rd", "wr", "io", "pf"}))
    with memory.ProcessMemory(pid) as pm, pytest.raises(MemoryDumpError) as ei:
        pm.pages_to_dump(io)
    msg = str(ei.value)
    assert f"process {pid}" in msg and f"{target['anon']:#x}" in msg and "VM_IO" in msg


# --- classification (no process needed) ---------------------------------------------------

def M(path="", perms="rw-p", inode=0, dev=(0, 0), deleted=False):
    return Mapping(start=0x1000, end=0x3000, perms=perms, offset=0, dev=dev, inode=inode,
                   path=path, deleted=deleted)


@pytest.mark.parametrize("mapping,flags,kind", [
    (M(), (), VmaKind.ANON_PRIVATE),
    (M("[anon:jit]"), (), VmaKind.ANON_PRIVATE),
    (M(perms="rw-s", path="/dev/zero", inode=5, dev=(0, 1), deleted=True), (), VmaKind.ANON_SHARED),
    (M("[anon_shmem:x]", perms="rw-s"), (), VmaKind.ANON_SHARED),
    (M("/SYSV0000abcd", perms="rw-s", inode=3, dev=(0, 1), deleted=True), (), VmaKind.SYSV_SHM),
    (M("/usr/lib/libc.so.6", "r-xp", 77, (8, 1)), (), VmaKind.FILE_PRIVATE),
    (M("/data/f", "rw-s", 78, (8, 1)), (), VmaKind.FILE_SHARED),
    (M("[stack]"), (), VmaKind.STACK),
    (M("[heap]"), (), VmaKind.HEAP),
    (M("[vdso]", "r-xp"), (), VmaKind.VDSO),
    (M("[vvar]", "r--p"), ("rd", "io", "pf"), VmaKind.VVAR),
    (M("[vvar_vclock]", "r--p"), ("rd", "io", "pf"), VmaKind.VVAR_VCLOCK),
    (M("[vsyscall]", "--xp"), (), VmaKind.VSYSCALL),
    (M("/dev/fb0", "rw-s", 9, (0, 5)), (), VmaKind.UNSUPPORTED),
    (M("/dev/mem", "rw-s", 9, (0, 5)), ("io", "pf"), VmaKind.UNSUPPORTED),
    (M("/anon_hugepage", "rw-p", 9, (0, 15), True), ("ht",), VmaKind.UNSUPPORTED),
    (M("[uprobes]", "r-xp"), (), VmaKind.UNSUPPORTED),
])
def test_classify(mapping, flags, kind):
    got = classify(SmapsEntry(mapping=mapping, vm_flags=frozenset(flags)) if flags else mapping)
    assert got.kind == kind
    assert bool(got.reason) == (kind == VmaKind.UNSUPPORTED)


def test_drop_zero_pages_keeps_exactly_the_pages_with_a_non_zero_byte():
    """The zero-page filter looks at each page's first word before scanning it: pages whose
    first word (or a word straddling two pages) is zero but which hold data are kept."""
    from array import array

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from backend.memory import PAGE_SIZE, drop_zero_pages
    kinds = st.sampled_from(["data", "zero", "zero-first-word", "zero-straddling", "last-byte"])

    @settings(max_examples=150, deadline=None)
    @given(st.lists(kinds, min_size=1, max_size=40))
    def check(layout):
        buf = bytearray()
        for kind in layout:
            page = bytearray(b"\x5a" * PAGE_SIZE)
            if kind == "zero":
                page = bytearray(PAGE_SIZE)
            elif kind == "zero-first-word":
                page[:8] = bytes(8)
            elif kind == "zero-straddling":
                page[4:12] = bytes(8)
            elif kind == "last-byte":
                page = bytearray(PAGE_SIZE - 1) + b"\x01"
            buf += page
        addrs = array("Q", [(i + 1) * PAGE_SIZE for i in range(len(layout))])
        expect = [a for a, kind in zip(addrs, layout) if kind != "zero"]
        pages = {a: bytes(buf[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i, a in enumerate(addrs)}
        keep, view = drop_zero_pages(addrs, buf, len(buf))
        assert list(keep) == expect
        assert bytes(view) == b"".join(pages[a] for a in expect)
    check()


GUARDED = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
m = mmap.mmap(-1, 8 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:] = b"\x01" * (8 * 4096)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
ok = libc.madvise(base + 2 * 4096, 2 * 4096, int(sys.argv[1])) == 0
print(base if ok else -ctypes.get_errno(), flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("use_scan", [True, False], ids=["pagemap-scan", "pagemap-fallback"])
def test_guard_pages_are_never_saved(use_scan):
    """MADV_GUARD_INSTALL markers (Linux 6.13): no page behind them (reading one fails);
    pagemap reports them as swapped, with PM_GUARD_REGION."""
    import sys
    from backend import kabi
    if use_scan and not memory.pagemap_scan_available():
        pytest.skip("this kernel lacks PAGEMAP_SCAN")
    p = subprocess.Popen([sys.executable, "-c", GUARDED, str(kabi.MADV_GUARD_INSTALL)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        base = int(p.stdout.readline())
        if base < 0:
            pytest.skip(f"MADV_GUARD_INSTALL: {os.strerror(-base)} (Linux >= 6.13)")
        with memory.ProcessMemory(p.pid, use_scan=use_scan) as pm:
            runs = pm.scan_range(base, base + 8 * PAGE_SIZE)
        assert runs == [(base, base + 2 * PAGE_SIZE), (base + 4 * PAGE_SIZE, base + 8 * PAGE_SIZE)]
    finally:
        p.kill()
        p.wait(timeout=10)
        p.stdout.close()
        p.stdin.close()

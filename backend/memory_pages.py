"""Bulk helpers of the memory dump (part of backend/memory.py): page addresses built without
a Python step per page, runs of adjacent pages, batches of at most CHUNK_PAGES pages, and the
pagemap fallback's translation tables and zero-page entry.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
import re
from array import array
from operator import sub

PAGE_SIZE = mmap.PAGESIZE
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
CHUNK_PAGES = 1024                      # pages per emit() and per process_vm_readv call

_RUNS = re.compile(b"\x01+")


def _index(entries: array, value: int, start: int) -> int:
    try:
        return entries.index(value, start)
    except ValueError:
        return -1


def _keep_table(shared: bool) -> bytes:
    """Top-byte translation: keep present (bit 63) or swapped (bit 62) pages; in a private
    mapping only those without bit 61 (a file page; shared anon pages have it too); never a
    guard marker (bit 58, which comes with bit 62)."""
    t = bytearray(256)
    for top in range(256):
        present_or_swapped = top & 0xC0
        file_page = top & 0x20
        guard = top & 0x04
        t[top] = 1 if present_or_swapped and not guard and (shared or not file_page) else 0
    return bytes(t)


_PRIVATE_KEEP = _keep_table(False)
_SHARED_KEEP = _keep_table(True)
_zero_entry: list = []


def _zero_page_entry() -> bytes | None:
    """The pagemap entry (8 bytes) of a read-only-touched private anonymous page: present
    bit + the zero page's PFN. None when PFNs are hidden (no CAP_SYS_ADMIN) or the kernel
    does not map the zero page."""
    if _zero_entry:
        return _zero_entry[0]
    value = None
    m = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        _ = m[0]                                    # read fault: maps the zero page
        buf = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(buf)
        del buf
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            entry = int.from_bytes(os.pread(fd, 8, (addr >> PAGE_SHIFT) * 8), "little")
        finally:
            os.close(fd)
        pfn = entry & ((1 << 55) - 1)
        if entry >> 63 and pfn:
            value = entry.to_bytes(8, "little")
    except OSError:
        value = None
    finally:
        m.close()
    _zero_entry.append(value)
    return value


@functools.lru_cache(maxsize=None)
def _address_ints(n: int) -> tuple[int, int]:
    """For n pages: (the n little-endian u64 offsets 0, 4096, ... as one big integer, the big
    integer whose n u64 fields are all 1)."""
    offsets = array("Q", range(0, n * PAGE_SIZE, PAGE_SIZE)).tobytes()
    ones = array("Q", [1]).tobytes() * n
    return int.from_bytes(offsets, "little"), int.from_bytes(ones, "little")


def _page_addresses(start: int, n: int) -> bytes:
    """The n page addresses start, start + 4096, ... as little-endian u64 bytes, built with
    one big-integer multiply-add (no field can carry into the next: each stays < 2**64)
    instead of n Python-level steps. n <= CHUNK_PAGES."""
    offsets, ones = _address_ints(n)
    return (offsets + start * ones).to_bytes(8 * n, "little")


def _runs_of(addrs: array) -> list[tuple[int, int]]:
    """Runs of adjacent pages in ``addrs`` (in its order), as [start, end) pairs."""
    n = len(addrs)
    if not n:
        return []
    if addrs[0] % PAGE_SIZE:
        raise ValueError(f"page address {addrs[0]:#x} is not page aligned")
    if n == 1:
        return [(addrs[0], addrs[0] + PAGE_SIZE)]
    first = addrs[0]
    if addrs[-1] - first == (n - 1) * PAGE_SIZE and \
            addrs == array(addrs.typecode, range(first, first + n * PAGE_SIZE, PAGE_SIZE)):
        return [(first, first + n * PAGE_SIZE)]       # one run: the common case, compared in C
    diffs = array("q", map(sub, addrs[1:], addrs))
    runs = []
    a = addrs[0]
    for i, d in enumerate(diffs):
        if d != PAGE_SIZE:
            nxt = addrs[i + 1]
            if nxt % PAGE_SIZE:
                raise ValueError(f"page address {nxt:#x} is not page aligned")
            runs.append((a, addrs[i] + PAGE_SIZE))
            a = nxt
    runs.append((a, addrs[-1] + PAGE_SIZE))
    return runs


def _batches(regions: list[tuple[int, int]]):
    """Cut regions into batches of at most CHUNK_PAGES pages (and so at most CHUNK_PAGES
    runs): yields (runs, npages)."""
    limit = CHUNK_PAGES * PAGE_SIZE
    runs: list[tuple[int, int]] = []
    size = 0
    for a, b in regions:
        while a < b:
            take = min(b - a, limit - size)
            runs.append((a, a + take))
            size += take
            a += take
            if size == limit:
                yield runs, size // PAGE_SIZE
                runs, size = [], 0
    if runs:
        yield runs, size // PAGE_SIZE

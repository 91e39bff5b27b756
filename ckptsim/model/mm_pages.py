"""Constants and page-storage helpers of the address-space model (used by ``mm.py``).

Private pages live in a dict ``page index -> bytes`` (immutable 4 KiB pages): fork copies the
dict, so copy-on-write needs no share counts and a write simply replaces the page object.
Shared anonymous segments keep mutable ``bytearray`` pages, written in place by every mapper.
"""
from __future__ import annotations

from array import array

from ..image.types import PAGE_SHIFT, PAGE_SIZE
from .shared import Shared

# Linux x86_64 values.
PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0, 0x1, 0x2, 0x4
PROT_ALL = PROT_READ | PROT_WRITE | PROT_EXEC
MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE, MAP_TYPE = 0x01, 0x02, 0x03, 0x0F
MAP_FIXED, MAP_ANONYMOUS, MAP_GROWSDOWN = 0x10, 0x20, 0x100
MAP_DENYWRITE, MAP_EXECUTABLE, MAP_LOCKED, MAP_NORESERVE = 0x800, 0x1000, 0x2000, 0x4000
MAP_POPULATE, MAP_NONBLOCK, MAP_STACK, MAP_FIXED_NOREPLACE = 0x8000, 0x10000, 0x20000, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2

# VM_* bits (mm.h) as written in the image's vm_flags; a VMA keeps prot/flags/maxprot and
# derives these (see VMA.vm_flags).
VM_READ, VM_WRITE, VM_EXEC, VM_SHARED = 0x1, 0x2, 0x4, 0x8
VM_MAYREAD, VM_MAYWRITE, VM_MAYEXEC, VM_MAYSHARE = 0x10, 0x20, 0x40, 0x80
VM_GROWSDOWN = 0x100

# Fixed, deterministic layout of a 47-bit address space (no randomization).
TASK_SIZE = 0x7FFFFFFFF000
MMAP_MIN_ADDR = 0x10000
VDSO_START, VDSO_PAGES = TASK_SIZE - 2 * PAGE_SIZE, 2
STACK_TOP = 0x7FFFFFFDE000
STACK_INIT_SIZE = 0x21000               # 132 KiB, what the kernel sets up at exec
STACK_GAP = 128 << 20                   # mmap_base keeps this far below the stack (min gap)
MMAP_BASE = STACK_TOP - STACK_GAP
TEXT_START = 0x400000
BRK_START = 0x1000000

ZERO_PAGE = bytes(PAGE_SIZE)

# The only MAP_* bits a VMA keeps (the rest are syscall-time requests).
VMA_MAP_BITS = MAP_SHARED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN


def page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def keys_in(keys, lo: int, hi: int) -> list[int]:
    """Sorted keys k of a dict/set with lo <= k < hi, cheap for both small and large ranges."""
    if hi - lo <= len(keys):
        return [k for k in range(lo, hi) if k in keys]
    return sorted(k for k in keys if lo <= k < hi)


def nonzero_pages(pages: dict, indexes: list[int]) -> list[int]:
    """The indexes whose page is not all zeros (a bytes compare per page runs in C)."""
    return [i for i in indexes if pages[i] != ZERO_PAGE]


def chunked(addrs: list[int], pages: list, max_pages: int):
    """Yield (array('Q') of addresses, one blob of their pages) in chunks of max_pages."""
    for i in range(0, len(addrs), max_pages):
        yield array("Q", addrs[i:i + max_pages]), b"".join(pages[i:i + max_pages])


def split_blob(addrs, data) -> list:
    """Check a chunk's size and cut its blob into per-page bytes objects."""
    data = memoryview(data).cast("B")
    if len(data) != len(addrs) * PAGE_SIZE:
        raise ValueError(f"{len(addrs)} page addresses but {len(data)} bytes of data")
    return [bytes(data[i << PAGE_SHIFT:(i + 1) << PAGE_SHIFT]) for i in range(len(addrs))]


class Shmem(Shared):
    """A shared anonymous segment (MAP_SHARED|MAP_ANONYMOUS): pages by page offset.

    Every VMA mapping it holds one reference, in every mm (fork keeps it shared).
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.pages: dict[int, bytearray] = {}
        self._dirty: set[int] = set()       # page offsets written since the last checkpoint
        self.ckpt_base: tuple[bytes, int] | None = None   # as MM's (mm_dirty.py)

    def read(self, pgoff: int, npages: int) -> bytes:
        pages = self.pages
        return b"".join([pages.get(i, ZERO_PAGE) for i in range(pgoff, pgoff + npages)])

    def write(self, byte_off: int, data: memoryview) -> None:
        """Write data at a byte offset of the segment, in place, page by page."""
        pos, end = 0, len(data)
        while pos < end:
            index, in_page = divmod(byte_off + pos, PAGE_SIZE)
            n = min(PAGE_SIZE - in_page, end - pos)
            page = self.pages.get(index)
            if page is None:
                page = self.pages[index] = bytearray(PAGE_SIZE)
            page[in_page:in_page + n] = data[pos:pos + n]
            self._dirty.add(index)
            pos += n
        self.size = max(self.size, page_align(byte_off + end))

    def present_pages(self, max_pages: int = 1 << 30):
        """Yield (array('Q') of byte offsets, blob) for the written, non-zero pages."""
        indexes = [i for i in sorted(self.pages) if self.pages[i] != ZERO_PAGE]
        pages = [self.pages[i] for i in indexes]
        yield from chunked([i << PAGE_SHIFT for i in indexes], pages, max_pages)

    def dirty_offsets(self) -> list[int]:
        return [i << PAGE_SHIFT for i in sorted(self._dirty)]

    def checkpointed(self, base) -> None:
        """An image saved this segment as ``base`` = (image_id, objref): nothing changed since."""
        self._dirty, self.ckpt_base = set(), base

    def set_delta(self, base, dirty_offsets) -> None:
        self.ckpt_base, self._dirty = base, {off >> PAGE_SHIFT for off in dirty_offsets}

    def dirty_pages(self, max_pages: int = 1 << 30):
        """Yield (array('Q') of byte offsets, blob) of the pages written since the base, zero
        pages included (the parent image may hold other contents there)."""
        indexes = sorted(self._dirty)
        yield from chunked([i << PAGE_SHIFT for i in indexes], [self.pages[i] for i in indexes],
                           max_pages)

    def install_pages(self, offsets, data) -> None:
        for off, page in zip(offsets, split_blob(offsets, data)):
            if off % PAGE_SIZE:
                raise ValueError(f"segment offset {off:#x} is not page aligned")
            self.pages[off >> PAGE_SHIFT] = bytearray(page)
            self.size = max(self.size, off + PAGE_SIZE)

    def release(self, kernel) -> None:
        self.pages = {}

    def __repr__(self) -> str:
        return f"<Shmem size={self.size:#x} pages={len(self.pages)} refs={self.refs}>"

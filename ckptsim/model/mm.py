"""Address spaces: ``MM`` (a sorted list of ``VMA``s, see mm_vma.py, plus private pages) and
``MMOps``.

Storage (see ``mm_pages.py``): private pages (anonymous, and the copied-on-write pages of
private file mappings) are ``bytes`` in ``mm.pages`` keyed by virtual page index, so split,
merge and munmap never touch them and fork is one dict copy. Shared anonymous mappings keep
their pages in a ``Shmem`` segment; shared file mappings read and write the inode.

References: each VMA holds one reference on its ``file`` (``file.get()``) and on its
``shmem``; ``mm.exe_file`` holds one more on the executable, as Linux's mm->exe_file does.
"""
from __future__ import annotations

import bisect
import errno
import os
from array import array

from ..errors import kerr
from ..image.types import PAGE_SHIFT, PAGE_SIZE
from .mm_pages import (BRK_START, MAP_ANONYMOUS, MAP_FIXED, MAP_FIXED_NOREPLACE, MAP_GROWSDOWN,
                       MAP_PRIVATE, MAP_SHARED, MAP_SHARED_VALIDATE, MAP_TYPE, MMAP_BASE,
                       MMAP_MIN_ADDR, MREMAP_FIXED, MREMAP_MAYMOVE, PROT_ALL, PROT_EXEC,
                       PROT_READ, PROT_WRITE, STACK_INIT_SIZE, STACK_TOP, TASK_SIZE, TEXT_START,
                       VDSO_PAGES, VDSO_START, ZERO_PAGE, Shmem, chunked, keys_in, nonzero_pages,
                       page_align, split_blob)
from .mm_dirty import DirtyTracking
from .mm_vma import VMA
from .shared import Shared

__all__ = ["MM", "VMA", "Shmem", "MMOps"]


def file_access(file) -> tuple[bool, bool]:
    """(readable, writable) of an open file description, whatever the vfs calls its mode."""
    mode = getattr(file, "f_mode", None)
    if isinstance(mode, int):                 # FMODE_READ=1, FMODE_WRITE=2
        return bool(mode & 1), bool(mode & 2)
    flags = getattr(file, "f_flags", getattr(file, "flags", os.O_RDONLY)) & os.O_ACCMODE
    return flags in (os.O_RDONLY, os.O_RDWR), flags in (os.O_WRONLY, os.O_RDWR)


VSYSCALL_START = 0xFFFFFFFFFF600000   # x86-64's fixed [vsyscall] page (live images)


class MM(DirtyTracking, Shared):
    """An address space; ``refs`` counts the tasks using it (mm_users)."""

    FIELDS = ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
              "start_stack", "arg_start", "arg_end", "env_start", "env_end")

    def __init__(self) -> None:
        super().__init__()
        self.vmas: list[VMA] = []
        self.pages: dict[int, bytes] = {}     # private pages by virtual page index
        self._init_tracking()                 # what changed since the last checkpoint
        self.exe_file = None
        self.def_flags = 0
        self.flags = 0
        for name in self.FIELDS:
            setattr(self, name, 0)
        # What a live image recorded (kinds/memory.py): File -> FileIdentity of the mapped
        # executables, and the vdso's VdsoLayout. The model's own mms have neither.
        self.file_ids: dict = {}
        self.vdso_layout = None

    @classmethod
    def new(cls, kernel) -> "MM":
        return cls()

    # ---- lookup -------------------------------------------------------------------------
    @property
    def map_count(self) -> int:
        return len(self.vmas)

    def _index(self, addr: int) -> int:
        """Index of the first VMA whose end is above addr."""
        i = bisect.bisect_right(self.vmas, addr, key=lambda v: v.start) - 1
        return i if i >= 0 and self.vmas[i].end > addr else i + 1

    def find_vma(self, addr: int) -> VMA | None:
        i = self._index(addr)
        if i < len(self.vmas) and self.vmas[i].start <= addr:
            return self.vmas[i]
        return None

    def overlapping(self, start: int, end: int) -> list[VMA]:
        i, out = self._index(start), []
        while i < len(self.vmas) and self.vmas[i].start < end:
            out.append(self.vmas[i])
            i += 1
        return out

    def is_free(self, start: int, end: int) -> bool:
        return not self.overlapping(start, end)

    def covered(self, start: int, end: int) -> list[VMA]:
        """The VMAs covering [start, end) without holes, or None if any byte is unmapped."""
        vmas = self.overlapping(start, end)
        cur = start
        for v in vmas:
            if v.start > cur:
                return None
            cur = v.end
        return vmas if cur >= end else None

    # ---- structure: split, merge, insert, remove ------------------------------------------
    def _split_at(self, addr: int) -> None:
        """Make addr a VMA boundary (if it falls inside a VMA)."""
        i = self._index(addr)
        if i < len(self.vmas) and self.vmas[i].start < addr:
            vma = self.vmas[i]
            right = vma.clone(addr, vma.end)
            vma.end = addr
            self.vmas.insert(i + 1, right)

    def _merge_range(self, kernel, start: int, end: int) -> None:
        """Merge every mergeable neighbour pair touching [start, end]."""
        i = max(self._index(start) - 1, 0)
        while i + 1 < len(self.vmas) and self.vmas[i].start <= end:
            left, right = self.vmas[i], self.vmas[i + 1]
            if left.can_merge(right):
                left.end = right.end
                del self.vmas[i + 1]
                right.drop_refs(kernel)
            else:
                i += 1

    def _insert(self, kernel, vma: VMA, merge: bool = True) -> VMA:
        """Insert a VMA (whose references are already taken) into a free range."""
        i = bisect.bisect_left(self.vmas, vma.start, key=lambda v: v.start)
        self.vmas.insert(i, vma)
        if merge:
            self._merge_range(kernel, vma.start, vma.end)
        return vma

    def _drop_pages(self, start: int, end: int) -> None:
        lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
        gone = keys_in(self.pages, lo, hi)
        for index in gone:
            del self.pages[index]
        self._note_dropped(gone)
        self._dirty.difference_update(keys_in(self._dirty, lo, hi))  # shared-mapping writes

    def remove_range(self, kernel, start: int, end: int) -> None:
        """munmap's core: split at both ends, drop the VMAs inside and their private pages."""
        self._split_at(start)
        self._split_at(end)
        gone = self.overlapping(start, end)
        if gone:
            i = self.vmas.index(gone[0])
            del self.vmas[i:i + len(gone)]
        for vma in gone:
            vma.drop_refs(kernel)
        self._drop_pages(start, end)

    # ---- placement ------------------------------------------------------------------------
    def unmapped_area(self, length: int, hint: int = 0) -> int:
        """Like arch_get_unmapped_area_topdown: the hint if free, else the highest gap below
        mmap_base that fits."""
        if hint:
            hint = page_align(hint)
            if MMAP_MIN_ADDR <= hint and hint + length <= TASK_SIZE and self.is_free(hint, hint + length):
                return hint
        high = MMAP_BASE
        for vma in reversed(self.vmas):
            if vma.start >= high:
                continue
            if vma.end <= high and high - vma.end >= length:
                return high - length
            high = vma.start
        if high - MMAP_MIN_ADDR >= length:
            return high - length
        raise kerr(errno.ENOMEM, f"no room for {length:#x} bytes")

    # ---- exec / fork / release ------------------------------------------------------------
    def _drop_all(self, kernel) -> None:
        vmas, self.vmas = self.vmas, []
        for vma in vmas:
            vma.drop_refs(kernel)
        self.pages = {}
        self._init_tracking()      # a new address space: no image holds it
        if self.exe_file is not None:
            exe, self.exe_file = self.exe_file, None
            exe.put(kernel)

    def exec_reset(self, kernel, exe_file) -> None:
        """A fresh image: text (the exe, private r-x), empty brk, [stack], [vdso].

        Takes its own references on exe_file (one for mm.exe_file, one for the text VMA)."""
        self._drop_all(kernel)
        self.file_ids, self.vdso_layout = {}, None
        text_len = PAGE_SIZE
        if exe_file is not None:
            text_len = max(page_align(exe_file.inode.size), PAGE_SIZE)
            self.exe_file = exe_file.get()
            text = VMA(TEXT_START, TEXT_START + text_len, PROT_READ | PROT_EXEC, MAP_PRIVATE,
                       0, exe_file).take_refs()
        else:
            text = VMA(TEXT_START, TEXT_START + text_len, PROT_READ | PROT_EXEC,
                       MAP_PRIVATE | MAP_ANONYMOUS, TEXT_START >> PAGE_SHIFT)
        self._insert(kernel, text)
        stack_start = STACK_TOP - STACK_INIT_SIZE
        self._insert(kernel, VMA(stack_start, STACK_TOP, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN,
                                 stack_start >> PAGE_SHIFT, name="[stack]"))
        self._insert(kernel, VMA(VDSO_START, VDSO_START + VDSO_PAGES * PAGE_SIZE,
                                 PROT_READ | PROT_EXEC, MAP_PRIVATE, 0, name="[vdso]",
                                 maxprot=PROT_READ | PROT_EXEC))
        self.start_code, self.end_code = TEXT_START, TEXT_START + text_len
        self.start_data = self.end_data = self.end_code
        self.start_brk = self.brk = BRK_START
        self.arg_start = self.arg_end = self.env_start = self.env_end = STACK_TOP - PAGE_SIZE
        self.start_stack = STACK_TOP - 2 * PAGE_SIZE

    def fork_copy(self, kernel) -> "MM":
        """The child's mm: same VMAs (own references), private pages copy-on-write (shared
        immutable page objects), shared segments and shared file pages still shared."""
        child = MM()
        child.vmas = [vma.clone() for vma in self.vmas]
        child.pages = dict(self.pages)
        self._copy_tracking(child)
        child.exe_file = self.exe_file.get() if self.exe_file is not None else None
        child.def_flags, child.flags = self.def_flags, self.flags
        child.file_ids, child.vdso_layout = dict(self.file_ids), self.vdso_layout
        for name in self.FIELDS:
            setattr(child, name, getattr(self, name))
        return child

    def release(self, kernel) -> None:
        self._drop_all(kernel)

    # ---- contents ---------------------------------------------------------------------------
    def _read_vma(self, vma: VMA, start: int, end: int) -> bytes:
        """Bytes [start, end) of one VMA (page aligned range)."""
        lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
        pgoff = vma.pgoff + ((start - vma.start) >> PAGE_SHIFT)
        if vma.shmem is not None:
            return vma.shmem.read(pgoff, hi - lo)
        if vma.file is not None and vma.name != "[vdso]":
            base = vma.file.inode.read_at(pgoff << PAGE_SHIFT, end - start)
            if vma.shared:
                return base.ljust(end - start, b"\0")
            own = keys_in(self.pages, lo, hi)
            if not own:
                return base.ljust(end - start, b"\0")
            buf = bytearray(base.ljust(end - start, b"\0"))
            for index in own:
                at = (index - lo) << PAGE_SHIFT
                buf[at:at + PAGE_SIZE] = self.pages[index]
            return bytes(buf)
        pages = self.pages
        return b"".join([pages.get(i, ZERO_PAGE) for i in range(lo, hi)])

    def _write_private(self, vma: VMA, addr: int, data: memoryview) -> None:
        """Copy-on-write: every touched page becomes a new bytes object of this mm."""
        pos, end = 0, len(data)
        while pos < end:
            index, in_page = divmod(addr + pos, PAGE_SIZE)
            n = min(PAGE_SIZE - in_page, end - pos)
            if n == PAGE_SIZE:
                self.pages[index] = bytes(data[pos:pos + n])
            else:
                old = self.pages.get(index)
                if old is None:
                    old = self._read_vma(vma, index << PAGE_SHIFT, (index + 1) << PAGE_SHIFT)
                page = bytearray(old)
                page[in_page:in_page + n] = data[pos:pos + n]
                self.pages[index] = bytes(page)
            pos += n

    def _write_vma(self, vma: VMA, addr: int, data: memoryview) -> None:
        byte_off = (vma.pgoff << PAGE_SHIFT) + addr - vma.start
        if vma.shmem is not None:
            vma.shmem.write(byte_off, data)
        elif vma.shared and vma.file is not None:
            # A shared file mapping cannot extend the file: bytes past EOF are dropped.
            room = max(0, vma.file.inode.size - byte_off)
            if room:
                vma.file.inode.write_at(byte_off, bytes(data[:room]))
        else:
            self._write_private(vma, addr, data)

    def _access(self, addr: int, n: int, need: int, what: str) -> list[VMA]:
        if addr < 0 or n < 0 or addr + n > TASK_SIZE:
            raise kerr(errno.EFAULT, f"{what} {addr:#x}+{n:#x} outside the address space")
        vmas = self.covered(addr, addr + n)
        if vmas is None:
            raise kerr(errno.EFAULT, f"{what} {addr:#x}+{n:#x} touches unmapped memory")
        for vma in vmas:
            if vma.prot & need != need:
                raise kerr(errno.EFAULT, f"{what} {addr:#x}: {vma} lacks prot {need}")
        return vmas

    def read(self, addr: int, n: int) -> bytes:
        if n == 0:
            return b""
        out = []
        for vma in self._access(addr, n, PROT_READ, "read"):
            lo, hi = max(addr, vma.start), min(addr + n, vma.end)
            plo, phi = lo & ~(PAGE_SIZE - 1), page_align(hi)
            blob = self._read_vma(vma, plo, phi)
            out.append(blob[lo - plo:hi - plo])
        return b"".join(out)

    def write(self, addr: int, data) -> None:
        data = memoryview(data).cast("B")
        n = len(data)
        if n == 0:
            return
        for vma in self._access(addr, n, PROT_WRITE, "write"):
            lo, hi = max(addr, vma.start), min(addr + n, vma.end)
            self._write_vma(vma, lo, data[lo - addr:hi - addr])
        self._dirty.update(range(addr >> PAGE_SHIFT, page_align(addr + n) >> PAGE_SHIFT))

    # ---- checkpoint / restore -------------------------------------------------------------
    def present_chunks(self, vma: VMA, max_pages: int = 1024):
        """Yield (array('Q') addresses, blob) of the VMA's private pages in address order (none
        for shared and vdso VMAs: their contents live elsewhere). All-zero pages of anonymous
        mappings are skipped (they read back as zeros); a private file mapping keeps them,
        since a missing page there would read back the file's data."""
        if not vma.is_private:
            return
        indexes = keys_in(self.pages, vma.start >> PAGE_SHIFT, vma.end >> PAGE_SHIFT)
        if vma.file is None:
            indexes = nonzero_pages(self.pages, indexes)
        yield from chunked([i << PAGE_SHIFT for i in indexes], [self.pages[i] for i in indexes],
                           max_pages)

    def present_pages(self, vma: VMA):
        """All of a VMA's present pages as one (array('Q'), blob)."""
        chunks = list(self.present_chunks(vma, max_pages=1 << 40))
        if not chunks:
            return array("Q"), b""
        return chunks[0]

    def restore_vma(self, start, end, prot, flags, pgoff=0, file=None, shmem=None, name=None,
                    maxprot=PROT_ALL) -> VMA:
        """Add one VMA exactly as given (no merge), taking references on file and shmem.
        The x86-64 [vsyscall] page is the one mapping above TASK_SIZE (at VSYSCALL_START)."""
        vsyscall = name == "[vsyscall]" and (start, end) == (VSYSCALL_START, VSYSCALL_START + PAGE_SIZE)
        if start % PAGE_SIZE or end % PAGE_SIZE or not (0 <= start < end <= TASK_SIZE or vsyscall):
            raise kerr(errno.EINVAL, f"bad VMA range {start:#x}-{end:#x}")
        if not self.is_free(start, end):
            raise kerr(errno.EINVAL, f"VMA {start:#x}-{end:#x} overlaps another")
        if prot & ~PROT_ALL or flags & ~(MAP_SHARED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN):
            raise kerr(errno.EINVAL, f"bad VMA prot {prot:#x} or flags {flags:#x}")
        vma = VMA(start, end, prot, flags, pgoff, file, shmem, name, maxprot).take_refs()
        return self._insert(None, vma, merge=False)

    def install_pages(self, addrs, data) -> None:
        """Install private pages in bulk: addrs (array('Q')) and their concatenated contents."""
        pages = split_blob(addrs, data)
        lo = hi = 0                            # bounds of the last private VMA found
        for addr in addrs:
            if not lo <= addr < hi:
                vma = self.find_vma(addr)
                if vma is None or not vma.is_private:
                    raise kerr(errno.EINVAL, f"page {addr:#x} is not in a private VMA")
                lo, hi = vma.start, vma.end
            if addr % PAGE_SIZE:
                raise kerr(errno.EINVAL, f"page address {addr:#x} is not page aligned")
        self.pages.update(zip((a >> PAGE_SHIFT for a in addrs), pages))

    def __repr__(self) -> str:
        return f"<MM vmas={len(self.vmas)} pages={len(self.pages)} refs={self.refs}>"


def _check_prot(prot: int) -> None:
    if prot & ~PROT_ALL:
        raise kerr(errno.EINVAL, f"unknown prot bits {prot:#x}")


class MMOps:
    """Memory syscalls of the Kernel; ``t`` is the calling task (``t.mm``, ``t.files``)."""

    def mmap(self, t, addr: int, length: int, prot: int, flags: int, fd: int = -1,
             offset: int = 0) -> int:
        mm = t.mm
        _check_prot(prot)
        maptype = flags & MAP_TYPE
        if maptype not in (MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE):
            raise kerr(errno.EINVAL, f"mmap flags {flags:#x} need MAP_SHARED or MAP_PRIVATE")
        if length <= 0:
            raise kerr(errno.EINVAL, "mmap of zero length")
        if offset % PAGE_SIZE or offset < 0:
            raise kerr(errno.EINVAL, f"mmap offset {offset:#x} not page aligned")
        length = page_align(length)
        if length > TASK_SIZE:
            raise kerr(errno.ENOMEM, f"mmap length {length:#x} too large")
        shared = maptype != MAP_PRIVATE
        vflags = (MAP_SHARED if shared else MAP_PRIVATE) | (flags & MAP_GROWSDOWN)
        file, maxprot = None, PROT_ALL
        if flags & MAP_ANONYMOUS:
            vflags |= MAP_ANONYMOUS
        else:
            file = t.files.get(fd) if fd >= 0 else None
            if file is None:
                raise kerr(errno.EBADF, f"mmap of fd {fd}: not open")
            inode = getattr(file, "inode", None)
            if not hasattr(inode, "read_at") or getattr(inode, "is_dir", lambda: False)():
                raise kerr(errno.ENODEV, f"fd {fd} cannot be mapped")
            readable, writable = file_access(file)
            if not readable:
                raise kerr(errno.EACCES, f"fd {fd} is not open for reading")
            if shared and not writable:
                if prot & PROT_WRITE:
                    raise kerr(errno.EACCES, f"shared writable mapping of read-only fd {fd}")
                maxprot &= ~PROT_WRITE
        fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)
        if fixed:
            if addr % PAGE_SIZE:
                raise kerr(errno.EINVAL, f"MAP_FIXED address {addr:#x} not page aligned")
            if addr + length > TASK_SIZE:
                raise kerr(errno.ENOMEM, f"MAP_FIXED range {addr:#x}+{length:#x} beyond TASK_SIZE")
            if addr < MMAP_MIN_ADDR:
                raise kerr(errno.EPERM, f"MAP_FIXED below mmap_min_addr ({addr:#x})")
            if flags & MAP_FIXED_NOREPLACE and not flags & MAP_FIXED and not mm.is_free(addr, addr + length):
                raise kerr(errno.EEXIST, f"MAP_FIXED_NOREPLACE range {addr:#x} is in use")
            mm.remove_range(self, addr, addr + length)
        else:
            addr = mm.unmapped_area(length, addr)
        shmem = None
        if file is None and shared:
            shmem, pgoff = Shmem(length), 0     # the new VMA owns the segment's first reference
        elif file is None:
            pgoff = addr >> PAGE_SHIFT
        else:
            pgoff = offset >> PAGE_SHIFT
            file.get()
        mm._insert(self, VMA(addr, addr + length, prot, vflags, pgoff, file, shmem, None, maxprot))
        return addr

    def munmap(self, t, addr: int, length: int) -> int:
        if addr % PAGE_SIZE or length <= 0:
            raise kerr(errno.EINVAL, f"munmap {addr:#x}+{length:#x}: unaligned or empty")
        length = page_align(length)
        if addr + length > TASK_SIZE:
            raise kerr(errno.EINVAL, f"munmap {addr:#x}+{length:#x} beyond TASK_SIZE")
        t.mm.remove_range(self, addr, addr + length)
        return 0

    def mprotect(self, t, addr: int, length: int, prot: int) -> int:
        mm = t.mm
        _check_prot(prot)
        if addr % PAGE_SIZE:
            raise kerr(errno.EINVAL, f"mprotect address {addr:#x} not page aligned")
        length = page_align(length)
        if length == 0:
            return 0
        end = addr + length
        if end > TASK_SIZE:
            raise kerr(errno.ENOMEM, f"mprotect {addr:#x}+{length:#x} beyond TASK_SIZE")
        vmas = mm.covered(addr, end)
        if vmas is None:
            raise kerr(errno.ENOMEM, f"mprotect {addr:#x}+{length:#x} covers unmapped memory")
        for vma in vmas:
            if prot & ~vma.maxprot:
                raise kerr(errno.EACCES, f"mprotect {prot:#x} exceeds what {vma} allows")
        mm._split_at(addr)
        mm._split_at(end)
        for vma in mm.overlapping(addr, end):
            vma.prot = prot
        mm._merge_range(self, addr, end)
        return 0

    def mremap(self, t, old: int, old_len: int, new_len: int, flags: int, new_addr: int = 0) -> int:
        mm = t.mm
        if flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED) or old % PAGE_SIZE:
            raise kerr(errno.EINVAL, f"mremap flags {flags:#x} or address {old:#x}")
        if flags & MREMAP_FIXED and not flags & MREMAP_MAYMOVE:
            raise kerr(errno.EINVAL, "MREMAP_FIXED without MREMAP_MAYMOVE")
        old_len, new_len = page_align(old_len), page_align(new_len)
        if new_len == 0 or old_len == 0:
            raise kerr(errno.EINVAL, "mremap to or from zero length (old_len 0 unsupported)")
        vma = mm.find_vma(old)
        if vma is None or old + old_len > vma.end:
            raise kerr(errno.EFAULT, f"mremap {old:#x}+{old_len:#x} is not inside one mapping")
        if flags & MREMAP_FIXED:
            if new_addr % PAGE_SIZE or new_addr + new_len > TASK_SIZE or new_addr < MMAP_MIN_ADDR:
                raise kerr(errno.EINVAL, f"mremap target {new_addr:#x} invalid")
            if new_addr < old + old_len and old < new_addr + new_len:
                raise kerr(errno.EINVAL, "mremap source and target overlap")
            mm.remove_range(self, new_addr, new_addr + new_len)
            if old_len > new_len:
                mm.remove_range(self, old + new_len, old + old_len)
                old_len = new_len
            return self._move_vma(mm, old, old_len, new_len, new_addr)
        if new_len <= old_len:
            if new_len < old_len:
                mm.remove_range(self, old + new_len, old + old_len)
            return old
        grow_end = old + new_len
        if old + old_len == vma.end and grow_end <= TASK_SIZE and mm.is_free(vma.end, grow_end):
            mm._insert(self, VMA(vma.end, grow_end, vma.prot, vma.flags,
                                 vma.pgoff + vma.npages, vma.file, vma.shmem, vma.name,
                                 vma.maxprot).take_refs())
            return old
        if not flags & MREMAP_MAYMOVE:
            raise kerr(errno.ENOMEM, f"mremap cannot grow {old:#x} in place")
        return self._move_vma(mm, old, old_len, new_len, mm.unmapped_area(new_len))

    def _move_vma(self, mm: MM, old: int, old_len: int, new_len: int, new_addr: int) -> int:
        """Move [old, old+old_len) (within one VMA) to new_addr, grown to new_len."""
        vma = mm.find_vma(old)
        moved = vma.clone(old, old + old_len)
        moved.start, moved.end = new_addr, new_addr + new_len
        lo, hi, delta = old >> PAGE_SHIFT, (old + old_len) >> PAGE_SHIFT, (new_addr - old) >> PAGE_SHIFT
        carried = {index + delta: mm.pages[index] for index in keys_in(mm.pages, lo, hi)}
        mm.remove_range(self, old, old + old_len)
        mm._insert(self, moved)
        mm.pages.update(carried)
        mm._dirty.update(carried)          # the pages now live at new addresses
        return new_addr

    def brk(self, t, addr: int) -> int:
        """Grow or shrink the heap; returns the (possibly unchanged) break, like sys_brk."""
        mm = t.mm
        if addr < mm.start_brk or addr > MMAP_BASE:
            return mm.brk
        old_end, new_end = page_align(mm.brk), page_align(addr)
        if new_end < old_end:
            mm.remove_range(self, new_end, old_end)
        elif new_end > old_end:
            if not mm.is_free(old_end, new_end):
                return mm.brk
            mm._insert(self, VMA(old_end, new_end, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS, old_end >> PAGE_SHIFT, name="[heap]"))
        mm.brk = addr
        return addr

    def mem_read(self, t, addr: int, n: int) -> bytes:
        return t.mm.read(addr, n)

    def mem_write(self, t, addr: int, data) -> None:
        t.mm.write(addr, data)

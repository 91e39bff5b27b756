"""Mappings: ``VMA``, one [start, end) range of an address space (part of ``mm.py``).

A VMA holds its protection, the MAP_* flags it keeps, its backing (file, shared anonymous
segment, or none for private anonymous memory) and one reference on that backing; ``MM``
(mm.py) keeps them sorted, splits and merges them. Re-exported by ``mm.py``.
"""
from __future__ import annotations

from ..image.types import PAGE_SHIFT
from .mm_pages import (MAP_GROWSDOWN, MAP_SHARED, PROT_ALL, PROT_WRITE, VM_GROWSDOWN, VM_MAYSHARE,
                       VM_SHARED)


class VMA:
    """One mapping [start, end). ``flags`` keeps only MAP_SHARED/MAP_PRIVATE/MAP_ANONYMOUS/
    MAP_GROWSDOWN; ``maxprot`` is what mprotect may grant (Linux's VM_MAY* bits, as PROT_*).
    ``pgoff`` is the page offset into the file/segment (start >> 12 for private anon).
    ``vm_extra``: vm_flags bits the model does not derive (VM_ACCOUNT, VM_DONTEXPAND, ... of
    a live image), kept as restored so that a checkpoint writes them back."""

    __slots__ = ("start", "end", "prot", "flags", "maxprot", "pgoff", "file", "shmem", "name",
                 "vm_extra")

    def __init__(self, start, end, prot, flags, pgoff=0, file=None, shmem=None, name=None,
                 maxprot=PROT_ALL):
        self.start, self.end, self.prot, self.flags = start, end, prot, flags
        self.pgoff, self.file, self.shmem, self.name, self.maxprot = pgoff, file, shmem, name, maxprot
        self.vm_extra = 0

    @property
    def shared(self) -> bool:
        return bool(self.flags & MAP_SHARED)

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    @property
    def is_private(self) -> bool:
        """Contents live in mm.pages (anonymous or copied-on-write file pages)."""
        return not self.shared and self.name != "[vdso]"

    @property
    def vm_flags(self) -> int:
        """Linux's vm_flags: VM_READ/WRITE/EXEC, VM_MAY* (<<4), VM_MAYSHARE and, as do_mmap()
        sets it, VM_SHARED only while the shared mapping may be written; VM_GROWSDOWN."""
        vmf = self.prot | (self.maxprot << 4) | self.vm_extra
        if self.shared:
            vmf |= VM_MAYSHARE | (VM_SHARED if self.maxprot & PROT_WRITE else 0)
        if self.flags & MAP_GROWSDOWN:
            vmf |= VM_GROWSDOWN
        return vmf

    def can_merge(self, nxt: "VMA") -> bool:
        """vma_merge's rule: adjacent, same attributes and backing, contiguous pgoff."""
        return (self.end == nxt.start and self.prot == nxt.prot and self.flags == nxt.flags
                and self.maxprot == nxt.maxprot and self.file is nxt.file
                and self.shmem is nxt.shmem and self.name == nxt.name
                and self.vm_extra == nxt.vm_extra
                and self.name != "[vdso]" and self.pgoff + self.npages == nxt.pgoff)

    def take_refs(self) -> "VMA":
        if self.file is not None:
            self.file.get()
        if self.shmem is not None:
            self.shmem.get()
        return self

    def drop_refs(self, kernel) -> None:
        if self.file is not None:
            self.file.put(kernel)
        if self.shmem is not None:
            self.shmem.put(kernel)

    def clone(self, start=None, end=None) -> "VMA":
        """A copy over [start, end) (default: the same range) taking its own references."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        vma = VMA(start, end, self.prot, self.flags, self.pgoff + ((start - self.start) >> PAGE_SHIFT),
                  self.file, self.shmem, self.name, self.maxprot).take_refs()
        vma.vm_extra = self.vm_extra
        return vma

    def __repr__(self) -> str:
        kind = "shmem" if self.shmem else ("file" if self.file else "anon")
        return (f"<VMA {self.start:#x}-{self.end:#x} prot={self.prot} flags={self.flags:#x} "
                f"pgoff={self.pgoff:#x} {kind}{' ' + self.name if self.name else ''}>")

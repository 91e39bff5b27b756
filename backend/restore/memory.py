"""Restoring an address space into a stub: VMAs, pages, vdso, and the mm fields.

Order, per process (the leader stub; its threads are created afterwards and share it):
  1. everything the stub had is unmapped except the trampoline and its special mappings;
  2. ``[vvar]``, ``[vvar_vclock]`` and ``[vdso]`` are moved (mremap) to the image's addresses,
     by way of a free spot so that no move lands on another (their sizes must match the
     image's: a different vdso layout is refused, since saved code calls into it);
  3. every VMA is mapped at its address (MAP_FIXED_NOREPLACE: an overlap is an error, never a
     silent replacement) with its backing: anonymous, a file the restorer opened (handed over
     by the transport), or a shared anonymous segment (the restorer's own shared mapping,
     reopened through /proc/self/map_files so that every task maps the same segment);
  4. private pages are handed to the job's PageWriter (pagewriter.py: UFFDIO_COPY through a
     userfaultfd made in the stub for the long runs of private anonymous VMAs, else
     process_vm_writev, in bulk on a helper thread, straight from the mmap'd image) while the
     tracer goes on; VMAs
     that are not writable get PROT_WRITE for this and their own protection back
     (``protect_written``) once the writer is done;
  5. the mm fields (code, data, brk, stack, arguments and environment) with PR_SET_MM_MAP,
     and the executable link when it differs from the stub's.
The files to map are handed over first, so that the syscalls of steps 1-3 (and those of 5)
run as batches, one stop each (stub.syscalls).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
from array import array

from backend import kabi
from ckptsim.kinds.memory import SPECIAL_MAPPINGS
from ckptsim.model.mm_pages import VM_GROWSDOWN, VM_MAYSHARE, VM_SHARED
from backend.memory_pages import _runs_of as runs_of   # one run finder for both sides
from .pagewriter import PageWriter, in_order
from .stub import PAGE, Stub, StubError
from .transport import MAX_FDS_PER_SEND

_MOVABLE_SPECIALS = ("[vvar]", "[vvar_vclock]", "[vdso]")
VM_MAYWRITE = 0x20


class PageSink:
    """Collects the image's page chunks as the model restore meets them (memoryviews into
    the mmap'd image: nothing is copied): private chunks per VMA, segment chunks per Shmem."""

    def __init__(self):
        self.private: dict[int, list[tuple[array, memoryview]]] = {}
        self.shmem: dict[int, list[tuple[array, memoryview]]] = {}
        self.pages = 0

    def private_pages(self, vma, addrs: array, data: memoryview) -> None:
        _check_chunk(addrs, data, vma.start, vma.end,
                     f"VMA {vma.start:#x}-{vma.end:#x}")
        self.private.setdefault(id(vma), []).append((addrs, data))
        self.pages += len(addrs)

    def shmem_pages(self, seg, offsets: array, data: memoryview) -> None:
        _check_chunk(offsets, data, 0, seg.size, f"a shared segment of {seg.size:#x} bytes")
        self.shmem.setdefault(id(seg), []).append((offsets, data))
        self.pages += len(offsets)


# bytes whose low nibble is set: the second byte of an address that is not page aligned
_LOW_NIBBLE = bytes(1 if b & 0x0F else 0 for b in range(256))


def _check_chunk(addrs: array, data, lo: int, hi: int, where: str) -> None:
    """The chunk's first and last pages lie in [lo, hi), every page is page aligned, and the
    data is exactly the pages: an image must not write anywhere else (the stub's trampoline,
    another VMA), whatever it says. C-level passes over the addresses, no Python loop. That
    the pages are in strictly increasing order (so that all lie between the first and the
    last) is checked by whoever writes them, from the runs it needs anyway (``in_order``):
    on the page writer's thread, off the decoding's path."""
    n = len(addrs)
    if not n:
        return
    raw = addrs.tobytes()
    if raw[0::8].count(0) != n or raw[1::8].translate(_LOW_NIBBLE).count(0) != n:
        raise StubError(errno.EINVAL, f"a page chunk of {where} holds an unaligned address")
    if addrs[0] < lo or addrs[-1] >= hi:
        raise StubError(errno.EINVAL, f"a page chunk ({addrs[0]:#x}..{addrs[-1]:#x}) lies "
                                      f"outside {where}")
    if len(data) != n * PAGE:
        raise StubError(errno.EINVAL, f"a page chunk of {where} holds {len(data)} bytes for "
                                      f"{n} pages")


def stub_maps(pid: int) -> list[tuple[int, int, str]]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[5].strip() if len(parts) > 5 else ""))
    return out


def free_spot(size: int, busy: list[tuple[int, int]], below: int = 0x7f0000000000) -> int:
    """The highest page-aligned address under ``below`` where ``size`` bytes touch nothing
    in ``busy``."""
    top = below
    for start, end in sorted(busy, key=lambda r: r[1], reverse=True):
        if end <= top - size:
            break                                # the gap [end, top) is big enough
        top = min(top, start)
    if top - size < 0x10000:
        raise StubError(errno.ENOMEM, f"no free {size:#x} bytes for the restorer's own use")
    return top - size


class SharedSegments:
    """The restorer's own shared anonymous mappings, one per image segment, filled with its
    pages, and handed to the tasks as a file (its /proc/self/map_files entry)."""

    def __init__(self, sink: PageSink):
        self.sink = sink
        self._maps: dict[int, tuple[mmap.mmap, int]] = {}

    def fd_for(self, seg) -> int:
        got = self._maps.get(id(seg))
        if got is None:
            area = mmap.mmap(-1, seg.size, mmap.MAP_SHARED)
            for offsets, data in self.sink.shmem.get(id(seg), ()):
                for (a, b), pos in _run_positions(offsets):
                    area[a:b] = data[pos:pos + (b - a)]
            base = ctypes.addressof(ctypes.c_char.from_buffer(area))
            fd = os.open(f"/proc/self/map_files/{base:x}-{base + seg.size:x}",
                         os.O_RDWR | os.O_CLOEXEC)
            got = self._maps[id(seg)] = (area, fd)
        return got[1]

    def close(self) -> None:
        for area, fd in self._maps.values():
            os.close(fd)
            try:
                area.close()
            except BufferError:
                pass
        self._maps.clear()


def _run_positions(offsets: array):
    """(run, byte position of the run in the chunk) for the runs of ``offsets``."""
    pos = 0
    for a, b in in_order(runs_of(offsets), offsets):
        yield (a, b), pos
        pos += b - a


def restore_mm(stub: Stub, mm, sink: PageSink, segments: SharedSegments, transport,
               open_file, exe_path: str | None, stub_exe: str, writer: PageWriter) -> list:
    """Rebuild ``mm`` (a model MM restored from the image) in the process of ``stub``.
    ``open_file(file, flags)`` is the restorer's fd for a model File (its path reopened);
    ``exe_path`` the image's executable. The private pages go to ``writer``; returns the VMAs
    for ``protect_written`` once it is done."""
    tramp = (stub.tramp, stub.tramp + PAGE)
    current = stub_maps(stub.pid)
    specials_now = {name: (s, e) for s, e, name in current if name in _MOVABLE_SPECIALS}
    wanted = {v.name: (v.start, v.end) for v in mm.vmas if v.name in _MOVABLE_SPECIALS}
    for name in sorted(set(specials_now) | set(wanted)):
        have, want = specials_now.get(name), wanted.get(name)
        if have is None or want is None or have[1] - have[0] != want[1] - want[0]:
            raise StubError(errno.EINVAL, "the vdso layout of this kernel differs from the "
                                          f"image's ({name}: image {_size(want)}, here "
                                          f"{_size(have)}): saved code calls into it")
    # 3a. the files and segments to map, handed over first (one recvmsg in the stub for them
    # all) so that steps 1-3 then run as batches of syscalls (stub.syscalls: one stop a batch)
    # 4. the pages: the writer plans its calls meanwhile, and writes once the VMAs exist
    written = writer.submit(stub.pid, [chunk for vma in mm.vmas
                                       if vma.name not in SPECIAL_MAPPINGS
                                       for chunk in sink.private.get(id(vma), ())],
                            [(vma.start, vma.end) for vma in mm.vmas if _private_anon(vma)
                             and vma.name not in SPECIAL_MAPPINGS and id(vma) in sink.private])
    fds = _send_mapped_files(stub, transport, mm, segments, open_file)
    to_protect, maps = [], []
    for vma in mm.vmas:
        if vma.name in SPECIAL_MAPPINGS:
            continue
        chunks = sink.private.get(id(vma), ())
        shared = bool(vma.vm_flags & (VM_SHARED | VM_MAYSHARE))
        prot = vma.prot
        if chunks and not prot & kabi.PROT_WRITE:
            prot |= kabi.PROT_WRITE
            to_protect.append(vma)
        flags = (kabi.MAP_SHARED if shared else kabi.MAP_PRIVATE) | kabi.MAP_FIXED_NOREPLACE
        if vma.vm_flags & VM_GROWSDOWN:
            flags |= kabi.MAP_GROWSDOWN
        fd, offset = -1, 0
        if vma.shmem is not None or vma.file is not None:
            fd, offset = fds[_file_key(vma)], vma.pgoff * PAGE
        else:
            flags |= kabi.MAP_ANONYMOUS
        maps.append((vma, (kabi.SYS_mmap, (vma.start, vma.end - vma.start, prot, flags, fd,
                                           offset), f"mmap of {_describe(vma)}")))
    calls = []
    # 1. unmap all but the trampoline and the specials
    keep = sorted([tramp] + list(specials_now.values()))
    lo = 0
    for s, e in keep + [(kabi.TASK_SIZE_X86_64, kabi.TASK_SIZE_X86_64)]:
        if s > lo:
            calls.append((kabi.SYS_munmap, (lo, s - lo), "munmap of the stub's mappings"))
        lo = max(lo, e)
    # 2. move the specials, through a free spot
    if specials_now:
        image_busy = [(v.start, v.end) for v in mm.vmas]
        first = min(s for s, _ in specials_now.values())
        span = max(e for _, e in specials_now.values()) - first
        temp = free_spot(span, image_busy + keep)
        for hop in ("temp", "final"):
            for name, (s, e) in sorted(specials_now.items()):
                src = s if hop == "temp" else temp + (s - first)
                dst = temp + (s - first) if hop == "temp" else wanted[name][0]
                if src != dst:
                    calls.append((kabi.SYS_mremap, (src, e - s, e - s, kabi.MREMAP_MAYMOVE
                                                    | kabi.MREMAP_FIXED, dst),
                                  f"mremap of {name}"))
    # 3. map every VMA
    got = stub.syscalls(calls + [call for _, call in maps])[len(calls):]
    for (vma, _), at in zip(maps, got):
        if at != vma.start:
            raise StubError(errno.EFAULT, f"mmap of {_describe(vma)} landed at {at:#x}")
    # only now: a write under way holds the mm's lock that mmap and mprotect wait for; what
    # follows (fds, cwd, limits, threads) runs meanwhile
    uffd, stub_uffd = _take_userfaultfd(stub) if written.anon else (-1, -1)
    written.mapped(uffd)
    # 5. the mm fields and the executable
    exe_fd = 0xFFFFFFFF
    if exe_path and exe_path != stub_exe:
        exe_fd = _stub_fd(stub, transport, {}, None, lambda: open_file(mm.exe_file, os.O_RDONLY),
                          f"executable {exe_path}")
    fields = kabi.prctl_mm_map(**{name: getattr(mm, name) for name in mm.FIELDS},
                               auxv=0, auxv_size=0, exe_fd=exe_fd)
    addr = stub.put_scratch(bytes(fields), 0)
    calls = [(kabi.SYS_close, (fd,), "close") for fd in fds.values()]
    if stub_uffd >= 0:
        calls.append((kabi.SYS_close, (stub_uffd,), "close of the userfaultfd"))
    calls.append((kabi.SYS_prctl, (kabi.PR_SET_MM, kabi.PR_SET_MM_MAP, addr,
                                   ctypes.sizeof(fields), 0), "prctl(PR_SET_MM_MAP)"))
    if exe_fd != 0xFFFFFFFF:
        calls.append((kabi.SYS_close, (exe_fd,), "close"))
    stub.syscalls(calls)
    return to_protect


def _private_anon(vma) -> bool:
    return vma.file is None and vma.shmem is None and not vma.vm_flags & (VM_SHARED | VM_MAYSHARE)


def _take_userfaultfd(stub: Stub) -> tuple[int, int]:
    """A userfaultfd of the stub's mm for the page writer (UFFD_USER_MODE_ONLY: a kernel
    access to a page not written yet fails instead of waiting): (our fd, the stub's fd, to
    close), or (-1, -1) where the kernel has none or refuses (the writer then uses
    process_vm_writev for all)."""
    from .pagewriter import USE_UFFD
    if not USE_UFFD:
        return -1, -1
    fd = stub.syscall(kabi.SYS_userfaultfd, os.O_CLOEXEC | kabi.UFFD_USER_MODE_ONLY,
                      check=False, what="userfaultfd")
    if fd < 0:
        return -1, -1
    pidfd = -1
    try:
        pidfd = kabi.syscall(kabi.SYS_pidfd_open, stub.pid, 0, what="pidfd_open")
        return kabi.syscall(kabi.SYS_pidfd_getfd, pidfd, fd, 0, what="pidfd_getfd"), fd
    except OSError:
        return -1, fd
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def protect_written(stub: Stub, to_protect) -> None:
    """Once the writer has written them: the VMAs that got PROT_WRITE for the copy get their
    own protection back."""
    stub.syscalls([(kabi.SYS_mprotect, (vma.start, vma.end - vma.start, vma.prot),
                    f"mprotect of {_describe(vma)}") for vma in to_protect])


def _file_key(vma):
    """What a file-backed or shared-segment VMA maps: one fd in the stub per key."""
    if vma.shmem is not None:
        return id(vma.shmem)
    writable = bool(vma.vm_flags & (VM_SHARED | VM_MAYSHARE)) and vma.vm_flags & VM_MAYWRITE
    return (id(vma.file), os.O_RDWR if writable else os.O_RDONLY)


def _send_mapped_files(stub, transport, mm, segments, open_file) -> dict:
    """The files and segments the VMAs map, handed to the stub in one message (one injected
    recvmsg for them all): {_file_key: fd number in the stub}."""
    openers = {}
    for vma in mm.vmas:
        if vma.name in SPECIAL_MAPPINGS or (vma.shmem is None and vma.file is None):
            continue
        key = _file_key(vma)
        if key not in openers:
            openers[key] = ((lambda v=vma: segments.fd_for(v.shmem)) if vma.shmem is not None
                            else (lambda v=vma, mode=key[1]: open_file(v.file, mode)))
    keys = list(openers)
    out = {}
    for i in range(0, len(keys), MAX_FDS_PER_SEND):
        part = keys[i:i + MAX_FDS_PER_SEND]
        got = transport.send_many(stub, [openers[k]() for k in part],
                                  f"{len(part)} mapped files and segments")
        out.update(zip(part, got))
    return out


def _stub_fd(stub, transport, cache, key, opener, what) -> int:
    """The stub's fd for ``key`` (sent once per process; ``opener()`` gives the restorer's)."""
    if key is not None and key in cache:
        return cache[key]
    fd = transport.send(stub, opener(), what)
    if key is not None:
        cache[key] = fd
    return fd


def _size(r) -> str:
    return "none" if r is None else f"{(r[1] - r[0]) // PAGE} pages"


def _describe(vma) -> str:
    what = vma.name or (vma.file.path if vma.file is not None else "anonymous")
    return f"VMA {vma.start:#x}-{vma.end:#x} ({what})"

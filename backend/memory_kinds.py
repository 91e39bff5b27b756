"""Which kind of VMA a /proc maps or smaps entry is, for the memory dump (part of
backend/memory.py; every name here is importable from backend.memory too).

    classify(vma) -> VmaClass(kind, reason)      the kind, and why an UNSUPPORTED one is
    describe(vma) -> str                         "0x..-0x.. rw-p /path" for messages
    dump_kinds() -> frozenset                    the kinds that have pages to save
"""
from __future__ import annotations

import re
from typing import NamedTuple

from backend.proc import Mapping, SmapsEntry

class VmaKind:
    ANON_PRIVATE = "anon_private"
    ANON_SHARED = "anon_shared"         # MAP_SHARED|MAP_ANONYMOUS, /dev/zero shared: shmem
    SYSV_SHM = "sysv_shm"               # a SysV shared memory segment attached with shmat
    FILE_PRIVATE = "file_private"
    FILE_SHARED = "file_shared"
    STACK = "stack"                     # [stack]: anonymous private, grows down
    HEAP = "heap"                       # [heap]: anonymous private, the brk area
    VDSO = "vdso"
    VVAR = "vvar"
    VVAR_VCLOCK = "vvar_vclock"
    VSYSCALL = "vsyscall"
    UNSUPPORTED = "unsupported"


class VmaClass(NamedTuple):
    kind: str
    reason: str = ""                    # why it is unsupported ("" otherwise)


_SPECIAL = {"[vdso]": VmaKind.VDSO, "[vvar]": VmaKind.VVAR,
            "[vvar_vclock]": VmaKind.VVAR_VCLOCK, "[vsyscall]": VmaKind.VSYSCALL,
            "[stack]": VmaKind.STACK, "[heap]": VmaKind.HEAP}
# smaps VmFlags that make a VMA impossible to save (and why)
_UNSUPPORTED_FLAGS = {"io": "VM_IO (memory-mapped I/O)", "pf": "VM_PFNMAP (raw page frames)",
                      "ht": "hugetlb pages", "mm": "VM_MIXEDMAP (driver pages)"}
_SYSV = re.compile(r"^/SYSV[0-9a-f]{8}$")

# the kinds whose pages are saved, and those whose missing pages read back as zeros
_PRIVATE_DUMPED = frozenset({VmaKind.ANON_PRIVATE, VmaKind.STACK, VmaKind.HEAP,
                             VmaKind.FILE_PRIVATE})
_SHARED_DUMPED = frozenset({VmaKind.ANON_SHARED, VmaKind.SYSV_SHM})
_ZERO_FILLED = frozenset({VmaKind.ANON_PRIVATE, VmaKind.STACK, VmaKind.HEAP,
                          VmaKind.ANON_SHARED, VmaKind.SYSV_SHM})


def dump_kinds() -> frozenset[str]:
    """The kinds whose pages ``pages_to_dump`` returns (the others have none to save)."""
    return _PRIVATE_DUMPED | _SHARED_DUMPED


def _mapping(vma) -> Mapping:
    return vma.mapping if isinstance(vma, SmapsEntry) else vma


def describe(vma) -> str:
    """``0x7f..-0x7f.. rw-p /path`` for messages."""
    m = _mapping(vma)
    return f"{m.start:#x}-{m.end:#x} {m.perms} {m.path or '[anon]'}".rstrip()


def classify(vma) -> VmaClass:
    """The kind of a VMA from ``backend.proc.read_maps`` (a Mapping) or ``read_smaps`` (a
    SmapsEntry: only that one knows the VmFlags, so only it can say VM_IO, VM_PFNMAP or
    hugetlb; a plain Mapping of a device file or hugetlbfs is still caught by its path)."""
    m = _mapping(vma)
    flags = vma.vm_flags if isinstance(vma, SmapsEntry) else frozenset()
    path = m.path
    if path in _SPECIAL:                # [vvar] is VM_IO|VM_PFNMAP, yet a known special
        return VmaClass(_SPECIAL[path])
    for flag, why in _UNSUPPORTED_FLAGS.items():
        if flag in flags:
            return VmaClass(VmaKind.UNSUPPORTED, why)
    if path.startswith("[anon_shmem:"):
        return VmaClass(VmaKind.ANON_SHARED)
    if path.startswith("[anon:") or path == "":
        if m.inode == 0:
            return VmaClass(VmaKind.ANON_SHARED if m.shared else VmaKind.ANON_PRIVATE)
    if path.startswith("["):
        return VmaClass(VmaKind.UNSUPPORTED, f"unknown special mapping {path}")
    if m.shared and m.deleted and m.dev[0] == 0 and path == "/dev/zero":
        return VmaClass(VmaKind.ANON_SHARED)
    if m.dev[0] == 0 and _SYSV.match(path) and m.deleted:
        return VmaClass(VmaKind.SYSV_SHM if m.shared else VmaKind.UNSUPPORTED,
                        "" if m.shared else "private SysV segment")
    if path.startswith("/dev/") and not m.deleted and path != "/dev/zero":
        # a device's mmap (fb, dri, uio...): its pages belong to the driver
        return VmaClass(VmaKind.UNSUPPORTED, f"mapping of device file {path}")
    if m.inode == 0:
        return VmaClass(VmaKind.UNSUPPORTED, f"anonymous-inode mapping {path!r}")
    return VmaClass(VmaKind.FILE_SHARED if m.shared else VmaKind.FILE_PRIVATE)

"""/proc/PID/maps and /proc/PID/smaps as typed entries (part of the backend/proc.py readers;
every name here is importable from backend.proc too).

    read_maps(pid) -> list[Mapping]         /proc/PID/maps
    read_smaps(pid) -> list[SmapsEntry]     /proc/PID/smaps
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

from backend.proc_base import _DELETED, _read_text, _unescape_octal
from ckptsim.threads import Background

SPECIAL_MAPPINGS = frozenset({"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]",
                              "[stack]", "[heap]", "[uprobes]"})


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps. ``path`` is "" for an anonymous mapping, the bracketed name
    for a special one ("[vdso]", "[heap]", "[anon:NAME]"...), the file's path otherwise with
    the " (deleted)" suffix removed (``deleted`` says it was there)."""
    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int
    path: str
    deleted: bool = False

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def special(self) -> bool:
        """A kernel-named mapping ("[vdso]", "[stack]"...), not a file and not plain anon."""
        return self.path.startswith("[") and self.path.endswith("]")

    @property
    def anonymous(self) -> bool:
        return self.inode == 0 and (self.path == "" or self.special)

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end


_MAPS_LINE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) ([-r][-w][-x][-sp]) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+) ?(.*)$")


def parse_maps_line(line: str) -> Mapping:
    m = _MAPS_LINE.match(line)
    if not m:
        raise ValueError(f"malformed /proc maps line: {line[:120]!r}")
    path = m.group(8).lstrip(" ")
    deleted = False
    if path.endswith(_DELETED) and not path.startswith("["):
        path = path[:-len(_DELETED)]
        deleted = True
    path = _unescape_octal(path)
    return Mapping(start=int(m.group(1), 16), end=int(m.group(2), 16), perms=m.group(3),
                   offset=int(m.group(4), 16), dev=(int(m.group(5), 16), int(m.group(6), 16)),
                   inode=int(m.group(7)), path=path, deleted=deleted)


def parse_maps(text: str) -> list[Mapping]:
    return [parse_maps_line(ln) for ln in text.splitlines() if ln]


def read_maps(pid: int) -> list[Mapping]:
    """The VMAs of ``pid`` in address order (empty for a zombie or a kernel thread)."""
    return parse_maps(_read_text(pid, "maps"))


# smaps keys (values in kB) -> SmapsEntry fields (in bytes)
_SMAPS_KB = {
    "Size": "size", "KernelPageSize": "kernel_page_size", "MMUPageSize": "mmu_page_size",
    "Rss": "rss", "Pss": "pss", "Pss_Dirty": "pss_dirty",
    "Shared_Clean": "shared_clean", "Shared_Dirty": "shared_dirty",
    "Private_Clean": "private_clean", "Private_Dirty": "private_dirty",
    "Referenced": "referenced", "Anonymous": "anonymous", "KSM": "ksm", "LazyFree": "lazy_free",
    "AnonHugePages": "anon_huge_pages", "ShmemPmdMapped": "shmem_pmd_mapped",
    "FilePmdMapped": "file_pmd_mapped", "Shared_Hugetlb": "shared_hugetlb",
    "Private_Hugetlb": "private_hugetlb", "Swap": "swap", "SwapPss": "swap_pss",
    "Locked": "locked",
}


@dataclass(frozen=True)
class SmapsEntry:
    """One VMA of /proc/PID/smaps: its maps line, the sizes (in bytes, converted from the
    kernel's kB) and ``vm_flags``, the two-letter VmFlags mnemonics ("rd", "wr", "mr", "sd"...)."""
    mapping: Mapping
    size: int = 0
    kernel_page_size: int = 0
    mmu_page_size: int = 0
    rss: int = 0
    pss: int = 0
    pss_dirty: int = 0
    shared_clean: int = 0
    shared_dirty: int = 0
    private_clean: int = 0
    private_dirty: int = 0
    referenced: int = 0
    anonymous: int = 0
    ksm: int = 0
    lazy_free: int = 0
    anon_huge_pages: int = 0
    shmem_pmd_mapped: int = 0
    file_pmd_mapped: int = 0
    shared_hugetlb: int = 0
    private_hugetlb: int = 0
    swap: int = 0
    swap_pss: int = 0
    locked: int = 0
    thp_eligible: bool = False
    protection_key: int | None = None
    vm_flags: frozenset[str] = field(default_factory=frozenset)

    # convenient pass-throughs
    @property
    def start(self) -> int:
        return self.mapping.start

    @property
    def end(self) -> int:
        return self.mapping.end

    @property
    def path(self) -> str:
        return self.mapping.path


_HEADER_FIRST = frozenset("0123456789abcdef")    # a VMA line; keys start with a capital


def parse_smaps(text: str) -> list[SmapsEntry]:
    """Parse /proc/PID/smaps. A VMA's maps line is told from its "Key: value" lines by the
    first character (a hex digit against a capital letter), so only the maps lines go
    through the regular expression."""
    out: list[SmapsEntry] = []
    cur: Mapping | None = None
    vals: dict = {}
    kb = _SMAPS_KB
    for line in text.splitlines():
        if not line:
            continue
        if line[0] in _HEADER_FIRST:
            if cur is not None:
                out.append(SmapsEntry(mapping=cur, **vals))
            cur = parse_maps_line(line)
            vals = {}
            continue
        key, sep, v = line.partition(":")
        if not sep or cur is None:
            raise ValueError(f"malformed /proc smaps line: {line[:120]!r}")
        field_name = kb.get(key)
        if field_name is not None:
            num, _, unit = v.strip().partition(" ")
            n = int(num)
            vals[field_name] = n * 1024 if unit == "kB" else n
        elif key == "VmFlags":
            vals["vm_flags"] = frozenset(v.split())
        elif key == "THPeligible":
            vals["thp_eligible"] = v.strip() not in ("0", "")
        elif key == "ProtectionKey":
            vals["protection_key"] = int(v)
        # other keys (new kernels add some) are ignored
    if cur is not None:
        out.append(SmapsEntry(mapping=cur, **vals))
    return out


def read_smaps(pid: int) -> list[SmapsEntry]:
    return parse_smaps(_read_text(pid, "smaps"))


_NEXT_HEAD = re.compile(r"\n[0-9a-f]")


def parse_smaps_flags(text: str) -> list[SmapsEntry]:
    """parse_smaps keeping only the maps lines and VmFlags (the sizes stay 0). Every VMA's
    block ends with its VmFlags line, so splitting at "VmFlags:" gives each VMA's block (its
    maps line, then its keys) and its flags without a Python step per size line (~25 per
    VMA). A text where that does not hold (a VMA without VmFlags: an older kernel) goes
    through parse_smaps."""
    parts = text.split("\nVmFlags:")
    if len(parts) < 2:
        return parse_smaps(text)
    out: list[SmapsEntry] = []
    block = parts[0]
    for part in parts[1:]:
        eol = block.find("\n")
        head = block if eol < 0 else block[:eol]
        if head[:1] not in _HEADER_FIRST or (eol >= 0 and _NEXT_HEAD.search(block, eol)):
            return parse_smaps(text)    # not one maps line and its keys: the full parser judges
        eol = part.find("\n")
        flags, block = (part, "") if eol < 0 else (part[:eol], part[eol + 1:])
        out.append(SmapsEntry(mapping=parse_maps_line(head), vm_flags=frozenset(flags.split())))
    if block.strip():
        return parse_smaps(text)        # a VMA after the last VmFlags: it has none
    return out


def read_smaps_flags(pid: int) -> list[SmapsEntry]:
    """The VMAs of ``pid`` with their VmFlags, sizes not parsed (see parse_smaps_flags)."""
    return parse_smaps_flags(_read_text(pid, "smaps"))


def read_smaps_flags_ahead(pid: int):
    """read_smaps_flags(pid) begun now on a helper thread (the kernel's page-table walk that
    makes smaps takes ~1.5 ms at 64 MiB, ~15 ms at 1 GiB, with the GIL released) while the
    caller reads the rest; returns a function that gives its result (or raises its error).
    If the helper has not begun by then (its CPU still waking up), the caller reads it
    itself. The caller must not change the mm meanwhile."""
    box: dict = {}
    claim, done = threading.Lock(), threading.Event()

    def run() -> None:
        if not claim.acquire(blocking=False):
            return                      # taken back by the caller
        try:
            box["text"] = _read_text(pid, "smaps")
        except BaseException as e:      # raised by the caller's result()
            box["error"] = e
        finally:
            done.set()
    Background(run, name=f"ckptsim-smaps-{pid}")

    def result() -> list[SmapsEntry]:
        if claim.acquire(blocking=False):
            return read_smaps_flags(pid)
        done.wait()
        if "error" in box:
            raise box["error"]
        return parse_smaps_flags(box["text"])
    return result

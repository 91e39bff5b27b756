"""Shared helpers of the memory scenarios (see memory.py for how they check)."""
import errno

from ..dsl import *  # noqa: F401,F403

U64 = (1 << 64) - 1
EFAULT = (-errno.EFAULT) & U64
ENOMEM = (-errno.ENOMEM) & U64
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MAP_FIXED_NOREPLACE = 0x100000
MAP_PRIVATE_FIXED = MAP_PRIVATE | MAP_FIXED
MAP_SHARED_FIXED = MAP_SHARED | MAP_FIXED
ANON_PRIVATE_FIXED = MAP_PRIVATE_ANON | MAP_FIXED
ANON_SHARED_FIXED = MAP_SHARED_ANON | MAP_FIXED

A = 0x10000000          # the scenario's main mapping
B = 0x11000000          # a second one
C = 0x12000000          # a move target
SCRATCH = 0x1F000000    # one private page for reading files and pipes into

PROBE_PATH, PROBE_TEXT = "/data/probe", "PROBE"
PROBE_FILE = ((PROBE_PATH, PROBE_TEXT),)


def file_pages(tag: str, n: int) -> str:
    """n pages of text: page i starts with '<tag>-p<i>' and is filled with one letter."""
    return "".join(f"{tag}-p{i}".ljust(PAGE, "abcdefghij"[i % 10]) for i in range(n))


def page_of(text: str, i: int, length: int = 16) -> str:
    return text[i * PAGE:i * PAGE + length]


def zeros(n: int = 32) -> str:
    return "\0" * n


class Mem:
    """Protection probes sharing one result register (a program has only 14)."""

    def __init__(self, p: Program, probe: bool = True):
        self.p = p
        self.r = p.reg()
        self.fd = p.open(PROBE_PATH, O_RDWR, 0) if probe else None

    def call(self, name: str, *args) -> Reg:
        self.p.raw(self.r, name, *args)
        return self.r

    def ok(self, name: str, *args, want=0, label: str) -> None:
        """Call and check the result (0, or ``want``)."""
        self.p.check(self.call(name, *args), "==", want, label)

    def writable(self, addr: int, label: str) -> None:
        """A read from the probe file into addr works (and overwrites 5 bytes there)."""
        self.p.check(self.call("pread", self.fd, addr, len(PROBE_TEXT), 0), "==", len(PROBE_TEXT),
                     f"{label}: writable")
        self.p.check_mem(addr, PROBE_TEXT, f"{label}: read into")

    def read_only(self, addr: int, label: str) -> None:
        got = self.call("pread", self.fd, addr, 1, 0)
        self.p.check(got, "==", EFAULT, f"{label}: not writable")

    def unreadable(self, addr: int, label: str) -> None:
        got = self.call("pwrite", self.fd, addr, 1, 64)
        self.p.check(got, "==", EFAULT, f"{label}: not readable")

    def unmapped(self, addr: int, length: int, label: str) -> None:
        got = self.call("mprotect", addr, length, PROT_READ)
        self.p.check(got, "==", ENOMEM, f"{label}: unmapped")

    def file_has(self, fd, offset: int, text: str, label: str) -> None:
        """pread len(text) bytes of fd at offset into SCRATCH and compare."""
        n = len(text.encode())
        self.p.check(self.call("pread", fd, SCRATCH, n, offset), "==", n, f"{label}: byte count")
        self.p.check_mem(SCRATCH, text, label)


def scratch(p: Program) -> None:
    p.do("mmap", SCRATCH, PAGE, PROT_RW, ANON_PRIVATE_FIXED)

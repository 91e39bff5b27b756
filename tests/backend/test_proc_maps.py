"""backend.proc_maps (/proc/PID/maps and smaps, also importable from backend.proc) against
mappings this process makes with known addresses."""
from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os

import pytest

from backend import proc, proc_maps

PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@pytest.fixture
def mapper(request):
    """mmap(2) through libc so the test knows the exact address; unmapped at teardown."""
    maps: list[tuple[int, int]] = []

    def do(size, prot, flags, fd=-1, offset=0):
        addr = _libc.mmap(None, size, prot, flags, fd, offset)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        maps.append((addr, size))
        return addr

    def fin():
        for addr, size in maps:
            _libc.munmap(addr, size)
    request.addfinalizer(fin)
    return do


def _covering(maps, addr, size):
    hits = [m for m in maps if m.start <= addr and addr + size <= m.end]
    assert len(hits) == 1, f"no single mapping covers {addr:#x}+{size:#x}"
    return hits[0]


def test_maps_show_our_mappings_with_their_perms(mapper, tmp_path):
    anon = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    ro = mapper(3 * PAGE, mmap.PROT_READ, anon)
    rw = mapper(5 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, anon)
    rx = mapper(2 * PAGE, mmap.PROT_READ | mmap.PROT_EXEC, anon)
    shm = mapper(4 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    path = tmp_path / "file with spaces"
    path.write_bytes(b"x" * 8 * PAGE)
    fd = os.open(path, os.O_RDONLY)
    try:
        fmap = mapper(2 * PAGE, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 3 * PAGE)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    gone = tmp_path / "unlinked"
    gone.write_bytes(b"y" * PAGE)
    fd = os.open(gone, os.O_RDWR)
    try:
        gmap = mapper(PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd)
    finally:
        os.close(fd)
    os.unlink(gone)

    maps = proc.read_maps(os.getpid())
    assert [m.start for m in maps] == sorted(m.start for m in maps)
    assert _covering(maps, ro, 3 * PAGE).perms == "r--p"
    m = _covering(maps, rw, 5 * PAGE)
    assert m.perms == "rw-p" and m.writable and not m.shared and m.anonymous
    assert _covering(maps, rx, 2 * PAGE).perms == "r-xp"
    m = _covering(maps, shm, 4 * PAGE)
    assert (m.start, m.end, m.perms) == (shm, shm + 4 * PAGE, "rw-s")
    assert m.path == "/dev/zero" and m.deleted and m.inode != 0
    m = _covering(maps, fmap, 2 * PAGE)
    assert (m.start, m.end, m.perms, m.offset) == (fmap, fmap + 2 * PAGE, "r--p", 3 * PAGE)
    assert m.path == str(path) and not m.deleted
    assert m.inode == st.st_ino and m.dev == (os.major(st.st_dev), os.minor(st.st_dev))
    m = _covering(maps, gmap, PAGE)
    assert m.path == str(gone) and m.deleted and m.perms == "rw-s"


def test_special_mappings_are_named():
    maps = proc.read_maps(os.getpid())
    names = {m.path for m in maps if m.special}
    assert {"[vdso]", "[stack]"} <= names
    stack = next(m for m in maps if m.path == "[stack]")
    assert stack.contains(ctypes.addressof(ctypes.c_int())) or stack.size > 0
    vdso = next(m for m in maps if m.path == "[vdso]")
    assert vdso.executable and vdso.inode == 0 and vdso.anonymous
    # the layout machine-facts.md describes: [vvar], [vvar_vclock] when present, then [vdso]
    specials = [m for m in maps if m.path in ("[vvar]", "[vvar_vclock]", "[vdso]")]
    assert [m.path for m in specials][-1] == "[vdso]"
    for a, b in zip(specials, specials[1:]):
        assert a.end == b.start


def test_parse_maps_lines():
    lines = [
        "7ffd1000-7ffd3000 r--p 00000000 00:00 0                          [vvar_vclock]",
        "55d0c000-55d0e000 rw-p 00001000 fe:01 1234                       /opt/a b/lib (deleted)",
        "7f000000-7f001000 ---p 00000000 00:00 0 ",
        "7f001000-7f002000 rw-s 00000000 00:01 99                         /memfd:buf (deleted)",
        "7f002000-7f003000 r--p 00000000 fe:01 7                          /tmp/new\\012line",
    ]
    m = proc.parse_maps("\n".join(lines) + "\n")
    assert m[0].path == "[vvar_vclock]" and m[0].special and not m[0].deleted
    assert (m[1].path, m[1].deleted, m[1].dev, m[1].inode, m[1].offset) == \
        ("/opt/a b/lib", True, (0xfe, 1), 1234, 0x1000)
    assert m[2].path == "" and m[2].perms == "---p" and m[2].anonymous
    assert (m[3].path, m[3].deleted, m[3].shared) == ("/memfd:buf", True, True)
    assert m[4].path == "/tmp/new\nline"
    with pytest.raises(ValueError, match="malformed"):
        proc.parse_maps("not a maps line\n")


def test_smaps_sizes_and_vmflags(mapper):
    anon = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    rw = mapper(6 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, anon)
    ro = mapper(2 * PAGE, mmap.PROT_READ, anon)
    for i in (0, 2, 5):                       # touch three of the six pages
        ctypes.c_char.from_address(rw + i * PAGE).value = b"z"
    sm = proc.read_smaps(os.getpid())
    maps = proc.read_maps(os.getpid())   # other threads may map memory meanwhile: compare ours
    assert [e.mapping for e in sm] == sorted((e.mapping for e in sm), key=lambda m: m.start)
    m = _covering([x.mapping for x in sm], rw, 6 * PAGE)
    # an anonymous neighbour mapped meanwhile by another thread (xdist's) may merge into
    # ours between the two reads: the same kind of mapping covers it, its bounds may differ
    same = lambda a, b: (a.perms, a.path, a.inode) == (b.perms, b.path, b.inode)  # noqa: E731
    assert same(m, _covering(maps, rw, 6 * PAGE))
    assert same(_covering([x.mapping for x in sm], ro, 2 * PAGE), _covering(maps, ro, 2 * PAGE))
    e = next(x for x in sm if x.mapping == m)
    if e.size == 6 * PAGE:                    # not merged with a neighbour
        assert e.rss == e.anonymous == e.private_dirty == 3 * PAGE
    else:
        assert e.anonymous >= 3 * PAGE
    assert {"rd", "wr", "mr", "mw"} <= e.vm_flags and "ex" not in e.vm_flags
    assert e.swap == 0 and e.kernel_page_size == PAGE
    e2 = next(x for x in sm if x.mapping.start <= ro < x.mapping.end)
    assert "rd" in e2.vm_flags and "wr" not in e2.vm_flags and e2.rss == 0
    vdso = next(x for x in sm if x.path == "[vdso]")
    assert "ex" in vdso.vm_flags


def test_parse_smaps_fields_unknown_keys_and_bad_lines():
    text = """\
00400000-00452000 r-xp 00000000 08:02 173521    /usr/bin/dbus-daemon
Size:                328 kB
Rss:                 300 kB
Private_Dirty:         8 kB
NewKeyOfALaterKernel:  5 kB
THPeligible:    0
ProtectionKey:         3
VmFlags: rd ex mr mw me dw
7ffd1000-7ffd3000 rw-p 00000000 00:00 0          [stack]
Size:                  8 kB
Swap:                  4 kB
THPeligible:    1
VmFlags: rd wr mr mw me gd ac
"""
    a, b = proc.parse_smaps(text)
    assert a.mapping == proc.parse_maps_line(text.splitlines()[0])
    assert (a.size, a.rss, a.private_dirty, a.swap) == (328 * 1024, 300 * 1024, 8192, 0)
    assert not a.thp_eligible and a.protection_key == 3
    assert a.vm_flags == {"rd", "ex", "mr", "mw", "me", "dw"}
    assert b.path == "[stack]" and b.size == 8192 and b.swap == 4096 and b.thp_eligible
    assert b.protection_key is None and "gd" in b.vm_flags
    with pytest.raises(ValueError, match="malformed /proc smaps line"):
        proc.parse_smaps("Size: 4 kB\n")                 # a key before any VMA
    with pytest.raises(ValueError, match="malformed /proc smaps line"):
        proc.parse_smaps(text + "no colon here\n")


def test_parse_smaps_of_this_process_agrees_with_maps():
    """Every entry's maps line is the one read_maps gives for the same text."""
    text = open(f"/proc/{os.getpid()}/smaps").read()
    entries = proc_maps.parse_smaps(text)
    headers = [line for line in text.splitlines() if line[:1] in "0123456789abcdef" and line]
    assert [e.mapping for e in entries] == [proc.parse_maps_line(h) for h in headers]
    assert all(dataclasses.asdict(e)["size"] == e.mapping.size for e in entries)


def test_parse_smaps_flags_gives_parse_smaps_maps_lines_and_flags():
    """The checkpoint's fast parse: same VMAs and VmFlags as parse_smaps, on this process and
    on texts it must hand to parse_smaps (no VmFlags at all, a VMA missing its VmFlags)."""
    def key(entries):
        return [(e.mapping, e.vm_flags) for e in entries]
    text = open(f"/proc/{os.getpid()}/smaps").read()
    fast = proc.parse_smaps_flags(text)
    assert len(fast) > 10 and key(fast) == key(proc_maps.parse_smaps(text))
    assert all(e.size == 0 and e.rss == 0 for e in fast)            # sizes are not parsed
    one = ("7ffd1000-7ffd3000 rw-p 00000000 00:00 0          [stack]\nSize:  8 kB\n"
           "VmFlags: rd wr mr mw me gd ac\n")
    no_flags = "00400000-00452000 r-xp 00000000 08:02 173521    /usr/bin/x\nSize:  8 kB\n"
    for odd in (no_flags, no_flags + one, one + no_flags, one + one.replace("7ffd", "7ffe")):
        assert key(proc.parse_smaps_flags(odd)) == key(proc_maps.parse_smaps(odd))
    assert proc.parse_smaps_flags(no_flags + one)[0].vm_flags == frozenset()
    with pytest.raises(ValueError, match="malformed /proc"):
        proc.parse_smaps_flags("garbage\nVmFlags: rd\n")

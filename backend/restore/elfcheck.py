"""Before a live restart creates anything: do the image's executables and vdso still fit here?

A restored process's saved memory holds return addresses and pointers into the code of its
mapped executable files and into the vdso. The files are mapped again from their paths, and
the vdso is this kernel's, so the restart is refused when:
  - a file the image recorded (kinds/memory.py FILE_ID: the executable and every file mapped
    with PROT_EXEC) now has another build id, or another SHA-256 for a file that had no build
    id, or is gone (ESTALE, naming the file and both identities);
  - this kernel's vdso (the restorer's own, read from /proc/self/maps and parsed with
    pyelftools; every process this kernel starts gets the same) differs from the image's in a
    way saved code would notice: another size of [vvar], [vvar_vclock] or [vdso], or an
    exported symbol the image recorded that is missing here or at another offset (ENOEXEC).
A vdso with the same symbols at the same offsets but other bytes (another build id) is
accepted with a log line. Images without these records (the model's) are not checked.

File identities are cached by file (backend/elf_ids.py), so a restart of many processes that
map the same libc reads its notes once; within one restart each (path, identity) is checked
once whatever the number of processes.

The common case is checked without pyelftools (whose parse costs ~3 ms a file, a third of a
small restart): a build id is read from the PT_NOTE segments with a few preads (the notes as
pyelftools walks them: 4-byte aligned), and this kernel's vdso layout is read from its
.dynsym with struct (the symbols elf_ids keeps, in its order). Anything else (no build id
there, not ELF64, no .dynsym) takes the full path through elf_ids.
"""
from __future__ import annotations

import errno
import os
import stat
import struct

from backend import elf_ids
from ckptsim.kinds.memory import ID_BUILD_ID, FileIdentity, VdsoLayout
from .stub import StubError

_ELF64_LE = b"\x7fELF\x02\x01"
_PHDR = struct.Struct("<IIQQQQQQ")       # Elf64_Phdr
_PT_NOTE = 4
_PT_LOAD = 1
_SHDR = struct.Struct("<IIQQQQIIQQ")     # Elf64_Shdr
_SYM = struct.Struct("<IBBHQQ")          # Elf64_Sym
_SHT_DYNSYM = 11
_SHN_UNDEF, _SHN_ABS = 0, 0xFFF1
_STB_GLOBAL, _STB_WEAK = 1, 2
_NT_GNU_BUILD_ID = 3
_NOTE_BYTES_MAX = 1 << 16
_SPECIALS = ("[vvar]", "[vvar_vclock]", "[vdso]")


def verify(tasks, log=None) -> None:
    """Refuse (StubError) the restart of ``tasks`` (the model tasks restored from the image)
    if a recorded executable file or the vdso layout no longer matches; ``log(line)``."""
    say = log or (lambda line: None)
    mms = list({id(t.mm): t.mm for t in tasks if t.state != "zombie" and t.mm is not None}
               .values())
    checked: set[tuple[str, FileIdentity]] = set()
    for mm in mms:
        for file, recorded in getattr(mm, "file_ids", {}).items():
            if file.inode is not None and file.inode.nlink == 0:
                continue                  # an unlinked file: recreated from the image
            if (file.path, recorded) not in checked:
                _check_file(file.path, recorded)
                checked.add((file.path, recorded))
    if checked:
        say(f"elfcheck: {len(checked)} executable files match the image")
    layouts = list(dict.fromkeys(mm.vdso_layout for mm in mms
                                 if getattr(mm, "vdso_layout", None) is not None))
    if layouts:
        here = own_vdso_layout()
        if here is None:
            raise StubError(errno.ENOEXEC, "vdso: this kernel maps no [vdso], the image's "
                                           "processes had one and their saved code calls into it")
        for recorded in layouts:
            check_vdso(recorded, here, say)


def _check_file(path: str, recorded: FileIdentity) -> None:
    what = "build id" if recorded.kind == ID_BUILD_ID else "SHA-256"
    try:
        now = _quick_identity(path) if recorded.kind == ID_BUILD_ID else None
        if now is None:
            now = elf_ids.identity_of(path, recorded.kind, f"executable mapping {path}")
    except OSError as e:
        raise StubError(errno.ESTALE, f"{path}: the image maps it executable "
                                      f"({recorded.describe()}) but it cannot be read here: "
                                      f"{e.strerror}") from None
    if now is None:
        raise StubError(errno.ESTALE, f"{path} has no build id now, the image recorded "
                                      f"{recorded.describe()}: the file changed since the "
                                      "checkpoint")
    if now.value != recorded.value:
        raise StubError(errno.ESTALE, f"{path}: its {what} is {now.value.hex()} now, the image "
                                      f"recorded {recorded.value.hex()} (size {recorded.size}, "
                                      f"now {now.size}): the file changed since the checkpoint")


def check_vdso(recorded: VdsoLayout, here: VdsoLayout, log) -> None:
    """Refuse (ENOEXEC) a vdso layout ``here`` that the image's ``recorded`` one cannot use."""
    for name, size in recorded.sizes.items():
        if here.sizes[name] != size:
            raise StubError(errno.ENOEXEC, f"vdso: this kernel's {name} is {here.sizes[name]:#x} "
                                           f"bytes, the image's {size:#x}: its vdso layout "
                                           "differs and saved code calls into it")
    offsets = here.offsets
    for name, offset, _ in recorded.symbols:
        if name not in offsets:
            raise StubError(errno.ENOEXEC, f"vdso: symbol {name} (offset {offset:#x} in the "
                                           "image) is missing from this kernel's vdso")
        if offsets[name] != offset:
            raise StubError(errno.ENOEXEC, f"vdso: symbol {name} is at offset "
                                           f"{offsets[name]:#x} here, at {offset:#x} in the "
                                           "image: saved code would call the wrong place")
    if here.build_id != recorded.build_id:
        log(f"elfcheck: this kernel's vdso (build id {here.build_id.hex() or 'none'}) differs "
            f"from the image's ({recorded.build_id.hex() or 'none'}) but exports the same "
            f"{len(recorded.symbols)} symbols at the same offsets: restarting")


def build_id_in(read, size: int) -> bytes | None:
    """The NT_GNU_BUILD_ID note of an ELF64 little-endian image, found in its PT_NOTE
    segments; ``read(offset, n)`` gives its bytes, ``size`` its length. None when it is not
    there or the image is anything else (malformed, another class): the caller then asks
    elf_ids, which also looks at the section headers."""
    head = read(0, 64)
    if len(head) < 64 or head[:6] != _ELF64_LE:
        return None
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    if phentsize != _PHDR.size or not 0 < phnum < 256 or phoff + phnum * phentsize > size:
        return None
    table = read(phoff, phnum * phentsize)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz, _, _ = _PHDR.unpack_from(table, i * phentsize)
        if p_type != _PT_NOTE or p_filesz > _NOTE_BYTES_MAX or p_offset + p_filesz > size:
            continue
        notes, pos = read(p_offset, p_filesz), 0
        while pos + 12 <= len(notes):
            namesz, descsz, n_type = struct.unpack_from("<III", notes, pos)
            name_at = pos + 12
            desc_at = name_at + (namesz + 3) // 4 * 4
            if desc_at + descsz > len(notes):
                break
            if n_type == _NT_GNU_BUILD_ID and \
                    notes[name_at:name_at + namesz].split(b"\0", 1)[0] == b"GNU":
                return bytes(notes[desc_at:desc_at + descsz]) or None
            pos = desc_at + (descsz + 3) // 4 * 4
    return None


def _quick_identity(path: str) -> FileIdentity | None:
    """The build-id identity of the regular file at ``path`` without pyelftools, or None
    (see build_id_in). OSError if it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        build_id = build_id_in(lambda offset, n: os.pread(fd, n, offset), st.st_size)
    finally:
        os.close(fd)
    if build_id is None:
        return None
    return FileIdentity(ID_BUILD_ID, build_id, st.st_size, st.st_mtime_ns)


def own_vdso_layout() -> VdsoLayout | None:
    """elf_ids.own_vdso_layout(), read without pyelftools when the vdso is plain ELF64."""
    sizes: dict[str, int] = {}
    vdso = None
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(_SPECIALS):
                span, name = line.split()[0], line.split()[-1]
                start, end = (int(x, 16) for x in span.split("-"))
                sizes[name] = end - start
                vdso = (start, end) if name == "[vdso]" else vdso
    if vdso is None:
        return elf_ids.own_vdso_layout()
    fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, vdso[1] - vdso[0], vdso[0])
    finally:
        os.close(fd)
    symbols = _dynamic_symbols(data)
    if symbols is None:
        return elf_ids.own_vdso_layout()
    return VdsoLayout(sizes.get("[vvar]", 0), sizes.get("[vvar_vclock]", 0), len(data),
                      build_id_in(lambda offset, n: data[offset:offset + n], len(data)) or b"",
                      symbols)


def _dynamic_symbols(data: bytes) -> tuple | None:
    """(name, offset from the lowest PT_LOAD address, size) of the defined global and weak
    symbols of the first SHT_DYNSYM of the ELF64 image ``data``, first of each name, as
    elf_ids.vdso_layout_of lists them; None when the image is not that plain."""
    if data[:6] != _ELF64_LE or len(data) < 64:
        return None
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    if phentsize != _PHDR.size or shentsize != _SHDR.size or \
            phoff + phnum * phentsize > len(data) or shoff + shnum * shentsize > len(data):
        return None
    loads = [_PHDR.unpack_from(data, phoff + i * phentsize)[3] for i in range(phnum)
             if _PHDR.unpack_from(data, phoff + i * phentsize)[0] == _PT_LOAD]
    sections = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    dynsym = next((sh for sh in sections if sh[1] == _SHT_DYNSYM), None)
    if not loads or dynsym is None or dynsym[6] >= shnum:
        return None
    _, _, _, _, sym_off, sym_size, link, _, _, _ = dynsym
    str_off, str_size = sections[link][4], sections[link][5]
    if sym_off + sym_size > len(data) or str_off + str_size > len(data):
        return None
    strtab = data[str_off:str_off + str_size]
    base, symbols, seen = min(loads), [], set()
    for i in range(sym_size // _SYM.size):
        st_name, st_info, _, st_shndx, st_value, st_size = \
            _SYM.unpack_from(data, sym_off + i * _SYM.size)
        end = strtab.find(b"\0", st_name)
        name = strtab[st_name:end if end >= 0 else len(strtab)].decode("latin-1")
        if not name or name in seen or st_shndx in (_SHN_UNDEF, _SHN_ABS) or \
                st_info >> 4 not in (_STB_GLOBAL, _STB_WEAK):
            continue
        seen.add(name)
        symbols.append((name, st_value - base, st_size))
    return tuple(symbols)

"""ELF identities of mapped executables and of the vdso (pyelftools), for checkpoint and restart.

A mapped executable file is identified by its ELF build id (the NT_GNU_BUILD_ID note) when it
has one, else by the SHA-256 of its contents (also for files that are not ELF at all); its
size and mtime go with it. Identities are cached by (device, inode, size, mtime, ctime), so a
checkpoint or restart of many processes reads libc's notes (or hashes a file) once.

The vdso's layout is read from its bytes (the [vdso] mapping of a target, or the restorer's
own) parsed as ELF: the build id, and the exported dynamic symbols with their offsets from the
vdso's start; the sizes of [vvar], [vvar_vclock] and [vdso] come from the maps.

Checkpoint: ``mm_identities(pid, vmas, exe_file)`` -> (file_ids, vdso layout or None).
Restart: ``identity_of(path, kind)``, ``own_vdso_layout()`` (backend/restore/elfcheck.py).
"""
from __future__ import annotations

import errno
import functools
import hashlib
import io
import os
import stat
from array import array

from elftools.common.exceptions import ELFError
from elftools.common.utils import struct_parse
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment

from ckptsim.errors import CkptsimError
from ckptsim.kinds.memory import ID_BUILD_ID, ID_SHA256, FileIdentity, VdsoLayout

from . import memory, proc, runcache

PAGE = 4096
PROT_EXEC = 4
ELF_MAGIC = b"\x7fELF"
MAX_CACHED = 4096
# pyelftools reports a malformed file with its own ELFError or with whatever its parser
# tripped over (short reads, bad offsets): any of these means "no usable ELF".
_PARSE_ERRORS = (ELFError, ValueError, KeyError, IndexError, TypeError, EOFError, AssertionError)


class ElfIdError(CkptsimError, OSError):
    """A mapped executable could not be identified; the message names it."""

    def __init__(self, err: int, message: str):
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        return self.strerror


# -- files ----------------------------------------------------------------------------------
_identities: dict[tuple, FileIdentity | None] = {}
_vdso_layouts: dict[tuple, VdsoLayout] = {}   # (SHA-256 of the vdso, vvar, vvar_vclock sizes)
_cache = {"loaded": False, "new": 0}          # the cache file's state in this process
CACHE_FILE = "elf-ids.json"                   # in backend.runcache.cache_dir()


def _load_cache() -> None:
    """Entries of the cache file join this process's cache (a checkpoint is a fresh process,
    and reading the notes of a dozen libraries with pyelftools cost it ~25 ms); a missing,
    foreign or malformed file is ignored (identities are then computed)."""
    _cache["loaded"] = True
    kept = runcache.load(CACHE_FILE)
    if kept is None:
        return
    try:
        for key, ident in kept["files"]:
            _identities.setdefault(tuple(key), None if ident is None else FileIdentity(
                ident[0], bytes.fromhex(ident[1]), ident[2], ident[3]))
        for digest, vvar, vclock, size, build_id, symbols in kept["vdso"]:
            _vdso_layouts.setdefault((digest, vvar, vclock), VdsoLayout(
                vvar, vclock, size, bytes.fromhex(build_id),
                tuple((name, offset, length) for name, offset, length in symbols)))
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        return


def save_cache() -> None:
    """Write this process's identities to the cache file (backend.runcache) if it found new
    ones. Never raises: a cache that cannot be written is only slower."""
    if not _cache["new"]:
        return
    runcache.save(CACHE_FILE, {
        "files": [[list(key), None if ident is None else
                   [ident.kind, ident.value.hex(), ident.size, ident.mtime_ns]]
                  for key, ident in _identities.items()],
        "vdso": [[digest, vvar, vclock, v.vdso_size, v.build_id.hex(),
                  [list(sym) for sym in v.symbols]]
                 for (digest, vvar, vclock), v in _vdso_layouts.items()]})
    _cache["new"] = 0


def build_id_of(f) -> bytes | None:
    """The NT_GNU_BUILD_ID of the ELF file object ``f`` (positioned anywhere), or None when
    it is not ELF, has no build id or cannot be parsed."""
    f.seek(0)
    if f.read(4) != ELF_MAGIC:
        return None
    try:
        elf = ELFFile(f)
        # PT_NOTE segments are what the loader sees; stripped files may lack section headers
        for part in (_note_segments(elf), elf.iter_sections(type="SHT_NOTE")):
            for holder in part:
                for note in holder.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                        return bytes.fromhex(note["n_desc"]) or None
    except _PARSE_ERRORS:
        return None
    return None


def _note_segments(elf: ELFFile):
    """The PT_NOTE segments. ELFFile.iter_segments builds every segment, and a PT_DYNAMIC one
    parses the dynamic section and looks through the section headers for its string table:
    ~2 ms a library, a third of a small checkpoint's gathering. Only the headers are read here."""
    phdr = elf.structs.Elf_Phdr
    for i in range(elf.num_segments()):
        header = struct_parse(phdr, elf.stream, stream_pos=elf["e_phoff"] + i * elf["e_phentsize"])
        if header["p_type"] == "PT_NOTE":
            yield NoteSegment(header, elf.stream, elf)


def _sha256(f) -> bytes:
    f.seek(0)
    return hashlib.file_digest(f, "sha256").digest()


def _compute(f, st: os.stat_result, kind: int | None) -> FileIdentity | None:
    """The identity of kind ``kind`` (None: the build id if there is one, else the hash);
    None when a build id is asked for and the file has none."""
    if kind in (None, ID_BUILD_ID):
        build_id = build_id_of(f)
        if build_id is not None:
            return FileIdentity(ID_BUILD_ID, build_id, st.st_size, st.st_mtime_ns)
        if kind == ID_BUILD_ID:
            return None
    return FileIdentity(ID_SHA256, _sha256(f), st.st_size, st.st_mtime_ns)


def identity_of(path: str, kind: int | None = None, where: str = "") -> FileIdentity | None:
    """The identity of the regular file at ``path`` (see _compute), cached by the file's
    (device, inode, size, mtime, ctime). OSError (naming ``where`` or the path) if it cannot
    be opened; ElfIdError if it is not a regular file."""
    with open(path, "rb", buffering=1 << 20) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ElfIdError(errno.EINVAL, f"{where or path}: not a regular file")
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, kind)
        if not _cache["loaded"]:
            _load_cache()
        if key in _identities:
            return _identities[key]
        ident = _compute(f, st, kind)
    if len(_identities) >= MAX_CACHED:
        _identities.clear()
    _identities[key] = ident
    _cache["new"] += 1
    if kind is None and ident is not None:     # a later check by that kind needs no reread
        _identities[key[:-1] + (ident.kind,)] = ident
    return ident


def mm_identities(pid: int, vmas, exe_file) -> tuple[dict, VdsoLayout | None]:
    """For a live mm: {LiveFile: FileIdentity} of its executable and of every file it maps
    with PROT_EXEC (a deleted file is saved by contents and needs none), each read through
    the mapping itself (/proc/PID/map_files, /proc/PID/exe), so a file replaced at its path
    since it was mapped is identified as the mapped one; and the vdso's layout."""
    sources = []
    if exe_file is not None:
        sources.append((exe_file, f"/proc/{pid}/exe"))
    sources += [(v.file, f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}") for v in vmas
                if v.file is not None and v.prot & PROT_EXEC]
    ids: dict = {}
    for file, path in sources:
        if file in ids or file.inode is not None:
            continue
        where = f"task {pid}: executable mapping of {file.path}"
        try:
            ids[file] = identity_of(path, None, where)
        except OSError as e:
            if isinstance(e, ElfIdError):
                raise
            raise ElfIdError(e.errno or errno.EIO, f"{where}: cannot be read through {path} "
                                                   f"to record its identity: {e.strerror}") from None
    vdso = _target_vdso(pid, vmas)
    save_cache()
    return ids, vdso


# -- the vdso -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def vdso_layout_of(data: bytes, vvar_size: int, vvar_vclock_size: int) -> VdsoLayout:
    """The layout of the vdso whose image is ``data`` (the whole [vdso] mapping). Raises
    ElfIdError if it is no ELF image with a dynamic symbol table."""
    try:
        elf = ELFFile(io.BytesIO(data))
        loads = [seg["p_vaddr"] for seg in elf.iter_segments(type="PT_LOAD")]
        dynsym = next(iter(elf.iter_sections(type="SHT_DYNSYM")), None)
        if not loads or dynsym is None:
            raise ElfIdError(errno.ENOEXEC, "the vdso has no PT_LOAD segment or no .dynsym")
        base = min(loads)
        symbols, seen = [], set()
        for sym in dynsym.iter_symbols():
            if not sym.name or sym.name in seen or sym["st_shndx"] in ("SHN_UNDEF", "SHN_ABS") \
                    or sym["st_info"]["bind"] not in ("STB_GLOBAL", "STB_WEAK"):
                continue
            seen.add(sym.name)
            symbols.append((sym.name, sym["st_value"] - base, sym["st_size"]))
        build_id = build_id_of(io.BytesIO(data)) or b""
    except _PARSE_ERRORS as e:
        raise ElfIdError(errno.ENOEXEC, f"the vdso cannot be parsed as ELF: {e}") from None
    return VdsoLayout(vvar_size, vvar_vclock_size, len(data), build_id, tuple(symbols))


def _special_sizes(ranges) -> dict[str, tuple[int, int]]:
    """{name: (start, end)} of the special mappings among (start, end, name) triples."""
    return {name: (start, end) for start, end, name in ranges
            if name in ("[vvar]", "[vvar_vclock]", "[vdso]")}


def _target_vdso(pid: int, vmas) -> VdsoLayout | None:
    specials = _special_sizes((v.start, v.end, v.name) for v in vmas)
    if "[vdso]" not in specials:
        return None                       # no vdso (unmapped, or vdso=0): nothing to match
    start, end = specials["[vdso]"]
    data = bytes(memory.read_pages(pid, array("Q", range(start, end, PAGE))))
    return _layout(data, specials)


def _layout(data: bytes, specials: dict) -> VdsoLayout:
    """vdso_layout_of, kept in the cache file by the vdso's digest (parsing it costs a
    checkpoint ~3-5 ms, and every process of a boot has the same)."""
    size = {name: e - s for name, (s, e) in specials.items()}
    key = (hashlib.sha256(data).hexdigest(), size.get("[vvar]", 0), size.get("[vvar_vclock]", 0))
    if not _cache["loaded"]:
        _load_cache()
    layout = _vdso_layouts.get(key)
    if layout is None or layout.vdso_size != len(data):
        layout = _vdso_layouts[key] = vdso_layout_of(data, key[1], key[2])
        _cache["new"] += 1
    return layout


@functools.cache
def own_vdso_layout() -> VdsoLayout | None:
    """This process's vdso layout (what every process this kernel starts gets), from
    /proc/self/maps and /proc/self/mem; None if the kernel maps no vdso."""
    specials = _special_sizes((m.start, m.end, m.path) for m in proc.read_maps(os.getpid()))
    if "[vdso]" not in specials:
        return None
    start, end = specials["[vdso]"]
    fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, end - start, start)
    finally:
        os.close(fd)
    return _layout(data, specials)

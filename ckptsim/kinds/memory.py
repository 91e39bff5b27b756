"""The memory kinds: address spaces ("mm") and shared anonymous segments ("shmem").

Image, after Linux-CR's ckpt_hdr_mm / ckpt_hdr_vma:

    MM{map_count, exe_objref, ...}
    per VMA, in address order: [OBJREF FILE / OBJREF SHMEM + SHMEM + pages] VMA{...}"name"
        private VMAs (ANON, FILE): page chunks (PGARR + BUFFER)... PGARR{0}
    MM_CONTEXT{vdso}
    MM_ELF{nr_file_ids, nr_vdso}
        FILE_ID{file_objref, ...}"id"                 (nr_file_ids of them)
        VDSO_LAYOUT{sizes, nr_symbols}"build id"      (nr_vdso: 0 or 1)
            VDSO_SYMBOL{offset, size}"name"             (nr_symbols of them)

Incremental images (IMAGE_INCREMENTAL, docs/image-format.md §11) add MM_BASE right after MM
and SHMEM_BASE right after SHMEM: the object's counterpart in the parent image (by its objref
there, 0: none, the pages are complete) and, for an mm, the page ranges dropped since; with a
base, the page chunks hold only the pages written since the parent checkpoint.

A shared anonymous segment is an object: its pages follow its SHMEM record once, and every VMA
mapping it names it by ino_objref (SHM_ANON the first time, SHM_ANON_SKIP afterwards). Shared
file mappings (SHM_FILE) carry no pages: their contents are the file's. The vdso carries none.
Deviation: no saved_auxv BUFFER after MM (the model has no auxv).

MM_ELF and what follows it are ours (live images; the model writes MM_ELF{0, 0}): the identity
of every file mapped with PROT_EXEC and of the executable (FILE_ID: its ELF build id, else a
SHA-256 of its contents, with its size and mtime), and the vdso's layout (VDSO_LAYOUT: the sizes
of [vvar], [vvar_vclock] and [vdso], the vdso's build id, and its exported dynamic symbols with
their offsets in the vdso). The live restart (backend/restore/elfcheck.py) refuses an image whose
executable files or vdso layout no longer match. They are restored as ``mm.file_ids`` (File ->
FileIdentity) and ``mm.vdso_layout`` (a VdsoLayout or None), and written back unchanged.
"""
from __future__ import annotations

import errno
from array import array
from dataclasses import dataclass

from ..image.core import MAX_PAGES_PER_CHUNK
from ..image.schema import ENUMS, layout
from ..image.types import PAGE_SIZE, ObjType
from ..model.mm import MM
from ..model.mm_pages import (MAP_ANONYMOUS, MAP_GROWSDOWN, MAP_PRIVATE, MAP_SHARED, PROT_ALL,
                              VM_GROWSDOWN, VM_MAYSHARE, VM_SHARED, ZERO_PAGE, Shmem)
from ..cr.incremental import chunks_in, inherited
from .registry import Kind, register

VMA_VDSO, VMA_ANON, VMA_FILE, VMA_SHM_ANON, VMA_SHM_ANON_SKIP, VMA_SHM_FILE = 1, 2, 3, 4, 5, 6
ENUMS["vma_type"] = {VMA_VDSO: "VDSO", VMA_ANON: "ANON", VMA_FILE: "FILE",
                     VMA_SHM_ANON: "SHM_ANON", VMA_SHM_ANON_SKIP: "SHM_ANON_SKIP",
                     VMA_SHM_FILE: "SHM_FILE"}
ENUMS["mm_prot"] = {0x1: "PROT_READ", 0x2: "PROT_WRITE", 0x4: "PROT_EXEC"}
ENUMS["vm_flags"] = {0x1: "VM_READ", 0x2: "VM_WRITE", 0x4: "VM_EXEC", 0x8: "VM_SHARED",
                     0x10: "VM_MAYREAD", 0x20: "VM_MAYWRITE", 0x40: "VM_MAYEXEC",
                     0x80: "VM_MAYSHARE", 0x100: "VM_GROWSDOWN"}

_MM_ADDRS = MM.FIELDS
MM_REC = layout(401, "MM", [
    ("map_count", "u32"), ("exe_objref", "i32", "objref:FILE"),
    ("def_flags", "u64", "hex"), ("flags", "u64", "hex"),
] + [(name, "u64", "hex") for name in _MM_ADDRS], subsystem="mm")
VMA_REC = layout(402, "VMA", [
    ("vma_type", "u32", "enum:vma_type"), ("vma_objref", "i32", "objref:FILE"),
    ("ino_objref", "i32", "objref:SHMEM"), ("pad", "u32"), ("ino_size", "u64", "hex"),
    ("vm_start", "u64", "hex"), ("vm_end", "u64", "hex"),
    ("vm_page_prot", "u64", "flags:mm_prot"), ("vm_flags", "u64", "flags:vm_flags"),
    ("vm_pgoff", "u64", "hex"),
], var="str", max_var=256, subsystem="mm")
MM_CONTEXT = layout(404, "MM_CONTEXT", [
    ("vdso", "u64", "hex"), ("ldt_entry_size", "u32"), ("nldt", "u32"),
], subsystem="mm")
SHMEM_REC = layout(405, "SHMEM", [("size", "u64", "hex"), ("nr_pages", "u64")], subsystem="mm")
ID_BUILD_ID, ID_SHA256 = 1, 2
ENUMS["file_id_kind"] = {ID_BUILD_ID: "BUILD_ID", ID_SHA256: "SHA256"}
MM_ELF = layout(406, "MM_ELF", [("nr_file_ids", "u32"), ("nr_vdso", "u32")], subsystem="mm")
FILE_ID = layout(407, "FILE_ID", [
    ("file_objref", "i32", "objref:FILE"), ("id_kind", "u32", "enum:file_id_kind"),
    ("size", "u64"), ("mtime_ns", "u64"),
], var="bytes", max_var=64, subsystem="mm")
VDSO_LAYOUT = layout(408, "VDSO_LAYOUT", [
    ("vvar_size", "u64", "hex"), ("vvar_vclock_size", "u64", "hex"),
    ("vdso_size", "u64", "hex"), ("nr_symbols", "u32"), ("pad", "u32"),
], var="bytes", max_var=64, subsystem="mm")
VDSO_SYMBOL = layout(409, "VDSO_SYMBOL", [("offset", "u64", "hex"), ("size", "u64", "hex")],
                     var="str", max_var=256, subsystem="mm")
# Incremental images: the object's base in the parent image (an objref *there*, so untyped).
MM_BASE = layout(802, "MM_BASE", [("base_objref", "i32"), ("nr_dropped", "u32")],
                 var=[("start", "u64", "hex"), ("end", "u64", "hex")], max_var=64 << 20,
                 subsystem="incremental")
SHMEM_BASE = layout(803, "SHMEM_BASE", [("base_objref", "i32"), ("pad", "u32")],
                    subsystem="incremental")
MAX_VDSO_SYMBOLS = 4096
SHA256_SIZE = 32


@dataclass(frozen=True)
class FileIdentity:
    """What a mapped executable file was at checkpoint: ``kind`` ID_BUILD_ID (``value`` is
    its NT_GNU_BUILD_ID note) or ID_SHA256 (``value`` is the SHA-256 of its contents)."""
    kind: int
    value: bytes
    size: int
    mtime_ns: int

    def describe(self) -> str:
        return f"{'build id' if self.kind == ID_BUILD_ID else 'SHA-256'} {self.value.hex()}"


@dataclass(frozen=True)
class VdsoLayout:
    """The vdso a process had: the sizes of the special mappings around it, its build id
    (b"" if none) and its exported symbols as (name, offset in the vdso, size)."""
    vvar_size: int
    vvar_vclock_size: int
    vdso_size: int
    build_id: bytes
    symbols: tuple[tuple[str, int, int], ...]

    @property
    def sizes(self) -> dict[str, int]:
        return {"[vvar]": self.vvar_size, "[vvar_vclock]": self.vvar_vclock_size,
                "[vdso]": self.vdso_size}

    @property
    def offsets(self) -> dict[str, int]:
        return {name: offset for name, offset, _ in self.symbols}

# The vm_flags bits a model VMA derives from prot, maxprot and flags (VMA.vm_flags); others
# (VM_ACCOUNT, ... in live images) are kept on the VMA as ``vm_extra`` and written back.
VM_DERIVED = 0x1FF
# Kernel-provided special mappings: recorded with their place, never with contents.
SPECIAL_MAPPINGS = frozenset({"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]"})


def _vma_type(vma) -> int:
    if vma.name in SPECIAL_MAPPINGS:
        return VMA_VDSO
    if vma.shmem is not None:
        return VMA_SHM_ANON
    if vma.file is not None:
        return VMA_SHM_FILE if vma.shared else VMA_FILE
    if vma.shared:
        raise AssertionError(f"shared anonymous {vma} without a segment")
    return VMA_ANON


def save_mm(ctx, mm: MM) -> None:
    exe_ref = ctx.ref(mm.exe_file)
    ctx.write(MM_REC, map_count=mm.map_count, exe_objref=exe_ref, def_flags=mm.def_flags,
              flags=mm.flags, **{name: getattr(mm, name) for name in _MM_ADDRS})
    incr = getattr(ctx, "incremental", None)
    base = incr.base_of(mm) if incr is not None else 0
    if incr is not None:
        drops = mm.dropped_ranges() if base else []
        ctx.write(MM_BASE, base_objref=base, nr_dropped=len(drops), var=drops)
    chunks = mm.dirty_chunks if base else mm.present_chunks
    vdso = 0
    file_refs = {id(mm.exe_file): exe_ref} if mm.exe_file is not None else {}
    for vma in list(mm.vmas):
        vtype = _vma_type(vma)
        file_ref = ctx.ref(vma.file)          # one ctx.ref per reference the VMA holds
        if vma.file is not None:
            file_refs.setdefault(id(vma.file), file_ref)
        shm_ref = 0
        if vma.shmem is not None:
            shm_ref, first = ctx.ref_first(vma.shmem)
            if not first:  # the segment's pages went out with its first mapping
                vtype = VMA_SHM_ANON_SKIP
        if vma.name == "[vdso]":
            vdso = vma.start
        ctx.write(VMA_REC, var=vma.name or "", vma_type=vtype, vma_objref=file_ref,
                  ino_objref=shm_ref, pad=0,
                  ino_size=vma.shmem.size if vma.shmem is not None else 0,
                  vm_start=vma.start, vm_end=vma.end, vm_page_prot=vma.prot,
                  vm_flags=vma.vm_flags, vm_pgoff=vma.pgoff)
        if vtype in (VMA_ANON, VMA_FILE):
            if not ctx.collecting:  # pages hold no references: the leak dry run skips them
                for chunk in chunks(vma, MAX_PAGES_PER_CHUNK):   # (addrs, blob[, crc])
                    ctx.write_pages(*chunk)
            ctx.end_pages()
    ctx.write(MM_CONTEXT, vdso=vdso, ldt_entry_size=0, nldt=0)
    _save_elf(ctx, mm, file_refs)


def _save_elf(ctx, mm, file_refs: dict[int, int]) -> None:
    """MM_ELF and its records; a file this mm no longer maps keeps no FILE_ID."""
    ids = [(file_refs[id(file)], ident) for file, ident in getattr(mm, "file_ids", {}).items()
           if id(file) in file_refs]
    vdso = getattr(mm, "vdso_layout", None)
    ctx.write(MM_ELF, nr_file_ids=len(ids), nr_vdso=int(vdso is not None))
    for ref, ident in ids:
        ctx.write(FILE_ID, file_objref=ref, id_kind=ident.kind, size=ident.size,
                  mtime_ns=ident.mtime_ns, var=ident.value)
    if vdso is not None:
        ctx.write(VDSO_LAYOUT, vvar_size=vdso.vvar_size, vvar_vclock_size=vdso.vvar_vclock_size,
                  vdso_size=vdso.vdso_size, nr_symbols=len(vdso.symbols), pad=0,
                  var=vdso.build_id)
        for name, offset, size in vdso.symbols:
            ctx.write(VDSO_SYMBOL, offset=offset, size=size, var=name)


def _load_elf(ctx, mm: MM) -> None:
    rec = ctx.read(MM_ELF)
    if rec["nr_vdso"] > 1:
        ctx.fail(errno.EINVAL, f"MM_ELF announces {rec['nr_vdso']} vdso layouts (at most 1)")
    mapped = {id(v.file): v.file for v in mm.vmas if v.file is not None}
    if mm.exe_file is not None:
        mapped[id(mm.exe_file)] = mm.exe_file
    for _ in range(rec["nr_file_ids"]):
        id_rec = ctx.read(FILE_ID)
        file = ctx.obj(id_rec["file_objref"], ObjType.FILE)
        kind, value = id_rec["id_kind"], bytes(id_rec.var)
        if file is None or id(file) not in mapped:
            ctx.fail(errno.EINVAL, f"FILE_ID names objref {id_rec['file_objref']}, which is "
                                   "not a file this mm maps")
        if file in mm.file_ids:
            ctx.fail(errno.EINVAL, f"FILE_ID: two identities for {file.path}")
        if kind not in ENUMS["file_id_kind"] or not value or \
                (kind == ID_SHA256 and len(value) != SHA256_SIZE):
            ctx.fail(errno.EINVAL, f"FILE_ID of {file.path}: bad identity (kind {kind}, "
                                   f"{len(value)} bytes)")
        mm.file_ids[file] = FileIdentity(kind, value, id_rec["size"], id_rec["mtime_ns"])
    if rec["nr_vdso"]:
        lay = ctx.read(VDSO_LAYOUT)
        if lay["nr_symbols"] > MAX_VDSO_SYMBOLS:
            ctx.fail(errno.EINVAL, f"VDSO_LAYOUT announces {lay['nr_symbols']} symbols")
        symbols = []
        for _ in range(lay["nr_symbols"]):
            sym = ctx.read(VDSO_SYMBOL)
            if not sym.var or sym["offset"] >= lay["vdso_size"]:
                ctx.fail(errno.EINVAL, f"VDSO_SYMBOL {sym.var!r} at {sym['offset']:#x} lies "
                                       f"outside the {lay['vdso_size']:#x}-byte vdso")
            symbols.append((sym.var, sym["offset"], sym["size"]))
        mm.vdso_layout = VdsoLayout(lay["vvar_size"], lay["vvar_vclock_size"],
                                    lay["vdso_size"], bytes(lay.var), tuple(symbols))


def _restore_vma(ctx, mm: MM, rec, base_pages=None, own=None) -> None:
    vtype, vm_flags = rec["vma_type"], rec["vm_flags"]
    start, end = rec["vm_start"], rec["vm_end"]
    file = ctx.obj(rec["vma_objref"], ObjType.FILE)
    shmem = ctx.obj(rec["ino_objref"], ObjType.SHMEM)
    shared = bool(vm_flags & (VM_SHARED | VM_MAYSHARE))
    wants_file = vtype in (VMA_FILE, VMA_SHM_FILE)
    wants_shmem = vtype in (VMA_SHM_ANON, VMA_SHM_ANON_SKIP)
    if vtype not in ENUMS["vma_type"]:
        ctx.fail(errno.EINVAL, f"VMA {start:#x}: unknown vma_type {vtype}")
    if (file is not None) != wants_file or (shmem is not None) != wants_shmem \
            or shared != (vtype in (VMA_SHM_FILE, VMA_SHM_ANON, VMA_SHM_ANON_SKIP)):
        ctx.fail(errno.EINVAL, f"VMA {start:#x}: type {ENUMS['vma_type'][vtype]} does not match "
                               f"its objrefs or flags {vm_flags:#x}")
    flags = MAP_SHARED if shared else MAP_PRIVATE
    if file is None and vtype != VMA_VDSO:
        flags |= MAP_ANONYMOUS
    if vm_flags & VM_GROWSDOWN:
        flags |= MAP_GROWSDOWN
    name = rec.var or None
    if vtype == VMA_VDSO:
        name = rec.var if rec.var in SPECIAL_MAPPINGS else "[vdso]"
    try:
        vma = mm.restore_vma(start, end, rec["vm_page_prot"], flags, rec["vm_pgoff"], file, shmem,
                             name, (vm_flags >> 4) & PROT_ALL)
        vma.vm_extra = vm_flags & ~VM_DERIVED   # bits the model keeps without using them
    except OSError as e:
        ctx.fail(errno.EINVAL, f"VMA {start:#x}-{end:#x}: {e}")
    if vtype in (VMA_ANON, VMA_FILE):
        sink = ctx.page_sink
        chunks = ctx.read_pages()
        if own is not None:           # the parent's pages first, then this image's own
            base = chunks_in(base_pages, start, end) if base_pages is not None else []
            chunks = _with_base(base, chunks, own)
        for addrs, data in chunks:
            if sink is not None:      # a live restore writes pages itself, straight from the image
                sink.private_pages(vma, addrs, data)
                continue
            try:
                mm.install_pages(addrs, data)
            except (OSError, ValueError) as e:
                ctx.fail(errno.EINVAL, f"pages of VMA {start:#x}: {e}")


def _with_base(base: list, chunks, own: array):
    """Page chunks: the base's (one per run), then this image's, whose addresses go to
    ``own``."""
    yield from base
    for addrs, data in chunks:
        own.extend(addrs)
        yield addrs, data


def _read_base(ctx, lay, what: str):
    """An incremental image's MM_BASE / SHMEM_BASE, and its base's resolved pages."""
    rec = ctx.read(lay)
    ref = rec["base_objref"]
    if ref < 0:
        ctx.fail(errno.EINVAL, f"{lay.name}: bad base objref {ref}")
    return rec, (ctx.base_pages.mm_pages(ref) if what == "mm" else
                 ctx.base_pages.shmem_pages(ref)) if ref else None


def _drops(ctx, rec) -> list:
    drops = [tuple(r) for r in rec.var]
    if rec["nr_dropped"] != len(drops):
        ctx.fail(errno.EINVAL, f"MM_BASE announces {rec['nr_dropped']} dropped ranges, holds {len(drops)}")
    last = 0
    for start, end in drops:
        if start % PAGE_SIZE or end % PAGE_SIZE or not last <= start < end:
            ctx.fail(errno.EINVAL, f"MM_BASE: dropped range {start:#x}-{end:#x} is unaligned, "
                                   "empty or out of order")
        last = end
    return drops


def load_mm(ctx) -> MM:
    rec = ctx.read(MM_REC)
    mm = MM.new(ctx.kernel)
    ctx.bind(mm)
    base_pages, base_rec, own = None, None, None
    if getattr(ctx, "base_pages", None) is not None:   # an incremental image
        base_rec, base = _read_base(ctx, MM_BASE, "mm")
        drops = _drops(ctx, base_rec)
        if base is not None:
            base_pages = inherited(base, [(0, 1 << 64)], drops)
        own = array("Q")
    exe = ctx.obj(rec["exe_objref"], ObjType.FILE)
    mm.exe_file = exe.get() if exe is not None else None
    mm.def_flags, mm.flags = rec["def_flags"], rec["flags"]
    for name in _MM_ADDRS:
        setattr(mm, name, rec[name])
    for _ in range(rec["map_count"]):
        _restore_vma(ctx, mm, ctx.read(VMA_REC), base_pages, own)
    ctx_rec = ctx.read(MM_CONTEXT)
    vdso = mm.find_vma(ctx_rec["vdso"]) if ctx_rec["vdso"] else None
    if ctx_rec["vdso"] and (vdso is None or vdso.name != "[vdso]"):
        ctx.fail(errno.EINVAL, f"MM_CONTEXT names vdso {ctx_rec['vdso']:#x}, which is no vdso VMA")
    _load_elf(ctx, mm)
    mm.clear_dirty()
    if base_rec is not None:  # what replay's round trip needs to write this delta again
        ctx.deltas.append((mm, base_rec["base_objref"], list(own), drops))
    return mm


def save_shmem(ctx, seg: Shmem) -> None:
    incr = getattr(ctx, "incremental", None)
    base = incr.base_of(seg) if incr is not None else 0
    if base:
        nr_pages = len(seg.dirty_offsets())
    else:
        nr_pages = sum(1 for page in seg.pages.values() if page != ZERO_PAGE)
    ctx.write(SHMEM_REC, size=seg.size, nr_pages=nr_pages)
    if incr is not None:
        ctx.write(SHMEM_BASE, base_objref=base, pad=0)
    chunks = seg.dirty_pages if base else seg.present_pages
    if not ctx.collecting:  # pages hold no references: the leak dry run skips them
        for offsets, blob in chunks(MAX_PAGES_PER_CHUNK):
            ctx.write_pages(offsets, blob)
    ctx.end_pages()


def load_shmem(ctx) -> Shmem:
    rec = ctx.read(SHMEM_REC)
    seg = Shmem(rec["size"])
    ctx.bind(seg)
    total = 0
    sink = ctx.page_sink
    chunks = ctx.read_pages()
    base_rec = None
    if getattr(ctx, "base_pages", None) is not None:   # an incremental image: the parent's pages first
        base_rec, base = _read_base(ctx, SHMEM_BASE, "shmem")
        own = array("Q")
        chunks_own = _with_base([], chunks, own)
        for offsets, blob in chunks_in(base, 0, 1 << 64) if base else ():
            if sink is not None:
                sink.shmem_pages(seg, offsets, blob)
            else:
                seg.install_pages(offsets, blob)
        chunks = chunks_own
    for offsets, data in chunks:
        if sink is not None:
            sink.shmem_pages(seg, offsets, data)
            total += len(offsets)
            continue
        try:
            seg.install_pages(offsets, data)
        except ValueError as e:
            ctx.fail(errno.EINVAL, f"SHMEM pages: {e}")
        total += len(offsets)
    if total != rec["nr_pages"]:
        ctx.fail(errno.EINVAL, f"SHMEM announced {rec['nr_pages']} pages, holds {total}")
    if base_rec is not None:
        ctx.deltas.append((seg, base_rec["base_objref"], list(own), None))
    return seg


register(Kind(name="mm", objtype=ObjType.MM, model_types=(MM,),
              layouts=(MM_REC, MM_BASE, VMA_REC, MM_CONTEXT, MM_ELF, FILE_ID, VDSO_LAYOUT,
                       VDSO_SYMBOL),
              save_object=save_mm, load_object=load_mm,
              doc="address spaces: MM, VMAs and private pages"))
register(Kind(name="shmem", objtype=ObjType.SHMEM, model_types=(Shmem,),
              layouts=(SHMEM_REC, SHMEM_BASE),
              save_object=save_shmem, load_object=load_shmem,
              doc="shared anonymous segments, saved once"))

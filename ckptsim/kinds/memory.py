"""The memory kinds: address spaces ("mm") and shared anonymous segments ("shmem").

Image, after Linux-CR's ckpt_hdr_mm / ckpt_hdr_vma:

    MM{map_count, exe_objref, ...}
    per VMA, in address order: [OBJREF FILE / OBJREF SHMEM + SHMEM + pages] VMA{...}"name"
        private VMAs (ANON, FILE): page chunks (PGARR + BUFFER)... PGARR{0}
    MM_CONTEXT{vdso}

A shared anonymous segment is an object: its pages follow its SHMEM record once, and every VMA
mapping it names it by ino_objref (SHM_ANON the first time, SHM_ANON_SKIP afterwards). Shared
file mappings (SHM_FILE) carry no pages: their contents are the file's. The vdso carries none.
Deviation: no saved_auxv BUFFER after MM (the model has no auxv).
"""
from __future__ import annotations

import errno

from ..image.core import MAX_PAGES_PER_CHUNK
from ..image.schema import ENUMS, layout
from ..image.types import ObjType
from ..model.mm import MM
from ..model.mm_pages import (MAP_ANONYMOUS, MAP_GROWSDOWN, MAP_PRIVATE, MAP_SHARED, PROT_ALL,
                              VM_GROWSDOWN, VM_MAYSHARE, VM_SHARED, ZERO_PAGE, Shmem)
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
    vdso = 0
    for vma in list(mm.vmas):
        vtype = _vma_type(vma)
        file_ref = ctx.ref(vma.file)          # one ctx.ref per reference the VMA holds
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
                for addrs, blob in mm.present_chunks(vma, MAX_PAGES_PER_CHUNK):
                    ctx.write_pages(addrs, blob)
            ctx.end_pages()
    ctx.write(MM_CONTEXT, vdso=vdso, ldt_entry_size=0, nldt=0)


def _restore_vma(ctx, mm: MM, rec) -> None:
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
        for addrs, data in ctx.read_pages():
            if sink is not None:      # a live restore writes pages itself, straight from the image
                sink.private_pages(vma, addrs, data)
                continue
            try:
                mm.install_pages(addrs, data)
            except (OSError, ValueError) as e:
                ctx.fail(errno.EINVAL, f"pages of VMA {start:#x}: {e}")


def load_mm(ctx) -> MM:
    rec = ctx.read(MM_REC)
    mm = MM.new(ctx.kernel)
    ctx.bind(mm)
    exe = ctx.obj(rec["exe_objref"], ObjType.FILE)
    mm.exe_file = exe.get() if exe is not None else None
    mm.def_flags, mm.flags = rec["def_flags"], rec["flags"]
    for name in _MM_ADDRS:
        setattr(mm, name, rec[name])
    for _ in range(rec["map_count"]):
        _restore_vma(ctx, mm, ctx.read(VMA_REC))
    ctx_rec = ctx.read(MM_CONTEXT)
    vdso = mm.find_vma(ctx_rec["vdso"]) if ctx_rec["vdso"] else None
    if ctx_rec["vdso"] and (vdso is None or vdso.name != "[vdso]"):
        ctx.fail(errno.EINVAL, f"MM_CONTEXT names vdso {ctx_rec['vdso']:#x}, which is no vdso VMA")
    mm.clear_dirty()
    return mm


def save_shmem(ctx, seg: Shmem) -> None:
    nr_pages = sum(1 for page in seg.pages.values() if page != ZERO_PAGE)
    ctx.write(SHMEM_REC, size=seg.size, nr_pages=nr_pages)
    if not ctx.collecting:  # pages hold no references: the leak dry run skips them
        for offsets, blob in seg.present_pages(MAX_PAGES_PER_CHUNK):
            ctx.write_pages(offsets, blob)
    ctx.end_pages()


def load_shmem(ctx) -> Shmem:
    rec = ctx.read(SHMEM_REC)
    seg = Shmem(rec["size"])
    ctx.bind(seg)
    total = 0
    sink = ctx.page_sink
    for offsets, data in ctx.read_pages():
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
    return seg


register(Kind(name="mm", objtype=ObjType.MM, model_types=(MM,),
              layouts=(MM_REC, VMA_REC, MM_CONTEXT), save_object=save_mm, load_object=load_mm,
              doc="address spaces: MM, VMAs and private pages"))
register(Kind(name="shmem", objtype=ObjType.SHMEM, model_types=(Shmem,), layouts=(SHMEM_REC,),
              save_object=save_shmem, load_object=load_shmem,
              doc="shared anonymous segments, saved once"))

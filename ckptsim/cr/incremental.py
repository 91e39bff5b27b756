"""Incremental images: the link to a parent, chains of images, and the parent's pages.

An incremental image (IMAGE_INCREMENTAL, docs/image-format.md §11) holds the whole tree and
every record as a full image does, but only the pages written since its parent: each mm
(MM_BASE) and shared segment (SHMEM_BASE) names its counterpart in the parent image by objref,
and its pages there, minus the ranges it drops, plus its own, are its contents.

- ``ImageLink``: what identifies an image for its children (image id, crid, tail checksum,
  tree identity); ``PARENT`` in a child records the parent's, checked when the chain is walked.
- ``ImageScan``: one pass over an image's records: header, link, and per mm / segment its base,
  drops, private VMA ranges and own pages (views into the image, no copies).
- ``ImageChain``: images by id (given as a list, or found in a directory); ``resolve(newest)``
  walks parent_id to image_id back to a full image and checks every link.
- ``ChainPages``: the contents an mm or segment of the newest image's parent has, resolved
  oldest first through the chain (what restart overlays the newest image's pages on).
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from array import array
from dataclasses import dataclass, field

from ..errors import ImageError
from ..image import core
from ..image.codec import ImageReader
from ..image.types import PAGE_SHIFT, ObjType
from ..model.mm_pages import keys_in
from .context import RestartError
from .page_runs import PageRuns

MAX_CHAIN = 4096
NO_ID = bytes(16)


def tree_identity(tree_bytes: bytes) -> bytes:
    """16 bytes naming a tree: a hash of the TREE (and TREE_NESTED) items as written."""
    return hashlib.blake2b(bytes(tree_bytes), digest_size=16).digest()


@dataclass(frozen=True)
class ImageLink:
    image_id: bytes
    crid: int
    checksum: int
    tree: bytes

    def describe(self) -> str:
        return f"{self.image_id.hex()} (crid {self.crid})"


@dataclass
class MmScan:
    base: int = 0                                   # objref in the parent image; 0: none
    drops: list = field(default_factory=list)       # [(start, end)] addresses
    private: list = field(default_factory=list)     # [(start, end)] of ANON/FILE VMAs
    pages: PageRuns = field(default_factory=PageRuns)   # page index -> memoryview
    shared: list = field(default_factory=list)      # [(start, end, pgoff, shmem objref)]


@dataclass
class ShmemScan:
    base: int = 0
    pages: PageRuns = field(default_factory=PageRuns)   # page offset index -> memoryview


class ImageScan:
    """One image's records, read once (raises ImageError on a malformed image)."""

    def __init__(self, data, name: str = "image"):
        from ..kinds import load_all, memory, tasktree
        load_all()
        self.name, self.data = name, data
        reader = ImageReader(data)
        self.header = reader.expect(core.HEADER)
        self.checksum = reader.tail_checksum
        self.parent = None                           # the PARENT record
        self.mms: dict[int, MmScan] = {}
        self.shmems: dict[int, ShmemScan] = {}
        self.task_mms: list[tuple[int, int]] = []    # (vpid, mm objref) per task with an mm
        self.nr_records, self.nr_pages, self.page_bytes = 1, 0, 0
        tree = b""
        vpids: list[int] = []
        mm_ref = shm_ref = last_ref = 0
        owner = None                                 # MmScan / ShmemScan taking page chunks
        task = -1
        for rec in reader.records():
            self.nr_records += 1
            lay = rec.layout
            if lay is core.OBJREF:
                last_ref = rec["objref"]
                if rec["objtype"] == ObjType.MM:
                    mm_ref = last_ref
                elif rec["objtype"] == ObjType.SHMEM:
                    shm_ref = last_ref
            elif lay is core.PARENT:
                self.parent = rec
            elif lay is tasktree.TREE:
                tree += bytes(rec.var.view)
                vpids = [item[0] for item in rec.var]
            elif lay is tasktree.TREE_NESTED:
                tree += bytes(rec.var.view)
            elif lay is tasktree.TASK:
                task += 1
            elif lay is tasktree.TASK_OBJS and rec["mm_objref"]:
                self.task_mms.append((vpids[task], rec["mm_objref"]))
            elif lay is memory.MM_REC:
                self.mms[mm_ref] = MmScan()
            elif lay is memory.MM_BASE:
                self.mms[mm_ref].base = rec["base_objref"]
                self.mms[mm_ref].drops = [tuple(r) for r in rec.var]
            elif lay is memory.VMA_REC:
                if rec["vma_type"] in (memory.VMA_ANON, memory.VMA_FILE):
                    self.mms[mm_ref].private.append((rec["vm_start"], rec["vm_end"]))
                    owner = self.mms[mm_ref]
                elif rec["ino_objref"]:
                    self.mms[mm_ref].shared.append((rec["vm_start"], rec["vm_end"],
                                                    rec["vm_pgoff"], rec["ino_objref"]))
            elif lay is memory.SHMEM_REC:
                owner = self.shmems[shm_ref] = ShmemScan()
            elif lay is memory.SHMEM_BASE:
                self.shmems[shm_ref].base = rec["base_objref"]
            elif lay is core.PGARR and rec["nr_pages"] and owner is not None:
                n = rec["nr_pages"]
                buf = reader.expect(core.BUFFER)
                self.nr_records += 1
                addrs = array("Q")
                addrs.frombytes(buf.var[:n * 8])
                blob = buf.var[n * 8:]
                owner.pages.add_chunk(addrs, blob)
                self.nr_pages += n
                self.page_bytes += len(blob)
            elif lay is core.PGARR:
                owner = None
        self.tree = tree_identity(tree)
        self.nr_records += 1                         # the tail
        self.size = len(data)

    @property
    def image_id(self) -> bytes:
        return bytes(self.header["image_id"])

    @property
    def parent_id(self) -> bytes:
        return bytes(self.header["parent_id"])

    @property
    def incremental(self) -> bool:
        return bool(self.header["image_flags"] & core.IMAGE_INCREMENTAL)

    @property
    def link(self) -> ImageLink:
        return ImageLink(self.image_id, self.header["crid"], self.checksum, self.tree)

    def describe(self) -> str:
        return f"{self.name} (image {self.image_id.hex()}, crid {self.header['crid']})"

    def task_pages(self) -> dict[int, list[int]]:
        """Per task pid: the page addresses this image holds for its address space (private
        pages, and the pages of shared segments its SHM VMAs map): what the conformance
        runner compares with what the program wrote."""
        out = {}
        for vpid, ref in self.task_mms:
            mm = self.mms[ref]
            addrs = {i << PAGE_SHIFT for i in mm.pages}
            for start, end, pgoff, seg_ref in mm.shared:
                seg = self.shmems[seg_ref]
                npages = (end - start) >> PAGE_SHIFT
                addrs.update(start + ((i - pgoff) << PAGE_SHIFT)
                             for i in keys_in(seg.pages, pgoff, pgoff + npages))
            out[vpid] = sorted(addrs)
        return out


def link_of(data) -> ImageLink:
    """The link of an image (for a child that names it as parent)."""
    return ImageScan(data).link


def _peek_image_id(path: str) -> bytes | None:
    """The image id in a file's HEADER (no checksum pass), or None if it is no image -- or no
    image to trust as an ancestor: only a regular file (no link followed, a FIFO never waited
    on) owned by this user or root and writable by nobody else, as images are written (0600),
    so that a file planted in a shared directory cannot supply a restored process's memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) \
                or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        head = os.read(fd, 8 + core.HEADER.fixed_size)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(head) < 8 + core.HEADER.fixed_size or int.from_bytes(head[:4], "little") != core.HEADER.type_id:
        return None
    values = dict(zip((f.name for f in core.HEADER.fields), core.HEADER.struct.unpack_from(head, 8)))
    return bytes(values["image_id"])


class ImageChain:
    """Images by image id: ``ImageChain(images)`` (bytes-like, or (name, data) pairs) and/or
    ``directories`` whose files are looked up by their header's image id when needed."""

    def __init__(self, images=(), directories=()):
        self.images: dict[bytes, tuple[str, object]] = {}
        self.directories = [str(d) for d in directories]
        self._dir_index: dict[bytes, str] | None = None
        for i, item in enumerate(images):
            name, data = item if isinstance(item, tuple) else (f"image #{i + 1}", item)
            self.add(data, name)

    @classmethod
    def of(cls, spec) -> "ImageChain":
        """An ImageChain from what an API caller passes: a chain, a directory, or images."""
        if isinstance(spec, ImageChain):
            return spec
        if isinstance(spec, (str, os.PathLike)):
            return cls(directories=[spec])
        return cls(images=list(spec))

    def add(self, data, name: str | None = None) -> None:
        try:
            image_id = bytes(ImageReader(data, checksum=False).expect(core.HEADER)["image_id"])
        except ImageError as e:
            raise RestartError(errno.EINVAL, f"{name or 'image'} is no image: {e}") from None
        self.images.setdefault(image_id, (name or image_id.hex(), data))

    def _find(self, image_id: bytes):
        if image_id in self.images:
            return self.images[image_id]
        if self._dir_index is None:
            self._dir_index = {}
            for d in self.directories:
                for entry in sorted(os.listdir(d)) if os.path.isdir(d) else ():
                    path = os.path.join(d, entry)
                    found = _peek_image_id(path)
                    if found is not None:
                        if found in self._dir_index:   # two files claim one id: trust neither
                            self._dir_index[found] = None
                        else:
                            self._dir_index[found] = path
        path = self._dir_index.get(image_id)
        if path is None:
            if image_id in self._dir_index:
                raise RestartError(errno.EINVAL, f"more than one file claims image "
                                                 f"{image_id.hex()}: none of them is used")
            return None
        from ..image.storage import read_image_file
        self.images[image_id] = (path, read_image_file(path))
        return self.images[image_id]

    def where(self) -> str:
        places = [f"{len(self.images)} given images"] if self.images or not self.directories else []
        places += [f"directory {d}" for d in self.directories]
        return ", ".join(places)

    def resolve(self, newest, name: str = "the image") -> list[ImageScan]:
        """The chain ending with ``newest``, oldest (a full image) first; every link checked.
        RestartError ENOENT for a missing ancestor, EINVAL for one that does not match."""
        scans = [newest if isinstance(newest, ImageScan) else _scan(newest, name)]
        seen = {scans[0].image_id}
        while scans[-1].incremental:
            child = scans[-1]
            if child.parent is None or child.parent_id == NO_ID:
                raise RestartError(errno.EINVAL, f"{child.describe()} is incremental but names "
                                                 "no parent")
            if len(scans) > MAX_CHAIN or child.parent_id in seen:
                raise RestartError(errno.EINVAL, f"{child.describe()}: the chain loops or is "
                                                 f"longer than {MAX_CHAIN} images")
            found = self._find(child.parent_id)
            want = child.parent
            if found is None:
                raise RestartError(errno.ENOENT, f"{child.describe()} needs its parent image "
                                                 f"{child.parent_id.hex()} (crid {want['parent_crid']}), "
                                                 f"which is not among {self.where()}")
            parent = _scan(found[1], found[0])
            problems = [f"{what} {have} where the child expects {expect}" for what, have, expect in (
                ("crid", parent.header["crid"], want["parent_crid"]),
                ("checksum", hex(parent.checksum), hex(want["parent_checksum"])),
                ("tree", parent.tree.hex(), bytes(want["parent_tree"]).hex())) if have != expect]
            if problems:
                raise RestartError(errno.EINVAL, f"{child.describe()}: its parent "
                                                 f"{parent.describe()} does not match: "
                                                 f"{'; '.join(problems)}")
            seen.add(parent.image_id)
            scans.append(parent)
        return scans[::-1]


def _scan(data, name: str) -> ImageScan:
    try:
        return ImageScan(data, name)
    except ImageError as e:
        raise RestartError(errno.EINVAL, f"{name}: {e}") from None


class ChainPages:
    """The contents of the objects of the last image of ``scans`` (oldest first), resolved
    through the chain: ``mm_pages(objref)`` / ``shmem_pages(objref)`` -> PageRuns (page index
    -> view, as runs of the images' page data)."""

    def __init__(self, scans: list[ImageScan]):
        self.scans = scans
        self._cache: dict[tuple, dict] = {}

    def mm_pages(self, ref: int, level: int | None = None) -> dict:
        level = len(self.scans) - 1 if level is None else level
        key = ("mm", level, ref)
        if key not in self._cache:
            scan = self.scans[level]
            mm = scan.mms.get(ref)
            if mm is None:
                raise RestartError(errno.EINVAL, f"{scan.describe()} has no mm with objref {ref} "
                                                 "(named as a base by its child)")
            out = mm.pages
            if mm.base:
                base = self.mm_pages(mm.base, level - 1) if level else self._no_parent(scan)
                out = inherited(base, mm.private, mm.drops).overlay(mm.pages)
            self._cache[key] = out
        return self._cache[key]

    def shmem_pages(self, ref: int, level: int | None = None) -> dict:
        level = len(self.scans) - 1 if level is None else level
        key = ("shmem", level, ref)
        if key not in self._cache:
            scan = self.scans[level]
            seg = scan.shmems.get(ref)
            if seg is None:
                raise RestartError(errno.EINVAL, f"{scan.describe()} has no shared segment with "
                                                 f"objref {ref} (named as a base by its child)")
            out = seg.pages
            if seg.base:
                base = self.shmem_pages(seg.base, level - 1) if level else self._no_parent(scan)
                out = base.overlay(seg.pages)
            self._cache[key] = out
        return self._cache[key]

    @staticmethod
    def _no_parent(scan):
        raise RestartError(errno.EINVAL, f"{scan.describe()} names a base but is a full image")


def inherited(base: PageRuns, ranges, drops) -> PageRuns:
    """The base's pages inside ``ranges`` (address pairs), minus those inside ``drops``."""
    return base.restrict(ranges, drops)


def pages_in(pages: PageRuns, start: int, end: int):
    """(array('Q') of addresses, blob) of the pages of ``pages`` in [start, end), in order."""
    return pages.pages_in(start >> PAGE_SHIFT, end >> PAGE_SHIFT)


def chunks_in(pages: PageRuns, start: int, end: int) -> list:
    """The same as chunks (addresses, a view of the image) per run: no copy."""
    return pages.chunks_in(start >> PAGE_SHIFT, end >> PAGE_SHIFT)

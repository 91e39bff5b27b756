"""The memory kinds: save/load of MM, VMAs, private pages and shared segments."""
import errno
import os
import types

import pytest

from ckptsim.image.types import ObjType
from ckptsim.kinds import memory
from ckptsim.kinds.registry import kind_for_object
from ckptsim.model.mm import MM, MMOps
from ckptsim.model.mm_pages import (MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PROT_READ,
                                    PROT_WRITE, Shmem)
from ckptsim.model.shared import Shared

P = 4096
RW = PROT_READ | PROT_WRITE


class FakeInode:
    def __init__(self, data=b""):
        self.data = bytearray(data)

    @property
    def size(self):
        return len(self.data)

    def read_at(self, offset, n):
        return bytes(self.data[offset:offset + n])

    def write_at(self, offset, data):
        self.data[offset:offset + len(data)] = data
        return len(data)


class FakeFile(Shared):
    def __init__(self, data=b"", flags=os.O_RDWR):
        super().__init__()
        self.inode = FakeInode(data)
        self.flags = flags


class Failed(Exception):
    pass


class FakeImage:
    """A stand-in for the framework's contexts: records kept as a list, objrefs by identity,
    OBJREFs handled transparently on read, files restored as themselves."""

    def __init__(self):
        self.records = []          # (name, payload)
        self.objs = []             # checkpointed objects, objref = index + 1
        self.uses = {}
        self.kernel = None
        self.page_sink = None      # restart: pages go into the model mm (no live restore)

    # checkpoint side
    def write(self, lay, var=None, **fields):
        self.records.append(("rec", (lay, fields, var)))

    def write_pages(self, addrs, data):
        if len(addrs):
            self.records.append(("pages", (addrs, bytes(data))))

    def end_pages(self):
        self.records.append(("pages", None))

    collecting = False

    def ref(self, obj):
        return self.ref_first(obj)[0]

    def ref_first(self, obj):
        if obj is None:
            return 0, False
        for i, known in enumerate(self.objs):
            if known is obj:
                self.uses[i + 1] += 1
                return i + 1, False
        self.objs.append(obj)
        ref = len(self.objs)
        self.uses[ref] = 1
        self.records.append(("objref", ref))
        if not isinstance(obj, FakeFile):
            kind_for_object(obj).save_object(self, obj)
        return ref, True

    # restart side
    def restart(self):
        self.pos, self.loaded, self.loading = 0, {}, []
        return self

    def _objrefs(self):
        while self.pos < len(self.records) and self.records[self.pos][0] == "objref":
            ref = self.records[self.pos][1]
            self.pos += 1
            obj = self.objs[ref - 1]
            if isinstance(obj, FakeFile):
                self.loaded[ref] = obj
                continue
            self.loading.append(ref)
            self.loaded[ref] = kind_for_object(obj).load_object(self)
            self.loading.pop()

    def read(self, lay):
        self._objrefs()
        kind, (rlay, fields, var) = self.records[self.pos]
        assert kind == "rec" and rlay is lay, (rlay, lay)
        self.pos += 1
        return _Rec(fields, var)

    def read_pages(self):
        while True:
            kind, payload = self.records[self.pos]
            assert kind == "pages"
            self.pos += 1
            if payload is None:
                return
            yield payload[0], memoryview(payload[1])

    def bind(self, obj):
        self.loaded[self.loading[-1]] = obj

    def obj(self, ref, otype):
        return self.loaded[ref] if ref else None

    def fail(self, err, message):
        raise Failed(err, message)


class _Rec:
    def __init__(self, fields, var):
        self.values, self.var = fields, var

    def __getitem__(self, name):
        return self.values[name]


class K(MMOps):
    pass


def build():
    k = K()
    exe = FakeFile(b"\x7fELF" + bytes(3 * P))
    t = types.SimpleNamespace(mm=MM.new(None), files=types.SimpleNamespace(get=lambda fd: data))
    data = FakeFile(b"D" * 4 * P)
    t.mm.exec_reset(k, exe)
    anon = k.mmap(t, 0, 8 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    k.mem_write(t, anon + 5, b"anon" * 3000)
    k.mem_write(t, anon + 6 * P, bytes(P))                 # zero page: not saved
    k.mprotect(t, anon + 7 * P, P, PROT_READ)
    shm = k.mmap(t, 0, 3 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    k.mem_write(t, shm + P, b"shared!")
    priv = k.mmap(t, 0, 4 * P, RW, MAP_PRIVATE, 3, 0)
    k.mem_write(t, priv + 2 * P, b"cow")
    shf = k.mmap(t, 0, 2 * P, RW, MAP_SHARED, 3, 2 * P)
    k.mem_write(t, shf, b"to file")
    k.brk(t, t.mm.brk + 2 * P)
    k.mem_write(t, t.mm.start_brk, b"heap")
    return k, t, exe, data


def snapshot(mm):
    return [(v.start, v.end, v.prot, v.flags, v.pgoff, v.name, v.maxprot, v.vm_flags,
             v.shmem is not None, v.file) for v in mm.vmas]


def contents(mm):
    return [mm.read(v.start, v.end - v.start) if v.prot & PROT_READ else None for v in mm.vmas]


def test_roundtrip_mm():
    k, t, exe, data = build()
    mm = t.mm
    child = mm.fork_copy(k)                                # a second mapper of the segment
    img = FakeImage()
    img.ref(mm)
    img.ref(child)
    names = [p[0].name for kind, p in img.records if kind == "rec"]
    assert names.count("SHMEM") == 1 and names.count("MM") == 2
    vtypes = [p[1]["vma_type"] for kind, p in img.records if kind == "rec" and p[0].name == "VMA"]
    assert vtypes.count(memory.VMA_SHM_ANON) == 1 and vtypes.count(memory.VMA_SHM_ANON_SKIP) == 1
    assert memory.VMA_VDSO in vtypes and memory.VMA_SHM_FILE in vtypes
    # the leak check's rule: one ctx.ref per real reference
    exe_ref = img.objs.index(exe) + 1
    data_ref = img.objs.index(data) + 1
    assert img.uses[exe_ref] == exe.refs - 1 and img.uses[data_ref] == data.refs - 1
    pages = [a for kind, p in img.records if kind == "pages" and p for a in p[0]]
    assert all(a % P == 0 for a in pages)

    img.restart()
    img._objrefs()
    mm2, child2 = img.loaded[1], img.loaded[img.objs.index(child) + 1]
    assert snapshot(mm2) == snapshot(mm) and snapshot(child2) == snapshot(child)
    assert contents(mm2) == contents(mm) and contents(child2) == contents(child)
    assert mm2.exe_file is exe and mm2.map_count == mm.map_count
    seg2 = [v.shmem for v in mm2.vmas if v.shmem][0]
    assert [v.shmem for v in child2.vmas if v.shmem][0] is seg2
    assert seg2.refs == 3                                # the table's + one per VMA
    assert mm2.dirty_pages() == []
    for name in mm.FIELDS:
        assert getattr(mm2, name) == getattr(mm, name)
    # the shared segment stays shared after restore, private pages stay private
    t2 = types.SimpleNamespace(mm=mm2)
    shm_vma = [v for v in mm2.vmas if v.shmem][0]
    k.mem_write(t2, shm_vma.start, b"X")
    assert child2.read(shm_vma.start, 1) == b"X"


def test_zero_and_unwritten_pages_not_saved():
    k, t, exe, data = build()
    img = FakeImage()
    img.ref(t.mm)
    saved = sorted(a for kind, p in img.records if kind == "pages" and p for a in p[0])
    expected = sorted([a for v in t.mm.vmas if v.is_private for a in t.mm.present_pages(v)[0]]
                      + [P])                   # the segment's one written page, by offset
    assert saved == expected
    zero = [v for v in t.mm.vmas if v.end - v.start == 7 * P][0].start + 6 * P
    assert zero not in saved and zero >> 12 in t.mm.pages


def test_restore_rejects_inconsistent_vma():
    k, t, exe, data = build()
    img = FakeImage()
    img.ref(t.mm)
    for kind, payload in img.records:
        if kind == "rec" and payload[0].name == "VMA" and payload[1]["vma_type"] == memory.VMA_ANON:
            payload[1]["vma_type"] = memory.VMA_FILE
            break
    img.restart()
    with pytest.raises(Failed) as info:
        img._objrefs()
    assert info.value.args[0] == errno.EINVAL


def test_kinds_registered():
    assert kind_for_object(MM()).objtype == ObjType.MM
    assert kind_for_object(Shmem(P)).objtype == ObjType.SHMEM
    assert memory.MM_REC.type_id == 401 and memory.VMA_REC.type_id == 402
    assert memory.MM_CONTEXT.type_id == 404 and memory.SHMEM_REC.type_id == 405


# ---- through the real framework ----------------------------------------------------------
def _framework():
    from ckptsim.cr import api
    from ckptsim.image import core
    from ckptsim.model.kernel import Kernel
    return api, core, Kernel


def _vma_view(mm):
    return [(v.start, v.end, v.prot, v.flags, v.pgoff, v.name, v.maxprot,
             v.file.inode.read_at(0, v.file.inode.size) if v.file is not None else None,
             v.shmem is not None) for v in mm.vmas]


def test_checkpoint_restart_kernel_task_with_mappings():
    import io
    api, core, Kernel = _framework()
    k = Kernel()
    k.install_program("/mapper", [[None, "emit", "hi"]])
    t = k.spawn("/mapper")
    pid = k.getpid(t)
    fd = k.open(t, "/data", os.O_RDWR | os.O_CREAT, 0o644)
    k.write(t, fd, b"F" * (3 * P))
    anon = k.mmap(t, 0, 6 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    k.mem_write(t, anon + 3, b"anonymous" * 1000)
    k.mprotect(t, anon + 5 * P, P, PROT_READ)
    shm = k.mmap(t, 0, 2 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    k.mem_write(t, shm + P + 7, b"segment")
    priv = k.mmap(t, 0, 3 * P, RW, MAP_PRIVATE, fd, 0)
    k.mem_write(t, priv + P, b"private copy")
    shf = k.mmap(t, 0, P, RW, MAP_SHARED, fd, 2 * P)
    k.mem_write(t, shf, b"through the file")
    k.brk(t, t.mm.brk + 3 * P)
    k.mem_write(t, t.mm.start_brk, b"heap data")
    k.cgroup_create(k.init, "/c")
    k.cgroup_attach(k.init, "/c", pid)
    k.freeze(k.init, "/c")
    image = io.BytesIO()
    api.checkpoint(k, k.init, pid, image, core.CHECKPOINT_SUBTREE)

    k2 = Kernel()
    restored = api.restart_tasks(k2, k2.init, 0, image.getvalue(), restore_fs=True)
    mm2 = restored[0].mm
    assert _vma_view(mm2) == _vma_view(t.mm)
    for v in t.mm.vmas:
        if v.prot & PROT_READ:
            assert mm2.read(v.start, v.end - v.start) == t.mm.read(v.start, v.end - v.start)
    for name in MM.FIELDS:
        assert getattr(mm2, name) == getattr(t.mm, name)
    assert mm2.exe_file is not None

"""The memory kind's ELF records (MM_ELF, FILE_ID, VDSO_LAYOUT, VDSO_SYMBOL), through the real
framework and codec on model kernels: what is written, what comes back as mm.file_ids and
mm.vdso_layout, byte-identical re-checkpoints, and the restore's refusals of bad records."""
import errno
import hashlib
import io
import os

import pytest

from ckptsim.cr import api
from ckptsim.cr.context import RestartError
from ckptsim.image import core, decode_all
from ckptsim.image.codec import ImageWriter
from ckptsim.kinds import memory
from ckptsim.kinds.memory import ID_BUILD_ID, ID_SHA256, FileIdentity, VdsoLayout
from ckptsim.model.kernel import Kernel

VDSO = VdsoLayout(0x4000, 0x2000, 0x2000, bytes.fromhex("e95baaeaec8534edc5df"),
                  (("__vdso_clock_gettime", 0xaf0, 902), ("clock_gettime", 0xaf0, 902),
                   ("__vdso_time", 0xac0, 40)))


def _task(k):
    k.install_program("/prog", [[None, "emit", "hi"]])
    t = k.spawn("/prog")
    fd = k.open(t, "/lib.so", os.O_RDWR | os.O_CREAT, 0o755)
    k.write(t, fd, b"L" * 8192)
    lib = k.mmap(t, 0, 8192, memory.PROT_ALL & 5, memory.MAP_PRIVATE, fd, 0)   # r-x
    k.open(t, "/other", os.O_RDWR | os.O_CREAT, 0o644)                          # not mapped
    return t, fd, lib


def _checkpoint(k, t) -> bytes:
    pid = k.getpid(t)
    k.cgroup_create(k.init, "/c")
    k.cgroup_attach(k.init, "/c", pid)
    k.freeze(k.init, "/c")
    image = io.BytesIO()
    api.checkpoint(k, k.init, pid, image, core.CHECKPOINT_SUBTREE)
    return image.getvalue()


def _restart(data: bytes):
    k2 = Kernel()
    return k2, api.restart_tasks(k2, k2.init, 0, data, restore_fs=True)


def _records(data, name):
    return [r for r in decode_all(data) if r.name == name]


def _with_ids():
    k = Kernel()
    t, fd, lib = _task(k)
    mm = t.mm
    lib_file = mm.find_vma(lib).file
    exe_id = FileIdentity(ID_BUILD_ID, bytes.fromhex("135afc8c6d1b9e02"), 43888, 1663687647 * 10**9)
    lib_id = FileIdentity(ID_SHA256, hashlib.sha256(b"L" * 8192).digest(), 8192, 5)
    mm.file_ids = {mm.exe_file: exe_id, lib_file: lib_id}
    mm.vdso_layout = VDSO
    return k, t, exe_id, lib_id


def test_model_mm_writes_an_empty_mm_elf():
    k = Kernel()
    t, _, _ = _task(k)
    data = _checkpoint(k, t)
    [rec] = _records(data, "MM_ELF")
    assert (rec["nr_file_ids"], rec["nr_vdso"]) == (0, 0)
    assert not _records(data, "FILE_ID") and not _records(data, "VDSO_LAYOUT")
    _, tasks = _restart(data)
    assert tasks[0].mm.file_ids == {} and tasks[0].mm.vdso_layout is None


def test_ids_and_vdso_round_trip_byte_identical():
    k, t, exe_id, lib_id = _with_ids()
    data = _checkpoint(k, t)
    ids = _records(data, "FILE_ID")
    assert [(r["id_kind"], bytes(r.var), r["size"], r["mtime_ns"]) for r in ids] == \
        [(ID_BUILD_ID, exe_id.value, 43888, exe_id.mtime_ns), (ID_SHA256, lib_id.value, 8192, 5)]
    [lay] = _records(data, "VDSO_LAYOUT")
    assert (lay["vvar_size"], lay["vvar_vclock_size"], lay["vdso_size"], lay["nr_symbols"],
            bytes(lay.var)) == (0x4000, 0x2000, 0x2000, 3, VDSO.build_id)
    assert [(s.var, s["offset"], s["size"]) for s in _records(data, "VDSO_SYMBOL")] == \
        list(VDSO.symbols)

    k2, tasks = _restart(data)
    mm2 = tasks[0].mm
    by_path = {f.path: ident for f, ident in mm2.file_ids.items()}
    assert by_path == {"/prog": exe_id, "/lib.so": lib_id}
    assert mm2.exe_file in mm2.file_ids
    assert mm2.vdso_layout == VDSO
    assert mm2.vdso_layout.offsets["__vdso_time"] == 0xac0
    assert mm2.vdso_layout.sizes == {"[vvar]": 0x4000, "[vvar_vclock]": 0x2000, "[vdso]": 0x2000}
    # checkpointed again, the restored tree writes the same bytes (apart from the header's
    # crid/time, equal here because the model's clock and crid counter start alike)
    again = _checkpoint(k2, tasks[0])
    strip = lambda d: [(r.name, r.values, r.var) for r in decode_all(d)
                       if r.name in ("MM_ELF", "FILE_ID", "VDSO_LAYOUT", "VDSO_SYMBOL")]
    assert strip(again) == strip(data)


def test_fork_keeps_and_exec_drops_the_ids():
    k, t, exe_id, lib_id = _with_ids()
    child = t.mm.fork_copy(k)
    assert child.file_ids == t.mm.file_ids and child.file_ids is not t.mm.file_ids
    assert child.vdso_layout == VDSO
    child.exec_reset(k, None)
    assert child.file_ids == {} and child.vdso_layout is None


def test_unmapped_file_keeps_no_id():
    k, t, exe_id, lib_id = _with_ids()
    lib = [v for v in t.mm.vmas if v.file is not None and v.file.path == "/lib.so"][0]
    k.munmap(t, lib.start, lib.end - lib.start)
    data = _checkpoint(k, t)
    [rec] = _records(data, "MM_ELF")
    assert rec["nr_file_ids"] == 1
    assert [bytes(r.var) for r in _records(data, "FILE_ID")] == [exe_id.value]


def _rewrite(data: bytes, edit) -> bytes:
    """The image with ``edit(record)`` applied to every record (returning new (values, var)
    or None to keep it), written again through the codec."""
    out = io.BytesIO()
    writer = ImageWriter(out)
    for rec in decode_all(data):
        if rec.layout is core.TAIL:
            continue
        changed = edit(rec)
        values, var = changed if changed is not None else (dict(rec.values), rec.var)
        writer.write(rec.layout, var=var, **values)
    writer.finish()
    return out.getvalue()


@pytest.mark.parametrize("name, change, words", [
    ("FILE_ID", {"file_objref": 1}, "not a file this mm maps"),
    ("FILE_ID", {"id_kind": 9}, "bad identity"),
    ("VDSO_SYMBOL", {"offset": 0x2000}, "outside"),
    ("MM_ELF", {"nr_vdso": 2}, "at most 1"),
])
def test_bad_records_are_refused(name, change, words):
    k, t, _, _ = _with_ids()
    data = _checkpoint(k, t)
    if "file_objref" in change:   # a FILE objref, but one of a file this mm does not map
        recs = decode_all(data)
        at = next(i for i, r in enumerate(recs) if r.name == "FILE_NAME" and r.var == "/other")
        change = {"file_objref": next(r["objref"] for r in reversed(recs[:at])
                                      if r.name == "OBJREF")}
    seen = []

    def edit(rec):
        if rec.name != name or seen:
            return None
        seen.append(rec)
        return {**rec.values, **change}, rec.var

    bad = _rewrite(data, edit)
    assert seen
    with pytest.raises(RestartError) as info:
        _restart(bad)
    assert info.value.errno == errno.EINVAL and words in str(info.value)


def test_sha256_identity_must_be_32_bytes():
    k, t, _, _ = _with_ids()
    data = _checkpoint(k, t)

    def edit(rec):
        if rec.name == "FILE_ID" and rec["id_kind"] == ID_SHA256:
            return dict(rec.values), bytes(rec.var)[:20]
        return None

    with pytest.raises(RestartError) as info:
        _restart(_rewrite(data, edit))
    assert "bad identity" in str(info.value) and "/lib.so" in str(info.value)


def test_layouts_are_in_the_mm_range():
    assert [lay.type_id for lay in (memory.MM_ELF, memory.FILE_ID, memory.VDSO_LAYOUT,
                                    memory.VDSO_SYMBOL)] == [406, 407, 408, 409]

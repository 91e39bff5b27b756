"""The incremental records (PARENT, MM_BASE, SHMEM_BASE): layouts, and what restart refuses."""
import errno
import io

import pytest

from ckptsim.cr.api import checkpoint, restart_tasks
from ckptsim.cr.context import RestartError
from ckptsim.cr.incremental import ImageScan, tree_identity
from ckptsim.errors import ImageError
from ckptsim.image import core, decode_all
from ckptsim.image.codec import ImageWriter
from ckptsim.kinds.memory import MM_BASE, SHMEM_BASE
from ckptsim.model.kernel import Kernel
from ckptsim.model.tasks_ops import CLONE_NEWPID
from ckptsim.tools.scenarios import CGROUP

P, A, S = 4096, 0x10000000, 0x20000000


def test_layouts_and_their_range():
    assert (core.PARENT.type_id, MM_BASE.type_id, SHMEM_BASE.type_id) == (801, 802, 803)
    assert core.PARENT.fixed_size == 8 + 4 + 4 + 16
    assert MM_BASE.fixed_size == 8 and MM_BASE.item_struct.size == 16
    assert core.CHECKPOINT_INCREMENTAL & core.CHECKPOINT_USER_FLAGS == 0


@pytest.fixture(scope="module")
def pair():
    k = Kernel()
    k.mkdir(k.init, "/bin", 0o755)
    k.cgroup_create(k.init, CGROUP)
    root = k.spawn("/bin/wait", [[None, "ckpt_point"]], flags=CLONE_NEWPID)
    k.cgroup_attach(k.init, CGROUP, root.tid)
    k.run(5)
    k.freeze(k.init, CGROUP)
    k.mmap(root, A, 4 * P, 3, 0x32)
    k.mmap(root, S, P, 3, 0x31)
    k.mem_write(root, A, b"full")
    k.mem_write(root, A + 2 * P, b"full")
    full = io.BytesIO()
    checkpoint(k, k.init, root.tid, full, 0)
    k.mem_write(root, A + P, b"inc")
    k.munmap(root, A + 2 * P, P)
    k.mmap(root, A + 2 * P, P, 3, 0x32 | 0x10)
    k.mem_write(root, S, b"shared")
    inc = io.BytesIO()
    checkpoint(k, k.init, root.tid, inc, core.CHECKPOINT_INCREMENTAL, parent=full.getvalue())
    return full.getvalue(), inc.getvalue()


def test_the_records_say_what_the_parent_is(pair):
    full, inc = pair
    recs = decode_all(inc)
    hdr, parent = recs[0], recs[5]
    fscan = ImageScan(full)
    assert hdr["image_flags"] & core.IMAGE_INCREMENTAL and hdr["uflags"] == core.CHECKPOINT_INCREMENTAL
    assert bytes(hdr["parent_id"]) == fscan.image_id
    assert parent.layout is core.PARENT
    assert parent["parent_crid"] == fscan.header["crid"]
    assert parent["parent_checksum"] == fscan.checksum
    tree = next(r for r in decode_all(full) if r.name == "TREE")
    assert bytes(parent["parent_tree"]) == tree_identity(bytes(tree.var.view))
    (mm_base,) = [r for r in recs if r.layout is MM_BASE]
    assert mm_base["base_objref"] and list(mm_base.var) == [(A + 2 * P, A + 3 * P)]
    assert mm_base["nr_dropped"] == 1
    (shm_base,) = [r for r in recs if r.layout is SHMEM_BASE]
    assert shm_base["base_objref"]
    assert not any(r.layout in (core.PARENT, MM_BASE, SHMEM_BASE) for r in decode_all(full))


def rewrite(data, change) -> bytes:
    """Re-encode every record; ``change(rec)`` returns (values, var) to write instead."""
    out = io.BytesIO()
    w = ImageWriter(out)
    for rec in decode_all(data):
        values, var = change(rec) or (dict(rec.values), rec.var)
        w.write(rec.layout, var, **values)
    w.finish()
    return out.getvalue()


def restart_of(data, chain):
    k = Kernel()
    try:
        restart_tasks(k, k.init, 0, data, core.RESTART_FROZEN, restore_fs=True, chain=chain)
    finally:
        assert [t for t in k.live_tasks() if t is not k.init and t.state != "dead"] == []


def test_rewriting_unchanged_restarts(pair):
    full, inc = pair
    assert rewrite(inc, lambda rec: None) == inc
    k = Kernel()
    t = restart_tasks(k, k.init, 0, inc, core.RESTART_FROZEN, restore_fs=True, chain=[full])[0]
    assert (k.mem_read(t, A, 4), k.mem_read(t, A + P, 3), k.mem_read(t, A + 2 * P, 4),
            k.mem_read(t, S, 6)) == (b"full", b"inc", bytes(4), b"shared")


@pytest.mark.parametrize("change, message", [
    (lambda rec: rec.layout is MM_BASE and ({**rec.values, "base_objref": 99}, rec.var),
     "has no mm with objref 99"),
    (lambda rec: rec.layout is SHMEM_BASE and ({**rec.values, "base_objref": 98}, None),
     "no shared segment with objref 98"),
    (lambda rec: rec.layout is MM_BASE and ({**rec.values, "nr_dropped": 2}, rec.var),
     "announces 2 dropped ranges, holds 1"),
    (lambda rec: rec.layout is MM_BASE and (dict(rec.values), [(A + 2 * P + 1, A + 3 * P)]),
     "unaligned, empty or out of order"),
    (lambda rec: rec.layout is core.PARENT and ({**rec.values, "parent_crid": 7}, None),
     "crid 1 where the child expects 7"),
])
def test_restart_refuses_inconsistent_incremental_records(pair, change, message):
    full, inc = pair
    bad = rewrite(inc, change)
    with pytest.raises(RestartError) as e:
        restart_of(bad, [full])
    assert e.value.errno == errno.EINVAL and message in str(e.value)


def test_an_incremental_flag_without_its_parent_record_is_refused(pair):
    full, inc = pair
    out = io.BytesIO()
    w = ImageWriter(out)
    for rec in decode_all(inc):
        if rec.layout is not core.PARENT:
            w.write(rec.layout, rec.var, **rec.values)
    w.finish()
    with pytest.raises(ImageError) as e:
        restart_of(out.getvalue(), [full])
    assert "expected PARENT" in str(e.value)


def test_incremental_records_in_an_image_not_flagged_incremental_are_refused(pair):
    full, inc = pair
    flagless = rewrite(inc, lambda rec: rec.layout is core.HEADER and (
        {**rec.values, "image_flags": core.IMAGE_MODEL}, None))
    with pytest.raises(ImageError):
        restart_of(flagless, [full])

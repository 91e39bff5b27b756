"""Incremental images of the model: exact dirty sets, chains, and their errors."""
import errno
import hashlib
import io

import pytest
from hypothesis import given, settings, strategies as st

from ckptsim.cr.api import checkpoint, restart_tasks
from ckptsim.cr.context import CheckpointError, RestartError
from ckptsim.cr.incremental import ImageChain, ImageScan
from ckptsim.cr.replay import replay
from ckptsim.image import core
from ckptsim.model.kernel import Kernel
from ckptsim.model.mm_dirty import MADV_DONTNEED
from ckptsim.model.tasks_ops import CLONE_NEWPID
from ckptsim.tools.scenarios import CGROUP

P = 4096
A = 0x10000000          # a private anonymous area
S = 0x20000000          # a shared anonymous area
INCR = core.CHECKPOINT_INCREMENTAL
WAIT = [[None, "ckpt_point"]]


def container(k, program=WAIT):
    k.mkdir(k.init, "/bin", 0o755)
    k.cgroup_create(k.init, CGROUP)
    root = k.spawn("/bin/wait", program, flags=CLONE_NEWPID)
    k.cgroup_attach(k.init, CGROUP, root.tid)
    k.run(10)
    k.freeze(k.init, CGROUP)
    return root


def image(k, root, parent=None, flags=0):
    buf = io.BytesIO()
    checkpoint(k, k.init, root.tid, buf, flags | (INCR if parent is not None else 0), parent=parent)
    return buf.getvalue()


@pytest.fixture
def setup():
    k = Kernel()
    root = container(k)
    k.mmap(root, A, 16 * P, 3, 0x32)
    k.mmap(root, S, 4 * P, 3, 0x31)
    for i in (0, 2, 3, 9):
        k.mem_write(root, A + i * P + 5, f"full-{i}".encode())
    k.mem_write(root, S + P, b"shared-1")
    full = image(k, root)
    return k, root, full


def memory_of(k, tasks):
    """Every readable byte of every restored task, hashed per VMA."""
    out = {}
    for t in tasks:
        if t.state == "zombie":
            continue
        out[t.pid.nr_in(tasks[0].ns)] = [
            (v.start, v.end, v.prot, hashlib.sha256(t.mm._read_vma(v, v.start, v.end)).hexdigest())
            for v in t.mm.vmas]
    return out


def restored(data, chain=None):
    k = Kernel()
    tasks = restart_tasks(k, k.init, 0, data, core.RESTART_FROZEN, restore_fs=True, chain=chain)
    return memory_of(k, tasks), [(t.pid.nr_in(tasks[0].ns), t.state, t.comm) for t in tasks]


def test_an_incremental_image_holds_exactly_the_pages_written_since_its_parent(setup):
    k, root, full = setup
    k.mem_write(root, A + 3 * P + 4000, b"x" * 200)        # across pages 3 and 4
    k.mem_write(root, A + 7 * P, bytes(P))                 # a written page of zeros counts
    k.mem_write(root, S + 2 * P, b"shared-2")
    inc = image(k, root, parent=full)
    scan = ImageScan(inc)
    assert scan.incremental and scan.parent_id == ImageScan(full).image_id
    (mm,) = scan.mms.values()
    assert sorted(i * P for i in mm.pages) == [A + 3 * P, A + 4 * P, A + 7 * P]
    (seg,) = scan.shmems.values()
    assert sorted(seg.pages) == [2]
    assert scan.task_pages() == {1: [A + 3 * P, A + 4 * P, A + 7 * P, S + 2 * P]}
    assert mm.drops == [] and mm.base and seg.base


def test_nothing_written_gives_no_pages_and_the_same_contents(setup):
    k, root, full = setup
    inc = image(k, root, parent=full)
    assert ImageScan(inc).nr_pages == 0
    assert restored(inc, [full]) == restored(image(k, root))


def test_dirty_state_resets_only_after_a_successful_checkpoint(setup):
    k, root, full = setup
    k.mem_write(root, A + 5 * P, b"five")
    k.thaw(k.init, CGROUP)
    with pytest.raises(CheckpointError) as e:      # not frozen: refused
        image(k, root, parent=full)
    assert e.value.errno == errno.EBUSY
    assert root.mm.dirty_pages() == [A + 5 * P]
    k.freeze(k.init, CGROUP)
    inc = image(k, root, parent=full)
    assert root.mm.dirty_pages() == []
    assert sorted(ImageScan(inc).task_pages()[1]) == [A + 5 * P]


def test_dropped_ranges_are_recorded_and_applied(setup):
    k, root, full = setup
    k.madvise(root, A + 2 * P, 2 * P, MADV_DONTNEED)        # pages 2 and 3: zero again
    k.munmap(root, A + 9 * P, P)
    k.mmap(root, A + 9 * P, P, 3, 0x32 | 0x10)              # mapped again: must read zeros
    k.mem_write(root, A + 3 * P, b"again")                   # dropped, then written
    inc = image(k, root, parent=full)
    (mm,) = ImageScan(inc).mms.values()
    assert mm.drops == [(A + 2 * P, A + 3 * P), (A + 9 * P, A + 10 * P)]
    assert sorted(i * P for i in mm.pages) == [A + 3 * P]
    assert restored(inc, [full]) == restored(image(k, root))
    kr = Kernel()
    t = restart_tasks(kr, kr.init, 0, inc, core.RESTART_FROZEN, restore_fs=True, chain=[full])[0]
    assert kr.mem_read(t, A + 2 * P + 5, 6) == bytes(6)
    assert kr.mem_read(t, A + 3 * P, 5) == b"again"
    assert kr.mem_read(t, A + 9 * P + 5, 6) == bytes(6)
    assert kr.mem_read(t, A + 5, 6) == b"full-0"


def test_a_chain_of_three_restarts_from_the_newest(setup, tmp_path):
    k, root, full = setup
    k.mem_write(root, A + P, b"second")
    inc1 = image(k, root, parent=full)
    k.mem_write(root, A + 2 * P, b"third")
    k.mremap(root, A + 9 * P, P, P, 3, A + 14 * P)           # MAYMOVE|FIXED: page 9 moves
    inc2 = image(k, root, parent=inc1)
    want = restored(image(k, root))
    assert restored(inc2, [full, inc1]) == want
    for i, data in enumerate((full, inc1, inc2)):
        (tmp_path / f"img{i}").write_bytes(data)
    (tmp_path / "notes.txt").write_text("not an image")
    assert restored(inc2, str(tmp_path)) == want
    assert restored(inc2, ImageChain(directories=[tmp_path])) == want


def test_replay_round_trips_an_incremental_image_byte_for_byte(setup):
    k, root, full = setup
    k.mem_write(root, A + P, b"second")
    k.madvise(root, A, P, MADV_DONTNEED)
    k.mem_write(root, S, b"shared-0")
    inc = image(k, root, parent=full)
    report = replay(inc, roundtrip=True, chain=[full])
    assert report.ok, report.summary()
    assert report.roundtrip == "identical"


def test_fork_and_exec_after_the_parent(setup):
    k, root, full = setup
    child = k.clone(root)               # a copy of root's mm: the same base
    k.mem_write(child, A + 4 * P, b"child")
    k.mem_write(root, A + 6 * P, b"root")
    inc = image(k, root, parent=full)
    scan = ImageScan(inc)
    pages = scan.task_pages()
    assert pages[1] == [A + 6 * P]
    assert pages[child.pid.nr_in(root.ns)] == [A + 4 * P]
    assert restored(inc, [full]) == restored(image(k, root))


def test_an_mm_without_a_base_is_saved_in_full(setup):
    k, root, full = setup
    k.execve(root, "/bin/wait")                           # a new address space
    k.mmap(root, A, P, 3, 0x32)
    k.mem_write(root, A, b"new")
    inc = image(k, root, parent=full)
    (mm,) = ImageScan(inc).mms.values()
    assert mm.base == 0 and sorted(i * P for i in mm.pages) == [A]
    assert restored(inc, [full]) == restored(image(k, root))


def test_restart_then_checkpoint_incrementally_against_the_restarted_image(setup):
    k, root, full = setup
    k2 = Kernel()
    t = restart_tasks(k2, k2.init, 0, full, core.RESTART_FROZEN, restore_fs=True)[0]
    k2.mem_write(t, A + 8 * P, b"after restart")
    image_id = ImageScan(full).image_id
    buf = io.BytesIO()
    checkpoint(k2, k2.init, t.tid, buf, core.CHECKPOINT_SUBTREE | INCR, parent=image_id)
    scan = ImageScan(buf.getvalue())
    assert scan.task_pages() == {1: [A + 8 * P]}


def test_parent_and_flag_must_come_together_and_an_unknown_id_is_refused(setup):
    k, root, full = setup
    for flags, parent in ((INCR, None), (0, full)):
        with pytest.raises(CheckpointError) as e:
            checkpoint(k, k.init, root.tid, io.BytesIO(), flags, parent=parent)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(CheckpointError) as e:
        checkpoint(k, k.init, root.tid, io.BytesIO(), INCR, parent=bytes(range(16)))
    assert e.value.errno == errno.ENOENT and bytes(range(16)).hex() in str(e.value)
    with pytest.raises(CheckpointError) as e:
        checkpoint(k, k.init, root.tid, io.BytesIO(), INCR, parent=b"junk" * 20)
    assert e.value.errno == errno.EINVAL
    assert image(k, root, parent=ImageScan(full).image_id)   # by id: this kernel wrote it


def test_a_missing_or_mismatched_parent_is_a_clear_error(setup):
    k, root, full = setup
    k.mem_write(root, A, b"changed")
    inc = image(k, root, parent=full)
    parent_id = ImageScan(full).image_id.hex()
    with pytest.raises(RestartError) as e:
        restored(inc)
    assert e.value.errno == errno.ENOENT and parent_id in str(e.value)
    with pytest.raises(RestartError) as e:
        restored(inc, [])
    assert e.value.errno == errno.ENOENT and parent_id in str(e.value)
    # Another kernel with the same seed writes an image with the same id, other contents.
    k2 = Kernel()
    root2 = container(k2)
    k2.mmap(root2, A, P, 3, 0x32)
    other = image(k2, root2)
    assert ImageScan(other).image_id == ImageScan(full).image_id
    with pytest.raises(RestartError) as e:
        restored(inc, [other])
    assert e.value.errno == errno.EINVAL and "does not match" in str(e.value)
    assert "checksum" in str(e.value)
    k3 = Kernel()
    with pytest.raises(RestartError):
        restart_tasks(k3, k3.init, 0, inc, core.RESTART_FROZEN, restore_fs=True, chain=[other])
    assert [t for t in k3.live_tasks() if t is not k3.init] == []    # nothing left behind


# -- the property: restart(chain) == restart(full image) ---------------------------------------
OPS = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 15 * P), st.binary(min_size=1, max_size=2 * P)),
    st.tuples(st.just("zero"), st.integers(0, 15), st.integers(1, 3)),
    st.tuples(st.just("dontneed"), st.integers(0, 15), st.integers(1, 4)),
    st.tuples(st.just("unmap_remap"), st.integers(0, 15), st.integers(1, 4)),
    st.tuples(st.just("shared"), st.integers(0, 4 * P - 64), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("fork")),
    st.tuples(st.just("ckpt")),
)


def _apply(k, tasks, op, n):
    t = tasks[n % len(tasks)]
    kind = op[0]
    if kind == "write":
        k.mem_write(t, A + op[1], op[2][:16 * P - op[1]])
    elif kind == "zero":
        k.mem_write(t, A + op[1] * P, bytes(min(op[2], 16 - op[1]) * P))
    elif kind == "dontneed":
        k.madvise(t, A + op[1] * P, min(op[2], 16 - op[1]) * P, MADV_DONTNEED)
    elif kind == "unmap_remap":
        length = min(op[2], 16 - op[1]) * P
        k.munmap(t, A + op[1] * P, length)
        k.mmap(t, A + op[1] * P, length, 3, 0x32 | 0x10)
    elif kind == "shared":
        k.mem_write(t, S + op[1], op[2])
    elif kind == "fork" and len(tasks) < 4:
        child = k.clone(t)
        tasks.append(child)


@settings(max_examples=40, deadline=None)
@given(st.lists(OPS, min_size=1, max_size=25))
def test_restart_of_a_chain_equals_restart_of_a_full_image(ops):
    k = Kernel()
    root = container(k)
    k.mmap(root, A, 16 * P, 3, 0x32)
    k.mmap(root, S, 4 * P, 3, 0x31)
    for i in range(0, 16, 2):                    # the first image holds pages to drop later
        k.mem_write(root, A + i * P, f"base-{i}".encode())
    tasks = [root]
    chain = [image(k, root)]
    for n, op in enumerate(ops):
        if op[0] == "ckpt":
            chain.append(image(k, root, parent=chain[-1]))
        else:
            _apply(k, tasks, op, n)
    newest = image(k, root, parent=chain[-1])
    full = image(k, root)
    assert restored(newest, chain) == restored(full)
    assert replay(newest, roundtrip=True, chain=chain).roundtrip == "identical"


def test_ckptsim_replay_finds_the_chain_beside_the_image_or_where_told(setup, tmp_path, capsys):
    from ckptsim.tools.cli import main
    k, root, full = setup
    k.mem_write(root, A + P, b"second")
    inc = image(k, root, parent=full)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "inc.img").write_bytes(inc)
    (tmp_path / "full.img").write_bytes(full)
    assert main(["replay", "--roundtrip", str(tmp_path / "a" / "inc.img")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckptsim: error: ENOENT") and "needs its parent image" in err
    assert main(["replay", "--roundtrip", str(tmp_path / "a" / "inc.img"),
                 "--parent", str(tmp_path)]) == 0
    assert "roundtrip: identical" in capsys.readouterr().out


def test_ancestors_found_in_a_directory_must_be_trustworthy(setup, tmp_path):
    """A file planted in a shared directory cannot supply an ancestor: ancestors are regular
    files owned by the user (or root) and writable by nobody else, and an id claimed twice is
    refused."""
    import os
    k, root, full = setup
    k.mem_write(root, A + P, b"second")
    inc = image(k, root, parent=full)
    parent = tmp_path / "parent.img"
    parent.write_bytes(full)
    os.chmod(parent, 0o600)
    assert restored(inc, str(tmp_path)) == restored(image(k, root))   # as images are written
    os.chmod(parent, 0o666)                                            # anyone could write it
    with pytest.raises(RestartError) as e:
        restored(inc, str(tmp_path))
    assert e.value.errno == errno.ENOENT
    os.chmod(parent, 0o600)
    (tmp_path / "copy.img").write_bytes(full)
    os.chmod(tmp_path / "copy.img", 0o600)
    with pytest.raises(RestartError) as e:
        restored(inc, str(tmp_path))
    assert e.value.errno == errno.EINVAL and "more than one file" in str(e.value)

"""``checkpoint --freezer``: the tree is stopped through a temporary freezer cgroup (v1 and v2)
and then ptrace-stopped; the image is the one the ptrace-only path writes, and afterwards
every task is thawed, untraced and back in its own cgroup, the temporary cgroup gone."""
from __future__ import annotations

import errno
import glob
import io
import os

import pytest

from backend import cli, freezer
from backend.dump import checkpoint
from ckptsim.cr.context import CheckpointError
from ckptsim.image import core, decode_all

FROZEN_WCHANS = {"__refrigerator", "do_freezer_trap"}


def _hierarchy_or_skip(version: int) -> freezer.Hierarchy:
    try:
        return freezer.hierarchy(version)
    except freezer.FreezerError as e:
        pytest.skip(str(e))


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def version(request):
    _hierarchy_or_skip(request.param)
    return request.param


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _tree(pid: int) -> list[int]:
    from backend import proc
    return proc.subtree(pid)


def _cgroups(pids) -> dict[int, str]:
    return {p: _read(f"/proc/{p}/cgroup") for p in pids}


def _our_temp_cgroups() -> list[str]:
    out = []
    for v in (1, 2):
        try:
            h = freezer.hierarchy(v)
        except freezer.FreezerError:
            continue
        out += glob.glob(os.path.join(h.mount, f"ckptsim-{os.getpid()}-*"))
    return out


def assert_released(before: dict[int, str], check_untraced) -> None:
    """Every task of ``before`` untraced, not frozen, in its original cgroups; no temporary
    cgroup of ours left."""
    for pid, cgroups in before.items():
        check_untraced(pid)
        assert _read(f"/proc/{pid}/cgroup") == cgroups, f"process {pid} not moved back"
        for tid in os.listdir(f"/proc/{pid}/task"):
            wchan = _read(f"/proc/{pid}/task/{tid}/wchan").strip()
            state = [ln for ln in _read(f"/proc/{pid}/task/{tid}/status").splitlines()
                     if ln.startswith("State:")][0]
            assert wchan not in FROZEN_WCHANS and "D (disk sleep)" not in state, \
                f"tid {tid} still frozen: {state}, wchan {wchan}"
    assert _our_temp_cgroups() == []


def _norm(rec):
    var = rec.var
    if isinstance(var, (bytes, bytearray, memoryview)):
        var = bytes(var)
    elif var is not None and not isinstance(var, str):
        var = [tuple(item) for item in var]
    return rec.layout.name, dict(rec.values), var


def pages_of(recs) -> dict[int, bytes]:
    """{page address: contents} of every page chunk in the image."""
    out = {}
    for i, r in enumerate(recs):
        if r.layout.name == "PGARR" and r["nr_pages"]:
            n = r["nr_pages"]
            buf = bytes(recs[i + 1].var)
            for k in range(n):
                addr = int.from_bytes(buf[8 * k:8 * k + 8], "little")
                out[addr] = buf[8 * n + 4096 * k:8 * n + 4096 * (k + 1)]
    return out


def _start_tree(start_target, exe, request, *args):
    """A ckpt_tree target; its child (which the target only kills on a clean exit) is
    ended by pid at teardown too."""
    t = start_target(exe, *args)
    child = t.info["child"]

    def end_child():
        try:
            os.kill(child, 9)
        except ProcessLookupError:
            pass
    request.addfinalizer(end_child)
    return t


@pytest.fixture
def tree(c_target, start_target, tmp_path, request):
    return _start_tree(start_target, c_target("ckpt_tree"), request, str(tmp_path / "data"))


@pytest.fixture
def own_cgroups(version):
    """``place(pid)`` moves a process into a fresh cgroup of the hierarchy under test (so that
    "back in its original cgroup" means something); all are removed at teardown."""
    h = freezer.hierarchy(version)
    made: list[str] = []

    def place(pid: int) -> str:
        d = os.path.join(h.mount, f"ckpttest-{os.getpid()}-{os.urandom(3).hex()}")
        os.mkdir(d)
        made.append(d)
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write(str(pid))
        return d

    try:
        yield place
    finally:
        for d in made:
            with open(os.path.join(d, "cgroup.procs")) as f:
                left = f.read().split()
            for pid in left:
                try:
                    with open(os.path.join(h.mount, "cgroup.procs"), "w") as f:
                        f.write(pid)
                except OSError:
                    pass
            for _ in range(200):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    import time
                    time.sleep(0.01)


def test_freezer_image_equals_the_ptrace_image(tree, version, own_cgroups, check_untraced):
    pids = _tree(tree.pid)
    assert len(pids) == 2
    for pid in pids:                       # parent and child each in a cgroup of their own
        own_cgroups(pid)
    # The kernel writes the thread's cpu number into glibc's rseq area (in the TLS page) when
    # it returns to user space on another cpu: pin the tree to one cpu, and let it return to
    # user space once (a warm-up checkpoint restarts its syscalls), so that it stays the same.
    cpu = min(os.sched_getaffinity(0))
    for pid in pids:
        os.sched_setaffinity(pid, {cpu})
    checkpoint(tree.pid, io.BytesIO())
    before = _cgroups(pids)
    plain, frozen = io.BytesIO(), io.BytesIO()
    checkpoint(tree.pid, plain)
    checkpoint(tree.pid, frozen, freezer=version)
    assert_released(before, check_untraced)
    a, b = decode_all(plain.getvalue()), decode_all(frozen.getvalue())
    tree_a = [r.var for r in a if r.layout.name == "TREE"]
    tree_b = [r.var for r in b if r.layout.name == "TREE"]
    assert tree_a == tree_b and len(tree_b[0]) == 2
    pages_a, pages_b = pages_of(a), pages_of(b)
    block = range(tree.info["mem"], tree.info["mem"] + 16 * 4096, 4096)
    assert tree.info["mem"] in pages_b
    assert {p: pages_a.get(p) for p in block} == {p: pages_b.get(p) for p in block}
    assert set(pages_a) == set(pages_b)  # the same pages; the kernel may rewrite a few bytes
    # (glibc's rseq area: cpu and mm_cid) between two dumps, so only the target's block is
    # compared byte for byte. Every other record is the same: tree, signals, files, creds.
    kept = {"TREE", "TASK", "TASK_OBJS", "FILE_TABLE", "FILE_DESC", "FILE", "FILE_NAME",
            "PIPE", "PIPE_BUF", "SIGHAND", "SIGNAL", "SIGNAL_TASK", "SIGPENDING", "SIGALTSTACK",
            "CRED", "TASK_CREDS", "MM", "VMA", "FS"}
    assert [_norm(r) for r in a[1:] if r.layout.name in kept] == \
        [_norm(r) for r in b[1:] if r.layout.name in kept]
    tree.write(b"thawed\n")
    assert tree.readline() == "ok thawed"


def test_freezer_failure_releases_everything(c_target, start_target, tmp_path, version,
                                             check_untraced, request):
    t = _start_tree(start_target, c_target("ckpt_tree"), request, str(tmp_path / "data"),
                    "socket")
    before = _cgroups(_tree(t.pid))
    buf = io.BytesIO()
    with pytest.raises(CheckpointError) as e:
        checkpoint(t.pid, buf, freezer=version)
    assert e.value.errno == errno.ENOSYS and "socket" in e.value.message
    assert any(r.layout is core.ERROR for r in decode_all(buf.getvalue()))
    assert_released(before, check_untraced)
    t.write(b"after failure\n")
    assert t.readline() == "ok after failure"


def test_cli_freezer(tree, tmp_path, check_untraced):
    before = _cgroups(_tree(tree.pid))
    out = tmp_path / "frozen.img"
    assert cli.main([str(tree.pid), "--freezer", "-o", str(out)]) == 0
    assert decode_all(out.read_bytes())[0]["image_flags"] & core.IMAGE_LIVE
    assert_released(before, check_untraced)


def test_a_forking_tree_is_caught_whole(start_target, tmp_path, version, check_untraced):
    """A shell that forks short-lived children all the time: whatever it forked before the
    freeze is in the image and stopped with it; nothing is left in the temporary cgroup."""
    script = tmp_path / "forker.sh"
    script.write_text("echo READY\nwhile :; do /bin/true & wait; done\n")
    t = start_target("/bin/sh", str(script))
    before = _cgroups([t.pid])
    for _ in range(3):
        buf = io.BytesIO()
        checkpoint(t.pid, buf, freezer=version)
        (rec,) = [r for r in decode_all(buf.getvalue()) if r.layout.name == "TREE"]
        pids = {e[0] for e in rec.var}
        assert t.pid in pids
        assert all(e[1] == t.pid for e in rec.var if e[0] != t.pid)  # only its children
    assert_released(before, check_untraced)


def test_a_tree_holding_the_checkpointer_is_refused_before_freezing(monkeypatch, version):
    from backend import proc
    monkeypatch.setattr(proc, "subtree", lambda pid: [pid, os.getpid()])
    with pytest.raises(freezer.FreezerError) as e:
        with freezer.frozen_seized(1, version=version):
            pass
    assert e.value.errno == errno.EINVAL and "checkpointer" in str(e.value)
    assert _our_temp_cgroups() == []


def test_no_hierarchy_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(freezer, "_mounts", lambda: [("/", "ext4", ["rw"])])
    with pytest.raises(freezer.FreezerError) as e:
        freezer.hierarchy()
    assert e.value.errno == errno.ENOSYS and "mounted" in str(e.value)


def test_ctrl_c_during_the_dump_releases_everything(tree, version, monkeypatch,
                                                    check_untraced):
    from backend import dump
    before = _cgroups(_tree(tree.pid))

    def interrupted(*args, **kwargs):
        assert _our_temp_cgroups(), "the tree should be in the temporary cgroup now"
        raise KeyboardInterrupt

    monkeypatch.setattr(dump.Gatherer, "process", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint(tree.pid, io.BytesIO(), freezer=version)
    assert_released(before, check_untraced)
    tree.write(b"after ctrl-c\n")
    assert tree.readline() == "ok after ctrl-c"

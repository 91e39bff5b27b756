"""Whole-container checkpoints of live trees (no CHECKPOINT_SUBTREE): the root must be the
init of a pid namespace (EINVAL otherwise), and nothing the tree holds may be referenced from
outside it (EBUSY naming the object, every leak in the log, the image ending in an ERROR
record, the tree running on)."""
from __future__ import annotations

import errno
import io
import os
import signal

import pytest

from backend import kabi, leaks, proc
from backend.dump import checkpoint
from ckptsim.cr.context import CheckpointError, Log
from ckptsim.image import core, decode_all

CONTAINER = 0                       # flags: a container checkpoint (no CHECKPOINT_SUBTREE)


@pytest.fixture
def container(c_target, start_target, request):
    """``container(*args)`` starts tests/backend/targets/container.c; returns (launcher
    Target, init's pid). Init and its child are killed by pid at teardown."""
    exe = c_target("container")

    def start(*args):
        t = start_target(exe, *args)
        init = t.info["init"]
        request.addfinalizer(lambda: _end_container(t, init))
        return t, init

    return start


def _end_container(t, init: int) -> None:
    members = []
    try:
        members = proc.subtree(init)
    except proc.ProcessGone:
        pass
    for pid in reversed(members):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if t.proc.poll() is None:           # the launcher reaps init on stdin EOF
        t.proc.stdin.close()
        t.proc.stdin = None
        try:
            t.proc.wait(timeout=10)
        except Exception:               # noqa: BLE001 - start_target's teardown kills it
            pass


def _running(pids) -> None:
    for pid in pids:
        st = proc.read_status(pid)
        assert st.tracer_pid == 0 and st.state != "t", f"{pid}: {st.state}, tracer {st.tracer_pid}"


def test_a_container_without_leaks_checkpoints(container):
    t, init = container()
    members = proc.subtree(init)
    assert len(members) == 2 and proc.read_status(init).nspid[-1] == 1
    assert leaks.find_leaks(members) == []
    buf = io.BytesIO()
    assert checkpoint(init, buf, CONTAINER) > 0
    recs = decode_all(buf.getvalue())
    assert not recs[0]["uflags"] & core.CHECKPOINT_SUBTREE
    assert not any(r.layout is core.ERROR for r in recs)
    (tree,) = [r for r in recs if r.layout.name == "TREE"]
    # pids as the container sees them (its init is 1), not this namespace's
    assert {e[0] for e in tree.var} == {proc.read_status(m).nspid[-1] for m in members}
    assert tree.var[0][0] == 1
    assert any(bytes(r.var) == b"inside" for r in recs if r.layout.name == "PIPE_BUF")
    _running(members)


def test_a_pipe_held_outside_is_a_leak(container):
    t, init = container()
    members = proc.subtree(init)
    pipe_fd = next(f.fd for f in proc.read_fds(init) if f.kind is proc.FdKind.PIPE
                   and f.access_mode == os.O_WRONLY)
    ino = os.stat(f"/proc/{init}/fd/{pipe_fd}").st_ino
    ours = os.open(f"/proc/{init}/fd/{pipe_fd}", os.O_WRONLY)   # a new file on the same pipe
    try:
        log = Log()
        buf = io.BytesIO()
        with pytest.raises(CheckpointError) as e:
            checkpoint(init, buf, CONTAINER, log)
        assert e.value.errno == errno.EBUSY
        assert f"pipe:[{ino}]" in e.value.message and f"process {os.getpid()}" in e.value.message
        assert f"fd {ours}" in e.value.message
        assert any(f"pipe:[{ino}]" in line for line in log.lines)
        recs = decode_all(buf.getvalue())
        assert recs[-1].layout is core.ERROR or any(r.layout is core.ERROR for r in recs)
        _running(members)
    finally:
        os.close(ours)
    # once we let go of it, the same container checkpoints
    assert checkpoint(init, io.BytesIO(), CONTAINER) > 0


def test_the_same_file_opened_twice_is_no_leak_but_the_same_description_is(container,
                                                                            tmp_path):
    path = str(tmp_path / "kept")
    t, init = container("file", path)
    own = os.open(path, os.O_RDONLY)            # an independent open() of the same file
    try:
        assert leaks.find_leaks(proc.subtree(init)) == []
        with os.fdopen(os.pidfd_open(init), closefd=True) as pidfd:
            taken = kabi.syscall(kabi.SYS_pidfd_getfd, pidfd.fileno(), 10, 0, what="pidfd_getfd")
        try:
            with pytest.raises(CheckpointError) as e:
                checkpoint(init, io.BytesIO(), CONTAINER)
            assert e.value.errno == errno.EBUSY
            assert path in e.value.message and f"fd {taken}" in e.value.message
            assert f"fd {own}" not in e.value.message
        finally:
            os.close(taken)
    finally:
        os.close(own)


def test_a_files_table_shared_with_the_outside_is_a_leak(container):
    t, init = container("sharefiles")
    found = leaks.find_leaks(proc.subtree(init))
    assert any(f"task {init} shares its files table with process {t.pid}" in line
               for line in found), found
    with pytest.raises(CheckpointError) as e:
        checkpoint(init, io.BytesIO(), CONTAINER)
    assert e.value.errno == errno.EBUSY


def test_a_root_that_is_not_a_container_init_is_einval(container, c_target, start_target):
    t, init = container()
    child = [p for p in proc.subtree(init) if p != init][0]
    assert proc.read_status(child).nspid[-1] == 2
    for pid in (child, t.pid):
        buf = io.BytesIO()
        with pytest.raises(CheckpointError) as e:
            checkpoint(pid, buf, CONTAINER)
        assert e.value.errno == errno.EINVAL and "container init" in e.value.message
        _running([pid])
    # a subtree checkpoint of the same non-init root is fine
    assert checkpoint(child, io.BytesIO()) > 0


def test_a_unix_socket_connected_outside_is_a_leak():
    """find_leaks on a tree (a sleeping child) holding one end of a socketpair whose other
    end we keep: the line names both inodes, our pid and our fd."""
    import socket
    import subprocess
    import sys
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL)
    try:
        their_ino, our_ino = os.fstat(theirs.fileno()).st_ino, os.fstat(ours.fileno()).st_ino
        theirs.close()
        lines = leaks.find_leaks([child.pid])
        assert any(f"socket:[{their_ino}]" in ln and "is connected to" in ln
                   and f"socket:[{our_ino}], held by process {os.getpid()}" in ln
                   and f"fd {ours.fileno()}" in ln for ln in lines), lines
        ours.close()
        assert not any("is connected to" in ln for ln in leaks.find_leaks([child.pid]))
    finally:
        ours.close()
        child.kill()
        child.wait()


def test_a_container_checkpoints_with_the_freezer_too(container):
    t, init = container()
    members = proc.subtree(init)
    before = {p: open(f"/proc/{p}/cgroup").read() for p in members}
    buf = io.BytesIO()
    assert checkpoint(init, buf, CONTAINER, freezer=True) > 0
    (tree,) = [r for r in decode_all(buf.getvalue()) if r.layout.name == "TREE"]
    # pids as the container sees them (its init is 1), not this namespace's
    assert {e[0] for e in tree.var} == {proc.read_status(m).nspid[-1] for m in members}
    assert tree.var[0][0] == 1
    _running(members)
    assert {p: open(f"/proc/{p}/cgroup").read() for p in members} == before

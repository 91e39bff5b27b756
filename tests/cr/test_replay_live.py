"""``ckptsim replay IMAGE --roundtrip`` on live images: real processes are checkpointed by the
live backend, restored into a fresh model and checkpointed again; the bytes must be equal.

The targets (a ``sleep`` and a small Python child holding an open file and a pipe with bytes in
it) are started by the fixtures and ended by pid at teardown, whatever the test did.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from ckptsim.cr.api import HeaderIdentity
from ckptsim.cr.replay import replay
from ckptsim.errors import ImageError
from ckptsim.image import core, decode_all
from ckptsim.tools import cli

SYS_clock_nanosleep = 230
SYS_read = 0

CHILD = r"""
import os, sys
f = open(sys.argv[1], "rb", buffering=0)
f.read(3)                           # the open file sits at offset 3
r, w = os.pipe()
os.write(w, b"buffered bytes")      # the pipe holds bytes nobody has read
os.write(1, b"READY %d %d %d\n" % (f.fileno(), r, w))
os.read(0, 1)                       # block until the test ends us
"""


TREE_CHILD = r"""
import os, threading
threading.Thread(target=threading.Event().wait, daemon=True).start()   # a second thread
child = os.fork()
if child == 0:
    os.read(0, 1)
    os._exit(0)
zombie = os.fork()
if zombie == 0:
    os._exit(3)
while open("/proc/%d/stat" % zombie).read().rsplit(")", 1)[1].split()[0] != "Z":
    os.sched_yield()                # the zombie exists before READY
os.write(1, b"READY %d %d\n" % (child, zombie))
os.read(0, 1)
"""


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        return {}


def _blocked_in(pid: int, nr: int) -> bool:
    """The process sleeps inside syscall ``nr`` (/proc/PID/syscall names it)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] == str(nr) and _status(pid).get("State", "").startswith("S")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _wait_blocked(proc: subprocess.Popen, nr: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not _blocked_in(proc.pid, nr):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"process {proc.pid} never blocked in syscall {nr} "
                                 f"(exit status {proc.poll()})")
        time.sleep(0.005)


def _end(proc: subprocess.Popen) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    finally:
        for f in (proc.stdin, proc.stdout):
            if f:
                f.close()


@pytest.fixture
def sleeper():
    """A real ``sleep 1000``, blocked in clock_nanosleep; killed by pid at teardown."""
    proc = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        _wait_blocked(proc, SYS_clock_nanosleep)
        yield proc
    finally:
        _end(proc)


@pytest.fixture
def py_child(tmp_path):
    """A Python child holding an open file (at offset 3) and a pipe with 14 bytes in it;
    it says READY on its stdout, then blocks reading stdin. Killed by pid at teardown."""
    data = tmp_path / "data.txt"
    data.write_bytes(b"hello, live replay\n")
    proc = subprocess.Popen([sys.executable, "-S", "-c", CHILD, str(data)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line.startswith(b"READY"), line
        proc.info = dict(zip(("file_fd", "pipe_r", "pipe_w"), map(int, line.split()[1:])))
        proc.data_path = str(data)
        _wait_blocked(proc, SYS_read)
        yield proc
    finally:
        _end(proc)


@pytest.fixture
def py_tree():
    """A Python process with a second thread, a child blocked in read and a zombie child.
    The child and the parent are killed by pid at teardown (the zombie goes with its parent)."""
    proc = subprocess.Popen([sys.executable, "-S", "-c", TREE_CHILD],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    kids: list[int] = []
    try:
        line = proc.stdout.readline()
        assert line.startswith(b"READY"), line
        kids = [int(x) for x in line.split()[1:]]
        yield proc, kids
    finally:
        if kids:
            try:
                os.kill(kids[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
        _end(proc)


def live_image(pid: int) -> bytes:
    from backend.dump import checkpoint   # the live backend: only these tests need it
    buf = io.BytesIO()
    assert checkpoint(pid, buf) > 0
    assert _status(pid).get("TracerPid") == "0", "the target was left traced"
    return buf.getvalue()


def by_name(recs, name):
    return [r for r in recs if r.layout.name == name]


def test_sleep_image_replays_and_round_trips(sleeper):
    image = live_image(sleeper.pid)
    head = decode_all(image)[0]
    assert head["image_flags"] & core.IMAGE_LIVE and head["arch"] == core.ARCH_X86_64
    report = replay(image, roundtrip=True)
    assert report.live and report.tasks == 1 and not report.problems, report.summary()
    assert report.not_runnable == 1, "a live task must not get a model program"
    assert "/usr/bin/sleep" in report.placeholders or any(
        p.endswith("/sleep") for p in report.placeholders), report.placeholders
    assert report.roundtrip == "identical", report.summary()


def test_python_child_with_file_and_pipe_round_trips(py_child):
    image = live_image(py_child.pid)
    recs = decode_all(image)
    # the image holds what the child holds: the file at offset 3, the pipe's bytes
    assert any(r.var == py_child.data_path for r in by_name(recs, "FILE_NAME"))
    assert any(r["f_pos"] == 3 for r in by_name(recs, "FILE"))
    assert [bytes(r.var) for r in by_name(recs, "PIPE_BUF")].count(b"buffered bytes") == 1
    (tree,) = by_name(recs, "TREE")
    assert tree.var[0][0] == py_child.pid and tree.var[0][3:5] == (0, 0)  # groups outside

    report = replay(image, roundtrip=True)
    assert not report.problems and report.roundtrip == "identical", report.summary()
    assert py_child.data_path in report.placeholders
    assert report.fds == len(by_name(recs, "FILE_DESC")) >= 6 and report.not_runnable == 1
    # the child was not disturbed: its pipe still holds the bytes
    assert os.read(os.open(f"/proc/{py_child.pid}/fd/{py_child.info['pipe_r']}",
                           os.O_RDONLY | os.O_NONBLOCK), 64) == b"buffered bytes"


def test_python_tree_with_thread_child_and_zombie_round_trips(py_tree):
    proc, (child, zombie) = py_tree
    image = live_image(proc.pid)
    (tree,) = by_name(decode_all(image), "TREE")
    pids = [e[0] for e in tree.var]
    assert pids[0] == proc.pid and child in pids and zombie in pids and len(pids) == 4
    report = replay(image, roundtrip=True)
    assert not report.problems and report.roundtrip == "identical", report.summary()
    assert report.tasks == 4 and report.zombies == 1 and report.not_runnable == 3


def test_python_child_raw_image_round_trips(py_child):
    """The image exactly as the live backend writes it comes back byte for byte: all-zero
    anonymous pages are left out by both the live backend and the model, and copied-on-write
    pages of private file mappings are kept by both, zero or not."""
    image = live_image(py_child.pid)
    report = replay(image, roundtrip=True)
    assert not report.problems, report.summary()
    assert report.roundtrip == "identical", report.summary()


def test_cli_replay_of_a_live_image(sleeper, tmp_path, capsys):
    path = tmp_path / "sleep.img"
    path.write_bytes(live_image(sleeper.pid))
    assert cli.main(["replay", str(path), "--roundtrip"]) == 0
    out = capsys.readouterr().out
    assert "not runnable in the model" in out and "roundtrip: identical" in out


def test_live_restore_keeps_the_tree_record(sleeper):
    """The restored tree, checkpointed again, gives the same TREE (real pid, groups outside = 0)."""
    from ckptsim.cr.api import checkpoint, restart_job
    from ckptsim.model.kernel import Kernel
    image = live_image(sleeper.pid)
    k = Kernel(0)
    tasks, rctx = restart_job(k, k.init, 0, image, core.RESTART_FROZEN, restore_fs=True)
    assert tasks[0].pid.nr_in(tasks[0].pid.ns) == sleeper.pid
    assert tasks[0].x86 is not None and tasks[0].cpu is None and tasks[0].program is None
    path = tasks[0].cgroup.path
    k.thaw(k.init, path)
    assert not tasks[0].runnable(), "a live task has no model program: it must never run"
    k.freeze(k.init, path)
    buf = io.BytesIO()
    checkpoint(k, k.init, tasks[0].pid.nr_in(k.init.ns), buf, core.CHECKPOINT_SUBTREE,
               identity=HeaderIdentity.of_image(image))
    again = decode_all(buf.getvalue())
    assert list(by_name(again, "TREE")[0].var) == list(by_name(decode_all(image), "TREE")[0].var)
    assert not by_name(again, "FS_SNAPSHOT"), "a live image must not gain a file-system snapshot"
    head = again[0]
    assert head["image_flags"] == core.IMAGE_LIVE and head["arch"] == core.ARCH_X86_64
    assert [r.var for r in again[1:4]] == [os.uname().release, os.uname().version, os.uname().machine]


def test_a_model_restart_without_placeholders_names_the_missing_file(sleeper):
    """Outside a replay (no restore_fs), a live image's paths must exist: a clear error."""
    from ckptsim.cr.api import restart_tasks
    from ckptsim.cr.context import RestartError
    from ckptsim.model.kernel import Kernel
    k = Kernel(0)
    with pytest.raises((RestartError, ImageError)) as e:
        restart_tasks(k, k.init, 0, live_image(sleeper.pid), core.RESTART_FROZEN)
    assert "does not exist" in str(e.value)
    assert len(k.live_tasks()) == len(Kernel(0).live_tasks()), "a failed restart left tasks"


@pytest.mark.parametrize("mutate", ["flags", "arch"])
def test_cli_replay_refuses_bad_live_headers_in_one_line(sleeper, tmp_path, capsys, mutate):
    from ckptsim.image.codec import ImageWriter
    recs = decode_all(live_image(sleeper.pid))
    buf = io.BytesIO()
    w = ImageWriter(buf)
    for i, r in enumerate(recs):
        if r.layout is core.TAIL:
            continue
        values = dict(r.values)
        if i == 0:
            if mutate == "flags":
                values["image_flags"] = 0
            else:
                values["arch"] = 5
        w.write(r.layout, r.var, **values)
    w.finish()
    path = tmp_path / "bad.img"
    path.write_bytes(buf.getvalue())
    assert cli.main(["replay", str(path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert ("image_flags" in err[0]) if mutate == "flags" else ("arch" in err[0])

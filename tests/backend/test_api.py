"""backend/api.py: the seed's checkpoint(pid, fd, flags, logfd) and restart(pid, fd, flags,
logfd) on real processes, through file descriptors, and the self-checkpoint of a Python
process (the crid in the original, 0 in the restarted one).

The targets are small Python programs writing to a file (a restored process gets a fresh pipe
for a pipe whose other end was outside its tree, so files are what a test can read after a
restart). Every process is ended by pid at teardown: originals are killed and reaped, a
restored tree through its namespace init (this process's child), which is then reaped.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from backend import api
from ckptsim.cr.context import CheckpointError, RestartError
from ckptsim.errors import CkptsimError
from ckptsim.image import core

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="live checkpoint/restart needs root")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COUNTER = r"""
import os, sys, time
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
n = 0
while True:
    os.write(out, b"%d\n" % n)
    n += 1
    time.sleep(0.01)
"""

SELF_CHECKPOINT = r"""
import os, sys, time
sys.path.insert(0, sys.argv[3])
from backend.api import checkpoint
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
image = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
flags = int(sys.argv[4])
secret = os.urandom(8).hex()          # memory only the restored image can give back
os.write(out, b"secret %s\n" % secret.encode())
try:
    crid = checkpoint(0, image, flags, -1)
except Exception as e:
    os.write(out, b"error %s\n" % str(e).encode())
    crid = -1
os.write(out, b"crid %d pid %d secret %s\n" % (crid, os.getpid(), secret.encode()))
for i in range(100000):
    os.write(out, b"tick %d\n" % i)
    time.sleep(0.01)
"""


class Processes:
    """What a test started (Popen) or restored (pids of restored roots and their reaper,
    this process's child); all ended by pid in ``end_all``."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []
        self.restored: list[tuple[int, int]] = []      # (root, our child)

    def start(self, *argv: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait(timeout=10)

    def add_restored(self, root: int, child: int) -> None:
        self.restored.append((root, child))

    def end_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for root, child in self.restored:
            for pid in (root, child):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _reap(child)


def _reap(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.01)
    raise AssertionError(f"restored process {pid} did not exit")


@pytest.fixture
def procs():
    p = Processes()
    try:
        yield p
    finally:
        p.end_all()


def _lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]


def _wait_for(path: str, predicate, what: str, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = _lines(path)
        if predicate(lines):
            return lines
        if time.monotonic() > deadline:
            notes = [x for x in lines if not x.startswith("tick ")]
            pytest.fail(f"timed out waiting for {what}; {path} ends with {lines[-3:]}, "
                        f"other lines: {notes[:6]}")
        time.sleep(0.01)


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


# -- checkpoint and restart through fds ---------------------------------------------------
def test_checkpoint_to_fd_then_restart_from_fd_continues_the_count(procs, tmp_path):
    out, image = str(tmp_path / "out.txt"), str(tmp_path / "image")
    target = procs.start("-c", COUNTER, out)
    _wait_for(out, lambda ls: len(ls) >= 5, "the counter's first lines")
    log = str(tmp_path / "log")
    with open(image, "wb") as img, open(log, "w") as logf:
        os.write(img.fileno(), b"xxx")            # the image goes at the fd's position
        os.kill(target.pid, signal.SIGSTOP)       # nothing written between image and kill
        crid = api.checkpoint(target.pid, img.fileno(), core.CHECKPOINT_SUBTREE, logf.fileno())
        assert crid > 0
        written = os.lseek(img.fileno(), 0, os.SEEK_CUR)
        assert written == os.fstat(img.fileno()).st_size > 4096
    procs.kill(target)
    assert "checkpoint" in open(log).read()         # the log fd got the debug lines
    count = len(_lines(out))
    with open(image, "rb") as img:
        os.lseek(img.fileno(), 3, os.SEEK_SET)     # unaligned: read, not mmap'd
        root = api.restart(0, img.fileno(), 0, -1)
        assert os.lseek(img.fileno(), 0, os.SEEK_CUR) == written
    reaper = _parent_of(root)
    procs.add_restored(root, reaper)
    assert _parent_of(reaper) == os.getpid()
    os.kill(root, signal.SIGCONT)                  # it was checkpointed stopped
    lines = _wait_for(out, lambda ls: len(ls) >= count + 10, "the restored counter")
    assert [int(x) for x in lines] == list(range(len(lines))), "a gap or a repeat"


def test_restart_reads_an_image_from_a_pipe_and_mmaps_a_file(procs, tmp_path):
    out, image = str(tmp_path / "out.txt"), str(tmp_path / "image")
    target = procs.start("-c", COUNTER, out)
    _wait_for(out, lambda ls: len(ls) >= 3, "the counter's first lines")
    with open(image, "wb") as img:
        assert api.checkpoint(target.pid, img.fileno()) > 0
    procs.kill(target)
    data = open(image, "rb").read()
    with open(image, "rb") as img:
        mapped = api.read_image_fd(img.fileno())
        assert type(mapped).__name__ == "mmap" and mapped[:] == data
        assert os.lseek(img.fileno(), 0, os.SEEK_CUR) == len(data)
        mapped.close()
    r, w = os.pipe()
    feeder = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    feeder.start()
    try:
        restored = api.restart_from_fd(r, core.RESTART_FROZEN)
    finally:
        feeder.join()
        os.close(r)
    procs.add_restored(restored.root, restored.child)
    with open(f"/proc/{restored.root}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] in "Tt"   # RESTART_FROZEN: stopped
    count = len(_lines(out))
    os.kill(restored.root, signal.SIGCONT)
    _wait_for(out, lambda ls: len(ls) >= count + 5, "the restored counter after SIGCONT")


def test_restart_ghost_exits_once_the_tree_runs_which_comes_to_the_subreaper(procs, tmp_path):
    out, image = str(tmp_path / "out.txt"), str(tmp_path / "image")
    target = procs.start("-c", COUNTER, out)
    _wait_for(out, lambda ls: len(ls) >= 3, "the counter's first lines")
    os.kill(target.pid, signal.SIGSTOP)           # nothing written between image and kill
    with open(image, "wb") as img:
        assert api.checkpoint(target.pid, img.fileno()) > 0
    procs.kill(target)
    before = set(_children(os.getpid()))
    was = api._is_subreaper()
    api.kabi.syscall(api.kabi.SYS_prctl, api.kabi.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        ghost = subprocess.run([sys.executable, "-m", "backend.restore_cli", "--ghost", "-i",
                                image], cwd=ROOT, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=60)
    finally:
        api.kabi.syscall(api.kabi.SYS_prctl, api.kabi.PR_SET_CHILD_SUBREAPER, int(was), 0, 0, 0)
    new = [p for p in _children(os.getpid()) if p not in before]
    for pid in new:
        procs.add_restored(pid, pid)
    # the restarter exited by itself (status 0, nothing printed) once the tree was restored,
    # and its orphan, the namespace's reaper with the counter under it, is now our child
    assert (ghost.returncode, ghost.stdout, ghost.stderr) == (0, b"", b"")
    assert len(new) == 1, new
    (root,) = _children(new[0])
    procs.add_restored(root, new[0])
    count = len(_lines(out))
    os.kill(root, signal.SIGCONT)
    lines = _wait_for(out, lambda ls: len(ls) >= count + 5, "the restored counter")
    assert [int(x) for x in lines] == list(range(len(lines))), "a gap or a repeat"


def _children(pid: int) -> list[int]:
    from backend import proc
    return proc.children(pid)


# -- self-checkpoint ----------------------------------------------------------------------
def test_self_checkpoint_returns_the_crid_then_0_after_restart(procs, tmp_path):
    out, image = str(tmp_path / "out.txt"), str(tmp_path / "image")
    caller = procs.start("-c", SELF_CHECKPOINT, out, image, ROOT, str(core.CHECKPOINT_SUBTREE))
    lines = _wait_for(out, lambda ls: any(x.startswith("tick 3") for x in ls), "a few ticks")
    secret = lines[0].split()[1]
    (first,) = [x for x in lines if x.startswith("crid ")]
    assert int(first.split()[1]) > 0, first
    assert first.endswith(f"pid {caller.pid} secret {secret}")
    procs.kill(caller)
    with open(image, "rb") as img:
        restored = api.restart_from_fd(img.fileno())
    procs.add_restored(restored.root, restored.child)
    def ticks_after_second_crid(ls):
        crids = [i for i, x in enumerate(ls) if x.startswith("crid ")]
        return ls[crids[1] + 1:] if len(crids) == 2 else []

    after = _wait_for(out, lambda ls: len(ticks_after_second_crid(ls)) >= 5,
                      "the restarted caller's return and ticks")
    assert ticks_after_second_crid(after)[:5] == [f"tick {i}" for i in range(5)]
    second = [x for x in after if x.startswith("crid ")][1]
    # the same process as far as it can tell (its pid in its namespace, its memory)
    assert second == f"crid 0 pid {caller.pid} secret {secret}"


def test_failed_self_checkpoint_raises_in_the_caller_which_runs_on(procs, tmp_path):
    out, image = str(tmp_path / "out.txt"), str(tmp_path / "image")
    procs.start("-c", SELF_CHECKPOINT, out, image, ROOT, "0")   # no SUBTREE: not an init
    lines = _wait_for(out, lambda ls: any(x.startswith("tick 2") for x in ls), "a few ticks")
    (error,) = [x for x in lines if x.startswith("error ")]
    assert "EINVAL" in error and "namespace" in error, error
    assert any(x.startswith("crid -1 ") for x in lines)


def _start_ns_init(procs, *argv: str, own_proc: bool = True) -> subprocess.Popen:
    """``python argv`` as pid 1 of a new pid namespace (with a /proc of its own)."""
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child",
                             *(["--mount-proc"] if own_proc else []), sys.executable, *argv],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    procs.started.append(proc)
    return proc


@pytest.mark.parametrize("flags", [core.CHECKPOINT_SUBTREE, 0], ids=["subtree", "container"])
def test_self_checkpoint_of_a_pid_namespace_init_leaves_its_helper_out(procs, tmp_path, flags):
    """Also as a container checkpoint: the helper's image fd (the init's own, inherited) is
    not a leak, as the seed's leak check counted the image file's reference."""
    from backend import proc as live_proc
    from ckptsim.image import decode_all
    from ckptsim.kinds import load_all
    out, image = str(tmp_path / "out.txt"), str(tmp_path / "image")
    outer = _start_ns_init(procs, "-c", SELF_CHECKPOINT, out, image, ROOT, str(flags))
    lines = _wait_for(out, lambda ls: any(x.startswith("tick 3") for x in ls), "a few ticks")
    secret = lines[0].split()[1]
    (first,) = [x for x in lines if x.startswith("crid ")]
    assert int(first.split()[1]) > 0 and first.endswith(f"pid 1 secret {secret}"), lines[:4]
    (init,) = live_proc.children(outer.pid)
    # the helper was the init's child: it is reaped, no zombie or process is left
    assert live_proc.children(init) == []
    load_all()
    (tree,) = [r for r in decode_all(open(image, "rb").read()) if r.layout.name == "TREE"]
    assert tree["nr_tasks"] == 1                      # the image holds the init alone
    procs.kill(outer)
    with open(image, "rb") as img:
        restored = api.restart_from_fd(img.fileno())
    procs.add_restored(restored.root, restored.child)
    after = _wait_for(out, lambda ls: len([x for x in ls if x.startswith("crid ")]) == 2,
                      "the restarted init's return")
    assert [x for x in after if x.startswith("crid ")][1] == f"crid 0 pid 1 secret {secret}"


def test_self_checkpoint_refuses_a_proc_of_another_pid_namespace(procs, tmp_path):
    out, image = str(tmp_path / "out.txt"), str(tmp_path / "image")
    _start_ns_init(procs, "-c", SELF_CHECKPOINT, out, image, ROOT,
                   str(core.CHECKPOINT_SUBTREE), own_proc=False)
    lines = _wait_for(out, lambda ls: any(x.startswith("tick 1") for x in ls), "a few ticks")
    (error,) = [x for x in lines if x.startswith("error ")]
    assert "/proc shows another pid namespace" in error and "--mount-proc" in error, error
    assert any(x.startswith("crid -1 pid 1 ") for x in lines)


# -- bad input ----------------------------------------------------------------------------
def test_bad_fds_and_flags_are_clear_errors(tmp_path):
    path = str(tmp_path / "f")
    open(path, "wb").close()
    ro = os.open(path, os.O_RDONLY)
    wo = os.open(path, os.O_WRONLY)
    closed = os.open(path, os.O_RDONLY)
    os.close(closed)
    try:
        cases = [
            (lambda: api.checkpoint(os.getpid(), closed), CheckpointError, errno.EBADF, "not open"),
            (lambda: api.checkpoint(1, ro), CheckpointError, errno.EBADF, "not open for writing"),
            (lambda: api.checkpoint(1, wo, 0x100), CheckpointError, errno.EINVAL, "unknown checkpoint flags 0x100"),
            (lambda: api.checkpoint(1, wo, 1, closed), CheckpointError, errno.EBADF, "logfd"),
            (lambda: api.checkpoint(-3, wo), CheckpointError, errno.ESRCH, "no process -3"),
            (lambda: api.restart(0, closed), RestartError, errno.EBADF, "not open"),
            (lambda: api.restart(0, wo), RestartError, errno.EBADF, "not open for reading"),
            (lambda: api.restart(0, ro, 0x40), RestartError, errno.EINVAL, "unknown restart flags 0x40"),
            (lambda: api.restart(0, ro, core.RESTART_TASKSELF | core.RESTART_FROZEN),
             RestartError, errno.EINVAL, "no other flag"),
            (lambda: api.restart(7, ro, core.RESTART_TASKSELF), RestartError, errno.EINVAL,
             "in place of the caller"),
            (lambda: api.restart(0, ro, core.RESTART_KEEP_LSM), RestartError, errno.EOPNOTSUPP,
             "RESTART_KEEP_LSM"),
            (lambda: api.restart(7, ro), RestartError, errno.EINVAL, "pass 0"),
            (lambda: api.restart(0, ro), RestartError, errno.EINVAL, "holds no image"),
            (lambda: api.restart(0, ro, 0, ro), RestartError, errno.EBADF, "logfd"),
        ]
        for call, kind, err, words in cases:
            with pytest.raises(kind) as info:
                call()
            assert info.value.errno == err and words in info.value.message, str(info.value)
        with open(path, "wb") as f:
            f.write(b"not an image at all" * 100)
        with pytest.raises(CkptsimError):
            api.restart(0, ro)
    finally:
        os.close(ro)
        os.close(wo)


def test_restart_tool_self_with_an_unreadable_image_is_one_line(capsys):
    from backend import restore_cli
    assert restore_cli.main(["--self", "-i", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/nonexistent" in err, err


# -- examples/self_checkpoint.c through the checkpoint tool --------------------------------
def test_c_example_checkpoints_itself_and_carries_on_after_restart(procs, c_example, tmp_path):
    from ckptsim.image.codec import ImageReader
    tool = os.path.join(os.path.dirname(sys.executable), "checkpoint")
    if not os.access(tool, os.X_OK):
        pytest.skip(f"the checkpoint tool is not installed at {tool} (scripts/setup.sh)")
    out, image = str(tmp_path / "out.txt"), str(tmp_path / "image")
    with open(out, "ab") as stdout:               # O_APPEND: both runs add to the end
        prog = subprocess.Popen([c_example, image, "50"], stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=stdout,
                                env={**os.environ, "CHECKPOINT": tool})
    procs.started.append(prog)
    lines = _wait_for(out, lambda ls: any(x.startswith("checkpointed") for x in ls),
                      "the example's first self-checkpoint")
    procs.kill(prog)                              # long before its next checkpoint (count 99)
    lines = _lines(out)
    at = lines.index(next(x for x in lines if x.startswith("checkpointed")))
    assert lines[:at] == [f"count {i}" for i in range(50)]
    crid = int(lines[at].split("=")[1])
    with open(image, "rb") as img:
        assert ImageReader(img.read()).expect(core.HEADER)["crid"] == crid
        img.seek(0)
        restored = api.restart_from_fd(img.fileno())
    procs.add_restored(restored.root, restored.child)
    lines = _wait_for(out, lambda ls: "restarted" in ls and len(ls) - ls.index("restarted") > 5,
                      "the restarted example's count")
    after = lines[lines.index("restarted") + 1:]
    assert after[:5] == [f"count {i}" for i in range(50, 55)]


@pytest.fixture(scope="session")
def c_example(tmp_path_factory):
    import shutil
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: examples/self_checkpoint.c cannot be built")
    exe = str(tmp_path_factory.mktemp("examples") / "self_checkpoint")
    src = os.path.join(ROOT, "examples", "self_checkpoint.c")
    r = subprocess.run([gcc, "-O1", "-Wall", "-Wextra", "-Werror", "-o", exe, src],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe

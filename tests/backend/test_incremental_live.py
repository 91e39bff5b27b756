"""Live incremental checkpoints (backend/incremental.py, backend/precopy.py) on a real C
target (targets/incr_target.c): ``checkpoint --track`` then ``--parent`` images holding exactly
the pages the target wrote (and the ranges it dropped), a three-link chain restarted with the
right memory and carrying on, pre-copy on a target that keeps writing, a refused parent, a
missing link at restart, and the fallback to a full image without a session.

Every target is ended by pid (start_target), every restored tree killed by pid and reaped,
every tracking session stopped and its daemon checked gone by pid."""
from __future__ import annotations

import errno
import os
import signal
import time

import pytest

from backend import cli, snapshot, track
from backend.incremental import LastCheckpoint
from backend.restore.job import restart_image
from backend.snapshot_mm import _VM_FLAG_BITS
from ckptsim.cr.context import RestartError
from ckptsim.cr.incremental import ImageScan
from ckptsim.image import core, decode_all
from ckptsim.image.storage import read_image_file

PAGE = 4096
NPAGES = 64

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _require_tracking() -> None:
    why = track.unavailable_reason()
    if why:
        pytest.skip(f"tracking sessions cannot run here: {why}")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_file(path: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.02)
    with open(path) as f:
        return f.read()


@pytest.fixture
def sessions():
    """Root pids whose tracking session is stopped at teardown; the daemons must be gone."""
    roots: list[int] = []
    yield roots
    daemons = []
    for root in roots:
        try:
            client = track.connect(root)
        except track.TrackError:
            continue
        daemons.append(client.daemon_pid)
        client.stop()
        LastCheckpoint.forget(root)
    deadline = time.monotonic() + 10
    while any(not _gone(d) for d in daemons) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [d for d in daemons if not _gone(d)]
    for d in left:
        os.kill(d, signal.SIGKILL)
    assert not left, f"tracking daemons left running: {left}"


@pytest.fixture
def restored_trees():
    """Restored trees to kill by pid and reap at teardown."""
    trees = []
    yield trees
    for r in trees:
        for pid in [*r.pids.values(), r.reaper]:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.waitpid(r.child, 0)
        except ChildProcessError:
            pass


class Runner:
    """incr_target driven through its signals and files."""

    def __init__(self, target, workdir: str):
        self.target, self.dir = target, workdir
        self.pid, self.a = target.pid, target.info["a"]
        self.steps = self.reports = 0

    def step(self, pid: int | None = None) -> None:
        self.steps += 1
        os.kill(pid or self.pid, signal.SIGUSR1)
        _wait_file(os.path.join(self.dir, f"step-{self.steps}"))

    def report(self, pid: int | None = None, number: int | None = None) -> tuple[str, dict]:
        n = self.reports if number is None else number
        path = os.path.join(self.dir, f"report-{n}")
        if os.path.exists(path):
            os.unlink(path)
        os.kill(pid or self.pid, signal.SIGUSR2)
        lines = _wait_file(path).splitlines()
        self.reports = n + 1
        return lines[0], {int(i): int(v) for i, v in (line.split() for line in lines[1:])}

    def region_pages(self, image) -> list[int]:
        """The page numbers of region a an image holds."""
        scan = ImageScan(image)
        (_, ref), = scan.task_mms
        lo, hi = self.a >> 12, (self.a >> 12) + NPAGES
        return sorted(i - lo for i in scan.mms[ref].pages if lo <= i < hi)

    def drops(self, image) -> list[tuple[int, int]]:
        scan = ImageScan(image)
        (_, ref), = scan.task_mms
        return [((s - self.a) >> 12, (e - self.a) >> 12) for s, e in scan.mms[ref].drops]


def _checkpoint(capsys, *args) -> tuple[int, str]:
    rc = cli.main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.fixture
def runner(c_target, start_target, tmp_path, sessions):
    _require_tracking()
    work = tmp_path / "work"
    work.mkdir()
    t = start_target(c_target("incr_target"), str(work), NPAGES)
    sessions.append(t.pid)
    return Runner(t, str(work))


def _chain(runner, capsys, tmp_path, links: int) -> list[str]:
    """A full --track image and ``links`` incremental ones, one step of the target each."""
    images = [str(tmp_path / "00.img")]
    rc, err = _checkpoint(capsys, runner.pid, "-o", images[0], "--track")
    assert rc == 0, err
    for k in range(1, links + 1):
        runner.step()
        images.append(str(tmp_path / f"{k:02d}.img"))
        rc, err = _checkpoint(capsys, runner.pid, "-o", images[-1], "--parent", images[-2])
        assert rc == 0, err
        assert "incremental image against" in err, err
    return images


def test_parent_images_hold_exactly_the_written_pages(runner, capsys, tmp_path):
    images = _chain(runner, capsys, tmp_path, 3)
    data = [read_image_file(p) for p in images]
    assert runner.region_pages(data[0]) == [0, 2, 3, 4]            # the full image
    assert runner.region_pages(data[1]) == [1, 5, 6]
    assert runner.region_pages(data[2]) == [5, 9]
    assert runner.drops(data[2]) == [(2, 4)]                         # MADV_DONTNEED of 2..3
    assert runner.region_pages(data[3]) == [0, NPAGES - 1]
    assert runner.drops(data[1]) == runner.drops(data[3]) == []
    for parent, child in zip(data, data[1:]):
        scan, pscan = ImageScan(child), ImageScan(parent)
        assert scan.incremental and scan.parent_id == pscan.image_id
        assert scan.header["uflags"] & core.CHECKPOINT_INCREMENTAL
        (_, ref), = scan.task_mms
        (_, pref), = pscan.task_mms
        assert scan.mms[ref].base == pref
    assert not _gone(runner.pid)                                     # it runs on
    status, _ = runner.report()
    assert status == "OK"


def test_incremental_gathering_takes_known_vm_flags_instead_of_reading_smaps(
        runner, capsys, tmp_path, monkeypatch):
    """While the session saw no mm syscall that can change VmFlags, an incremental stop reads
    /proc/PID/maps and the parent's VmFlags, not smaps (a page-table walk); the VMAs gathered
    are what smaps says. MADV_DONTNEED (step 2) keeps them known; MADV_RANDOM (step 4) makes
    the gathering read smaps and see "rr"; the next stop spares smaps again, "rr" kept."""
    smaps_reads, gathered = [], []
    read_smaps, gather_mm = snapshot.proc.read_smaps, snapshot.Gatherer._mm
    read_smaps_flags = snapshot.proc.read_smaps_flags
    monkeypatch.setattr(snapshot.proc, "read_smaps_flags",
                        lambda pid: smaps_reads.append(pid) or read_smaps_flags(pid))
    read_ahead = snapshot.proc.read_smaps_flags_ahead
    monkeypatch.setattr(snapshot.proc, "read_smaps_flags_ahead",
                        lambda pid: smaps_reads.append(pid) or read_ahead(pid))

    def recording_mm(self, pid, stat, ahead=None):
        mm = gather_mm(self, pid, stat, ahead)
        gathered.append([(v.start, v.end, v.vm_flags) for v in mm.vmas])
        return mm
    monkeypatch.setattr(snapshot.Gatherer, "_mm", recording_mm)

    def vmas_now():                  # what a fresh smaps read gives (the target waits idle)
        return [(e.start, e.end, sum(bit for flag, bit in _VM_FLAG_BITS.items()
                                     if flag in e.vm_flags)) for e in read_smaps(runner.pid)]

    def checkpoint(name, parent=None):
        del smaps_reads[:], gathered[:]
        args = [runner.pid, "-o", tmp_path / name] + (["--parent", tmp_path / parent]
                                                      if parent else ["--track"])
        rc, err = _checkpoint(capsys, *args)
        assert rc == 0, err
        assert len(gathered) == 1 and gathered[0] == vmas_now()
        return len(smaps_reads), dict((start, flags) for start, _, flags in gathered[0])

    random_bit = _VM_FLAG_BITS["rr"]
    assert checkpoint("00.img")[0] == 1                     # a full image reads smaps
    runner.step()                                           # writes
    assert checkpoint("01.img", "00.img")[0] == 0
    runner.step()                                           # writes, MADV_DONTNEED
    reads, flags = checkpoint("02.img", "01.img")
    assert reads == 0 and not flags[runner.a] & random_bit
    runner.step()
    runner.step()                                           # MADV_RANDOM on region a
    reads, flags = checkpoint("03.img", "02.img")
    assert reads == 1 and flags[runner.a] & random_bit
    runner.step()
    reads, flags = checkpoint("04.img", "03.img")
    assert reads == 0 and flags[runner.a] & random_bit
    status, _ = runner.report()
    assert status == "OK"


def _sighand(path) -> list[tuple]:
    """(handler, flags, restorer, mask) of the image's SIGHAND record, by signal."""
    recs = [r for r in decode_all(read_image_file(str(path))) if r.layout.name == "SIGHAND"]
    assert len(recs) == 1
    return [tuple(item) for item in recs[0].var]


def test_incremental_gathering_takes_the_known_signal_actions(runner, capsys, tmp_path,
                                                              monkeypatch):
    """While no process of the tree set a signal action since the parent (the eBPF tracker
    sees rt_sigaction; the checkpointer's own reads do not count), an incremental stop takes
    the parent's 64 actions instead of injecting 64 rt_sigaction calls; once the target sets
    one (step 5: SIGURG to SIG_IGN), they are read again and the image has the new one."""
    reads = []
    handlers = snapshot._handlers
    monkeypatch.setattr(snapshot, "_handlers", lambda tid: reads.append(tid) or handlers(tid))

    def checkpoint(name, parent=None):
        del reads[:]
        args = [runner.pid, "-o", tmp_path / name] + (["--parent", tmp_path / parent]
                                                      if parent else ["--track"])
        rc, err = _checkpoint(capsys, *args)
        assert rc == 0, err
        return len(reads), _sighand(tmp_path / name)

    urg = 23 - 1
    reads_full, full = checkpoint("00.img")
    assert reads_full == 1 and full[urg][0] == 0                   # SIGURG: SIG_DFL
    assert any(action[0] > 1 for action in full)                   # its SIGUSR1/2 handlers
    runner.step()
    assert checkpoint("01.img", "00.img") == (0, full)
    for _ in range(4):
        runner.step()                                              # step 5: SIGURG ignored
    n, after = checkpoint("02.img", "01.img")
    assert n == 1 and after[urg][0] == 1                           # SIG_IGN
    assert after[:urg] == full[:urg] and after[urg + 1:] == full[urg + 1:]
    runner.step()
    assert checkpoint("03.img", "02.img") == (0, after)
    status, _ = runner.report()
    assert status == "OK"


def test_chain_restart_gives_the_memory_and_carries_on(runner, capsys, tmp_path, restored_trees):
    images = _chain(runner, capsys, tmp_path, 3)
    status, before = runner.report()
    assert status == "OK" and 2 not in before and 3 not in before    # dropped: zeros
    os.kill(runner.pid, signal.SIGKILL)
    r = restart_image(read_image_file(images[-1]), chain=str(tmp_path))
    restored_trees.append(r)
    status, after = runner.report(r.root, number=0)
    assert status == "OK" and after == before
    runner.step(r.root)                                              # step 4: page 28
    status, later = runner.report(r.root)
    assert status == "OK" and later == {**before, 28: max(before.values()) + 1}


def test_missing_link_is_a_clear_error(runner, capsys, tmp_path, restored_trees):
    images = _chain(runner, capsys, tmp_path, 2)
    os.unlink(images[1])
    try:
        restored_trees.append(restart_image(read_image_file(images[-1]), chain=str(tmp_path)))
    except RestartError as e:
        if "needs its parent image" not in str(e):
            raise                              # (the guard's error: the xfail above)
        assert e.errno == errno.ENOENT and ImageScan(read_image_file(images[-1])).parent_id.hex() in str(e)
    else:
        pytest.fail("a chain with a missing link restarted")


def test_parent_that_is_not_the_last_checkpoint_is_refused(runner, capsys, tmp_path):
    images = _chain(runner, capsys, tmp_path, 2)
    out = str(tmp_path / "bad.img")
    rc, err = _checkpoint(capsys, runner.pid, "-o", out, "--parent", images[0])
    assert rc != 0 and "is not the last checkpoint" in err, err
    assert not os.path.exists(out)
    assert len(err.strip().splitlines()) == 1
    status, _ = runner.report()                                      # untouched, running
    assert status == "OK"
    rc, err = _checkpoint(capsys, runner.pid, "-o", out, "--parent", images[-1])
    assert rc == 0 and "incremental image against" in err            # the session is intact


def test_parent_of_another_tree_is_refused(runner, c_target, start_target, capsys, tmp_path):
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = start_target(c_target("incr_target"), str(other_dir), NPAGES)
    theirs = str(tmp_path / "theirs.img")
    rc, err = _checkpoint(capsys, other.pid, "-o", theirs)
    assert rc == 0, err
    images = _chain(runner, capsys, tmp_path, 0)
    out = str(tmp_path / "bad.img")
    rc, err = _checkpoint(capsys, runner.pid, "-o", out, "--parent", theirs)
    assert rc != 0 and "another tree" in err, err
    assert not os.path.exists(out) and images


def test_no_session_gives_a_full_image_with_a_notice(runner, capsys, tmp_path):
    full = str(tmp_path / "full.img")
    rc, err = _checkpoint(capsys, runner.pid, "-o", full)            # no --track
    assert rc == 0, err
    runner.step()
    out = str(tmp_path / "next.img")
    rc, err = _checkpoint(capsys, runner.pid, "-o", out, "--parent", full)
    assert rc == 0, err
    assert "notice: no tracking session" in err
    scan = ImageScan(read_image_file(out))
    assert not scan.incremental
    assert runner.region_pages(read_image_file(out)) == [0, 1, 2, 3, 4, 5, 6]


@pytest.fixture
def writer(c_target, start_target, tmp_path, sessions):
    _require_tracking()
    work = tmp_path / "work"
    work.mkdir()
    t = start_target(c_target("incr_target"), str(work), 16384, 2000)   # 64 MiB, 2000 pages/s
    sessions.append(t.pid)
    return Runner(t, str(work))


def _pre_copy(writer, capsys, tmp_path, bound_ms: float):
    chain = str(tmp_path / "chain")
    rc = cli.main([str(writer.pid), "--pre-copy", "--max-downtime", str(bound_ms), "-o", chain])
    out = capsys.readouterr()
    assert rc == 0, out.err
    last = out.out.strip().splitlines()[-1]
    assert last.startswith("downtime ") and "newest image" in last, out.out
    return chain, float(last.split()[1]), last.split()[-1], out.out


def test_pre_copy_ends_with_a_downtime_under_the_bound(writer, capsys, tmp_path):
    time.sleep(0.5)                              # it has been writing for a while
    chain, downtime, newest, text = _pre_copy(writer, capsys, tmp_path, 300)
    assert downtime < 300, text
    names = sorted(os.listdir(chain))
    assert len(names) >= 2 and os.path.join(chain, names[-1]) == newest
    scans = [ImageScan(read_image_file(os.path.join(chain, n))) for n in names]
    assert not scans[0].incremental and all(s.incremental for s in scans[1:])
    for parent, child in zip(scans, scans[1:]):
        assert child.parent_id == parent.image_id
    assert scans[-1].nr_pages < scans[0].nr_pages
    assert not _gone(writer.pid)
    with pytest.raises(track.NoSession):         # the session it launched is stopped
        track.connect(writer.pid)


def test_pre_copy_chain_restarts_consistent(writer, capsys, tmp_path, restored_trees):
    time.sleep(0.3)
    chain, _, newest, _ = _pre_copy(writer, capsys, tmp_path, 300)
    os.kill(writer.pid, signal.SIGKILL)
    r = restart_image(read_image_file(newest), chain=chain)
    restored_trees.append(r)
    status, pages = writer.report(r.root, number=0)
    assert status == "OK" and pages                  # every page holds its last write


def test_the_spool_keeps_the_image_until_drained_and_writes_through_past_its_limit():
    """backend.dump writes an incremental image into a Spool while the tree is stopped: the
    file gets nothing until drain(); past the limit it drains and writes through. Writes
    are copied (the image writer reuses its buffers)."""
    import io

    from backend.incremental import Spool
    out = io.BytesIO()
    spool = Spool(out, limit=64, reserve=16)
    reused = bytearray(b"0123456789")
    spool.write(memoryview(reused)[:6])
    reused[:6] = b"XXXXXX"                      # the writer's buffer, reused
    spool.write(reused[6:])
    spool.write(b"abcdefghij" * 2)              # past the reserved bytes: kept as a copy
    assert out.getvalue() == b"" and spool.size == 30
    spool.drain()
    assert out.getvalue() == b"012345" + b"6789" + b"abcdefghij" * 2
    out = io.BytesIO()
    spool = Spool(out, limit=8)
    spool.write(b"12345678")
    assert out.getvalue() == b""
    spool.write(b"9")                           # past the limit: all of it, then through
    assert out.getvalue() == b"123456789" and spool.through
    spool.write(b"0")
    assert out.getvalue() == b"1234567890"


def test_cli_track_parent_kill_then_restart_the_chain(c_target, tmp_path):
    """The migration story with the tools: --track, --parent, a last --parent with --kill,
    then `restart` of the newest image finds the chain in its directory and the program
    counts on with no gap and no repeat."""
    _require_tracking()
    import subprocess
    import sys
    import time
    exe = c_target("restore_prog_counter")
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        prog = subprocess.Popen([exe, "1", "1"], stdout=f, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    root = None
    tool = [sys.executable, "-m", "backend.cli"]
    env = {**os.environ, "PYTHONPATH": REPO}

    def counts():
        return [int(x.split()[1]) for x in out.read_text().splitlines() if x.startswith("n ")]

    def run(*args):
        r = subprocess.run([*tool, *args], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        return r

    try:
        deadline = time.monotonic() + 10
        while len(counts()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        run("--track", str(prog.pid), "-o", str(tmp_path / "a.img"))
        time.sleep(0.1)
        run("--parent", str(tmp_path / "a.img"), str(prog.pid), "-o", str(tmp_path / "b.img"))
        time.sleep(0.1)
        r = run("--parent", str(tmp_path / "b.img"), str(prog.pid), "-o",
                str(tmp_path / "c.img"), "--kill")
        assert "incremental image against" in r.stderr
        prog.wait(timeout=10)
        before = counts()
        r = subprocess.run([sys.executable, "-m", "backend.restore_cli", "-i",
                            str(tmp_path / "c.img"), "--detach"], capture_output=True,
                           text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        root = int(r.stdout)
        deadline = time.monotonic() + 10
        while len(counts()) < len(before) + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        got = counts()
        assert len(got) >= len(before) + 3 and got == list(range(got[0], got[0] + len(got)))
    finally:
        if prog.poll() is None:
            prog.kill()
            prog.wait()
        if root is not None:
            with open(f"/proc/{root}/status") as f:
                ppid = int(f.read().split("PPid:\t")[1].split()[0])
            os.kill(ppid, signal.SIGKILL)          # the namespace init: the tree goes with it
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{root}") and time.monotonic() < deadline:
                time.sleep(0.01)


def test_a_tree_sharing_an_address_space_is_not_tracked(c_target, start_target, capsys,
                                                        tmp_path, sessions):
    """Tracking follows each process's writes, not a shared mm's: --track on a tree with a
    clone(CLONE_VM) child is refused by name, and the tree runs on untraced."""
    _require_tracking()
    t = start_target(c_target("restore_prog_clone_vm"))
    sessions.append(t.pid)
    child = int(t.info["child"])
    out = str(tmp_path / "shared.img")
    try:
        rc, err = _checkpoint(capsys, t.pid, "-o", out, "--track")
        assert rc != 0 and f"processes {t.pid} and {child} share one address space" in err, err
        assert "error record" in err   # the image ends in Linux-CR's ERROR record, saying why
        for pid in (t.pid, child):
            with open(f"/proc/{pid}/status") as f:
                st = dict(line.split(":", 1) for line in f)
            assert st["TracerPid"].strip() == "0" and st["State"].split()[0] in ("S", "R")
    finally:
        try:
            os.kill(child, signal.SIGKILL)    # start_target ends the parent, by pid
        except ProcessLookupError:
            pass

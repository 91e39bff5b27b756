"""Tracking sessions (backend/track.py, backend/track_daemon.py) on a real C target
(targets/dirty_target.c): ``checkpoint --track``, the daemon's dirty answers against the pages
the target wrote, both sources (userfaultfd-wp + PAGEMAP_SCAN, the eBPF tracker) agreeing,
rearm, forked children, the session's end, and the fallback without the eBPF tracker.

Every test ends its target by pid (start_target), stops its sessions and checks by pid that
no daemon is left, and that nothing is left traced, write-protected or attached."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from backend import bpf_tracker, cli, ptrace, track
from backend.memory_pages import PAGE_SIZE
from backend.proc import read_smaps
from ckptsim.image import core, decode_all

A_PAGES, F_PAGES = 64, 8                        # as in dirty_target.c
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _require_tracking() -> None:
    why = track.unavailable_reason()
    if why:
        pytest.skip(f"tracking sessions cannot run here: {why}")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("track") / "data"
    path.write_bytes(bytes(range(1, 256)) * (F_PAGES * PAGE_SIZE // 255 + 1))
    return str(path)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_for(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def daemons():
    """Daemon pids to check at teardown: each session stopped, the daemon gone (SIGKILLed by
    pid if it is not, which fails the test)."""
    pids: dict[int, int] = {}                   # daemon pid -> root pid
    yield pids
    leftover = []
    for daemon, root in pids.items():
        try:
            track.connect(root).stop()
        except track.TrackError:
            pass
        deadline = time.monotonic() + 10
        while not _gone(daemon) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _gone(daemon):
            leftover.append(daemon)
            os.kill(daemon, signal.SIGKILL)
    assert not leftover, f"tracking daemons left running: {leftover}"


@pytest.fixture
def target(c_target, start_target, data_file, check_untraced):
    _require_tracking()
    t = start_target(c_target("dirty_target"), data_file)
    yield t
    if t.proc.poll() is None:
        check_untraced(t.pid)


def cmd(t, line: str) -> str:
    t.write(line.encode() + b"\n")
    reply = t.readline(timeout=10)
    assert reply is not None, f"target {t.pid} did not answer {line!r}"
    return reply


def region(addrs, base: int, npages: int) -> set[int]:
    end = base + npages * PAGE_SIZE
    return {(a - base) // PAGE_SIZE for a in addrs if base <= a < end}


def tracked_checkpoint(t, tmp_path, capsys, daemons) -> track.TrackClient:
    """``checkpoint --track`` of ``t`` (in this process); the session's client."""
    image = tmp_path / f"{t.pid}.img"
    assert cli.main(["--track", "-o", str(image), str(t.pid)]) == 0
    err = capsys.readouterr().err
    assert f"tracking {t.pid}: session {track.socket_path(t.pid)}" in err, err
    assert decode_all(image.read_bytes())[0]["image_flags"] & core.IMAGE_LIVE
    client = track.connect(t.pid)
    daemons[client.daemon_pid] = t.pid
    return client


def uffd_flagged(pid: int) -> list[str]:
    return [f"{e.start:#x}" for e in read_smaps(pid) if "uw" in e.vm_flags]


def _bpftool(*args: str):
    tool = shutil.which("bpftool")
    if tool is None:
        pytest.skip("bpftool is not installed (scripts/setup.sh installs it)")
    r = subprocess.run([tool, "-j", *args], capture_output=True, text=True, timeout=30)
    return json.loads(r.stdout or "[]") if r.returncode == 0 else None


def _attached(pid: int) -> set[int]:
    return {e["prog_id"] for e in _bpftool("perf", "list") if e.get("pid") == pid}


# --------------------------------------------------------------------------------------------
def test_dirty_is_the_written_set_and_both_sources_agree(target, tmp_path, capsys, daemons):
    a, f = target.info["a"], target.info["f"]
    client = tracked_checkpoint(target, tmp_path, capsys, daemons)
    st = os.stat(track.socket_path(target.pid))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(track.RUN_DIR).st_mode) == 0o700
    status = client.status()
    assert status["generation"] == 1 and status["root"] == target.pid
    assert status["processes"][str(target.pid)]["write_protected"]
    for line in ("w a 3 5", "w a 50 52", "r a 10 12", "r a 55 57", "w f 2 3", "r f 5 6",
                 "i a 20 22"):
        assert cmd(target, line) == "OK"
    with ptrace.seized(target.pid):             # as the next checkpoint asks: tree stopped
        report = client.dirty()
    assert set(report.processes) == {target.pid} and report.complete and not report.exited
    p = report.processes[target.pid]
    assert region(p.pages, a, A_PAGES) == {3, 4, 20, 21, 50, 51}
    assert region(p.pages, f, F_PAGES) == {2}
    assert list(p.pages) == sorted(set(p.uffd_pages) | set(p.bpf_pages))
    # the cross-check: a target writing only its own memory is seen the same by both
    assert p.bpf_complete and not p.all_dirty and not p.new_vmas
    assert list(p.uffd_pages) == list(p.bpf_in_covered())
    assert region(p.bpf_pages, a, A_PAGES) == {3, 4, 20, 21, 50, 51}
    # dirty resets nothing: asked again, the same pages
    assert region(client.dirty().processes[target.pid].pages, a, A_PAGES) == \
        {3, 4, 20, 21, 50, 51}
    # pread put the file's byte 8 (9) in pages 20, 21; the target runs on correctly
    assert cmd(target, "s a 0 64") == f"SUM={48 + 2 + 2 + 2 * (9 - 1)}"
    client.stop()


def test_rearm_in_a_stopped_tree_resets_both(target, tmp_path, capsys, daemons):
    a = target.info["a"]
    client = tracked_checkpoint(target, tmp_path, capsys, daemons)
    cmd(target, "w a 1 3")
    cmd(target, "m 4")                                      # a VMA mapped after the arm
    with ptrace.seized(target.pid) as seized:
        before = client.dirty().processes[target.pid]
        assert region(before.pages, a, A_PAGES) == {1, 2} and before.new_vmas
        assert client.rearm(seized) == 2
        after = client.dirty().processes[target.pid]
    assert region(after.pages, a, A_PAGES) == set() and not after.new_vmas
    assert not region(after.uffd_pages, a, A_PAGES) and not region(after.bpf_pages, a, A_PAGES)
    cmd(target, "w a 2 4")
    again = client.dirty().processes[target.pid]
    assert region(again.pages, a, A_PAGES) == {2, 3}
    assert list(again.uffd_pages) == list(again.bpf_in_covered())
    # a second checkpoint --track re-arms the same session
    assert cli.main(["--track", "-o", str(tmp_path / "second.img"), str(target.pid)]) == 0
    capsys.readouterr()
    assert client.status()["generation"] == 3
    assert region(client.dirty().processes[target.pid].pages, a, A_PAGES) == set()
    client.stop()


def test_checkpoint_reports_and_rearms_in_one_request(target, tmp_path, capsys, daemons):
    """``checkpoint``: the written pages and the present runs, already re-protected (dirty()
    right after has none); no smaps read while the eBPF tracker saw no mm syscall; after an
    mmap the layout is read again and the process gets a fresh tracker at the end."""
    a = target.info["a"]
    client = tracked_checkpoint(target, tmp_path, capsys, daemons)
    cmd(target, "w a 1 3")
    with ptrace.seized(target.pid) as seized:
        report, need = client.checkpoint(seized)
        d = report.processes[target.pid]
        assert region(d.pages, a, A_PAGES) == {1, 2} and need == [] and not d.new_vmas
        assert (a, a + 48 * PAGE_SIZE) in d.present
        assert any(lo <= a and a + A_PAGES * PAGE_SIZE <= hi for lo, hi in d.scanned)
        assert not any("smaps read" in k for k in client.spans), client.spans
        assert region(client.dirty().processes[target.pid].pages, a, A_PAGES) == set()
        assert client.status()["generation"] == 2           # moved on at once
        assert client.finish_checkpoint(seized, need) == 2
    cmd(target, "m 4")                                      # an mm syscall: layout read
    cmd(target, "w a 5 6")
    with ptrace.seized(target.pid) as seized:
        report, need = client.checkpoint(seized)
        d = report.processes[target.pid]
        assert region(d.pages, a, A_PAGES) == {5} and d.new_vmas and need == [target.pid]
        assert any("smaps read" in k for k in client.spans), client.spans
        assert client.finish_checkpoint(seized, need) == 3
    cmd(target, "w a 7 8")
    d = client.dirty().processes[target.pid]
    assert region(d.pages, a, A_PAGES) == {7} and not d.new_vmas
    assert list(d.uffd_pages) == list(d.bpf_in_covered())
    client.stop()


def test_a_checkpoint_failing_after_the_collect_makes_the_next_one_full(target, tmp_path,
                                                                        capsys, daemons):
    """The collect re-protects what its parent's record does not hold: once it ran, the
    session's generation has moved on, and an incremental checkpoint against that parent is
    a full image with a notice."""
    from backend.incremental import Tracking
    client = tracked_checkpoint(target, tmp_path, capsys, daemons)
    parent = str(tmp_path / f"{target.pid}.img")
    cmd(target, "w a 1 3")
    assert Tracking.prepare(target.pid, parent, client).incremental
    with ptrace.seized(target.pid) as seized:
        client.checkpoint(seized)                           # and then the checkpoint fails
    tracking = Tracking.prepare(target.pid, parent, client)
    assert not tracking.incremental
    assert any("re-armed since" in n for n in tracking.notices), tracking.notices
    client.stop()


def test_a_forked_child_is_covered(target, tmp_path, capsys, daemons):
    a = target.info["a"]
    client = tracked_checkpoint(target, tmp_path, capsys, daemons)
    child = int(cmd(target, "F").split("=")[1])          # it reads the next commands
    try:
        cmd(target, "w a 5 7")                           # the child's copy-on-write writes
        report = client.dirty()
        assert set(report.processes) == {target.pid, child}
        c = report.processes[child]
        assert c.all_dirty and "forked after the last checkpoint" in c.reasons[0]
        assert region(c.bpf_pages, a, A_PAGES) == {5, 6}
        assert not report.complete
        assert region(report.processes[target.pid].pages, a, A_PAGES) == set()
        with ptrace.seized([target.pid, child]) as seized:    # the next checkpoint
            client.rearm(seized)
        assert client.status()["processes"][str(child)]["write_protected"]
        assert uffd_flagged(child)
        cmd(target, "w a 8 10")
        c = client.dirty().processes[child]
        assert not c.all_dirty and region(c.pages, a, A_PAGES) == {8, 9}
        assert list(c.uffd_pages) == list(c.bpf_in_covered())
        assert cmd(target, "x").startswith("REAPED=0")      # the child exits, the parent goes on
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)
    report = client.dirty()
    assert child in report.exited and set(report.processes) == {target.pid}
    client.stop()


def test_the_session_ends_with_the_tree_and_outlives_the_checkpointer(target, tmp_path):
    """A checkpointer that is its own process (the CLI) exits; the daemon keeps the programs
    attached and answers; when the tree exits, the daemon ends by itself."""
    image = tmp_path / "img"
    r = subprocess.run([sys.executable, "-m", "backend.cli", "--track", "-o", str(image),
                        str(target.pid)], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0, r.stderr
    client = track.connect(target.pid)
    daemon = client.daemon_pid
    try:
        assert len(_attached(daemon)) == len(bpf_tracker.TRACEPOINTS)
        cmd(target, "w a 7 8")
        assert region(client.dirty().processes[target.pid].bpf_pages, target.info["a"],
                      A_PAGES) == {7}
        client.close()
        os.kill(target.pid, signal.SIGKILL)
        target.proc.wait(timeout=10)
        _wait_for(lambda: _gone(daemon), f"daemon {daemon} to end after the tree")
        assert not os.path.exists(track.socket_path(target.pid))
        with pytest.raises(track.NoSession, match=f"process {target.pid}"):
            track.connect(target.pid)
    finally:
        if not _gone(daemon):
            os.kill(daemon, signal.SIGKILL)


def test_stop_detaches_everything_and_the_target_runs_on(target, tmp_path, capsys, daemons):
    client = tracked_checkpoint(target, tmp_path, capsys, daemons)
    daemon = client.daemon_pid
    progs = _attached(daemon)
    assert len(progs) == len(bpf_tracker.TRACEPOINTS)
    assert uffd_flagged(target.pid)
    cmd(target, "w a 0 64")
    client.stop()
    assert uffd_flagged(target.pid) == []                  # no registration left
    _wait_for(lambda: not any(_bpftool("prog", "show", "id", str(p)) for p in progs),
              "the programs to be freed")
    _wait_for(lambda: _gone(daemon), f"daemon {daemon} to exit")
    assert not os.path.exists(track.socket_path(target.pid))
    assert cmd(target, "w a 0 64") == "OK"
    assert cmd(target, "s a 0 64") == f"SUM={48 + 64 + 64}"


def test_without_the_ebpf_tracker_a_notice_and_a_full_image(target, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setattr(bpf_tracker, "available", lambda: (False, "simulated: no bcc"))
    image = tmp_path / "full.img"
    assert cli.main(["--track", "-o", str(image), str(target.pid)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notice" in err[0] and "simulated: no bcc" in err[0]
    assert "full dumps" in err[0]
    assert decode_all(image.read_bytes())[0]["image_flags"] & core.IMAGE_LIVE
    assert not os.path.exists(track.socket_path(target.pid))
    assert uffd_flagged(target.pid) == []
    assert cmd(target, "s a 0 64") == "SUM=48"


def test_no_session_and_bad_combinations_are_one_line(target, tmp_path, capsys):
    with pytest.raises(track.NoSession, match=f"no tracking session for process {target.pid}"):
        track.connect(target.pid)
    assert cli.main(["--track", "--kill", "-o", str(tmp_path / "x.img"), str(target.pid)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kill" in err[0]
    assert target.proc.poll() is None


def test_a_failed_checkpoint_leaves_no_session(target, tmp_path, capsys, monkeypatch):
    from backend import dump
    from ckptsim.cr.context import CheckpointError

    def refuse(*args, **kw):
        raise CheckpointError(5, "simulated failure")
    launched = []

    def launch(pid):
        client = real_launch(pid)
        launched.append(client.daemon_pid)
        return client
    real_launch = track.launch
    monkeypatch.setattr(dump, "checkpoint", refuse)
    monkeypatch.setattr(track, "launch", launch)
    try:
        assert cli.main(["--track", "-o", str(tmp_path / "f.img"), str(target.pid)]) == 1
        assert "simulated failure" in capsys.readouterr().err
        (daemon,) = launched
        _wait_for(lambda: _gone(daemon), f"the unarmed daemon {daemon} to leave")
    finally:
        for pid in launched:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert not os.path.exists(track.socket_path(target.pid))
    assert uffd_flagged(target.pid) == [] and cmd(target, "s a 0 64") == "SUM=48"


def test_bench_tracking_script_runs(c_target):
    _require_tracking()
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_tracking.py"),
                        "--quick"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0, r.stderr
    assert "untracked" in r.stdout and "tracked" in r.stdout and "ratio" in r.stdout


@pytest.mark.parametrize("name, args, keeps", [
    ("brk", (0x5000, 0, 0), True),
    ("madvise", (0x1000, 0x1000, 4), True),          # MADV_DONTNEED
    ("madvise", (0x1000, 0x1000, 8), True),          # MADV_FREE
    ("madvise", (0x1000, 0x1000, 1), False),         # MADV_RANDOM: "rr"
    ("madvise", (0x1000, 0x1000, 10), False),        # MADV_DONTFORK: "dc"
    ("madvise", (0x1000, 0x1000, 16), False),        # MADV_DONTDUMP: "dd"
    ("mlock", (0x1000, 0x1000), False),              # "lo", same maps line
    ("mprotect", (0x1000, 0x1000, 3), False),
    ("mmap", (0x1000, 0x1000, 3, 0x32, -1, 0), False),
])
def test_which_mm_syscalls_keep_the_vm_flags_of_unchanged_maps_lines(name, args, keeps):
    from backend.track_daemon import _keeps_vm_flags
    event = bpf_tracker.SyscallEvent(1, 1, name, args, 0)
    assert _keeps_vm_flags(event) is keeps

"""backend.bpf_tracker on real C targets (targets/bpf_tracked.c): dirty pages, mm and fd
events, fork/exec/exit, and that no program stays attached after stop() or process exit.

What the dirty set sees (and these tests pin down): writes that fault. A first write to a fresh
anonymous page, to a page dropped by MADV_DONTNEED, a COW write after fork and a kernel write
(read() into the page) are seen; a second write to a page that is present and writable is not.
Every test that needs the tracker skips, saying why, when ``bpf_tracker.available()`` says no.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from backend import bpf_tracker
from backend.bpf_tracker import Tracker, TrackerIncomplete, TrackerUnavailable

PAGE = 4096
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _require_tracker() -> None:
    ok, why = bpf_tracker.available()
    if not ok:
        pytest.skip(f"the eBPF tracker is unavailable here: {why}")


@pytest.fixture(scope="module")
def tracker():
    """One loaded tracker for the module (loading compiles bpf/tracker.c)."""
    _require_tracker()
    t = Tracker()
    t.start([])
    try:
        yield t
    finally:
        t.stop()


@pytest.fixture
def target(c_target, start_target):
    exe = c_target("bpf_tracked")

    def start():
        t = start_target(exe)
        t.region = t.info["region"]
        return t
    return start


def _cmd(t, line: str) -> str:
    t.write(line.encode() + b"\n")
    reply = t.readline()
    assert reply is not None, f"no reply to {line!r}"
    return reply


def _fields(reply: str) -> dict[str, int]:
    return {k: int(v, 0) for k, v in (item.split("=") for item in reply.split()[1:])}


def _region_pages(tracker, t, tgid=None) -> list[int]:
    """The dirty pages of ``tgid`` (default: the target) inside its region, as page numbers."""
    end = t.region + 64 * PAGE
    return [(a - t.region) // PAGE for a in tracker.dirty_pages(tgid or t.pid)
            if t.region <= a < end]


def _wait_for(predicate, what: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _kill(pid: int) -> None:
    """End a grandchild of the test by pid (its parent, the target, reaps it or is killed)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


# --- dirty pages ------------------------------------------------------------------------------

def test_first_writes_to_fresh_pages_are_the_dirty_set(tracker, target):
    t = target()
    tracker.start([t.pid])
    tracker.reset(t.pid)
    assert _cmd(t, "w 1 3 7 8 63") == "done"
    assert _region_pages(tracker, t) == [1, 3, 7, 8, 63]
    pages = tracker.dirty_pages(t.pid)
    assert pages == sorted(set(pages)) and all(a % PAGE == 0 for a in pages)


def test_only_faulting_writes_are_seen(tracker, target):
    t = target()
    tracker.start([t.pid])
    _cmd(t, "w 1 3")
    tracker.reset(t.pid)
    assert _region_pages(tracker, t) == []
    # present and writable now: writing them again raises no fault, the tracker sees nothing
    assert _cmd(t, "w 1 3") == "done"
    assert _region_pages(tracker, t) == []
    # dropped pages fault again on their next write
    assert _cmd(t, "dontneed") == "done"
    assert _cmd(t, "w 3") == "done"
    assert _region_pages(tracker, t) == [3]
    # the kernel writing a page for the task (read() into it) is seen too
    assert _cmd(t, "rd 9") == "done"
    assert _region_pages(tracker, t) == [3, 9]


def test_a_thread_writes_for_its_process_and_is_no_new_process(tracker, target):
    t = target()
    tracker.start([t.pid])
    tracker.reset(t.pid)
    before = tracker.tracked()
    assert _cmd(t, "thread") == "done"
    assert _region_pages(tracker, t) == [0]
    assert tracker.tracked() == before
    assert [n for n in tracker.notices() if n.tgid == t.pid] == []


# --- fork, exec, exit -------------------------------------------------------------------------

def test_fork_tracks_the_child_and_its_exit_drops_it(tracker, target):
    t = target()
    tracker.start([t.pid])
    _cmd(t, "w 1 2")
    tracker.notices()
    reply = _cmd(t, "fork 5 6")
    child = _fields(reply)["child"]
    try:
        assert child in tracker.tracked()
        _wait_for(lambda: _region_pages(tracker, t, child) == [5, 6], "the child's writes")
        notices = tracker.notices()
        assert [(n.kind, n.tgid, n.child) for n in notices] == [("fork", t.pid, child)]
        # the parent's present pages are copy-on-write now: its next write faults
        tracker.reset(t.pid)
        assert _cmd(t, "w 1") == "done"
        assert _region_pages(tracker, t) == [1]
        assert _cmd(t, "reap") == "reaped"
        exits = _wait_for(lambda: [n for n in tracker.notices() if n.kind == "exit"],
                          "the exit notice")
        assert [(n.tgid, n.tid) for n in exits] == [(child, child)]
        assert child not in tracker.tracked() and t.pid in tracker.tracked()
    finally:
        _kill(child)


def test_exec_is_noticed_with_its_file(tracker, target):
    t = target()
    tracker.start([t.pid])
    tracker.notices()
    child = _fields(_cmd(t, "exec"))["child"]
    try:
        execs = _wait_for(lambda: [n for n in tracker.notices() if n.kind == "exec"],
                          "the exec notice")
        assert [(n.tgid, n.filename) for n in execs] == [(child, "/bin/sleep")]
        assert child in tracker.tracked()
    finally:
        _kill(child)
    exits = _wait_for(lambda: [n for n in tracker.notices() if n.kind == "exit"], "the exit")
    assert [n.tgid for n in exits] == [child]
    assert child not in tracker.tracked()


def test_start_tracks_the_present_descendants(tracker, target):
    t = target()
    child = _fields(_cmd(t, "fork"))["child"]
    try:
        tracker.start([t.pid])
        assert {t.pid, child} <= tracker.tracked()
    finally:
        _cmd(t, "reap")


def test_start_refuses_a_missing_process(tracker):
    with pytest.raises(ProcessLookupError, match="cannot track process 999999999"):
        tracker.start([999999999])


# --- mm and fd events -------------------------------------------------------------------------

def test_address_space_changes_with_their_ranges(tracker, target):
    t = target()
    tracker.start([t.pid])
    tracker.reset(t.pid)
    f = _fields(_cmd(t, "mm"))
    a, b = f["a"], f["b"]
    events = tracker.mm_events(t.pid)
    assert [e.name for e in events] == ["mmap", "mremap", "mprotect", "madvise", "mlock",
                                        "munlock", "munmap", "brk"]
    mmap_, mremap, mprotect, madvise, mlock, munlock, munmap, brk = events
    assert mmap_.ret == a and mmap_.ranges() == [(a, a + 3 * PAGE)]
    assert mremap.ret == b and mremap.ranges() == [(a, a + 3 * PAGE), (b, b + 5 * PAGE)]
    assert mprotect.ranges() == [(b, b + PAGE)] and mprotect.args[2] == 1      # PROT_READ
    assert madvise.ranges() == [(b + 4 * PAGE, b + 5 * PAGE)] and madvise.args[2] == 4  # DONTNEED
    assert mlock.ranges() == munlock.ranges() == [(b + 2 * PAGE, b + 3 * PAGE)]
    assert munmap.ranges() == [(b, b + 5 * PAGE)] and munmap.ret == 0
    assert brk.ret == f["brk1"] == f["brk0"] + PAGE
    assert all(e.tgid == e.tid == t.pid for e in events)
    tracker.reset(t.pid)
    assert tracker.mm_events(t.pid) == []


def test_sigaction_calls_are_recorded(tracker, target):
    t = target()
    tracker.start([t.pid])
    tracker.reset(t.pid)
    assert _cmd(t, "sig") == "done"
    events = tracker.sig_events(t.pid)
    assert [(e.name, e.args[0]) for e in events] == [("rt_sigaction", 23), ("rt_sigaction", 23)]
    assert events[0].args[1] != 0 and events[1].args[1] == 0        # set, then only read
    assert tracker.mm_events(t.pid) == [] and tracker.fd_events(t.pid) == []
    tracker.reset(t.pid)
    assert tracker.sig_events(t.pid) == []


def test_fd_table_changes_and_positions(tracker, target):
    t = target()
    tracker.start([t.pid])
    tracker.reset(t.pid)
    f = _fields(_cmd(t, "fd"))
    null, dup, r, w = f["null"], f["dup"], f["r"], f["w"]
    got = [(e.name, e.ret) for e in tracker.fd_events(t.pid)]
    # lseek on /dev/null always answers 0
    assert got == [("openat", null), ("dup", dup), ("pipe2", 0), ("lseek", 0), ("close", 0),
                   ("close", 0), ("close", 0), ("close", 0)]
    openat, dup_ev, pipe, lseek, *closes = tracker.fd_events(t.pid)
    assert openat.path == "/dev/null" and dup_ev.args[0] == null
    assert pipe.fds == (r, w) and lseek.args[:3] == (null, 10, 0)                 # SEEK_SET
    assert [c.args[0] for c in closes] == [r, w, dup, null]
    io = tracker.io_counts(t.pid)
    assert io[r] == {"read": 1} and io[w] == {"write": 1}
    assert io[1]["write"] >= 1                                   # its reply on stdout
    tracker.reset(t.pid)
    assert tracker.fd_events(t.pid) == [] and tracker.io_counts(t.pid) == {}


def test_a_lost_record_is_refused_until_reset(tracker, target):
    t = target()
    tracker.start([t.pid])
    table = tracker._bpf[b"tracked"]                 # what the programs set when a map is full
    leaf = table[table.Key(t.pid)]
    leaf.dirty_lost = leaf.events_lost = 1
    table[table.Key(t.pid)] = leaf
    with pytest.raises(TrackerIncomplete, match=f"process {t.pid}: some dirty pages"):
        tracker.dirty_pages(t.pid)
    with pytest.raises(TrackerIncomplete, match=f"process {t.pid}: some events"):
        tracker.mm_events(t.pid)
    tracker.reset(t.pid)
    assert tracker.dirty_pages(t.pid) == [] and tracker.mm_events(t.pid) == []


def test_dirty_by_tgid_reads_every_process_in_one_pass_and_take_empties_it(tracker, target):
    """dirty_by_tgid() is dirty_pages of every recorded process; take=True deletes what it
    read in the same pass (later writes are the next answer); a lost record maps to None
    until reset_many clears the flag."""
    t = target()
    tracker.start([t.pid])
    tracker.reset(t.pid)
    assert _cmd(t, "w 1 3") == "done"
    everything = tracker.dirty_by_tgid()
    assert everything[t.pid] == tracker.dirty_pages(t.pid)
    taken = tracker.dirty_by_tgid(take=True)
    assert taken[t.pid] == everything[t.pid] and tracker.dirty_pages(t.pid) == []
    assert _cmd(t, "w 5") == "done"
    assert _region_pages(tracker, t) == [5]
    table = tracker._bpf[b"tracked"]
    leaf = table[table.Key(t.pid)]
    leaf.dirty_lost = 1
    table[table.Key(t.pid)] = leaf
    assert tracker.dirty_by_tgid(take=True)[t.pid] is None
    tracker.reset_many([t.pid], dirty=False)
    assert tracker.dirty_by_tgid().get(t.pid, []) == []


# --- availability, bounded loading, nothing left attached ---------------------------------------

def test_not_root_is_unavailable_with_the_reason(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    ok, why = bpf_tracker.available()
    assert not ok and "not root" in why
    with pytest.raises(TrackerUnavailable, match="not root"):
        Tracker().start([os.getpid()])


def test_queries_need_a_started_tracker():
    with pytest.raises(TrackerUnavailable, match="not started"):
        Tracker().dirty_pages(os.getpid())


def _bpftool(*args: str):
    tool = shutil.which("bpftool")
    if tool is None:
        pytest.skip("bpftool is not installed (scripts/setup.sh installs it): it lists the "
                    "attached programs these tests check")
    r = subprocess.run([tool, "-j", *args], capture_output=True, text=True, timeout=30,
                       check=False)
    return json.loads(r.stdout or "[]") if r.returncode == 0 else None


def _attached(pid: int) -> set[int]:
    """The ids of the programs attached through perf events held by ``pid``."""
    return {e["prog_id"] for e in _bpftool("perf", "list") if e.get("pid") == pid}


def _prog_exists(prog_id: int) -> bool:
    return _bpftool("prog", "show", "id", str(prog_id)) is not None


def test_stop_detaches_and_frees_every_program():
    _require_tracker()
    before = _attached(os.getpid())
    t = Tracker()
    t.start([])
    mine = _attached(os.getpid()) - before
    assert len(mine) == len(bpf_tracker.TRACEPOINTS)
    t.stop()
    t.stop()                                               # idempotent
    assert _attached(os.getpid()) == before
    _wait_for(lambda: not any(_prog_exists(p) for p in mine), "the programs to be freed")


def test_a_killed_process_leaves_nothing_attached():
    _require_tracker()
    code = ("import sys, time; from backend.bpf_tracker import Tracker; "
            "t = Tracker(); t.start([]); print('READY', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert child.stdout.readline().strip() == "READY"
        progs = _attached(child.pid)
        assert len(progs) == len(bpf_tracker.TRACEPOINTS)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    _wait_for(lambda: not any(_prog_exists(p) for p in progs), "the programs to be freed")


def test_loading_is_bounded_and_an_abandoned_load_is_detached():
    _require_tracker()
    before = _attached(os.getpid())
    t = Tracker(load_timeout=0.001)
    with pytest.raises(TrackerUnavailable, match="took more than 0.001 s"):
        t.start([])
    assert not t.running()
    # the compile finishes in the background, then detaches at once
    _wait_for(lambda: not any(th.name == "bpf-tracker-load" for th in threading.enumerate()),
              "the load thread", 30)
    assert _attached(os.getpid()) == before


def test_bcc_imports_from_debians_copy_without_the_venv_link():
    if not os.path.isdir(bpf_tracker.DEBIAN_BCC):
        pytest.skip(f"{bpf_tracker.DEBIAN_BCC} is missing (apt-get install python3-bpfcc)")
    code = ("import sys; sys.path = [p for p in sys.path if 'site-packages' not in p]; "
            f"sys.path.insert(0, {REPO!r}); "
            "from backend.bpf_tracker import _import_bcc; print(_import_bcc().__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == os.path.join(bpf_tracker.DEBIAN_BCC, "__init__.py")

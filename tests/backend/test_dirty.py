"""backend.dirty (userfaultfd write-protect + PAGEMAP_SCAN dirty tracking) against real
processes (tests/backend/targets/dirty_target.c).

Every test ends its targets by pid (the start_target fixture; forked children here) and checks
that no process is left traced or stopped."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from array import array

import pytest

from backend import kabi, ptrace
from backend.dirty import DirtyTrackingError, WriteTracker, marker_runs
from backend.memory_pages import PAGE_SIZE
from backend.proc import read_smaps

A_PAGES, A_POPULATED, F_PAGES = 64, 48, 8       # as in dirty_target.c
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dirty") / "data"
    path.write_bytes(bytes(range(1, 256)) * (F_PAGES * PAGE_SIZE // 255 + 1))
    return str(path)


@pytest.fixture
def target(c_target, start_target, data_file, check_untraced):
    t = start_target(c_target("dirty_target"), data_file)
    yield t
    check_untraced(t.pid)


@pytest.fixture
def trackers():
    """``trackers(pid, **kw)``: a WriteTracker set up while pid is seized (then released);
    every one is closed at teardown."""
    made: list[WriteTracker] = []

    def track(pid: int, **kw) -> WriteTracker:
        with ptrace.seized(pid):
            tr = WriteTracker(pid, **kw)
        made.append(tr)
        return tr

    yield track
    for tr in made:
        tr.close()


@pytest.fixture
def trackers_made():
    """A list of WriteTrackers to close at teardown."""
    made: list[WriteTracker] = []
    yield made
    for tr in made:
        tr.close()


@pytest.fixture
def kill_later():
    """Pids (forked grandchildren) to SIGKILL at teardown, whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cmd(t, line: str) -> str:
    t.write(line.encode() + b"\n")
    reply = t.readline(timeout=10)
    assert reply is not None, f"target {t.pid} did not answer {line!r}"
    return reply


def region_pages(addrs, base: int, npages: int) -> set[int]:
    """The page indices of ``addrs`` inside [base, base + npages pages)."""
    end = base + npages * PAGE_SIZE
    return {(a - base) // PAGE_SIZE for a in addrs if base <= a < end}


def uffd_flagged(pid: int) -> list[str]:
    return [f"{e.start:#x}" for e in read_smaps(pid) if "uw" in e.vm_flags]


def fd_table(pid: int) -> dict[str, str]:
    d = f"/proc/{pid}/fd"
    return {fd: os.readlink(f"{d}/{fd}") for fd in os.listdir(d)}


def process_vm_write(pid: int, addr: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    local = kabi.iovec(ctypes.addressof(buf), len(data))
    remote = kabi.iovec(addr, len(data))
    n = kabi.syscall(kabi.SYS_process_vm_writev, pid, ctypes.byref(local), 1,
                     ctypes.byref(remote), 1, 0, what="process_vm_writev")
    assert n == len(data)


# --------------------------------------------------------------------------------------------
def test_exactly_the_written_pages_then_only_those_since(target, trackers):
    a, f = target.info["a"], target.info["f"]
    tr = trackers(target.pid)
    assert tr.registered and not tr.untracked
    assert tr.features & kabi.UFFD_FEATURE_WP_ASYNC
    assert region_pages(tr.written_pages(reprotect=False), a, A_PAGES) == set()
    cmd(target, "w a 3 5")          # populated before tracking
    cmd(target, "w a 50 52")        # never populated before
    cmd(target, "r a 10 12")
    cmd(target, "r a 55 57")        # read-faults an unpopulated page (the zero page)
    cmd(target, "w f 2 3")          # copy-on-write of a private file page
    cmd(target, "r f 5 6")
    with ptrace.seized(target.pid):     # as a checkpoint scans: target stopped
        peek = tr.written_pages(reprotect=False)
        written = tr.written_pages()
    assert list(peek) == list(written)
    assert list(written) == sorted(written)
    assert region_pages(written, a, A_PAGES) == {3, 4, 50, 51}
    assert region_pages(written, f, F_PAGES) == {2}
    # reprotected: nothing until the next writes, then only those
    assert region_pages(tr.written_pages(), a, A_PAGES) == set()
    cmd(target, "w a 4 6")
    cmd(target, "w a 50 51")
    cmd(target, "w f 2 4")
    again = tr.written_pages()
    assert region_pages(again, a, A_PAGES) == {4, 5, 50}
    assert region_pages(again, f, F_PAGES) == {2, 3}
    assert cmd(target, "s a 0 64") == f"SUM={A_POPULATED + 2 + 2 + 2 + 1}"     # writes landed


@pytest.mark.parametrize("user_mode_only", [False, True])
def test_kernel_and_foreign_writes_are_seen(target, trackers, user_mode_only):
    a = target.info["a"]
    tr = trackers(target.pid, user_mode_only=user_mode_only)
    assert tr.user_mode_only is user_mode_only
    process_vm_write(target.pid, a + 7 * PAGE_SIZE + 8, b"\x55")
    process_vm_write(target.pid, a + 60 * PAGE_SIZE + 8, b"\x66")    # unpopulated
    cmd(target, "i a 20 22")        # pread() into the pages: written by the kernel
    assert region_pages(tr.written_pages(), a, A_PAGES) == {7, 20, 21, 60}
    assert cmd(target, "s a 60 61") == "SUM=102"


def test_target_fd_table_unchanged(target, trackers):
    before = fd_table(target.pid)
    tr = trackers(target.pid)
    assert fd_table(target.pid) == before
    assert not any("userfaultfd" in link for link in before.values())
    assert fcntl.fcntl(tr._uffd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC     # ours: close-on-exec


def test_changed_vmas_new_gone_and_moved(target, trackers):
    a = target.info["a"]
    tr = trackers(target.pid)
    assert not tr.changed_vmas(), tr.changed_vmas()
    mapped = int(cmd(target, "m 4").split("=")[1], 16)
    cmd(target, "u a 40 44")
    moved = int(cmd(target, "M a 10 12").split("=")[1], 16)
    cmd(target, "w a 12 13")
    with ptrace.seized(target.pid):
        changes = tr.changed_vmas()
        written = tr.written_pages()
    new = {(m.start, m.end) for m in changes.new}
    assert (mapped, mapped + 4 * PAGE_SIZE) in new
    assert (moved, moved + 2 * PAGE_SIZE) in new
    assert len(new) == 2, changes.new
    assert changes.gone == [(a + 10 * PAGE_SIZE, a + 12 * PAGE_SIZE),
                            (a + 40 * PAGE_SIZE, a + 44 * PAGE_SIZE)]
    # pages of the new VMAs are not in written_pages (they are taken whole)
    assert region_pages(written, mapped, 4) == set() and region_pages(written, moved, 2) == set()
    assert region_pages(written, a, A_PAGES) == {12}


def test_fork_child_writes_are_the_childs(target, trackers, kill_later):
    a = target.info["a"]
    parent = trackers(target.pid)
    child = int(cmd(target, "F").split("=")[1])
    kill_later.append(child)
    # the kernel dropped the registration in the child (no UFFD_FEATURE_EVENT_FORK)
    assert uffd_flagged(child) == []
    assert uffd_flagged(target.pid)
    cmd(target, "w a 3 5")                                   # the child answers now
    own = trackers(child)
    cmd(target, "w a 6 8")
    assert region_pages(own.written_pages(), a, A_PAGES) == {6, 7}
    assert region_pages(parent.written_pages(), a, A_PAGES) == set()
    target.write(b"x\n")
    assert target.readline(timeout=10) == "REAPED=0"
    own.close()
    cmd(target, "w a 9 10")
    assert region_pages(parent.written_pages(), a, A_PAGES) == {9}
    assert cmd(target, "s a 3 8") == "SUM=5"                  # the parent's copies: all 1


def uffd_wp_bits(pid: int, base: int, npages: int) -> int:
    """How many of the pages have the uffd-wp bit (pagemap bit 57: a protected PTE or a
    marker)."""
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        entries = array("Q", os.pread(fd, 8 * npages, base // PAGE_SIZE * 8))
    finally:
        os.close(fd)
    return sum(1 for e in entries if e & kabi.PM_UFFD_WP)


def test_close_lets_the_target_run_on(target, trackers):
    a = target.info["a"]
    tr = trackers(target.pid)
    assert uffd_wp_bits(target.pid, a, A_PAGES) == A_PAGES   # populated PTE table: all
    cmd(target, "w a 0 4")
    assert uffd_wp_bits(target.pid, a, A_PAGES) == A_PAGES - 4
    tr.close()                       # target running, not seized
    assert uffd_flagged(target.pid) == []
    assert uffd_wp_bits(target.pid, a, A_PAGES) == 0          # the kernel cleared them
    # protected pages, unpopulated pages, file pages: all plain writes now
    assert cmd(target, "w a 0 64") == "OK"
    assert cmd(target, "w f 0 8") == "OK"
    assert cmd(target, "s a 0 64") == f"SUM={4 * 3 + 44 * 2 + 16 * 1}"
    tr.close()                       # idempotent
    with pytest.raises(DirtyTrackingError) as e:
        tr.written_pages()
    assert e.value.errno == errno.EBADF and str(target.pid) in str(e.value)


def test_dropped_fd_releases_the_registration(target, trackers):
    """A checkpointer that dies without close(): the kernel's release clears everything."""
    tr = trackers(target.pid)
    cmd(target, "w a 0 2")
    os.close(tr._uffd)               # what exiting does
    tr._uffd = None
    assert uffd_flagged(target.pid) == []
    assert uffd_wp_bits(target.pid, target.info["a"], A_PAGES) == 0
    assert cmd(target, "w a 0 64") == "OK"
    assert cmd(target, "s a 0 2") == "SUM=6"


def vm_pte_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmPTE:"))


def test_sparse_mapping_costs_no_page_tables(target, trackers):
    """Protecting a 16 GiB mapping with one page touched allocates no page tables (a whole-
    range UFFDIO_WRITEPROTECT would add 32 MiB), and a write anywhere in it is still seen."""
    sparse = int(cmd(target, "n 16").split("=")[1], 16)
    before = vm_pte_kb(target.pid)
    tr = trackers(target.pid)
    assert vm_pte_kb(target.pid) - before < 256
    far = sparse + (12 << 30)
    process_vm_write(target.pid, far + 100, b"x")
    cmd(target, "w a 1 2")
    written = tr.written_pages()
    assert region_pages(written, sparse, (16 << 30) // PAGE_SIZE) == {(far - sparse) // PAGE_SIZE}
    assert region_pages(written, target.info["a"], A_PAGES) == {1}
    assert region_pages(tr.written_pages(), sparse, (16 << 30) // PAGE_SIZE) == set()


def test_exec_makes_everything_new(trackers, kill_later, check_untraced):
    """After an exec the registered mm is gone: nothing is ours, every VMA is new."""
    proc = subprocess.Popen(["sh", "-c", "read line; exec sleep 60"], stdin=subprocess.PIPE)
    kill_later.append(proc.pid)
    try:
        time.sleep(0.1)
        tr = trackers(proc.pid)
        assert tr.registered and not tr.changed_vmas()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        while open(f"/proc/{proc.pid}/comm").read().strip() != "sleep":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        changes = tr.changed_vmas()
        assert changes.new and changes.gone == tr.registered
        assert len(tr.written_pages()) == 0
        tr.close()
        check_untraced(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_errors_name_the_process(target, trackers):
    # not stopped by us: nothing can be injected
    with pytest.raises(DirtyTrackingError) as e:
        WriteTracker(target.pid)
    assert str(target.pid) in str(e.value) and "userfaultfd" in str(e.value)
    assert cmd(target, "r a 0 1") == "OK"
    # no such process
    with pytest.raises(DirtyTrackingError) as e:
        WriteTracker(2 ** 22 + 12345)
    assert e.value.errno == errno.ESRCH and str(2 ** 22 + 12345) in str(e.value)


def test_bench_overhead_script_runs(c_target, data_file):
    """bench/bench_dirty_tracking.py measures (and checks) what it reports."""
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_dirty_tracking.py"),
                        "--pages", "256", "--rounds", "2", "--exe", c_target("dirty_target"),
                        "--file", data_file], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0, r.stderr
    assert "tracked" in r.stdout and "untracked" in r.stdout


def test_bpf_write_faults_equal_the_scan(target, trackers_made):
    """The eBPF tracker (backend/bpf_tracker.py, write faults seen by the page_fault
    tracepoints) and PAGEMAP_SCAN agree exactly on a target that writes only its own memory:
    every first write after protection faults, and the scan sees each page written."""
    from backend import bpf_tracker
    ok, why = bpf_tracker.available()
    if not ok:
        pytest.skip(f"eBPF tracker unavailable: {why}")
    a, f = target.info["a"], target.info["f"]
    with bpf_tracker.Tracker() as bpf:
        bpf.start([target.pid])
        with ptrace.seized(target.pid):     # one stop: the target's return to user after
            tr = WriteTracker(target.pid)   # it (rseq cpu ids written by the kernel) is
            bpf.reset(target.pid)           # in both or in neither
        trackers_made.append(tr)
        for line in ("w a 3 5", "w a 50 52", "r a 10 12", "r a 55 57", "w f 2 3", "r f 5 6",
                     "i a 20 22", "s a 0 64"):
            cmd(target, line)
        with ptrace.seized(target.pid):
            ours = tr.written_pages()
            theirs = bpf.dirty_pages(target.pid)
    assert region_pages(ours, a, A_PAGES) == {3, 4, 20, 21, 50, 51}
    assert region_pages(ours, f, F_PAGES) == {2}
    in_tracked = {p for p in theirs if any(lo <= p < hi for lo, hi in tr.registered)}
    assert in_tracked == set(ours), sorted(map(hex, in_tracked ^ set(ours)))


def test_a_full_scan_vector_reports_no_page_twice(target, trackers, monkeypatch):
    """More written runs than the scan vector holds: each ioctl resumes after what it
    reported (walk_end can fall inside the last region of a full vector)."""
    import backend.dirty as dirty_module
    a = target.info["a"]
    tr = trackers(target.pid)
    monkeypatch.setattr(dirty_module, "SCAN_VEC_LEN", 3)
    for page in range(0, 40, 2):                      # 20 separate runs of one page
        cmd(target, f"w a {page} {page + 1}")
    with ptrace.seized(target.pid):
        peek = tr.written_pages(reprotect=False)
        written = tr.written_pages()
    assert len(peek) == len(set(peek)) and list(peek) == list(written)
    assert region_pages(written, a, A_PAGES) == set(range(0, 40, 2))


def _entry(value: int) -> bytes:
    return value.to_bytes(8, "little")


def test_marker_runs_finds_runs_of_markers_among_pagemap_entries():
    """Synthetic pagemap entries: a uffd-wp marker (swapped, not present, swap type >= 16,
    offset < 8, soft-dirty allowed) is found per run; a real swap entry, a present page, a
    none entry and bytes that would only match across two entries are not."""
    base = 0x7F0000000000
    marker = (1 << 62) | (1 << 57) | 0x1D | (1 << 5)          # type 29, offset 1, wp
    soft = marker | (1 << 55)
    real_swap = (1 << 62) | 3 | (12345 << 5)                  # type 3, a real offset
    present = (1 << 63) | 0x1234
    entries = [present, marker, marker, soft, real_swap, 0, marker, present]
    assert marker_runs(b"".join(map(_entry, entries)), base) == [
        (base + 1 * PAGE_SIZE, base + 4 * PAGE_SIZE), (base + 6 * PAGE_SIZE, base + 7 * PAGE_SIZE)]
    # a marker-like byte pattern straddling two entries is no entry of its own
    straddle = b"\x00\x00\x00\x10" + bytes(4) + b"\x00\x00\x00\x00\x40\x00\x00\x00"
    assert marker_runs(straddle, base) == []
    assert marker_runs(b"", base) == []


def test_scan_gives_written_pages_and_present_runs_in_one_walk(target, trackers):
    """scan(present=True): the written pages (re-protected in the same walk) and the present
    runs: what backend.memory's scan gives there, without the uffd-wp markers protection
    left on the never-touched pages 48..63 of region a."""
    from backend.incremental import without_markers
    from backend.memory import ProcessMemory
    a, f = target.info["a"], target.info["f"]
    tr = trackers(target.pid)
    cmd(target, "w a 3 5")
    cmd(target, "w a 50 51")                    # populates one of the never-touched pages
    cmd(target, "w f 2 3")                      # copy-on-write of a private file page
    with ptrace.seized(target.pid):
        layout = tr.layout()
        assert tr.registered_layout().ours == layout.ours and not layout.others
        assert any(file for _, _, file in layout.ours) and not all(f for _, _, f in layout.ours)
        scan = tr.scan(layout.ours, reprotect=True, present=True)
        with ProcessMemory(target.pid) as memory:
            expected = [run for e in read_smaps(target.pid) if "uw" in e.vm_flags
                        for run in memory.regions(e)]
        expected = without_markers(target.pid, expected)
        again = tr.scan(layout.ours, reprotect=False, present=True)
    assert region_pages(scan.written, a, A_PAGES) == {3, 4, 50}
    assert region_pages(scan.written, f, F_PAGES) == {2}
    assert (a, a + 48 * PAGE_SIZE) in scan.present and (a + 50 * PAGE_SIZE,
                                                        a + 51 * PAGE_SIZE) in scan.present
    assert (f + 2 * PAGE_SIZE, f + 3 * PAGE_SIZE) in scan.present      # the private copy only
    assert not any(f <= lo < f + F_PAGES * PAGE_SIZE and (lo, hi) != (f + 2 * PAGE_SIZE,
                   f + 3 * PAGE_SIZE) for lo, hi in scan.present)
    joined = []
    for lo, hi in expected:                     # memory's runs may stop at VMA boundaries
        if joined and joined[-1][1] == lo:
            joined[-1] = (joined[-1][0], hi)
        else:
            joined.append((lo, hi))
    assert scan.present == joined
    assert len(again.written) == 0 and again.present == scan.present      # re-protected

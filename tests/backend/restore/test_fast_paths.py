"""The restart's fast paths give what the slow ones gave: page writes batched on a helper
thread, syscalls injected with one stop (int3) and kept off where that stop would change the
restored SIGTRAP state, ELF checks without pyelftools."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import time
from array import array

import pytest

from backend.restore import pagewriter
from backend.restore.pagewriter import (IOV_MAX, UFFD_MIN_RUN, PageWriter, plan_calls,
                                        split_for_uffd, write_chunks)
from backend import kabi
from backend.restore.memory import free_spot, stub_maps
from backend.restore.stub import BATCH_MAX, Stub, StubError
from backend.restore.tree import map_trampoline, set_options, spawn_seed
from .test_programs import restore_runs, status  # noqa: F401  (the fixture, ended by pid)

PAGE = 4096


# -- page writes ---------------------------------------------------------------------------------

def test_plan_merges_runs_across_chunks_and_keeps_every_byte():
    a = array("Q", range(0x10000, 0x10000 + 4 * PAGE, PAGE))
    b = array("Q", range(0x10000 + 4 * PAGE, 0x10000 + 6 * PAGE, PAGE))   # continues a
    c = array("Q", [0x40000, 0x42000])                                      # two runs
    calls = plan_calls([(1000, a), (90000, b), (500000, c)])
    assert len(calls) == 1
    call = calls[0]
    assert call.local == [(1000, 4 * PAGE), (90000, 2 * PAGE), (500000, 2 * PAGE)]
    assert call.remote == [(0x10000, 0x10000 + 6 * PAGE), (0x40000, 0x41000),
                           (0x42000, 0x43000)]
    assert call.size == 8 * PAGE


def test_plan_cuts_at_iov_max_runs_and_at_the_call_size(monkeypatch):
    scattered = array("Q", range(0x100000, 0x100000 + 2500 * 2 * PAGE, 2 * PAGE))  # 2500 runs
    calls = plan_calls([(0, scattered)])
    assert [len(c.remote) for c in calls] == [IOV_MAX, IOV_MAX, 2500 - 2 * IOV_MAX]
    assert [c.local[0][0] for c in calls] == [0, IOV_MAX * PAGE, 2 * IOV_MAX * PAGE]
    monkeypatch.setattr(pagewriter, "CALL_BYTES", 3 * PAGE)
    chunks = [(k * PAGE, array("Q", [0x200000 + k * PAGE])) for k in range(7)]
    calls = plan_calls(chunks)
    assert [c.size for c in calls] == [3 * PAGE, 3 * PAGE, PAGE]
    assert sum(len(c.local) for c in calls) == 7


def _own_pages(n: int):
    area = mmap.mmap(-1, n * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    return area, base


def test_write_chunks_lands_every_page_where_its_address_says():
    area, base = _own_pages(8)
    try:
        addrs = array("Q", [base + 1 * PAGE, base + 2 * PAGE, base + 5 * PAGE])
        data = memoryview(bytes([1]) * PAGE + bytes([2]) * PAGE + bytes([3]) * PAGE)
        write_chunks(os.getpid(), [(addrs, data), (array("Q", [base + 7 * PAGE]),
                                                   memoryview(bytes([4]) * PAGE))])
        got = [area[k * PAGE] for k in range(8)]
        assert got == [0, 1, 2, 0, 0, 3, 0, 4]
    finally:
        del base
        area.close()


def test_a_failed_write_is_raised_by_wait_naming_the_pid():
    writer = PageWriter()
    try:
        writer.submit(os.getpid(), [(array("Q", [0x1000]), memoryview(bytes(PAGE)))]).mapped()
        with pytest.raises(StubError) as info:
            writer.wait()
        assert info.value.errno == errno.EFAULT and f"pid {os.getpid()}" in str(info.value)
        writer.wait()                                  # reported once
    finally:
        writer.close()


def test_pages_are_written_only_once_their_vmas_are_said_to_be_mapped():
    area, base = _own_pages(2)
    writer = PageWriter()
    try:
        addrs = array("Q", [base])
        submitted = writer.submit(os.getpid(), [(addrs, memoryview(bytes([7]) * PAGE))])
        time.sleep(0.05)
        assert area[0] == 0, "written before mapped()"
        submitted.mapped()
        writer.wait()
        assert area[0] == 7
        writer.submit(os.getpid(), [(array("Q", [base + PAGE]), memoryview(bytes([9]) * PAGE))])
        with pytest.raises(StubError, match="never written"):
            writer.wait()                              # (a caller's bug: not a hang)
        assert area[PAGE] == 0
        cancelled = writer.submit(os.getpid(), [(addrs, memoryview(bytes([8]) * PAGE))])
    finally:
        writer.close()                                 # a failed restart: never written
    assert area[0] == 7 and cancelled is not None
    area.close()


def test_split_sends_long_anonymous_runs_to_uffd_and_keeps_the_rest_for_writev():
    long_pages = UFFD_MIN_RUN // PAGE
    anon = [(0x100000, 0x200000)]
    # in the anonymous range: a short run, a long run, a short run (buffer order = page order)
    addrs = array("Q", [0x100000] + [0x110000 + k * PAGE for k in range(long_pages)]
                  + [0x150000, 0x152000])
    other = array("Q", [0x300000 + k * PAGE for k in range(long_pages)])   # not anonymous
    pieces, copies = split_for_uffd([(1000, addrs), (900000, other)], anon)
    assert copies == [(0x110000, 1000 + PAGE, UFFD_MIN_RUN)]
    assert pieces == [(1000, [(0x100000, 0x101000)]),
                      (1000 + PAGE + UFFD_MIN_RUN, [(0x150000, 0x151000), (0x152000, 0x153000)]),
                      (900000, [(0x300000, 0x300000 + UFFD_MIN_RUN)])]


def test_split_leaves_pages_written_twice_to_writev():
    """An incremental chain's layers write some pages again (the last one wins): UFFDIO_COPY
    could fill each once only, so that process goes by process_vm_writev whole."""
    run = array("Q", range(0x100000, 0x100000 + UFFD_MIN_RUN, PAGE))
    pieces, copies = split_for_uffd([(0, run), (UFFD_MIN_RUN, run)], [(0x100000, 0x200000)])
    assert copies == []
    assert pieces == [(0, [(0x100000, 0x100000 + UFFD_MIN_RUN)]),
                      (UFFD_MIN_RUN, [(0x100000, 0x100000 + UFFD_MIN_RUN)])]


def _map_in(stub: Stub, size: int) -> int:
    return stub.syscall(kabi.SYS_mmap, 0, size, kabi.PROT_READ | kabi.PROT_WRITE,
                        kabi.MAP_PRIVATE | kabi.MAP_ANONYMOUS, -1, 0, what="mmap")


def _read_from(pid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(size)


def _vm_flags(pid: int, addr: int) -> list[str]:
    from backend.proc_maps import read_smaps_flags
    return [e.vm_flags for e in read_smaps_flags(pid)
            if e.mapping.start <= addr < e.mapping.end][0]


@pytest.mark.parametrize("uffd_on", [True, False], ids=["uffd", "writev-only"])
def test_pages_land_by_uffd_or_writev_alike_and_no_userfaultfd_is_left(seed_stub, monkeypatch,
                                                                      uffd_on):
    from backend.restore.memory import _take_userfaultfd
    monkeypatch.setattr(pagewriter, "USE_UFFD", uffd_on)
    n = 64
    base = _map_in(seed_stub, n * PAGE)
    pages = [0, 1, 3] + list(range(8, 8 + 2 * UFFD_MIN_RUN // PAGE)) + [50, 63]
    addrs = array("Q", [base + k * PAGE for k in pages])
    data = memoryview(b"".join(bytes([k + 1]) * PAGE for k in pages))
    writer = PageWriter()
    try:
        work = writer.submit(seed_stub.pid, [(addrs, data)], [(base, base + n * PAGE)])
        uffd, stub_fd = _take_userfaultfd(seed_stub)
        assert (uffd >= 0) == uffd_on
        work.mapped(uffd)
        writer.wait()
        if stub_fd >= 0:
            seed_stub.syscall(kabi.SYS_close, stub_fd, what="close")
    finally:
        writer.close()
    got = _read_from(seed_stub.pid, base, n * PAGE)
    assert [got[k * PAGE] for k in range(n)] == [k + 1 if k in pages else 0 for k in range(n)]
    by_uffd = 2 * UFFD_MIN_RUN if uffd_on else 0
    assert writer.written == {"UFFDIO_COPY": by_uffd,
                              "process_vm_writev": len(pages) * PAGE - by_uffd}
    assert "um" not in _vm_flags(seed_stub.pid, base)        # no longer registered
    assert not [fd for fd in os.listdir(f"/proc/{seed_stub.pid}/fd")
                if "userfaultfd" in os.readlink(f"/proc/{seed_stub.pid}/fd/{fd}")]
    assert not [fd for fd in os.listdir("/proc/self/fd") if "userfaultfd" in
                _readlink(f"/proc/self/fd/{fd}")]


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except FileNotFoundError:           # (the listing's own fd)
        return ""


@pytest.mark.parametrize("case", ["huge-page-block", "page-already-there"])
def test_long_runs_never_meet_pages_a_short_run_faulted_in(seed_stub, case):
    """Where a write faults in a whole huge page (THP), a long run in the same 2 MiB block
    would find its pages there (UFFDIO_COPY: EEXIST): the long runs are copied first, the
    short ones written after. A run that meets a page already there anyway is written by
    process_vm_writev from that page on."""
    from backend.restore.memory import _take_userfaultfd
    huge = 2 << 20
    area = _map_in(seed_stub, 2 * huge)
    base = (area + huge - 1) & ~(huge - 1)
    advice = kabi.MADV_HUGEPAGE if case == "huge-page-block" else kabi.MADV_NOHUGEPAGE
    seed_stub.syscall(kabi.SYS_madvise, base, huge, advice, what="madvise")
    long_pages = 2 * UFFD_MIN_RUN // PAGE
    pages = [0] + list(range(16, 16 + long_pages)) + [300]
    addrs = array("Q", [base + k * PAGE for k in pages])
    data = memoryview(b"".join(bytes([k % 250 + 1]) * PAGE for k in pages))
    if case == "page-already-there":
        with open(f"/proc/{seed_stub.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(base + 20 * PAGE)
            mem.write(b"\xee" * PAGE)
    writer = PageWriter()
    try:
        work = writer.submit(seed_stub.pid, [(addrs, data)], [(area, area + 2 * huge)])
        uffd, stub_fd = _take_userfaultfd(seed_stub)
        work.mapped(uffd)
        writer.wait()
        seed_stub.syscall(kabi.SYS_close, stub_fd, what="close")
    finally:
        writer.close()
    got = _read_from(seed_stub.pid, base, huge)
    assert [got[k * PAGE] for k in pages] == [k % 250 + 1 for k in pages]
    assert sum(writer.written.values()) == len(pages) * PAGE
    # the long run: whole by UFFDIO_COPY, or pages 16-19 up to the one already there
    assert writer.written["UFFDIO_COPY"] == \
        (long_pages if case == "huge-page-block" else 4) * PAGE


def test_a_failed_copy_is_the_error_reported_not_the_unregister_after_it(seed_stub,
                                                                          monkeypatch):
    from backend.restore.memory import _take_userfaultfd

    def broken_copy(pid, uffd, copies):
        raise StubError(errno.ESRCH, f"pid {pid}: injected copy failure")

    def broken_unregister(uffd, ranges):
        raise OSError(errno.ENOMEM, "what UFFDIO_UNREGISTER says once the mm is gone")
    monkeypatch.setattr(pagewriter, "_copy", broken_copy)
    monkeypatch.setattr(pagewriter, "_unregister", broken_unregister)
    base = _map_in(seed_stub, 16 * PAGE)
    addrs = array("Q", [base + k * PAGE for k in range(8)])
    writer = PageWriter()
    try:
        work = writer.submit(seed_stub.pid, [(addrs, memoryview(bytes(8 * PAGE)))],
                             [(base, base + 16 * PAGE)])
        uffd, stub_fd = _take_userfaultfd(seed_stub)
        work.mapped(uffd)
        with pytest.raises(StubError, match="injected copy failure"):
            writer.wait()
        seed_stub.syscall(kabi.SYS_close, stub_fd, what="close")
    finally:
        writer.close()


def test_a_handed_userfaultfd_is_closed_when_the_writer_gives_up(monkeypatch):
    writer = PageWriter()
    r, w = os.pipe()
    os.close(w)
    try:
        work = writer.submit(os.getpid(), [(array("Q", [0x1000]), memoryview(bytes(PAGE)))],
                             [(0x1000, 0x2000)])
    finally:
        writer.close()                  # (a failed restart: nothing written)
    work.mapped(r)                      # too late: the writer closes it at once
    with pytest.raises(OSError):
        os.fstat(r)


# -- batches of injected syscalls -----------------------------------------------------------------

@pytest.fixture
def seed_stub():
    """A traced seed (/bin/sleep, never run) with its trampoline; killed and reaped after."""
    pid = spawn_seed("/bin/sleep", 0, False)
    try:
        stub = Stub.adopt(pid)
        set_options(pid)
        map_trampoline(stub, free_spot(PAGE, [(s, e) for s, e, _ in stub_maps(pid)],
                                       below=0x7e0000000000))
        yield stub
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, kabi.WALL)


def test_a_batch_runs_its_syscalls_in_order_with_one_stop_each_batch(seed_stub):
    calls = [(kabi.SYS_getpid, (), "getpid")] * (BATCH_MAX + 3)
    calls[5] = (kabi.SYS_dup, (0,), "dup")
    calls[6] = (kabi.SYS_dup, (0,), "dup")
    got = seed_stub.syscalls(calls)
    assert got[5] >= 0 and got[6] == got[5] + 1          # the second saw the first's fd
    assert got[:5] == [seed_stub.pid] * 5 and got[7:] == [seed_stub.pid] * (BATCH_MAX - 4)
    assert seed_stub.syscall(kabi.SYS_getpid) == seed_stub.pid    # one by one still works


def test_a_batch_names_its_first_failed_syscall(seed_stub):
    with pytest.raises(StubError) as info:
        seed_stub.syscalls([(kabi.SYS_getpid, (), "getpid"),
                            (kabi.SYS_close, (999,), "close of fd 999"),
                            (kabi.SYS_close, (998,), "close of fd 998")])
    assert info.value.errno == errno.EBADF and "close of fd 999" in str(info.value)


# -- int3 stops and SIGTRAP ------------------------------------------------------------------------

SIGTRAP_HOLDER = """
import os, signal, sys, time
if sys.argv[1] == "handled":
    signal.signal(signal.SIGTRAP, lambda *a: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTRAP])
    os.kill(os.getpid(), signal.SIGTRAP)            # pending, blocked
else:
    signal.signal(signal.SIGTRAP, signal.SIG_IGN)
print("READY", flush=True)
while True:
    time.sleep(0.01)
"""


@pytest.mark.parametrize("how", ["handled", "ignored"])
def test_the_sigtrap_state_survives_the_injected_syscalls(restore_runs, how):
    """A forced SIGTRAP (the trampoline's int3) resets a blocked or ignored SIGTRAP's action;
    the restart must not use those stops in such a process."""
    prog = restore_runs.start([sys.executable, "-I", "-c", SIGTRAP_HOLDER, how], name="py")
    fields = ("SigIgn", "SigCgt", "SigBlk", "ShdPnd", "SigPnd")
    before = {k: status(prog.pid)[k] for k in fields}
    bit = 1 << 4                                                  # SIGTRAP is 5
    if how == "handled":
        assert int(before["SigCgt"], 16) & bit and int(before["ShdPnd"], 16) & bit
    else:
        assert int(before["SigIgn"], 16) & bit
    restored = restore_runs.restart(prog, restore_runs.checkpoint_kill(prog))
    assert {k: status(restored.root)[k] for k in fields} == before

"""Real programs survive a live checkpoint (``kill=True``) and a restart (restart_image, a new
pid namespace by default) and carry on as if nothing happened.

Each program writes what it does to a file; a test checks that output (counts with no gap and
no repeat, values only the restored memory can give) and /proc (pids inside the namespace from
NSpid, parents, threads and their names, signal masks and pending sets, the syscall a process
blocks in). The C programs are tests/backend/targets/restore_prog_*.c.

Every process is ended by pid at teardown, on every path: the originals (killed by the
checkpoint, or by us) are reaped, and each restored tree is ended through its namespace init
(Restored.reaper, this process's child: SIGKILL to a pid namespace's init kills everything in
the namespace), which is then waited for; teardown also checks that no restored pid is left.
"""
from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import time

import pytest

from backend.dump import checkpoint
from backend.restore.job import Restored, restart_image
from ckptsim.cr.context import CheckpointError

# -- running programs, checkpoints and restarts ------------------------------------------------


class Program:
    """A program under test: ``pid`` is its root's pid as this process sees it now (it
    changes at each restart), ``ns_pid`` its pid inside its own pid namespace (the image's
    pid, the same before and after); ``out`` the file its stdout goes to."""

    def __init__(self, proc: subprocess.Popen, out: str):
        self.proc: subprocess.Popen | None = proc
        self.restored: Restored | None = None
        self.out = out
        self.pid = proc.pid
        self.ns_pid = proc.pid
        self.ready: dict[str, int] = {}        # the key=value pairs of its READY line

    def lines(self) -> list[str]:
        with open(self.out, errors="replace") as f:
            text = f.read()
        return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]

    def wait_for(self, predicate, what: str, timeout: float = 10.0) -> list[str]:
        """Poll the output until ``predicate(lines)`` holds; fails naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if predicate(lines):
                return lines
            if time.monotonic() > deadline:
                tail = "\n".join(lines[-8:])
                pytest.fail(f"timed out waiting for {what}; output ends with:\n{tail}")
            time.sleep(0.01)


class Runs:
    """What a test started and restarted, all ended by pid in ``end_all``."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.programs: list[Program] = []
        self.restorations: list[Restored] = []

    def start(self, argv: list[str], name: str = "out", stdin=subprocess.DEVNULL,
              ready: bool = True) -> Program:
        out = os.path.join(self.workdir, f"{name}.txt")
        with open(out, "w") as stdout, open(os.path.join(self.workdir, f"{name}.err"), "w") as err:
            proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=err,
                                    cwd=self.workdir, start_new_session=True)
        prog = Program(proc, out)
        self.programs.append(prog)
        if ready:
            lines = prog.wait_for(lambda ls: any(x.startswith("READY") for x in ls),
                                  f"{argv[0]}'s READY line")
            line = next(x for x in lines if x.startswith("READY"))
            prog.ready = {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
        return prog

    def checkpoint_kill(self, prog: Program, retry_gone: bool = False) -> bytearray:
        """Checkpoint ``prog``'s tree with kill=True; reap what the kill ended (the original,
        or the namespace init of the last restart, which exits once its tree is gone).
        ``retry_gone``: retry (up to 10 times) a checkpoint that failed with ESRCH because a
        process of the tree exited and was reaped while the tree was being seized (a known
        checkpoint race, backend/dump.py: ptrace.seized(_tree_order(pid)) lists the tree
        before stopping it); the tree runs on after a failed checkpoint."""
        for attempt in range(10 if retry_gone else 1):
            buf = io.BytesIO()
            try:
                checkpoint(prog.pid, buf, kill=True)
                break
            except CheckpointError as e:
                if not retry_gone or e.errno != errno.ESRCH or attempt == 9:
                    raise
        if prog.restored is not None:
            status = _wait_child(prog.restored.child, timeout=10.0)
            assert status is not None, f"namespace init {prog.restored.child} did not exit"
            self.restorations.remove(prog.restored)
            prog.restored = None
        else:
            prog.proc.wait(timeout=10)
            prog.proc = None
        return bytearray(buf.getvalue())

    def restart(self, prog: Program, image: bytearray) -> Restored:
        restored = restart_image(image)
        self.restorations.append(restored)
        prog.restored = restored
        prog.pid = restored.root
        return restored

    def end_all(self) -> None:
        for restored in self.restorations:
            for pid in restored.pids.values():
                if _in_child_pidns(pid):           # not a reused pid of someone else's
                    _kill(pid)
            _kill(restored.child)
        for prog in self.programs:
            if prog.proc is not None:            # an original still running: its tree too
                for pid in [prog.proc.pid] + _descendants(prog.proc.pid):
                    _kill(pid)
                prog.proc.wait(timeout=10)
        left = []
        for restored in self.restorations:
            if _wait_child(restored.child, timeout=10.0) is None:
                left.append(f"namespace init {restored.child} did not exit")
            left += [f"restored pid {p} still exists" for p in restored.pids.values()
                     if _exists_after(p, 5.0)]
        self.restorations.clear()
        assert not left, left


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _in_child_pidns(pid: int) -> bool:
    try:
        return len(status(pid)["NSpid"].split()) > 1
    except (FileNotFoundError, ProcessLookupError):
        return False


def _descendants(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in map(int, f.read().split()):
                    out += [child] + _descendants(child)
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _wait_child(pid: int, timeout: float) -> int | None:
    """waitpid ``pid`` (our child) for up to ``timeout`` s; its status, None if it runs on."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return -1                          # already reaped
        if got:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)


def _exists_after(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def restore_runs(tmp_path):
    runs = Runs(str(tmp_path))
    try:
        yield runs
    finally:
        runs.end_all()


# -- /proc ---------------------------------------------------------------------------------------


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def ns_pid(pid: int) -> int:
    """``pid``'s number in its innermost pid namespace (NSpid's last field)."""
    return int(status(pid)["NSpid"].split()[-1])


def tids(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def blocked_in(pid: int) -> int | None:
    """The syscall number ``pid`` blocks in (/proc/PID/syscall), None when running."""
    with open(f"/proc/{pid}/syscall") as f:
        first = f.read().split()[0]
    return int(first) if first.lstrip("-").isdigit() and int(first) >= 0 else None


def wait_blocked(pid: int, nr: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while blocked_in(pid) != nr:
        assert time.monotonic() < deadline, f"pid {pid} never blocked in syscall {nr}"
        time.sleep(0.005)


def assert_running_untraced(pids, may_be_gone: bool = False) -> None:
    """Every thread of ``pids`` is untraced and not stopped (``may_be_gone``: a process that
    has exited meanwhile, or a zombie, is fine)."""
    for pid in pids:
        try:
            threads = tids(pid)
            states = [(tid, status(tid)) for tid in threads]
        except (FileNotFoundError, ProcessLookupError):
            assert may_be_gone, f"pid {pid} is gone"
            continue
        for tid, st in states:
            if may_be_gone and st["State"][0] in "ZX":
                continue
            assert st["TracerPid"] == "0", f"tid {tid} is still traced by {st['TracerPid']}"
            assert st["State"][0] in "RSD", f"tid {tid} is {st['State']}"


# SigIgn is compared on its own (test_ignored_signals_are_the_images)
SIGNAL_FIELDS = ("SigPnd", "ShdPnd", "SigBlk", "SigCgt")


def signal_state(pid: int) -> dict[int, tuple[str, ...]]:
    """Per thread (by its namespace tid), the signal fields of /proc/TID/status."""
    out = {}
    for tid in tids(pid):
        st = status(tid)
        out[ns_pid(tid)] = tuple(st[k] for k in SIGNAL_FIELDS)
    return out


def counts(lines: list[str], tag: str) -> list[int]:
    return [int(x.split()[1]) for x in lines if x.split()[:1] == [tag]]


def assert_contiguous(values: list[int], start: int, what: str) -> None:
    """No gap, no repeat: exactly start, start+1, ... in order."""
    expected = list(range(start, start + len(values)))
    if values != expected:
        bad = next(i for i, (a, b) in enumerate(zip(values, expected)) if a != b)
        pytest.fail(f"{what}: count {values[bad]} at position {bad}, expected {expected[bad]} "
                    f"(around: {values[max(0, bad - 3):bad + 4]})")


# -- a) C programs ---------------------------------------------------------------------------


def assert_no_userfaultfd_left(pid: int) -> None:
    """The page writer's userfaultfd is gone: no fd of it, no VMA still registered."""
    from backend.proc_maps import read_smaps_flags
    fds = os.listdir(f"/proc/{pid}/fd")
    assert not [fd for fd in fds if "userfaultfd" in os.readlink(f"/proc/{pid}/fd/{fd}")]
    assert not [e.mapping for e in read_smaps_flags(pid) if {"um", "uw"} & e.vm_flags]


@pytest.mark.parametrize("uffd_on", [True, False], ids=["uffd", "writev-only"])
def test_counter_with_static_and_heap_state(c_target, restore_runs, monkeypatch, uffd_on):
    from backend.restore import pagewriter
    monkeypatch.setattr(pagewriter, "USE_UFFD", uffd_on)
    exe = c_target("restore_prog_counter")
    prog = restore_runs.start([exe, "8", "8"])               # 8 MiB static, 8 MiB heap
    prog.wait_for(lambda ls: len(counts(ls, "n")) >= 10, "10 counts")
    image = restore_runs.checkpoint_kill(prog)
    before = counts(prog.lines(), "n")
    restored = restore_runs.restart(prog, image)
    # the 8 MiB heap is private anonymous memory: UFFDIO_COPY's when it is on
    assert (restored.page_writes["UFFDIO_COPY"] >= 8 << 20) == uffd_on, restored.page_writes
    assert sum(restored.page_writes.values()) == restored.pages * 4096
    assert_no_userfaultfd_left(restored.root)
    assert restored.reaper is not None and restored.root != restored.reaper
    assert ns_pid(restored.root) == prog.ns_pid
    assert int(status(restored.root)["PPid"]) == restored.reaper
    assert_running_untraced([restored.root])
    # 32 steps after the restart: every 256 KiB slice of both areas was checked once
    lines = prog.wait_for(lambda ls: len(counts(ls, "n")) >= len(before) + 40, "40 more counts")
    assert not [x for x in lines if x.startswith("CORRUPT")], lines[-5:]
    assert_contiguous(counts(lines, "n"), 0, "the counter")


def test_threads_each_counting(c_target, restore_runs):
    exe = c_target("restore_prog_threads")
    prog = restore_runs.start([exe, "4"])
    prog.wait_for(lambda ls: all(len(counts(ls, f"t{k}")) >= 5 for k in range(4)), "counts")
    before_tids = sorted(ns_pid(t) for t in tids(prog.pid))
    before_signals = signal_state(prog.pid)
    image = restore_runs.checkpoint_kill(prog)
    done = {k: len(counts(prog.lines(), f"t{k}")) for k in range(4)}
    restored = restore_runs.restart(prog, image)
    root = restored.root
    assert len(tids(root)) == 5
    assert sorted(ns_pid(t) for t in tids(root)) == before_tids      # tids as in the image
    assert open(f"/proc/{root}/comm").read().strip() == "restore_prog_th"
    assert signal_state(root) == before_signals
    assert_running_untraced([root])
    lines = prog.wait_for(lambda ls: all(len(counts(ls, f"t{k}")) >= done[k] + 10
                                         for k in range(4)), "10 more counts per thread")
    for k in range(4):
        assert_contiguous(counts(lines, f"t{k}"), 0, f"thread {k}")
    totals = sorted(int(x.split()[3]) for x in lines if x.startswith("t"))
    assert_contiguous(totals, 1, "the total under the mutex")


def test_child_and_zombie(c_target, restore_runs):
    exe = c_target("restore_prog_family")
    prog = restore_runs.start([exe])
    a, b = prog.ready["a"], prog.ready["b"]
    prog.wait_for(lambda ls: len(counts(ls, "c")) >= 5 and len(counts(ls, "p")) >= 5, "counts")
    assert status(b)["State"].startswith("Z")
    image = restore_runs.checkpoint_kill(prog)
    done_c, done_p = len(counts(prog.lines(), "c")), len(counts(prog.lines(), "p"))
    restored = restore_runs.restart(prog, image)
    parent = restored.root
    with open(f"/proc/{parent}/task/{parent}/children") as f:
        children = {ns_pid(int(c)): int(c) for c in f.read().split()}
    assert sorted(children) == sorted([a, b])
    child_a, zombie = children[a], children[b]
    assert status(zombie)["State"].startswith("Z")
    assert int(status(child_a)["PPid"]) == parent
    stat_a = open(f"/proc/{child_a}/stat").read().rsplit(")", 1)[1].split()
    assert int(stat_a[2]) == child_a                      # its own process group, as before
    stat_p = open(f"/proc/{parent}/stat").read().rsplit(")", 1)[1].split()
    assert int(stat_p[3]) == parent == int(stat_a[3])     # the session the parent leads
    assert_running_untraced([parent, child_a])
    lines = prog.wait_for(lambda ls: len(counts(ls, "c")) >= done_c + 10
                          and len(counts(ls, "p")) >= done_p + 10, "10 more counts each")
    assert_contiguous(counts(lines, "c"), 0, "child A")
    assert_contiguous(counts(lines, "p"), 0, "the parent")
    assert {x.split("ppid=")[1] for x in lines if x.startswith("c ")} == {str(prog.ns_pid)}
    os.kill(parent, signal.SIGUSR1)                       # the parent reaps B now
    lines = prog.wait_for(lambda ls: any(x.startswith("a-alive") for x in ls), "the reap")
    assert f"reaped {b} status={7 << 8}" in lines
    assert f"a-alive {a}" in lines
    assert not os.path.exists(f"/proc/{zombie}")


def test_signal_handlers_pending_and_altstack(c_target, restore_runs):
    exe = c_target("restore_prog_signals")
    prog = restore_runs.start([exe])
    rt = prog.ready["rt"]
    prog.wait_for(lambda ls: len(counts(ls, "n")) >= 5, "counts")
    before = status(prog.pid)
    want = {"SigBlk": (1 << 11) | (1 << (rt - 1)), "ShdPnd": (1 << 11) | (1 << (rt - 1)),
            "SigIgn": 1 << 14, "SigCgt": (1 << 9) | (1 << 11) | (1 << (rt - 1))}
    for field, bits in want.items():
        assert int(before[field], 16) == bits, (field, before[field])
    image = restore_runs.checkpoint_kill(prog)
    done = len(counts(prog.lines(), "n"))
    restored = restore_runs.restart(prog, image)
    after = status(restored.root)
    for field in SIGNAL_FIELDS:
        assert after[field] == before[field], (field, before[field], after[field])
    assert int(after["SigIgn"], 16) & (1 << 14), "SIGTERM is no longer ignored"
    assert_running_untraced([restored.root])
    prog.wait_for(lambda ls: len(counts(ls, "n")) >= done + 5, "5 more counts")
    assert not [x for x in prog.lines() if not x.startswith(("READY", "n "))], \
        "a handler ran before it was asked to"
    os.kill(restored.root, signal.SIGUSR1)
    lines = prog.wait_for(lambda ls: "unblocked" in ls, "the unblock after SIGUSR1")
    events = [x for x in lines if not x.startswith(("READY", "n "))]
    # the same as an uninterrupted run's: Linux delivers USR2 first, then the RT signal,
    # whose frame is on top and whose handler blocks it: rt 11, rt 22, then usr2's handler
    reference = restore_runs.start([exe], name="reference")
    os.kill(reference.pid, signal.SIGUSR1)
    expected = [x for x in reference.wait_for(lambda ls: "unblocked" in ls, "reference run")
                if not x.startswith(("READY", "n "))]
    assert expected == ["usr1 onstack=1", "rt value=11", "rt value=22", "usr2 code=0",
                        "unblocked"]
    assert events == expected
    assert_contiguous(counts(lines, "n"), 0, "the counter")
    after = status(restored.root)
    assert int(after["SigBlk"], 16) == 0 and int(after["ShdPnd"], 16) == 0


def test_blocked_in_read_restarts(c_target, restore_runs):
    exe = c_target("restore_prog_syscalls")
    fifo = os.path.join(restore_runs.workdir, "fifo")
    os.mkfifo(fifo)
    prog = restore_runs.start([exe, "read", fifo])
    wait_blocked(prog.pid, 0)
    image = restore_runs.checkpoint_kill(prog)
    restored = restore_runs.restart(prog, image)
    wait_blocked(restored.root, 0)                         # restarted: in read(2) again
    time.sleep(0.05)
    assert prog.lines() == prog.lines()[:1], "read returned without data"
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"hello\n")
    finally:
        os.close(fd)
    lines = prog.wait_for(lambda ls: len(ls) >= 2, "the line read")
    assert lines[1:] == ["got hello"]
    wait_blocked(restored.root, 0)
    assert_running_untraced([restored.root])


def test_blocked_in_pause_restarts(c_target, restore_runs):
    exe = c_target("restore_prog_syscalls")
    prog = restore_runs.start([exe, "pause"])
    wait_blocked(prog.pid, 34)                             # SYS_pause
    image = restore_runs.checkpoint_kill(prog)
    restored = restore_runs.restart(prog, image)
    wait_blocked(restored.root, 34)
    time.sleep(0.05)
    assert len(prog.lines()) == 1, prog.lines()
    os.kill(restored.root, signal.SIGUSR1)
    lines = prog.wait_for(lambda ls: len(ls) >= 2, "the wake-up")
    assert lines[1:] == ["woke ret=-1 errno=4 handled=1"]
    wait_blocked(restored.root, 34)


def test_blocked_in_absolute_sleep_restarts(c_target, restore_runs):
    """clock_nanosleep(TIMER_ABSTIME) interrupted (-ERESTARTNOHAND) is restarted: the
    program never sees EINTR and wakes at its deadline."""
    exe = c_target("restore_prog_syscalls")
    prog = restore_runs.start([exe, "sleep", "300"])
    wait_blocked(prog.pid, 230)                            # SYS_clock_nanosleep
    image = restore_runs.checkpoint_kill(prog)
    restored = restore_runs.restart(prog, image)
    wait_blocked(restored.root, 230)
    lines = prog.wait_for(lambda ls: "slept 1" in ls, "two sleeps", timeout=5.0)
    assert_running_untraced([restored.root])
    assert lines[1:3] == ["slept 0", "slept 1"], lines
    assert not [x for x in lines if x.startswith(("eintr", "error"))], lines


def test_blocked_in_relative_nanosleep_carries_on(c_target, restore_runs):
    """A relative nanosleep retried with its remaining time (rem) finishes its sleep."""
    exe = c_target("restore_prog_syscalls")
    prog = restore_runs.start([exe, "nanosleep", "300"])
    wait_blocked(prog.pid, 230)                            # glibc's nanosleep: clock_nanosleep
    image = restore_runs.checkpoint_kill(prog)
    restored = restore_runs.restart(prog, image)
    lines = prog.wait_for(lambda ls: "slept 1" in ls, "two sleeps", timeout=5.0)
    assert_running_untraced([restored.root])
    assert [x for x in lines if x.startswith("slept")][:2] == ["slept 0", "slept 1"]
    assert not [x for x in lines if x.startswith("error")]


def test_blocked_in_relative_nanosleep_sees_no_eintr(c_target, restore_runs):
    exe = c_target("restore_prog_syscalls")
    prog = restore_runs.start([exe, "nanosleep", "300"])
    wait_blocked(prog.pid, 230)
    image = restore_runs.checkpoint_kill(prog)
    restore_runs.restart(prog, image)
    lines = prog.wait_for(lambda ls: "slept 0" in ls, "the first sleep", timeout=5.0)
    assert [x for x in lines if not x.startswith("READY")][0] == "slept 0", lines


def test_thread_names_survive(c_target, restore_runs):
    exe = c_target("restore_prog_threads")
    prog = restore_runs.start([exe, "2"])
    prog.wait_for(lambda ls: all(len(counts(ls, f"t{k}")) >= 2 for k in range(2)), "counts")
    image = restore_runs.checkpoint_kill(prog)
    root = restore_runs.restart(prog, image).root
    names = {ns_pid(t): open(f"/proc/{root}/task/{t}/comm").read().strip() for t in tids(root)}
    assert sorted(names.values()) == ["cnt0", "cnt1", "restore_prog_th"], names


def test_ignored_signals_are_the_images(c_target, restore_runs):
    exe = c_target("restore_prog_counter")
    prog = restore_runs.start([exe, "1", "1"])
    before = status(prog.pid)["SigIgn"]
    assert int(before, 16) == 0
    image = restore_runs.checkpoint_kill(prog)
    restored = restore_runs.restart(prog, image)
    assert status(restored.root)["SigIgn"] == before


# -- b) CPython, c) bash -----------------------------------------------------------------------

PYTHON_COUNTER = """
import sys, time
state = {"n": 0, "seen": []}
out = open(sys.argv[1], "a")
print("READY", flush=True)
while True:
    state["n"] += 1
    state["seen"].append(state["n"])
    out.write(f"n {state['n']} {sum(state['seen'])}\\n")
    out.flush()
    time.sleep(0.005)
"""


def test_cpython_objects_and_appended_file(restore_runs):
    log = os.path.join(restore_runs.workdir, "log.txt")
    prog = restore_runs.start([sys.executable, "-I", "-c", PYTHON_COUNTER, log], name="py")
    logged = Program.__new__(Program)
    logged.out = log
    logged.wait_for(lambda ls: len(ls) >= 10, "10 lines")
    image = restore_runs.checkpoint_kill(prog)
    done = len(logged.lines())
    restored = restore_runs.restart(prog, image)
    assert ns_pid(restored.root) == prog.ns_pid
    assert_running_untraced([restored.root])
    lines = logged.wait_for(lambda ls: len(ls) >= done + 20, "20 more lines")
    assert_contiguous(counts(lines, "n"), 1, "the dict counter")
    for x in lines:                                        # the list kept every value
        n, total = map(int, x.split()[1:])
        assert total == n * (n + 1) // 2, x


def test_bash_builtin_loop_writing_a_file(restore_runs):
    """bash alone: its loop sleeps with `read -t` on a FIFO (pselect6, restarted)."""
    log = os.path.join(restore_runs.workdir, "log.txt")
    fifo = os.path.join(restore_runs.workdir, "fifo")
    os.mkfifo(fifo)
    script = ('exec 3<>"$2"; echo READY; i=0; '
              'while :; do i=$((i+1)); echo "n $i" >> "$1"; read -t 0.01 -u 3; done')
    prog = restore_runs.start(["bash", "-c", script, "bash", log, fifo], name="bash")
    logged = Program.__new__(Program)
    logged.out = log
    logged.wait_for(lambda ls: len(ls) >= 10, "10 lines")
    image = restore_runs.checkpoint_kill(prog)
    done = len(logged.lines())
    restored = restore_runs.restart(prog, image)
    assert ns_pid(restored.root) == prog.ns_pid
    assert_running_untraced([restored.root])
    lines = logged.wait_for(lambda ls: len(ls) >= done + 20, "20 more lines")
    assert_contiguous(counts(lines, "n"), 1, "bash's counter")


def test_bash_loop_with_sleep_children(restore_runs):
    """bash forking `sleep` at each step: the tree often holds a child when checkpointed."""
    log = os.path.join(restore_runs.workdir, "log.txt")
    script = 'echo READY; i=0; while :; do i=$((i+1)); echo "n $i" >> "$1"; sleep 0.01; done'
    prog = restore_runs.start(["bash", "-c", script, "bash", log], name="bash")
    logged = Program.__new__(Program)
    logged.out = log
    logged.wait_for(lambda ls: len(ls) >= 10, "10 lines")
    image = restore_runs.checkpoint_kill(prog, retry_gone=True)
    done = len(logged.lines())
    restored = restore_runs.restart(prog, image)
    assert ns_pid(restored.root) == prog.ns_pid
    assert_running_untraced([restored.root])
    for image_pid, pid in restored.pids.items():          # a restored `sleep` may be done
        if pid != restored.root:
            assert_running_untraced([pid], may_be_gone=True)
    lines = logged.wait_for(lambda ls: len(ls) >= done + 20, "20 more lines")
    assert_contiguous(counts(lines, "n"), 1, "bash's counter")


# -- d) ten restarts in a row -------------------------------------------------------------------


@pytest.mark.slow
def test_ten_restarts_in_a_row(c_target, restore_runs):
    exe = c_target("restore_prog_counter")
    prog = restore_runs.start([exe, "1", "1"])
    for i in range(10):
        goal = len(counts(prog.lines(), "n")) + 5
        prog.wait_for(lambda ls: len(counts(ls, "n")) >= goal, f"counts before checkpoint {i}")
        image = restore_runs.checkpoint_kill(prog)
        restored = restore_runs.restart(prog, image)
        assert ns_pid(restored.root) == prog.ns_pid, f"restart {i}"
    assert_running_untraced([prog.pid])
    goal = len(counts(prog.lines(), "n")) + 40
    lines = prog.wait_for(lambda ls: len(counts(ls, "n")) >= goal, "40 more counts")
    assert not [x for x in lines if x.startswith("CORRUPT")], lines[-5:]
    assert_contiguous(counts(lines, "n"), 0, "the counter across ten restarts")

"""The restart job's guarantees: a failure at any step leaves no process behind and names what
failed; no more privilege than the caller has; pids that are taken; --frozen; the `restart`
tool's command-line contract; and the syscall-restart rule of final_regs.

Every process is ended by pid, also when a test fails (the ``job_runs`` fixture)."""
from __future__ import annotations

import ctypes
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from backend import kabi
from backend.dump import checkpoint
from backend.restore import job as job_module
from backend.restore.job import RestoreError, restart_image
from backend.restore.stub import StubError
from backend.restore.task import final_regs
from ckptsim.kinds.cpu_x86 import X86_REGS, X86State
from ckptsim.model.signals import SigAction, SigHand, SigInfo, SigPending, SignalStruct, \
    ThreadSignals

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


class JobRuns:
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.children: list[int] = []            # Restored.child of each restart

    def start(self, argv) -> subprocess.Popen:
        out = open(os.path.join(self.tmp, f"out{len(self.procs)}.txt"), "w")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True)
        out.close()
        self.procs.append(p)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(out.name) as f:
                if "READY" in f.read():
                    return p
            time.sleep(0.01)
        pytest.fail(f"{argv[0]} did not get ready")

    def image(self, p: subprocess.Popen, kill: bool = True) -> bytes:
        buf = io.BytesIO()
        checkpoint(p.pid, buf, kill=kill)
        if kill:
            p.wait(timeout=10)
        return buf.getvalue()

    def restart(self, image, **kw):
        restored = restart_image(image, **kw)
        self.children.append(restored.child)
        return restored

    def end(self) -> None:
        for child in self.children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(child, 0)
            except ChildProcessError:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def job_runs(tmp_path):
    runs = JobRuns(str(tmp_path))
    yield runs
    runs.end()


@pytest.fixture
def counter(c_target):
    return [c_target("restore_prog_counter"), "1", "1"]


# -- failures leave nothing behind ---------------------------------------------------------------

@pytest.mark.parametrize("step", ["restore_mm", "restore_fdtable", "restore_handlers",
                                  "restore_thread_basics", "set_cpu"])
def test_a_failure_at_any_step_kills_everything_it_made(job_runs, counter, monkeypatch, step):
    image = job_runs.image(job_runs.start(counter))
    made: list[int] = []
    real_created = job_module._Job._created
    monkeypatch.setattr(job_module._Job, "_created",
                        lambda self, pid: (made.append(pid), real_created(self, pid))[1])

    def broken(*args, **kwargs):
        raise StubError(errno.EIO, f"injected failure in {step}")
    monkeypatch.setattr(job_module, step, broken)
    fds_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(RestoreError, match=f"injected failure in {step}"):
        restart_image(image)
    assert made, "the restart made no process before the failure"
    assert not [pid for pid in made if _exists(pid)], "processes left behind"
    left = [os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd"))
            - fds_before if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [link for link in left if link.endswith("/mem") or "userfaultfd" in link], left
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)               # nothing of ours is left to reap either


def _record_early_seeds(monkeypatch) -> list:
    seeds = []
    real = job_module.EarlySeed

    def record(*args):
        seed = real(*args)
        seeds.append(seed)
        return seed
    monkeypatch.setattr(job_module, "EarlySeed", record)
    return seeds


def test_the_seed_hint_is_the_roots_executable_and_pid_or_nothing(job_runs, counter):
    from backend.restore.tree import seed_hint
    p = job_runs.start(counter)
    image = job_runs.image(p)
    assert seed_hint(image) == (counter[0], p.pid)
    assert seed_hint(image[:300]) is None                 # cut before its MM record
    assert seed_hint(b"\0" * 4096) is None


def test_the_seed_execs_while_the_image_is_decoded(job_runs, counter, monkeypatch):
    image = job_runs.image(job_runs.start(counter))
    seeds = _record_early_seeds(monkeypatch)
    monkeypatch.setattr(job_module, "spawn_seed",
                        lambda *a: pytest.fail("the seed was spawned again after the decode"))
    restored = job_runs.restart(image)
    assert [s.pid for s in seeds] == [restored.reaper]      # the new namespace's init
    assert seeds[0].exe == counter[0] and _alive(restored.root)


def test_an_early_seed_the_image_disagrees_with_is_ended(job_runs, counter, monkeypatch):
    image = job_runs.image(job_runs.start(counter))
    seeds = _record_early_seeds(monkeypatch)
    monkeypatch.setattr(job_module, "seed_hint", lambda data: ("/bin/sleep", 1))
    restored = job_runs.restart(image)
    assert len(seeds) == 1 and seeds[0].pid != restored.reaper
    assert not _exists(seeds[0].pid)                         # killed and reaped
    assert _alive(restored.root)


def test_a_refusal_during_the_decode_ends_the_early_seed(job_runs, counter, monkeypatch):
    image = job_runs.image(job_runs.start(counter))
    seeds = _record_early_seeds(monkeypatch)

    def refuse(creds):
        raise StubError(errno.EPERM, "injected: the caller may not set these credentials")
    monkeypatch.setattr(job_module, "check_creds", refuse)
    with pytest.raises(RestoreError, match="injected"):
        restart_image(image)
    assert len(seeds) == 1 and not _exists(seeds[0].pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)               # nothing of ours is left to reap either


def test_a_missing_executable_is_named_and_nothing_is_made(job_runs, tmp_path, c_target):
    exe = str(tmp_path / "counter_copy")
    shutil.copy(c_target("restore_prog_counter"), exe)
    image = job_runs.image(job_runs.start([exe, "1", "1"]))
    os.unlink(exe)
    with pytest.raises(RestoreError) as e:
        restart_image(image)
    assert "counter_copy" in str(e.value) and "\n" not in str(e.value)


# -- privilege, pids, frozen ---------------------------------------------------------------------

def test_an_unprivileged_caller_cannot_restore_root_credentials(job_runs, counter, tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv(1) is needed to run the restorer as another user")
    shared = tempfile.mkdtemp(prefix="ckpt-unpriv-")      # readable by uid 1000 (pytest's
    try:                                                 # own directories are 0700)
        os.chmod(shared, 0o755)
        image = os.path.join(shared, "root.img")
        with open(image, "wb") as f:
            f.write(job_runs.image(job_runs.start(counter)))
        os.chmod(image, 0o644)
        code = ("import sys; from backend.restore_cli import main; "
                "sys.exit(main(['-i', sys.argv[1], '--detach']))")
        out = subprocess.run(["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups",
                              sys.executable, "-c", code, image], capture_output=True,
                             text=True, timeout=60,
                             env={"PYTHONPATH": REPO, "PATH": os.environ["PATH"]})
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert out.returncode == 1, out
    assert "uid 0" in out.stderr and "caller may not" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert out.stdout == ""                        # no root pid: nothing was started


def test_taken_pids_are_refused_without_a_new_namespace(job_runs, counter):
    p = job_runs.start(counter)
    image = job_runs.image(p, kill=False)          # the original still holds its pid
    with pytest.raises(RestoreError) as e:
        restart_image(image, pidns=False)
    assert e.value.errno == errno.EBUSY and f"pid {p.pid} is in use" in str(e.value)
    assert p.poll() is None                        # the original is untouched


def test_pids_are_kept_in_this_namespace_when_free(job_runs, counter):
    p = job_runs.start(counter)
    pid = p.pid
    image = job_runs.image(p)
    restored = job_runs.restart(image, pidns=False)
    assert restored.root == pid and restored.reaper is None and _alive(pid)


def test_frozen_restart_stays_stopped_until_continued(job_runs, counter):
    image = job_runs.image(job_runs.start(counter))
    restored = job_runs.restart(image, frozen=True)
    with open(f"/proc/{restored.root}/stat") as f:
        assert f.read().rpartition(")")[2].split()[0] == "T"
    with open(f"/proc/{restored.root}/status") as f:
        assert "TracerPid:\t0" in f.read()          # stopped, but not by a tracer
    os.kill(restored.root, signal.SIGCONT)
    time.sleep(0.1)
    assert _alive(restored.root)


# -- the command-line tool -----------------------------------------------------------------------

def _restart_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "backend.restore_cli", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO})


def test_cli_bad_input_is_one_line_and_a_nonzero_exit(tmp_path):
    out = _restart_cli("-i", str(tmp_path / "missing.img"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "missing.img" in out.stderr
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"not an image" * 10)
    out = _restart_cli("-i", str(bad))
    assert out.returncode == 1 and out.stderr.startswith("restart: error:"), out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    out = _restart_cli("--frobnicate")
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_cli_waits_and_exits_with_the_roots_status(job_runs, tmp_path):
    script = ("import os, sys, time\nprint('READY', flush=True)\n"
              "time.sleep(0.3)\nos._exit(7)\n")
    p = job_runs.start([sys.executable, "-c", script])
    image = tmp_path / "py.img"
    image.write_bytes(job_runs.image(p))
    out = _restart_cli("-i", str(image))
    assert out.returncode == 7, out.stderr


def test_cli_detach_prints_the_root_pid(job_runs, counter, tmp_path):
    image = tmp_path / "c.img"
    image.write_bytes(job_runs.image(job_runs.start(counter)))
    out = _restart_cli("-i", str(image), "--detach")
    assert out.returncode == 0, out.stderr
    root = int(out.stdout.strip())
    try:
        assert _alive(root)
        with open(f"/proc/{root}/status") as f:
            status = f.read()
        assert "TracerPid:\t0" in status
    finally:
        ppid = int(status.split("PPid:\t")[1].split()[0])
        os.kill(ppid, signal.SIGKILL)              # the namespace init takes the tree with it
        for _ in range(500):
            if not _exists(root):
                break
            time.sleep(0.01)
    assert not _exists(root)


# -- the syscall-restart rule --------------------------------------------------------------------

def _task(nr: int, code: int, pending=(), blocked=0, actions=None):
    regs = dict.fromkeys(X86_REGS, 0)
    regs.update(orig_rax=nr, rax=(-code) & (2**64 - 1), rip=0x1002)

    class T:
        x86 = X86State(regs, b"")
        sigstate = ThreadSignals(blocked, SigPending([SigInfo(s) for s in pending]))
        signal = SignalStruct()
        sighand = SigHand([SigAction(*actions.get(s, (0,))) for s in range(1, 65)]
                          if actions else None)
    return T


@pytest.mark.parametrize("code, handler_flags, restarts", [
    (kabi.ERESTARTSYS, None, True),                    # no handler runs: restarted
    (kabi.ERESTARTSYS, 0x10000000, True),              # SA_RESTART handler: restarted
    (kabi.ERESTARTSYS, 0, False),                      # handler without SA_RESTART: EINTR
    (kabi.ERESTARTNOHAND, 0x10000000, False),          # any handler: EINTR
    (kabi.ERESTARTNOHAND, None, True),
    (kabi.ERESTARTNOINTR, 0, True),                    # always restarted
    (kabi.ERESTART_RESTARTBLOCK, None, True),
])
def test_interrupted_syscalls_resume_as_linux_decides(code, handler_flags, restarts):
    actions = {10: (0x401000, handler_flags)} if handler_flags is not None else None
    task = _task(kabi.SYS_read, code, pending=[10] if actions else [], actions=actions)
    regs = final_regs(task.x86, task)
    assert regs.orig_rax == 2**64 - 1
    if restarts:
        assert (regs.rip, regs.rax) == (0x1000, kabi.SYS_read)
    else:
        assert (regs.rip, regs.rax) == (0x1002, (-errno.EINTR) & (2**64 - 1))


def test_a_blocked_pending_signal_does_not_interrupt():
    task = _task(kabi.SYS_read, kabi.ERESTARTSYS, pending=[10], blocked=1 << 9,
                 actions={10: (0x401000, 0)})
    assert final_regs(task.x86, task).rip == 0x1000


def test_a_relative_nanosleep_resumes_from_the_remaining_time():
    task = _task(kabi.SYS_clock_nanosleep, kabi.ERESTART_RESTARTBLOCK)
    task.x86.regs.update(rdx=0x7000, r10=0x8000)
    regs = final_regs(task.x86, task)
    assert (regs.rip, regs.rax, regs.rdx) == (0x1000, kabi.SYS_clock_nanosleep, 0x8000)


def test_restartable_sequences_are_registered_again(job_runs, counter):
    """glibc registers rseq at start; the kernel of the restored process must know the same
    area (else sched_getcpu reads a stale cpu_id and critical sections never abort)."""
    from backend.ptrace import _ptrace
    p = job_runs.start(counter)

    def rseq_of(pid):
        conf = kabi.ptrace_rseq_configuration()
        _ptrace(kabi.PTRACE_SEIZE, pid, 0, 0)
        _ptrace(kabi.PTRACE_INTERRUPT, pid, 0, 0)
        os.waitpid(pid, kabi.WALL)
        try:
            _ptrace(kabi.PTRACE_GET_RSEQ_CONFIGURATION, pid, ctypes.sizeof(conf),
                    ctypes.addressof(conf))
        finally:
            _ptrace(kabi.PTRACE_DETACH, pid, 0, 0)
        return conf.rseq_abi_pointer, conf.rseq_abi_size, conf.signature

    before = rseq_of(p.pid)
    assert before[0], "glibc registered no rseq area: nothing to test"
    restored = job_runs.restart(job_runs.image(p))
    assert rseq_of(restored.root) == before
    assert _alive(restored.root)


def test_page_chunks_outside_their_vma_are_refused():
    """A hostile image cannot aim pages at the trampoline or another mapping: every address
    of a chunk is checked, not only its ends (the order by the writer, before it writes)."""
    from array import array
    from backend.restore.memory import PageSink, SharedSegments
    from backend.restore.pagewriter import plan_calls

    class Vma:
        start, end = 0x10000, 0x20000

    sink = PageSink()
    sink.private_pages(Vma, array("Q", [0x10000, 0x11000]), memoryview(bytes(8192)))
    for addrs in ([0x10000, 0x10800],                       # unaligned
                  [0x0f000, 0x10000],                       # begins before
                  [0x10000, 0x20000]):                      # ends after
        with pytest.raises(StubError):
            sink.private_pages(Vma, array("Q", addrs), memoryview(bytes(4096 * len(addrs))))
    with pytest.raises(StubError):
        sink.private_pages(Vma, array("Q", [0x10000]), memoryview(bytes(100)))
    for addrs in ([0x10000, 0x7e0000000000, 0x1f000],       # the middle one elsewhere
                  [0x11000, 0x10000],                       # decreasing
                  [0x10000, 0x10000]):                      # twice
        sink.private_pages(Vma, array("Q", addrs), memoryview(bytes(4096 * len(addrs))))
        with pytest.raises(StubError, match="increasing order"):
            plan_calls([(0, array("Q", addrs))])

    class Seg:
        size = 0x4000
    with pytest.raises(StubError):
        sink.shmem_pages(Seg, array("Q", [0x1000, 0x9000]), memoryview(bytes(8192)))
    sink.shmem_pages(Seg, array("Q", [0x2000, 0x1000]), memoryview(bytes(8192)))
    segments = SharedSegments(sink)
    try:
        with pytest.raises(StubError, match="increasing order"):
            segments.fd_for(Seg)
    finally:
        segments.close()


def test_stubs_keep_at_most_max_mem_fds_open(monkeypatch):
    """Each stub keeps /proc/TID/mem open between writes, but a tree of thousands must not
    run out of fds: past MAX_MEM_FDS the oldest is closed (and reopened when written again)."""
    from backend.restore.stub import Stub
    monkeypatch.setattr(Stub, "MAX_MEM_FDS", 3)
    monkeypatch.setattr(Stub, "_with_mem", [])
    stubs = []
    for _ in range(5):
        s = Stub.__new__(Stub)
        s.tid, s._mem_fd = os.getpid(), None
        stubs.append(s)
    for s in stubs:
        s._mem()
    assert [s._mem_fd is not None for s in stubs] == [False, False, True, True, True]
    assert Stub._with_mem == stubs[2:]
    stubs[0]._mem()                                   # reopened, the oldest open one closed
    assert stubs[2]._mem_fd is None and Stub._with_mem == [stubs[3], stubs[4], stubs[0]]
    for s in stubs:
        s.close_mem()
    assert Stub._with_mem == []

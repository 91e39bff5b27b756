"""A tree with a pid namespace nested below the checkpoint's is restarted with it: the nested
init is pid 1 there again (clone3 with CLONE_NEWPID and set_tid [1, its pid]), its child,
thread and zombie keep their inner numbers, and all carry on.

Every process is ended by pid at teardown (restore_runs, test_programs.py): the original's
tree, and each restored tree through its namespace init, whose SIGKILL ends the nested
namespace too."""
from __future__ import annotations

import errno
import os
import sys

import pytest

from backend.restore.job import RestoreError, load_job
from .test_programs import assert_running_untraced, restore_runs, status  # noqa: F401

# The root forks a nested init N (unshare + fork, then setns back); N has a zombie Z (pid 2,
# killed by SIGTERM, reaped once the file "reap" exists) and a child C (pid 3) with a thread
# (tid 4). Each logs a count with the ids it sees.
NESTED = r"""
import ctypes, os, signal, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
SYS_unshare, SYS_setns, SYS_gettid = 272, 308, 186
CLONE_NEWPID = 0x20000000

def log(*v):
    os.write(1, (" ".join(map(str, v)) + "\n").encode())

own = os.open("/proc/self/ns/pid", os.O_RDONLY)
assert libc.syscall(SYS_unshare, CLONE_NEWPID) == 0
r, w = os.pipe()
n = os.fork()
if n == 0:
    os.close(own), os.close(r)
    z = os.fork()
    if z == 0:
        while True:
            signal.pause()
    os.kill(z, signal.SIGTERM)
    os.waitid(os.P_PID, z, os.WEXITED | os.WNOWAIT)     # dead, and still a zombie
    if os.fork() == 0:
        def thread():
            for i in range(1, 10**9):
                log("t", i, libc.syscall(SYS_gettid))
                time.sleep(0.01)
        threading.Thread(target=thread, daemon=True).start()
        os.write(w, b"x")       # READY only once this thread exists
        os.close(w)
        for i in range(1, 10**9):
            log("c", i, os.getpid(), os.getppid())
            time.sleep(0.01)
    os.close(w)
    for i in range(1, 10**9):
        if os.path.exists("reap"):
            pid, st = os.waitpid(z, 0)
            log("z", pid, os.WTERMSIG(st))
            os.unlink("reap")
        log("n", i, os.getpid(), os.getppid())
        time.sleep(0.01)
assert libc.syscall(SYS_setns, own, CLONE_NEWPID) == 0
os.close(own), os.close(w)
os.read(r, 1)
os.close(r)
log("READY nested=%d" % n)
while True:
    time.sleep(1)
"""


def _nspid(pid: int) -> list[int]:
    return [int(x) for x in status(pid)["NSpid"].split()]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _last(lines, tag):
    return [x.split()[1:] for x in lines if x.split()[0] == tag][-1]


def test_nested_namespace_restarts_with_its_numbers(restore_runs):
    prog = restore_runs.start([sys.executable, "-I", "-c", NESTED], name="nested")
    nested = prog.ready["nested"]
    zombie, child = sorted(_children(nested))
    (thread,) = [int(t) for t in os.listdir(f"/proc/{child}/task") if int(t) != child]
    assert [_nspid(p)[-1] for p in (nested, zombie, child, thread)] == [1, 2, 3, 4]
    prog.wait_for(lambda ls: any(x.startswith("t ") for x in ls), "the thread's first line")

    image = restore_runs.checkpoint_kill(prog)
    done = len(prog.lines())
    restored = restore_runs.restart(prog, image)

    pids = restored.pids
    assert set(pids) == {prog.ns_pid, nested, child, thread}      # (a zombie is no thread)
    for old, inner in ((nested, 1), (child, 3), (thread, 4)):
        assert _nspid(pids[old])[-2:] == [old, inner], (old, _nspid(pids[old]))
    assert _nspid(pids[prog.ns_pid])[-1] == prog.ns_pid and \
        len(_nspid(pids[nested])) == len(_nspid(pids[prog.ns_pid])) + 1
    (new_zombie,) = [p for p in _children(pids[nested]) if p != pids[child]]
    assert _nspid(new_zombie)[-2:] == [zombie, 2] and status(new_zombie)["State"][0] == "Z"
    assert_running_untraced([pids[p] for p in (prog.ns_pid, nested, child)])

    lines = prog.wait_for(lambda ls: sum(x[0] in "nct" for x in ls[done:]) >= 30,
                          "the nested tasks to carry on")
    assert _last(lines, "n")[1:] == ["1", "0"]          # pid 1 there, its parent outside
    assert _last(lines, "c")[1:] == ["3", "1"]
    assert _last(lines, "t")[1:] == ["4"]
    for tag in "nct":                                    # every count runs on, no gap
        got = [int(x.split()[1]) for x in lines if x.split()[0] == tag]
        assert got == list(range(1, len(got) + 1)), tag
    open(os.path.join(restore_runs.workdir, "reap"), "w").close()
    lines = prog.wait_for(lambda ls: any(x.startswith("z ") for x in ls), "the zombie reaped")
    assert _last(lines, "z") == ["2", "15"]               # its pid there, killed by SIGTERM


def test_a_root_in_a_nested_namespace_is_refused(restore_runs, monkeypatch):
    """A (model) image whose root has depth > 0: a live checkpoint never writes one, and the
    restart says so before anything runs."""
    prog = restore_runs.start([sys.executable, "-I", "-c", NESTED], name="nested")
    image = bytes(restore_runs.checkpoint_kill(prog))
    from backend.restore import job as job_module
    real = job_module._Job.__init__

    def root_nested(self, *a, **kw):
        real(self, *a, **kw)
        self.entries[0] = (*self.entries[0][:5], 1)
    monkeypatch.setattr(job_module._Job, "__init__", root_nested)
    with pytest.raises(RestoreError) as e:
        load_job(image, background_checksum=False)
    assert e.value.errno == errno.EOPNOTSUPP and "nested below" in str(e.value)


# A nested init killed by SIGKILL from its parent (outside its namespace: the one signal
# without a handler that reaches it from there, with SIGSTOP), left a zombie.
DEAD_INIT = r"""
import ctypes, os, signal, time
libc = ctypes.CDLL(None, use_errno=True)
assert libc.syscall(272, 0x20000000) == 0                 # unshare(CLONE_NEWPID)
n = os.fork()
if n == 0:
    while True:
        signal.pause()
os.kill(n, signal.SIGKILL)
os.waitid(os.P_PID, n, os.WEXITED | os.WNOWAIT)
print("READY init=%d" % n, flush=True)
while True:
    time.sleep(1)
"""


def test_a_nested_init_killed_by_a_signal_is_refused(restore_runs):
    """Its zombie would be made by its own kill(), which the kernel drops for an init: the
    restart says so and makes nothing."""
    prog = restore_runs.start([sys.executable, "-I", "-c", DEAD_INIT], name="dead")
    assert status(prog.ready["init"])["State"][0] == "Z"
    image = restore_runs.checkpoint_kill(prog)
    with pytest.raises(RestoreError) as e:
        restore_runs.restart(prog, image)
    assert e.value.errno == errno.EOPNOTSUPP
    assert f"task {prog.ready['init']}: the init of a nested pid namespace killed by signal " \
           f"9" in str(e.value), str(e.value)

"""backend/interp_tasks.py: threads are real threads of the process (tids, per-thread masks
and pending signals, exit(2) of one thread), CLONE_VM without CLONE_THREAD sharing more than
the address space is refused with its reason, and the program owns the break (glibc's malloc
is kept off it)."""
from __future__ import annotations

import os
import sys

from backend.interp import unsupported_op
from backend.interp_tasks import MALLOC_TUNABLE
from conformance.dsl import MAP_PRIVATE_ANON, O_RDWR, PAGE, PROT_RW

from .interp_harness import bit, run  # noqa: F401,F811 (run: a fixture)

THREAD = 0x10f00
CLONE_NEWPID = 0x20000000
SIGUSR1, SIGUSR2 = 10, 12
HANDLER = 0x401000


def _fails(r):
    return [x for x in r.reports() if x["kind"] in ("FAIL", "error", "unsupported")]


def _maps(pid):
    with open(f"/proc/{pid}/maps") as f:
        return [ln.split() for ln in f]


def _start_brk(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[47 - 3])


def test_a_thread_is_a_real_thread_with_its_own_signals(run):
    def build(p):
        buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
        r, w = p.pipe()
        p.do("sigaction", SIGUSR2, HANDLER, 0, 0)
        p.do("sigprocmask", 0, bit(SIGUSR1))
        tid = p.call("fork", THREAD)
        main = p.label()
        p.jnz(tid, main)
        # the thread: inherited mask, its own tgkill'd signal, then exit(2) of itself only
        p.ckpt()
        p.check(p.sigprocmask(0, 0), "==", bit(SIGUSR1), "the thread's mask is the creator's")
        p.check(p.sigpending(), "==", bit(SIGUSR1), "the thread's own pending SIGUSR1")
        p.emit("thread", p.gettid(), p.getpid())
        p.store(buf, "t")
        p.write(w, buf, 1)
        p.do("exit", 0)
        p.place(main)
        me = p.getpid()
        p.check(p.tgkill(me, tid, SIGUSR1), "==", 0, "tgkill the thread")
        p.check(p.tgkill(me, tid, SIGUSR2), "==", 0, "tgkill the thread's handler")
        p.ckpt()
        p.check(p.sigpending(), "==", 0, "the leader has nothing pending")
        p.emit("leader", tid)
        p.read(r, buf, 1)
        p.check_mem(buf, "t", "the thread's byte")
    r = run(build)
    r.wait_report("point", 2)
    tids = sorted(int(t) for t in os.listdir(f"/proc/{r.pid}/task"))
    assert len(tids) == 2 and tids[0] == r.pid
    assert r.finish() == 0
    assert _fails(r) == []
    emits = {e["values"][0]: e["values"][1:] for e in r.wait_report("emit", 2)}
    assert emits["thread"] == [tids[1], r.pid]
    assert emits["leader"] == [tids[1]]
    handled = [s for s in r.reports() if s["kind"] == "signal"]
    assert [(s["sig"], s["tid"]) for s in handled] == [(SIGUSR2, tids[1])]


def test_exit_ends_only_its_thread(run):
    def build(p):
        tid = p.call("fork", THREAD)
        main = p.label()
        p.jnz(tid, main)
        p.ckpt()                     # the thread waits here
        p.emit("thread ran on")
        p.exit(7)                    # exit_group: the whole process, status 7
        p.place(main)
        p.do("exit", 3)              # the leader alone ends
    r = run(build)
    r.wait_report("point")
    assert r.finish() == 7
    assert [e["values"] for e in r.reports() if e["kind"] == "emit"] == [["thread ran on"]]


def test_clone_flags_refused_with_their_reasons():
    # CLONE_VM alone (| SIGCHLD) runs in the C mini-interpreter (test_interp_clonevm.py)
    assert unsupported_op([1, "fork", 0x100]) is None or "gcc" in unsupported_op([1, "fork", 0x100])
    assert unsupported_op([1, "fork", 0x100 | 17]) == unsupported_op([1, "fork", 0x100])
    for more in (0x200, 0x400, 0x800, 10):           # CLONE_FS, FILES, SIGHAND, SIGUSR1
        why = unsupported_op([1, "fork", 0x100 | more])
        assert "CLONE_VM without CLONE_THREAD runs with CLONE_VM alone" in why
    assert unsupported_op([1, "fork", CLONE_NEWPID]) is None
    assert unsupported_op([1, "fork", CLONE_NEWPID | 17]) is None          # SIGCHLD
    assert "clone flags 0x20000100" in unsupported_op([1, "fork", CLONE_NEWPID | 0x100])
    assert "other namespaces" in unsupported_op([1, "fork", 0x20000])     # CLONE_NEWNS
    assert unsupported_op([1, "fork", THREAD]) is None
    assert unsupported_op([1, "fork", THREAD | 0x40000]) is None   # CLONE_SYSVSEM too
    assert unsupported_op([1, "fork"]) is None


def _nspid(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(n) for n in line.split()[1:]]


def test_fork_with_clone_newpid_makes_a_nested_init(run):
    """The child is pid 1 of a new pid namespace (getppid 0), its child pid 2 there; the
    parent's later fork stays in the parent's own namespace."""
    def build(p):
        me, kid = p.reg(), p.reg()
        inner = p.call("fork", CLONE_NEWPID)
        with p.child(inner):
            p.raw(me, "getpid")
            p.raw(kid, "getppid")
            p.emit("init", me, kid)
            grandchild = p.fork()
            with p.child(grandchild):
                p.raw(me, "getpid")
                p.raw(kid, "getppid")
                p.emit("grandchild", me, kid)
                p.ckpt()
                p.exit(6)
            p.ckpt()
            p.wait_child(grandchild, 6, "the nested child")
            p.exit(8)
        plain = p.fork()
        with p.child(plain):
            p.raw(me, "getpid")
            p.emit("plain", me)
            p.ckpt()
            p.exit(0)
        p.emit("parent", inner, plain)
        p.ckpt()
        p.wait_child(inner, 8, "the nested init")
        p.wait_child(plain, 0, "the plain child")
    r = run(build)
    r.wait_report("point", 4)
    emits = {e["values"][0]: e["values"][1:] for e in r.reports() if e["kind"] == "emit"}
    assert emits["init"] == [1, 0]
    assert emits["grandchild"] == [2, 1]
    inner, plain = emits["parent"]
    assert emits["plain"] == [plain]          # the same number seen from both sides
    outer = _nspid(r.pid)
    nested = _nspid(inner)
    assert len(nested) == len(outer) + 1 and nested[-2:] == [inner, 1]
    assert len(_nspid(plain)) == len(outer)
    assert r.finish() == 0
    assert _fails(r) == []


def test_the_program_owns_the_break(run, tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)

    def build(p):
        base = p.brk(0)
        p.ckpt()                                     # nothing has moved the break yet
        cur = p.brk(0)
        p.add(cur, 3 * PAGE + 100)
        p.check(p.call("brk", cur), "==", cur, "grows")
        p.store(base, "heap-0")
        for i in range(200):                         # Python allocates on and on meanwhile
            p.emit("x" * 4000, i)
        p.check(p.brk(0), "==", cur, "still where the program put it")
        p.check_mem(base, "heap-0", "heap")
        p.emit("base", base, cur)
        fd = p.open(fifo, O_RDWR, 0)
        p.read(fd, base, 1)                          # waits here for the test
    r = run(build)
    r.wait_report("point")
    start = _start_brk(r.pid)
    assert not [m for m in _maps(r.pid) if m[-1] == "[heap]"], "glibc's malloc made a heap"
    r.release()
    r.wait_report("emit", 201)
    r.wait_blocked(r.pid)
    base, cur = [e for e in r.reports() if e["kind"] == "emit"][-1]["values"][1:]
    assert (base, cur) == (start, start + 3 * PAGE + 100)
    heap = [m for m in _maps(r.pid) if m[-1] == "[heap]"]
    assert [[int(x, 16) for x in m[0].split("-")] for m in heap] == [[start, start + 4 * PAGE]]
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(fd, b"!")
        assert r.finish() == 0
    finally:
        os.close(fd)
    assert _fails(r) == []


def test_brk_is_refused_without_the_malloc_tunable(run, tmp_path):
    ctl = tmp_path / "run0"
    prog = str(ctl / "program.json")
    code = f"from backend.interp import run_program; import json; run_program(json.load(open({prog!r})), {str(ctl)!r})"
    r = run(lambda p: p.brk(0), argv=[sys.executable, "-c", code])
    assert r.proc.wait(timeout=20) == 125
    reason = r.wait_report("unsupported")[0]["reason"]
    assert MALLOC_TUNABLE in reason


def test_main_reexecs_with_the_tunable(run):
    r = run(lambda p: (p.ckpt(), p.check(0, "==", 0, "ran")))
    r.wait_report("point")
    with open(f"/proc/{r.pid}/environ", "rb") as f:
        env = f.read().split(b"\0")
    assert f"GLIBC_TUNABLES={MALLOC_TUNABLE}".encode() in env
    assert r.finish() == 0

"""backend/interp_clonevm.py: a CLONE_VM child (a second process in the same address space)
runs the op list in the C mini-interpreter: shared memory both ways, its reports in
Interp.report's exact format with its own pid, its point blocking until release, a bad
address a failed check, reaped by a plain wait4; what it cannot run is refused before the
clone."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time

import pytest

from backend import interp_clonevm as cvm
from backend.interp_libc import NR_REGS, Unsupported
from conformance.dsl import MAP_FIXED, MAP_PRIVATE_ANON, PAGE, PROT_RW, Program

from .interp_harness import run  # noqa: F401 (a fixture)

CLONE_VM = 0x100
A, B = 0x10000000, 0x11000000
UNMAPPED = 0x1000
FIXED = MAP_PRIVATE_ANON | MAP_FIXED

pytestmark = pytest.mark.skipif(cvm.gcc_missing() is not None, reason="needs gcc")


def _lines(r):
    with open(os.path.join(r.ctl, "report")) as f:
        return f.read().splitlines()


def _not_ok(r):
    return [x for x in r.reports() if x["kind"] in ("FAIL", "error", "unsupported")]


def _emits(r):
    return {e["values"][0]: e["values"][1:] for e in r.reports() if e["kind"] == "emit"}


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_sleeping(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while _state(pid) != "S":
        assert time.monotonic() < deadline, f"{pid} does not block"
        time.sleep(0.01)


def test_child_and_parent_share_memory_and_the_parent_reaps_it(run):
    def build(p):
        p.mmap(A, 2 * PAGE, PROT_RW, FIXED)
        p.store(A, "parent-wrote")
        r, w = p.pipe()
        n, me = p.reg(), p.reg()
        child = p.call("fork", CLONE_VM)
        with p.child(child):
            p.check_mem(A, "parent-wrote", "child sees the parent's write")
            p.store(A + 100, "child-wrote")
            p.mmap(B, PAGE, PROT_RW, FIXED)          # a syscall with the op's defaults
            p.store(B, "child-mapped")
            p.raw(me, "getpid")
            p.emit("child", me, child, -5, "t\u00e9xt", None)
            p.raw(n, "write", w, A, 1)
            p.check(n, "==", 1, "child: signal")
        p.raw(n, "read", r, A + PAGE, 1)
        p.check(n, "==", 1, "parent: the child wrote")
        p.check_mem(A + 100, "child-wrote", "parent sees the child's write")
        p.check_mem(B, "child-mapped", "parent sees the child's mapping")
        p.emit("parent", child)
        p.wait_child(child)
    r = run(build)
    assert r.finish() == 0
    assert _not_ok(r) == []
    emits = _emits(r)
    pid = emits["parent"][0]
    assert pid != r.pid
    assert emits["child"] == [pid, 0, -5, "t\u00e9xt", None]
    line = [ln for ln in _lines(r) if '"child"' in ln][0]
    assert line == json.dumps({"kind": "emit", "pid": pid, "values": ["child", pid, 0, -5, "t\u00e9xt", None]})


def test_a_child_check_fails_with_its_pid_in_the_interpreters_format(run):
    label = 'l\u00e4bel "quoted"\n'
    all_bytes = "".join(map(chr, range(1, 256)))

    def build(p):
        p.mmap(A, PAGE, PROT_RW, FIXED)
        v = p.reg()
        p.set(v, 7)
        child = p.call("fork", CLONE_VM | 17)
        with p.child(child):
            p.add(v, -10)                             # wraps: an unsigned register
            p.check(v, ">", 0xFFFFFFFFFFFFFFFE, label)
            p.check(3, ">=", -2, "negative literal: unsigned")
            p.store(A, "\x01\x7f\"\\\t")
            p.check_mem(A, "other", "bytes")
            p.check_mem(A + 1, "x", "one")
            p.store(A, all_bytes)
            p.check_mem(A, all_bytes, "utf-8 text matches")
            p.check_mem(A, "y" * len(all_bytes.encode()), "every byte")
            p.check(v, "==", v, "passes")
            p.exit(9)
        p.emit("pid", child)
        p.wait_child(child, 9, "exit status")
    r = run(build)
    assert r.finish() == 0
    pid = _emits(r)["pid"][0]
    fails = [json.loads(ln) for ln in _lines(r) if '"FAIL"' in ln]
    got_bytes = "\x01\x7f\"\\\t"
    want = [{"kind": "FAIL", "pid": pid, "label": label, "got": (7 - 10) % (1 << 64),
             "want": f"> {0xFFFFFFFFFFFFFFFE}"},
            {"kind": "FAIL", "pid": pid, "label": "negative literal: unsigned", "got": 3, "want": ">= -2"},
            {"kind": "FAIL", "pid": pid, "label": "bytes", "got": got_bytes, "want": "other"},
            {"kind": "FAIL", "pid": pid, "label": "one", "got": "\x7f", "want": "x"},
            {"kind": "FAIL", "pid": pid, "label": "every byte",
             "got": all_bytes.encode().decode("latin-1"), "want": "y" * len(all_bytes.encode())}]
    assert fails == want
    # byte for byte what json.dumps writes in Interp.report
    assert [ln for ln in _lines(r) if '"FAIL"' in ln] == [json.dumps(w) for w in want]
    assert [x for x in r.reports() if x["kind"] != "FAIL" and x["kind"] != "emit"] == []


def test_a_bad_address_is_a_failed_check_not_a_crash(run):
    def build(p):
        child = p.call("fork", CLONE_VM)
        with p.child(child):
            p.store(UNMAPPED, "lost")                 # EFAULT, dropped as in Interp
            p.check_mem(UNMAPPED, "abc", "unmapped")
            p.check_mem(0xFFFFFFFFFFFFF000, "abc", "kernel address")
            p.emit("child went on")
        p.emit("pid", child)
        p.wait_child(child)
    r = run(build)
    assert r.finish() == 0
    pid = _emits(r)["pid"][0]
    fails = [x for x in r.reports() if x["kind"] == "FAIL"]
    assert fails == [{"kind": "FAIL", "pid": pid, "label": "unmapped", "got": "fault: errno 14", "want": "abc"},
                     {"kind": "FAIL", "pid": pid, "label": "kernel address", "got": "fault: errno 14",
                      "want": "abc"}]
    assert "child went on" in _emits(r)
    assert _not_ok(r) == fails


def test_the_childs_point_blocks_until_release(run):
    def build(p):
        child = p.call("fork", CLONE_VM)
        with p.child(child):
            p.ckpt()
            p.emit("after the point")
        p.emit("pid", child)
        p.ckpt()
        p.wait_child(child)
    r = run(build)
    points = r.wait_report("point", 2)
    pid = [e for e in r.wait_report("emit")][0]["values"][1]
    assert sorted(x["pid"] for x in points) == sorted([r.pid, pid])
    _wait_sleeping(pid)
    with open(f"/proc/{pid}/wchan") as f:
        assert f.read() == "wait_for_partner"         # opening the release FIFO
    time.sleep(0.2)
    assert "after the point" not in _emits(r)
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    assert ".so" in maps and "clonevm-" in maps        # the library stays mapped
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    with open(f"/proc/{r.pid}/status") as f:
        parent_status = f.read()
    assert "Threads:\t1" in status and "Threads:\t1" in parent_status
    assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{r.pid}/ns/pid")
    assert r.finish() == 0
    assert "after the point" in _emits(r)
    assert _not_ok(r) == []


def test_an_op_the_child_cannot_run_is_refused_before_cloning(run):
    def build(p):
        child = p.call("fork", CLONE_VM)
        with p.child(child):
            p.ckpt()
            p.pipe()                                  # not in the mini-interpreter
        p.emit("parent went on")
        p.wait_child(child)
    r = run(build)
    assert r.proc.wait(timeout=20) == 125
    (why,) = r.reports()
    assert why["kind"] == "unsupported" and why["op"] == "fork" and why["pid"] == r.pid
    assert "CLONE_VM child would run op 3 pipe" in why["reason"]


def test_plan_follows_known_registers_only():
    p = Program()
    x = p.reg()
    child = p.call("fork", CLONE_VM)
    with p.child(child):
        p.set(x, 0)
        skip = p.label()
        p.jnz(x, skip)                  # x known 0: falls through
        p.emit("reached")
        p.place(skip)
    p.pipe()                            # the parent's: never the child's
    ops = p.build()
    regs = [0] * NR_REGS
    reach = cvm.plan(ops, 1, regs)
    assert 1 in reach and not any(ops[pc][1] in ("pipe", "wait4") for pc in reach)
    # an unknown register (a syscall's result) takes both ways
    q = Program()
    r0 = q.getpid()
    lbl = q.label()
    q.jnz(r0, lbl)
    q.exit(0)
    q.place(lbl)
    q.pipe()
    with pytest.raises(Unsupported, match="op 3 pipe"):
        cvm.plan(q.build(), 0, regs)


def test_the_library_calls_nothing_outside_itself(tmp_path):
    so = cvm.compile_library(str(tmp_path))
    syms = subprocess.run(["readelf", "-W", "--dyn-syms", so], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    undefined = [ln for ln in syms if " UND " in ln and len(ln.split()) == 8]
    assert undefined == []
    assert [ln.split()[-1] for ln in syms if " FUNC " in ln] == ["ckv_clone"]
    dyn = subprocess.run(["readelf", "-W", "-r", "-d", so], capture_output=True, text=True,
                         check=True).stdout
    assert "NEEDED" not in dyn and "JUMP_SLOT" not in dyn and "There are no relocations" in dyn


def test_without_gcc_the_fork_is_refused(run, tmp_path):
    empty = tmp_path / "nobin"
    empty.mkdir()
    r = run(lambda p: p.call("fork", CLONE_VM), env_extra={"PATH": str(empty)})
    assert r.proc.wait(timeout=20) == 125
    assert "gcc is not installed" in r.wait_report("unsupported")[0]["reason"]


def test_a_process_catching_signals_is_refused(run):
    def build(p):
        p.do("sigaction", 10, 0x401000, 0, 0)         # SIGUSR1: a real handler (the ring's)
        child = p.call("fork", CLONE_VM)
        with p.child(child):
            p.emit("child")
    r = run(build)
    assert r.proc.wait(timeout=20) == 125
    (why,) = r.reports()
    assert why["kind"] == "unsupported" and "catching signal 10" in why["reason"]


def test_the_library_is_built_in_a_private_directory(tmp_path):
    """CONTROL_DIR is writable by everybody: the library root loads goes into a 0700
    subdirectory of ours, and a planted one that is not ours is refused."""
    os.chmod(tmp_path, 0o1777)                       # sticky, as the live backend's
    so = cvm.compile_library(str(tmp_path))
    st = os.stat(os.path.dirname(so))
    assert os.path.dirname(os.path.dirname(so)) == str(tmp_path)
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    other = tmp_path / "other"
    other.mkdir()
    os.chmod(other, 0o1777)
    planted = other / f"clonevm-lib-{os.getuid()}"
    planted.mkdir(mode=0o777)
    os.chmod(planted, 0o777)
    with pytest.raises(Unsupported, match="not a private directory"):
        cvm.compile_library(str(other))
    loose = tmp_path / "loose"                       # writable by all, not sticky
    loose.mkdir()
    os.chmod(loose, 0o777)
    elsewhere = cvm.compile_library(str(loose))
    assert not elsewhere.startswith(str(loose)) and os.path.basename(
        os.path.dirname(elsewhere)).startswith("ckptsim-clonevm-")
    shutil.rmtree(os.path.dirname(elsewhere))

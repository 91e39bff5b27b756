"""backend/interp_signals.py: a program's handler is a real disposition (flags, mask,
glibc's restorer, SigCgt), delivery runs the recorder code and reports the siginfo, the
kernel applies SA_RESETHAND, SA_ONSTACK, SA_RESTART (and EINTR without it)."""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import subprocess
import time

import pytest

from backend import kabi
from backend.interp_signals import HANDLER_CODE, HANDLER_SOURCE, RING_POINTER_OFFSET
from conformance.dsl import MAP_FIXED, MAP_PRIVATE_ANON, O_RDWR, PAGE, PROT_RW, Reg

from .interp_harness import bit, run  # noqa: F401,F811 (run: a fixture)

SIGUSR1, SIGUSR2, SIGRT = 10, 12, 40
SA_SIGINFO, SA_ONSTACK, SA_RESTART, SA_NODEFER, SA_RESETHAND = (
    0x4, 0x08000000, 0x10000000, 0x40000000, 0x80000000)
SA_RESTORER = 0x04000000
HANDLER = 0x401000
U64 = (1 << 64) - 1


def test_handler_code_is_its_source(tmp_path):
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        pytest.skip("binutils (as, objcopy) not installed: cannot reassemble the handler")
    (tmp_path / "h.s").write_text(HANDLER_SOURCE)
    subprocess.run(["as", "-o", str(tmp_path / "h.o"), str(tmp_path / "h.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "h.o"),
                    str(tmp_path / "h.bin")], check=True)
    code = (tmp_path / "h.bin").read_bytes()
    assert code[:RING_POINTER_OFFSET].rstrip(b"\x90") == HANDLER_CODE.rstrip(b"\x90")
    assert len(code) == RING_POINTER_OFFSET + 8            # the ring pointer follows the code


def _sigaction_in_child(*op_args):
    """Run op_sigaction in a forked child (this process keeps its dispositions); returns the
    kernel's sigaction (handler, flags, restorer, mask) for the signal afterwards."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            from backend.interp import Interp
            from backend.interp_libc import KSigaction, libc_call
            from backend.interp_signals import PROCESS
            signal.signal(signal.SIGINT, signal.SIG_DFL)   # as the interpreter's start does
            PROCESS.learn_restorer()
            res = Interp([], "/nonexistent").op_sigaction(None, *op_args)
            old = KSigaction()
            libc_call("syscall", kabi.SYS_rt_sigaction, op_args[0], None, ctypes.byref(old), 8)
            os.write(w, repr((res, old.handler, old.flags, old.restorer, old.mask)).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 4096)
    os.close(r)
    os.waitpid(pid, 0)
    return eval(data)  # noqa: S307 - our own child's repr of ints and a name


def test_sigaction_installs_a_real_disposition():
    flags = SA_RESTART | SA_NODEFER | SA_ONSTACK | SA_SIGINFO | SA_RESETHAND
    res, handler, kflags, restorer, mask = _sigaction_in_child(SIGUSR1, HANDLER, flags, bit(SIGUSR2, SIGRT))
    assert res is None
    assert handler not in (0, 1, HANDLER)                  # the interpreter's code, not the model's address
    assert kflags == flags | SA_RESTORER
    assert restorer != 0
    assert mask == bit(SIGUSR2, SIGRT)
    # SIG_IGN stays SIG_IGN, without a restorer
    res, handler, kflags, restorer, mask = _sigaction_in_child(SIGUSR2, 1, 0, 0)
    assert (handler, kflags, restorer) == (1, 0, 0)


def test_a_model_restorer_is_refused(run):
    r = run(lambda p: p.do("sigaction", SIGUSR1, HANDLER, 0, 0, 0x402000))
    assert r.proc.wait(timeout=20) == 125
    assert "restorer" in r.wait_report("unsupported")[0]["reason"]


def test_delivery_reports_siginfo_and_sigcgt(run):
    def build(p):
        p.do("sigaction", SIGRT, HANDLER, SA_SIGINFO, 0)
        p.do("sigaction", SIGUSR1, HANDLER, 0, 0)
        p.ckpt()
        me = p.getpid()
        p.check(p.sigqueue(me, SIGRT, 111), "==", 0, "sigqueue")
        p.check(p.kill(me, SIGUSR1), "==", 0, "kill")
    r = run(build)
    r.wait_report("point")
    with open(f"/proc/{r.pid}/status") as f:
        cgt = int([ln for ln in f if ln.startswith("SigCgt")][0].split()[1], 16)
    assert cgt & bit(SIGRT, SIGUSR1) == bit(SIGRT, SIGUSR1)
    assert r.finish() == 0
    sigs = r.wait_report("signal", 2)
    assert [s["sig"] for s in sigs] == [SIGRT, SIGUSR1]
    rt, usr = sigs
    assert (rt["value"], rt["code"], rt["from"], rt["tid"]) == (111, -1, r.pid, r.pid)
    assert usr["value"] is None and usr["code"] is None   # no SA_SIGINFO: no siginfo
    assert not [x for x in r.reports() if x["kind"] == "FAIL"]


def test_resethand_and_queued_rt_instances(run):
    """SA_RESETHAND: the first of two queued rt instances runs the handler, the second kills."""
    def build(p):
        child = p.fork()
        with p.child(child):
            p.do("sigaction", SIGRT, HANDLER, SA_SIGINFO | SA_RESETHAND, 0)
            p.do("sigprocmask", 0, bit(SIGRT))
            me = p.getpid()
            p.sigqueue(me, SIGRT, 1)
            p.sigqueue(me, SIGRT, 2)
            p.check(p.sigpending(), "==", bit(SIGRT), "pending")
            p.do("sigprocmask", 1, bit(SIGRT))
            p.check(0, "==", 1, "outlived the second instance")
        p.wait4(child)
        p.emit(Reg(15))
    r = run(build)
    assert r.finish() == 0
    assert r.wait_report("emit")[0]["values"] == [SIGRT]
    assert not [x for x in r.reports() if x["kind"] == "FAIL"]


def test_handler_runs_on_the_altstack(run):
    def build(p):
        p.mmap(0x30000000, 4 * PAGE, PROT_RW, MAP_PRIVATE_ANON | MAP_FIXED)
        p.do("sigaltstack", [0x30000000, 4 * PAGE, 0])
        p.do("sigaction", SIGUSR1, HANDLER, SA_ONSTACK, 0)
        p.do("sigaction", SIGUSR2, HANDLER, 0, 0)
        me = p.getpid()
        p.kill(me, SIGUSR1)
        p.kill(me, SIGUSR2)
    r = run(build)
    assert r.finish() == 0
    stacks = {s["sig"]: s["stack"] for s in r.wait_report("signal", 2)}
    assert stacks == {SIGUSR1: "altstack", SIGUSR2: "stack"}


def _wait_dequeued(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            pending = [int(ln.split()[1], 16) for ln in f if ln.startswith(("SigPnd", "ShdPnd"))]
        if not any(pending):
            return
        time.sleep(0.01)
    raise AssertionError(f"a signal of {pid} stayed pending")


@pytest.mark.parametrize("flags, want", [(SA_RESTART, 2), (0, -errno.EINTR & U64)])
def test_blocked_read_restarts_only_with_sa_restart(run, tmp_path, flags, want):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)

    def build(p):
        buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
        fd = p.open(fifo, O_RDWR, 0)
        p.do("sigaction", SIGUSR1, HANDLER, flags, 0)
        p.emit("reading")
        got = p.read(fd, buf, 2)
        p.emit(got)
    r = run(build)
    r.wait_report("emit")
    r.wait_blocked(r.pid)
    os.kill(r.pid, signal.SIGUSR1)
    _wait_dequeued(r.pid)             # delivered: the handler ran while the read was blocked
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)   # never ENXIO, the reader may be gone
    try:
        os.write(fd, b"ok")
        assert r.proc.wait(timeout=20) == 0
    finally:
        os.close(fd)
    assert r.wait_report("emit", 2)[1]["values"] == [want]
    assert [x["sig"] for x in r.reports() if x["kind"] == "signal"] == [SIGUSR1]


def test_a_uid_of_its_own_makes_the_queued_count_the_programs():
    """Linux charges queued signals to the real uid: under OWN_UID_ENV the program's uid is
    one no other process has, so RLIMIT_SIGPENDING=2 lets exactly two signals queue."""
    from backend.interp import OWN_UID_ENV, RLIMIT_SIGPENDING, needs_own_uid
    from .interp_harness import InterpRun, program
    uid = 0x40000000 + os.getpid()

    def build(p):
        p.do("setrlimit", RLIMIT_SIGPENDING, 2, 2)
        p.do("sigprocmask", 0, bit(SIGRT))
        me = p.getpid()
        p.check(p.sigqueue(me, SIGRT, 1), "==", 0, "first")
        p.check(p.sigqueue(me, SIGRT, 2), "==", 0, "second")
        p.check(p.sigqueue(me, SIGRT, 3), "==", (-errno.EAGAIN) & U64, "third: over the limit")
        p.emit(p.call("getuid"))
    ops = program(build)
    assert needs_own_uid(ops) and not needs_own_uid(program(lambda p: p.getpid()))
    import pathlib
    import tempfile
    ctl = pathlib.Path(tempfile.mkdtemp(prefix="ckpt-own-uid-"))   # pytest's tmp_path is 0700
    os.chmod(ctl, 0o777)
    old_mask = os.umask(0)     # the report and the release FIFO: 0666, for the program's uid
    try:
        r = InterpRun(ops, ctl, env_extra={OWN_UID_ENV: str(uid)})
    finally:
        os.umask(old_mask)
    try:
        assert r.finish() == 0
        assert r.wait_report("emit")[0]["values"] == [uid]
        assert not [x for x in r.reports() if x["kind"] in ("FAIL", "error", "unsupported")]
    finally:
        r.close()
        shutil.rmtree(ctl)

"""Shared fixtures of the live-backend tests: C targets compiled once per session, and real
target processes that the tests own (ended by pid at teardown, never left traced or stopped).

Fixtures:
    run_cache -> path             (autouse) the session's backend/runcache.py directory
    c_target(name) -> path        compile tests/backend/targets/<name>.c (session cache)
    start_target(exe, *args)      start a process; returns a Target (pid, info, readline());
                                  teardown: untrace, SIGKILL, reap - on every path
    check_untraced(pid)           assert no thread of pid is traced or in a ptrace stop
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time

import pytest

TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")


@pytest.fixture(scope="session", autouse=True)
def run_cache(tmp_path_factory):
    """The files the live tools keep between runs (backend/runcache.py: ELF identities, the
    must-have probe) are, for this session's checkpoints and restarts in and out of process,
    in a directory of its own, not the machine's."""
    path = str(tmp_path_factory.mktemp("run-cache") / "ckptsim")
    old = os.environ.get("CKPTSIM_CACHE_DIR")
    os.environ["CKPTSIM_CACHE_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("CKPTSIM_CACHE_DIR", None)
    else:
        os.environ["CKPTSIM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def c_target(tmp_path_factory):
    """``c_target(name)`` compiles targets/<name>.c with gcc (-O1 -pthread) once per session
    and returns the executable's path. Skips, saying why, only when gcc is not installed."""
    gcc = shutil.which("gcc")
    built: dict[str, str] = {}
    outdir = tmp_path_factory.mktemp("c-targets")

    def build(name: str) -> str:
        if gcc is None:
            pytest.skip("gcc is not installed: the live-backend tests need it to build their "
                        "C targets (apt-get install gcc)")
        if name not in built:
            src = os.path.join(TARGETS, f"{name}.c")
            exe = str(outdir / name)
            r = subprocess.run([gcc, "-O1", "-Wall", "-pthread", "-o", exe, src],
                               capture_output=True, text=True)
            if r.returncode:
                pytest.fail(f"gcc failed on {src}:\n{r.stderr}")
            built[name] = exe
        return built[name]

    return build


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        return {}


def _tids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return []


def untraced_problems(pid: int) -> list[str]:
    out = []
    for tid in _tids(pid):
        st = _status(tid)
        if st and (st.get("TracerPid", "0") != "0" or st.get("State", "").startswith("t")):
            out.append(f"tid {tid}: TracerPid {st.get('TracerPid')}, State {st.get('State')}")
    return out


@pytest.fixture
def check_untraced():
    def check(pid: int) -> None:
        problems = untraced_problems(pid)
        assert not problems, f"process {pid} left traced or stopped: {problems}"
    return check


class Target:
    """A running target. ``info``: the key=value pairs of its READY line (ints; hex ones
    parsed as such). ``readline(timeout)`` returns the next stdout line or None on timeout."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.pid = proc.pid
        self.info: dict[str, int] = {}
        self._buf = b""

    def readline(self, timeout: float = 10.0) -> str | None:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def drain(self) -> list[str]:
        """Every complete line available right now."""
        lines = []
        while True:
            line = self.readline(timeout=0)
            if line is None:
                return lines
            lines.append(line)

    def write(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()


def _end(proc: subprocess.Popen) -> None:
    """Untrace (if this process traces any of its threads), SIGKILL and reap ``proc``."""
    from backend import ptrace       # imported late: a broken backend must not break collection
    for tid in _tids(proc.pid):
        if _status(tid).get("TracerPid") == str(os.getpid()):
            try:
                ptrace.release(tid, timeout=5.0)
            except Exception:        # noqa: BLE001 - SIGKILL below still ends it
                pass
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for tid in _tids(proc.pid):      # threads that exited traced are reaped by their tracer
        if tid != proc.pid:
            try:
                os.waitpid(tid, 0x40000000 | os.WNOHANG)
            except ChildProcessError:
                pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for f in (proc.stdin, proc.stdout):
        if f:
            f.close()


@pytest.fixture
def start_target():
    """``start_target(exe, *args)`` starts ``exe`` with a stdin and a stdout pipe, waits for its
    READY line (the handshake) and returns a Target. Every target is ended by pid at teardown
    (untraced first if needed, then SIGKILL and waitpid), whatever the test did."""
    procs: list[subprocess.Popen] = []

    def start(exe: str, *args: str, ready_timeout: float = 20.0) -> Target:
        proc = subprocess.Popen([exe, *map(str, args)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        procs.append(proc)
        t = Target(proc)
        line = t.readline(ready_timeout)
        if line is None or not line.startswith("READY"):
            raise AssertionError(f"{exe} {args}: no READY line (got {line!r}, exit status "
                                 f"{proc.poll()})")
        for item in line.split()[1:]:
            k, v = item.split("=", 1)
            t.info[k] = int(v, 0)
        return t

    try:
        yield start
    finally:
        for proc in procs:
            _end(proc)

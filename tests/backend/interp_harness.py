"""Run a conformance program in backend/interp.py as a real process, for the interpreter's
tests: ``start(build)`` returns an InterpRun (pid, reports(), wait_report(kind), release(),
finish()); the process (its own session) is killed by pid and reaped at teardown."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conformance.dsl import Program

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class InterpRun:
    def __init__(self, ops, tmp, env_extra=None, argv=None):
        self.ctl = str(tmp)
        open(os.path.join(self.ctl, "report"), "w").close()
        os.mkfifo(os.path.join(self.ctl, "release"))
        prog = os.path.join(self.ctl, "program.json")
        with open(prog, "w") as f:
            json.dump(ops, f)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": REPO, **(env_extra or {})}
        cmd = argv or [sys.executable, "-m", "backend.interp", prog, self.ctl]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.release_fd = None

    def reports(self) -> list[dict]:
        """The complete report lines so far (a line still being written is left for later:
        one write(2) of a long line can be seen half done)."""
        with open(os.path.join(self.ctl, "report")) as f:
            text = f.read()
        lines = text.split("\n")
        return [json.loads(line) for line in lines[:-1]]

    def wait_report(self, kind: str, count: int = 1, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [r for r in self.reports() if r["kind"] == kind]
            if len(got) >= count:
                return got
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(f"no {count} {kind!r} report(s): {self.reports()} "
                             f"(exit {self.proc.poll()}, {self.proc.stderr.read() if self.proc.poll() is not None else ''})")

    def wait_blocked(self, tid: int, timeout: float = 10.0) -> None:
        """Until thread ``tid`` of the run sleeps (in a blocking syscall)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "S":
                    return
            time.sleep(0.01)
        raise AssertionError(f"thread {tid} of {self.pid} did not block")

    def release(self) -> None:
        if self.release_fd is None:
            self.release_fd = os.open(os.path.join(self.ctl, "release"), os.O_RDWR | os.O_CLOEXEC)

    def finish(self, timeout: float = 20.0) -> int:
        self.release()
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc.stderr.close()
        if self.release_fd is not None:
            os.close(self.release_fd)


def program(build) -> list:
    p = Program()
    build(p)
    return p.build()


def bit(*sigs):
    return sum(1 << (s - 1) for s in sigs)


@pytest.fixture
def run(tmp_path):
    """``run(build, **kw)``: an InterpRun of the program ``build`` makes; every one is
    closed (killed by pid, reaped) at teardown."""
    runs = []

    def start(build, **kw):
        d = tmp_path / f"run{len(runs)}"
        d.mkdir()
        r = InterpRun(program(build), d, **kw)
        runs.append(r)
        return r
    yield start
    for r in runs:
        r.close()

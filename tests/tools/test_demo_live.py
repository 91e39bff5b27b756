"""``ckptsim demo`` on real processes (ckptsim/tools/demo_live.py): it passes end to end,
checks what it claims (its check fails on a gap, a repeat or a wrong total), leaves no
process behind on success or failure, and falls back to the model demo, saying why, where
the live backend cannot run."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from ckptsim.tools import demo, demo_live
from ckptsim.tools.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
live = pytest.mark.skipif(demo_live.unavailable_reason() is not None,
                          reason=f"the live demo cannot run here: {demo_live.unavailable_reason()}")


def _pids_of(lines: list[str]) -> tuple[int, int]:
    text = "\n".join(lines)
    original = int(re.search(r"started the counter .*?pid (\d+)", text).group(1))
    restored = int(re.search(r"restarted from the image .*?pid (\d+) here", text).group(1))
    return original, restored


@live
def test_live_demo_end_to_end_leaves_nothing_behind():
    r = subprocess.run([sys.executable, "-m", "ckptsim.tools.cli", "demo"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "OK: the restarted counter carried on from where it was checkpointed"
    assert any(x.startswith("checked: lines 0..") for x in lines)
    assert "Task tree (1 tasks):" in r.stdout                  # ckptinfo showed the image
    original, restored = _pids_of(lines)
    # the demo's own process has exited, so anything it left would be an orphan still running
    for pid in (original, restored):
        assert not os.path.exists(f"/proc/{pid}") or _state(pid) in ("Z", "X"), \
            f"pid {pid} of the demo still runs: {_cmdline(pid)}"
    workdir = re.search(r"(/\S+/ckptsim-demo-\w+)/", r.stdout).group(1)
    assert not os.path.exists(workdir)                        # cleaned up on success


@live
def test_a_failed_check_fails_the_demo_and_still_ends_everything(monkeypatch):
    def fail(lines):
        raise demo_live.DemoFailed(f"injected: {len(lines)} lines")
    monkeypatch.setattr(demo_live, "check_count", fail)
    out: list[str] = []
    children_before = _children()
    assert demo.run_demo(out=out.append) == 1
    assert out[-1].startswith("FAILED: injected:")
    original, restored = _pids_of(out)
    for pid in (original, restored):
        assert not os.path.exists(f"/proc/{pid}") or _state(pid) in ("Z", "X"), \
            f"pid {pid} still runs after a failed demo"
    assert _children() <= children_before, "a child of the demo is left (running or a zombie)"


def test_check_count_catches_gaps_repeats_and_wrong_totals():
    good = [f"{i} {i * (i + 1) // 2}" for i in range(10)]
    demo_live.check_count(good)
    for bad, what in [(good[:5] + good[6:], "line 6"),           # a gap
                      (good[:5] + good[4:], "line 6"),           # a repeat
                      (good[:3] + ["3 7"] + good[4:], "line 4"),  # memory lost
                      (good[:3] + ["ERROR step 3"], "line 4")]:
        with pytest.raises(demo_live.DemoFailed, match=what):
            demo_live.check_count(bad)


def test_falls_back_to_the_model_demo_saying_why(monkeypatch):
    monkeypatch.setattr(demo_live, "unavailable_reason", lambda: "not running as root (test)")
    out: list[str] = []
    assert demo.run_demo(out=out.append) == 0
    assert out[0] == ("the live demo cannot run here: not running as root (test); running the "
                      "model demo instead")
    assert out[-1].startswith("OK: the restarted counter carried on exactly")


def test_model_option_runs_the_model_demo(capsys, monkeypatch):
    monkeypatch.setattr(demo_live, "run_live_demo", lambda out=print: pytest.fail("live ran"))
    assert main(["demo", "--model"]) == 0
    assert "carried on exactly as an uninterrupted run" in capsys.readouterr().out


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "X"


def _children() -> set[int]:
    me, found = os.getpid(), set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.add(int(name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"

"""The conformance suite's live backend: scenarios run as real processes (backend/interp.py)
in a new pid namespace, are checkpointed live, their images replayed in the model, the
container killed and restarted live (backend/restore), and judged like the model's."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest

from conformance.backends.live import LiveBackend
from conformance.runner import FAILED, PASSED, run_scenario
from conformance.scenario import REGISTRY, all_scenarios
from conformance.dsl import MAP_PRIVATE_ANON, PAGE, PROT_RW, Program

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                                reason="the live backend needs unshare(1) and root")


class TrackingBackend(LiveBackend):
    """Remembers every run, so the test can check that none of its processes is left."""

    def __init__(self):
        self.runs = []

    def start(self, scenario):
        run = super().start(scenario)
        self.runs.append(run)
        return run


@pytest.fixture
def backend(request):
    b = TrackingBackend()

    def no_leftovers():
        for run in b.runs:
            b.cleanup(run)   # idempotent; ends anything a failing test left
            left = [p for p in sorted(run.seen) if os.path.exists(f"/proc/{p}")]
            assert not left, f"processes left behind by {run.scenario.name}: {left}"
            assert run.proc.returncode is not None, "unshare was not reaped"
            assert not os.path.exists(run.tmp)
    request.addfinalizer(no_leftovers)
    return b


def scn(name):
    all_scenarios()
    return REGISTRY[name]


def custom(name, build, **options):
    p = Program()
    build(p)
    base = scn("pipe_partly_full")
    return dataclasses.replace(base, name=name, program=tuple(tuple(op) for op in p.build()), **options)


@pytest.mark.parametrize("name", ["pipe_partly_full", "files_offset", "memory_anon_private",
                                  "tree_zombies", "sig_handlers_kept", "sig_pending_rt_queued",
                                  "sig_altstack", "tree_thread", "tree_thread_blocked"])
def test_scenarios_pass_with_a_live_restart(backend, name):
    result = run_scenario(scn(name), backend)
    assert result.status == PASSED, str(result)
    run = backend.runs[0]
    assert run.restored is not None, "the container was not restarted"
    assert run.restored.root != run.root or run.restored.pids, run.restored
    assert run.exit_status == 0                       # the restored init ran to its end
    assert not os.path.exists(f"/proc/{run.root}")


def test_a_restored_scenario_that_breaks_fails(backend, monkeypatch):
    """A restart that loses state must fail the scenario: here the restored pipe's bytes
    are dropped on the way (the runner's visible-state diff and the program's own checks
    both see it)."""
    from backend.restore import files as restore_files
    real = restore_files.FileFactory._pipe

    def lossy(self, file, where):
        file.private.buffer.clear()
        return real(self, file, where)
    monkeypatch.setattr(restore_files.FileFactory, "_pipe", lossy)
    result = run_scenario(scn("pipe_partly_full"), backend)
    assert result.status == FAILED, str(result)


def test_tree_runs_as_a_pid_namespace(backend):
    run = backend.start(scn("tree_zombies"))
    state = backend.visible_state(run)
    assert 1 in state["tasks"] and state["tasks"][1]["ppid"] == 0
    assert len(state["tasks"]) > 1
    assert any(t["state"] == "zombie" for t in state["tasks"].values())
    # the program runs as expected when released (no checkpoint): its own checks pass
    backend.resume(run)
    assert backend.verdict(run) == []


def test_interpreter_runs_a_scenario_to_its_end(backend):
    run = backend.start(scn("pipe_partly_full"))
    fds = backend.visible_state(run)["fds"][1]["fds"]
    assert sorted(fds) == [0, 1] and fds[0]["kind"] == "pipe"
    backend.resume(run)
    assert backend.verdict(run) == []


def test_check_failing_before_the_point_fails(backend):
    def build(p):
        buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
        p.store(buf, "real")
        p.check_mem(buf, "fake", "deliberately wrong")
        p.ckpt()
        p.check_mem(buf, "real", "after")
    result = run_scenario(custom("broken_check", build), backend)
    assert result.status == FAILED
    assert any("deliberately wrong" in p and "'real'" in p for p in result.problems), result.problems


def test_refused_checkpoint_fails(backend):
    def build(p):
        p.socket(2, 1, 0)   # AF_INET: the live checkpoint refuses it
        p.ckpt()
        p.check(0, "==", 0, "after")
    result = run_scenario(custom("inet_socket", build), backend)
    assert result.status == FAILED
    assert any("ENOSYS" in p or "socket" in p for p in result.problems), result.problems


def test_unsupported_reasons(backend):
    b = backend
    assert b.unsupported(scn("sig_handlers_kept")) is None          # real handlers
    assert b.unsupported(scn("tree_thread")) is None                # real threads
    assert b.unsupported(scn("memory_brk")) is None                 # the program owns the break
    assert b.unsupported(scn("memory_clone_vm")) is None            # interp_clonevm runs it
    assert b.unsupported(scn("sig_rt_queue_limit")) is None        # under a uid of its own
    assert b.unsupported(scn("memory_stack")) is None               # addresses from [stack]
    assert "ckpt_unpriv_allowed" in b.unsupported(scn("api_unpriv_level2_user"))
    assert b.unsupported(scn("api_self_checkpoint")) is None        # the checkpoint op
    assert b.unsupported(scn("tree_nested_pidns")) is None          # CLONE_NEWPID runs
    assert b.unsupported(scn("api_restart_ghost")) is None          # restart --ghost
    assert b.unsupported(scn("api_restart_taskself")) is None       # a new init in place
    assert b.unsupported(scn("pipe_partly_full")) is None


def test_cli_counts_it_passed():
    out = subprocess.run([sys.executable, "-c", "from ckptsim.tools.cli import main; main()", "conformance", "--backend", "live",
                          "-k", "pipe_partly_full"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert out.returncode in (0, 1), out.stderr
    row = [line.split() for line in out.stdout.splitlines() if line.startswith("pipes")]
    assert row == [["pipes", "1", "0", "0"]], out.stdout

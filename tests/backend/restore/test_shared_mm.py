"""Processes sharing one address space (a child made with clone(CLONE_VM), not a thread)
survive a live checkpoint and restart still sharing it: the child is cloned with CLONE_VM
from its restored parent, the mm is built and its pages written once.

The target (targets/restore_prog_clone_vm.c): the child bumps a counter in memory every
~2 ms; the parent prints it every ~5 ms and gives up ("STALLED") when it stops moving for a
second, which is what two separate copies of the memory would do."""
from __future__ import annotations

from backend import kabi

from .test_programs import assert_running_untraced, counts, ns_pid, restore_runs, status  # noqa: F401


def _ticks(lines: list[str]) -> list[int]:
    return [int(x.split("ticks=")[1]) for x in lines if x.startswith("n ")]


def test_a_clone_vm_child_shares_the_parents_memory_after_restart(c_target, restore_runs):
    prog = restore_runs.start([c_target("restore_prog_clone_vm")])
    child_ns = prog.ready["child"]
    lines = prog.wait_for(lambda ls: len(counts(ls, "n")) >= 5, "5 counts")
    assert "page ok" in lines
    with open(f"/proc/{prog.pid}/maps") as f:
        maps_before = [line.split()[:2] + line.split()[5:] for line in f]
    image = restore_runs.checkpoint_kill(prog)
    before = counts(prog.lines(), "n")
    restored = restore_runs.restart(prog, image)
    root = restored.root
    child = restored.pids[child_ns]
    assert ns_pid(child) == child_ns and int(status(child)["PPid"]) == root
    assert status(child)["Tgid"] == str(child)                # a process, not a thread
    # one address space, as before: kcmp says the two mms are the same
    assert kabi.syscall(kabi.SYS_kcmp, root, child, kabi.KCMP_VM, 0, 0, what="kcmp") == 0
    assert kabi.syscall(kabi.SYS_kcmp, root, child, kabi.KCMP_FILES, 0, 0, what="kcmp") != 0
    assert_running_untraced([root, child])
    lines = prog.wait_for(lambda ls: len(counts(ls, "n")) >= len(before) + 40, "40 more counts")
    assert not [x for x in lines if x.startswith("STALLED")], lines[-5:]
    after = _ticks(lines)[len(before):]
    assert after[-1] > after[0] >= _ticks(lines)[len(before) - 1]   # the child goes on
    with open(f"/proc/{child}/maps") as f:                # the image's: no stub page left
        assert [line.split()[:2] + line.split()[5:] for line in f] == maps_before

"""The task tree: fork/exit/wait, zombies, orphans, sessions, pid namespaces, freezer."""
import errno

import pytest

from ckptsim.errors import ModelError
from ckptsim.model.kernel import Kernel
from ckptsim.model.sched import Blocked
from ckptsim.model.tasks_ops import CLONE_FILES, CLONE_NEWPID, CLONE_SIGHAND, CLONE_THREAD, CLONE_VM, WNOHANG


def err(excinfo) -> int:
    return excinfo.value.errno


def test_fork_gives_increasing_pids_and_links_parent():
    k = Kernel()
    a = k.clone(k.init)
    b = k.clone(k.init)
    assert (a.tid, b.tid) == (2, 3)
    assert k.getppid(a) == 1 and a in k.init.children
    assert a.mm is not k.init.mm and a.files is not k.init.files


def test_exit_makes_a_zombie_until_waited():
    k = Kernel()
    child = k.clone(k.init)
    k.exit_group(child, 7)
    assert child.state == "zombie" and child.mm is None
    assert k.wait4(k.init, -1) == (child.tid, 7 << 8)
    assert child.state == "dead"
    with pytest.raises(ModelError) as e:
        k.wait4(k.init, -1)
    assert err(e) == errno.ECHILD


def test_wait_blocks_or_returns_zero_with_wnohang():
    k = Kernel()
    k.clone(k.init)
    assert k.wait4(k.init, -1, WNOHANG) == (0, 0)
    with pytest.raises(Blocked):
        k.wait4(k.init, -1)


def test_orphans_are_reparented_to_the_namespace_init():
    k = Kernel()
    container = k.clone(k.init, CLONE_NEWPID)
    mid = k.clone(container)
    leaf = k.clone(mid)
    assert leaf.pid.nr_in(container.ns) == 3
    k.exit_group(mid, 0)
    assert leaf.parent is container
    assert k.getppid(leaf) == 1


def test_a_nested_namespace_init_is_reparented_to_its_parents_reaper():
    """Its own namespace's reaper is itself: it was made its own parent (a cycle)."""
    k = Kernel()
    container = k.clone(k.init, CLONE_NEWPID)
    mid = k.clone(container)
    inner = k.clone(mid, CLONE_NEWPID)
    k.exit_group(mid, 0)
    assert inner.parent is container and inner in container.children
    assert k.getppid(inner) == 0  # its parent is outside its namespace
    outer = k.clone(k.init)
    top = k.clone(outer, CLONE_NEWPID)
    k.exit_group(outer, 0)
    assert top.parent is k.init


def test_nested_pid_namespaces_number_per_level():
    k = Kernel()
    outer = k.clone(k.init, CLONE_NEWPID)
    inner = k.clone(outer, CLONE_NEWPID)
    task = k.clone(inner)
    assert [nr for _, nr in task.pid.numbers] == [task.tid, 3, 2]
    assert k.getpid(task) == 2 and k.getpid(inner) == 1
    assert task.pid.nr_in(outer.ns) == 3


def test_namespace_init_exit_kills_the_namespace():
    k = Kernel()
    container = k.clone(k.init, CLONE_NEWPID)
    child = k.clone(container)
    k.exit_group(container, 0)
    assert child.state in ("zombie", "dead")


def test_threads_share_and_exit_group_ends_all():
    k = Kernel()
    proc = k.clone(k.init)
    thread = k.clone(proc, CLONE_VM | CLONE_SIGHAND | CLONE_THREAD | CLONE_FILES)
    assert thread.leader is proc and thread.mm is proc.mm and proc.mm.refs == 2
    assert k.getpid(thread) == k.getpid(proc) and k.gettid(thread) != k.gettid(proc)
    k.exit_group(thread, 1)
    assert proc.state == "zombie" and thread.state == "dead"


def test_clone_flag_rules():
    k = Kernel()
    for flags in (CLONE_THREAD, CLONE_SIGHAND, 0x40000000 << 8):
        with pytest.raises(ModelError) as e:
            k.clone(k.init, flags)
        assert err(e) == errno.EINVAL


def test_sessions_and_process_groups():
    k = Kernel()
    leader = k.clone(k.init)
    assert k.setsid(leader) == leader.tid
    with pytest.raises(ModelError) as e:
        k.setsid(leader)
    assert err(e) == errno.EPERM
    child = k.clone(leader)
    assert k.getsid(child) == leader.tid
    k.setpgid(leader, child.tid, 0)
    assert k.getpgid(child) == child.tid
    k.setpgid(leader, child.tid, leader.tid)
    assert k.getpgid(child) == leader.tid
    with pytest.raises(ModelError) as e:
        k.setpgid(leader, child.tid, 999)
    assert err(e) == errno.EPERM
    with pytest.raises(ModelError) as e:
        k.setpgid(k.init, child.tid, 0)
    assert err(e) == errno.ESRCH


def test_process_group_outlives_its_leader():
    k = Kernel()
    leader = k.clone(k.init)
    k.setsid(leader)
    child = k.clone(leader)
    k.exit_group(leader, 0)
    k.wait4(k.init, leader.tid)
    assert child.pgrp.nr_in(k.root_ns) == leader.tid
    assert k.clone(k.init).tid != leader.tid  # the number stays taken while the group lives


def test_set_tid_picks_the_pid_or_fails_with_eexist():
    k = Kernel()
    pid = k.new_pid(k.root_ns, [4242])
    assert pid.nr_in(k.root_ns) == 4242
    with pytest.raises(ModelError) as e:
        k.new_pid(k.root_ns, [4242])
    assert err(e) == errno.EEXIST


def test_freezer_stops_scheduling():
    k = Kernel()
    k.mkdir(k.init, "/bin", 0o755)
    t = k.spawn("/bin/loop", [[None, "set", 1, 1], [None, "emit", "x"], [None, "jnz", 1, 1]])
    k.cgroup_create(k.init, "/ct")
    k.cgroup_attach(k.init, "/ct", t.tid)
    k.freeze(k.init, "/ct")
    assert t.frozen and k.run(50) == 0
    k.thaw(k.init, "/ct")
    assert k.run(50) == 50


def test_scheduler_is_deterministic_for_a_seed():
    def run(seed):
        k = Kernel(seed)
        k.mkdir(k.init, "/bin", 0o755)
        k.install_program("/bin/p", [[None, "emit", "a"], [None, "emit", "b"], [None, "emit", "c"]])
        for _ in range(3):
            k.spawn("/bin/p")
        k.run()
        return k.output
    assert run(1) == run(1)
    assert sorted(run(1)) == sorted(run(2))


def test_program_errors_store_negative_errno():
    k = Kernel()
    k.mkdir(k.init, "/bin", 0o755)
    t = k.spawn("/bin/p", [[0, "close", 55], [None, "emit", "$r0"]])
    k.run()
    assert k.output == [("emit", t.tid, (-errno.EBADF) & ((1 << 64) - 1))]

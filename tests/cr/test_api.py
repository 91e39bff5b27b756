"""Linux-CR's rules for checkpoint() and restart() on the model."""
import errno
import io

import pytest

from ckptsim.cr.api import checkpoint, restart, restart_tasks
from ckptsim.cr.context import CheckpointError, RestartError
from ckptsim.errors import ImageError
from ckptsim.image import core, decode_all
from ckptsim.model.creds import Cred
from ckptsim.model.kernel import Kernel
from ckptsim.model.tasks_ops import CLONE_NEWPID, SIGKILL
from ckptsim.tools.scenarios import CGROUP, prepare

LOOP = [[None, "set", 1, 1], [None, "emit", "x"], [None, "jnz", 1, 1]]


def container(k, program=LOOP, path="/bin/loop"):
    k.mkdir(k.init, "/bin", 0o755)
    k.cgroup_create(k.init, CGROUP)
    root = k.spawn(path, program, flags=CLONE_NEWPID)
    k.cgroup_attach(k.init, CGROUP, root.tid)
    return root


def image_of(k, pid, flags=0, caller=None):
    buf = io.BytesIO()
    crid = checkpoint(k, caller or k.init, pid, buf, flags)
    return crid, buf.getvalue()


def test_checkpoint_ids_are_positive_and_unique():
    k = Kernel()
    root = container(k)
    k.freeze(k.init, CGROUP)
    a, _ = image_of(k, root.tid)
    b, _ = image_of(k, root.tid)
    assert 0 < a < b


def test_unknown_flags_are_einval():
    k = Kernel()
    root = container(k)
    k.freeze(k.init, CGROUP)
    with pytest.raises(CheckpointError) as e:
        image_of(k, root.tid, flags=0x100)
    assert e.value.errno == errno.EINVAL


def test_root_must_be_a_container_init_without_subtree():
    k = Kernel()
    k.mkdir(k.init, "/bin", 0o755)
    t = k.spawn("/bin/loop", LOOP)
    k.cgroup_create(k.init, CGROUP)
    k.cgroup_attach(k.init, CGROUP, t.tid)
    k.freeze(k.init, CGROUP)
    with pytest.raises(CheckpointError) as e:
        image_of(k, t.tid)
    assert e.value.errno == errno.EINVAL
    crid, data = image_of(k, t.tid, core.CHECKPOINT_SUBTREE)
    assert crid > 0 and decode_all(data)[0]["uflags"] == core.CHECKPOINT_SUBTREE


def test_unfrozen_tasks_are_ebusy():
    k = Kernel()
    root = container(k)
    with pytest.raises(CheckpointError) as e:
        image_of(k, root.tid)
    assert e.value.errno == errno.EBUSY


def test_no_such_task_is_esrch():
    k = Kernel()
    with pytest.raises(CheckpointError) as e:
        image_of(k, 4321)
    assert e.value.errno == errno.ESRCH


@pytest.mark.parametrize("level, ckpt_ok, restart_ok", [(0, False, False), (1, True, False), (2, True, True)])
def test_unprivileged_callers_per_sysctl(level, ckpt_ok, restart_ok):
    k = Kernel()
    root = container(k)
    k.freeze(k.init, CGROUP)
    _, data = image_of(k, root.tid)
    k.sysctl["kernel.ckpt_unpriv_allowed"] = level
    user = k.clone(k.init)
    user.cred = Cred.user(1000, 1000)
    root.cred = Cred.user(1000, 1000)  # the caller may ptrace its own tasks
    if ckpt_ok:
        assert image_of(k, root.tid, caller=user)[0] > 0
    else:
        with pytest.raises(CheckpointError) as e:
            image_of(k, root.tid, caller=user)
        assert e.value.errno == errno.EPERM
    if not restart_ok:
        with pytest.raises(RestartError) as e:
            restart(k, user, 0, data)
        assert e.value.errno == errno.EPERM


def test_checkpoint_of_another_users_tasks_is_eperm():
    k = Kernel()
    root = container(k)
    k.freeze(k.init, CGROUP)
    user = k.clone(k.init)
    user.cred = Cred.user(1000, 1000)
    with pytest.raises(CheckpointError) as e:
        image_of(k, root.tid, caller=user)
    assert e.value.errno == errno.EPERM


def test_leak_is_ebusy_with_an_error_record_and_a_log_line():
    k = Kernel()
    root = container(k)
    k.run(5)
    # init shares the container's pipe: a reference from outside the checkpointed set.
    rfd, wfd = k.pipe(root)
    k.files_share_for_test = None
    outside = root.files.get(rfd)
    k.init.files.install(outside.get())
    k.freeze(k.init, CGROUP)
    buf, log = io.BytesIO(), io.StringIO()
    with pytest.raises(CheckpointError) as e:
        checkpoint(k, k.init, root.tid, buf, 0, log)
    assert e.value.errno == errno.EBUSY
    assert "leak" in log.getvalue() and "Pipe" in log.getvalue() or "File" in log.getvalue()
    recs = decode_all(buf.getvalue())
    assert any(r.layout is core.ERROR for r in recs)
    # SUBTREE does not look for leaks.
    assert image_of(k, root.tid, core.CHECKPOINT_SUBTREE)[0] > 0


def test_restart_rebuilds_and_the_program_carries_on():
    reference, _ = prepare("counter", 3)
    cut = len(reference.output)
    reference.thaw(reference.init, CGROUP)
    reference.run()
    kernel, root = prepare("counter", 3)
    _, data = image_of(kernel, root.tid)
    kernel.do_group_exit(root, SIGKILL)
    tasks = restart_tasks(kernel, kernel.init, 0, data)
    # Restored tasks join the caller's (thawed) cgroup and run at once.
    assert tasks[0].pid.nr_in(tasks[0].ns) == 1 and tasks[0].runnable()
    cut = len(kernel.output)
    kernel.run()
    assert kernel.output[cut:] == reference.output[cut:] != []


def test_restart_frozen_leaves_tasks_frozen():
    kernel, root = prepare("counter", 0)
    _, data = image_of(kernel, root.tid)
    k2 = Kernel()
    k2.mkdir(k2.init, "/data", 0o755)
    tasks = restart_tasks(k2, k2.init, 0, data, core.RESTART_FROZEN, restore_fs=True)
    assert all(t.frozen for t in tasks)
    assert k2.run(10) == 0


def test_restart_of_an_error_image_is_eio():
    k = Kernel()
    buf = io.BytesIO()
    from ckptsim.cr.api import _write_header
    from ckptsim.cr.context import CheckpointContext, Log
    ctx = CheckpointContext(k, k.init, k.init, [k.init], buf, Log())
    _write_header(ctx, 0, 1, bytes(16), 0)
    ctx.writer.write_error("it failed")
    ctx.writer.finish()
    with pytest.raises((RestartError, ImageError)):
        restart(k, k.init, 0, buf.getvalue())


def test_failed_restart_leaves_nothing_behind():
    kernel, root = prepare("family", 0)
    _, data = image_of(kernel, root.tid)
    k2 = Kernel()
    before = [t.tid for t in k2.live_tasks()]
    # Corrupt a late record (and fix the checksum) so restart fails part-way.
    bad = bytearray(data)
    recs = decode_all(data)
    cpu = [r for r in recs if r.layout.name == "CPU"][-1]
    bad[cpu.offset + 8 + 12:cpu.offset + 8 + 16] = (99).to_bytes(4, "little")  # nr_regs
    import zlib
    tail = len(bad) - core.TAIL_SIZE
    bad[tail + 8 + 16:tail + 8 + 20] = zlib.crc32(bad[:tail]).to_bytes(4, "little")
    with pytest.raises(ImageError):
        restart_tasks(k2, k2.init, 0, bytes(bad), restore_fs=True)
    assert [t.tid for t in k2.live_tasks()] == before


def test_taskself_needs_a_one_task_image():
    kernel, root = prepare("family", 0)
    _, data = image_of(kernel, root.tid)
    with pytest.raises(RestartError) as e:
        restart(kernel, kernel.init, 0, data, core.RESTART_TASKSELF)
    assert e.value.errno == errno.EINVAL


def test_self_checkpoint_returns_crid_then_zero_after_restart():
    k = Kernel()
    k.mkdir(k.init, "/bin", 0o755)
    k.mkdir(k.init, "/img", 0o755)
    prog = [[0, "checkpoint", 0, "/img/self.img", core.CHECKPOINT_SUBTREE], [None, "emit", "$r0"]]
    t = k.spawn("/bin/selfck", prog)
    k.run()
    assert k.output == [("emit", t.tid, 1)]
    worker = k.clone(k.init)
    k.execve(worker, "/bin/selfck")
    wfd = k.open(worker, "/img/self.img", 0)
    restart(k, worker, 0, wfd, core.RESTART_TASKSELF)
    k.output.clear()
    k.run()
    assert k.output == [("emit", worker.tid, 0)]


def test_ghost_caller_exits_after_restart():
    kernel, root = prepare("counter", 0)
    _, data = image_of(kernel, root.tid)
    ghost = kernel.clone(kernel.init)
    restart_tasks(kernel, ghost, 0, data, core.RESTART_GHOST)
    assert ghost.state == "dead"


def test_zombies_re_exit_with_their_status():
    kernel, root = prepare("family", 0)
    zombies = [t for t in kernel.live_tasks() if t.state == "zombie"]
    assert zombies, "the family scenario has a zombie child at its checkpoint point"
    _, data = image_of(kernel, root.tid)
    k2 = Kernel()
    tasks = restart_tasks(k2, k2.init, 0, data, core.RESTART_FROZEN, restore_fs=True)
    restored = [t for t in tasks if t.state == "zombie"]
    assert [t.exit_code for t in restored] == [z.exit_code for z in zombies]
    parent = restored[0].parent
    assert k2.wait4(parent, -1, 1)[1] == zombies[0].exit_code

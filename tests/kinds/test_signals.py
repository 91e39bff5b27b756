"""The signal kinds: SIGHAND, SIGNAL + SIGPENDING, and the per-task section, round-tripped."""
import io

import pytest

from ckptsim.cr.context import CheckpointContext, Log, RestartContext
from ckptsim.errors import ImageError
from ckptsim.image.codec import ImageReader
from ckptsim.image.types import ObjType
from ckptsim.kinds import signals as ksig
from ckptsim.model.kernel import Kernel
from ckptsim.model.signals import (
    RLIMIT_NOFILE, SA_ONSTACK, SA_RESETHAND, SA_RESTART, SA_SIGINFO, SIG_BLOCK, SIG_IGN,
    SIG_SETMASK, SIGCHLD, SIGHUP, SIGINT, SIGRTMIN, SIGUSR1, SIGUSR2, SS_AUTODISARM, AltStack,
    sigmask)

H = 0x401000


def world():
    k = Kernel()
    t = k.clone(k.init)
    return k, t


def save_and_restore(k, tasks):
    """Write sighand/signal objrefs and each task's section; restore into fresh tasks."""
    buf = io.BytesIO()
    ctx = CheckpointContext(k, k.init, tasks[0], tasks, buf, Log())
    refs = []
    for t in tasks:
        refs.append((ctx.ref(t.sighand), ctx.ref(t.signal)))
        ksig.save_task_signals(ctx, t)
    ctx.writer.finish()
    rctx = RestartContext(k, k.init, ImageReader(buf.getvalue()), Log())
    restored = []
    for (hand_ref, sig_ref) in refs:
        fresh = type(tasks[0])(k, k.new_pid(k.root_ns), "restored")
        ksig.load_task_signals(rctx, fresh)
        fresh.sighand = rctx.obj(hand_ref, ObjType.SIGHAND)
        fresh.signal = rctx.obj(sig_ref, ObjType.SIGNAL)
        restored.append(fresh)
    assert rctx.reader.at_end()
    return restored, buf.getvalue()


def test_handler_table_masks_pending_and_altstack_round_trip():
    k, t = world()
    k.sigaction(t, SIGUSR1, H, SA_RESTART | SA_SIGINFO, sigmask(SIGUSR2), 0x7777)
    k.sigaction(t, SIGINT, SIG_IGN)
    k.sigaction(t, SIGRTMIN, H + 8, SA_ONSTACK | SA_RESETHAND)
    k.sigaction(t, SIGHUP, H)
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGUSR1, SIGRTMIN, SIGHUP, SIGCHLD))
    k.sigaltstack(t, (0x9000, 16384, SS_AUTODISARM))
    k.setrlimit(t, RLIMIT_NOFILE, 100, 200)
    for value in (3, 1, 2):
        k.sigqueue(k.init, k.observed_pid(t), SIGRTMIN, value)
    k.sigqueue(k.init, k.observed_pid(t), SIGUSR1, -1)  # a u64 value
    k.kill(k.init, k.observed_pid(t), SIGUSR1)            # coalesced
    k.kill(k.init, k.observed_pid(t), SIGCHLD)            # blocked, so queued
    k.tgkill(k.init, k.observed_pid(t), k.gettid(t), SIGHUP)  # private
    k.tgkill(k.init, k.observed_pid(t), k.gettid(t), SIGRTMIN)
    (r,), _ = save_and_restore(k, [t])
    assert r.sighand.actions == t.sighand.actions and r.sighand is not t.sighand
    assert r.sighand.refs == 1 and r.signal.refs == 1
    assert r.sigstate.blocked == t.sigstate.blocked
    assert r.sigstate.altstack == AltStack(0x9000, 16384, SS_AUTODISARM)
    assert r.signal.rlimits == t.signal.rlimits and r.signal.rlimits[RLIMIT_NOFILE] == (100, 200)
    assert r.signal.shared_pending.items == t.signal.shared_pending.items
    assert [(i.signo, i.value) for i in r.signal.shared_pending.items] == [
        (SIGRTMIN, 3), (SIGRTMIN, 1), (SIGRTMIN, 2), (SIGUSR1, (1 << 64) - 1), (SIGCHLD, 0)]
    assert r.sigstate.pending.items == t.sigstate.pending.items
    # Delivery order and values after restart are those of the original.
    k2, t2 = world()
    for target in (t, r):
        target.sigstate.blocked = 0
    k.deliver_signals(t)
    before = [o for o in k.output if o[0] == "signal"]
    r.sigstate.blocked, r.state, r.leader, r.threads = 0, "running", r, [r]
    r.pid = t.pid  # the same tgid in the output
    k.output.clear()
    k.deliver_signals(r)
    after = [o for o in k.output if o[0] == "signal"]
    # SIGHUP (private), SIGRTMIN on the altstack (then SA_RESETHAND), SIGUSR1; the next
    # SIGRTMIN now has the default action and ends both groups alike.
    assert before == after and len(after) == 3 and t.exit_code == r.exit_code == SIGRTMIN


def test_shared_objects_get_one_objref_and_one_record():
    k, t = world()
    from ckptsim.model.tasks_ops import CLONE_SIGHAND, CLONE_THREAD, CLONE_VM
    th = k.clone(t, CLONE_VM | CLONE_SIGHAND | CLONE_THREAD)
    k.sigaction(t, SIGUSR2, H)
    k.sigprocmask(th, SIG_SETMASK, sigmask(SIGUSR2))
    (r1, r2), data = save_and_restore(k, [t, th])
    assert r1.sighand is r2.sighand and r1.signal is r2.signal
    assert r1.sigstate.blocked == 0 and r2.sigstate.blocked == sigmask(SIGUSR2)
    names = [rec.name for rec in ImageReader(data).records()]
    assert names.count("SIGHAND") == 1 and names.count("SIGNAL") == 1
    assert names.count("SIGPENDING") == 3 and names.count("SIGALTSTACK") == 2


def test_group_stop_state_round_trips():
    k, t = world()
    k.kill(k.init, k.observed_pid(t), 19)  # SIGSTOP
    k.deliver_signals(t)
    (r,), _ = save_and_restore(k, [t])
    assert r.signal.group_stopped


def corrupt(data, find: bytes, replace: bytes):
    from ckptsim.image.codec import ImageWriter  # noqa: F401  (checksum recomputed below)
    import zlib
    from ckptsim.image import core
    pos = data.index(find)
    data = bytearray(data)
    data[pos:pos + len(replace)] = replace
    tail = len(data) - core.TAIL_SIZE
    magic, nr, _, pad = core.TAIL.struct.unpack_from(data, tail + 8)
    core.TAIL.struct.pack_into(data, tail + 8, magic, nr, zlib.crc32(data[:tail]), pad)
    return bytes(data)


def test_bad_images_are_refused():
    k, t = world()
    k.sigprocmask(t, SIG_BLOCK, sigmask(SIGUSR1))
    k.kill(k.init, k.observed_pid(t), SIGUSR1)
    buf = io.BytesIO()
    ctx = CheckpointContext(k, k.init, t, [t], buf, Log())
    ctx.ref(t.signal)
    ctx.writer.finish()
    data = buf.getvalue()
    good = ImageReader(data)
    RestartContext(k, k.init, good, Log()).peek()
    # Make the shared queue hold SIGUSR1 twice: impossible for a standard signal.
    import struct
    item = struct.pack("<IiiIQ", SIGUSR1, 0, 1, 0, 0)
    assert data.count(item) == 1
    bad_count = corrupt(data, struct.pack("<II", 1, 0) + item, struct.pack("<II", 2, 0))
    with pytest.raises(ImageError):
        RestartContext(k, k.init, ImageReader(bad_count), Log()).peek()


def test_enums_registered():
    from ckptsim.image.schema import ENUMS
    assert ENUMS["signal"][SIGUSR1] == "SIGUSR1" and ENUMS["sa_flags"][SA_RESTART] == "SA_RESTART"
    assert ENUMS["sigset"][1 << (SIGINT - 1)] == "SIGINT"


def test_full_checkpoint_restart_keeps_signal_state():
    from ckptsim.cr.api import checkpoint, restart_tasks
    from ckptsim.model.tasks_ops import CLONE_NEWPID, SIGKILL
    from ckptsim.tools.scenarios import CGROUP
    k = Kernel()
    k.mkdir(k.init, "/bin", 0o755)
    k.cgroup_create(k.init, CGROUP)
    root = k.spawn("/bin/loop", [[None, "set", 1, 1], [None, "jnz", 1, 0]], flags=CLONE_NEWPID)
    k.cgroup_attach(k.init, CGROUP, root.tid)
    k.sigaction(root, SIGUSR1, H, SA_ONSTACK)
    k.sigaction(root, SIGRTMIN, H)
    k.sigaltstack(root, (0x9000, 8192, 0))
    k.sigprocmask(root, SIG_BLOCK, sigmask(SIGUSR1, SIGRTMIN))
    for value in (7, 8):
        k.sigqueue(k.init, root.tid, SIGRTMIN, value)
    k.kill(k.init, root.tid, SIGUSR1)
    k.freeze(k.init, CGROUP)
    buf = io.BytesIO()
    checkpoint(k, k.init, root.tid, buf, 0)
    saved = (list(root.sighand.actions), root.sigstate.blocked,
             list(root.signal.shared_pending.items), root.sigstate.altstack)
    k.do_group_exit(root, SIGKILL)
    (r,) = restart_tasks(k, k.init, 0, buf.getvalue())
    assert (r.sighand.actions, r.sigstate.blocked, r.signal.shared_pending.items,
            r.sigstate.altstack) == saved
    k.sigprocmask(r, SIG_SETMASK, 0)
    k.deliver_signals(r)
    assert [o[2:] for o in k.output if o[0] == "signal"] == [
        (SIGUSR1, 0, "altstack"), (SIGRTMIN, 7, "stack"), (SIGRTMIN, 8, "stack")]

"""The credential kinds: CRED/GROUPINFO objects, TASK_CREDS, and restart's privilege rule."""
import errno
import io
from dataclasses import replace

import pytest

from ckptsim.cr.context import CheckpointContext, Log, RestartContext, RestartError
from ckptsim.image.codec import ImageReader
from ckptsim.kinds import creds as kcred
from ckptsim.model.creds import CAP_KILL, CAP_SETUID, CAP_SYS_ADMIN, Cred, cap_bit
from ckptsim.model.kernel import Kernel


def round_trip(k, tasks, caller=None):
    buf = io.BytesIO()
    ctx = CheckpointContext(k, k.init, tasks[0], tasks, buf, Log())
    for t in tasks:
        kcred.save_task_creds(ctx, t)
    ctx.writer.finish()
    rctx = RestartContext(k, caller or k.init, ImageReader(buf.getvalue()), Log())
    fresh = []
    for _ in tasks:
        f = type(tasks[0])(k, k.new_pid(k.root_ns), "restored")
        kcred.load_task_creds(rctx, f)
        fresh.append(f)
    return fresh, [r.name for r in ImageReader(buf.getvalue()).records()]


def test_creds_with_groups_round_trip_and_are_shared():
    k = Kernel()
    a, b, c = k.clone(k.init), k.clone(k.init), k.clone(k.init)
    a.cred = replace(Cred.user(1000, 100, groups=(4, 24, 27)), cap_inheritable=cap_bit(CAP_KILL),
                     cap_bounding=cap_bit(CAP_KILL) | cap_bit(CAP_SYS_ADMIN), securebits=0x10)
    b.cred = a.cred                                    # the same object (fork)
    c.cred = Cred.user(1000, 100, groups=(4, 24, 27))  # equal groups, other caps
    (ra, rb, rc), names = round_trip(k, [a, b, c])
    assert ra.cred == a.cred and rc.cred == c.cred
    assert ra.cred is rb.cred and rc.cred.groups == (4, 24, 27)
    assert names.count("CRED") == 2 and names.count("GROUPINFO") == 1
    assert names.count("TASK_CREDS") == 3


def test_equal_but_distinct_creds_are_merged():
    k = Kernel()
    a, b = k.clone(k.init), k.clone(k.init)
    a.cred, b.cred = Cred.user(5), Cred.user(5)
    assert a.cred is not b.cred
    (ra, rb), names = round_trip(k, [a, b])
    assert ra.cred is rb.cred and names.count("CRED") == 1


def test_restart_never_grants_more_than_the_caller_has():
    k = Kernel()
    user = k.clone(k.init)
    user.cred = Cred.user(1000, 1000)
    t = k.clone(k.init)
    for cred, ok in [
        (Cred.user(1000, 1000), True),
        (Cred.root(), False),
        (Cred.user(1001, 1000), False),
        (Cred.user(1000, 0), False),
        (Cred.user(1000, 1000, groups=(5,)), False),
        (replace(Cred.user(1000), cap_permitted=cap_bit(CAP_KILL)), False),
        (replace(Cred.user(1000), securebits=0x10), False),
    ]:
        t.cred = cred
        if ok:
            assert round_trip(k, [t], caller=user)[0][0].cred == cred
        else:
            with pytest.raises(RestartError) as e:
                round_trip(k, [t], caller=user)
            assert e.value.errno == errno.EPERM, cred
    # CAP_SETUID lets the caller take any uid, but not capabilities it lacks.
    setuid_caller = k.clone(k.init)
    setuid_caller.cred = replace(Cred.user(1000), cap_permitted=cap_bit(CAP_SETUID),
                                 cap_effective=cap_bit(CAP_SETUID))
    t.cred = Cred.user(7, 1000)
    assert round_trip(k, [t], caller=setuid_caller)[0][0].cred == t.cred


def test_root_caller_restores_anything():
    k = Kernel()
    t = k.clone(k.init)
    t.cred = replace(Cred.root(), groups=(1, 2), securebits=0x3)
    assert round_trip(k, [t])[0][0].cred == t.cred


def test_full_checkpoint_restart_keeps_creds():
    from ckptsim.cr.api import checkpoint, restart_tasks
    from ckptsim.model.tasks_ops import CLONE_NEWPID, SIGKILL
    from ckptsim.tools.scenarios import CGROUP
    k = Kernel()
    k.mkdir(k.init, "/bin", 0o755)
    k.cgroup_create(k.init, CGROUP)
    root = k.spawn("/bin/loop", [[None, "set", 1, 1], [None, "jnz", 1, 0]], flags=CLONE_NEWPID)
    k.cgroup_attach(k.init, CGROUP, root.tid)
    k.setgroups(root, [10, 20])
    k.setresuid(root, 1000, 1000, 0)
    child = k.clone(root)
    k.freeze(k.init, CGROUP)
    buf = io.BytesIO()
    checkpoint(k, k.init, root.tid, buf, 0)
    saved = root.cred
    k.do_group_exit(root, SIGKILL)
    tasks = restart_tasks(k, k.init, 0, buf.getvalue())
    assert tasks[0].cred == saved and tasks[1].cred is tasks[0].cred
    assert child.cred is saved
    k.sysctl["kernel.ckpt_unpriv_allowed"] = 2
    user = k.clone(k.init)
    user.cred = Cred.user(1000, 0)
    for t in tasks:
        k.do_group_exit(t, SIGKILL)
    with pytest.raises(RestartError) as e:  # suid 0 and groups 10,20: more than user has
        restart_tasks(k, user, 0, buf.getvalue())
    assert e.value.errno == errno.EPERM

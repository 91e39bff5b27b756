"""Credentials: the set*id permission rules, capability fix-ups, capset, ptrace/kill checks."""
import errno
from types import SimpleNamespace

import pytest

from ckptsim.errors import ModelError
from ckptsim.model.creds import (
    CAP_FULL_SET, CAP_KILL, CAP_SETGID, CAP_SETPCAP, CAP_SETUID, CAP_SYS_ADMIN, CAP_SYS_PTRACE,
    NGROUPS_MAX, SECBIT_KEEP_CAPS, SECBIT_KEEP_CAPS_LOCKED, SECBIT_NO_SETUID_FIXUP, Cred, CredOps,
    cap_bit, cap_mask, cap_names, may_kill, may_ptrace)
from dataclasses import replace


class Ops(CredOps):
    pass


ops = Ops()


def task(cred):
    return SimpleNamespace(cred=cred)


def errno_of(fn, *args):
    with pytest.raises(ModelError) as exc:
        fn(*args)
    return exc.value.errno


def test_root_and_user_constructors():
    root = Cred.root()
    assert root.uids() == (0, 0, 0, 0) and root.cap_effective == CAP_FULL_SET == (1 << 41) - 1
    assert root.has_cap(CAP_SYS_ADMIN)
    user = Cred.user(1000, 100, groups=(5, 3, 5))
    assert user.uids() == (1000,) * 4 and user.gids() == (100,) * 4
    assert user.groups == (3, 5, 5) and not user.has_cap(CAP_KILL)
    assert user.cap_bounding == CAP_FULL_SET
    assert user.in_group(5) and user.in_group(100) and not user.in_group(7)


def test_cred_is_immutable_and_hashable():
    c = Cred.user(1)
    with pytest.raises(Exception):
        c.uid = 0
    assert hash(c) == hash(Cred.user(1)) and c == Cred.user(1)


def test_cap_helpers():
    assert cap_bit(CAP_SYS_ADMIN) == 1 << 21
    assert cap_mask(CAP_KILL, CAP_SETUID) == (1 << 5) | (1 << 7)
    assert cap_names(cap_mask(CAP_KILL, CAP_SYS_PTRACE)) == ["CAP_KILL", "CAP_SYS_PTRACE"]


# -- setuid ---------------------------------------------------------------------------------
def test_setuid_root_drops_everything():
    t = task(Cred.root())
    old = t.cred
    ops.setuid(t, 1000)
    assert t.cred.uids() == (1000,) * 4
    assert t.cred.cap_permitted == 0 and t.cred.cap_effective == 0
    assert old.uid == 0  # the old object is untouched
    assert errno_of(ops.setuid, t, 0) == errno.EPERM


def test_setuid_keepcaps_keeps_permitted_clears_effective():
    t = task(Cred.root())
    ops.set_keepcaps(t, 1)
    ops.setuid(t, 1000)
    assert t.cred.cap_permitted == CAP_FULL_SET and t.cred.cap_effective == 0


def test_setuid_no_setuid_fixup():
    t = task(replace(Cred.root(), securebits=SECBIT_NO_SETUID_FIXUP))
    ops.setuid(t, 5)
    assert t.cred.cap_effective == CAP_FULL_SET


def test_setuid_unprivileged_to_saved_uid():
    t = task(Cred(uid=1000, euid=0, suid=0, fsuid=0))  # a setuid-root program, no caps
    ops.setuid(t, 1000)
    assert t.cred.uids() == (1000, 1000, 0, 1000)  # no CAP_SETUID: saved uid kept
    ops.setuid(t, 0)
    assert t.cred.euid == 0
    assert errno_of(ops.setuid, t, 7) == errno.EPERM


def test_setuid_invalid():
    t = task(Cred.root())
    assert errno_of(ops.setuid, t, -1) == errno.EINVAL
    assert errno_of(ops.setuid, t, 1 << 32) == errno.EINVAL


def test_regaining_euid0_raises_effective_to_permitted():
    t = task(Cred.root())
    ops.setresuid(t, -1, 1000, -1)  # suid stays 0: permitted kept, effective cleared
    assert t.cred.cap_permitted == CAP_FULL_SET and t.cred.cap_effective == 0
    assert not t.cred.has_cap(CAP_SETUID)
    ops.setresuid(t, -1, 0, -1)  # allowed: 0 is the real/saved uid
    assert t.cred.cap_effective == CAP_FULL_SET


# -- setreuid / setresuid ------------------------------------------------------------------
def test_setreuid_rules():
    t = task(Cred.user(1000))
    t.cred = replace(t.cred, suid=2000)
    assert errno_of(ops.setreuid, t, 2000, -1) == errno.EPERM  # ruid: only uid or euid
    ops.setreuid(t, -1, 2000)  # euid may be the saved uid
    assert (t.cred.uid, t.cred.euid, t.cred.suid, t.cred.fsuid) == (1000, 2000, 2000, 2000)
    ops.setreuid(t, 2000, 1000)  # swap
    assert (t.cred.uid, t.cred.euid, t.cred.suid) == (2000, 1000, 1000)
    assert errno_of(ops.setreuid, t, -1, 3) == errno.EPERM
    assert errno_of(ops.setreuid, t, -2, -1) == errno.EINVAL


def test_setreuid_euid_equal_ruid_keeps_suid():
    t = task(Cred(uid=1000, euid=2000, suid=2000, fsuid=2000))
    ops.setreuid(t, -1, 1000)
    assert (t.cred.euid, t.cred.suid) == (1000, 2000)


def test_setresuid_rules():
    t = task(Cred.user(1000))
    assert errno_of(ops.setresuid, t, 1, -1, -1) == errno.EPERM
    ops.setresuid(t, -1, -1, -1)
    assert t.cred == Cred.user(1000)
    root = task(Cred.root())
    ops.setresuid(root, 1, 2, 3)
    assert root.cred.uids() == (1, 2, 3, 2) and root.cred.cap_permitted == 0
    assert errno_of(ops.setresuid, root, 1, 2, 5) == errno.EPERM
    ops.setresuid(root, 3, 1, 2)  # permutations of the current ids are allowed
    assert root.cred.uids() == (3, 1, 2, 1)
    assert errno_of(ops.setresuid, root, -5, -1, -1) == errno.EINVAL


def test_cap_setuid_without_root():
    t = task(replace(Cred.user(1000), cap_permitted=cap_bit(CAP_SETUID),
                     cap_effective=cap_bit(CAP_SETUID)))
    ops.setuid(t, 5)
    assert t.cred.uids() == (5,) * 4 and t.cred.has_cap(CAP_SETUID)  # not root: no fix-up


# -- gids and groups --------------------------------------------------------------------------
def test_setgid_rules():
    t = task(Cred.user(1000, 100))
    assert errno_of(ops.setgid, t, 0) == errno.EPERM
    ops.setgid(t, 100)
    root = task(Cred.root())
    ops.setgid(root, 50)
    assert root.cred.gids() == (50,) * 4 and root.cred.cap_effective == CAP_FULL_SET
    assert errno_of(ops.setgid, root, -1) == errno.EINVAL


def test_setgid_unprivileged_to_saved():
    t = task(Cred(uid=1, euid=1, suid=1, fsuid=1, gid=100, egid=200, sgid=200, fsgid=200))
    ops.setgid(t, 100)
    assert t.cred.gids() == (100, 100, 200, 100)


def test_setregid_and_setresgid():
    t = task(Cred.user(1, 100))
    assert errno_of(ops.setregid, t, 5, -1) == errno.EPERM
    assert errno_of(ops.setresgid, t, -1, 5, -1) == errno.EPERM
    root = task(Cred.root())
    ops.setresgid(root, 1, 2, 3)
    assert root.cred.gids() == (1, 2, 3, 2)
    ops.setregid(root, 7, 8)
    assert root.cred.gids() == (7, 8, 8, 8)
    assert errno_of(ops.setregid, root, -3, -1) == errno.EINVAL


def test_setgroups():
    t = task(Cred.root())
    ops.setgroups(t, [30, 10, 20])
    assert t.cred.groups == (10, 20, 30) and ops.getgroups(t) == [10, 20, 30]
    ops.setgroups(t, [])
    assert t.cred.groups == ()
    assert errno_of(ops.setgroups, t, [-1]) == errno.EINVAL
    assert errno_of(ops.setgroups, t, range(NGROUPS_MAX + 1)) == errno.EINVAL
    user = task(Cred.user(5))
    assert errno_of(ops.setgroups, user, [1]) == errno.EPERM
    setgid_only = task(replace(Cred.user(5), cap_permitted=cap_bit(CAP_SETGID),
                               cap_effective=cap_bit(CAP_SETGID)))
    ops.setgroups(setgid_only, [9])
    assert setgid_only.cred.groups == (9,)


# -- capabilities -------------------------------------------------------------------------------
def test_capset_rules():
    t = task(Cred.root())
    full = CAP_FULL_SET
    ops.capset(t, cap_bit(CAP_KILL), full, 0)
    assert ops.capget(t) == (cap_bit(CAP_KILL), full, 0)
    assert errno_of(ops.capset, t, cap_bit(CAP_SYS_ADMIN) | 1 << 50, 1, 0) == errno.EPERM
    ops.capset(t, 0, cap_bit(CAP_KILL), 0)  # drop permitted
    assert errno_of(ops.capset, t, 0, full, 0) == errno.EPERM  # never regained
    assert errno_of(ops.capset, t, -1, 0, 0) == errno.EINVAL


def test_capset_inheritable_needs_setpcap_or_permitted():
    t = task(replace(Cred.user(1), cap_permitted=cap_bit(CAP_KILL), cap_effective=0))
    ops.capset(t, 0, cap_bit(CAP_KILL), cap_bit(CAP_KILL))
    assert errno_of(ops.capset, t, 0, cap_bit(CAP_KILL), cap_bit(CAP_SYS_ADMIN)) == errno.EPERM
    p = task(replace(Cred.user(1), cap_permitted=cap_bit(CAP_SETPCAP),
                     cap_effective=cap_bit(CAP_SETPCAP)))
    ops.capset(p, 0, 0, cap_bit(CAP_SYS_ADMIN))  # CAP_SETPCAP: any inheritable in bounding
    ops2 = task(replace(p.cred, cap_bounding=0, cap_permitted=cap_bit(CAP_SETPCAP),
                        cap_effective=cap_bit(CAP_SETPCAP), cap_inheritable=0))
    assert errno_of(ops.capset, ops2, 0, 0, cap_bit(CAP_KILL)) == errno.EPERM  # not in bounding


def test_capset_masks_unknown_bits():
    t = task(Cred.root())
    ops.capset(t, 1 << 60 | 1, CAP_FULL_SET | 1 << 60, 0)
    assert t.cred.cap_effective == 1


def test_keepcaps_and_bounding():
    t = task(replace(Cred.root(), securebits=SECBIT_KEEP_CAPS_LOCKED))
    assert errno_of(ops.set_keepcaps, t, 1) == errno.EPERM
    assert errno_of(ops.set_keepcaps, task(Cred.root()), 2) == errno.EINVAL
    r = task(Cred.root())
    ops.set_keepcaps(r, 1)
    assert r.cred.securebits == SECBIT_KEEP_CAPS
    ops.set_keepcaps(r, 0)
    assert r.cred.securebits == 0
    ops.capbset_drop(r, CAP_SYS_ADMIN)
    assert not r.cred.cap_bounding >> CAP_SYS_ADMIN & 1
    assert errno_of(ops.capbset_drop, r, 99) == errno.EINVAL
    assert errno_of(ops.capbset_drop, task(Cred.user(1)), 1) == errno.EPERM


def test_after_exec():
    assert Cred.root().after_exec() == Cred.root()
    user = replace(Cred.user(1), cap_permitted=5, cap_effective=5, securebits=SECBIT_KEEP_CAPS)
    after = user.after_exec()
    assert after.cap_permitted == after.cap_effective == 0 and after.securebits == 0
    bounded = replace(Cred.root(), cap_bounding=0b11)
    assert bounded.after_exec().cap_permitted == 0b11


# -- ptrace and kill permission -----------------------------------------------------------------
def test_may_ptrace():
    a, b = Cred.user(1000), Cred.user(1000)
    assert may_ptrace(a, b)
    assert not may_ptrace(a, Cred.user(1001))
    assert not may_ptrace(a, replace(b, suid=0))       # a setuid program
    assert not may_ptrace(a, replace(b, egid=5))
    assert not may_ptrace(a, replace(b, cap_permitted=1))  # more privileged target
    assert may_ptrace(Cred.root(), Cred.user(5))
    assert may_ptrace(replace(a, cap_effective=cap_bit(CAP_SYS_PTRACE)), Cred.root())
    assert not may_ptrace(a, Cred.root())


def test_may_kill():
    assert may_kill(Cred.user(1), Cred.user(1))
    assert not may_kill(Cred.user(1), Cred.user(2))
    assert may_kill(Cred(uid=2, euid=1, suid=1), Cred.user(1))
    assert may_kill(Cred.user(1), Cred(uid=2, euid=2, suid=1))  # target's saved uid
    assert not may_kill(Cred.user(1), Cred(uid=2, euid=1, suid=2))  # euid does not count
    assert may_kill(replace(Cred.user(1), cap_effective=cap_bit(CAP_KILL)), Cred.user(2))
    assert may_kill(Cred.root(), Cred.user(2))


def test_id_getters():
    t = task(Cred.user(1000, 100))
    assert (ops.getuid(t), ops.geteuid(t), ops.getgid(t), ops.getegid(t)) == (1000, 1000, 100, 100)
    t = task(Cred.root())
    ops.setresgid(t, 5, 6, 7)
    ops.setresuid(t, 1, 2, 3)
    assert (ops.getuid(t), ops.geteuid(t), ops.getgid(t), ops.getegid(t)) == (1, 2, 5, 6)

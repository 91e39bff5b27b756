"""Credentials: the immutable ``Cred`` and the set*id/setgroups/capset syscalls (``CredOps``).

A task's ``t.cred`` is a ``Cred``. Like Linux's ``struct cred`` it is never modified in place:
a syscall builds a new one (``dataclasses.replace``) and assigns ``t.cred``. Several tasks may
hold the very same object (fork shares it), which is what checkpoint keys objrefs on.

The permission rules and the capability fix-ups follow kernel/sys.c and
security/commoncap.c (``cap_emulate_setxuid``). Capability checks use the *effective* set,
like ``capable()``. There are no user namespaces: every check is against the initial one.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, replace

from ..errors import kerr

# Linux's capability numbers (include/uapi/linux/capability.h).
CAP_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
(CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID, CAP_KILL,
 CAP_SETGID, CAP_SETUID, CAP_SETPCAP, CAP_LINUX_IMMUTABLE, CAP_NET_BIND_SERVICE,
 CAP_NET_BROADCAST, CAP_NET_ADMIN, CAP_NET_RAW, CAP_IPC_LOCK, CAP_IPC_OWNER, CAP_SYS_MODULE,
 CAP_SYS_RAWIO, CAP_SYS_CHROOT, CAP_SYS_PTRACE, CAP_SYS_PACCT, CAP_SYS_ADMIN, CAP_SYS_BOOT,
 CAP_SYS_NICE, CAP_SYS_RESOURCE, CAP_SYS_TIME, CAP_SYS_TTY_CONFIG, CAP_MKNOD, CAP_LEASE,
 CAP_AUDIT_WRITE, CAP_AUDIT_CONTROL, CAP_SETFCAP, CAP_MAC_OVERRIDE, CAP_MAC_ADMIN, CAP_SYSLOG,
 CAP_WAKE_ALARM, CAP_BLOCK_SUSPEND, CAP_AUDIT_READ, CAP_PERFMON, CAP_BPF,
 CAP_CHECKPOINT_RESTORE) = range(len(CAP_NAMES))
CAP_LAST_CAP = len(CAP_NAMES) - 1
CAP_FULL_SET = (1 << (CAP_LAST_CAP + 1)) - 1

# include/uapi/linux/securebits.h
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS = 1 << 4
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECURE_ALL_BITS = 0x3F

NGROUPS_MAX = 65536
ID_MAX = (1 << 32) - 2      # (uid_t)-1 means "unchanged" and is never a valid id
UNCHANGED = -1


def cap_bit(cap: int) -> int:
    return 1 << cap


def cap_mask(*caps: int) -> int:
    out = 0
    for cap in caps:
        out |= 1 << cap
    return out


def _is_subset(small: int, big: int) -> bool:
    return small & ~big == 0


@dataclass(frozen=True)
class Cred:
    """One immutable set of credentials (Linux's ``struct cred`` minus keys/LSM/userns)."""

    uid: int = 0
    euid: int = 0
    suid: int = 0
    fsuid: int = 0
    gid: int = 0
    egid: int = 0
    sgid: int = 0
    fsgid: int = 0
    groups: tuple[int, ...] = ()
    cap_inheritable: int = 0
    cap_permitted: int = 0
    cap_effective: int = 0
    cap_bounding: int = CAP_FULL_SET
    securebits: int = 0

    def __post_init__(self) -> None:
        # Linux keeps supplementary groups sorted (groups_sort); duplicates are kept.
        if list(self.groups) != sorted(self.groups) or not isinstance(self.groups, tuple):
            object.__setattr__(self, "groups", tuple(sorted(self.groups)))

    @classmethod
    def root(cls) -> "Cred":
        """init's credentials: uid/gid 0 and every capability."""
        return cls(cap_permitted=CAP_FULL_SET, cap_effective=CAP_FULL_SET)

    @classmethod
    def user(cls, uid: int, gid: int | None = None, groups=()) -> "Cred":
        """An unprivileged user: no capabilities (the bounding set stays full)."""
        gid = uid if gid is None else gid
        return cls(uid=uid, euid=uid, suid=uid, fsuid=uid, gid=gid, egid=gid, sgid=gid,
                   fsgid=gid, groups=tuple(groups))

    def has_cap(self, cap: int) -> bool:
        """``capable(cap)``: checks the effective set."""
        return bool(self.cap_effective >> cap & 1)

    def in_group(self, gid: int) -> bool:
        """``in_group_p``: the fsgid or a supplementary group."""
        return gid == self.fsgid or gid in self.groups

    @property
    def keepcaps(self) -> bool:
        return bool(self.securebits & SECBIT_KEEP_CAPS)

    def uids(self) -> tuple[int, int, int, int]:
        return (self.uid, self.euid, self.suid, self.fsuid)

    def gids(self) -> tuple[int, int, int, int]:
        return (self.gid, self.egid, self.sgid, self.fsgid)

    def after_exec(self) -> "Cred":
        """Credentials after an execve of a file without set-id bits or file capabilities.

        Root (real or effective, unless SECBIT_NOROOT) regains the bounding set as permitted;
        anyone else's permitted set becomes empty (no file capabilities to inherit).
        Effective follows permitted only if the euid is 0. KEEP_CAPS is cleared by exec.
        """
        if not self.securebits & SECBIT_NOROOT and (self.uid == 0 or self.euid == 0):
            # pP' = (pI & fI) | (fP & bset) with root's notional full file sets.
            permitted = self.cap_inheritable | self.cap_bounding
        else:
            permitted = 0
        effective = permitted if self.euid == 0 and permitted else 0
        securebits = self.securebits & ~SECBIT_KEEP_CAPS
        return replace(self, suid=self.euid, fsuid=self.euid, sgid=self.egid,
                       fsgid=self.egid, cap_permitted=permitted, cap_effective=effective,
                       securebits=securebits)

    def describe(self) -> str:
        return (f"uid={self.uid}/{self.euid}/{self.suid}/{self.fsuid} "
                f"gid={self.gid}/{self.egid}/{self.sgid}/{self.fsgid} groups={list(self.groups)} "
                f"caps p={self.cap_permitted:#x} e={self.cap_effective:#x}")


def cap_names(mask: int) -> list[str]:
    """Names of the capabilities in ``mask`` (CAP_* order)."""
    return ["CAP_" + name for cap, name in enumerate(CAP_NAMES) if mask >> cap & 1]


def may_ptrace(tracer: Cred, target: Cred) -> bool:
    """PTRACE_MODE_ATTACH (``__ptrace_may_access`` + ``cap_ptrace_access_check``), 2010 rules.

    The tracer's real uid/gid must equal all of the target's real, effective and saved ids
    and the target's permitted set must be within the tracer's — or the tracer has
    CAP_SYS_PTRACE. (Tracing oneself is always allowed; callers check that before.)
    """
    if tracer.has_cap(CAP_SYS_PTRACE):
        return True
    same_ids = (tracer.uid == target.uid == target.euid == target.suid
                and tracer.gid == target.gid == target.egid == target.sgid)
    return same_ids and _is_subset(target.cap_permitted, tracer.cap_permitted)


def may_kill(sender: Cred, target: Cred) -> bool:
    """``kill_ok_by_cred``: sender's real or effective uid matches the target's real or saved
    uid, or the sender has CAP_KILL. (The SIGCONT-within-session exception is the caller's.)"""
    if sender.has_cap(CAP_KILL):
        return True
    return bool({sender.uid, sender.euid} & {target.uid, target.suid})


def _check_id(value: int, what: str) -> None:
    if value != UNCHANGED and not 0 <= value <= ID_MAX:
        raise kerr(errno.EINVAL, f"invalid {what} {value}")


def fix_caps_for_setuid(old: Cred, new: Cred) -> Cred:
    """``cap_emulate_setxuid``: capabilities follow uid transitions away from / to root.

    Leaving root in all of uid/euid/suid clears permitted and effective unless KEEP_CAPS;
    leaving euid 0 clears effective; gaining euid 0 raises effective to permitted.
    """
    if old.securebits & SECBIT_NO_SETUID_FIXUP:
        return new
    permitted, effective = new.cap_permitted, new.cap_effective
    old_had_root = 0 in (old.uid, old.euid, old.suid)
    new_has_root = 0 in (new.uid, new.euid, new.suid)
    if old_had_root and not new_has_root and not old.keepcaps:
        permitted = effective = 0
    if old.euid == 0 and new.euid != 0:
        effective = 0
    if old.euid != 0 and new.euid == 0:
        effective = permitted
    return replace(new, cap_permitted=permitted, cap_effective=effective)


def _setxuid(old: Cred, **ids) -> Cred:
    return fix_caps_for_setuid(old, replace(old, **ids))


class CredOps:
    """Credential syscalls. Each takes the calling task ``t`` and replaces ``t.cred``."""

    # -- uids ---------------------------------------------------------------------------
    def setuid(self, t, uid: int) -> int:
        old: Cred = t.cred
        if uid == UNCHANGED:
            raise kerr(errno.EINVAL, "setuid(-1)")
        _check_id(uid, "uid")
        if old.has_cap(CAP_SETUID):
            new = _setxuid(old, uid=uid, euid=uid, suid=uid, fsuid=uid)
        elif uid in (old.uid, old.suid):
            new = _setxuid(old, euid=uid, fsuid=uid)
        else:
            raise kerr(errno.EPERM, f"setuid({uid}) needs CAP_SETUID ({old.describe()})")
        t.cred = new
        return 0

    def setreuid(self, t, ruid: int, euid: int) -> int:
        old: Cred = t.cred
        _check_id(ruid, "ruid")
        _check_id(euid, "euid")
        privileged = old.has_cap(CAP_SETUID)
        new_uid, new_euid = old.uid, old.euid
        if ruid != UNCHANGED:
            if not privileged and ruid not in (old.uid, old.euid):
                raise kerr(errno.EPERM, f"setreuid: ruid {ruid} not allowed")
            new_uid = ruid
        if euid != UNCHANGED:
            if not privileged and euid not in (old.uid, old.euid, old.suid):
                raise kerr(errno.EPERM, f"setreuid: euid {euid} not allowed")
            new_euid = euid
        new_suid = old.suid
        # The saved uid follows the new euid when the real uid is set or euid != old ruid.
        if ruid != UNCHANGED or (euid != UNCHANGED and euid != old.uid):
            new_suid = new_euid
        t.cred = _setxuid(old, uid=new_uid, euid=new_euid, suid=new_suid, fsuid=new_euid)
        return 0

    def setresuid(self, t, ruid: int, euid: int, suid: int) -> int:
        old: Cred = t.cred
        for value, what in ((ruid, "ruid"), (euid, "euid"), (suid, "suid")):
            _check_id(value, what)
        if not old.has_cap(CAP_SETUID):
            allowed = (old.uid, old.euid, old.suid)
            for value, what in ((ruid, "ruid"), (euid, "euid"), (suid, "suid")):
                if value != UNCHANGED and value not in allowed:
                    raise kerr(errno.EPERM, f"setresuid: {what} {value} not allowed")
        new_uid = old.uid if ruid == UNCHANGED else ruid
        new_euid = old.euid if euid == UNCHANGED else euid
        new_suid = old.suid if suid == UNCHANGED else suid
        t.cred = _setxuid(old, uid=new_uid, euid=new_euid, suid=new_suid, fsuid=new_euid)
        return 0

    # -- gids (no capability fix-ups) -----------------------------------------------------
    def setgid(self, t, gid: int) -> int:
        old: Cred = t.cred
        if gid == UNCHANGED:
            raise kerr(errno.EINVAL, "setgid(-1)")
        _check_id(gid, "gid")
        if old.has_cap(CAP_SETGID):
            t.cred = replace(old, gid=gid, egid=gid, sgid=gid, fsgid=gid)
        elif gid in (old.gid, old.sgid):
            t.cred = replace(old, egid=gid, fsgid=gid)
        else:
            raise kerr(errno.EPERM, f"setgid({gid}) needs CAP_SETGID")
        return 0

    def setregid(self, t, rgid: int, egid: int) -> int:
        old: Cred = t.cred
        _check_id(rgid, "rgid")
        _check_id(egid, "egid")
        privileged = old.has_cap(CAP_SETGID)
        new_gid, new_egid = old.gid, old.egid
        if rgid != UNCHANGED:
            if not privileged and rgid not in (old.gid, old.egid):
                raise kerr(errno.EPERM, f"setregid: rgid {rgid} not allowed")
            new_gid = rgid
        if egid != UNCHANGED:
            if not privileged and egid not in (old.gid, old.egid, old.sgid):
                raise kerr(errno.EPERM, f"setregid: egid {egid} not allowed")
            new_egid = egid
        new_sgid = old.sgid
        if rgid != UNCHANGED or (egid != UNCHANGED and egid != old.gid):
            new_sgid = new_egid
        t.cred = replace(old, gid=new_gid, egid=new_egid, sgid=new_sgid, fsgid=new_egid)
        return 0

    def setresgid(self, t, rgid: int, egid: int, sgid: int) -> int:
        old: Cred = t.cred
        for value, what in ((rgid, "rgid"), (egid, "egid"), (sgid, "sgid")):
            _check_id(value, what)
        if not old.has_cap(CAP_SETGID):
            allowed = (old.gid, old.egid, old.sgid)
            for value, what in ((rgid, "rgid"), (egid, "egid"), (sgid, "sgid")):
                if value != UNCHANGED and value not in allowed:
                    raise kerr(errno.EPERM, f"setresgid: {what} {value} not allowed")
        new_egid = old.egid if egid == UNCHANGED else egid
        t.cred = replace(old, gid=old.gid if rgid == UNCHANGED else rgid, egid=new_egid,
                         sgid=old.sgid if sgid == UNCHANGED else sgid, fsgid=new_egid)
        return 0

    def setgroups(self, t, groups) -> int:
        old: Cred = t.cred
        groups = list(groups)
        if len(groups) > NGROUPS_MAX:
            raise kerr(errno.EINVAL, f"{len(groups)} groups > NGROUPS_MAX")
        for gid in groups:
            if not 0 <= gid <= ID_MAX:
                raise kerr(errno.EINVAL, f"invalid gid {gid}")
        if not old.has_cap(CAP_SETGID):
            raise kerr(errno.EPERM, "setgroups needs CAP_SETGID")
        t.cred = replace(old, groups=tuple(sorted(groups)))
        return 0

    def getgroups(self, t) -> list[int]:
        return list(t.cred.groups)

    # -- id queries (ints, so that programs can check them) ---------------------------------
    def getuid(self, t) -> int:
        return t.cred.uid

    def geteuid(self, t) -> int:
        return t.cred.euid

    def getgid(self, t) -> int:
        return t.cred.gid

    def getegid(self, t) -> int:
        return t.cred.egid

    # -- capabilities ----------------------------------------------------------------------
    def capget(self, t) -> tuple[int, int, int]:
        """(effective, permitted, inheritable) of the calling task."""
        c: Cred = t.cred
        return (c.cap_effective, c.cap_permitted, c.cap_inheritable)

    def capset(self, t, effective: int, permitted: int, inheritable: int) -> int:
        """``cap_capset`` on the calling task. Unknown high bits are dropped, as Linux does."""
        old: Cred = t.cred
        if min(effective, permitted, inheritable) < 0:
            raise kerr(errno.EINVAL, "negative capability mask")
        effective &= CAP_FULL_SET
        permitted &= CAP_FULL_SET
        inheritable &= CAP_FULL_SET
        if (not old.has_cap(CAP_SETPCAP)
                and not _is_subset(inheritable, old.cap_inheritable | old.cap_permitted)):
            raise kerr(errno.EPERM, "new inheritable outside inheritable|permitted")
        if not _is_subset(inheritable, old.cap_inheritable | old.cap_bounding):
            raise kerr(errno.EPERM, "new inheritable outside the bounding set")
        if not _is_subset(permitted, old.cap_permitted):
            raise kerr(errno.EPERM, "permitted set can only shrink")
        if not _is_subset(effective, permitted):
            raise kerr(errno.EPERM, "effective set must be within permitted")
        t.cred = replace(old, cap_effective=effective, cap_permitted=permitted,
                         cap_inheritable=inheritable)
        return 0

    def set_keepcaps(self, t, keep: int) -> int:
        """prctl(PR_SET_KEEPCAPS)."""
        old: Cred = t.cred
        if keep not in (0, 1):
            raise kerr(errno.EINVAL, f"PR_SET_KEEPCAPS {keep}")
        if old.securebits & SECBIT_KEEP_CAPS_LOCKED:
            raise kerr(errno.EPERM, "SECBIT_KEEP_CAPS_LOCKED")
        bits = (old.securebits | SECBIT_KEEP_CAPS) if keep else (old.securebits & ~SECBIT_KEEP_CAPS)
        t.cred = replace(old, securebits=bits)
        return 0

    def capbset_drop(self, t, cap: int) -> int:
        """prctl(PR_CAPBSET_DROP): needs CAP_SETPCAP."""
        old: Cred = t.cred
        if not 0 <= cap <= CAP_LAST_CAP:
            raise kerr(errno.EINVAL, f"no capability {cap}")
        if not old.has_cap(CAP_SETPCAP):
            raise kerr(errno.EPERM, "PR_CAPBSET_DROP needs CAP_SETPCAP")
        t.cred = replace(old, cap_bounding=old.cap_bounding & ~cap_bit(cap))
        return 0

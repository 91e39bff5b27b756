"""Conformance scenarios: creds (uids and gids, saved ids, supplementary groups, capabilities,
keepcaps). Ids are read back with getuid/geteuid/getgid/getegid; what cannot be read directly
(saved ids, permitted capabilities, groups) is checked through what it allows and refuses."""
import errno

from ..dsl import *  # noqa: F401,F403
from ..scenario import scenario  # noqa: F401

U64 = (1 << 64) - 1
UNCHANGED = -1
CAP_KILL, CAP_SETGID, CAP_SETUID = 5, 6, 7


def neg(err: int) -> int:
    return (-err) & U64


def _tmp(p):
    """One result register per program, reused by every check (a program has 14)."""
    if not hasattr(p, "_creds_tmp"):
        p._creds_tmp = p.reg()
    return p._creds_tmp


def ok(p, call: tuple, label: str) -> None:
    """The syscall ``call`` (name, args...) succeeds with 0."""
    p.raw(_tmp(p), *call)
    p.check(_tmp(p), "==", 0, label)


def fails(p, call: tuple, err: int, label: str) -> None:
    """The syscall ``call`` fails with ``err``."""
    p.raw(_tmp(p), *call)
    p.check(_tmp(p), "==", neg(err), label)


def check_ids(p, uid: int, euid: int, gid: int, egid: int, who: str) -> None:
    for name, want in (("getuid", uid), ("geteuid", euid), ("getgid", gid), ("getegid", egid)):
        p.raw(_tmp(p), name)
        p.check(_tmp(p), "==", want, f"{who}: {name}")


@scenario("creds", "setresuid/setresgid to distinct non-root ids before the point: real and "
                   "effective ids read back, saved ids still allow (and others refuse) a switch")
def creds_setresuid(p):
    ok(p, ("setresgid", 100, 200, 300), "setresgid(100, 200, 300)")
    ok(p, ("setresuid", 1000, 2000, 3000), "setresuid(1000, 2000, 3000)")
    p.ckpt()
    check_ids(p, 1000, 2000, 100, 200, "after restart")
    fails(p, ("setresuid", UNCHANGED, 4000, UNCHANGED), errno.EPERM, "euid 4000 is none of ours")
    ok(p, ("setresuid", UNCHANGED, 3000, UNCHANGED), "euid 3000: the saved uid")
    fails(p, ("setresgid", UNCHANGED, 400, UNCHANGED), errno.EPERM, "egid 400 is none of ours")
    ok(p, ("setresgid", UNCHANGED, 300, UNCHANGED), "egid 300: the saved gid")
    check_ids(p, 1000, 3000, 100, 300, "after switching to the saved ids")


@scenario("creds", "supplementary groups: a uid-1000 task reads a file of group 500 only through "
                   "its supplementary groups after restart, and may not change them")
def creds_groups(p):
    ok(p, ("setresgid", 500, 500, 500), "setresgid(500)")
    fd = p.open("/data/grp", O_WRONLY | O_CREAT | O_TRUNC, 0o640)  # owner 0, group 500, rw-r-----
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    p.write_text(fd, buf, "secret")
    p.do("close", fd)
    ok(p, ("setgroups", [500, 600]), "setgroups([500, 600])")
    ok(p, ("setresgid", 100, 100, 100), "setresgid(100)")
    ok(p, ("setresuid", 1000, 1000, 1000), "setresuid(1000)")
    p.ckpt()
    check_ids(p, 1000, 1000, 100, 100, "after restart")
    rd = p.open("/data/grp", O_RDONLY)
    p.check(rd, "<", 1 << 20, "group 500 (supplementary) may read the file")
    p.read_check(rd, buf, "secret", "the file read through group membership")
    fails(p, ("open", "/data/grp", O_WRONLY), errno.EACCES, "the group may not write")
    fails(p, ("setgroups", []), errno.EPERM, "an unprivileged task may not change its groups")


@scenario("creds", "capabilities dropped by setuid(1000) stay dropped after restart")
def creds_dropped_caps(p):
    ok(p, ("setgid", 1000), "setgid(1000)")
    ok(p, ("setuid", 1000), "setuid(1000)")
    p.ckpt()
    check_ids(p, 1000, 1000, 1000, 1000, "after restart")
    fails(p, ("setuid", 0), errno.EPERM, "setuid(0) after the capabilities were dropped")
    fails(p, ("setgid", 0), errno.EPERM, "setgid(0) after the capabilities were dropped")
    fails(p, ("capset", 1 << CAP_SETUID, 1 << CAP_SETUID, 0), errno.EPERM,
          "the permitted set cannot grow back")
    ok(p, ("setuid", 1000), "setuid to its own uid is allowed")


@scenario("creds", "KEEP_CAPS set before the point still applies after restart: leaving root "
                   "keeps the permitted set, so CAP_SETUID can be raised again")
def creds_keepcaps_flag(p):
    ok(p, ("set_keepcaps", 1), "PR_SET_KEEPCAPS 1")
    p.ckpt()
    ok(p, ("setresuid", 1000, 1000, 1000), "leave root with KEEP_CAPS")
    check_ids(p, 1000, 1000, 0, 0, "after leaving root")
    fails(p, ("setuid", 0), errno.EPERM, "the effective set was cleared")
    ok(p, ("capset", 1 << CAP_SETUID, 1 << CAP_SETUID, 0),
       "CAP_SETUID raised from the kept permitted set")
    ok(p, ("setuid", 0), "setuid(0) with CAP_SETUID")
    check_ids(p, 0, 0, 0, 0, "back to root")


@scenario("creds", "a permitted set kept by KEEP_CAPS across setresuid(1000) before the point "
                   "is restored: effective empty, permitted full")
def creds_keepcaps_permitted(p):
    ok(p, ("set_keepcaps", 1), "PR_SET_KEEPCAPS 1")
    ok(p, ("setresuid", 1000, 1000, 1000), "leave root with KEEP_CAPS")
    p.ckpt()
    check_ids(p, 1000, 1000, 0, 0, "after restart")
    fails(p, ("setuid", 0), errno.EPERM, "the effective set is empty after restart")
    ok(p, ("capset", (1 << CAP_SETUID) | (1 << CAP_SETGID), (1 << CAP_SETUID) | (1 << CAP_SETGID), 0),
       "CAP_SETUID and CAP_SETGID raised from the restored permitted set")
    ok(p, ("setgid", 7), "setgid(7) with CAP_SETGID")
    ok(p, ("setuid", 0), "setuid(0) with CAP_SETUID")
    check_ids(p, 0, 0, 7, 7, "after regaining root")


@scenario("creds", "a reduced capability set (capset before the point): what is kept works, "
                   "what was dropped is refused, and the permitted set cannot grow")
def creds_capset_reduced(p):
    keep = (1 << CAP_KILL) | (1 << CAP_SETGID)
    ok(p, ("capset", keep, keep, 0), "capset to CAP_KILL|CAP_SETGID")
    p.ckpt()
    check_ids(p, 0, 0, 0, 0, "after restart")
    fails(p, ("setuid", 5), errno.EPERM, "CAP_SETUID was dropped")
    fails(p, ("capset", keep | (1 << CAP_SETUID), keep | (1 << CAP_SETUID), 0), errno.EPERM,
          "the permitted set cannot grow")
    ok(p, ("setgid", 5), "CAP_SETGID was kept")
    check_ids(p, 0, 0, 5, 5, "after setgid(5)")


@scenario("creds", "a parent and its child with different credentials: each keeps its own "
                   "after restart")
def creds_per_task(p):
    kid = p.fork()
    with p.child(kid):
        ok(p, ("setresgid", 2000, 2000, 2000), "child: setresgid(2000)")
        ok(p, ("setresuid", 2000, 2000, 2000), "child: setresuid(2000)")
        p.ckpt()
        check_ids(p, 2000, 2000, 2000, 2000, "the child")
        fails(p, ("setuid", 0), errno.EPERM, "the child has no CAP_SETUID")
    ok(p, ("setresuid", 0, 1500, 0), "the parent: euid 1500, saved root")
    p.ckpt()
    check_ids(p, 0, 1500, 0, 0, "the parent")
    ok(p, ("setresuid", UNCHANGED, 0, UNCHANGED), "the parent regains euid 0")
    ok(p, ("setuid", 42), "the parent, root again, may setuid(42)")
    check_ids(p, 42, 42, 0, 0, "the parent after setuid(42)")
    p.wait_child(kid)

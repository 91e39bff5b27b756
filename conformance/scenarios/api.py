"""Conformance scenarios: api (the Linux-CR API rules: SUBTREE checkpoints, leaks and unfrozen
trees refused with EBUSY, EPERM per kernel.ckpt_unpriv_allowed, self-checkpoint return values,
RESTART_FROZEN, RESTART_GHOST, RESTART_TASKSELF).

A scenario whose checkpoint must fail (``expect_errno``) still checks after its point that the
tree runs on unharmed."""
import errno

from ckptsim.image.core import (CHECKPOINT_SUBTREE, RESTART_FROZEN, RESTART_GHOST,
                                RESTART_TASKSELF)

from ..dsl import *  # noqa: F401,F403
from ..dsl import Reg, STATUS_REG
from ..scenario import scenario  # noqa: F401

U64 = (1 << 64) - 1
LEAK_FD = 10
SELF_IMAGE = "/tmp/self.img"


def neg(err: int) -> int:
    return (-err) & U64


def small_tree(p, tag: str, folder: str = "/data") -> None:
    """An init and a child sharing a pipe and a file: the child keeps its pid and parent and
    reads what the init wrote before the point; the init keeps its memory and file offset."""
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    fd = p.open(f"{folder}/{tag}", O_RDWR | O_CREAT | O_TRUNC, 0o644)
    p.write_text(fd, buf, "0123456789")
    p.do("lseek", fd, 4, 0)
    r, w = p.pipe()
    me, tmp = p.reg(), p.reg()
    kid = p.fork()
    with p.child(kid):
        p.raw(me, "getpid")
        p.ckpt()
        p.raw(tmp, "getpid")
        p.check(tmp, "==", me, "the child keeps its pid")
        p.raw(tmp, "getppid")
        p.check(tmp, "==", 1, "the child's parent is the init")
        p.read_check(r, buf, "ping", "the child reads the pipe")
        p.exit(3)
    p.write_text(w, buf, "ping")
    p.store(buf, f"init-{tag}")
    p.ckpt()
    p.check_mem(buf, f"init-{tag}", "the init's memory")
    p.raw(tmp, "lseek", fd, 0, 1)  # SEEK_CUR
    p.check(tmp, "==", 4, "the file offset")
    p.raw(tmp, "getpid")
    p.check(tmp, "==", 1, "the init is pid 1")
    p.raw(tmp, "wait4", kid)
    p.check(tmp, "==", kid, "the init reaps its child")
    p.check(Reg(STATUS_REG), "==", 3 << 8, "the child's exit status")


def become_user(p, uid: int) -> str:
    """Make a directory the user may write in, then drop every id to ``uid`` (and every
    capability); returns the directory."""
    folder = f"/data/u{uid}"
    res = p.call("umask", 0)
    p.raw(res, "mkdir", folder, 0o777)
    p.check(res, "==", 0, f"mkdir {folder}")
    p.raw(res, "setresgid", uid, uid, uid)
    p.check(res, "==", 0, f"setresgid({uid})")
    p.raw(res, "setresuid", uid, uid, uid)
    p.check(res, "==", 0, f"setresuid({uid})")
    return folder


@scenario("api", "CHECKPOINT_SUBTREE of a container tree: no leak detection, restarts the same",
          checkpoint_flags=CHECKPOINT_SUBTREE)
def api_subtree(p):
    small_tree(p, "subtree")


@scenario("api", "a container whose file is also referenced from outside (a leak) is refused "
                 "with EBUSY; the tree runs on", leak=LEAK_FD, expect_errno=errno.EBUSY)
def api_leak_ebusy(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    fd = p.open("/data/leak", O_RDWR | O_CREAT | O_TRUNC, 0o644)
    p.write_text(fd, buf, "leaky")
    got = p.call("dup2", fd, LEAK_FD)
    p.check(got, "==", LEAK_FD, "dup2 to the leaked fd number")
    p.ckpt()
    p.raw(got, "lseek", LEAK_FD, 0, 1)
    p.check(got, "==", 5, "the leaked fd's offset")
    p.raw(got, "pread", LEAK_FD, buf, 5, 0)
    p.check_mem(buf, "leaky", "the leaked file's contents")


@scenario("api", "CHECKPOINT_SUBTREE does no leak detection: a file referenced from outside does "
                 "not stop it", leak=LEAK_FD, checkpoint_flags=CHECKPOINT_SUBTREE)
def api_subtree_leak_allowed(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    fd = p.open("/data/leak2", O_RDWR | O_CREAT | O_TRUNC, 0o644)
    p.write_text(fd, buf, "leaky")
    got = p.call("dup2", fd, LEAK_FD)
    p.check(got, "==", LEAK_FD, "dup2 to the leaked fd number")
    p.ckpt()
    p.raw(got, "lseek", LEAK_FD, 0, 1)
    p.check(got, "==", 5, "the fd's offset after restart")
    p.raw(got, "pread", LEAK_FD, buf, 5, 0)
    p.check_mem(buf, "leaky", "the file's contents after restart")


@scenario("api", "a container that is not frozen is refused with EBUSY; the tree runs on",
          freeze=False, expect_errno=errno.EBUSY)
def api_unfrozen_ebusy(p):
    small_tree(p, "unfrozen")


@scenario("api", "kernel.ckpt_unpriv_allowed=0: an unprivileged user may not checkpoint even its "
                 "own tree (EPERM); the tree runs on",
          unpriv_level=0, caller_uid=1000, expect_errno=errno.EPERM)
def api_unpriv_level0_eperm(p):
    small_tree(p, "level0", become_user(p, 1000))


@scenario("api", "an unprivileged user may not checkpoint a tree it may not ptrace (root's): EPERM",
          unpriv_level=2, caller_uid=1000, expect_errno=errno.EPERM)
def api_unpriv_ptrace_eperm(p):
    small_tree(p, "ptrace")


@scenario("api", "kernel.ckpt_unpriv_allowed=2: an unprivileged user checkpoints and restarts "
                 "its own tree", unpriv_level=2, caller_uid=1000)
def api_unpriv_level2_user(p):
    small_tree(p, "level2", become_user(p, 1000))
    got = p.call("getuid")
    p.check(got, "==", 1000, "the restored tree still runs as uid 1000")


@scenario("api", "kernel.ckpt_unpriv_allowed=1: an unprivileged user checkpoints its own tree, "
                 "but its restart is refused with EPERM and creates nothing; the tree runs on",
          unpriv_level=1, caller_uid=1000, expect_restart_errno=errno.EPERM)
def api_unpriv_level1_restart_eperm(p):
    small_tree(p, "level1", become_user(p, 1000))


@scenario("api", "a self-checkpoint: checkpoint() returns the crid in the original run and 0 in "
                 "the restarted one, which resumes with the state of the checkpoint moment",
          self_image=SELF_IMAGE)
def api_self_checkpoint(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    fd = p.open("/data/self", O_RDWR | O_CREAT | O_TRUNC, 0o644)
    p.write_text(fd, buf, "abcdef")
    p.store(buf, "at-checkpoint")
    crid = p.call("checkpoint", 0, SELF_IMAGE, CHECKPOINT_SUBTREE)
    original, restarted, end = p.label(), p.label(), p.label()
    p.jnz(crid, original)
    p.jump(restarted)
    p.place(original)
    # an error is -errno as an unsigned 64-bit value; a crid is any smaller number
    p.check(crid, "<", (1 << 64) - 4096, "the self-checkpoint returns a crid, not an error")
    p.store(buf, "after-the-call")   # later than the image: a restart must not see it
    p.do("lseek", fd, 1, 0)
    p.ckpt()                         # the original waits here and is killed
    p.check(crid, "==", 0, "the restarted task took the original's branch (checkpoint "
                           "returned non-zero after restart)")
    p.jump(end)
    p.place(restarted)
    tmp = p.call("getpid")
    p.check(tmp, "==", 1, "the restarted task is the container init")
    p.check_mem(buf, "at-checkpoint", "memory as it was when checkpoint() was called")
    p.raw(tmp, "lseek", fd, 0, 1)
    p.check(tmp, "==", 6, "the file offset as it was when checkpoint() was called")
    p.place(end)


@scenario("api", "RESTART_FROZEN: the restored tree starts frozen, then runs once thawed",
          restart_flags=RESTART_FROZEN)
def api_restart_frozen(p):
    small_tree(p, "frozen")


@scenario("api", "RESTART_GHOST: the restarting task exits once the tree is restored; the tree "
                 "runs on", restart_flags=RESTART_GHOST)
def api_restart_ghost(p):
    small_tree(p, "ghost")


@scenario("api", "RESTART_TASKSELF: the restarting task itself becomes the image's one task",
          restart_flags=RESTART_TASKSELF)
def api_restart_taskself(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    fd = p.open("/data/taskself", O_RDWR | O_CREAT | O_TRUNC, 0o644)
    p.write_text(fd, buf, "0123456789")
    p.do("lseek", fd, 3, 0)
    r, w = p.pipe()
    p.write_text(w, buf, "queued")
    p.store(buf, "taskself")
    p.ckpt()
    p.check_mem(buf, "taskself", "memory")
    tmp = p.call("lseek", fd, 0, 1)
    p.check(tmp, "==", 3, "the file offset")
    p.read_check(r, buf, "queued", "the pipe's data")

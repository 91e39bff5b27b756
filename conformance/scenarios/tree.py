"""Conformance scenarios: tree (process trees: deep, wide, zombies, orphans, sessions and process
groups, threads, nested pid namespaces, repeated checkpoints, a task blocked in wait4).

Registers are per task and fork copies them, so these programs reuse a few fixed registers at
every level of a tree (``p.raw(reg, ...)``) instead of allocating one per call.
"""
import errno

from ..dsl import *  # noqa: F401,F403
from ..dsl import Reg, STATUS_REG
from ..scenario import scenario  # noqa: F401

U64 = (1 << 64) - 1
WNOHANG = 1
SIGTERM = 15
CLONE_THREAD_FLAGS = 0x10f00  # CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD
CLONE_NEWPID = 0x20000000


def neg(err: int) -> int:
    """-errno as a failing syscall leaves it in a register."""
    return (-err) & U64


def reap(p, pid_reg, tmp, status: int, label: str, signal: int = 0) -> None:
    """wait4(pid) into ``tmp``: the reaped pid must be ``pid_reg`` and the wait status the exit
    ``status`` (or death by ``signal``)."""
    p.raw(tmp, "wait4", pid_reg)
    p.check(tmp, "==", pid_reg, f"{label}: wait4 returns its pid")
    want = signal if signal else (status & 0xFF) << 8
    p.check(Reg(STATUS_REG), "==", want, f"{label}: wait status")


def check_ids(p, tmp, me, parent, label: str) -> None:
    """getpid/getppid after the point equal what they were before it."""
    p.raw(tmp, "getpid")
    p.check(tmp, "==", me, f"{label}: getpid unchanged")
    p.raw(tmp, "getppid")
    p.check(tmp, "==", parent, f"{label}: getppid unchanged")


@scenario("tree", "a chain of 6 forks: every level keeps its pid and parent, and reaps its child "
                  "with the child's own exit status")
def tree_deep(p):
    me, parent, child, tmp = p.reg(), p.reg(), p.reg(), p.reg()
    depth = 6

    def level(d: int) -> None:
        p.raw(me, "getpid")
        p.raw(parent, "getppid")
        if d < depth:
            p.raw(child, "fork")
            with p.child(child):
                level(d + 1)
        p.ckpt()
        check_ids(p, tmp, me, parent, f"level {d}")
        if d < depth:
            reap(p, child, tmp, 10 + d + 1, f"level {d} reaps level {d + 1}")
        if d == 0:
            p.raw(tmp, "getpid")
            p.check(tmp, "==", 1, "the container init is pid 1")
        else:
            p.exit(10 + d)

    level(0)


@scenario("tree", "a container init with 8 children, each with its own exit status")
def tree_wide(p):
    me, tmp = p.reg(), p.reg()
    kids = []
    for i in range(8):
        kid = p.reg()
        kids.append(kid)
        p.raw(kid, "fork")
        with p.child(kid):
            p.raw(me, "getpid")
            p.ckpt()
            check_ids(p, tmp, me, 1, f"child {i}")
            p.exit(20 + i)
    p.ckpt()
    for i, kid in enumerate(kids):
        reap(p, kid, tmp, 20 + i, f"child {i}")
    p.raw(tmp, "wait4", -1, WNOHANG)
    p.check(tmp, "==", neg(errno.ECHILD), "no child is left")


@scenario("tree", "two zombies at the checkpoint (one exited with 7, one killed by SIGTERM): "
                  "the parent reaps them after restart with their statuses")
def tree_zombies(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    r, w = p.pipe()
    exited = p.fork()
    with p.child(exited):
        p.exit(7)
    killed = p.fork()
    with p.child(killed):
        p.do("read", r, buf, 1)  # blocks: nobody writes; SIGTERM ends it
        p.exit(3)
    p.do("kill", killed, SIGTERM)
    p.ckpt()
    tmp = p.reg()
    reap(p, exited, tmp, 7, "exited zombie")
    reap(p, killed, tmp, 0, "killed zombie", signal=SIGTERM)
    p.raw(tmp, "wait4", -1, WNOHANG)
    p.check(tmp, "==", neg(errno.ECHILD), "no child is left")


@scenario("tree", "an orphan: a grandchild whose parent exited before the point is the container "
                  "init's child after restart (getppid 1) and the init reaps it")
def tree_orphan(p):
    me, tmp = p.reg(), p.reg()
    middle = p.fork()
    with p.child(middle):
        grandchild = p.fork()
        with p.child(grandchild):
            p.raw(me, "getpid")
            p.ckpt()
            p.raw(tmp, "getppid")
            p.check(tmp, "==", 1, "the orphan's parent is the container init")
            p.raw(tmp, "getpid")
            p.check(tmp, "==", me, "the orphan keeps its pid")
            p.exit(5)
        p.exit(0)
    p.wait_child(middle, 0, "the middle task")
    p.ckpt()
    got = p.call("wait4", -1)
    p.check(got, ">", 1, "the init reaps the orphan")
    p.check(got, "!=", middle, "the orphan is not the middle task")
    p.check(Reg(STATUS_REG), "==", 5 << 8, "the orphan's exit status")
    p.raw(tmp, "wait4", -1, WNOHANG)
    p.check(tmp, "==", neg(errno.ECHILD), "no child is left")


@scenario("tree", "sessions and process groups: setsid and setpgid before the point, "
                  "getsid/getpgid after restart, seen from each task and from the init")
def tree_sessions(p):
    me, tmp = p.reg(), p.reg()
    sid = p.call("setsid")
    p.check(sid, "==", 1, "the init makes its own session")
    leader = p.fork()  # A: a new session; its child B: a new group in A's session
    with p.child(leader):
        p.raw(me, "getpid")
        p.raw(tmp, "setsid")
        p.check(tmp, "==", me, "setsid returns the new session id")
        member = p.fork()
        with p.child(member):
            p.raw(tmp, "setpgid", 0, 0)
            p.ckpt()
            p.raw(tmp, "getsid", 0)
            p.check(tmp, "==", me, "B stays in A's session")  # me: A's pid (copied registers)
            p.raw(tmp, "getpgid", 0)
            p.check(tmp, "!=", me, "B leads a group of its own, not A's")
            p.raw(me, "getpid")
            p.check(tmp, "==", me, "B's group is B's pid")
        p.ckpt()
        p.raw(tmp, "getsid", 0)
        p.check(tmp, "==", me, "A leads its session")
        p.raw(tmp, "getpgid", 0)
        p.check(tmp, "==", me, "A leads its group")
        p.raw(tmp, "getpgid", member)
        p.check(tmp, "==", member, "A sees B's group")
        p.raw(tmp, "setsid")
        p.check(tmp, "==", neg(errno.EPERM), "a session leader cannot setsid again")
        reap(p, member, tmp, 0, "B")
    grp = p.fork()  # C: the init moves it into a group of its own
    with p.child(grp):
        p.ckpt()
        p.raw(tmp, "getpgid", 0)
        p.raw(me, "getpid")
        p.check(tmp, "==", me, "C leads the group its parent made")
        p.raw(tmp, "getsid", 0)
        p.check(tmp, "==", 1, "C is in the init's session")
    joiner = p.fork()  # D: the init moves it into C's group
    with p.child(joiner):
        p.ckpt()
        p.raw(tmp, "getpgid", 0)
        p.check(tmp, "==", grp, "D is in C's group")
    p.raw(tmp, "setpgid", grp, grp)
    p.check(tmp, "==", 0, "setpgid(C, C)")
    p.raw(tmp, "setpgid", joiner, grp)
    p.check(tmp, "==", 0, "setpgid(D, C)")
    p.ckpt()
    p.raw(tmp, "getsid", 0)
    p.check(tmp, "==", 1, "the init's session")
    p.raw(tmp, "getpgid", 0)
    p.check(tmp, "==", 1, "the init's group")
    p.raw(tmp, "getsid", leader)
    p.check(tmp, "==", leader, "A's session seen by the init")
    p.raw(tmp, "getpgid", grp)
    p.check(tmp, "==", grp, "C's group seen by the init")
    p.raw(tmp, "getpgid", joiner)
    p.check(tmp, "==", grp, "D's group seen by the init")
    p.raw(tmp, "setpgid", joiner, joiner)
    p.check(tmp, "==", 0, "the init moves D out of C's group after restart")
    p.raw(tmp, "getpgid", joiner)
    p.check(tmp, "==", joiner, "D's new group")
    reap(p, leader, tmp, 0, "A")
    reap(p, grp, tmp, 0, "C")
    reap(p, joiner, tmp, 0, "D")


@scenario("tree", "a process group whose leader exited and was reaped before the point: its two "
                  "members keep the group (and can still join it) after restart")
def tree_pgrp_leader_gone(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    lead, tmp = p.reg(), p.reg()
    leader = p.fork()
    with p.child(leader):
        p.raw(tmp, "setpgid", 0, 0)
        p.raw(lead, "getpid")
        r, w = p.pipe()  # N tells M when it is done with the group
        first = p.fork()
        with p.child(first):
            p.ckpt()
            p.raw(tmp, "getpgid", 0)
            p.check(tmp, "==", lead, "M is still in the dead leader's group")
            p.raw(tmp, "getppid")
            p.check(tmp, "==", 1, "M was reparented to the init")
            p.read_check(r, buf, "done", "N is done")  # M keeps the group alive until then
        second = p.fork()
        with p.child(second):
            p.ckpt()
            p.raw(tmp, "getpgid", first)
            p.check(tmp, "==", lead, "N sees M in the leaderless group")
            p.raw(tmp, "setpgid", 0, 0)
            p.check(tmp, "==", 0, "N leaves for a group of its own")
            p.raw(tmp, "setpgid", 0, lead)
            p.check(tmp, "==", 0, "N joins the leaderless group again")
            p.raw(tmp, "getpgid", 0)
            p.check(tmp, "==", lead, "N is back in the group")
            p.write_text(w, buf, "done")
        p.exit(3)
    p.wait_child(leader, 3, "the group leader")
    p.ckpt()
    p.raw(tmp, "getpgid", 0)
    p.check(tmp, "!=", leader, "the init is not in the leader's group")
    for i in range(2):
        got = p.call("wait4", -1)
        p.check(got, ">", 1, f"the init reaps member {i}")
        p.check(Reg(STATUS_REG), "==", 0, f"member {i} exit status")
    p.raw(tmp, "wait4", -1, WNOHANG)
    p.check(tmp, "==", neg(errno.ECHILD), "no child is left")


@scenario("tree", "a thread (CLONE_VM|FS|FILES|SIGHAND|THREAD): memory written by the thread "
                  "after restart is seen by the leader; the thread keeps its tgid and tid")
def tree_thread(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    note = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    r, w = p.pipe()
    tid, tmp, me = p.reg(), p.reg(), p.reg()
    p.raw(me, "getpid")
    p.store(buf, "leader-wrote")
    p.raw(tid, "fork", CLONE_THREAD_FLAGS)
    after_thread = p.label()
    p.jnz(tid, after_thread)
    # the thread
    p.raw(tid, "gettid")
    p.ckpt()
    p.check_mem(buf, "leader-wrote", "the thread sees the leader's write from before the point")
    p.raw(tmp, "getpid")
    p.check(tmp, "==", me, "the thread's tgid is the leader's pid")
    p.raw(tmp, "gettid")
    p.check(tmp, "==", tid, "the thread keeps its tid")
    p.check(tmp, "!=", me, "the thread's tid is not the tgid")
    p.store(buf, "thread-wrote")
    p.store(note, "!")
    p.raw(tmp, "write", w, note, 1)  # the shared fd table: the leader's pipe
    p.check(tmp, "==", 1, "the thread writes to the leader's pipe")
    p.do("exit", 0)  # exit(2): only this thread ends
    p.place(after_thread)
    p.ckpt()
    p.raw(tmp, "gettid")
    p.check(tmp, "==", me, "the leader's tid is its pid")
    p.check(tid, "!=", me, "clone returned the thread's tid")
    p.read_check(r, note, "!", "the thread's note")
    p.check_mem(buf, "thread-wrote", "the leader sees the thread's write after restart")


@scenario("tree", "a nested pid namespace (CLONE_NEWPID) in the container: its init is pid 1 "
                  "there and its child pid 2, after restart too")
def tree_nested_pidns(p):
    me, tmp = p.reg(), p.reg()
    inner = p.reg()
    p.raw(inner, "fork", CLONE_NEWPID)
    with p.child(inner):
        p.raw(me, "getpid")
        p.check(me, "==", 1, "the nested init is pid 1 before the point")
        kid = p.fork()
        with p.child(kid):
            p.raw(me, "getpid")
            p.ckpt()
            check_ids(p, tmp, me, 1, "the nested init's child")
            p.exit(6)
        p.ckpt()
        p.raw(tmp, "getpid")
        p.check(tmp, "==", 1, "the nested init is pid 1 after restart")
        p.raw(tmp, "getppid")
        p.check(tmp, "==", 0, "the nested init's parent is outside its namespace")
        p.check(kid, "==", 2, "the nested init's child is pid 2 there")
        reap(p, kid, tmp, 6, "the nested child")
        p.exit(8)
    p.check(inner, "!=", 1, "the nested init has another pid in the container")
    p.ckpt()
    p.raw(tmp, "getpid")
    p.check(tmp, "==", 1, "the container init is pid 1")
    reap(p, inner, tmp, 8, "the nested init")


@scenario("tree", "three checkpoints in a row of one tree: a waiting child, a zombie and pipe data "
                  "survive every restart", restarts=3)
def tree_repeated(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    r, w = p.pipe()
    me, tmp = p.reg(), p.reg()
    waiting = p.fork()
    with p.child(waiting):
        p.raw(me, "getpid")
        p.ckpt()
        check_ids(p, tmp, me, 1, "the waiting child")
        p.read_check(r, buf, "abc", "the pipe's data")
        p.exit(4)
    zombie = p.fork()
    with p.child(zombie):
        p.exit(9)
    p.write_text(w, buf, "abc")
    p.store(buf, "init-data")
    p.ckpt()
    p.check_mem(buf, "init-data", "the init's memory")
    reap(p, zombie, tmp, 9, "the zombie")
    reap(p, waiting, tmp, 4, "the waiting child")


@scenario("tree", "a task blocked in wait4 at the checkpoint (not at a point) reaps its child "
                  "after restart with the child's status")
def tree_wait4_blocked(p):
    me, parent, tmp = p.reg(), p.reg(), p.reg()
    waiter = p.fork()
    with p.child(waiter):
        p.raw(me, "getpid")
        p.raw(parent, "getppid")
        kid = p.fork()
        with p.child(kid):
            p.ckpt()
            p.exit(4)
        reap(p, kid, tmp, 4, "the waiter reaps its child")
        check_ids(p, tmp, me, parent, "the waiter")
        p.exit(2)
    reap(p, waiter, tmp, 2, "the init reaps the waiter")


@scenario("tree", "two threads blocked at the checkpoint (one in read on a pipe, the leader at its "
                  "point): after restart the leader's write wakes the thread, whose answer it sees")
def tree_thread_blocked(p):
    buf = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    note = p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)
    to_thread, to_thread_w = p.pipe()
    to_leader, to_leader_w = p.pipe()
    tid, tmp = p.reg(), p.reg()
    p.raw(tid, "fork", CLONE_THREAD_FLAGS)
    after_thread = p.label()
    p.jnz(tid, after_thread)
    # the thread: blocked in read at the checkpoint
    p.read_check(to_thread, note, "go", "the thread gets the leader's message")
    p.store(buf, "answer")
    p.raw(tmp, "write", to_leader_w, note, 2)
    p.check(tmp, "==", 2, "the thread answers")
    p.do("exit", 0)
    p.place(after_thread)
    p.ckpt()
    p.write_text(to_thread_w, note, "go")
    p.read_check(to_leader, note, "go", "the leader gets the thread's answer")
    p.check_mem(buf, "answer", "the leader sees the memory the thread wrote after restart")

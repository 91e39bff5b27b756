"""Live checkpoint of threads, process trees, zombies, sessions, shared anonymous memory and
a CPython process, checked against /proc and against what the targets report about
themselves; every target must run on untraced afterwards."""
from __future__ import annotations

import errno
import io
import os
import signal
import sys
import time

import pytest

from backend.dump import checkpoint
from backend.kabi import SYS_restart_syscall
from ckptsim.cr.context import CheckpointError
from ckptsim.image import decode_all
from ckptsim.kinds.memory import VMA_SHM_ANON, VMA_SHM_ANON_SKIP
from ckptsim.kinds.tasktree import STATE_NUMBERS

PAGE = 4096


# -- reading images ------------------------------------------------------------------------
def chunk_pages(recs, i):
    """{address or offset: page} of the page chunks that start at record i (PGARR, BUFFER...,
    PGARR{0})."""
    out = {}
    while recs[i].layout.name == "PGARR" and recs[i]["nr_pages"]:
        n = recs[i]["nr_pages"]
        buf = bytes(recs[i + 1].var)
        for k in range(n):
            addr = int.from_bytes(buf[8 * k:8 * k + 8], "little")
            out[addr] = buf[8 * n + PAGE * k:8 * n + PAGE * (k + 1)]
        i += 2
    return out


def per_task(recs):
    """[(TREE entry, [records of that task])] in tree order: a task's records run from its
    TASK record to the next one."""
    (tree,) = [r for r in recs if r.layout.name == "TREE"]
    starts = [i for i, r in enumerate(recs) if r.layout.name == "TASK"] + [len(recs)]
    groups = [recs[a:b] for a, b in zip(starts, starts[1:])]
    assert len(groups) == len(tree.var)
    return list(zip(tree.var, groups))


def one(group, name):
    found = [r for r in group if r.layout.name == name]
    assert len(found) == 1, (name, found)
    return found[0]


def proc_syscall(tid: int) -> list[str]:
    with open(f"/proc/{tid}/syscall") as f:
        return f.read().split()


def wait_for(cond, what: str, timeout: float = 10.0):
    """Poll ``cond`` (a handshake with the kernel's view, not a fixed sleep) until it is
    true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()   # fields from 3 (state) on


def kill_by_pid(pids, request):
    def end():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    request.addfinalizer(end)


# -- (a) threads -----------------------------------------------------------------------------
def blocked_in_syscalls(tids):
    """{tid: /proc/TID/syscall fields} once every thread sleeps inside a syscall."""
    out = {}
    for tid in tids:
        fields = proc_syscall(tid)
        if fields[0] in ("running", "-1") or stat_fields(tid)[0] != "S":
            return None
        out[tid] = fields
    return out


def test_threads_each_with_its_own_registers_and_mask(c_target, start_target, check_untraced):
    t = start_target(c_target("live_threads"))
    main = t.info["main"]
    tids = [main] + [t.info[f"t{i}"] for i in (1, 2, 3)]
    selves = {tid: t.info[f"f{i}"] for i, tid in enumerate(tids)}
    sigs = {tids[i]: t.info[f"sig{i}"] for i in (1, 2, 3)}
    assert sorted(int(x) for x in os.listdir(f"/proc/{t.pid}/task")) == sorted(tids)
    before = wait_for(lambda: blocked_in_syscalls(tids), "every thread to block in its syscall")
    assert len({fields[0] for fields in before.values()}) == 4, before   # four different calls

    buf = io.BytesIO()
    checkpoint(t.pid, buf)
    tasks = per_task(decode_all(buf.getvalue()))

    assert [e[0] for e, _ in tasks] == tids          # the leader first, then its threads
    objs = []
    for (tid, ppid, tgid, _pgid, _sid, _depth), group in tasks:
        assert tgid == t.pid
        cpu = one(group, "CPU_X86")
        nr, *_args, sp, pc = before[tid]
        assert cpu["fs_base"] == selves[tid], f"tid {tid}: fs_base is not its pthread_self"
        assert cpu["orig_rax"] == int(nr), f"tid {tid}: not in the syscall /proc showed"
        assert cpu["rsp"] == int(sp, 16) and cpu["rip"] == int(pc, 16), tid
        assert cpu["syscall_state"] == 1
        blocked = one(group, "SIGNAL_TASK")["blocked"]
        for other, sig in sigs.items():
            assert bool(blocked & (1 << (sig - 1))) == (other == tid), (tid, sig, hex(blocked))
        obj = one(group, "TASK_OBJS")
        objs.append({k: obj[k] for k in ("mm_objref", "files_objref", "sighand_objref",
                                         "signal_objref", "fs_objref")})
    assert all(o == objs[0] for o in objs) and all(objs[0].values())
    assert len({one(g, "CPU_X86")["rsp"] for _, g in tasks}) == 4
    assert len({one(g, "CPU_X86")["rip"] for _, g in tasks}) == 4
    # the MM is written once, by the first thread
    assert sum(1 for _, g in tasks for r in g if r.layout.name == "MM") == 1

    check_untraced(t.pid)
    # each thread goes back into the syscall it was in (poll and clock_nanosleep continue
    # through restart_syscall, as after any signal stop)
    def resumed():
        now = blocked_in_syscalls(tids)
        return now and all(now[tid][0] in (before[tid][0], str(SYS_restart_syscall))
                           for tid in tids)
    wait_for(resumed, "the threads to re-enter their syscalls")
    t.write(b"threads\n")
    assert t.readline() == "ok threads"


# -- (b) a tree with a zombie and a new session, (c) shared anonymous memory -----------------
@pytest.fixture
def live_tree(c_target, start_target, request):
    t = start_target(c_target("live_tree"))
    kill_by_pid([t.info["sess"], t.info["peer"]], request)   # they die with the root anyway
    return t


def test_tree_with_zombie_groups_and_sessions(live_tree, check_untraced):
    t = live_tree
    zombie, sess, peer = t.info["zombie"], t.info["sess"], t.info["peer"]
    members = [t.pid, zombie, sess, peer]
    assert stat_fields(zombie)[0] == "Z"
    expect = {}
    for pid in members:
        f = stat_fields(pid)
        ppid, pgrp, session = int(f[1]), int(f[2]), int(f[3])
        expect[pid] = tuple(v if v in members else 0 for v in (ppid, pgrp, session))
    exit_code = int(stat_fields(zombie)[49])                 # field 52: the wait status

    buf = io.BytesIO()
    checkpoint(t.pid, buf)
    tasks = per_task(decode_all(buf.getvalue()))

    entries = {e[0]: e for e, _ in tasks}
    assert sorted(entries) == sorted(members)
    for pid in members:
        _, ppid, tgid, pgid, sid, _ = entries[pid]
        want_ppid, want_pgid, want_sid = expect[pid]
        assert tgid == pid
        assert pgid == want_pgid and sid == want_sid, (pid, entries[pid], expect[pid])
        assert ppid == (0 if pid == t.pid else want_ppid)
    assert entries[sess][3] == entries[sess][4] == sess                      # setsid()
    assert entries[peer][3] == entries[t.pid][3] == entries[zombie][3] == t.pid  # setpgid(0, 0)
    assert entries[peer][4] == entries[t.pid][4] != sess

    groups = {e[0]: g for e, g in tasks}
    ztask = one(groups[zombie], "TASK")
    assert ztask["state"] == STATE_NUMBERS["zombie"]
    assert ztask["exit_code"] == exit_code and os.WEXITSTATUS(ztask["exit_code"]) == 7
    assert not [r for r in groups[zombie] if r.layout.name in ("TASK_OBJS", "CPU_X86")]
    for pid in (t.pid, sess, peer):
        assert one(groups[pid], "TASK")["state"] == STATE_NUMBERS["running"]

    for pid in (t.pid, sess, peer):
        check_untraced(pid)
    assert stat_fields(zombie)[0] == "Z"                      # still unreaped
    t.write(b"tree\n")
    assert t.readline() == "ok tree"


def test_shared_anonymous_memory_saved_once(live_tree, check_untraced):
    t = live_tree
    shm, devzero = t.info["shm"], t.info["devzero"]
    mappers = [t.pid, t.info["sess"], t.info["peer"]]
    buf = io.BytesIO()
    checkpoint(t.pid, buf)
    recs = decode_all(buf.getvalue())

    segments = {}           # objref -> (SHMEM record, {offset: page})
    for i, r in enumerate(recs):
        if r.layout.name == "SHMEM":
            assert recs[i - 1].layout.name == "OBJREF"
            segments[recs[i - 1]["objref"]] = (r, chunk_pages(recs, i + 1))
    assert len(segments) == 2, "one SHMEM object per segment, however many tasks map it"

    vmas = {}               # start -> [(task pid, VMA record)]
    for (pid, *_), group in per_task(recs):
        for r in group:
            if r.layout.name == "VMA" and r["vm_start"] in (shm, devzero):
                vmas.setdefault(r["vm_start"], []).append((pid, r))
    for start, size, want in ((shm, 16 * PAGE, {0: b"R", 3: b"r", 5: b"S", 7: b"P", 9: b"Z"}),
                              (devzero, 4 * PAGE, {1: b"D"})):
        found = vmas[start]
        assert [pid for pid, _ in found] == mappers
        refs = {r["ino_objref"] for _, r in found}
        assert len(refs) == 1
        (ref,) = refs
        assert [r["vma_type"] for _, r in found] == [VMA_SHM_ANON] + [VMA_SHM_ANON_SKIP] * 2
        assert all(r["vm_end"] - r["vm_start"] == size and r["ino_size"] == size
                   for _, r in found)
        seg, pages = segments[ref]
        assert seg["size"] == size and seg["nr_pages"] == len(want)
        # page 9 was written by the child that exited: only the segment itself still holds it
        assert pages == {n * PAGE: c * PAGE for n, c in want.items()}

    for pid in mappers:
        check_untraced(pid)
    t.write(b"shared\n")
    assert t.readline() == "ok shared"


SYSV_TARGET = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
shmid = libc.shmget(0, 8192, 0o1600)                         # IPC_PRIVATE, IPC_CREAT|0600
addr = libc.shmat(shmid, None, 0)
libc.shmctl(shmid, 0, None)                                  # IPC_RMID: gone once detached
print("READY shm=%#x" % addr, flush=True)
sys.stdin.readline()
"""


def test_sysv_shm_is_refused_by_name(start_target, check_untraced):
    t = start_target(sys.executable, "-c", SYSV_TARGET)
    with pytest.raises(CheckpointError) as e:
        checkpoint(t.pid, io.BytesIO())
    assert e.value.errno == errno.ENOSYS
    msg = e.value.message
    assert f"task {t.pid}" in msg and "SysV" in msg and f"{t.info['shm']:#x}" in msg, msg
    check_untraced(t.pid)


# -- (d) a CPython process ---------------------------------------------------------------------
PY_TARGET = r"""
import os, sys
token = sys.argv[1]
marker = ("ckpt-marker:" + token[::-1]).encode()      # built at run time: only in the heap
table = {i: str(i) for i in range(100_000)}
data = open(sys.argv[2], "w+")
data.write("python state\n")
data.flush()
r, w = os.pipe()
os.write(w, b"in the pipe")
print("READY data=%d pipe_r=%d pipe_w=%d" % (data.fileno(), r, w), flush=True)
for line in sys.stdin:
    print("pong %s %d %d" % (line.strip(), len(table), marker.startswith(b"ckpt-marker:")),
          flush=True)
"""


def test_cpython_process(start_target, tmp_path, check_untraced):
    token = os.urandom(8).hex()
    path = tmp_path / "py.data"
    t = start_target(sys.executable, "-c", PY_TARGET, token, str(path))
    buf = io.BytesIO()
    checkpoint(t.pid, buf)
    recs = decode_all(buf.getvalue())

    pages = {}
    for i, r in enumerate(recs):
        if r.layout.name == "PGARR" and r["nr_pages"] and recs[i - 1].layout.name != "PGARR":
            pages.update(chunk_pages(recs, i))
    marker = f"ckpt-marker:{token[::-1]}".encode()
    assert any(marker in page + pages.get(addr + PAGE, b"") for addr, page in pages.items()), \
        "the marker bytes object is not in the saved pages"
    # the 100k-entry dict makes the heap several MiB
    assert len(pages) * PAGE > 4 << 20

    names = [r.var for r in recs if r.layout.name == "FILE_NAME"]
    assert str(path) in names
    assert any(r["f_pos"] == len("python state\n") for r in recs if r.layout.name == "FILE")
    assert any(bytes(r.var) == b"in the pipe" for r in recs if r.layout.name == "PIPE_BUF")
    with open(f"/proc/{t.pid}/fdinfo/{t.info['data']}") as f:
        assert "pos:\t13" in f.read()

    check_untraced(t.pid)
    t.write(b"ping\n")
    assert t.readline() == "pong ping 100000 1"


# -- (e) a nested pid namespace ----------------------------------------------------------------
NESTED_TARGET = r"""
import ctypes, os, signal, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
SYS_unshare, SYS_setns, SYS_prctl = 272, 308, 157
CLONE_NEWPID, PR_SET_PDEATHSIG = 0x20000000, 1
mode = sys.argv[1]                  # "init": a nested init; "setns": a child put into it
own = os.open("/proc/self/ns/pid", os.O_RDONLY)
assert libc.syscall(SYS_unshare, CLONE_NEWPID) == 0, ctypes.get_errno()
r, w = os.pipe()
init = os.fork()
if init == 0:                       # pid 1 of the new namespace
    os.close(own)
    libc.syscall(SYS_prctl, PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.fork() == 0:              # pid 2, with a thread (pid 3 there)
        libc.syscall(SYS_prctl, PR_SET_PDEATHSIG, signal.SIGKILL)
        ev = threading.Event()
        threading.Thread(target=ev.wait, daemon=True).start()
        os.write(w, b"%d %d\n" % (os.getpid(), os.getppid()))
        ev.wait()
    while True:
        signal.pause()
assert libc.syscall(SYS_setns, own, CLONE_NEWPID) == 0, ctypes.get_errno()
line = os.read(r, 100).split()
os.close(r), os.close(w)
if mode == "setns":                 # a child of ours, in the nested namespace but not its init
    ns = os.open("/proc/%d/ns/pid" % init, os.O_RDONLY)
    assert libc.syscall(SYS_setns, ns, CLONE_NEWPID) == 0, ctypes.get_errno()
    settled_r, settled_w = os.pipe()
    if os.fork() == 0:
        os.close(own), os.close(ns), os.close(settled_r)
        libc.syscall(SYS_prctl, PR_SET_PDEATHSIG, signal.SIGKILL)
        os.close(settled_w)          # its fds are closed: READY may go out
        signal.pause()
    libc.syscall(SYS_setns, own, CLONE_NEWPID)
    os.close(ns), os.close(settled_w)
    os.read(settled_r, 1)           # EOF once the child closed its end
    os.close(settled_r)
os.close(own)
plain = os.fork()
if plain == 0:
    signal.pause()
print("READY init=%d plain=%d inner=%s inner_ppid=%s" % (init, plain, line[0].decode(),
                                                         line[1].decode()), flush=True)
for line in sys.stdin:
    print("ok", flush=True)
"""


def _nspid(tid: int) -> list[int]:
    with open(f"/proc/{tid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(n) for n in line.split()[1:]]
    raise AssertionError(f"no NSpid for {tid}")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(n) for n in f.read().split()]


def test_nested_pid_namespace(start_target, request, check_untraced):
    """A nested init (pid 1 there, made with CLONE_NEWPID) and its child with a thread: TREE
    has their depth 1 and numbers in the root's namespace, TREE_NESTED their numbers in the
    nested one (1, 2, 3), the model replays the image to the same bytes; all run on."""
    from ckptsim.cr.replay import replay
    t = start_target(sys.executable, "-c", NESTED_TARGET, "init")
    init, plain = t.info["init"], t.info["plain"]
    (inner,) = _children(init)
    kill_by_pid([init, inner, plain], request)
    assert (t.info["inner"], t.info["inner_ppid"]) == (2, 1)
    wait_for(lambda: len(os.listdir(f"/proc/{inner}/task")) == 2, "the nested thread")
    (thread,) = [int(x) for x in os.listdir(f"/proc/{inner}/task") if int(x) != inner]
    level = len(_nspid(t.pid)) - 1

    buf = io.BytesIO()
    checkpoint(t.pid, buf)
    recs = decode_all(buf.getvalue())

    (tree,) = [r for r in recs if r.layout.name == "TREE"]
    (nested,) = [r for r in recs if r.layout.name == "TREE_NESTED"]
    v = {pid: _nspid(pid)[level] for pid in (t.pid, init, inner, thread, plain)}
    root = v[t.pid]
    assert [(e[0], e[1], e[2], e[5]) for e in tree.var] == [   # vpid, vppid, vtgid, depth
        (root, 0, root, 0), (v[init], root, v[init], 1), (v[inner], v[init], v[inner], 1),
        (v[thread], v[init], v[inner], 1), (v[plain], root, v[plain], 0)]
    assert [n for (n,) in nested.var] == [1, 2, _nspid(thread)[-1]] == [1, 2, 3]
    report = replay(buf.getvalue(), roundtrip=True)
    assert report.problems == [] and report.roundtrip == "identical"

    for pid in (t.pid, init, inner, plain):
        check_untraced(pid)
    t.write(b"go\n")
    assert t.readline() == "ok"
    assert stat_fields(inner)[0] == "S" and stat_fields(init)[0] == "S"


def test_a_child_setns_into_a_nested_namespace_is_refused(start_target, request,
                                                          check_untraced):
    """A child that its parent put into a nested namespace it did not make (setns) is not the
    namespace's init: a restart could not rebuild it, so the checkpoint says so."""
    t = start_target(sys.executable, "-c", NESTED_TARGET, "setns")
    init, plain = t.info["init"], t.info["plain"]
    stray = [c for c in _children(t.pid) if c not in (init, plain)]
    kill_by_pid([init, plain, *stray, *_children(init)], request)
    assert len(stray) == 1 and _nspid(stray[0])[-1] not in (0, 1)
    with pytest.raises(CheckpointError) as e:
        checkpoint(t.pid, io.BytesIO())
    assert e.value.errno == errno.EOPNOTSUPP
    assert f"task {stray[0]} is 1 pid namespace levels below its parent {t.pid} and not the " \
           f"init there" in e.value.message, e.value.message
    for pid in (t.pid, init, plain, stray[0]):
        check_untraced(pid)

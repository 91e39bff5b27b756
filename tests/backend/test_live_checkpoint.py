"""Live checkpoint of real process trees, checked field by field against /proc and against
what the target reports about itself; the target must run on untraced afterwards."""
from __future__ import annotations

import errno
import io
import os
import stat
import time

import pytest

from backend import cli
from backend.dump import checkpoint
from ckptsim.cr.context import CheckpointError
from ckptsim.image import core, decode_all

SIGUSR1, SIGUSR2 = 10, 12


def records(image: bytes):
    return decode_all(image)


def by_name(recs, name):
    return [r for r in recs if r.layout.name == name]


def pages_of(recs):
    """{page address: contents} of every page chunk in the image."""
    out = {}
    for i, r in enumerate(recs):
        if r.layout.name == "PGARR" and r["nr_pages"]:
            n = r["nr_pages"]
            buf = bytes(recs[i + 1].var)
            for k in range(n):
                addr = int.from_bytes(buf[8 * k:8 * k + 8], "little")
                out[addr] = buf[8 * n + 4096 * k:8 * n + 4096 * (k + 1)]
    return out


@pytest.fixture
def tree(c_target, start_target, tmp_path):
    exe = c_target("ckpt_tree")
    return start_target(exe, str(tmp_path / "data"))


def test_image_matches_the_target(tree, check_untraced):
    buf = io.BytesIO()
    crid = checkpoint(tree.pid, buf)
    assert crid > 0
    recs = records(buf.getvalue())
    head = recs[0]
    assert head["image_flags"] & core.IMAGE_LIVE and head["arch"] == core.ARCH_X86_64

    # the tree: the target and its child, with the parent link
    (tree_rec,) = by_name(recs, "TREE")
    entries = {e[0]: e for e in tree_rec.var}
    child = tree.info["child"]
    assert set(entries) == {tree.pid, child}
    assert entries[child][1] == tree.pid and entries[tree.pid][1] == 0

    # memory: the pattern pages are saved with their contents; untouched and zero pages are not
    pages = pages_of(recs)
    base = tree.info["mem"]
    for page in (0, 5, 10, 15):
        assert pages[base + page * 4096] == bytes([ord("A") + page]) * 4096
    for page in (1, 2, 4):
        assert base + page * 4096 not in pages

    # the file at its offset, the pipe with its bytes
    files = by_name(recs, "FILE")
    names = [r.var for r in by_name(recs, "FILE_NAME")]
    assert str(tree.info.get("fd")) and any(n.endswith("/data") for n in names)
    assert any(r["f_pos"] == 4 for r in files)
    assert any(bytes(r.var) == b"piped" for r in by_name(recs, "PIPE_BUF"))

    # signals: the handler address, the blocked mask, the queued rt signal with its value
    sighand = by_name(recs, "SIGHAND")[0]
    assert sighand.var[SIGUSR1 - 1][0] == tree.info["handler"]
    rt = tree.info["rt"]
    blocked = {r["blocked"] for r in by_name(recs, "SIGNAL_TASK")}
    assert any(b & (1 << (SIGUSR2 - 1)) and b & (1 << (rt - 1)) for b in blocked)
    queued = [item for r in by_name(recs, "SIGPENDING") for item in r.var]
    assert any(item[0] == rt and item[-1] == 42 for item in queued), queued

    # registers: the instruction pointer lies in an executable mapping of the target
    rips = [r["rip"] for r in by_name(recs, "CPU_X86")]
    assert len(rips) == 2 and all(rips)

    # and the tree runs on, untraced, with its state intact
    check_untraced(tree.pid)
    check_untraced(child)
    tree.write(b"still there\n")
    assert tree.readline() == "ok still there"


def test_unsupported_fd_fails_cleanly_and_leaves_the_target_running(c_target, start_target,
                                                                     tmp_path, check_untraced):
    t = start_target(c_target("ckpt_tree"), str(tmp_path / "data"), "socket")
    buf = io.BytesIO()
    with pytest.raises(CheckpointError) as e:
        checkpoint(t.pid, buf)
    assert e.value.errno == errno.ENOSYS
    assert f"task {t.pid}" in e.value.message and "socket" in e.value.message
    recs = records(buf.getvalue())
    assert any(r.layout is core.ERROR for r in recs)
    check_untraced(t.pid)
    t.write(b"after failure\n")
    assert t.readline() == "ok after failure"


def test_cli_writes_a_private_image(tree, tmp_path, capsys):
    out = tmp_path / "tree.img"
    assert cli.main([str(tree.pid), "-o", str(out), "-v"]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert "checkpoint id" in capsys.readouterr().err
    assert decode_all(out.read_bytes())[0]["image_flags"] & core.IMAGE_LIVE


@pytest.mark.parametrize("argv", [["999999999", "-o", "/tmp/none.img"], ["notapid"],
                                  ["1", "--freezer", "-o", "/tmp/none.img"]])
def test_cli_bad_input_is_one_line(argv, capsys):
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)


def test_kill_ends_the_tree_once_the_image_is_written(tree, tmp_path):
    out = tmp_path / "killed.img"
    child = tree.info["child"]
    assert cli.main([str(tree.pid), "-o", str(out), "--kill"]) == 0
    assert tree.proc.wait(timeout=10) == -9
    assert decode_all(out.read_bytes())[0]["image_flags"] & core.IMAGE_LIVE
    # the child was killed too (and, orphaned, is reaped by init: wait until it is gone)
    for _ in range(100):
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"child {child} still alive after --kill")


@pytest.mark.parametrize("unshared, named", [("files", "file table"), ("fs", "cwd, root")])
def test_a_thread_with_its_own_files_or_fs_is_refused_by_name(c_target, start_target,
                                                               unshared, named, check_untraced):
    """The image has one file table and one fs (cwd, root, umask) per process: a thread that
    unshared its own would be saved with its leader's, so the checkpoint refuses it."""
    t = start_target(c_target("unshared_thread"), unshared)
    tid = int(t.info["tid"])
    with pytest.raises(CheckpointError) as e:
        checkpoint(t.pid, io.BytesIO())
    assert e.value.errno == errno.ENOSYS
    assert f"thread {tid}" in e.value.message and named in e.value.message, e.value.message
    check_untraced(t.pid)
    t.write(b"after failure\n")
    assert t.readline() == "ok after failure"


def test_threads_sharing_everything_are_checkpointed(c_target, start_target, check_untraced):
    t = start_target(c_target("unshared_thread"), "none")
    buf = io.BytesIO()
    checkpoint(t.pid, buf)
    assert len(by_name(records(buf.getvalue()), "TASK")) == 2
    check_untraced(t.pid)


def test_a_vfork_parent_is_refused_by_name(c_target, start_target, check_untraced):
    """A vfork child that has not exec'd shares its parent's mm, and the parent waits in the
    kernel where no ptrace stop reaches it: the checkpoint refuses the tree, naming both."""
    t = start_target(c_target("vfork_child"))
    child = int(t.info["child"])
    try:
        with pytest.raises(CheckpointError) as e:
            checkpoint(t.pid, io.BytesIO())
        assert e.value.errno == errno.ENOSYS
        assert str(t.pid) in e.value.message and str(child) in e.value.message, e.value.message
        assert "vfork" in e.value.message and "address space" in e.value.message
        check_untraced(t.pid)
        check_untraced(child)
    finally:
        try:
            os.kill(child, 9)                # the child first: the parent then leaves vfork
        except ProcessLookupError:
            pass


def test_shared_address_spaces_are_found_with_and_without_an_order(c_target,
                                                                       start_target,
                                                                       monkeypatch):
    """address_space_owners maps a sharer to the first of its group in the given order. A
    kernel whose kcmp gives no order (3: different, order unknown) is compared pair by pair:
    the shared mm is still found, and processes of their own are in no group."""
    from backend import kabi, snapshot
    real = kabi.syscall

    def unordered(nr, *args, **kw):
        got = real(nr, *args, **kw)
        return 3 if nr == kabi.SYS_kcmp and args[2] == kabi.KCMP_VM and got else got
    t = start_target(c_target("vfork_child"))
    child = int(t.info["child"])
    other = start_target(c_target("unshared_thread"), "none")
    monkeypatch.setattr(snapshot.kabi, "syscall", unordered)
    try:
        assert snapshot.address_space_owners([other.pid, t.pid, child]) == {child: t.pid}
        assert snapshot.address_space_owners([other.pid, child, t.pid]) == {t.pid: child}
        assert snapshot.address_space_owners([other.pid, t.pid]) == {}
        monkeypatch.undo()
        assert snapshot.address_space_owners([child, other.pid, t.pid]) == {t.pid: child}
    finally:
        try:
            os.kill(child, 9)
        except ProcessLookupError:
            pass


def test_processes_sharing_an_address_space_save_it_once(c_target, start_target,
                                                         check_untraced):
    """A child made with clone(CLONE_VM) (not a thread): both tasks' TASK_OBJS name one MM,
    written once, and the model replays the image identically. The two run on after."""
    from ckptsim.cr.replay import replay
    t = start_target(c_target("restore_prog_clone_vm"))
    child = int(t.info["child"])
    try:
        buf = io.BytesIO()
        checkpoint(t.pid, buf)
        recs = records(buf.getvalue())
        objs = by_name(recs, "TASK_OBJS")
        assert len(objs) == 2 and objs[0]["mm_objref"] == objs[1]["mm_objref"]
        assert objs[0]["files_objref"] != objs[1]["files_objref"]          # its own fd table
        assert len(by_name(recs, "MM")) == 1
        report = replay(buf.getvalue(), roundtrip=True)
        assert report.problems == [] and report.roundtrip == "identical"
        check_untraced(t.pid)
        check_untraced(child)
        lines = [t.readline(2.0) for _ in range(20)]
        assert "page ok" in lines and not [ln for ln in lines if ln and ln.startswith("STALLED")]
        ticks = [int(ln.split("ticks=")[1]) for ln in lines if ln and ln.startswith("n ")]
        assert len(ticks) >= 10 and ticks[-1] > ticks[0], lines    # the two count on
    finally:
        try:
            os.kill(child, 9)                 # start_target ends the parent, by pid
        except ProcessLookupError:
            pass


def test_a_process_under_seccomp_is_refused_and_survives(c_target, start_target,
                                                         check_untraced):
    """The image holds no seccomp filter: a process under seccomp is refused by name before
    any syscall is injected into it (strict mode would kill it on the first one)."""
    t = start_target(c_target("seccomp_strict"))
    time.sleep(0.05)                         # past its prctl: in read(), under strict mode
    with pytest.raises(CheckpointError) as e:
        checkpoint(t.pid, io.BytesIO())
    assert e.value.errno == errno.ENOSYS and "seccomp (strict mode)" in e.value.message
    assert f"task {t.pid}" in e.value.message
    check_untraced(t.pid)
    t.write(b"still here\n")
    assert t.readline(5.0) == "still here"


def test_leave_out_self_only_for_a_childless_checkpointer_inside_the_tree(c_target,
                                                                          start_target):
    """leave_out_self (a self-checkpointing pid namespace init's helper, backend/api.py) is
    refused for the root itself, for a checkpointer with children and with the freezer."""
    with pytest.raises(CheckpointError, match="only a childless checkpointer") as e:
        checkpoint(os.getpid(), io.BytesIO(), leave_out_self=True)
    assert e.value.errno == errno.EINVAL
    t = start_target(c_target("unshared_thread"), "none")        # a child of this process
    with pytest.raises(CheckpointError, match="only a childless checkpointer"):
        checkpoint(t.pid, io.BytesIO(), leave_out_self=True)


@pytest.mark.parametrize("mode,what", [("files", "one fd table"), ("fs", "one cwd/root/umask"),
                                       ("sighand", "one signal handler table")])
def test_processes_sharing_a_per_process_table_are_refused(mode, what, c_target, start_target,
                                                           check_untraced):
    """clone(CLONE_FILES / CLONE_FS / CLONE_VM|CLONE_SIGHAND) without CLONE_THREAD: the image
    holds one table per process, so the checkpoint refuses by name, and both run on."""
    t = start_target(c_target("shared_tables"), mode)
    child = int(t.info["child"])
    try:
        with pytest.raises(CheckpointError) as e:
            checkpoint(t.pid, io.BytesIO())
        assert e.value.errno == errno.ENOSYS
        assert f"processes {t.pid} and {child} share {what}" in e.value.message, e.value.message
        check_untraced(t.pid)
        check_untraced(child)
    finally:
        try:
            os.kill(child, 9)
        except ProcessLookupError:
            pass


def test_a_vfork_by_another_thread_is_refused_at_once(c_target, start_target, check_untraced):
    """A second thread's vfork (a subprocess started from a worker thread): the waiting thread
    is not the main one, and is found all the same, before anything is seized."""
    t = start_target(c_target("shared_tables"), "vfork-thread")
    child = int(t.info["child"])
    try:
        began = time.monotonic()
        with pytest.raises(CheckpointError) as e:
            checkpoint(t.pid, io.BytesIO())
        assert "waits in vfork" in e.value.message and str(child) in e.value.message
        assert time.monotonic() - began < 2.0
        check_untraced(t.pid)
    finally:
        try:
            os.kill(child, 9)                # the child first: the thread then leaves vfork
        except ProcessLookupError:
            pass

"""Live restart of open files (backend/restore/files.py) on real processes.

Each test starts a C target (targets/restore_files.c) that sets its files up at fixed fd
numbers, checkpoints it with --kill, restarts the image with restart_image, checks the
restored process from /proc (fd numbers, link targets, fdinfo flags and positions, kcmp),
then lets the target use its fds (it polls for DIR/go and writes DIR/report) and checks what
it saw. Restored processes are ended by pid (and the restart's child reaped) on every path.
"""
from __future__ import annotations

import errno
import io
import os
import stat
import time

import pytest

from backend import kabi
from backend.dump import checkpoint
from backend.restore.job import RestoreError, restart_image


# -- helpers (the restarts fixture is in conftest.py) --------------------------------------
def fdinfo(pid: int, fd: int) -> dict[str, str]:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def flags_of(pid: int, fd: int) -> int:
    return int(fdinfo(pid, fd)["flags"], 8)


def open_fds(pid: int) -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


def wait_report(path: str, timeout: float = 10.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)
    with open(path) as f:
        return dict(line.rstrip("\n").split(" ", 1) for line in f if line.strip())


def go(d, name: str = "go") -> None:
    (d / name).write_text("1")


def unhex(value: str) -> bytes:
    return bytes.fromhex(value)


def kcmp_file(pid1: int, fd1: int, pid2: int, fd2: int) -> int:
    return kabi.syscall(kabi.SYS_kcmp, pid1, pid2, kabi.KCMP_FILE, fd1, fd2, what="kcmp")


def _accmode_and_status(flags: int) -> int:
    return flags & (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_DIRECTORY)


# -- regular files, directories, devices, unlinked files -------------------------------------
@pytest.mark.parametrize("early_fd", [None, 5], ids=["transport-fd-free", "transport-fd-moved"])
def test_regular_files_dir_devnull_and_unlinked(c_target, start_target, restarts, tmp_path,
                                                monkeypatch, early_fd):
    from backend.restore import job as job_module
    from backend.restore.transport import Transport
    moved = []
    if early_fd is not None:
        # the seed spawned before the decode got the transport at a number the image uses:
        # it is moved above them before any fd is restored (the checks below see them all)
        monkeypatch.setattr(job_module, "EARLY_TRANSPORT_FD", early_fd)
        real_move = Transport.move
        monkeypatch.setattr(Transport, "move",
                            lambda self, seed, low: (moved.append(low), real_move(self, seed, low)))
    d = tmp_path
    t = start_target(c_target("restore_files"), "files", d)
    before = {fd: (os.readlink(f"/proc/{t.pid}/fd/{fd}"), flags_of(t.pid, fd),
                   fdinfo(t.pid, fd)["pos"]) for fd in t.info.values()}
    assert before[41][0] == f"{d}/gone.txt (deleted)"
    r = restarts(t)
    pid = r.root
    assert moved == ([max(t.info.values()) + 1] if early_fd is not None else [])
    assert open_fds(pid) == {0, 1, 2} | set(t.info.values())
    for fd, (link, flags, pos) in before.items():
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == link, fd
        assert flags_of(pid, fd) == flags, (fd, oct(flags), oct(flags_of(pid, fd)))
        assert fdinfo(pid, fd)["pos"] == pos, fd
    assert flags_of(pid, 12) & os.O_CLOEXEC and not flags_of(pid, 7) & os.O_CLOEXEC
    assert flags_of(pid, 9) & os.O_APPEND and flags_of(pid, 12) & os.O_NONBLOCK
    assert fdinfo(pid, 7)["pos"] == "4" and fdinfo(pid, 41)["pos"] == "3"
    assert fdinfo(pid, 42)["pos"] == "9"
    # the two descriptions of the unlinked file are one inode again, and nothing is linked
    assert os.stat(f"/proc/{pid}/fd/41").st_ino == os.stat(f"/proc/{pid}/fd/42").st_ino
    assert os.stat(f"/proc/{pid}/fd/41").st_nlink == 0
    assert not (d / "gone.txt").exists()
    assert kcmp_file(pid, 41, pid, 42) != 0          # two descriptions, as before

    go(d)
    rep = wait_report(str(d / "report"))
    assert unhex(rep["rw"]) == b"4567" and rep["rw-write"] == "2"
    assert (d / "data.txt").read_bytes() == b"01234567XYabcdef"
    assert rep["app-write"] == "6" and (d / "log.txt").read_bytes() == b"line1\nline2\n"
    assert unhex(rep["ro"]) == b"CDE"
    assert int(rep["ro-flags"], 8) & os.O_NONBLOCK and rep["ro-fd"] == "1"
    assert rep["rw-fd"] == "0"
    assert rep["dir-isdir"] == "1" and rep["dir-fchdir"] == "0"
    assert rep["null-write"] == "7"
    assert unhex(rep["gone"]) == b"inked contents" and rep["gone-nlink"] == "0"
    assert rep["gone-write"] == "1"
    # the read-only description sees the write through the other one: the same inode
    assert unhex(rep["gone2"]) == b"Unlinked contents"
    assert unhex(rep["gone2-read"]) == b"cont"


def test_unlinked_file_whose_path_exists_again_is_refused(c_target, start_target, restarts,
                                                           tmp_path):
    d = tmp_path
    t = start_target(c_target("restore_files"), "files", d)
    sink = io.BytesIO()
    checkpoint(t.pid, sink, kill=True)
    t.proc.wait(timeout=10)
    (d / "gone.txt").write_text("someone else's file")
    children_before = _children()
    with pytest.raises(RestoreError) as e:
        restart_image(bytearray(sink.getvalue()))
    assert e.value.errno == errno.EEXIST
    assert "fd 41" in str(e.value) and "gone.txt" in str(e.value)
    assert (d / "gone.txt").read_text() == "someone else's file"
    assert _children() == children_before                 # nothing left behind


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for task in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{task}/children") as f:
                out |= {int(p) for p in f.read().split()}
        except FileNotFoundError:
            pass
    return out


# -- pipes and FIFOs --------------------------------------------------------------------------
def test_pipes_one_or_both_ends_shared_with_child_and_fifo(c_target, start_target, restarts,
                                                           tmp_path):
    d = tmp_path
    t = start_target(c_target("restore_files"), "pipes", d)
    child_before = t.info.pop("child")
    flags_before = {fd: flags_of(t.pid, fd) for fd in t.info.values()}
    r = restarts(t)
    parent = r.root
    child = next(p for p in r.pids.values() if p != parent)
    assert child_before in r.pids
    assert open_fds(parent) == {0, 1, 2} | set(t.info.values())
    for fd, flags in flags_before.items():
        assert _accmode_and_status(flags_of(parent, fd)) == _accmode_and_status(flags), fd
    # both ends of one pipe, and the FIFO by its path
    assert os.readlink(f"/proc/{parent}/fd/5") == os.readlink(f"/proc/{parent}/fd/6")
    assert os.readlink(f"/proc/{parent}/fd/5").startswith("pipe:[")
    assert os.readlink(f"/proc/{parent}/fd/13") == str(d / "fifo")
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    # the child shares the descriptions of the pipe it inherited (one open file each)
    for fd in (10, 11, 5, 13):
        assert kcmp_file(parent, fd, child, fd) == 0, fd
    assert kcmp_file(parent, 10, parent, 11) != 0

    go(d)
    rep = wait_report(str(d / "report"))
    assert rep["big-len"] == "70000" and rep["big-same"] == "1"
    assert rep["big-size"] == "131072"
    assert rep["big-w-write"] == "4" and unhex(rep["big-r-more"]) == b"more"
    assert unhex(rep["ronly"]) == b"only-read-end" and rep["ronly-eof"] == "0"
    assert rep["wonly-write"] == "-1" and rep["wonly-errno"] == str(errno.EPIPE)
    assert unhex(rep["shared-parent"]) == b"shared-"
    assert unhex(rep["fifo"]) == b"fifo-data"
    child_rep = wait_report(str(d / "child-report"))
    # O_NONBLOCK set by the parent shows in the child: one open file description
    assert int(child_rep["child-flags10"], 8) & os.O_NONBLOCK
    assert unhex(child_rep["child-read10"]) == b"pipe-d"
    # the FIFO is the one at its path: a writer from outside reaches the restored reader
    w = os.open(d / "fifo", os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(w, b"from-outside")
    finally:
        os.close(w)
    go(d, "go2")
    rep2 = wait_report(str(d / "report2"))
    assert unhex(rep2["fifo2"]) == b"from-outside"


# -- the mapping of a deleted file ------------------------------------------------------------
def test_mapping_of_a_deleted_file_shares_the_fd_inode(c_target, start_target, restarts,
                                                       tmp_path):
    d = tmp_path
    t = start_target(c_target("restore_files"), "mapdel", d)
    r = restarts(t)
    pid = r.root
    assert os.readlink(f"/proc/{pid}/fd/9") == f"{d}/mapped.bin (deleted)"
    start = t.info["shared"]
    with open(f"/proc/{pid}/maps") as f:
        line = next(ln for ln in f if ln.startswith(f"{start:x}-"))
    assert line.rstrip().endswith(f"{d}/mapped.bin (deleted)") and " rw-s " in line
    # the mapping and the fd are one inode (and nothing was left at the path)
    mapped = os.stat(f"/proc/{pid}/map_files/{start:x}-{start + 8192:x}")
    assert mapped.st_ino == os.stat(f"/proc/{pid}/fd/9").st_ino
    assert not (d / "mapped.bin").exists()
    go(d)
    rep = wait_report(str(d / "report"))
    assert unhex(rep["shared0"]) == b"mapped file contents, page one"
    assert unhex(rep["shared1"]) == b"second page, shared write"
    assert unhex(rep["private0"]) == b"PRIVATEfile contents, page one"
    assert unhex(rep["fd-read"]) == b"second page, shared write"
    assert unhex(rep["fd-sees"]) == b"SHARED"

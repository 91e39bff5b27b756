"""Live restart of AF_UNIX sockets (backend/restore/sockets.py) on real processes.

The target (targets/restore_sockets.c) makes socketpairs of the three types with data queued
both ways, a listener with an accepted and a pending connection, datagram sockets bound to a
path and to an abstract name with queued messages from named and unnamed senders, and a
shut-down pair; it is checkpointed with --kill and restarted; the restored sockets are checked
from /proc and by the target using them (DIR/go, DIR/report). Everything restored is killed
by pid and reaped.
"""
from __future__ import annotations

import errno
import io
import os
import socket
import stat
import time

import pytest

from backend.dump import checkpoint
from backend.restore.job import RestoreError, restart_image


def fdinfo_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return int(next(ln for ln in f if ln.startswith("flags:")).split()[1], 8)


def wait_report(path: str, timeout: float = 10.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)
    with open(path) as f:
        return dict(line.rstrip("\n").split(" ", 1) for line in f if line.strip())


def unhex(value: str) -> bytes:
    return bytes.fromhex(value)


def socket_inodes(pid: int, fds) -> dict[int, str]:
    return {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds}


def test_unix_sockets_of_every_kind(c_target, start_target, restarts, tmp_path):
    d = tmp_path
    abstract = f"ckptsim-restore-{os.getpid()}-{time.monotonic_ns()}"
    t = start_target(c_target("restore_sockets"), "all", d, abstract)
    fds = sorted(t.info.values())
    r = restarts(t)
    pid = r.root
    links = socket_inodes(pid, fds)
    assert all(v.startswith("socket:[") for v in links.values()), links
    assert len(set(links.values())) == len(fds)          # one socket per fd, as before
    assert fdinfo_flags(pid, 3) & os.O_NONBLOCK and not fdinfo_flags(pid, 4) & os.O_NONBLOCK
    # the listener is at its path again (the stale file of the killed target replaced)
    assert stat.S_ISSOCK(os.lstat(d / "lis.sock").st_mode)
    assert stat.S_ISSOCK(os.lstat(d / "dg.sock").st_mode)

    (d / "go").write_text("1")
    rep = wait_report(str(d / "report"))
    assert unhex(rep["sp1"]) == b"s 3->4" and unhex(rep["sp0"]) == b"s 4->3, longer"
    assert int(rep["sp0-flags"], 8) & os.O_NONBLOCK
    assert rep["sp0-empty-err"] == str(errno.EAGAIN)
    assert rep["sp-again"] == "1" and unhex(rep["sp0-again"]) == b"x"
    assert unhex(rep["dp1-a"]) == b"d-one" and unhex(rep["dp1-b"]) == b"d-two, longer"
    assert rep["dp1-c-err"] == str(errno.EAGAIN)          # exactly two datagrams
    assert unhex(rep["qp1-a"]) == b"q-" and unhex(rep["qp1-b"]) == b"q-bb"  # boundaries kept
    assert unhex(rep["srv"]) == b"c->s" and unhex(rep["cli"]) == b"s->c"
    lis = str(d / "lis.sock")
    assert rep["srv-name"] == lis and rep["cli-peer"] == lis and rep["lis-name"] == lis
    assert rep["cli-name"] == "-"
    # the pending connection is still pending: accepted now, it carries what was sent into it
    assert rep["accepted"] == "1" and unhex(rep["late"]) == b"late"
    assert rep["accept-more"] == str(errno.EAGAIN)
    got = {unhex(rep["dg-0"]): rep["dg-0-from"], unhex(rep["dg-1"]): rep["dg-1-from"]}
    assert got == {b"from-abstract": "@" + abstract, b"from-unnamed": "-"}
    assert unhex(rep["dg-0"]) == b"from-abstract"        # queue order kept
    assert rep["abs-send"] == "4" and unhex(rep["dg-post"]) == b"post"
    assert rep["abs-name"] == "@" + abstract and rep["abs-peer"] == str(d / "dg.sock")
    assert unhex(rep["sh1"]) == b"last" and rep["sh1-eof"] == "0"
    assert rep["sh0-send"] == "-1" and rep["sh0-errno"] == str(errno.EPIPE)
    assert rep["sh1-send"] == "4" and unhex(rep["sh0"]) == b"back"


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for task in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{task}/children") as f:
                out |= {int(p) for p in f.read().split()}
        except FileNotFoundError:         # a thread that ended meanwhile
            pass
    return out


def test_stream_connected_outside_the_tree_is_refused(c_target, start_target, tmp_path):
    path = str(tmp_path / "outside.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        t = start_target(c_target("restore_sockets"), "external", path)
        conn, _ = listener.accept()
        try:
            sink = io.BytesIO()
            checkpoint(t.pid, sink, kill=True)
            t.proc.wait(timeout=10)
            before = _children()
            with pytest.raises(RestoreError) as e:
                restart_image(bytearray(sink.getvalue()))
            msg = str(e.value)
            assert f"pid {t.pid} fd 5 (socket)" in msg and "outside" in msg, msg
            assert _children() == before
        finally:
            conn.close()
    finally:
        listener.close()


def test_file_in_flight_and_a_closed_peer(c_target, start_target, restarts, tmp_path):
    d = tmp_path
    t = start_target(c_target("restore_sockets"), "more", d)
    r = restarts(t)
    pid = r.root
    assert sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2, 3, 4, 5, 6]
    (d / "go").write_text("1")
    rep = wait_report(str(d / "report"))
    # the pipe's read end came through the queue, and it is the pipe whose write end is fd 6
    assert unhex(rep["scm"]) == b"with-fd" and rep["scm-fd"] == "1"
    assert unhex(rep["scm-pipe"]) == b"piped"
    assert rep["scm-pipe-write"] == "4" and unhex(rep["scm-pipe-more"]) == b"more"
    # the survivor: the queued bytes, then the peer's ECONNRESET, then EOF and EPIPE
    assert unhex(rep["survivor"]) == b"bye"
    assert rep["survivor-2-err"] == str(errno.ECONNRESET)
    assert rep["survivor-3"] == "0"
    assert rep["survivor-send"] == "-1" and rep["survivor-errno"] == str(errno.EPIPE)


def test_a_relative_name_is_bound_without_moving_the_restorers_cwd(tmp_path):
    """bind_from resolves the name from its directory in a thread with its own cwd: the
    restorer's working directory (every thread's) never changes, even for a moment."""
    import threading
    from backend.restore.sockets import bind_from
    base = tmp_path / "dir"
    base.mkdir()
    cwd = os.getcwd()
    seen, stop = set(), threading.Event()

    def watch():                       # another thread of this process, looking all along
        while not stop.is_set():
            seen.add(os.getcwd())
    watcher = threading.Thread(target=watch)
    watcher.start()
    socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(21)]
    try:
        for k, s in enumerate(socks[:20]):
            bind_from(str(base), s, f"sock{k}")
        assert all((base / f"sock{k}").is_socket() for k in range(20))
        with pytest.raises(OSError) as e:                       # a name in use: bind's error
            bind_from(str(base), socks[20], "sock0")
        assert e.value.errno == errno.EADDRINUSE
        with pytest.raises(FileNotFoundError):                  # chdir's error
            bind_from(str(tmp_path / "missing"), socks[20], "sock")
    finally:
        stop.set()
        watcher.join()
        for s in socks:
            s.close()
    assert seen == {cwd} and os.getcwd() == cwd

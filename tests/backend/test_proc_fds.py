"""backend.proc_fds (/proc/PID/fd and fdinfo, also importable from backend.proc) against fds
this process and a Python child open."""
from __future__ import annotations

import os
import socket

import pytest

from backend import proc
from backend.proc import FdKind

def _fd(pid, fd):
    hits = [f for f in proc.read_fds(pid) if f.fd == fd]
    assert len(hits) == 1, f"fd {fd} not in read_fds({pid})"
    return hits[0]


def test_regular_file_fd_path_pos_flags(tmp_path):
    path = tmp_path / "data file"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"a" * 100)
        os.lseek(fd, 37, os.SEEK_SET)
        f = _fd(os.getpid(), fd)
        assert f.kind is FdKind.REGULAR and f.path == str(path) and not f.deleted
        assert f.pos == 37
        assert f.access_mode == os.O_RDWR and f.flags & os.O_APPEND and f.cloexec
        assert f.ino == os.fstat(fd).st_ino and f.mnt_id > 0
        os.unlink(path)
        f = _fd(os.getpid(), fd)
        assert f.path == str(path) and f.deleted and f.kind is FdKind.REGULAR
        assert proc.read_fd(os.getpid(), fd) == f
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError, match=f"no fd {fd}"):
        proc.read_fd(os.getpid(), fd)


def test_pipe_socket_dir_device_and_eventfd_fds(tmp_path):
    r, w = os.pipe()
    s1, s2 = socket.socketpair()
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    null = os.open("/dev/null", os.O_WRONLY)
    efd = os.eventfd(5)
    try:
        fds = {f.fd: f for f in proc.read_fds(os.getpid())}
        for fd, acc in ((r, os.O_RDONLY), (w, os.O_WRONLY)):
            assert fds[fd].kind is FdKind.PIPE and fds[fd].access_mode == acc
            assert fds[fd].ino == os.fstat(r).st_ino
            assert fds[fd].target == f"pipe:[{os.fstat(r).st_ino}]"
        assert fds[s1.fileno()].kind is FdKind.SOCKET
        assert fds[s1.fileno()].ino == os.fstat(s1.fileno()).st_ino != fds[s2.fileno()].ino
        assert fds[d].kind is FdKind.DIRECTORY and fds[d].path == str(tmp_path)
        assert fds[null].kind is FdKind.CHAR_DEVICE
        assert fds[null].rdev == os.stat("/dev/null").st_rdev
        assert fds[efd].kind is FdKind.ANON_INODE and fds[efd].anon_name == "eventfd"
        assert ("eventfd-count", "5") in fds[efd].extra
    finally:
        for fd in (r, w, d, null, efd):
            os.close(fd)
        s1.close()
        s2.close()

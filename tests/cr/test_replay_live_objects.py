"""Live images of objects the model used to lose on replay: mappings of deleted files, shared
anonymous segments holding zero pages, datagram sockets (abstract, and bound in a directory
the fresh model does not have), SCM_RIGHTS files in flight. Each image must replay in a fresh
model and round-trip byte for byte; the target must still hold what it held.

Each target is a small Python child that sets its state up, says READY, and blocks reading
its stdin; it is killed by pid at teardown, whatever the test did.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ckptsim.cr.replay import replay
from ckptsim.image import decode_all

from .test_replay_live import SYS_read, _end, _wait_blocked, by_name, live_image

PAGE = 4096
PRELUDE = "import mmap, os, socket, sys, array\nPAGE = 4096\n"


@pytest.fixture
def py_target(tmp_path):
    """start(code): a Python child running ``code`` (which must end by printing READY and
    blocking on stdin) in ``tmp_path``; returns (Popen, the READY line's words)."""
    procs: list[subprocess.Popen] = []

    def start(code: str):
        proc = subprocess.Popen([sys.executable, "-S", "-c", PRELUDE + code], cwd=tmp_path,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.startswith(b"READY"), line
        _wait_blocked(proc, SYS_read)
        return proc, line.split()[1:]

    try:
        yield start
    finally:
        for proc in procs:
            _end(proc)


READY = "sys.stdout.buffer.write(b'READY %s\\n' % WORDS); sys.stdout.flush(); os.read(0, 1)\n"


def _round_trips(image: bytes):
    report = replay(image, roundtrip=True)
    assert not report.problems, report.summary()
    assert report.roundtrip == "identical", report.summary()
    return report


def test_mappings_of_deleted_files_are_saved_by_contents(py_target):
    proc, words = py_target(r"""
shared_data = b"S" * PAGE + b"s" * PAGE
private_data = b"P" * PAGE + b"p" * PAGE
for name, data in (("shared", shared_data), ("private", private_data)):
    with open(name, "wb") as f:
        f.write(data)
fd = os.open("shared", os.O_RDWR)
shared = mmap.mmap(fd, 2 * PAGE, mmap.MAP_SHARED)
shared[PAGE + 5:PAGE + 12] = b"written"          # reaches the (deleted) file
os.close(fd)
fd = os.open("private", os.O_RDWR)
private = mmap.mmap(fd, 2 * PAGE, mmap.MAP_PRIVATE)
private[10:14] = b"COW!"                          # a private copy, not in the file
os.close(fd)
os.unlink("shared"); os.unlink("private")
WORDS = b"%d" % os.getpid()
""" + READY)
    image = live_image(proc.pid)
    recs = decode_all(image)
    contents = [bytes(r.var) for r in by_name(recs, "FILE_UNLINKED") if r["has_data"]]
    # each deleted file saved once (the child may hold other deleted files: pytest's capture)
    assert contents.count(b"S" * PAGE + b"s" * 5 + b"written" + b"s" * (PAGE - 12)) == 1
    assert contents.count(b"P" * PAGE + b"p" * PAGE) == 1, "the file, without the private copy"
    _round_trips(image)


def test_a_shared_anonymous_zero_page_is_left_out_like_the_model_does(py_target):
    proc, _ = py_target(r"""
seg = mmap.mmap(-1, 3 * PAGE, mmap.MAP_SHARED)
seg[0:PAGE] = bytes(PAGE)                         # written, with zeros
seg[PAGE + 9:PAGE + 17] = b"shared-1"
seg[2 * PAGE:2 * PAGE + 4] = b"gone"; seg[2 * PAGE:2 * PAGE + 4] = bytes(4)
WORDS = b"%d" % os.getpid()
""" + READY)
    image = live_image(proc.pid)
    shmems = by_name(decode_all(image), "SHMEM")
    assert [r["nr_pages"] for r in shmems] == [1], shmems
    _round_trips(image)


def test_datagram_sockets_abstract_and_in_a_missing_directory_replay(py_target, tmp_path):
    os.mkdir(tmp_path / "sub")
    proc, _ = py_target(r"""
name = b"\0ckpt-test-abstract-%d" % os.getpid()
rcv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); rcv.bind(name)
snd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); snd.connect(name)
snd.send(b"abstract-1"); snd.send(b"a2")
path_rcv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); path_rcv.bind("sub/dgram.sock")
other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); other.sendto(b"m1", "sub/dgram.sock")
WORDS = b"%d" % os.getpid()
""" + READY)
    image = live_image(proc.pid)
    recs = decode_all(image)
    states = sorted(r["state"] for r in by_name(recs, "SOCKET"))
    assert states == [1, 1, 1, 3], "only the connected sender is CONNECTED (it has a peer)"
    report = _round_trips(image)
    sock_path = str(tmp_path / "sub" / "dgram.sock")
    assert [r.var for r in by_name(recs, "SOCKET_UNIX_PATH")] == [sock_path]
    assert str(tmp_path / "sub") in report.placeholders, report.placeholders


def _own_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_files_in_flight_are_saved_with_their_bytes_and_left_in_place(py_target, tmp_path):
    """A stream queue: plain bytes, a buffer carrying a pipe's read end, plain bytes; a
    datagram carrying a file and a connected socket. The files are saved where they travel
    (SOCKET_SCM after their buffer), and the target still receives them, unchanged."""
    proc, _ = py_target(r"""
r, w = os.pipe(); os.write(w, b"through-the-pipe")
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
a.send(b"before")
a.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
a.send(b"tail")
os.close(r)
f = os.open("scm.txt", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(f, b"0123456789"); os.lseek(f, 4, 0)
s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
s2.send(b"sock-data")
c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
c.sendmsg([b"two-fds"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f, s1.fileno()]))])
os.close(f); s1.close()
WORDS = b"%d %d %d" % (os.getpid(), b.fileno(), d.fileno())
sys.stdout.buffer.write(b"READY %s\n" % WORDS); sys.stdout.flush(); os.read(0, 1)
out = []
data, anc, _, _ = b.recvmsg(100, socket.CMSG_SPACE(16))
out.append(b"stream1=%s fds=%d" % (data, sum(len(x[2]) // 4 for x in anc)))
(rfd,) = array.array("i", anc[0][2]) if anc else (None,)
if rfd is not None:
    out.append(b"pipe=" + os.read(rfd, 100))
out.append(b"stream2=" + b.recv(100))
data, anc, _, _ = d.recvmsg(100, socket.CMSG_SPACE(16))
fds = array.array("i", anc[0][2]) if anc else []
out.append(b"dgram=%s fds=%d" % (data, len(fds)))
if len(fds) == 2:
    out.append(b"file=" + os.read(fds[0], 100))
    out.append(b"sock=" + os.read(fds[1], 100))
sys.stdout.buffer.write(b" | ".join(out) + b"\n"); sys.stdout.flush()
os.read(0, 1)
""")
    ours = _own_fds()
    image = live_image(proc.pid)
    assert _own_fds() <= ours, "the checkpoint kept fds of the target's files"
    recs = decode_all(image)
    buffers = [(r["nr_files"], bytes(r.var)) for r in by_name(recs, "SOCKET_BUFFER")]
    # the files travel with the run ending with their buffer (its start cannot be peeked)
    assert (1, b"beforeF") in buffers and (0, b"tail") in buffers
    assert (2, b"two-fds") in buffers and (0, b"sock-data") in buffers
    assert len(by_name(recs, "SOCKET_SCM")) == 3
    assert any(r["f_pos"] == 4 for r in by_name(recs, "FILE")), "the file in flight keeps its offset"
    assert [bytes(r.var) for r in by_name(recs, "PIPE_BUF")].count(b"through-the-pipe") == 1
    _round_trips(image)
    proc.stdin.write(b"x")
    proc.stdin.flush()
    line = proc.stdout.readline().strip()
    assert line == (b"stream1=beforeF fds=1 | pipe=through-the-pipe | stream2=tail | "
                    b"dgram=two-fds fds=2 | file=456789 | sock=sock-data"), line

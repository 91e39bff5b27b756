"""Live checkpoint of AF_UNIX sockets (backend/sockets.py): the SOCKET records of a real target
checked against what the target did, and the target's queues intact afterwards (it reads them
and reports the bytes: the checkpoint must have consumed nothing)."""
from __future__ import annotations

import errno
import io
import os

import pytest

from backend.dump import checkpoint
from ckptsim.cr.context import CheckpointError, Log
from ckptsim.image import core, decode_all
from ckptsim.image.types import ObjType

STREAM, DGRAM, SEQPACKET = 1, 2, 5
UNCONNECTED, LISTENING, CONNECTED, CLOSED = 1, 2, 3, 4
RCV_SHUTDOWN, SEND_SHUTDOWN = 1, 2
NAME_OWNED = 1


def sockets_of(recs):
    """({sock objref: {"socket", "unix", "path", "pending", "queue", "buffers"}},
    {fd: sock objref}) from the records of a single-task image."""
    socks, sock_stack, file_stack = {}, [], []
    file_sock, fd_file = {}, {}
    for r in recs:
        name = r.layout.name
        if name == "OBJREF" and r["objtype"] == int(ObjType.SOCK):
            entry = {"buffers": [], "pending": [], "path": None}
            socks[r["objref"]] = entry
            sock_stack.append(entry)
        elif name == "OBJREF" and r["objtype"] == int(ObjType.FILE):
            file_stack.append(r["objref"])
        elif name == "FILE":
            file_sock[file_stack.pop()] = r["sock_objref"]
        elif name == "FILE_DESC":
            fd_file[r["fd_descriptor"]] = r["fd_objref"]
        elif name == "SOCKET":
            sock_stack[-1]["socket"] = r
        elif name == "SOCKET_UNIX":
            sock_stack[-1]["unix"] = r
        elif name == "SOCKET_UNIX_PATH":
            sock_stack[-1]["path"] = r.var
        elif name == "SOCKET_PENDING":
            sock_stack[-1]["pending"].append(r["sock_objref"])
        elif name == "SOCKET_QUEUE":
            sock_stack[-1]["queue"] = r
            if r["nr_buffers"] == 0:
                sock_stack.pop()
        elif name == "SOCKET_BUFFER":
            top = sock_stack[-1]
            raw = bytes(r.var)
            top["buffers"].append((raw[:r["sender_len"]], raw[r["sender_len"]:]))
            if len(top["buffers"]) == top["queue"]["nr_buffers"]:
                sock_stack.pop()
    assert not sock_stack, "a socket's records are incomplete"
    fd_sock = {fd: file_sock[ref] for fd, ref in fd_file.items() if file_sock.get(ref)}
    return socks, fd_sock


def drained(target) -> dict[str, list[bytes]]:
    """Ask the target to read its queues; {socket name: [what each recv returned]}."""
    target.write(b"drain\n")
    out: dict[str, list[bytes]] = {}
    while True:
        line = target.readline()
        assert line is not None, f"target stopped answering; so far {out}"
        if line == "DONE":
            return out
        name, _, value = line.partition(" ")
        if name != "accepted" and not value.startswith("error"):
            value = bytes.fromhex(value)
        out.setdefault(name, []).append(value)


@pytest.fixture
def unix_target(c_target, start_target, tmp_path):
    path = str(tmp_path / "listener.sock")
    abstract = f"ckptsim-test-{os.getpid()}-{os.urandom(4).hex()}"
    t = start_target(c_target("sockets"), path, abstract)
    t.path, t.abstract = path, abstract
    return t


def test_unix_sockets_are_saved_and_left_intact(unix_target, check_untraced):
    t = unix_target
    buf, log = io.BytesIO(), Log()
    checkpoint(t.pid, buf, log=log)
    check_untraced(t.pid)
    socks, fd_sock = sockets_of(decode_all(buf.getvalue()))
    s = {name: socks[fd_sock[fd]] for name, fd in t.info.items()}
    ref = {name: fd_sock[fd] for name, fd in t.info.items()}

    def data(name):
        return [d for _, d in s[name]["buffers"]]

    # every socket is one object, with its type, state and peer
    assert len(set(ref.values())) == len(ref)
    for a, b, kind in (("sp0", "sp1", STREAM), ("dp0", "dp1", DGRAM), ("sq0", "sq1", SEQPACKET),
                       ("sh0", "sh1", STREAM)):
        for x, y in ((a, b), (b, a)):
            assert s[x]["socket"]["type"] == kind and s[x]["socket"]["state"] == CONNECTED
            assert s[x]["unix"]["peer_objref"] == ref[y]
            assert s[x]["socket"]["family"] == 1 and s[x]["socket"]["err"] == 0

    # the image's queues (checked against what the target reads below)
    image_queues = {name: data(name) for name in ("sp0", "sp1", "sh1", "dp1", "sq1")}
    assert image_queues["sp1"] == [b"stream 0->1"]
    assert image_queues["sp0"] == [b"back 1->0, longer"]
    assert image_queues["dp1"] == [b"first datagram", b"second, longer datagram"]
    assert image_queues["sq1"] == [b"seq-a", b"seq-bb"]
    assert image_queues["sh1"] == [b"last words"]
    for name in ("dp0", "sq0", "sh0", "lis", "cli", "abs"):
        assert data(name) == [], name
    for name in image_queues:
        q = s[name]["queue"]
        assert q["queued"] == sum(map(len, image_queues[name]))
    # datagrams from an unnamed socket carry an empty sender; stream data none
    assert [sender for sender, _ in s["dp1"]["buffers"]] == [b"", b""]

    # shutdown: sh0 shut down for writing, so sh1 for reading
    assert s["sh0"]["socket"]["shutdown"] == SEND_SHUTDOWN
    assert s["sh1"]["socket"]["shutdown"] == RCV_SHUTDOWN
    assert s["sp0"]["socket"]["shutdown"] == 0

    # the listener: bound to the path (owned, linked), backlog 4, one pending connection
    lis = s["lis"]
    assert lis["socket"]["state"] == LISTENING and lis["socket"]["type"] == STREAM
    assert lis["unix"]["backlog"] == 4 and lis["unix"]["flags"] & NAME_OWNED
    assert bytes(lis["unix"].var).rstrip(b"\0") == t.path.encode()
    assert lis["path"] == t.path
    assert lis["unix"]["nr_pending"] == 1 and len(lis["pending"]) == 1
    embryo_ref = lis["pending"][0]
    embryo = socks[embryo_ref]
    assert embryo["socket"]["state"] == CONNECTED and embryo["unix"]["peer_objref"] == ref["cli"]
    assert not embryo["unix"]["flags"] & NAME_OWNED
    assert s["cli"]["unix"]["peer_objref"] == embryo_ref
    assert s["cli"]["socket"]["state"] == CONNECTED

    # the abstract name, owned by the unconnected datagram socket
    ab = s["abs"]
    assert ab["socket"]["state"] == UNCONNECTED and ab["socket"]["type"] == DGRAM
    assert bytes(ab["unix"].var) == b"\0" + t.abstract.encode()
    assert ab["unix"]["flags"] & NAME_OWNED and ab["unix"]["peer_objref"] == 0

    # the survivor of a closed peer: its queue, both shutdowns, the pending ECONNRESET, and a
    # peer saved as a closed socket
    cl0 = s["cl0"]
    assert data("cl0") == [b"bye"]
    assert cl0["socket"]["shutdown"] == RCV_SHUTDOWN | SEND_SHUTDOWN
    assert cl0["socket"]["err"] == errno.ECONNRESET
    dead = socks[cl0["unix"]["peer_objref"]]
    assert dead["socket"]["state"] == CLOSED and dead["unix"]["peer_objref"] == 0

    # the target reads its queues: the same bytes, so the checkpoint consumed nothing (nor the
    # pending error: cl0's second recv still reports it)
    got = drained(t)
    assert got["sp1"] == image_queues["sp1"] and got["sp0"] == image_queues["sp0"]
    assert got["sh1"] == image_queues["sh1"]
    assert got["dp1"] == image_queues["dp1"] + [f"error-{errno.EAGAIN}"]
    assert got["sq1"] == image_queues["sq1"]
    assert got["cl0"] == [b"bye", f"error-{errno.ECONNRESET}"]
    assert got["accepted"] == ["1"]


def test_a_socket_of_another_family_is_refused_cleanly(c_target, start_target, check_untraced):
    t = start_target(c_target("sockets"), "inet")
    buf = io.BytesIO()
    with pytest.raises(CheckpointError) as e:
        checkpoint(t.pid, buf)
    assert e.value.errno == errno.ENOSYS
    message = e.value.message
    assert f"task {t.pid}" in message and f"fd {t.info['inet']}" in message
    assert "AF_INET" in message
    assert any(r.layout is core.ERROR for r in decode_all(buf.getvalue()))
    check_untraced(t.pid)
    t.write(b"ping\n")
    assert t.readline() == "ok ping"


def test_files_in_flight_are_saved_and_stay_queued(c_target, start_target, check_untraced):
    """The target's fd 0 is in flight on sv1 (and still open as fd 0): the queue's buffer names
    it with SOCKET_SCM, as the same FILE object as fd 0 (one open file description); the
    target then receives it as before, and the checkpointer kept none of its fds."""
    t = start_target(c_target("sockets"), "scm")
    ours = set(os.listdir("/proc/self/fd"))
    buf = io.BytesIO()
    checkpoint(t.pid, buf)
    assert set(os.listdir("/proc/self/fd")) <= ours, "fds brought by the peek were left open"
    check_untraced(t.pid)
    recs = decode_all(buf.getvalue())
    socks, fd_sock = sockets_of(recs)
    assert socks[fd_sock[t.info["sv1"]]]["buffers"] == [(b"", b"with-fd")]
    (buffer,) = [r for r in recs if r.layout.name == "SOCKET_BUFFER"]
    assert buffer["nr_files"] == 1
    (scm,) = [r for r in recs if r.layout.name == "SOCKET_SCM"]
    fd0 = next(r["fd_objref"] for r in recs if r.layout.name == "FILE_DESC" and r["fd_descriptor"] == 0)
    assert scm["file_objref"] == fd0, "the file in flight is fd 0's open file description"
    t.write(b"drain\n")
    assert t.readline() == f"scm {b'with-fd'.hex()} 1"

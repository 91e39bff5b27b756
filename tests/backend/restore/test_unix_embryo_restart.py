"""Live restart of a listener whose not yet accepted connections hold data (read at checkpoint
by backend/unix_embryo.py's BPF iterator): after a checkpoint with --kill and a restart, the
restored target accepts them and reads what the clients had sent, in order, and nothing more.
Skips, saying why, where the BPF embryo reader cannot run."""
from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from backend import unix_embryo

TARGET = textwrap.dedent("""
    import os, socket, sys, time
    d, abstract = sys.argv[1], "\\0" + sys.argv[2]
    lis = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); lis.bind(d + "/lis.sock")
    lis.listen(4)
    c1 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c1.connect(d + "/lis.sock")
    c1.send(b"first "); c1.send(b"client")
    c2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c2.connect(d + "/lis.sock")
    c2.send(b"second")
    sq = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); sq.bind(abstract); sq.listen(2)
    c3 = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); c3.connect(abstract)
    c3.send(b"rec-1"); c3.send(b""); c3.send(b"r3")
    print("READY", flush=True)
    while not os.path.exists(d + "/go"):
        time.sleep(0.01)
    out = []
    for s in (lis, lis, sq):
        a, _ = s.accept(); a.setblocking(False)
        got = []
        for _ in range(3 if s is sq else 1):
            got.append(a.recv(100).hex() or "-")
        try:
            a.recv(100); got.append("more")
        except BlockingIOError:
            pass
        out.append(",".join(got))
    a.send(b"ack"); out.append(c3.recv(10).hex())
    with open(d + "/report.tmp", "w") as f:
        f.write(" ".join(out))
    os.rename(d + "/report.tmp", d + "/report")
""")


def test_pending_connections_keep_their_data_across_a_restart(start_target, restarts, tmp_path):
    ok, why = unix_embryo.available()
    if not ok:
        pytest.skip(f"the BPF embryo reader is unavailable here: {why}")
    abstract = f"ckptsim-embryo-restart-{os.getpid()}-{time.monotonic_ns()}"
    t = start_target(sys.executable, "-c", TARGET, str(tmp_path), abstract)
    restarts(t)
    (tmp_path / "go").write_text("1")
    deadline = time.monotonic() + 20
    while not (tmp_path / "report").exists():
        assert time.monotonic() < deadline, "the restored target wrote no report"
        time.sleep(0.02)
    first, second, records, ack = (tmp_path / "report").read_text().split()
    assert first == b"first client".hex() and second == b"second".hex()
    assert records == ",".join([b"rec-1".hex(), "-", b"r3".hex()])   # boundaries kept
    assert ack == b"ack".hex()

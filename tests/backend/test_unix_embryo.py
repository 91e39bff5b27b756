"""backend/unix_embryo.py: the queue of a not yet accepted AF_UNIX connection, read by a BPF
iterator without taking anything from it; and the live checkpoint of a listener with such a
connection (backend/sockets.py), which the target then accepts and reads unchanged.

The tests that load the program skip, saying why, when ``unix_embryo.available()`` says no."""
from __future__ import annotations

import array
import errno
import io
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from backend import kabi, unix_embryo
from backend.dump import checkpoint
from backend.unix_embryo import EMB, END, SKB, Embryo, EmbryoUnavailable, parse
from backend.unix_embryo_btf import Btf, BtfError
from ckptsim.cr.context import CheckpointError
from ckptsim.image import decode_all
from ckptsim.model.unix import SOCK_SEQPACKET, SOCK_STREAM

from .test_live_sockets import sockets_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def needs_reader():
    ok, why = unix_embryo.available()
    if not ok:
        pytest.skip(f"the BPF embryo reader is unavailable here: {why}")


# -- the iterator's output, parsed --------------------------------------------------------
def emb(eid, qlen, lis=10, peer=11, typ=SOCK_STREAM, oob=0):
    return EMB.pack(unix_embryo.MAGIC_EMB, qlen, lis, peer, eid, 1, typ, oob)


def skb(data, flags=0, length=None, data_len=0, consumed=0):
    copied = 0 if flags else len(data)
    return SKB.pack(unix_embryo.MAGIC_SKB, 0, len(data) if length is None else length,
                    data_len, consumed, flags, copied, 0) + (b"" if flags else data)


def end(eid, walked, nxt=0):
    return END.pack(unix_embryo.MAGIC_END, walked, eid, nxt)


def test_parse_joins_passes_and_says_where_the_next_starts():
    got: dict[int, Embryo] = {}
    more = parse(emb(1, 3) + skb(b"ab") + skb(b"cd") + end(1, 2, nxt=0xFFFF1)
                 + emb(2, 1, peer=12, typ=SOCK_SEQPACKET) + skb(b"") + end(2, 1), got)
    assert more == {1: 0xFFFF1}
    assert parse(emb(1, 3) + skb(b"xef", consumed=1) + end(1, 1), got) == {}
    assert got[1].buffers == [b"ab", b"cd", b"ef"] and got[1].refusal is None
    assert got[2].buffers == [b""] and got[2].type == SOCK_SEQPACKET and got[2].client_ino == 12


def test_parse_refuses_a_buffer_read_short():
    """A failed kernel read mid-buffer: the bytes still come (zeroes) and a BAD record
    follows; the embryo is refused, and the records after it still parse."""
    got: dict[int, Embryo] = {}
    bad = END.pack(unix_embryo.MAGIC_BAD, 0, 0, 0)
    parse(emb(1, 2) + skb(b"\0\0\0") + bad + skb(b"ok") + end(1, 2)
          + emb(2, 1) + skb(b"fine") + end(2, 1), got)
    assert "could not be read whole" in got[1].refusal
    assert got[2].refusal is None and got[2].buffers == [b"fine"]


@pytest.mark.parametrize("record, why", [
    (skb(b"", flags=unix_embryo.SKB_FLAG_NONLINEAR, length=9000, data_len=8192), "page"),
    (skb(b"", flags=unix_embryo.SKB_FLAG_FILES, length=3), "SCM_RIGHTS"),
    (skb(b"", flags=unix_embryo.SKB_FLAG_TOO_BIG, length=30000), "more than the reader"),
])
def test_parse_refuses_what_it_did_not_copy(record, why):
    got: dict[int, Embryo] = {}
    parse(emb(1, 1) + record + end(1, 1), got)
    assert why in got[1].refusal


def test_parse_refuses_oob_and_rejects_malformed_output():
    got: dict[int, Embryo] = {}
    parse(emb(1, 0, oob=0xFFFF0000) + end(1, 0), got)
    assert "MSG_OOB" in got[1].refusal
    with pytest.raises(EmbryoUnavailable, match="malformed"):
        parse(b"junkjunk", {})
    with pytest.raises(EmbryoUnavailable, match="cut short"):
        parse(emb(1, 1) + skb(b"abcdef")[:-2], {})
    with pytest.raises(EmbryoUnavailable, match="ends inside"):
        parse(emb(1, 1) + skb(b"ab"), {})


def test_segments_as_the_model_keeps_them():
    e = Embryo(10, 11, 1, SOCK_STREAM, 2, [b"ab", b"cd"])
    (seg,) = unix_embryo.segments({11: e}, 10, 11, SOCK_STREAM, None)
    assert bytes(seg.data) == b"abcd" and seg.sender is None
    e = Embryo(10, 11, 1, SOCK_SEQPACKET, 2, [b"r1", b""])
    segs = unix_embryo.segments({11: e}, 10, 11, SOCK_SEQPACKET, None)
    assert [(bytes(s.data), s.sender) for s in segs] == [(b"r1", ""), (b"", "")]
    assert unix_embryo.segments({11: e}, 99, 11, SOCK_SEQPACKET, None) == \
        "the BPF embryo reader did not find it"
    assert unix_embryo.segments("no bcc", 10, 11, SOCK_STREAM, None) == "no bcc"


# -- BTF offsets --------------------------------------------------------------------------
def test_btf_offsets_of_this_kernel():
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        pytest.skip("no kernel BTF here")
    btf = Btf.load()
    assert btf.field_offset("sk_buff", "next") == 0
    assert btf.field_offset("unix_sock", "sk") == 0
    assert btf.field_offset("sock", "__sk_common.skc_state") == \
        btf.field_offset("sock_common", "skc_state")
    flags = unix_embryo.cflags(btf)
    assert len(flags) == len(unix_embryo.OFFSETS) and all(f.startswith("-DOFF_") for f in flags)
    with pytest.raises(BtfError):
        btf.field_offset("sock", "no_such_field")
    with pytest.raises(BtfError):
        btf.field_offset("no_such_struct_here", "x")
    func = btf.type_id("bpf_iter_unix", kabi.BTF_KIND_FUNC)      # the iterator's attach target
    assert func > 0 and btf.type_id("unix_sock", kabi.BTF_KIND_STRUCT) != func
    with pytest.raises(BtfError):
        btf.type_id("bpf_iter_unix", kabi.BTF_KIND_STRUCT)


def test_offsets_are_kept_between_runs(monkeypatch, tmp_path):
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        pytest.skip("no kernel BTF here")
    monkeypatch.setenv("CKPTSIM_CACHE_DIR", str(tmp_path))
    assert unix_embryo._cflags_if_cached() is None
    flags = unix_embryo.cflags(Btf.load())
    unix_embryo._save_cflags(flags)
    assert unix_embryo._cflags_if_cached() == flags
    path = tmp_path / unix_embryo.CACHE_NAME
    path.write_text(path.read_text().replace(os.uname().release, "another-kernel"))
    assert unix_embryo._cflags_if_cached() is None               # another kernel's: not used


# -- the reader on sockets of this process --------------------------------------------------
@pytest.fixture
def listener():
    socks = []

    def make(kind):
        s = socket.socket(socket.AF_UNIX, kind)
        s.bind(f"\0ckptsim-embryo-{os.getpid()}-{os.urandom(4).hex()}")
        s.listen(8)
        socks.append(s)
        return s

    def client(lis):
        c = socket.socket(socket.AF_UNIX, lis.type)
        c.connect(lis.getsockname())
        socks.append(c)
        return c

    make.client = client
    yield make
    for s in socks:
        s.close()


def ino(s) -> int:
    return os.fstat(s.fileno()).st_ino


def test_reader_copies_queues_and_leaves_them(listener):
    needs_reader()
    lis, seq = listener(socket.SOCK_STREAM), listener(socket.SOCK_SEQPACKET)
    c1 = listener.client(lis)
    for i in range(100):                                  # several passes (32 buffers each)
        c1.send(b"%03d," % i)
    c2 = listener.client(lis)                             # nothing written
    c3 = listener.client(seq)
    for rec in (b"rec-1", b"r2", b"", b"y" * 15000):
        c3.send(rec)
    got = unix_embryo.read_embryos([ino(lis), ino(seq)])
    assert got[ino(c1)].buffers == [b"%03d," % i for i in range(100)]
    assert got[ino(c1)].listener_ino == ino(lis) and got[ino(c1)].refusal is None
    assert got[ino(c2)].buffers == [] and got[ino(c2)].qlen == 0
    assert got[ino(c3)].buffers == [b"rec-1", b"r2", b"", b"y" * 15000]
    assert got[ino(c3)].type == SOCK_SEQPACKET
    assert unix_embryo.read_embryos([ino(seq)]).keys() == {ino(c3)}   # only those asked for
    s1, _ = lis.accept()                                  # nothing was taken
    with s1:
        s1.setblocking(False)
        assert s1.recv(1000) == b"".join(b"%03d," % i for i in range(100))
    s3, _ = seq.accept()
    with s3:
        assert [s3.recv(20000) for _ in range(4)] == [b"rec-1", b"r2", b"", b"y" * 15000]


def test_reader_splits_big_buffers_across_passes(listener):
    """A pass copies at most 20 KiB per embryo (one object's output must fit the iterator's
    32 KiB seq buffer): three 15000-byte records take three passes, in order."""
    needs_reader()
    seq = listener(socket.SOCK_SEQPACKET)
    c = listener.client(seq)
    recs = [bytes([65 + i]) * 15000 for i in range(3)] + [b"tail"]
    for rec in recs:
        c.send(rec)
    got = unix_embryo.read_embryos([ino(seq)])[ino(c)]
    assert got.refusal is None and got.buffers == recs


def test_reader_refuses_what_it_cannot_copy(listener):
    needs_reader()
    lis = listener(socket.SOCK_STREAM)
    big, fds, oob = listener.client(lis), listener.client(lis), listener.client(lis)
    big.send(b"z" * 9000)                                 # page frags
    fds.sendmsg([b"f"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0]))])
    oob.send(b"a")
    oob.send(b"!", socket.MSG_OOB)
    got = unix_embryo.read_embryos([ino(lis)])
    assert "page fragments" in got[ino(big)].refusal
    assert "SCM_RIGHTS" in got[ino(fds)].refusal
    assert "MSG_OOB" in got[ino(oob)].refusal


# -- the live checkpoint ------------------------------------------------------------------
TARGET = textwrap.dedent("""
    import os, socket, sys
    name = "\\0" + sys.argv[1]   # abstract
    lis = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); lis.bind(name); lis.listen(4)
    c1 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c1.connect(name)
    c1.send(b"hello "); c1.send(b"embryo")
    sq = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); sq.bind(name + "-sq"); sq.listen(4)
    c2 = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); c2.connect(name + "-sq")
    c2.send(b"rec-1"); c2.send(b"r2")
    print(f"READY lis={lis.fileno()} c1={c1.fileno()} sq={sq.fileno()} c2={c2.fileno()}", flush=True)
    sys.stdin.readline()
    a, _ = lis.accept(); a.setblocking(False)
    b, _ = sq.accept(); b.setblocking(False)
    print(a.recv(100).hex(), b.recv(100).hex(), b.recv(100).hex(), flush=True)
""")


def test_checkpoint_saves_a_pending_connections_data(start_target, check_untraced):
    needs_reader()
    name = f"ckptsim-embryo-ckpt-{os.getpid()}-{os.urandom(4).hex()}"
    t = start_target(sys.executable, "-c", TARGET, name)
    buf = io.BytesIO()
    checkpoint(t.pid, buf)
    check_untraced(t.pid)
    socks, fd_sock = sockets_of(decode_all(buf.getvalue()))
    (emb1,) = socks[fd_sock[t.info["lis"]]]["pending"]
    assert socks[emb1]["buffers"] == [(b"", b"hello embryo")]
    assert socks[emb1]["unix"]["peer_objref"] == fd_sock[t.info["c1"]]
    (emb2,) = socks[fd_sock[t.info["sq"]]]["pending"]
    assert [d for _, d in socks[emb2]["buffers"]] == [b"rec-1", b"r2"]
    t.write(b"go\n")                                      # the target's queues are intact
    assert t.readline() == f"{b'hello embryo'.hex()} {b'rec-1'.hex()} {b'r2'.hex()}"


def test_without_the_reader_the_checkpoint_refuses_saying_why(start_target, check_untraced,
                                                              monkeypatch):
    monkeypatch.setattr(unix_embryo, "_why_unavailable", lambda: "bcc is not installed (test)")
    name = f"ckptsim-embryo-nobpf-{os.getpid()}-{os.urandom(4).hex()}"
    t = start_target(sys.executable, "-c", TARGET, name)
    with pytest.raises(CheckpointError) as e:
        checkpoint(t.pid, io.BytesIO())
    assert e.value.errno == errno.ENOSYS
    assert "pending connection" in e.value.message and "bcc is not installed (test)" in \
        e.value.message and f"fd {t.info['lis']}" in e.value.message
    check_untraced(t.pid)
    t.write(b"go\n")
    assert t.readline() == f"{b'hello embryo'.hex()} {b'rec-1'.hex()} {b'r2'.hex()}"


PLAIN = textwrap.dedent("""
    import socket, sys
    lis = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); lis.bind("\\0" + sys.argv[1])
    lis.listen(4)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect("\\0" + sys.argv[1])
    print("READY", flush=True)
    sys.stdin.readline()
""")


def test_an_ordinary_checkpoint_loads_no_bpf(start_target):
    """A listener whose pending connection holds no data needs no reader: neither the reader
    nor bcc (LLVM) is imported, and the checkpointer stays small."""
    name = f"ckptsim-embryo-plain-{os.getpid()}-{os.urandom(4).hex()}"
    t = start_target(sys.executable, "-c", PLAIN, name)
    # VmHWM, not ru_maxrss: the latter keeps the high-water mark of the mm a vfork child
    # execs from (this test process's, which may hold bcc)
    code = ("import io, sys; from backend.dump import checkpoint; "
            f"checkpoint({t.pid}, io.BytesIO()); "
            "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')]; "
            "print('backend.unix_embryo' in sys.modules, 'bcc' in sys.modules, hwm[0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    assert r.returncode == 0, r.stderr
    embryo_loaded, bcc_loaded, maxrss_kib = r.stdout.split()
    assert (embryo_loaded, bcc_loaded) == ("False", "False")
    assert int(maxrss_kib) < 64 * 1024


def test_a_checkpoint_with_the_reader_stays_small_and_never_imports_bcc(start_target, tmp_path):
    """bcc (LLVM) compiles the reader in a child process, once; the checkpointer loads the
    cached bytecode with bpf(2): cold or warm, it imports no bcc and stays under 64 MiB."""
    needs_reader()
    name = f"ckptsim-embryo-small-{os.getpid()}-{os.urandom(4).hex()}"
    t = start_target(sys.executable, "-c", TARGET, name)
    code = ("import io, sys; from backend.dump import checkpoint; buf = io.BytesIO(); "
            f"checkpoint({t.pid}, buf); "
            "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')]; "
            "print('backend.unix_embryo' in sys.modules, 'bcc' in sys.modules, hwm[0], "
            "b'hello embryo' in buf.getvalue())")
    kept = None
    for cache in ("cold", "warm"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": ROOT,
                                                       "CKPTSIM_CACHE_DIR": str(tmp_path)})
        assert r.returncode == 0, r.stderr
        embryo_loaded, bcc_loaded, hwm_kib, saved = r.stdout.split()
        assert (embryo_loaded, bcc_loaded, saved) == ("True", "False", "True"), cache
        assert int(hwm_kib) < 64 * 1024, cache
        st = os.stat(tmp_path / unix_embryo.prog.CACHE_NAME)
        if kept is not None:                              # warm: loaded from the cache, not redone
            assert (st.st_ino, st.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
        kept = st
    t.write(b"go\n")                                      # the target's queues are intact
    assert t.readline() == f"{b'hello embryo'.hex()} {b'rec-1'.hex()} {b'r2'.hex()}"

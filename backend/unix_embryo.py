"""The queued data of AF_UNIX connections not yet accepted, read without touching them.

A connection not yet accepted has a server-side socket (an "embryo") in its listener's accept
queue: no fd, no inode, so it cannot be peeked, and accepting it would change what the tree
sees. bpf/unix_embryo.c, a BPF iterator over the unix sockets of our network namespace
(iter/unix, Linux >= 5.17), finds the embryos of the listeners asked about
(by their ``listener`` pointer, Linux >= 6.10) and copies each queued buffer's bytes out; the
queue is only read. Struct offsets come from the kernel's BTF (backend/unix_embryo_btf.py).

    available() -> (bool, reason)            root, BTF, and a cached program or what compiles
                                             one (bcc found, not imported; headers)
    read_embryos(listener_inos) -> {client inode: Embryo}
    try_read(listener_inos) -> {client inode: Embryo} | why not (str)
    segments(answer, listener, client, type, address) -> [Segment] | why not (str)

Only loaded when a checkpoint meets a pending connection with data. The checkpointer never
imports bcc (it brings LLVM, ~130 MiB): bcc compiles the program once, in a child process, and
the bytecode is kept in the run cache and loaded with bpf(2) (backend/unix_embryo_prog.py).
What it cannot copy is refused by the caller with a reason
(``Embryo.refusal``): buffers with page frags (stream writes above ~3.7 KiB), files in flight
(SCM_RIGHTS), MSG_OOB data, linear parts above 20 KiB. A queue that changed between passes
(a writer outside the stopped tree) shows as a count that does not add up, also refused.
"""
from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass, field

from ckptsim.errors import CkptsimError
from ckptsim.model.unix import SOCK_STREAM, UNNAMED, Segment

from . import bpf_tracker, runcache
from . import unix_embryo_prog as prog
from .unix_embryo_btf import BTF_PATH, Btf, BtfError

PROGRAM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf",
                       "unix_embryo.c")
CACHE_NAME = "unix-embryo-offsets.json"
MAX_PASSES = 4096                     # 32 buffers per embryo and pass: ~130k buffers

# bpf/unix_embryo.c's records
MAGIC_EMB, MAGIC_SKB, MAGIC_END = 0x424D4555, 0x424B5355, 0x444E4555
MAGIC_BAD = 0x44414255          # an END-shaped record: the buffer before it was not read whole
EMB = struct.Struct("<IIQQQIIQ")      # magic, qlen, listener_ino, peer_ino, id, state, type, oob
SKB = struct.Struct("<IIIIIIII")      # magic, index, len, data_len, consumed, flags, copied, pad
END = struct.Struct("<IIQQ")          # magic, walked, id, next
SKB_FLAG_NONLINEAR, SKB_FLAG_FILES, SKB_FLAG_TOO_BIG = 1, 2, 4

# -D macro -> (struct, field) in the kernel's BTF
OFFSETS = {
    "OFF_SK_SOCKET": ("sock", "sk_socket"),
    "OFF_SK_STATE": ("sock", "__sk_common.skc_state"),
    "OFF_SK_TYPE": ("sock", "sk_type"),
    "OFF_SK_RQUEUE": ("sock", "sk_receive_queue"),
    "OFF_HEAD_QLEN": ("sk_buff_head", "qlen"),
    "OFF_SOCKET_INODE": ("socket_alloc", "vfs_inode"),
    "OFF_I_INO": ("inode", "i_ino"),
    "OFF_U_PEER": ("unix_sock", "peer"),
    "OFF_U_LISTENER": ("unix_sock", "listener"),
    "OFF_U_OOB_SKB": ("unix_sock", "oob_skb"),
    "OFF_SKB_LEN": ("sk_buff", "len"),
    "OFF_SKB_DATA_LEN": ("sk_buff", "data_len"),
    "OFF_SKB_DATA": ("sk_buff", "data"),
    "OFF_SKB_CB": ("sk_buff", "cb"),
    "OFF_UCB_FP": ("unix_skb_parms", "fp"),
    "OFF_UCB_CONSUMED": ("unix_skb_parms", "consumed"),
}


class EmbryoUnavailable(CkptsimError):
    """The embryo reader cannot run here; the message says why."""


@dataclass
class Embryo:
    """One not yet accepted connection as the iterator saw it."""
    listener_ino: int
    client_ino: int                    # 0: the client closed
    state: int
    type: int
    qlen: int                          # buffers in its receive queue
    buffers: list[bytes] = field(default_factory=list)
    refusal: str | None = None         # why its queue cannot be saved, if it cannot

    def refuse(self, why: str) -> None:
        if self.refusal is None:
            self.refusal = why


def _bcc_findable() -> bool:
    """bcc can be found (not imported: that loads LLVM; the compile child imports it)."""
    return importlib.util.find_spec("bcc") is not None or \
        os.path.exists(os.path.join(bpf_tracker.DEBIAN_BCC, "__init__.py"))


def _cached_program() -> prog.Program | None:
    flags = _cflags_if_cached()
    if flags is None:
        return None
    return prog.load_cached(flags, prog.source_sha(PROGRAM))[0]


def _why_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root (loading a BPF iterator needs root)"
    if not os.path.exists(PROGRAM):
        return f"{PROGRAM} is missing"
    if not os.path.exists(BTF_PATH):
        return f"no kernel BTF at {BTF_PATH}"
    if _cached_program() is not None:
        return None                                    # compiled already: no bcc needed
    headers = bpf_tracker._headers_dir()
    if not os.path.isdir(os.path.join(headers, "include")):
        return f"no kernel headers at {headers} (scripts/setup.sh links them)"
    if not _bcc_findable():
        return "bcc is not installed (apt-get install python3-bpfcc; scripts/setup.sh does it)"
    return None


def available() -> tuple[bool, str]:
    why = _why_unavailable()
    if why:
        return False, why
    if _cached_program() is not None:
        return True, "kernel BTF and a cached compiled program (loaded with bpf(2), no bcc)"
    return True, ("bcc (found, not imported), kernel BTF and headers; compiled on first use "
                  "in a child process")


def cflags(btf: Btf) -> list[str]:
    """The -D macros of the program's offsets. Raises EmbryoUnavailable."""
    try:
        return [f"-D{name}={btf.field_offset(s, f)}" for name, (s, f) in OFFSETS.items()]
    except BtfError as e:
        raise EmbryoUnavailable(f"this kernel's structs do not fit the embryo reader: {e}") \
            from None


def _cflags_key() -> list:
    uname = os.uname()
    try:
        key = [uname.release, uname.version, os.stat(BTF_PATH).st_size, sorted(OFFSETS.items())]
    except OSError as e:
        raise EmbryoUnavailable(f"no kernel BTF: {e.strerror}") from None
    return json.loads(json.dumps(key))      # as runcache gives it back (lists, not tuples)


def _cflags_if_cached() -> list[str] | None:
    """``cflags`` of this kernel if kept from an earlier run (backend/runcache.py; parsing
    the BTF takes ~0.2 s and ~20 MiB, so the compile child does it), keyed by the kernel's
    build and its BTF's size."""
    doc = runcache.load(CACHE_NAME)
    if isinstance(doc, dict) and doc.get("key") == _cflags_key() \
            and isinstance(doc.get("cflags"), list) \
            and all(isinstance(f, str) for f in doc["cflags"]):
        return doc["cflags"]
    return None


def _save_cflags(flags: list[str]) -> None:
    runcache.save(CACHE_NAME, {"key": _cflags_key(), "cflags": flags})


def parse(out: bytes, embryos: dict[int, Embryo]) -> dict[int, int]:
    """Add one pass's records to ``embryos`` (by embryo id); returns id -> next buffer for the
    embryos the pass did not finish."""
    more: dict[int, int] = {}
    off = 0
    current: Embryo | None = None
    while off < len(out):
        magic = int.from_bytes(out[off:off + 4], "little")
        if magic == MAGIC_EMB:
            _, qlen, lis, peer, eid, state, typ, oob = EMB.unpack_from(out, off)
            off += EMB.size
            current = embryos.get(eid)
            if current is None:
                current = embryos[eid] = Embryo(lis, peer, state, typ, qlen)
            if oob:
                current.refuse("MSG_OOB data in its queue")
        elif magic == MAGIC_SKB and current is not None:
            _, _, length, data_len, consumed, flags, copied, _ = SKB.unpack_from(out, off)
            off += SKB.size
            data = out[off:off + copied]
            off += copied
            if len(data) != copied:
                raise EmbryoUnavailable("the embryo reader's output is cut short")
            if flags & SKB_FLAG_FILES:
                current.refuse("files in flight (SCM_RIGHTS) in its queue")
            elif flags & SKB_FLAG_NONLINEAR:
                current.refuse(f"a buffer of {length} bytes with {data_len} of them in page "
                               "fragments (a write above ~3.7 KiB), which the reader does "
                               "not copy")
            elif flags & SKB_FLAG_TOO_BIG:
                current.refuse(f"a buffer of {length} bytes, more than the reader copies")
            current.buffers.append(data[consumed:])
        elif magic == MAGIC_BAD and current is not None:
            off += END.size
            current.refuse("a queued buffer that could not be read whole")
        elif magic == MAGIC_END and current is not None:
            _, _, eid, nxt = END.unpack_from(out, off)
            off += END.size
            if nxt:
                more[eid] = nxt
            current = None
        else:
            raise EmbryoUnavailable(f"the embryo reader's output is malformed at byte {off}")
    if current is not None:
        raise EmbryoUnavailable("the embryo reader's output ends inside a record")
    return more


def _compiled(flags: list[str] | None) -> tuple[prog.Program, dict]:
    """A fresh compile, in a child process (``flags`` None: the child works them out from the
    BTF, which the checkpointer then need not parse): the program and its document."""
    try:
        doc = prog.compile_in_child(flags)
        return prog.Program.from_doc(doc), doc
    except prog.ProgError as e:
        raise EmbryoUnavailable(str(e)) from None


def _load() -> prog.Loaded:
    """The program loaded: from the cache, else compiled now and kept for later runs once the
    kernel took it; a cached program the kernel refuses is compiled again once (the cache is
    not trusted further than that)."""
    flags = _cflags_if_cached()
    cached = None if flags is None else prog.load_cached(flags, prog.source_sha(PROGRAM))[0]
    if cached is not None:
        try:
            return prog.Loaded(cached)
        except prog.ProgError:
            pass                           # compiled again below
    program, doc = _compiled(flags)
    try:
        loaded = prog.Loaded(program)
    except prog.ProgError as e:
        raise EmbryoUnavailable(f"{PROGRAM} did not load (iter/unix needs Linux >= 5.17): "
                                f"{e}") from None
    if flags is None:
        _save_cflags(doc["cflags"])
    prog.save(doc)
    return loaded


def read_embryos(listener_inos) -> dict[int, Embryo]:
    """The not yet accepted connections of the listeners with these inodes (in our network
    namespace), by client inode (0 for clients that closed: at most one kept). Raises
    EmbryoUnavailable if the reader cannot load or run."""
    why = _why_unavailable()
    if why:
        raise EmbryoUnavailable(f"the BPF embryo reader is unavailable: {why}")
    embryos: dict[int, Embryo] = {}
    with _load() as loaded:
        try:
            for ino in listener_inos:
                loaded.update("listeners", ino, 1)
            for _ in range(MAX_PASSES):
                more = parse(loaded.iterate(), embryos)
                if not more:
                    break
                loaded.clear("cursor")
                loaded.update("cursor", 0, 1)           # a later pass: these only
                for eid, nxt in more.items():
                    loaded.update("cursor", eid, nxt)
            else:
                raise EmbryoUnavailable(f"more than {MAX_PASSES} passes of the embryo reader")
        except prog.ProgError as e:
            raise EmbryoUnavailable(f"the embryo reader: {e}") from None
    out: dict[int, Embryo] = {}
    for emb in embryos.values():
        if len(emb.buffers) != emb.qlen:
            emb.refuse(f"{emb.qlen} buffers queued, {len(emb.buffers)} read (the queue changed "
                       "while it was read?)")
        out[emb.client_ino] = emb
    return out


def try_read(listener_inos) -> dict[int, Embryo] | str:
    """``read_embryos``, or why it cannot run (a str)."""
    try:
        return read_embryos(listener_inos)
    except EmbryoUnavailable as e:
        return str(e)


def segments(answer: dict[int, Embryo] | str, listener_ino: int, client_ino: int,
             sock_type: int, client_address) -> list[Segment] | str:
    """The queue of ``client_ino``'s pending connection to ``listener_ino`` as the model keeps
    it (a stream's plain bytes merged into one segment; a seqpacket's records sent by the
    client, under its name), or why it cannot be saved (a str)."""
    if isinstance(answer, str):
        return answer
    emb = answer.get(client_ino)
    if emb is None or emb.listener_ino != listener_ino:
        return "the BPF embryo reader did not find it"
    if emb.refusal:
        return emb.refusal
    if sock_type == SOCK_STREAM:
        data = b"".join(emb.buffers)
        return [Segment(data, None)] if data else []
    sender = client_address if client_address is not None else UNNAMED
    return [Segment(b, sender) for b in emb.buffers]

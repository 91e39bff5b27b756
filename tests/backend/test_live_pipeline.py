"""The overlapped page path of the live checkpoint: ImageWriter's checksum helper thread,
LiveMM.present_chunks' read-ahead thread, and the per-process feature probe cache."""
from __future__ import annotations

import io
import mmap
import os
import signal
import random
import subprocess
import sys
import threading
import zlib
from array import array

import pytest

from backend import features, proc
from backend.features import Feature, MissingFeatures
from backend.memory import ProcessMemory
from backend.snapshot import LiveMM, LiveVMA
from ckptsim.image import codec, core
from ckptsim.image.codec import ImageReader, ImageWriter
from ckptsim.kinds import load_all

PAGE = 4096


def _pages(n: int, seed: int) -> bytes:
    """n pages of non-zero bytes that differ from page to page."""
    page = bytes((i * 7 + seed) % 251 + 1 for i in range(PAGE))
    return b"".join(page[k % 97:] + page[:k % 97] for k in range(n))


# --- ImageWriter: the checksum helper ------------------------------------------------------

def _tail_checksum_ok(image: bytes) -> bool:
    """The tail's checksum is the CRC-32 of every byte before the tail."""
    tail = len(image) - core.TAIL_SIZE
    checksum = core.TAIL.struct.unpack_from(image, tail + 8)[2]
    return checksum == zlib.crc32(image[:tail])


def _records(image: bytes) -> list:
    """Every record, with framing, objrefs, tail count and checksum checked."""
    reader = ImageReader(image)
    recs = list(reader.records())
    reader.finish()
    return recs


def _image(data: bytes, sink) -> ImageWriter:
    load_all()
    w = ImageWriter(sink)
    w.write(core.STRING, var="before")
    n = len(data) // PAGE
    w.write_pages(array("Q", range(0, n * PAGE, PAGE)), data)
    w.end_pages()
    w.finish()
    return w


def test_large_parts_give_the_serial_checksum_and_bytes():
    data = _pages(2500, 3)                      # three chunks, the last one partial
    out = io.BytesIO()
    w = _image(data, out)
    image = out.getvalue()
    assert _tail_checksum_ok(image)             # what a serial writer computes
    recs = [r for r in _records(image) if r.layout.name == "BUFFER"]
    assert len(recs) == 3
    got = b"".join(bytes(r.var[len(r.var) // (8 + PAGE) * 8:]) for r in recs)
    assert got == data


def test_crc32_combine_is_zlibs():
    rnd = random.Random(4)
    for _ in range(300):
        a = rnd.randbytes(rnd.randrange(0, 5000))
        b = rnd.randbytes(rnd.choice([0, 1, 7, rnd.randrange(0, 5000)]))
        assert codec.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_a_part_of_odd_size_is_checksummed_in_pieces_like_zlib():
    data = _pages(700, 29)[:(700 * PAGE) - 8]       # pieces of 1 MiB and an odd tail
    h = codec._Checksummer.get()
    out = io.BytesIO()
    assert h.write_and_crc(out, data, 12345) == zlib.crc32(data, 12345)
    assert out.getvalue() == data


class _SlowSink(io.BytesIO):
    """A write that lets the helper thread claim its checksum job first."""

    def write(self, b):
        threading.Event().wait(0.01)
        return super().write(b)


class _FailingSink(io.BytesIO):
    def __init__(self, fail_after: int):
        super().__init__()
        self.left = fail_after

    def write(self, b):
        if len(b) >= codec._PARALLEL_CRC_MIN:
            self.left -= 1
            if self.left < 0:
                raise OSError(28, "No space left on device")
        return super().write(b)


def test_a_slow_sink_still_gets_the_right_checksum():
    data = _pages(3000, 5)
    out = _SlowSink()
    w = _image(data, out)
    image = out.getvalue()
    assert _tail_checksum_ok(image)


def test_a_failing_write_raises_and_leaves_the_helper_usable():
    data = _pages(2048, 7)
    with pytest.raises(OSError, match="No space left"):
        _image(data, _FailingSink(fail_after=1))
    # the helper holds no stale result: the next image is right
    out = io.BytesIO()
    w = _image(data, out)
    image = out.getvalue()
    assert _tail_checksum_ok(image)
    _records(image)


def test_writers_in_several_threads_each_get_their_own_checksum():
    datas = [_pages(1100, s) for s in (11, 13, 17, 19)]
    results: dict[int, tuple[int, bytes]] = {}
    errors = []

    def run(i):
        try:
            out = io.BytesIO()
            w = _image(datas[i], out)
            results[i] = (w.crc, out.getvalue())
        except BaseException as e:       # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(datas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    for i, (crc, image) in results.items():
        assert crc == zlib.crc32(image) and _tail_checksum_ok(image), i
    assert len(results) == len(datas)


def test_a_forked_child_makes_its_own_helper():
    codec._Checksummer.get()                    # the parent's helper thread exists
    data = _pages(1500, 23)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                # the child: report its crc, always exit
        code = 1
        try:
            os.close(r)
            out = io.BytesIO()
            writer = _image(data, out)
            image = out.getvalue()
            ok = writer.crc == zlib.crc32(image) and _tail_checksum_ok(image)
            os.write(w, b"ok" if ok else b"bad")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            got = f.read()
    finally:
        _, status = os.waitpid(pid, 0)
    assert got == b"ok" and os.waitstatus_to_exitcode(status) == 0


# --- LiveMM.present_chunks: read-ahead --------------------------------------------------------

TARGET = r"""
import mmap, sys
n = int(sys.argv[1])
m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
page = bytes((i * 7 + 1) % 251 + 1 for i in range(4096))
zero = {int(z) for z in sys.argv[2].split(",")}
for k in range(n):
    if k in zero:
        m[k * 4096:(k + 1) * 4096] = bytes(4096)            # written, but all zeros
    else:
        m[k * 4096:(k + 1) * 4096] = k.to_bytes(4, "little") + page[4:]
import ctypes
sys.stdout.write("%d\n" % ctypes.addressof(ctypes.c_char.from_buffer(m)))
sys.stdout.flush()
sys.stdin.read()
"""


@pytest.fixture
def target(request):
    n = 2600                                    # three chunks of 1024 pages
    zero = [0, 1023, 1024, 1500, 2047, 2599]    # at and across the chunk edges
    p = subprocess.Popen([sys.executable, "-c", TARGET, str(n), ",".join(map(str, zero))],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def end():
        p.stdin.close()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stdout.close()
    request.addfinalizer(end)
    line = p.stdout.readline()
    assert line, f"target exited with {p.poll()}"
    return p.pid, int(line), n, set(zero)


def _block_vma(pid: int, start: int) -> LiveVMA:
    entry = next(e for e in proc.read_smaps(pid) if e.mapping.start <= start < e.mapping.end)
    return LiveVMA(entry, None)


@pytest.mark.parametrize("max_pages", [1024, 333])
def test_present_chunks_reads_ahead_in_order_and_drops_zero_pages(target, max_pages):
    pid, start, n, zero = target
    vma = _block_vma(pid, start)
    mm = LiveMM(pid, proc.read_stat(pid), [vma], None)
    page = bytes((i * 7 + 1) % 251 + 1 for i in range(PAGE))
    addrs, seen = [], 0
    try:
        for part, view, crc in mm.present_chunks(vma, max_pages):
            assert 0 < len(part) <= max_pages and len(view) == len(part) * PAGE
            held = bytes(view)
            assert crc == zlib.crc32(held)
            threading.Event().wait(0.02)    # the reader runs meanwhile: not into this chunk
            assert bytes(view) == held, "a chunk changed before the next one was asked for"
            for i, a in enumerate(part):
                if not start <= a < start + n * PAGE:
                    continue
                k = (a - start) // PAGE
                assert bytes(view[i * PAGE:(i + 1) * PAGE]) == k.to_bytes(4, "little") + page[4:], k
                addrs.append(a)
            seen += 1
    finally:
        mm.close()
    assert addrs == [start + k * PAGE for k in range(n) if k not in zero]
    assert seen >= -(-(n - len(zero)) // max_pages)


def test_present_chunks_stopped_early_leaves_no_reader_thread(target):
    from ckptsim.threads import Background
    pid, start, n, zero = target
    vma = _block_vma(pid, start)
    mm = LiveMM(pid, proc.read_stat(pid), [vma], None)
    before = set(Background.running())
    try:
        chunks = mm.present_chunks(vma, 512)
        next(chunks)
        assert f"ckptsim-read-{pid}" in Background.running()
        chunks.close()
    finally:
        mm.close()
    assert not [name for name in Background.running()
                if name.startswith("ckptsim-read-") and name not in before]


def _private_vmas(pid: int) -> list[LiveVMA]:
    return [LiveVMA(e, None) for e in proc.read_smaps(pid)
            if e.mapping.path == "" and "s" not in e.mapping.perms]


def _collect(chunks) -> list[tuple[tuple, bytes]]:
    return [(tuple(part), bytes(view)) for part, view, _ in chunks]


def test_one_stream_across_vmas_gives_what_each_vma_alone_gives(target):
    """present_chunks in the VMAs' order comes from one stream read ahead across VMAs; asked
    out of order or twice, a VMA is read on its own: the same pages either way."""
    pid, start, n, zero = target
    vmas = _private_vmas(pid)
    assert len(vmas) >= 3 and any(v.start <= start < v.end for v in vmas)
    ref_mm = LiveMM(pid, proc.read_stat(pid), vmas, None)
    mm = LiveMM(pid, proc.read_stat(pid), vmas, None)
    os.kill(pid, signal.SIGSTOP)         # (its heap would change between the reads)
    try:
        while proc.read_stat(pid).state != "T":
            threading.Event().wait(0.001)
        memory = ref_mm._process_memory()
        want = [_collect(ref_mm._chunks(memory.pages_to_dump(v.entry), 512, drop_zero=True))
                for v in vmas]
        assert sum(len(w) for w in want) > 3          # (the block alone is 5 chunks of 512)
        got = [_collect(mm.present_chunks(v, 512)) for v in vmas[:-1]]
        assert mm._stream is not None                 # in order: all from the stream
        assert got == want[:-1]
        assert _collect(mm.present_chunks(vmas[0], 512)) == want[0]    # again: on its own
        assert mm._stream is None
        assert _collect(mm.present_chunks(vmas[-1], 512)) == want[-1]
    finally:
        os.kill(pid, signal.SIGCONT)
        mm.close()
        ref_mm.close()


@pytest.mark.parametrize("use_scan", [None, False], ids=["pagemap-scan", "pagemap-fallback"])
def test_one_scan_for_many_vmas_finds_what_a_scan_each_finds(target, use_scan):
    pid, start, n, zero = target
    vmas = [e for e in proc.read_smaps(pid) if "s" not in e.mapping.perms
            and not e.mapping.path.startswith("[v")]          # (not the vdso and vvar)
    memory = ProcessMemory(pid, use_scan=use_scan)
    os.kill(pid, signal.SIGSTOP)         # (its heap would change between the two scans)
    try:
        while proc.read_stat(pid).state != "T":
            threading.Event().wait(0.001)
        each = [memory.pages_to_dump(v) for v in vmas]
        calls, read = memory.stats.scan_calls, memory.stats.pagemap_bytes
        many = memory.pages_to_dump_many(vmas)
        if memory.scans_spans():
            assert memory.stats.scan_calls - calls == 1      # one scan of their whole span
        else:   # the fallback reads pagemap per page of the span: one read per VMA, no gaps
            assert memory.stats.pagemap_bytes - read == sum(
                (v.mapping.end - v.mapping.start) // 4096 * 8 for v in vmas)
    finally:
        os.kill(pid, signal.SIGCONT)
        memory.close()
    assert [list(a) for a in many] == [list(a) for a in each]
    assert sum(len(a) for a in many) >= n - len(zero)


# --- features: one probe per process ----------------------------------------------------------

def _feats(missing: str = "", names=None) -> list[Feature]:
    return [Feature(n, n != missing, "ok", n in features.MUST_HAVE, features.DISABLES[n])
            for n in features.DISABLES if names is None or n in names]


def test_require_must_haves_probes_only_them_once_per_process(monkeypatch):
    monkeypatch.setenv("CKPTSIM_CACHE_DIR", "")     # no remembered probe (test_runcache.py)
    calls = []
    monkeypatch.setattr(features, "probe", lambda names=None: calls.append(names) or
                        _feats(names=names))
    features.require_must_haves()
    features.require_must_haves()
    assert calls == [features.MUST_HAVE]
    assert [f.name for f in features.probed()] == list(features.DISABLES)
    assert [f.name for f in features.probed()] == list(features.DISABLES)
    assert calls == [features.MUST_HAVE, None]


def test_probe_of_the_must_haves_runs_only_their_probes(monkeypatch):
    monkeypatch.setattr(features, "_probe_bpf_tracker",
                        lambda: pytest.fail("a must-have probe imported bcc"))
    found = features.probe(features.MUST_HAVE)
    assert [f.name for f in found] == list(features.MUST_HAVE)
    assert all(f.present for f in found), found


def test_a_missing_must_have_is_probed_again(monkeypatch):
    monkeypatch.setenv("CKPTSIM_CACHE_DIR", "")     # no remembered probe (test_runcache.py)
    calls = []
    monkeypatch.setattr(features, "probe", lambda names=None: calls.append(1) or
                        _feats("ptrace", names))
    for _ in range(2):
        with pytest.raises(MissingFeatures, match="ptrace"):
            features.require_must_haves()
    assert len(calls) == 2
    # a probe replaced again (a test's monkeypatch) is not answered from the old cache
    monkeypatch.setattr(features, "probe", lambda names=None: calls.append(1) or
                        _feats(names=names))
    features.require_must_haves()
    assert len(calls) == 3

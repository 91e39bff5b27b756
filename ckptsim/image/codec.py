"""The image codec: the only code that turns records into bytes and back.

Framing (docs/image-format.md): every record is ``{u32 type, u32 len}`` (len counts the 8-byte
header and the payload, not the padding), then the payload, then zero padding up to the next
multiple of 8. The stream ends with a TAIL record holding the number of records before it and
the CRC-32 of every byte before it.

The decoder is strict: anything it does not expect raises ImageError naming the byte offset
and the record type, and it never allocates more than the input it was given.
"""
from __future__ import annotations

import os
import queue
import struct
import threading
from array import array
from typing import Iterator

from ..errors import ImageError
from . import core
from ..threads import Background
from .schema import LAYOUTS, Field, ItemArray, Layout, Record
from .types import MAGIC_HEAD, MAGIC_TAIL, PAGE_SIZE, ObjType

try:    # zlib-ng's CRC-32: the same values as zlib's, 6-7x faster (SIMD), the GIL released
    from zlib_ng.zlib_ng import crc32
except ImportError:     # pragma: no cover - the package is a dependency; zlib still works
    from zlib import crc32

_HDR = struct.Struct("<II")
_PAD = bytes(8)


def _pad_len(n: int) -> int:
    return -n & 7


def _encode_var(lay: Layout, var) -> bytes | memoryview:
    if lay.var is None:
        if var not in (None, b""):
            raise ValueError(f"{lay.name} has no variable part")
        return b""
    if lay.var == "bytes":
        return b"" if var is None else var
    if lay.var == "str":
        data = (var or "").encode()
        return data
    if isinstance(var, ItemArray) and var.item.format == lay.item_struct.format:
        return var.view   # a decoded array re-encodes as its own bytes
    items = var or ()
    pack = lay.item_struct.pack
    return b"".join(pack(*item) for item in items)


# Parts of at least this many bytes (page data) are checksummed on a helper thread while the
# writer's thread writes them: crc32 and a file's write both release the GIL, so on two
# cores the checksum costs (almost) no extra time. Smaller parts are checksummed inline.
_PARALLEL_CRC_MIN = 64 * 1024
_PIECE = 1 << 20            # a large part is checksummed in pieces of this size, combined


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial, bit-reflected (zlib's multmodp)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1


_X2N = [1 << 30]            # x^(2^n) modulo the polynomial, n = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))
_SHIFT: dict[int, int] = {}


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's crc32_combine: the CRC-32 of A + B from crc32(A), crc32(B) and len(B)."""
    op = _SHIFT.get(len2)
    if op is None:
        op, n, k = 1 << 31, len2, 3         # x^(8 * len2)
        while n:
            if n & 1:
                op = _multmodp(_X2N[k & 31], op)
            n >>= 1
            k += 1
        if len(_SHIFT) < 64:
            _SHIFT[len2] = op
    return _multmodp(op, crc1) ^ crc2


class _Checksummer:
    """One helper thread per process checksumming a part while the caller writes it. The part
    is cut into 1 MiB pieces: the helper takes them from the front, and the caller, once its
    write is done, takes the ones the helper has not claimed yet from the back (each piece has
    a claim lock), so nobody waits for a helper that has no core free; the pieces' CRCs are
    combined (crc32_combine). The caller never returns before the helper is done with the
    part, so its buffer may be reused at once. One caller at a time: one that finds it busy
    (another writer, in another thread) checksums inline. Re-created in a forked child
    (threads do not fork)."""

    _instance: "_Checksummer | None" = None
    _make = threading.Lock()

    def __init__(self):
        self.pid = os.getpid()
        self.busy = threading.Lock()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        Background(self._run, name="ckptsim-crc32")

    def _run(self) -> None:
        jobs, results = self.jobs, self.results
        while True:
            piece, i, claim = jobs.get()
            if claim.acquire(blocking=False):   # else the caller took it
                try:
                    results.put((i, crc32(piece)))
                except BaseException as e:      # handed to the waiting caller
                    results.put((i, e))
            del piece

    @classmethod
    def get(cls) -> "_Checksummer | None":
        inst = cls._instance
        if inst is None or inst.pid != os.getpid():
            with cls._make:
                inst = cls._instance
                if inst is None or inst.pid != os.getpid():
                    try:
                        inst = cls._instance = cls()
                    except RuntimeError:    # no thread can be started (interpreter exit)
                        return None
        return inst

    def write_and_crc(self, sink, chunk, crc: int) -> int:
        """``sink.write(chunk)``; returns ``crc32(chunk, crc)``, computed meanwhile."""
        if not self.busy.acquire(blocking=False):
            sink.write(chunk)
            return crc32(chunk, crc)
        view = memoryview(chunk)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        pieces = [view[i:i + _PIECE] for i in range(0, len(view), _PIECE)]
        claims = [threading.Lock() for _ in pieces]
        for i, piece in enumerate(pieces):
            self.jobs.put((piece, i, claims[i]))
        crcs: list = [None] * len(pieces)
        helper = 0                              # pieces the helper claimed
        try:
            sink.write(chunk)
        finally:
            for i in range(len(pieces) - 1, -1, -1):
                if claims[i].acquire(blocking=False):
                    crcs[i] = crc32(pieces[i])          # not started: ours
                else:
                    helper += 1
            try:
                for _ in range(helper):         # the helper is done with ``chunk`` after
                    i, value = self.results.get()
                    crcs[i] = value
            except BaseException:               # interrupted (Ctrl-C) while waiting: the
                self._retire()                  # late results must reach no other caller
                raise
            self.busy.release()
        for i, value in enumerate(crcs):
            if isinstance(value, BaseException):
                raise value
            crc = crc32_combine(crc, value, len(pieces[i]))
        return crc

    def _retire(self) -> None:
        """Never use this helper again (``busy`` stays held); the next caller makes a new one."""
        with _Checksummer._make:
            if _Checksummer._instance is self:
                _Checksummer._instance = None


class ImageWriter:
    """Writes records to a binary sink (anything with ``write``), keeping count and checksum.

    Large parts (page data) are checksummed on a helper thread while they are written; every
    call returns only once its bytes are both written and checksummed, so callers may reuse
    their buffers as soon as it returns."""

    def __init__(self, sink):
        self.sink = sink
        self.offset = 0
        self.nr_records = 0
        self.crc = 0

    def _emit(self, *chunks) -> None:
        for chunk in chunks:
            n = len(chunk)
            if not n:
                continue
            helper = _Checksummer.get() if n >= _PARALLEL_CRC_MIN else None
            if helper is not None:
                self.crc = helper.write_and_crc(self.sink, chunk, self.crc)
            else:
                self.sink.write(chunk)
                self.crc = crc32(chunk, self.crc)
            self.offset += n

    def write(self, lay: Layout, var=None, **fields) -> None:
        try:
            fixed = lay.struct.pack(*(fields[f.name] for f in lay.fields))
        except KeyError as e:
            raise ValueError(f"{lay.name}: field {e.args[0]} missing") from None
        if len(fields) != len(lay.fields):
            extra = set(fields) - {f.name for f in lay.fields}
            raise ValueError(f"{lay.name}: unknown fields {sorted(extra)}")
        payload = _encode_var(lay, var)
        if len(payload) > lay.max_var:
            raise ValueError(f"{lay.name}: variable part of {len(payload)} bytes exceeds {lay.max_var}")
        self.write_raw(lay.type_id, fixed, payload)

    def write_raw(self, type_id: int, *parts) -> None:
        """Write one record whose payload is the concatenation of ``parts`` (a small record
        is joined into one write; a large one is written part by part, without a copy)."""
        size = 8 + sum(len(p) for p in parts)
        if size > 0xFFFFFFFF:
            raise ValueError(f"record {type_id} of {size} bytes is too large")
        if size < _PARALLEL_CRC_MIN:       # one write and one CRC call for a small record
            self._emit(b"".join((_HDR.pack(type_id, size), *parts, _PAD[:_pad_len(size)])))
        else:
            self._emit(_HDR.pack(type_id, size), *parts, _PAD[:_pad_len(size)])
        self.nr_records += 1

    def write_pages(self, addrs: array, data, data_crc: int | None = None) -> None:
        """Page chunks: PGARR{n} + BUFFER(n addresses, n pages), at most MAX_PAGES_PER_CHUNK each.
        ``data_crc``: the CRC-32 (``crc32``) of ``data``, when the caller computed it while the pages were
        in its cache (the live backend does, on its read-ahead thread); the data is then not
        read again for the image's checksum. A wrong one makes the image fail its check."""
        view = memoryview(data).cast("B")
        n = len(addrs)
        if len(view) != n * PAGE_SIZE:
            raise ValueError(f"{n} page addresses but {len(view)} bytes of page data")
        step = core.MAX_PAGES_PER_CHUNK
        if data_crc is not None and n <= step:
            self.write(core.PGARR, nr_pages=n)
            size = 8 + 8 * n + len(view)
            self._emit(_HDR.pack(core.BUFFER.type_id, size), addrs.tobytes())
            self.sink.write(view)
            self.crc = crc32_combine(self.crc, data_crc, len(view))
            self.offset += len(view)
            self._emit(_PAD[:_pad_len(size)])
            self.nr_records += 1
            return
        for i in range(0, n, step):
            part = addrs[i:i + step]
            self.write(core.PGARR, nr_pages=len(part))
            self.write_raw(core.BUFFER.type_id, part.tobytes(),
                           view[i * PAGE_SIZE:(i + len(part)) * PAGE_SIZE])

    def end_pages(self) -> None:
        self.write(core.PGARR, nr_pages=0)

    def write_error(self, message: str) -> None:
        """Linux-CR's error record: ERROR, then a STRING whose first character is NUL."""
        self.write(core.ERROR)
        self.write(core.STRING, var="\0" + message[:4000])

    def finish(self) -> None:
        crc = self.crc
        self.write(core.TAIL, magic=MAGIC_TAIL, nr_records=self.nr_records, checksum=crc, pad=0)


class ImageReader:
    """Strict, bounded reader over a whole image held in memory (bytes, bytearray or mmap).

    The tail and checksum are verified before any record is returned, so a consumer never
    acts on a corrupted image. ``next()`` returns Records in order; OBJREF declarations and
    objref fields are checked as they are read.
    """

    def __init__(self, data, *, checksum: bool = True):
        """``checksum=False`` skips only the CRC pass: for a caller that verifies it itself
        (``checksum_ok``) before anything it built from the records takes effect (the live
        restart checksums on a helper thread while it writes pages, and lets no process run
        before the sum is right)."""
        self.data = memoryview(data).cast("B")
        self.end = len(self.data) - core.TAIL_SIZE
        self.pos = 0
        self.count = 0
        self.objtypes: dict[int, ObjType] = {}  # objref -> type, as declared so far
        self._check_tail(checksum)

    # -- whole-image checks -------------------------------------------------------------
    def _check_tail(self, checksum: bool = True) -> None:
        size = len(self.data)
        if size < core.TAIL_SIZE + 8:
            raise ImageError(0, None, f"image of {size} bytes is too short to hold a header and a tail")
        if size % 8:
            raise ImageError(size, None, f"image size {size} is not a multiple of 8 (truncated?)")
        tail = self.end
        rtype, rlen = _HDR.unpack_from(self.data, tail)
        if rtype != core.TAIL.type_id or rlen != core.TAIL_SIZE:
            raise ImageError(tail, "TAIL", f"no tail record at the end (found type {rtype}, len {rlen}): truncated image?")
        magic, nr, tail_sum, pad = core.TAIL.struct.unpack_from(self.data, tail + 8)
        if magic != MAGIC_TAIL or pad:
            raise ImageError(tail, "TAIL", f"bad tail magic {magic:#x}")
        self.tail_checksum = tail_sum
        self.tail_nr_records = nr
        if checksum:
            self.verify_checksum()

    def verify_checksum(self) -> None:
        """The CRC-32 of everything before the tail must be the tail's (ImageError if not)."""
        actual = crc32(self.data[:self.end])
        if actual != self.tail_checksum:
            raise ImageError(self.end, "TAIL", f"checksum mismatch: image says "
                                               f"{self.tail_checksum:#010x}, bytes give {actual:#010x}")

    # -- records --------------------------------------------------------------------------
    def at_end(self) -> bool:
        return self.pos >= self.end

    def peek(self) -> Layout | None:
        """The layout of the next record (None at the tail), without consuming it."""
        if self.pos >= self.end:
            return None
        rtype, _ = self._frame()
        return LAYOUTS[rtype]

    def _frame(self) -> tuple[int, int]:
        pos = self.pos
        if pos + 8 > self.end:
            raise ImageError(pos, None, "truncated record header")
        rtype, rlen = _HDR.unpack_from(self.data, pos)
        lay = LAYOUTS.get(rtype)
        if lay is None:
            raise ImageError(pos, rtype, "unknown record type")
        if rtype == core.TAIL.type_id:
            raise ImageError(pos, "TAIL", "tail record before the end of the image")
        if rlen < 8 + lay.fixed_size:
            raise ImageError(pos, lay.name, f"length {rlen} is shorter than the record's fixed part ({8 + lay.fixed_size})")
        var_len = rlen - 8 - lay.fixed_size
        if lay.var is None and var_len:
            raise ImageError(pos, lay.name, f"length {rlen}, expected exactly {8 + lay.fixed_size}")
        if var_len > lay.max_var:
            raise ImageError(pos, lay.name, f"variable part of {var_len} bytes exceeds the limit {lay.max_var}")
        if pos + rlen + _pad_len(rlen) > self.end:
            raise ImageError(pos, lay.name, f"record of {rlen} bytes runs past the end of the image")
        return rtype, rlen

    def next(self) -> Record:
        if self.pos >= self.end:
            raise ImageError(self.pos, None, "unexpected end of image")
        rtype, rlen = self._frame()
        lay = LAYOUTS[rtype]
        pos = self.pos
        start = pos + 8
        values = dict(zip((f.name for f in lay.fields), lay.struct.unpack_from(self.data, start)))
        var_view = self.data[start + lay.fixed_size:pos + rlen]
        pad = self.data[pos + rlen:pos + rlen + _pad_len(rlen)]
        if any(pad):
            raise ImageError(pos, lay.name, "non-zero padding")
        var = self._decode_var(lay, var_view, pos)
        rec = Record(lay, values, var, pos)
        self.pos = pos + rlen + _pad_len(rlen)
        self.count += 1
        if rtype == core.OBJREF.type_id:
            self._declare(rec)
        else:
            self._check_refs(rec, lay.fields, values)
        return rec

    def _decode_var(self, lay: Layout, view: memoryview, pos: int):
        if lay.var is None:
            return None
        if lay.var == "bytes":
            return view
        if lay.var == "str":
            try:
                return bytes(view).decode()
            except UnicodeDecodeError as e:
                raise ImageError(pos, lay.name, f"string is not valid UTF-8 ({e.reason})") from None
        item = lay.item_struct
        if len(view) % item.size:
            raise ImageError(pos, lay.name, f"array of {len(view)} bytes is not a whole number of {item.size}-byte items")
        items = ItemArray(item, view)
        if any(f.objtype is not None for f in lay.var):
            names = [f.name for f in lay.var]
            owner = Record(lay, {}, None, pos)
            for values in items:
                self._check_refs(owner, lay.var, dict(zip(names, values)))
        return items

    def _declare(self, rec: Record) -> None:
        ref, otype = rec["objref"], rec["objtype"]
        if ref != len(self.objtypes) + 1:
            raise ImageError(rec.offset, "OBJREF", f"objref {ref} out of order (expected {len(self.objtypes) + 1})")
        try:
            self.objtypes[ref] = ObjType(otype)
        except ValueError:
            raise ImageError(rec.offset, "OBJREF", f"unknown object type {otype}") from None

    def _check_refs(self, rec: Record, fields: tuple[Field, ...], values: dict) -> None:
        for f in fields:
            want = f.objtype
            if want is None:
                continue
            ref = values[f.name]
            if ref == 0:
                continue
            have = self.objtypes.get(ref)
            if have is None:
                raise ImageError(rec.offset, rec.layout.name, f"{f.name} names unknown objref {ref}")
            if have != want:
                raise ImageError(rec.offset, rec.layout.name, f"{f.name} names objref {ref} of type {have.name}, expected {want.name}")

    def records(self) -> Iterator[Record]:
        while self.pos < self.end:
            yield self.next()

    def finish(self) -> None:
        """Check that every record was consumed and the tail's count matches."""
        if self.pos != self.end:
            raise ImageError(self.pos, None, "records left over before the tail")
        if self.count != self.tail_nr_records:
            raise ImageError(self.end, "TAIL", f"tail counts {self.tail_nr_records} records, image has {self.count}")

    def read_pages(self) -> Iterator[tuple[array, memoryview]]:
        """Page chunks up to and including PGARR{0}: yields (addresses, page data)."""
        while True:
            rec = self.expect(core.PGARR)
            n = rec["nr_pages"]
            if n == 0:
                return
            if n > core.MAX_PAGES_PER_CHUNK:
                raise ImageError(rec.offset, "PGARR", f"chunk of {n} pages exceeds {core.MAX_PAGES_PER_CHUNK}")
            buf = self.expect(core.BUFFER)
            if len(buf.var) != n * (8 + PAGE_SIZE):
                raise ImageError(buf.offset, "BUFFER", f"page chunk holds {len(buf.var)} bytes, {n} pages need {n * (8 + PAGE_SIZE)}")
            addrs = array("Q")
            addrs.frombytes(buf.var[:n * 8])
            yield addrs, buf.var[n * 8:]

    def expect(self, lay: Layout) -> Record:
        rec_lay = self.peek()
        if rec_lay is not lay:
            found = rec_lay.name if rec_lay else "end of image"
            raise ImageError(self.pos, found, f"expected {lay.name}, found {found}")
        return self.next()


def decode_all(data) -> list[Record]:
    """Every record of an image, checked for framing, objrefs, header and tail."""
    reader = ImageReader(data)
    recs = list(reader.records())
    reader.finish()
    if not recs or recs[0].layout is not core.HEADER:
        raise ImageError(0, recs[0].layout.name if recs else None, "image does not start with HEADER")
    if recs[0]["magic"] != MAGIC_HEAD:
        raise ImageError(0, "HEADER", f"bad magic {recs[0]['magic']:#x}")
    return recs

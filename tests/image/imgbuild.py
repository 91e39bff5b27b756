"""Helpers to build (possibly malformed) images byte by byte for the codec tests."""
import io
import struct
import zlib

from ckptsim.image import core
from ckptsim.image.codec import ImageWriter
from ckptsim.image.types import MAGIC_HEAD, MAGIC_TAIL

TAIL_HDR = struct.Struct("<IIQQII")


def header_record() -> bytes:
    out = io.BytesIO()
    ImageWriter(out).write(core.HEADER, magic=MAGIC_HEAD, version=1, arch=100, major=6, minor=18,
                           patch=0, page_size=4096, uflags=0, image_flags=core.IMAGE_MODEL,
                           time=0, crid=1, image_id=bytes(16), parent_id=bytes(16))
    return out.getvalue()


HEADER_LEN = len(header_record())


def frame(type_id: int, payload: bytes = b"", length: int | None = None,
          pad: bytes | None = None) -> bytes:
    """One record; ``length`` and ``pad`` override the honest values."""
    size = 8 + len(payload)
    if pad is None:
        pad = bytes(-size & 7)
    return struct.pack("<II", type_id, size if length is None else length) + payload + pad


def tail(body: bytes, nr_records: int, magic: int = MAGIC_TAIL, checksum: int | None = None,
         pad: int = 0) -> bytes:
    crc = zlib.crc32(body) if checksum is None else checksum
    return TAIL_HDR.pack(core.TAIL.type_id, core.TAIL_SIZE, magic, nr_records, crc, pad)


def image(*records: bytes, nr_records: int | None = None) -> bytes:
    """HEADER + records + a valid tail (counting one record per argument)."""
    body = header_record() + b"".join(records)
    return body + tail(body, 1 + len(records) if nr_records is None else nr_records)


def reseal(data: bytes) -> bytes:
    """Recompute the tail's checksum (keeping its count) so a mutation gets past it."""
    if len(data) < core.TAIL_SIZE:
        return data
    body, old = data[:-core.TAIL_SIZE], data[-core.TAIL_SIZE:]
    fixed = old[:24] + struct.pack("<I", zlib.crc32(body)) + old[28:]
    return body + fixed

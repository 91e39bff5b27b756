"""The codec: writer framing, and every rejection rule of the strict decoder (with offsets)."""
import io
import os
import struct
import sys
from array import array

import pytest

from ckptsim.errors import ImageError
from ckptsim.image import core
from ckptsim.image.codec import ImageReader, ImageWriter, decode_all
from ckptsim.image.pretty import load_layouts
from ckptsim.image.schema import LAYOUTS, layout
from ckptsim.image.types import MAGIC_TAIL, PAGE_SIZE, ObjType
sys.path.insert(0, os.path.dirname(__file__))  # pytest's importlib mode: find imgbuild.py
from imgbuild import HEADER_LEN, frame, header_record, image, tail  # noqa: E402

load_layouts()
from ckptsim.kinds import files, tasktree  # noqa: E402  (after load_layouts: all kinds known)

OBJREF = core.OBJREF.type_id
STRING = core.STRING.type_id


def objref(objtype: int, ref: int) -> bytes:
    return frame(OBJREF, struct.pack("<Ii", objtype, ref))


def file_desc(ref: int) -> bytes:
    return frame(files.FILE_DESC.type_id, struct.pack("<iiI", ref, 0, 0))


def rejects(data, offset: int, *words: str) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_all(data)
    err = info.value
    assert err.offset == offset, str(err)
    for word in words:
        assert word in err.message, str(err)
    return err


# -- the writer ---------------------------------------------------------------------------------
def test_writer_frames_pads_and_seals():
    out = io.BytesIO()
    w = ImageWriter(out)
    w.write(core.STRING, var="abc")
    w.finish()
    data = out.getvalue()
    assert data[:8] == struct.pack("<II", STRING, 11)
    assert data[8:16] == b"abc" + bytes(5)
    assert len(data) == 16 + core.TAIL_SIZE
    assert data[16:] == tail(data[:16], 1)


def test_minimal_image_decodes():
    recs = decode_all(image(frame(STRING, "héllo".encode())))
    assert [r.name for r in recs] == ["HEADER", "STRING"]
    assert recs[1].var == "héllo" and recs[1].offset == HEADER_LEN


@pytest.mark.parametrize("kwargs, message", [
    ({"objtype": 1}, "field objref missing"),
    ({"objtype": 1, "objref": 1, "extra": 2}, "unknown fields"),
])
def test_writer_refuses_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageWriter(io.BytesIO()).write(core.OBJREF, **kwargs)


def test_writer_refuses_var_on_fixed_record_and_oversized_var():
    w = ImageWriter(io.BytesIO())
    with pytest.raises(ValueError, match="no variable part"):
        w.write(core.OBJREF, var=b"x", objtype=1, objref=1)
    with pytest.raises(ValueError, match="exceeds"):
        w.write(core.LSM_INFO, var="x" * 201)


def test_page_chunks_round_trip_and_split_at_1024():
    n = 2 * core.MAX_PAGES_PER_CHUNK + 3
    addrs = array("Q", (i * PAGE_SIZE for i in range(n)))
    pages = bytes(range(256)) * (n * PAGE_SIZE // 256)
    out = io.BytesIO()
    w = ImageWriter(out)
    w.write_raw(core.HEADER.type_id, header_record()[8:])
    w.write_pages(addrs, pages)
    w.end_pages()
    w.finish()
    reader = ImageReader(out.getvalue())
    reader.next()
    chunks = list(reader.read_pages())
    reader.finish()
    assert [len(a) for a, _ in chunks] == [1024, 1024, 3]
    assert b"".join(a.tobytes() for a, _ in chunks) == addrs.tobytes()
    assert b"".join(bytes(d) for _, d in chunks) == pages


def _paged_image(chunks) -> bytes:
    out = io.BytesIO()
    w = ImageWriter(out)
    w.write_raw(core.HEADER.type_id, header_record()[8:])
    for chunk in chunks:
        w.write_pages(*chunk)
    w.end_pages()
    w.finish()
    return out.getvalue()


def test_pages_with_the_callers_crc_make_the_same_image():
    import zlib
    chunks = [(array("Q", range(k * 4096, (k + n) * 4096, 4096)),
               bytes([k % 251 + 1]) * (n * 4096)) for k, n in ((0, 3), (10, 1024), (2000, 17))]
    plain = _paged_image(chunks)
    checked = _paged_image([(a, d, zlib.crc32(d)) for a, d in chunks])
    assert checked == plain
    reader = ImageReader(checked)
    reader.next()
    assert b"".join(bytes(d) for _, d in reader.read_pages()) == b"".join(d for _, d in chunks)
    reader.finish()                                    # the tail's checksum holds
    wrong = _paged_image([(a, d, zlib.crc32(d) ^ 1) for a, d in chunks])
    with pytest.raises(ImageError, match="checksum"):
        ImageReader(wrong).verify_checksum()


def test_the_codecs_crc32_is_zlibs():
    """The image checksum is zlib's CRC-32 whichever library computes it (zlib-ng's)."""
    import zlib
    from ckptsim.image.codec import crc32
    data = os.urandom(1 << 20) + bytes(4096)
    view = memoryview(data)
    for start in (0, 1, 0xDEADBEEF):
        for part in (b"", b"a", view[:12345], view):
            assert crc32(part, start) == zlib.crc32(part, start)


def test_write_pages_needs_matching_data():
    with pytest.raises(ValueError, match="page addresses"):
        ImageWriter(io.BytesIO()).write_pages(array("Q", [0]), bytes(10))


def test_error_record_is_error_then_nul_string():
    out = io.BytesIO()
    w = ImageWriter(out)
    w.write_raw(core.HEADER.type_id, header_record()[8:])
    w.write_error("EBUSY: leak")
    w.finish()
    recs = decode_all(out.getvalue())
    assert [r.name for r in recs[1:]] == ["ERROR", "STRING"]
    assert recs[2].var == "\0EBUSY: leak"


# -- the tail and the whole image ---------------------------------------------------------------
def test_too_short():
    rejects(bytes(16), 0, "too short")


def test_size_not_multiple_of_8():
    data = image() + b"x"
    rejects(data, len(data), "multiple of 8")


def test_truncated_image_has_no_tail():
    data = image(frame(STRING, b"x" * 100))
    cut = data[:-16]
    rejects(cut, len(cut) - core.TAIL_SIZE, "no tail record")


def test_truncated_header_record():
    body = header_record()[:16]        # the HEADER's first 16 bytes only
    rejects(body + tail(body, 1), 0, "runs past the end")


def test_truncated_record():
    body = header_record() + frame(STRING, b"abcdefgh" * 4)[:24]
    rejects(body + tail(body, 2), HEADER_LEN, "runs past the end")


def test_bad_tail_magic_and_pad():
    body = header_record()
    rejects(body + tail(body, 1, magic=MAGIC_TAIL ^ 1), HEADER_LEN, "tail magic")
    rejects(body + tail(body, 1, pad=1), HEADER_LEN, "tail magic")


def test_bad_checksum():
    body = header_record()
    rejects(body + tail(body, 1, checksum=12345), HEADER_LEN, "checksum mismatch")


def test_record_count_mismatch():
    data = image(frame(STRING, b"x"), nr_records=5)
    rejects(data, len(data) - core.TAIL_SIZE, "tail counts 5 records, image has 2")


def test_first_record_must_be_header():
    body = frame(STRING, b"x")
    rejects(body + tail(body, 1), 0, "does not start with HEADER")


def test_bad_header_magic():
    rec = bytearray(header_record())
    rec[8] ^= 0xFF
    body = bytes(rec)
    rejects(body + tail(body, 1), 0, "bad magic")


# -- framing of one record ----------------------------------------------------------------------
def test_unknown_type():
    rejects(image(frame(7777, b"")), HEADER_LEN, "unknown record type")


def test_tail_before_the_end():
    early = frame(core.TAIL.type_id, struct.pack("<QQII", MAGIC_TAIL, 1, 0, 0))
    rejects(image(early), HEADER_LEN, "tail record before the end")


def test_len_shorter_than_fixed_part():
    rejects(image(frame(OBJREF, b"", length=8)), HEADER_LEN, "shorter than the record's fixed part")


def test_var_part_on_fixed_only_record():
    rejects(image(frame(OBJREF, struct.pack("<Ii", 4, 1) + bytes(8))), HEADER_LEN, "expected exactly 16")


def test_oversized_len():
    rejects(image(frame(core.BUFFER.type_id, b"", length=0xFFFFFFFF)), HEADER_LEN, "exceeds the limit")
    rejects(image(frame(STRING, b"", length=8 + (1 << 16) + 1)), HEADER_LEN, "exceeds the limit")


def test_len_past_the_end():
    rejects(image(frame(STRING, b"", length=4096)), HEADER_LEN, "runs past the end")


def test_non_zero_padding():
    rejects(image(frame(STRING, b"abc", pad=b"\0\0\0\0\1")), HEADER_LEN, "non-zero padding")


def test_bad_utf8():
    rejects(image(frame(STRING, b"ab\xff")), HEADER_LEN, "UTF-8")


def test_array_not_whole_items():
    payload = struct.pack("<i", 1) + bytes(24 + 5)
    rejects(image(frame(tasktree.TREE.type_id, payload)), HEADER_LEN, "whole number of 24-byte items")


# -- objrefs ------------------------------------------------------------------------------------
def test_objref_must_come_in_order():
    rejects(image(objref(ObjType.FILE, 2)), HEADER_LEN, "out of order (expected 1)")
    second = HEADER_LEN + 16
    rejects(image(objref(ObjType.FILE, 1), objref(ObjType.FILE, 1)), second, "expected 2")


def test_objref_unknown_objtype():
    rejects(image(objref(999, 1)), HEADER_LEN, "unknown object type 999")


def test_objref_field_names_unknown_ref():
    rejects(image(file_desc(1)), HEADER_LEN, "fd_objref names unknown objref 1")


def test_objref_field_of_wrong_type():
    rejects(image(objref(ObjType.MM, 1), file_desc(1)), HEADER_LEN + 16,
            "fd_objref names objref 1 of type MM, expected FILE")


def test_objref_fields_accept_zero_and_declared_refs():
    recs = decode_all(image(file_desc(0), objref(ObjType.FILE, 1), file_desc(1)))
    assert [r.name for r in recs] == ["HEADER", "FILE_DESC", "OBJREF", "FILE_DESC"]


@pytest.fixture
def array_of_refs():
    """A temporary layout whose array items hold objrefs (removed again: the registry is global)."""
    lay = layout(899, "TEST_REFS", [], var=[("file_ref", "i32", "objref:FILE"), ("pad", "i32")])
    yield lay
    del LAYOUTS[899]


def test_objref_fields_in_array_items_are_checked(array_of_refs):
    ok = image(objref(ObjType.FILE, 1), frame(899, struct.pack("<ii", 1, 0) + struct.pack("<ii", 0, 0)))
    assert decode_all(ok)[-1].var == [(1, 0), (0, 0)]
    bad = image(objref(ObjType.FILE, 1), frame(899, struct.pack("<ii", 1, 0) + struct.pack("<ii", 2, 0)))
    rejects(bad, HEADER_LEN + 16, "file_ref names unknown objref 2")


# -- the reader's content checks ----------------------------------------------------------------
def _reader_at_pages(*records):
    reader = ImageReader(image(*records))
    reader.next()
    return reader


def test_page_chunk_too_large():
    reader = _reader_at_pages(frame(core.PGARR.type_id, struct.pack("<Q", 1025)))
    with pytest.raises(ImageError, match="exceeds 1024") as info:
        list(reader.read_pages())
    assert info.value.offset == HEADER_LEN


def test_page_chunk_buffer_of_wrong_length():
    reader = _reader_at_pages(frame(core.PGARR.type_id, struct.pack("<Q", 1)),
                              frame(core.BUFFER.type_id, bytes(8 + 100)))
    with pytest.raises(ImageError, match="page chunk holds 108 bytes") as info:
        list(reader.read_pages())
    assert info.value.offset == HEADER_LEN + 16


def test_expect_names_what_it_found():
    reader = _reader_at_pages(frame(STRING, b"x"))
    with pytest.raises(ImageError, match="expected PGARR, found STRING"):
        reader.expect(core.PGARR)

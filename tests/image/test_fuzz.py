"""Property tests: every layout round-trips; mutated images only ever raise ImageError,
in bounded time and memory, also when the mutation is resealed with a fresh checksum."""
import io
import os
import struct
import sys
import tracemalloc
from array import array

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptsim.errors import ImageError
from ckptsim.image import core
from ckptsim.image.codec import ImageWriter, decode_all
from ckptsim.image.pretty import describe, load_layouts, render
from ckptsim.image.schema import LAYOUTS
from ckptsim.image.types import MAGIC_HEAD, ObjType
sys.path.insert(0, os.path.dirname(__file__))  # pytest's importlib mode: find imgbuild.py
from imgbuild import image, reseal  # noqa: E402

load_layouts()

_INT_RANGES = {"u8": (0, 2**8 - 1), "u16": (0, 2**16 - 1), "u32": (0, 2**32 - 1),
               "u64": (0, 2**64 - 1), "i32": (-2**31, 2**31 - 1), "i64": (-2**63, 2**63 - 1)}
ROUND_TRIP_LAYOUTS = sorted(t for t in LAYOUTS if t != core.TAIL.type_id)


class Refs:
    """Objrefs a generated record may name: each new one is declared by an OBJREF first."""

    def __init__(self):
        self.declared: list[bytes] = []
        self.by_type: dict[ObjType, list[int]] = {}

    def new(self, objtype: ObjType) -> int:
        ref = len(self.declared) + 1
        self.declared.append(struct.pack("<IIIi", core.OBJREF.type_id, 16, objtype, ref))
        self.by_type.setdefault(objtype, []).append(ref)
        return ref


def draw_value(data, f, refs: Refs):
    if f.ftype.startswith("bytes"):
        n = int(f.ftype[5:])
        return data.draw(st.binary(min_size=n, max_size=n))
    if f.objtype is not None:
        choice = data.draw(st.sampled_from(["none", "new", "old"]))
        known = refs.by_type.get(f.objtype)
        if choice == "new" or (choice == "old" and not known):
            return refs.new(f.objtype) if choice == "new" else 0
        return data.draw(st.sampled_from(known)) if choice == "old" else 0
    lo, hi = _INT_RANGES[f.ftype]
    return data.draw(st.integers(lo, hi))


def draw_var(data, lay, refs: Refs):
    if lay.var is None:
        return None
    if lay.var == "bytes":
        return data.draw(st.binary(max_size=min(lay.max_var, 300)))
    if lay.var == "str":
        text = data.draw(st.text(max_size=min(lay.max_var // 4, 40)))
        return text
    most = min(lay.max_var // lay.item_struct.size, 6)
    n = data.draw(st.integers(0, most))
    return [tuple(draw_value(data, f, refs) for f in lay.var) for _ in range(n)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_layout_round_trips(data):
    lay = LAYOUTS[data.draw(st.sampled_from(ROUND_TRIP_LAYOUTS))]
    refs = Refs()
    if lay is core.OBJREF:   # an OBJREF must carry the next number
        values = {"objtype": data.draw(st.sampled_from(list(ObjType))).value, "objref": 1}
    else:
        values = {f.name: draw_value(data, f, refs) for f in lay.fields}
    var = draw_var(data, lay, refs)
    out = io.BytesIO()
    ImageWriter(out).write(lay, var=var, **values)
    encoded = out.getvalue()

    prefix = b"".join(refs.declared)
    recs = decode_all(image(prefix, encoded, nr_records=2 + len(refs.declared)))
    rec = recs[-1]
    assert rec.layout is lay and rec.values == values
    if lay.var == "bytes":
        assert bytes(rec.var) == var
    else:
        assert rec.var == var
    again = io.BytesIO()
    ImageWriter(again).write(lay, var=rec.var, **rec.values)
    assert again.getvalue() == encoded
    describe(rec)  # the printer handles every layout
    render(rec)


def base_image() -> bytes:
    """A small image using framing, objrefs, arrays, strings, page chunks and an error."""
    from ckptsim.kinds import files, tasktree
    out = io.BytesIO()
    w = ImageWriter(out)
    w.write(core.HEADER, magic=MAGIC_HEAD, version=1, arch=100, major=6, minor=18, patch=0,
            page_size=4096, uflags=0, image_flags=core.IMAGE_MODEL, time=5, crid=2,
            image_id=bytes(range(16)), parent_id=bytes(16))
    for text in ("ckptsim-model", "#1", "model"):
        w.write(core.STRING, var=text)
    w.write(core.HEADER_ARCH, has_fxsr=0, has_xsave=0, xstate_size=0, pad=0)
    w.write(core.CONTAINER, flags=0, pad=0)
    w.write(core.STRING, var="lsm_none")
    w.write(core.LSM_INFO, var="dummy")
    w.write(tasktree.TREE, nr_tasks=2, var=[(1, 0, 1, 1, 1, 0), (2, 1, 2, 1, 1, 0)])
    w.write(tasktree.TASK, state=0, exit_signal=17, exit_code=0, pdeath_signal=0, flags=0, var="a")
    w.write(core.OBJREF, objtype=ObjType.FILE_TABLE, objref=1)
    w.write(files.FILE_TABLE, fdt_nfds=1)
    w.write(core.OBJREF, objtype=ObjType.FILE, objref=2)
    w.write(files.FILE_NAME, var="/etc/motd")
    w.write(files.FILE_DESC, fd_objref=2, fd_descriptor=0, fd_close_on_exec=0)
    w.write_pages(array("Q", [0x1000, 0x3000]), bytes(range(256)) * 32)
    w.end_pages()
    w.write(tasktree.CPU, pc=1, in_syscall=0, nr_regs=16, var=[(i,) for i in range(16)])
    w.write(tasktree.TASK, state=2, exit_signal=17, exit_code=0, pdeath_signal=0, flags=0, var="b")
    w.write_error("EBUSY: something leaked")
    w.finish()
    return out.getvalue()


BASE = base_image()


def test_base_image_is_valid():
    assert len(decode_all(BASE)) > 10


@st.composite
def mutated(draw):
    data = bytearray(BASE)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "word", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "word" and len(data) >= pos + 4:   # lengths, type ids, objrefs
            value = draw(st.sampled_from([0, 1, 7, 8, 0xFFFFFFFF, 0x7FFFFFFF, 4096, 9001, 6]))
            data[pos:pos + 4] = struct.pack("<I", value)
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
    return bytes(data)


def decode_bounded(data: bytes) -> None:
    """decode_all raises nothing but ImageError, and allocates < 4x the input + 1 MiB."""
    tracemalloc.start()
    try:
        try:
            decode_all(data)
        except ImageError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data) + (1 << 20), f"peak {peak} for {len(data)} bytes"


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_raise_only_image_error(data):
    decode_bounded(data)


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_resealed_mutations_raise_only_image_error(data):
    decode_bounded(reseal(data))


def test_buffer_retyped_as_array_stays_bounded():
    """A big raw BUFFER relabelled as an array record must not blow up memory."""
    from ckptsim.kinds import tasktree
    blob = bytes(8 << 20)
    rec = struct.pack("<II", tasktree.TREE_NESTED.type_id, 8 + len(blob)) + blob
    decode_bounded(image(rec))

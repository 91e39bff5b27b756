"""Record layouts, declared once as data.

A layout is a record type id, a name, a fixed part (named little-endian scalar fields, each
with an optional presentation hint) and an optional variable part. The same declaration drives
the encoder, the strict decoder and the pretty printer.

    PIPE_BUF = layout(305, "PIPE_BUF", [("pipe_ref", "i32", "objref:PIPE")], var="bytes")

Field types: u8 u16 u32 u64 i32 i64, and ``bytesN`` (fixed N raw bytes, e.g. ``bytes16``).
Hints: ``hex``, ``octal``, ``objref:OBJTYPE`` (checked by the decoder: the objref must have been
declared by an earlier OBJREF of that type; 0 means none), ``enum:NAME`` / ``flags:NAME``
(value names from ``ENUMS[NAME]`` for the printer), ``time``, ``signed``.
Variable part: ``None``; ``"bytes"`` (raw); ``"str"`` (UTF-8); or a list of fields, making the
variable part an array of such items (its length must be a whole number of items).
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .types import RANGES, ObjType

_FMT = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "i32": "i", "i64": "q"}

# Value names for the printer, by enum name: {"NAME": {value: "TEXT"}}; kinds add their own.
ENUMS: dict[str, dict[int, str]] = {}

DEFAULT_MAX_VAR = 1 << 20


@dataclass(frozen=True)
class Field:
    name: str
    ftype: str
    hint: str = ""

    @property
    def fmt(self) -> str:
        if self.ftype.startswith("bytes"):
            return f"{int(self.ftype[5:])}s"
        return _FMT[self.ftype]

    @property
    def objtype(self) -> ObjType | None:
        if self.hint.startswith("objref:"):
            return ObjType[self.hint[7:]]
        return None


@dataclass(frozen=True)
class Layout:
    type_id: int
    name: str
    fields: tuple[Field, ...]
    var: str | tuple[Field, ...] | None = None
    max_var: int = DEFAULT_MAX_VAR
    struct: struct.Struct = field(init=False, repr=False, compare=False)
    item_struct: struct.Struct | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "struct", struct.Struct("<" + "".join(f.fmt for f in self.fields)))
        item = None
        if isinstance(self.var, tuple):
            item = struct.Struct("<" + "".join(f.fmt for f in self.var))
        object.__setattr__(self, "item_struct", item)

    @property
    def fixed_size(self) -> int:
        return self.struct.size

    @property
    def objref_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.objtype is not None)

    def __repr__(self) -> str:
        return f"<layout {self.name}={self.type_id}>"


# Every layout, by type id; filled by layout() as modules are imported.
LAYOUTS: dict[int, Layout] = {}


def _fields(spec) -> tuple[Field, ...]:
    out = []
    for entry in spec:
        f = Field(*entry) if not isinstance(entry, Field) else entry
        if not (f.ftype in _FMT or (f.ftype.startswith("bytes") and f.ftype[5:].isdigit())):
            raise ValueError(f"unknown field type {f.ftype!r} in {f.name}")
        if f.hint.startswith("objref:"):
            ObjType[f.hint[7:]]  # a typo in an objtype name fails at import time
        out.append(f)
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate field names in {names}")
    return tuple(out)


def layout(type_id: int, name: str, fields, var=None, max_var: int = DEFAULT_MAX_VAR,
           subsystem: str | None = None) -> Layout:
    """Declare and register a record layout. ``subsystem`` (a key of RANGES) is checked."""
    if type_id in LAYOUTS:
        raise ValueError(f"record type {type_id} declared twice ({LAYOUTS[type_id].name}, {name})")
    if subsystem is not None and type_id not in RANGES[subsystem]:
        raise ValueError(f"record type {type_id} ({name}) is outside the {subsystem} range")
    if not any(type_id in r for r in RANGES.values()):
        raise ValueError(f"record type {type_id} ({name}) is in no subsystem range")
    if var is not None and not isinstance(var, str):
        var = _fields(var)
    elif var not in (None, "bytes", "str"):
        raise ValueError(f"bad var kind {var!r}")
    lay = Layout(type_id, name, _fields(fields), var, max_var)
    LAYOUTS[type_id] = lay
    return lay


class ItemArray(Sequence):
    """A decoded array variable part: a read-only sequence of tuples (items in field order),
    unpacked on access from the image's bytes, so decoding costs no memory per item.
    Compares equal to a list of the same tuples."""

    __slots__ = ("item", "view")

    def __init__(self, item: struct.Struct, view: memoryview):
        self.item = item
        self.view = view

    def __len__(self) -> int:
        return len(self.view) // self.item.size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("array item index out of range")
        return self.item.unpack_from(self.view, index * self.item.size)

    def __iter__(self):
        return self.item.iter_unpack(self.view)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (list, tuple, ItemArray)):
            return NotImplemented
        return len(self) == len(other) and all(a == tuple(b) for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"ItemArray({list(self)!r})"


class Record:
    """One decoded (or to-be-encoded) record: its layout, its fixed fields and its var part.

    Fixed fields read as ``rec["name"]``; ``rec.var`` is bytes/memoryview, str, or a sequence
    of tuples (array items, in field order: a list when encoding, an ItemArray when decoded).
    ``rec.offset`` is where it starts in the image.
    """

    __slots__ = ("layout", "values", "var", "offset")

    def __init__(self, lay: Layout, values: dict[str, Any], var=None, offset: int = -1):
        self.layout = lay
        self.values = values
        self.var = var
        self.offset = offset

    def __getitem__(self, name: str):
        return self.values[name]

    @property
    def name(self) -> str:
        return self.layout.name

    def __repr__(self) -> str:
        return f"Record({self.layout.name}, {self.values})"

"""The generic pretty printer: shows any record from its layout's fields and hints alone.

``describe(record)`` gives a JSON-able dict; ``render(record)`` one line of text. Hints decide
the presentation (``hex``, ``octal``, ``enum:NAME`` / ``flags:NAME`` from ``schema.ENUMS``,
``objref:TYPE``, ``time``, ``signed``); there is no code for any particular record type.
Big blobs (page buffers, file contents) are summarised by length, never dumped.

``python3 -m ckptsim.image.pretty --spec-tables`` prints the per-record tables of
docs/image-format.md; ``--update-doc PATH`` rewrites the generated section of that file.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import struct
import sys
from typing import Any

from .schema import ENUMS, LAYOUTS, Field, Layout, Record
from .types import RANGES, ObjType

# Blobs up to this many bytes are shown in hex; longer ones as a length and a short head.
SHOW_BYTES = 64
HEAD_BYTES = 16
# Arrays up to this many items are listed whole; longer ones by count and their first items.
SHOW_ITEMS = 64

SPEC_BEGIN = "<!-- BEGIN GENERATED RECORD TABLES (python3 -m ckptsim.image.pretty --update-doc docs/image-format.md) -->"
SPEC_END = "<!-- END GENERATED RECORD TABLES -->"


def load_layouts() -> list[str]:
    """Import every kind module that exists, so LAYOUTS holds every record type.

    Returns the names of kind modules that are declared but missing (still being written);
    a kind module that exists but fails to import is a bug and raises.
    """
    from .. import kinds

    missing = []
    for name in kinds.KIND_MODULES:
        module = f"{kinds.__name__}.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            missing.append(name)
    return missing


# -- values -----------------------------------------------------------------------------------
def _flag_names(table: dict[int, str], value: int) -> str:
    names = [name for bit, name in sorted(table.items()) if bit and value & bit == bit]
    rest = value
    for bit, _ in sorted(table.items()):
        if bit and value & bit == bit:
            rest &= ~bit
    if rest:
        names.append(hex(rest))
    return "|".join(names) if names else "0"


def show_value(f: Field, value) -> Any:
    """A field's value as the printer shows it (a JSON-able scalar)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    hint = f.hint
    if hint == "hex":
        return hex(value)
    if hint == "octal":
        return oct(value)
    if hint.startswith("enum:"):
        return ENUMS.get(hint[5:], {}).get(value, value)
    if hint.startswith("flags:"):
        return _flag_names(ENUMS.get(hint[6:], {}), value)
    return value  # objref, time, signed and plain numbers stay numbers


def _show_time(value: int) -> str:
    # The model stamps images with its tick counter; the live backend with Unix seconds.
    if 10**9 <= value < 10**10:
        stamp = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
        return f"{value} ({stamp:%Y-%m-%d %H:%M:%S} UTC)"
    return str(value)


def var_length(rec: Record) -> int:
    """Bytes of the record's variable part."""
    lay, var = rec.layout, rec.var
    if lay.var is None or var is None:
        return 0
    if lay.var == "str":
        return len(var.encode())
    if lay.var == "bytes":
        return len(var)
    return len(var) * lay.item_struct.size


def record_length(rec: Record) -> int:
    """The record's ``len``: header, fixed part and variable part (not the padding)."""
    return 8 + rec.layout.fixed_size + var_length(rec)


def describe_bytes(data) -> Any:
    data = memoryview(data)
    if len(data) <= SHOW_BYTES:
        return bytes(data).hex()
    return {"length": len(data), "head": bytes(data[:HEAD_BYTES]).hex()}


def _describe_item(fields: tuple[Field, ...], item: tuple) -> dict:
    return {f.name: show_value(f, v) for f, v in zip(fields, item)}


def describe_var(lay: Layout, var) -> Any:
    if lay.var is None:
        return None
    if lay.var == "str":
        return var
    if lay.var == "bytes":
        return describe_bytes(var)
    items = var or []
    if len(items) <= SHOW_ITEMS:
        return [_describe_item(lay.var, item) for item in items]
    return {"items": len(items), "first": [_describe_item(lay.var, i) for i in items[:HEAD_BYTES]]}


def describe(rec: Record) -> dict:
    """The record as a JSON-able dict: offset, type, len, fields (shown per hints), var."""
    out = {"offset": rec.offset, "type": rec.name, "type_id": rec.layout.type_id,
           "len": record_length(rec),
           "fields": {f.name: show_value(f, rec.values[f.name]) for f in rec.layout.fields}}
    if rec.layout.var is not None:
        out["var"] = describe_var(rec.layout, rec.var)
    return out


# -- text -------------------------------------------------------------------------------------
def _text_scalar(f: Field, value) -> str:
    if f.hint == "time":
        return _show_time(value)
    if f.objtype is not None:
        return f"@{value}" if value else "-"
    return str(show_value(f, value))


def render_fields(rec: Record, skip_zero_pad: bool = True) -> str:
    parts = []
    for f in rec.layout.fields:
        if skip_zero_pad and f.name == "pad" and not rec.values[f.name]:
            continue
        parts.append(f"{f.name}={_text_scalar(f, rec.values[f.name])}")
    return " ".join(parts)


def render_var(rec: Record) -> str:
    lay, var = rec.layout, rec.var
    if lay.var is None:
        return ""
    if lay.var == "str":
        return repr(var) if var else ""
    if lay.var == "bytes":
        n = len(var)
        return bytes(var).hex() if n <= 32 else f"<{n} bytes>"
    items = var or []
    # Arrays are mostly tables indexed by position (signal handlers, registers...): show the
    # items that are set, with their index.
    set_items = [(i, item) for i, item in enumerate(items) if any(item)]
    shown = ", ".join(
        f"[{i}] " + " ".join(f"{f.name}={_text_scalar(f, v)}" for f, v in zip(lay.var, item))
        for i, item in set_items[:8])
    more = f", ... {len(set_items) - 8} more" if len(set_items) > 8 else ""
    return f"<{len(items)} items, {len(set_items)} set{': ' + shown if shown else ''}{more}>"


def render(rec: Record) -> str:
    """One line: the record's name, its fields and its variable part."""
    text = " ".join(p for p in (rec.name, render_fields(rec), render_var(rec)) if p)
    return text


# -- the specification tables ----------------------------------------------------------------
def _subsystem(type_id: int) -> str:
    return next((name for name, r in RANGES.items() if type_id in r), "?")


def _meaning(f: Field) -> str:
    hint = f.hint
    if f.name == "pad":
        return "zero"
    if hint == "hex":
        return "shown in hex"
    if hint == "octal":
        return "shown in octal"
    if hint == "time":
        return "time stamp"
    if hint == "signed":
        return "signed"
    if f.objtype is not None:
        return f"objref of a {f.objtype.name} object (0: none)"
    if hint.startswith(("enum:", "flags:")):
        kind, name = hint.split(":", 1)
        table = ENUMS.get(name, {})
        values = ", ".join(f"{v:#x}={n}" if kind == "flags" else f"{v}={n}"
                           for v, n in sorted(table.items()))
        return f"{'bit flags' if kind == 'flags' else 'enum'} {name}: {values}"
    return ""


def _field_rows(fields: tuple[Field, ...], start: int) -> list[str]:
    rows, offset = [], start
    for f in fields:
        size = struct.calcsize("<" + f.fmt)
        rows.append(f"| {offset} | `{f.name}` | {f.ftype} | {_meaning(f)} |")
        offset += size
    return rows


def _var_text(lay: Layout) -> str:
    if lay.var is None:
        return "none (the record is exactly its fixed part)"
    limit = f"at most {lay.max_var} bytes"
    if lay.var == "bytes":
        return f"raw bytes, {limit}"
    if lay.var == "str":
        return f"UTF-8 text, no terminator, {limit}"
    return f"array of {lay.item_struct.size}-byte items, {limit}"


def spec_tables() -> str:
    """Markdown for every registered layout, in type-id order (docs/image-format.md §8)."""
    out = ["| subsystem | type ids |", "|---|---|"]
    out += [f"| {name} | {r.start}..{r.stop - 1} |" for name, r in RANGES.items()]
    out += ["", "Object types (`OBJREF.objtype`): " +
            ", ".join(f"{t.name}={t.value}" for t in ObjType) + ".", ""]
    for type_id in sorted(LAYOUTS):
        lay = LAYOUTS[type_id]
        out += [f"### {lay.name} ({type_id}, {_subsystem(type_id)})", "",
                f"Fixed part: {lay.fixed_size} bytes (len {8 + lay.fixed_size} without a "
                f"variable part). Variable part: {_var_text(lay)}.", ""]
        if lay.fields:
            out += ["| offset | field | type | meaning |", "|---|---|---|---|"]
            out += _field_rows(lay.fields, 8)
            out.append("")
        if isinstance(lay.var, tuple):
            out += ["Array item (offsets within the item):", "",
                    "| offset | field | type | meaning |", "|---|---|---|---|"]
            out += _field_rows(lay.var, 0)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def generated_section(doc_text: str) -> str:
    """The text between the doc's generated-section markers."""
    start = doc_text.index(SPEC_BEGIN) + len(SPEC_BEGIN)
    return doc_text[start:doc_text.index(SPEC_END)].strip("\n") + "\n"


def update_doc(path: str) -> bool:
    """Rewrite the generated section of ``path``; True if it changed."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    head, rest = text.split(SPEC_BEGIN, 1)
    _, tail = rest.split(SPEC_END, 1)
    new = f"{head}{SPEC_BEGIN}\n{spec_tables()}{SPEC_END}{tail}"
    if new != text:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(new)
    return new != text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m ckptsim.image.pretty",
                                     description="Print the image format's record tables.")
    parser.add_argument("--spec-tables", action="store_true", help="print the tables (markdown)")
    parser.add_argument("--update-doc", metavar="PATH", help="rewrite PATH's generated section")
    args = parser.parse_args(argv)
    missing = load_layouts()
    if missing:
        print(f"note: kind modules not yet present: {', '.join(missing)}", file=sys.stderr)
    if args.update_doc:
        changed = update_doc(args.update_doc)
        print(f"{args.update_doc}: {'updated' if changed else 'up to date'}")
    else:
        sys.stdout.write(spec_tables())
    return 0


__all__ = ["describe", "render", "render_fields", "render_var", "show_value", "record_length",
           "spec_tables", "update_doc", "generated_section", "load_layouts"]

if __name__ == "__main__":
    sys.exit(main())

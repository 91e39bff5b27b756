"""The layout registry and the generated record tables of docs/image-format.md."""
import pathlib

import pytest

from ckptsim.image import core
from ckptsim.image.pretty import generated_section, load_layouts, spec_tables
from ckptsim.image.schema import LAYOUTS, layout
from ckptsim.image.types import RANGES

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "image-format.md"


def test_doc_tables_match_the_registry():
    load_layouts()
    expected = spec_tables()
    actual = generated_section(DOC.read_text(encoding="utf-8"))
    assert actual == expected, (
        "docs/image-format.md's record tables are stale: run "
        "`python3 -m ckptsim.image.pretty --update-doc docs/image-format.md`")


def test_every_layout_is_in_its_range_and_named_once():
    load_layouts()
    names = [lay.name for lay in LAYOUTS.values()]
    assert len(names) == len(set(names))
    for type_id in LAYOUTS:
        assert any(type_id in r for r in RANGES.values())


def test_framing_record_sizes():
    assert core.HEADER.fixed_size % 8 == 0
    assert core.TAIL_SIZE == 32
    assert core.OBJREF.fixed_size == 8


@pytest.mark.parametrize("args, message", [
    ((1, "DUP", []), "declared twice"),
    ((150, "WRONG_RANGE", []), "outside the file range"),
    ((9500, "NO_RANGE", []), "no subsystem range"),
    ((899, "BAD_TYPE", [("x", "u128")]), "unknown field type"),
    ((899, "BAD_VAR", [], "blob"), "bad var kind"),
    ((899, "DUP_FIELD", [("x", "u8"), ("x", "u8")]), "duplicate field"),
])
def test_registry_refuses_bad_declarations(args, message):
    kwargs = {"subsystem": "file"} if args[1] == "WRONG_RANGE" else {}
    with pytest.raises(ValueError, match=message):
        layout(*args, **kwargs)
    assert 899 not in LAYOUTS


def test_bad_objref_hint_fails_at_declaration():
    with pytest.raises(KeyError):
        layout(898, "BAD_HINT", [("r", "i32", "objref:NOT_A_TYPE")])
    assert 898 not in LAYOUTS

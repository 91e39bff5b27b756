"""backend/elf_ids.py: build ids read from the PT_NOTE headers only, and the identity cache
kept between runs (backend/runcache.py, whose trust rules tests/backend/test_runcache.py
covers)."""
from __future__ import annotations

import hashlib
import os

import pytest
from elftools.elf.elffile import ELFFile

from backend import elf_ids, runcache
from ckptsim.kinds.memory import ID_BUILD_ID, ID_SHA256

NOT_ELF = b"#!/bin/sh\necho not an ELF file\n" * 50


def _libc() -> str:
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "/libc.so" in line or "/libc-" in line}
    if not paths:
        pytest.skip("this interpreter maps no libc")
    return sorted(paths)[0]


def _build_id_by_all_segments(path: str) -> bytes | None:
    """The build id the way pyelftools' iter_segments finds it (every segment built)."""
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments(type="PT_NOTE"):
            for note in seg.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return bytes.fromhex(note["n_desc"])
    return None


def test_build_id_from_the_note_headers_is_the_one_every_segment_gives():
    for path in (_libc(), os.path.realpath(f"/proc/{os.getpid()}/exe")):
        with open(path, "rb") as f:
            found = elf_ids.build_id_of(f)
        assert found is not None and found == _build_id_by_all_segments(path), path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache file of the test's own and a process cache that starts empty."""
    path = tmp_path / "cache" / elf_ids.CACHE_FILE
    monkeypatch.setenv(runcache.CACHE_ENV, str(path.parent))
    monkeypatch.setattr(elf_ids, "_identities", {})
    monkeypatch.setattr(elf_ids, "_vdso_layouts", {})
    monkeypatch.setattr(elf_ids, "_cache", {"loaded": False, "new": 0})
    return path


def _new_process(monkeypatch) -> list:
    """Forget what this process knows, as a new checkpointer would; count computations."""
    computed: list = []
    real = elf_ids._compute
    monkeypatch.setattr(elf_ids, "_identities", {})
    monkeypatch.setattr(elf_ids, "_vdso_layouts", {})
    monkeypatch.setattr(elf_ids, "_cache", {"loaded": False, "new": 0})
    monkeypatch.setattr(elf_ids, "_compute", lambda *a: computed.append(a) or real(*a))
    return computed


def test_identities_are_kept_between_processes_in_a_private_file(cache, tmp_path, monkeypatch):
    lib = tmp_path / "lib.bin"
    lib.write_bytes(NOT_ELF)
    first = elf_ids.identity_of(str(lib))
    libc = elf_ids.identity_of(_libc())
    assert first.kind == ID_SHA256 and first.value == hashlib.sha256(NOT_ELF).digest()
    assert libc.kind == ID_BUILD_ID
    elf_ids.save_cache()
    assert (cache.stat().st_mode & 0o777) == 0o600
    assert (cache.parent.stat().st_mode & 0o777) == 0o700
    computed = _new_process(monkeypatch)
    assert elf_ids.identity_of(str(lib)) == first
    assert elf_ids.identity_of(_libc()) == libc
    assert computed == []
    lib.write_bytes(NOT_ELF[::-1])                   # changed: a new ctime, computed again
    changed = elf_ids.identity_of(str(lib))
    assert len(computed) == 1 and changed.value == hashlib.sha256(NOT_ELF[::-1]).digest()


def test_the_vdso_layout_is_kept_between_processes(cache, monkeypatch):
    here = elf_ids.own_vdso_layout()
    if here is None:
        pytest.skip("this kernel maps no vdso")
    elf_ids.own_vdso_layout.cache_clear()
    elf_ids.vdso_layout_of.cache_clear()
    parsed = elf_ids.own_vdso_layout()
    assert parsed == here and "__vdso_clock_gettime" in parsed.offsets
    elf_ids.save_cache()
    _new_process(monkeypatch)
    elf_ids.own_vdso_layout.cache_clear()
    monkeypatch.setattr(elf_ids, "vdso_layout_of",
                        lambda *a: pytest.fail("the vdso was parsed again"))
    assert elf_ids.own_vdso_layout() == here

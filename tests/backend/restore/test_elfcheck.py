"""backend/restore/elfcheck.py: a live restart is refused, before it creates anything, when a
mapped executable file or this kernel's vdso no longer matches the image (kinds/memory.py's
FILE_ID and VDSO_LAYOUT records, written by backend/elf_ids.py at checkpoint).

The C target (targets/elf_target.c) is compiled by each test with the build id it needs, at a
path of its own; it is checkpointed with --kill and restarted with restart_image. Restored
processes are killed by pid and the restart's child reaped on every path; a refused restart
must leave no process behind (no new child of this process, nothing running the target).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import os
import shutil
import subprocess
import time
import types

import pytest

from backend import elf_ids
from backend.dump import checkpoint
from backend.restore import elfcheck
from backend.restore.job import RestoreError, restart_image
from backend.restore.stub import StubError
from ckptsim.image import core, decode_all
from ckptsim.image.codec import ImageWriter
from ckptsim.kinds.memory import ID_BUILD_ID, ID_SHA256, FileIdentity

TARGETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "targets")
OLD_ID, NEW_ID = "11" * 20, "22" * 20
NOT_ELF = b"this is not an ELF file, but it is mapped executable\n" * 78 + b"." * 4


def build(exe: str, build_id: str | None) -> str:
    """Compile targets/elf_target.c to ``exe`` with that build id (None: no build id)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: these tests build their C target (apt-get install gcc)")
    flag = f"-Wl,--build-id=0x{build_id}" if build_id else "-Wl,--build-id=none"
    r = subprocess.run([gcc, "-O1", "-Wall", "-o", exe, os.path.join(TARGETS, "elf_target.c"),
                        flag], capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"gcc failed:\n{r.stderr}")
    return exe


def my_children() -> set[int]:
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                out |= {int(p) for p in f.read().split()}
        except FileNotFoundError:         # a thread (the restart's checksum) just ended
            pass
    return out


def running(exe: str) -> list[int]:
    """Pids of the processes whose executable is ``exe``."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/exe") == exe:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def count_in(path: str) -> int:
    with open(path) as f:
        text = f.read().strip()
    return int(text) if text else 0


def image_of(target) -> bytes:
    sink = io.BytesIO()
    checkpoint(target.pid, sink, kill=True)
    target.proc.wait(timeout=10)
    return sink.getvalue()


def refused(image: bytes, exe: str) -> RestoreError:
    """Restart ``image``, which must be refused without leaving anything behind."""
    before = my_children()
    with pytest.raises(RestoreError) as info:
        restart_image(bytearray(image))
    assert my_children() == before, "a refused restart left a child behind"
    assert running(exe) == [], "a refused restart left a process running the target"
    return info.value


def runs_on(restored, counter: str) -> None:
    first = count_in(counter)
    deadline = time.monotonic() + 10
    while count_in(counter) <= first:
        assert time.monotonic() < deadline, f"restored {restored.root} does not count on"
        time.sleep(0.02)


def rewrite(data: bytes, edit) -> bytes:
    """The image with ``edit(record)`` applied (it returns (values, var) or None to keep the
    record), encoded again by the codec."""
    out = io.BytesIO()
    writer = ImageWriter(out)
    for rec in decode_all(data):
        if rec.layout is not core.TAIL:
            changed = edit(rec)
            values, var = changed if changed is not None else (dict(rec.values), rec.var)
            writer.write(rec.layout, var=var, **values)
    writer.finish()
    return out.getvalue()


def file_ids(image: bytes) -> dict[str, tuple[int, bytes]]:
    """{path: (id_kind, identity)} of the image's FILE_ID records."""
    recs = decode_all(image)
    paths, out, last_ref = {}, {}, None
    for rec in recs:
        if rec.name == "OBJREF":
            last_ref = rec["objref"]
        elif rec.name == "FILE_NAME" and last_ref not in paths:
            paths[last_ref] = rec.var
        elif rec.name == "FILE_ID":
            out[paths[rec["file_objref"]]] = (rec["id_kind"], bytes(rec.var))
    return out


# -- real targets ---------------------------------------------------------------------------
def test_rebuilt_executable_is_refused_naming_it(tmp_path, start_target):
    exe = build(str(tmp_path / "elf_target"), OLD_ID)
    image = image_of(start_target(exe, tmp_path / "count"))
    assert file_ids(image)[exe] == (ID_BUILD_ID, bytes.fromhex(OLD_ID))
    build(exe, NEW_ID)                                  # same path, another build id
    err = refused(image, exe)
    assert err.errno == errno.ESTALE
    assert exe in str(err) and OLD_ID in str(err) and NEW_ID in str(err)
    assert "\n" not in str(err)


def test_unchanged_executable_restarts(tmp_path, start_target, restart_images):
    exe = build(str(tmp_path / "elf_target"), OLD_ID)
    counter = str(tmp_path / "count")
    image = image_of(start_target(exe, counter))
    ids = file_ids(image)
    assert any("libc" in path for path in ids), ids       # the libraries are recorded too
    os.utime(exe)                         # a new mtime: the identity, not the time, decides
    lines = []
    restored = restart_images(image, log=lines.append)
    runs_on(restored, counter)
    assert any("executable files match the image" in line for line in lines), lines


def test_executable_without_build_id_uses_its_hash(tmp_path, start_target, restart_images):
    exe = build(str(tmp_path / "elf_target"), None)
    with open(exe, "rb") as f:
        digest = hashlib.sha256(f.read()).digest()
    counter = str(tmp_path / "count")
    image = image_of(start_target(exe, counter))
    assert file_ids(image)[exe] == (ID_SHA256, digest)
    runs_on(restart_images(image), counter)                     # unchanged: restart_images
    with open(exe, "rb") as f:                            # same size, the last byte else
        contents = bytearray(f.read())
    contents[-1] ^= 0xFF
    with open(exe + ".new", "wb") as f:                   # (the restored copy runs it: a
        f.write(contents)                                 # new file replaces it, as ld does)
    os.chmod(exe + ".new", 0o755)
    os.replace(exe + ".new", exe)
    err = refused(image, exe)
    assert err.errno == errno.ESTALE and exe in str(err) and digest.hex() in str(err)
    assert "SHA-256" in str(err)


def test_non_elf_executable_mapping_uses_its_hash(tmp_path, start_target, restart_images):
    exe = build(str(tmp_path / "elf_target"), OLD_ID)
    data = tmp_path / "code.bin"
    data.write_bytes(NOT_ELF)
    counter = str(tmp_path / "count")
    image = image_of(start_target(exe, counter, data))
    assert file_ids(image)[str(data)] == (ID_SHA256, hashlib.sha256(NOT_ELF).digest())
    data.write_bytes(NOT_ELF.replace(b"this", b"THIS"))  # other contents, same size
    err = refused(image, exe)
    assert err.errno == errno.ESTALE and str(data) in str(err) and "SHA-256" in str(err)
    data.write_bytes(NOT_ELF)                              # back as it was: restart_images
    runs_on(restart_images(image), counter)


def test_vdso_with_a_moved_symbol_is_refused(tmp_path, start_target):
    exe = build(str(tmp_path / "elf_target"), OLD_ID)
    image = image_of(start_target(exe, tmp_path / "count"))
    here = elf_ids.own_vdso_layout()
    name = "__vdso_clock_gettime"
    assert name in here.offsets

    def move(rec):
        if rec.name == "VDSO_SYMBOL" and rec.var == name:
            return {**rec.values, "offset": rec["offset"] + 0x10}, rec.var
        return None

    err = refused(rewrite(image, move), exe)
    assert err.errno == errno.ENOEXEC and name in str(err)
    assert f"{here.offsets[name]:#x}" in str(err) and f"{here.offsets[name] + 0x10:#x}" in str(err)


def test_vdso_of_another_size_is_refused(tmp_path, start_target):
    exe = build(str(tmp_path / "elf_target"), OLD_ID)
    image = image_of(start_target(exe, tmp_path / "count"))

    def grow(rec):
        if rec.name == "VDSO_LAYOUT":
            return {**rec.values, "vvar_size": rec["vvar_size"] + 0x1000}, rec.var
        return None

    err = refused(rewrite(image, grow), exe)
    assert err.errno == errno.ENOEXEC and "[vvar]" in str(err)


# -- the checks on model objects --------------------------------------------------------------
def tasks_with(file_ids=None, vdso=None, n=1):
    """``n`` model-like tasks, each with its own mm holding these records."""
    return [types.SimpleNamespace(state="running", mm=types.SimpleNamespace(
        file_ids=dict(file_ids or {}), vdso_layout=vdso)) for _ in range(n)]


class FakeFile:
    """A model File as elfcheck sees it (hashed by identity, as File is)."""

    def __init__(self, path: str, nlink: int = 1):
        self.path, self.inode = path, types.SimpleNamespace(nlink=nlink)


def fake_file(path: str) -> FakeFile:
    return FakeFile(path)


def test_vdso_same_symbols_other_bytes_is_accepted_with_a_line():
    here = elf_ids.own_vdso_layout()
    other = dataclasses.replace(here, build_id=b"\x01" * 20)
    lines = []
    elfcheck.verify(tasks_with(vdso=other), lines.append)
    assert len(lines) == 1 and "same" in lines[0] and here.build_id.hex() in lines[0]
    elfcheck.verify(tasks_with(vdso=here), lines.append)   # identical: nothing to say
    assert len(lines) == 1


def test_vdso_missing_symbol_is_refused():
    here = elf_ids.own_vdso_layout()
    wanted = dataclasses.replace(here, symbols=here.symbols + (("__vdso_future", 0x10, 4),))
    with pytest.raises(StubError) as info:
        elfcheck.verify(tasks_with(vdso=wanted))
    assert info.value.errno == errno.ENOEXEC and "__vdso_future" in str(info.value)
    assert "missing" in str(info.value)


def test_vdso_layout_read_here_matches_the_maps():
    here = elf_ids.own_vdso_layout()
    with open("/proc/self/maps") as f:
        sizes = {line.split()[-1]: int(line.split()[0].split("-")[1], 16)
                 - int(line.split()[0].split("-")[0], 16)
                 for line in f if line.rstrip().endswith(("[vdso]", "[vvar]", "[vvar_vclock]"))}
    assert {k: v for k, v in here.sizes.items() if v} == sizes
    assert "__vdso_clock_gettime" in here.offsets and here.build_id


def test_file_identities_are_cached_per_file(tmp_path, monkeypatch):
    path = tmp_path / "lib.bin"
    path.write_bytes(NOT_ELF)
    computed = []
    real = elf_ids._compute
    monkeypatch.setattr(elf_ids, "_compute", lambda *a: computed.append(a) or real(*a))
    ident = elf_ids.identity_of(str(path))
    assert ident.kind == ID_SHA256 and ident.value == hashlib.sha256(NOT_ELF).digest()
    # a hundred processes mapping it: one read
    elfcheck.verify(tasks_with({fake_file(str(path)): ident}, n=100))
    assert elf_ids.identity_of(str(path), ID_SHA256) == ident
    assert len(computed) == 1
    path.write_bytes(NOT_ELF[::-1])                  # changed: read again, and refused
    with pytest.raises(StubError) as info:
        elfcheck.verify(tasks_with({fake_file(str(path)): ident}))
    assert info.value.errno == errno.ESTALE and str(path) in str(info.value)
    assert len(computed) == 2


def test_gone_file_is_refused_naming_it(tmp_path):
    gone = str(tmp_path / "gone.so")
    ident = FileIdentity(ID_BUILD_ID, b"\x33" * 20, 100, 0)
    with pytest.raises(StubError) as info:
        elfcheck.verify(tasks_with({fake_file(gone): ident}))
    assert info.value.errno == errno.ESTALE and gone in str(info.value)
    assert "33" * 20 in str(info.value)


def test_unlinked_files_are_not_checked(tmp_path):
    unlinked = FakeFile(str(tmp_path / "deleted"), nlink=0)
    ident = FileIdentity(ID_SHA256, b"\x00" * 32, 0, 0)
    elfcheck.verify(tasks_with({unlinked: ident}))       # recreated from the image: fine

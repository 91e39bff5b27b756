"""backend/unix_embryo_prog.py: the embryo reader's program compiled by bcc in a child process,
kept in the run cache, and loaded with raw bpf(2). The map fd patching and the cache's checks
are pure; the tests that compile or load skip, saying why, when the reader is unavailable."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from backend import kabi, unix_embryo
from backend import unix_embryo_prog as prog
from backend.unix_embryo import EmbryoUnavailable
from backend.unix_embryo_btf import Btf
from backend.unix_embryo_prog import Program, ProgError, patch_map_fds

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAVE_BTF = os.path.exists("/sys/kernel/btf/vmlinux")


def insn(code, dst=0, src=0, off=0, imm=0) -> bytes:
    return kabi.BPF_INSN.pack(code, src << 4 | dst, off, imm)


def ld_map(dst, fd, src=kabi.BPF_PSEUDO_MAP_FD) -> bytes:
    return insn(kabi.BPF_LD_IMM64, dst, src, imm=fd) + insn(0)


MOV_K, CALL, EXIT = 0xB7, 0x85, 0x95


# -- patching the map fds -----------------------------------------------------------------
def test_patch_map_fds_changes_the_map_fds_and_nothing_else():
    before = (insn(MOV_K, 1, imm=5)              # the number 5, not a map
              + ld_map(1, 5)
              + ld_map(2, 6, src=0)             # a 64-bit constant that happens to be 6
              + insn(CALL, imm=1)
              + ld_map(1, 6)
              + insn(kabi.BPF_LD_IMM64, 3, 0, imm=5) + insn(0, imm=7)   # constant, high half 7
              + insn(EXIT))
    after = patch_map_fds(before, {5: 40, 6: 41})
    assert after == (insn(MOV_K, 1, imm=5) + ld_map(1, 40) + ld_map(2, 6, src=0)
                     + insn(CALL, imm=1) + ld_map(1, 41)
                     + insn(kabi.BPF_LD_IMM64, 3, 0, imm=5) + insn(0, imm=7) + insn(EXIT))
    assert len(after) == len(before)


@pytest.mark.parametrize("insns, why", [
    (ld_map(1, 9) + insn(EXIT), "names map fd 9, not one of"),
    (ld_map(1, 5, src=2) + insn(EXIT), "of kind 2"),             # BPF_PSEUDO_MAP_VALUE
    (insn(MOV_K) + insn(kabi.BPF_LD_IMM64, 1, 1, imm=5), "without its second half"),
])
def test_patch_map_fds_refuses_what_it_cannot_patch(insns, why):
    with pytest.raises(ProgError, match=why):
        patch_map_fds(insns, {5: 40})


# -- a program description, and the cache -------------------------------------------------
def doc(**change) -> dict:
    maps = {name: {"fd": 4 + i, "type": kabi.BPF_MAP_TYPE_HASH, "key_size": 8,
                   "value_size": 8, "max_entries": 16, "flags": 0}
            for i, name in enumerate(prog.MAPS)}
    d = {"insns": (ld_map(1, 4) + ld_map(1, 5) + ld_map(1, 6) + insn(EXIT)).hex(),
         "maps": maps, "attach_btf_id": 1234, "cflags": ["-DX=1"], "src_sha": "ab" * 32}
    d.update(change)
    return d


def test_program_from_doc():
    p = Program.from_doc(doc())
    assert p.attach_btf_id == 1234 and p.maps["cursor"].fd == 5 and len(p.insns) == 7 * 8


@pytest.mark.parametrize("change, why", [
    ({"insns": "zz"}, "malformed"),
    ({"insns": ""}, "not a program"),
    ({"insns": "b7000000000000"}, "not a program"),                    # 7 bytes
    ({"insns": (ld_map(1, 7) + insn(EXIT)).hex()}, "map fd 7"),
    ({"attach_btf_id": -1}, "malformed"),
    ({"attach_btf_id": 0}, "make no sense"),
    ({"maps": {"listeners": {}}}, "malformed"),
])
def test_program_from_doc_refuses_a_bad_description(change, why):
    with pytest.raises(ProgError, match=why):
        Program.from_doc(doc(**change))
    bad = doc()
    bad["maps"]["buf"]["fd"] = 4                                     # two maps, one fd
    with pytest.raises(ProgError, match="make no sense"):
        Program.from_doc(bad)


@pytest.mark.skipif(not HAVE_BTF, reason="no kernel BTF here (the cache key names its size)")
def test_a_cache_entry_is_used_only_as_it_was_saved(monkeypatch, tmp_path):
    monkeypatch.setenv("CKPTSIM_CACHE_DIR", str(tmp_path))
    d = doc()
    assert prog.load_cached(d["cflags"], d["src_sha"]) == (None, "no cached program")
    prog.save(d)
    got, why = prog.load_cached(d["cflags"], d["src_sha"])
    assert why == "cached" and got == Program.from_doc(d)
    assert prog.load_cached(["-DX=2"], d["src_sha"])[0] is None          # other cflags
    assert prog.load_cached(d["cflags"], "cd" * 32)[0] is None           # another source
    path = tmp_path / prog.CACHE_NAME
    entry = json.loads(path.read_text())
    entry["program"]["insns"] = (ld_map(1, 4) + ld_map(1, 5) + ld_map(1, 6)
                                 + insn(MOV_K) + insn(EXIT)).hex()      # a changed program
    path.write_text(json.dumps(entry))
    got, why = prog.load_cached(d["cflags"], d["src_sha"])
    assert got is None and "checksum does not match" in why
    entry = json.loads(path.read_text())
    entry["program"]["insns"] = (ld_map(1, 9) + insn(EXIT)).hex()
    entry["sha256"] = prog._digest(entry["program"])                  # checksum made to fit
    path.write_text(json.dumps(entry))
    got, why = prog.load_cached(d["cflags"], d["src_sha"])
    assert got is None and "not trusted" in why and "map fd 9" in why
    path.write_text(path.read_text()[:-20])                               # cut short
    assert prog.load_cached(d["cflags"], d["src_sha"]) == (None, "no cached program")


def test_a_failed_compile_is_refused_with_its_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("CKPTSIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(unix_embryo, "_why_unavailable", lambda: None)

    def fail(cflags):
        raise ProgError("compiling the embryo reader failed: no clang here (test)")
    monkeypatch.setattr(prog, "compile_in_child", fail)
    with pytest.raises(EmbryoUnavailable, match="no clang here"):
        unix_embryo.read_embryos([1])


def test_the_compile_entry_says_how_it_is_used():
    r = subprocess.run([sys.executable, "-m", "backend.unix_embryo_prog", "--bogus"],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("usage:") and "Traceback" not in r.stderr


# -- compiled in a child, loaded with bpf(2) ----------------------------------------------
def needs_reader():
    ok, why = unix_embryo.available()
    if not ok:
        pytest.skip(f"the BPF embryo reader is unavailable here: {why}")


@pytest.fixture
def pending():
    """A stream listener with one pending connection holding b"hello"."""
    lis = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lis.bind(f"\0ckptsim-embryo-prog-{os.getpid()}-{os.urandom(4).hex()}")
    lis.listen(4)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(lis.getsockname())
    c.send(b"hello")
    yield os.fstat(lis.fileno()).st_ino, os.fstat(c.fileno()).st_ino
    c.close()
    lis.close()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_compiled_once_then_loaded_from_the_cache(monkeypatch, tmp_path, pending):
    needs_reader()
    monkeypatch.setenv("CKPTSIM_CACHE_DIR", str(tmp_path))
    compiles = []
    real = prog.compile_in_child
    monkeypatch.setattr(prog, "compile_in_child", lambda f: compiles.append(f) or real(f))
    lis, client = pending
    fds = fd_count()
    assert unix_embryo.read_embryos([lis])[client].buffers == [b"hello"]
    assert compiles == [None]               # cold: the child worked out the cflags too
    assert unix_embryo.available() == (True, "kernel BTF and a cached compiled program "
                                       "(loaded with bpf(2), no bcc)")
    assert unix_embryo.read_embryos([lis])[client].buffers == [b"hello"]
    assert len(compiles) == 1 and fd_count() == fds


def test_a_cached_program_the_kernel_refuses_is_compiled_again(monkeypatch, tmp_path, pending):
    needs_reader()
    monkeypatch.setenv("CKPTSIM_CACHE_DIR", str(tmp_path))
    lis, client = pending
    unix_embryo.read_embryos([lis])
    path = tmp_path / prog.CACHE_NAME
    entry = json.loads(path.read_text())
    entry["program"]["insns"] = insn(EXIT).hex()          # r0 unset: the verifier says no
    entry["sha256"] = prog._digest(entry["program"])
    path.write_text(json.dumps(entry))
    compiles = []
    real = prog.compile_in_child
    monkeypatch.setattr(prog, "compile_in_child", lambda f: compiles.append(f) or real(f))
    fds = fd_count()
    assert unix_embryo.read_embryos([lis])[client].buffers == [b"hello"]
    assert len(compiles) == 1 and compiles[0] is not None and fd_count() == fds
    assert json.loads(path.read_text())["program"]["insns"] != insn(EXIT).hex()


def test_a_fresh_compile_the_kernel_refuses_is_not_kept(monkeypatch, tmp_path, pending):
    needs_reader()
    monkeypatch.setenv("CKPTSIM_CACHE_DIR", str(tmp_path))
    lis, _ = pending

    def refuse(program):
        raise ProgError("injected: the kernel refused it")
    monkeypatch.setattr(prog, "Loaded", refuse)
    with pytest.raises(unix_embryo.EmbryoUnavailable, match="injected"):
        unix_embryo.read_embryos([lis])
    assert not (tmp_path / prog.CACHE_NAME).exists()      # the next run compiles afresh


def test_a_refused_program_says_what_the_verifier_said():
    needs_reader()
    btf_id = Btf.load().type_id(prog.ATTACH_FUNC, kabi.BTF_KIND_FUNC)
    p = Program.from_doc(doc(insns=insn(EXIT).hex(), attach_btf_id=btf_id))
    fds = fd_count()
    with pytest.raises(ProgError, match=r"refused the unix iterator .*verifier: .*R0"):
        prog.Loaded(p)
    assert fd_count() == fds                               # the maps it made are closed


def test_a_failed_read_of_the_iterator_is_a_prog_error_and_closes_it(monkeypatch):
    import errno
    import types
    from backend import unix_embryo_prog as prog
    opened = []

    def fake_bpf(cmd, attr, what):
        fd = os.open("/dev/null", os.O_RDONLY)
        opened.append(fd)
        return fd

    def failing_read(fd, n):
        raise OSError(errno.E2BIG, os.strerror(errno.E2BIG))
    monkeypatch.setattr(prog, "_bpf", fake_bpf)
    monkeypatch.setattr(prog.os, "read", failing_read)
    with pytest.raises(prog.ProgError, match="reading the unix iterator"):
        prog.Loaded.iterate(types.SimpleNamespace(link_fd=-1))
    monkeypatch.undo()
    with pytest.raises(OSError):
        os.fstat(opened[0])                        # closed

"""bpf/unix_embryo.c as bytecode: compiled by bcc once, in a child process, kept in the run
cache, and loaded with raw bpf(2) by the checkpointer, which so never imports bcc (bcc brings
LLVM: a checkpoint that loaded it peaked at ~163 MiB; the checkpointer's budget is 64 MiB).

    python -m backend.unix_embryo_prog --compile [-- CFLAG ...]
        (the child) prints the program as JSON: the instructions bcc would load (dump_func:
        after its rewriter and with its own map fds in them), its maps (bcc's fd, type, sizes,
        flags), the BTF id of the kernel function the iterator attaches to, the cflags (computed
        from the kernel's BTF when none are given) and the hash of the source it compiled
    compile_in_child(cflags | None) -> doc       runs the above; raises ProgError saying why
    Program.from_doc(doc) -> Program             checks a doc (a cache entry is not trusted)
    load_cached(cflags, src_sha) / save(doc)     the run cache (backend/runcache.py)
    patch_map_fds(insns, {old fd: new fd}) -> insns
    Loaded(program)                              maps, program and iterator link (bpf(2))
        .iterate() -> bytes  .update(map, key, value)  .clear(map)  .close()
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from ckptsim.errors import CkptsimError

from . import kabi, runcache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUNC = "bpf_iter__unix"            # the program's function (bcc's BPF_ITER(unix))
ATTACH_FUNC = "bpf_iter_unix"      # the kernel's iterator target, a BTF FUNC
MAPS = ("listeners", "cursor", "buf")
CACHE_NAME = "unix-embryo-prog.json"
COMPILE_TIMEOUT = 120
MAX_INSNS = 1 << 20                # BPF_COMPLEXITY_LIMIT_INSNS
LOG_SIZE = 1 << 20                 # verifier log kept for an error (its tail is shown)


class ProgError(CkptsimError):
    """The program cannot be compiled, trusted or loaded; the message says why."""


@dataclass(frozen=True)
class MapSpec:
    fd: int                        # bcc's fd for it in the compiling child
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True)
class Program:
    insns: bytes
    maps: dict[str, MapSpec]
    attach_btf_id: int

    @classmethod
    def from_doc(cls, doc) -> Program:
        """The program a compile child printed (or a cache kept). Raises ProgError."""
        try:
            insns = bytes.fromhex(doc["insns"])
            maps = {name: MapSpec(**{k: _uint(doc["maps"][name][k], 32)
                                     for k in MapSpec.__dataclass_fields__}) for name in MAPS}
            btf_id = _uint(doc["attach_btf_id"], 32)
        except (KeyError, TypeError, ValueError) as e:
            raise ProgError(f"malformed program description ({type(e).__name__}: {e})") \
                from None
        if set(doc["maps"]) != set(MAPS):
            raise ProgError(f"the program's maps are {sorted(doc['maps'])}, not {list(MAPS)}")
        if not insns or len(insns) % kabi.BPF_INSN_SIZE or \
                len(insns) // kabi.BPF_INSN_SIZE > MAX_INSNS:
            raise ProgError(f"{len(insns)} bytes of instructions is not a program")
        if len({m.fd for m in maps.values()}) != len(maps) or not btf_id:
            raise ProgError("the program's map fds or attach target make no sense")
        patch_map_fds(insns, {m.fd: m.fd for m in maps.values()})   # every map fd is known
        return cls(insns, maps, btf_id)


def _uint(v, bits: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << bits:
        raise ValueError(f"{v!r} is not a u{bits}")
    return v


def patch_map_fds(insns: bytes, fds: dict[int, int]) -> bytes:
    """``insns`` with the map fd of every ld_imm64 BPF_PSEUDO_MAP_FD replaced as ``fds`` says;
    every other instruction as it was. Raises ProgError for a map fd not in ``fds`` or an
    ld_imm64 kind this loader does not patch (map values, BTF ids, ...)."""
    out = bytearray(insns)
    n, i = len(out) // kabi.BPF_INSN_SIZE, 0
    while i < n:
        code, regs, off, imm = kabi.BPF_INSN.unpack_from(out, i * kabi.BPF_INSN_SIZE)
        if code != kabi.BPF_LD_IMM64:
            i += 1
            continue
        if i + 1 >= n:
            raise ProgError(f"instruction {i}: an ld_imm64 without its second half")
        src = regs >> 4
        if src == kabi.BPF_PSEUDO_MAP_FD:
            if imm not in fds:
                raise ProgError(f"instruction {i} names map fd {imm}, not one of the "
                                "program's maps")
            kabi.BPF_INSN.pack_into(out, i * kabi.BPF_INSN_SIZE, code, regs, off, fds[imm])
        elif src:
            raise ProgError(f"instruction {i}: an ld_imm64 of kind {src}, which this loader "
                            "does not patch")
        i += 2
    return bytes(out)


# -- the cache ------------------------------------------------------------------------------
def source_sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cache_key(cflags: list[str], src_sha: str) -> list:
    """The kernel's build, its BTF's size, the source's hash and the cflags: a program is
    reused only on the kernel and source it was compiled for."""
    from .unix_embryo_btf import BTF_PATH
    uname = os.uname()
    return [uname.release, uname.version, os.stat(BTF_PATH).st_size, src_sha, list(cflags)]


def _digest(doc) -> str:
    """A checksum of a program document: a cache entry damaged in a way JSON still parses
    (an instruction changed) is not loaded."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def load_cached(cflags: list[str], src_sha: str) -> tuple[Program | None, str]:
    """The cached program for this key, or (None, why not)."""
    doc = runcache.load(CACHE_NAME)
    if not isinstance(doc, dict):
        return None, "no cached program"
    try:
        key = cache_key(cflags, src_sha)
    except OSError as e:
        return None, f"no kernel BTF: {e.strerror}"
    if doc.get("key") != key:
        return None, "the cached program is for another kernel, source or cflags"
    if doc.get("sha256") != _digest(doc.get("program")):
        return None, "the cached program is not trusted: its checksum does not match"
    try:
        return Program.from_doc(doc["program"]), "cached"
    except ProgError as e:
        return None, f"the cached program is not trusted: {e}"


def save(doc: dict) -> None:
    """Keep a compile child's document (never raises: a run cache is only a cache)."""
    try:
        key = cache_key(doc["cflags"], doc["src_sha"])
    except OSError:
        return
    runcache.save(CACHE_NAME, {"key": key, "program": doc, "sha256": _digest(doc)})


# -- compiling (in a child: bcc and LLVM stay out of the checkpointer) -----------------------
def compile_in_child(cflags: list[str] | None) -> dict:
    """Run ``--compile`` in a child process and return its document. Raises ProgError."""
    cmd = [sys.executable, "-m", "backend.unix_embryo_prog", "--compile"]
    if cflags is not None:
        cmd += ["--", *cflags]
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else "")}
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=COMPILE_TIMEOUT,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ProgError(f"compiling the embryo reader took more than {COMPILE_TIMEOUT} s") \
            from None
    except OSError as e:
        raise ProgError(f"cannot start the embryo reader's compiler: {e.strerror}") from None
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.decode(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error:" in ln][:1]
        why = "; ".join(errors + lines[-1:]) or f"exit status {r.returncode}"
        raise ProgError(f"compiling the embryo reader failed: {why}")
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        raise ProgError("the embryo reader's compiler printed no program") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cflags"), list) \
            or not isinstance(doc.get("src_sha"), str):
        raise ProgError("the embryo reader's compiler printed no program")
    return doc


def _compile(cflags: list[str] | None) -> dict:
    """The child's work: bcc compiles, nothing is loaded. Raises ProgError."""
    from . import bpf_tracker, unix_embryo
    from .unix_embryo_btf import Btf, BtfError
    try:
        btf = Btf.load()
        btf_id = btf.type_id(ATTACH_FUNC, kabi.BTF_KIND_FUNC)
        if cflags is None:
            cflags = unix_embryo.cflags(btf)
    except (BtfError, unix_embryo.EmbryoUnavailable) as e:
        raise ProgError(f"the kernel's BTF: {e}") from None
    del btf
    try:
        bcc = bpf_tracker._import_bcc()
    except bpf_tracker.TrackerUnavailable as e:
        raise ProgError(str(e)) from None
    src_sha = source_sha(unix_embryo.PROGRAM)
    try:
        bpf = bcc.BPF(src_file=unix_embryo.PROGRAM.encode(), cflags=cflags)
    except Exception as e:  # noqa: BLE001 - bcc raises plain Exception
        raise ProgError(f"{unix_embryo.PROGRAM} did not compile: {e}") from None
    try:
        insns = bpf.dump_func(FUNC.encode())
        maps = {}
        for name in MAPS:
            t = bpf[name.encode()]
            leaf = getattr(t, "sLeaf", t.Leaf)     # a per-cpu table's Leaf is one per CPU
            maps[name] = {"fd": t.map_fd, "type": t.ttype, "key_size": ctypes.sizeof(t.Key),
                          "value_size": ctypes.sizeof(leaf), "max_entries": t.max_entries,
                          "flags": t.flags}
    except Exception as e:  # noqa: BLE001
        raise ProgError(f"reading the compiled program: {e}") from None
    finally:
        bpf.cleanup()
    return {"insns": insns.hex(), "maps": maps, "attach_btf_id": btf_id, "cflags": cflags,
            "src_sha": src_sha}


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--compile" or (len(argv) > 1 and argv[1] != "--"):
        print("usage: python -m backend.unix_embryo_prog --compile [-- CFLAG ...]",
              file=sys.stderr)
        return 2
    try:
        doc = _compile(argv[2:] if len(argv) > 1 else None)
        Program.from_doc(doc)                          # what the parent will check
    except ProgError as e:
        print(f"unix_embryo_prog: {e}", file=sys.stderr)
        return 1
    json.dump(doc, sys.stdout)
    return 0


# -- loading with bpf(2) --------------------------------------------------------------------
def _bpf(cmd: int, attr, what: str) -> int:
    try:
        return kabi.syscall(kabi.SYS_bpf, cmd, ctypes.byref(attr), ctypes.sizeof(attr),
                            what=what)
    except OSError as e:
        raise ProgError(f"{what}: {os.strerror(e.errno)}") from None


class Loaded:
    """The program's maps, the program and its iterator link, created with bpf(2); ``close``
    (or leaving a ``with``) closes them all. Raises ProgError, having closed what it made."""

    def __init__(self, program: Program):
        self.fds: list[int] = []
        self.maps: dict[str, tuple[int, MapSpec]] = {}
        try:
            for name, spec in program.maps.items():
                attr = kabi.bpf_attr_map_create(
                    map_type=spec.type, key_size=spec.key_size, value_size=spec.value_size,
                    max_entries=spec.max_entries, map_flags=spec.flags,
                    map_name=name.encode()[:kabi.BPF_OBJ_NAME_LEN - 1])
                fd = self._keep(_bpf(kabi.BPF_MAP_CREATE, attr, f"creating map {name}"))
                self.maps[name] = (fd, spec)
            insns = patch_map_fds(program.insns,
                                  {spec.fd: fd for fd, spec in self.maps.values()})
            self.prog_fd = self._keep(self._load(insns, program.attach_btf_id))
            link = kabi.bpf_attr_link_create(prog_fd=self.prog_fd,
                                             attach_type=kabi.BPF_TRACE_ITER)
            self.link_fd = self._keep(_bpf(kabi.BPF_LINK_CREATE, link,
                                           "attaching the unix iterator"))
        except BaseException:
            self.close()
            raise

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    @staticmethod
    def _load(insns: bytes, btf_id: int) -> int:
        code = ctypes.create_string_buffer(insns, len(insns))
        license_ = ctypes.create_string_buffer(b"GPL")

        def attr(log=None):
            return kabi.bpf_attr_prog_load_btf(
                prog_type=kabi.BPF_PROG_TYPE_TRACING, insn_cnt=len(insns) // kabi.BPF_INSN_SIZE,
                insns=ctypes.addressof(code), license=ctypes.addressof(license_),
                log_level=kabi.BPF_LOG_LEVEL_1 if log else 0, log_size=len(log) if log else 0,
                log_buf=ctypes.addressof(log) if log else 0, prog_name=FUNC.encode()[:15],
                expected_attach_type=kabi.BPF_TRACE_ITER, attach_btf_id=btf_id)
        try:       # quietly first: a verbose verifier is slower; its log only on failure
            return kabi.syscall(kabi.SYS_bpf, kabi.BPF_PROG_LOAD, ctypes.byref(a := attr()),
                                ctypes.sizeof(a), what="loading the unix iterator")
        except OSError as e:
            first = e.errno
        log = ctypes.create_string_buffer(LOG_SIZE)
        try:
            fd = kabi.syscall(kabi.SYS_bpf, kabi.BPF_PROG_LOAD, ctypes.byref(a := attr(log)),
                              ctypes.sizeof(a), what="loading the unix iterator")
        except OSError:
            text = log.value.decode(errors="replace").strip().splitlines()
            tail = " | ".join(text[-6:]) or "no verifier log"
            raise ProgError(f"the kernel refused the unix iterator ({os.strerror(first)}); "
                            f"verifier: {tail}") from None
        return fd                  # loaded the second time: keep it

    def iterate(self) -> bytes:
        """One pass of the iterator: everything the program wrote."""
        fd = _bpf(kabi.BPF_ITER_CREATE, kabi.bpf_attr_iter_create(link_fd=self.link_fd),
                  "creating a unix iterator")
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        except OSError as e:        # (the program's seq writes overflowed a page: E2BIG...)
            raise ProgError(f"reading the unix iterator: {e.strerror}") from None
        finally:
            os.close(fd)

    def _elem(self, cmd: int, name: str, key: int, value: int | None, what: str) -> None:
        fd, spec = self.maps[name]
        k = ctypes.create_string_buffer(key.to_bytes(spec.key_size, "little"), spec.key_size)
        v = None if value is None else ctypes.create_string_buffer(
            value.to_bytes(spec.value_size, "little"), spec.value_size)
        attr = kabi.bpf_attr_map_elem(map_fd=fd, key=ctypes.addressof(k),
                                      value=ctypes.addressof(v) if v is not None else 0,
                                      flags=kabi.BPF_ANY)
        _bpf(cmd, attr, f"{what} map {name}")

    def update(self, name: str, key: int, value: int) -> None:
        self._elem(kabi.BPF_MAP_UPDATE_ELEM, name, key, value, "updating")

    def keys(self, name: str) -> list[int]:
        fd, spec = self.maps[name]
        key = ctypes.create_string_buffer(spec.key_size)
        nxt = ctypes.create_string_buffer(spec.key_size)
        out: list[int] = []
        attr = kabi.bpf_attr_map_elem(map_fd=fd, key=0, value=ctypes.addressof(nxt))
        while True:            # key 0 (NULL) first: the map's first key
            try:
                kabi.syscall(kabi.SYS_bpf, kabi.BPF_MAP_GET_NEXT_KEY, ctypes.byref(attr),
                             ctypes.sizeof(attr), what=f"listing map {name}")
            except OSError as e:
                if e.errno == errno.ENOENT:            # past the last key
                    return out
                raise ProgError(f"listing map {name}: {os.strerror(e.errno)}") from None
            out.append(int.from_bytes(nxt.raw, "little"))
            ctypes.memmove(key, nxt, spec.key_size)
            attr.key = ctypes.addressof(key)

    def clear(self, name: str) -> None:
        for key in self.keys(name):
            self._elem(kabi.BPF_MAP_DELETE_ELEM, name, key, None, "deleting from")

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())

    def __enter__(self) -> Loaded:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Field offsets of kernel structs, read from the running kernel's BTF (/sys/kernel/btf/vmlinux),
for bpf/unix_embryo.c: bcc compiles against Debian's 6.1 headers, whose struct layouts are not
this kernel's, so the program reads kernel memory at offsets given here (as -D macros) instead
of through the headers' structs.

    field_offset(btf, "sock", "sk_receive_queue") -> byte offset (anonymous members searched)
    Btf.load(path) -> Btf                            parses the type section once (~0.2 s)
    btf.type_id("bpf_iter_unix", BTF_KIND_FUNC) -> the id a tracing program attaches to
"""
from __future__ import annotations

import struct

from . import kabi

BTF_PATH = "/sys/kernel/btf/vmlinux"


class BtfError(Exception):
    """The BTF is missing, malformed, or lacks a struct or field asked for."""


class Btf:
    """The named structs and unions of one BTF blob, and their members."""

    def __init__(self, data: bytes):
        if len(data) < kabi.BTF_HEADER.size:
            raise BtfError("BTF too short")
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            kabi.BTF_HEADER.unpack_from(data)
        if magic != kabi.BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x}")
        self._strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        self._data = data
        # type id -> (kind, name_off, size_or_type, vlen, kind_flag, offset of its trailer)
        self._types: list[tuple[int, int, int, int, int, int] | None] = [None]
        self._by_name: dict[str, list[int]] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.Struct("<III").unpack_from
        trailer = kabi.BTF_TRAILER
        while pos < end:
            name_off, info, size = unpack(data, pos)
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            pos += 12
            self._types.append((kind, name_off, size, vlen, kflag, pos))
            if kind in (kabi.BTF_KIND_STRUCT, kabi.BTF_KIND_UNION) and name_off:
                self._by_name.setdefault(self._name(name_off), []).append(len(self._types) - 1)
            fixed, per_member = trailer.get(kind, (0, 0))
            pos += fixed + per_member * vlen

    @classmethod
    def load(cls, path: str = BTF_PATH) -> Btf:
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as e:
            raise BtfError(f"cannot read {path}: {e.strerror}") from None

    def _name(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _members(self, type_id: int):
        kind, _, _, vlen, kflag, pos = self._types[type_id]
        for i in range(vlen):
            name_off, mtype, moff = struct.unpack_from("<III", self._data, pos + 12 * i)
            bits = moff & 0xFFFFFF if kflag else moff
            yield (self._name(name_off) if name_off else ""), mtype, bits

    def _strip(self, type_id: int) -> int:
        """Through typedefs and qualifiers to the type itself."""
        while True:
            kind, _, ref, *_ = self._types[type_id]
            if kind not in kabi.BTF_KIND_MODIFIERS:
                return type_id
            type_id = ref

    def _find(self, type_id: int, field: str) -> int | None:
        """Bit offset of ``field`` in struct/union ``type_id`` (anonymous members searched)."""
        for name, mtype, bits in self._members(type_id):
            if name == field:
                return bits
            if not name:
                inner = self._strip(mtype)
                if self._types[inner][0] in (kabi.BTF_KIND_STRUCT, kabi.BTF_KIND_UNION):
                    found = self._find(inner, field)
                    if found is not None:
                        return bits + found
        return None

    def field_offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``path`` ("a" or "a.b": a member of a member) in ``struct_name``."""
        ids = [i for i in self._by_name.get(struct_name, ())
               if self._types[i][0] == kabi.BTF_KIND_STRUCT and self._types[i][3]]
        if not ids:
            raise BtfError(f"struct {struct_name} is not in the kernel's BTF")
        type_id, total = ids[0], 0
        for part in path.split("."):
            bits = self._find(type_id, part)
            if bits is None or bits % 8:
                raise BtfError(f"struct {struct_name} has no byte-aligned field {path}")
            total += bits // 8
            for name, mtype, _ in self._members_deep(type_id, part):
                type_id = self._strip(mtype)
        return total

    def _members_deep(self, type_id: int, field: str):
        """The member named ``field`` (looked for in anonymous members too), as _members."""
        for name, mtype, bits in self._members(type_id):
            if name == field:
                yield name, mtype, bits
                return
            if not name:
                inner = self._strip(mtype)
                if self._types[inner][0] in (kabi.BTF_KIND_STRUCT, kabi.BTF_KIND_UNION):
                    found = list(self._members_deep(inner, field))
                    if found:
                        yield from found
                        return

    def type_id(self, name: str, kind: int) -> int:
        """The id of the first type of this kind and name (e.g. the FUNC an iterator program
        names as its attach_btf_id)."""
        for type_id in range(1, len(self._types)):
            t_kind, name_off, *_ = self._types[type_id]
            if t_kind == kind and name_off and self._name(name_off) == name:
                return type_id
        raise BtfError(f"no BTF type {name} of kind {kind} in the kernel's BTF")

    def struct_size(self, struct_name: str) -> int:
        for i in self._by_name.get(struct_name, ()):
            kind, _, size, vlen, _, _ = self._types[i]
            if kind == kabi.BTF_KIND_STRUCT and vlen:
                return size
        raise BtfError(f"struct {struct_name} is not in the kernel's BTF")

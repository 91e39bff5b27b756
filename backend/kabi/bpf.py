"""bpf(2) and BTF: the commands, map and program types and union bpf_attr layouts the
features.py probe and the unix embryo reader (unix_embryo_prog.py) use, and the BTF format
unix_embryo_btf.py parses. The syscall number SYS_bpf is in syscalls.py."""

from __future__ import annotations

import ctypes
import struct as _struct

from .syscalls import c_u32, c_u64

# --------------------------------------------------------------------------------------------
# backend/features.py: the bpf(2) probe (include/uapi/linux/bpf.h)
# --------------------------------------------------------------------------------------------
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SOCKET_FILTER = 1


class bpf_attr_prog_load(ctypes.Structure):
    """The head of union bpf_attr as BPF_PROG_LOAD reads it (the kernel zero-fills the rest)."""
    _fields_ = [("prog_type", c_u32), ("insn_cnt", c_u32), ("insns", c_u64), ("license", c_u64),
                ("log_level", c_u32), ("log_size", c_u32), ("log_buf", c_u64),
                ("kern_version", c_u32), ("prog_flags", c_u32)]


# "r0 = 0; exit": BPF_ALU64|BPF_MOV|BPF_K (0xb7) dst r0 imm 0, then BPF_JMP|BPF_EXIT (0x95)
BPF_PROG_RETURN_ZERO = bytes.fromhex("b700000000000000" "9500000000000000")
BPF_INSN_SIZE = 8

# --------------------------------------------------------------------------------------------
# BTF (include/uapi/linux/btf.h), read by backend/unix_embryo_btf.py for struct offsets
# --------------------------------------------------------------------------------------------
BTF_MAGIC = 0xEB9F
BTF_HEADER = _struct.Struct("<HBBIIIII")   # magic, version, flags, hdr_len, type/str off+len
BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_ARRAY, BTF_KIND_STRUCT, BTF_KIND_UNION = 1, 2, 3, 4, 5
BTF_KIND_ENUM, BTF_KIND_FWD, BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST = 6, 7, 8, 9, 10
BTF_KIND_RESTRICT, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO, BTF_KIND_VAR = 11, 12, 13, 14
BTF_KIND_DATASEC, BTF_KIND_FLOAT, BTF_KIND_DECL_TAG, BTF_KIND_TYPE_TAG = 15, 16, 17, 18
BTF_KIND_ENUM64 = 19
BTF_KIND_MODIFIERS = frozenset({BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST,
                                BTF_KIND_RESTRICT, BTF_KIND_TYPE_TAG})
# bytes after struct btf_type (12 bytes): (fixed, per vlen entry)
BTF_TRAILER = {BTF_KIND_INT: (4, 0), BTF_KIND_ARRAY: (12, 0), BTF_KIND_STRUCT: (0, 12),
               BTF_KIND_UNION: (0, 12), BTF_KIND_ENUM: (0, 8), BTF_KIND_FUNC_PROTO: (0, 8),
               BTF_KIND_VAR: (4, 0), BTF_KIND_DATASEC: (0, 12), BTF_KIND_DECL_TAG: (4, 0),
               BTF_KIND_ENUM64: (0, 12)}

# --------------------------------------------------------------------------------------------
# backend/unix_embryo_prog.py: loading a cached BPF iterator with raw bpf(2), without bcc
# (include/uapi/linux/bpf.h; BPF_PROG_LOAD is in the features.py section above)
# --------------------------------------------------------------------------------------------
BPF_MAP_CREATE = 0
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_LINK_CREATE = 28
BPF_ITER_CREATE = 33
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_ITER = 28                  # enum bpf_attach_type
BPF_ANY = 0                          # map update flags
BPF_OBJ_NAME_LEN = 16
BPF_LOG_LEVEL_1 = 1
BPF_INSN = _struct.Struct("<BBhi")   # struct bpf_insn: code, dst_reg:4|src_reg:4, off, imm
BPF_LD_IMM64 = 0x18                  # BPF_LD|BPF_IMM|BPF_DW: two instruction slots
BPF_PSEUDO_MAP_FD = 1                # ld_imm64 src_reg: imm is a map fd


class bpf_attr_map_create(ctypes.Structure):
    _fields_ = [("map_type", c_u32), ("key_size", c_u32), ("value_size", c_u32),
                ("max_entries", c_u32), ("map_flags", c_u32), ("inner_map_fd", c_u32),
                ("numa_node", c_u32), ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN)]


class bpf_attr_map_elem(ctypes.Structure):
    """BPF_MAP_*_ELEM and BPF_MAP_GET_NEXT_KEY (``value`` is ``next_key`` for the latter)."""
    _fields_ = [("map_fd", c_u32), ("pad", c_u32), ("key", c_u64), ("value", c_u64),
                ("flags", c_u64)]


class bpf_attr_prog_load_btf(ctypes.Structure):
    """BPF_PROG_LOAD up to the attach target fields (tracing programs need them)."""
    _fields_ = [("prog_type", c_u32), ("insn_cnt", c_u32), ("insns", c_u64), ("license", c_u64),
                ("log_level", c_u32), ("log_size", c_u32), ("log_buf", c_u64),
                ("kern_version", c_u32), ("prog_flags", c_u32),
                ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN), ("prog_ifindex", c_u32),
                ("expected_attach_type", c_u32), ("prog_btf_fd", c_u32),
                ("func_info_rec_size", c_u32), ("func_info", c_u64), ("func_info_cnt", c_u32),
                ("line_info_rec_size", c_u32), ("line_info", c_u64), ("line_info_cnt", c_u32),
                ("attach_btf_id", c_u32), ("attach_prog_fd", c_u32), ("core_relo_cnt", c_u32)]


class bpf_attr_link_create(ctypes.Structure):
    _fields_ = [("prog_fd", c_u32), ("target_fd", c_u32), ("attach_type", c_u32),
                ("flags", c_u32), ("iter_info", c_u64), ("iter_info_len", c_u32),
                ("pad", c_u32)]


class bpf_attr_iter_create(ctypes.Structure):
    _fields_ = [("link_fd", c_u32), ("flags", c_u32)]


assert ctypes.sizeof(bpf_attr_map_create) == 44 and bpf_attr_map_create.map_name.offset == 28
assert ctypes.sizeof(bpf_attr_map_elem) == 32
assert ctypes.sizeof(bpf_attr_prog_load_btf) == 120
assert bpf_attr_prog_load_btf.attach_btf_id.offset == 108
assert bpf_attr_prog_load_btf.expected_attach_type.offset == 68
assert ctypes.sizeof(bpf_attr_link_create) == 32 and bpf_attr_link_create.iter_info.offset == 16
assert ctypes.sizeof(bpf_attr_iter_create) == 8 and BPF_INSN.size == 8

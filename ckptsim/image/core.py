"""The framing records every image has: header, container, objref, page chunks, tail, error."""
from __future__ import annotations

from .schema import ENUMS, layout
from .types import ObjType

ARCH_X86_64 = 2
ENUMS["arch"] = {1: "x86_32", 2: "x86_64", 3: "s390x", 4: "ppc32", 5: "ppc64", 100: "model"}
ENUMS["objtype"] = {t.value: t.name for t in ObjType}

# Checkpoint flags (the header's uflags) and restart flags, as Linux-CR numbers them.
CHECKPOINT_SUBTREE = 0x1
CHECKPOINT_NETNS = 0x2
CHECKPOINT_USER_FLAGS = CHECKPOINT_SUBTREE | CHECKPOINT_NETNS
# Ours: an image holding only what changed since a parent image (cr/incremental.py). The
# model's checkpoint() takes it; it stays out of CHECKPOINT_USER_FLAGS: the live checkpoint
# refuses it as a flag and sets it itself when it is given a parent (backend/incremental.py).
CHECKPOINT_INCREMENTAL = 0x4
RESTART_TASKSELF = 0x1
RESTART_FROZEN = 0x2
RESTART_GHOST = 0x4
RESTART_KEEP_LSM = 0x8
RESTART_CONN_RESET = 0x10
RESTART_USER_FLAGS = 0x1F
ENUMS["ckpt_flags"] = {CHECKPOINT_SUBTREE: "SUBTREE", CHECKPOINT_NETNS: "NETNS",
                       CHECKPOINT_INCREMENTAL: "INCREMENTAL"}

# Image flags (the header's image_flags): what kind of image this is.
IMAGE_MODEL = 0x1        # written by the model (holds the model's file system snapshot)
IMAGE_LIVE = 0x2         # written by the live backend
IMAGE_INCREMENTAL = 0x4  # holds only changes against parent_id (issue 6)
ENUMS["image_flags"] = {IMAGE_MODEL: "MODEL", IMAGE_LIVE: "LIVE", IMAGE_INCREMENTAL: "INCREMENTAL"}

HEADER = layout(1, "HEADER", [
    ("magic", "u64", "hex"),
    ("version", "u32"),
    ("arch", "u32", "enum:arch"),
    ("major", "u32"), ("minor", "u32"), ("patch", "u32"),
    ("page_size", "u32"),
    ("uflags", "u64", "flags:ckpt_flags"),
    ("image_flags", "u64", "flags:image_flags"),
    ("time", "i64", "time"),
    ("crid", "u64"),
    ("image_id", "bytes16", "hex"),
    ("parent_id", "bytes16", "hex"),
], subsystem="core")
HEADER_ARCH = layout(2, "HEADER_ARCH", [
    ("has_fxsr", "u32"), ("has_xsave", "u32"), ("xstate_size", "u32"), ("pad", "u32"),
], subsystem="core")
CONTAINER = layout(3, "CONTAINER", [("flags", "u32", "hex"), ("pad", "u32")], subsystem="core")
BUFFER = layout(4, "BUFFER", [], var="bytes", max_var=1 << 31, subsystem="core")
STRING = layout(5, "STRING", [], var="str", max_var=1 << 16, subsystem="core")
OBJREF = layout(6, "OBJREF", [("objtype", "u32", "enum:objtype"), ("objref", "i32")],
                subsystem="core")
LSM_INFO = layout(7, "LSM_INFO", [], var="str", max_var=200, subsystem="core")
# An incremental image's link to its parent (the image HEADER.parent_id names), right after
# HEADER_ARCH: what the parent found by that id must be (cr/incremental.py, ImageLink).
PARENT = layout(801, "PARENT", [
    ("parent_crid", "u64"), ("parent_checksum", "u32", "hex"), ("pad", "u32"),
    ("parent_tree", "bytes16", "hex"),
], subsystem="incremental")
# A page chunk: PGARR{nr_pages} then one BUFFER of nr_pages addresses and nr_pages pages.
PGARR = layout(403, "PGARR", [("nr_pages", "u64")], subsystem="mm")
TAIL = layout(9001, "TAIL", [
    ("magic", "u64", "hex"), ("nr_records", "u64"), ("checksum", "u32", "hex"), ("pad", "u32"),
], subsystem="tail")
ERROR = layout(9999, "ERROR", [], subsystem="error")

MAX_PAGES_PER_CHUNK = 1024
TAIL_SIZE = 8 + TAIL.fixed_size

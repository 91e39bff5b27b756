"""Numbers of the image format: magics, object types, record-type ranges.

Record type ids are declared next to their layouts (in ``ckptsim/kinds/*`` for resource kinds,
in ``ckptsim/image/core.py`` for the framing records); each subsystem owns one range below and
the layout registry refuses a duplicate or an id outside the owner's range.
"""
from __future__ import annotations

import enum

MAGIC_HEAD = 0x00FEED0CC0A2D200
MAGIC_TAIL = 0x002D2A0CC0DEEF00
FORMAT_VERSION = 1
PAGE_SIZE = 4096
PAGE_SHIFT = 12

# One range of record type ids per subsystem, as Linux-CR's checkpoint_hdr.h has them.
RANGES = {
    "core": range(1, 100),         # header, container, buffer, string, objref, tail, error
    "task": range(101, 200),       # tree, task, thread, cpu, creds, namespaces
    "arch": range(201, 300),       # arch-specific cpu state
    "file": range(301, 350),       # file table, descriptors, files, inode contents
    "pipe": range(350, 400),       # pipes and FIFOs
    "mm": range(401, 450),         # mm, vma, page chunks, shared memory
    "fs": range(451, 500),         # cwd/root/umask
    "ipc": range(501, 600),
    "signal": range(601, 700),
    "socket": range(701, 800),     # unix now; inet and others later
    "incremental": range(801, 900),  # parent image links, changed-record maps (issue 6)
    "tail": range(9001, 9002),
    "error": range(9999, 10000),
}


class ObjType(enum.IntEnum):
    """Types of shared objects named by OBJREF records (Linux-CR's CKPT_OBJ_* plus ours)."""

    IGNORE = 0
    INODE = 1
    FILE_TABLE = 2
    FILE = 3
    MM = 4
    FS = 5
    SIGHAND = 6
    SIGNAL = 7
    NS = 8
    UTS_NS = 9
    IPC_NS = 10
    MNT_NS = 11
    USER_NS = 12
    CRED = 13
    USER = 14
    GROUPINFO = 15
    SOCK = 16
    TTY = 17
    SECURITY_PTR = 18
    SECURITY = 19
    NET_NS = 20
    NETDEV = 21
    PIPE = 22
    SHMEM = 23
    PID_NS = 24

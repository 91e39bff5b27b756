"""Files and sockets: fcntl and open flags, splice flags, sendmsg/recvmsg (struct msghdr,
SCM_RIGHTS cmsgs), and AF_UNIX sockets through NETLINK_SOCK_DIAG."""

from __future__ import annotations

import ctypes

from .syscalls import c_u8, c_u16, c_u32, c_u64

# --------------------------------------------------------------------------------------------
# fcntl, open and splice flags (include/uapi/asm-generic/fcntl.h, linux/fcntl.h, linux/splice.h)
# --------------------------------------------------------------------------------------------
O_CLOEXEC = 0o2000000
F_GETFL, F_SETFL, F_SETFD, F_SETPIPE_SZ = 3, 4, 2, 1031
FD_CLOEXEC = 1
SPLICE_F_NONBLOCK = 0x02     # tee(2) of a pipe's buffer without consuming it (snapshot.py)

# --------------------------------------------------------------------------------------------
# sendmsg/recvmsg with SCM_RIGHTS (include/linux/socket.h; x86_64 layouts)
# --------------------------------------------------------------------------------------------
SOL_SOCKET = 1
SCM_RIGHTS = 1


class msghdr(ctypes.Structure):
    _fields_ = [("msg_name", c_u64), ("msg_namelen", c_u32), ("pad0", c_u32),
                ("msg_iov", c_u64), ("msg_iovlen", c_u64), ("msg_control", c_u64),
                ("msg_controllen", c_u64), ("msg_flags", c_u32), ("pad1", c_u32)]


assert ctypes.sizeof(msghdr) == 56
CMSG_HDR_SIZE = 16           # struct cmsghdr: cmsg_len (size_t), cmsg_level, cmsg_type (int)

# --------------------------------------------------------------------------------------------
# backend/sockets.py: AF_UNIX sockets through NETLINK_SOCK_DIAG (include/uapi/linux/netlink.h,
# sock_diag.h, unix_diag.h), SO_PEEK_OFF, the unix socket states (include/net/tcp_states.h)
# --------------------------------------------------------------------------------------------
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300          # NLM_F_ROOT | NLM_F_MATCH
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_ALIGNTO = 4
NLA_ALIGNTO = 4


class nlmsghdr(ctypes.Structure):
    _fields_ = [("nlmsg_len", c_u32), ("nlmsg_type", c_u16), ("nlmsg_flags", c_u16),
                ("nlmsg_seq", c_u32), ("nlmsg_pid", c_u32)]


class nlattr(ctypes.Structure):
    _fields_ = [("nla_len", c_u16), ("nla_type", c_u16)]


class unix_diag_req(ctypes.Structure):
    _fields_ = [("sdiag_family", c_u8), ("sdiag_protocol", c_u8), ("pad", c_u16),
                ("udiag_states", c_u32), ("udiag_ino", c_u32), ("udiag_show", c_u32),
                ("udiag_cookie", c_u32 * 2)]


class unix_diag_msg(ctypes.Structure):
    _fields_ = [("udiag_family", c_u8), ("udiag_type", c_u8), ("udiag_state", c_u8),
                ("pad", c_u8), ("udiag_ino", c_u32), ("udiag_cookie", c_u32 * 2)]


class unix_diag_vfs(ctypes.Structure):
    _fields_ = [("udiag_vfs_ino", c_u32), ("udiag_vfs_dev", c_u32)]   # dev: kernel MKDEV(ma, mi)


class unix_diag_rqlen(ctypes.Structure):
    _fields_ = [("udiag_rqueue", c_u32), ("udiag_wqueue", c_u32)]


assert ctypes.sizeof(nlmsghdr) == 16 and ctypes.sizeof(unix_diag_req) == 24
assert ctypes.sizeof(unix_diag_msg) == 16

UDIAG_SHOW_NAME = 0x01
UDIAG_SHOW_VFS = 0x02
UDIAG_SHOW_PEER = 0x04
UDIAG_SHOW_ICONS = 0x08
UDIAG_SHOW_RQLEN = 0x10
UDIAG_SHOW_MEMINFO = 0x20
UDIAG_SHOW_UID = 0x40

UNIX_DIAG_NAME = 0
UNIX_DIAG_VFS = 1
UNIX_DIAG_PEER = 2
UNIX_DIAG_ICONS = 3
UNIX_DIAG_RQLEN = 4
UNIX_DIAG_MEMINFO = 5
UNIX_DIAG_SHUTDOWN = 6
UNIX_DIAG_UID = 7

SK_MEMINFO_RMEM_ALLOC = 0
SK_MEMINFO_RCVBUF = 1
SK_MEMINFO_WMEM_ALLOC = 2
SK_MEMINFO_SNDBUF = 3

TCP_ESTABLISHED = 1
TCP_CLOSE = 7
TCP_LISTEN = 10

SO_PEEK_OFF = 42
KDEV_MINORBITS = 20          # the kernel's dev_t (s_dev, udiag_vfs_dev): major << 20 | minor

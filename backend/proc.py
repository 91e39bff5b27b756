"""Typed readers of ``/proc`` for one process or thread.

Every reader takes a pid (a tid works too: ``/proc/TID`` is a valid, if hidden, entry) and
returns frozen dataclasses, never dicts of strings. A process that vanishes while it is being
read raises :class:`ProcessGone`; an fd or a thread that vanishes while the process lives on is
simply left out (it no longer exists, so there is nothing to report).

Readers:
    read_stat(pid) -> Stat                  /proc/PID/stat (comm may hold spaces and parentheses)
    read_status(pid) -> Status              /proc/PID/status
    read_maps(pid) -> list[Mapping]         /proc/PID/maps
    read_smaps(pid) -> list[SmapsEntry]     /proc/PID/smaps
    read_smaps_flags(pid)                   the same with only the maps lines and VmFlags parsed
    list_threads(pid) -> list[int]          /proc/PID/task
    children(pid) -> list[int]              /proc/PID/task/*/children, sorted
    subtree(pid) -> list[int]               pid and every descendant, depth-first, sorted children
    read_fds(pid) -> list[FdInfo]           /proc/PID/fd + /proc/PID/fdinfo
    read_limits(pid) -> list[Limit]         /proc/PID/limits
    read_exe / read_cwd / read_root(pid) -> str | None
    read_comm(pid) -> str

(maps/smaps live in backend/proc_maps.py, fds in backend/proc_fds.py and the low-level access
in backend/proc_base.py; every name stays importable from here.)
"""
from __future__ import annotations

import errno
import re
import resource
from dataclasses import dataclass

from backend.proc_base import (  # noqa: F401 - re-exported
    _DELETED, PROC, ProcessGone, _gone_or_raise, _listdir, _path, _read_bytes, _read_text,
    _readlink, _unescape_octal, process_exists,
)
from backend.proc_fds import (  # noqa: F401 - re-exported
    _BRACKET_INO, FdInfo, FdKind, _classify, _parse_fdinfo, _read_one_fd, read_fd, read_fds,
)
from backend.proc_maps import (  # noqa: F401 - re-exported
    _MAPS_LINE, _SMAPS_KB, SPECIAL_MAPPINGS, Mapping, SmapsEntry, parse_maps, parse_maps_line,
    parse_smaps, parse_smaps_flags, read_maps, read_smaps, read_smaps_flags,
    read_smaps_flags_ahead,
)

__all__ = [
    "ProcessGone", "Stat", "Status", "Mapping", "SmapsEntry", "FdKind", "FdInfo", "Limit",
    "read_stat", "read_status", "read_maps", "read_smaps", "read_smaps_flags",
    "read_smaps_flags_ahead", "list_threads", "children",
    "subtree", "read_fds", "read_limits", "read_exe", "read_cwd", "read_root", "read_comm",
    "sigset_to_signals", "process_exists",
]


def _unescape_status_name(s: str) -> str:
    """Undo the escaping of ``Name:`` in /proc/PID/status (``\\n``, ``\\t``, ``\\\\``, octal)."""
    if "\\" not in s:
        return s
    out = []
    i = 0
    simple = {"n": "\n", "t": "\t", "\\": "\\", "r": "\r", "f": "\f", "v": "\v", "e": "\x1b"}
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            nxt = s[i + 1]
            if nxt in simple:
                out.append(simple[nxt])
                i += 2
                continue
            if re.match(r"[0-7]{3}", s[i + 1:i + 4]):
                out.append(chr(int(s[i + 1:i + 4], 8)))
                i += 4
                continue
        out.append(c)
        i += 1
    return "".join(out)


def sigset_to_signals(mask: int) -> frozenset[int]:
    """The signal numbers in a kernel sigset as /proc prints it (bit n-1 is signal n)."""
    sigs = []
    n = 1
    while mask:
        if mask & 1:
            sigs.append(n)
        mask >>= 1
        n += 1
    return frozenset(sigs)


# --- /proc/PID/stat -----------------------------------------------------------------------

@dataclass(frozen=True)
class Stat:
    """``/proc/PID/stat`` (proc(5) field names; times in clock ticks, sizes as the kernel
    prints them: vsize in bytes, rss in pages). Fields the kernel masks for an unprivileged
    reader read as 0."""
    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    tty_nr: int
    tpgid: int
    flags: int
    minflt: int
    cminflt: int
    majflt: int
    cmajflt: int
    utime: int
    stime: int
    cutime: int
    cstime: int
    priority: int
    nice: int
    num_threads: int
    itrealvalue: int
    start_time: int
    vsize: int
    rss: int
    rsslim: int
    startcode: int
    endcode: int
    startstack: int
    kstkesp: int
    kstkeip: int
    signal: int
    blocked: int
    sigignore: int
    sigcatch: int
    wchan: int
    nswap: int
    cnswap: int
    exit_signal: int
    processor: int
    rt_priority: int
    policy: int
    delayacct_blkio_ticks: int
    guest_time: int
    cguest_time: int
    start_data: int
    end_data: int
    start_brk: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    exit_code: int

    @property
    def tty(self) -> int:
        """The controlling terminal's device number (0: none)."""
        return self.tty_nr


_STAT_INT_FIELDS = [f for f in Stat.__dataclass_fields__ if f not in ("pid", "comm", "state")]


def parse_stat(text: str) -> Stat:
    """Parse the text of /proc/PID/stat. ``comm`` is everything between the first ``(`` and
    the last ``)``: a comm may itself hold spaces and parentheses."""
    text = text.rstrip("\n")
    lp = text.find("(")
    rp = text.rfind(")")
    if lp < 0 or rp < lp:
        raise ValueError(f"malformed /proc stat line: {text[:80]!r}")
    pid = int(text[:lp].strip())
    comm = text[lp + 1:rp]
    rest = text[rp + 1:].split()
    if not rest:
        raise ValueError(f"malformed /proc stat line: {text[:80]!r}")
    state = rest[0]
    nums = [int(x) for x in rest[1:]]
    # older kernels print fewer trailing fields: pad with zeros
    nums += [0] * (len(_STAT_INT_FIELDS) - len(nums))
    return Stat(pid, comm, state, *nums[:len(_STAT_INT_FIELDS)])


def read_stat(pid: int) -> Stat:
    text = _read_text(pid, "stat")
    if not text:
        raise ProcessGone(pid, "stat")
    return parse_stat(text)


# --- /proc/PID/status ---------------------------------------------------------------------

@dataclass(frozen=True)
class Status:
    """``/proc/PID/status``. Signal sets and capability sets are ints (bit n-1 = signal n; use
    :func:`sigset_to_signals`); uid/gid are (real, effective, saved, filesystem)."""
    name: str
    state: str                      # the letter, e.g. "S"
    state_name: str                 # e.g. "sleeping"
    tgid: int
    pid: int
    ppid: int
    tracer_pid: int
    uid: tuple[int, int, int, int]
    gid: tuple[int, int, int, int]
    groups: tuple[int, ...]
    nstgid: tuple[int, ...]
    nspid: tuple[int, ...]
    nspgid: tuple[int, ...]
    nssid: tuple[int, ...]
    sigq: tuple[int, int]           # (queued, limit)
    sigpnd: int
    shdpnd: int
    sigblk: int
    sigign: int
    sigcgt: int
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int
    no_new_privs: bool
    seccomp: int
    threads: int
    umask: int | None = None


def _ints(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split())


def parse_status(text: str) -> Status:
    kv: dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            kv[k] = v.strip()
    try:
        st = kv["State"].split(None, 1)
        sigq = kv.get("SigQ", "0/0").split("/")

        def four(key: str) -> tuple[int, int, int, int]:
            t = _ints(kv[key])
            if len(t) != 4:
                raise ValueError(f"{key}: expected 4 ids, got {kv[key]!r}")
            return t  # type: ignore[return-value]

        def hx(key: str) -> int:
            return int(kv.get(key, "0"), 16)

        return Status(
            name=_unescape_status_name(kv["Name"]),
            state=st[0],
            state_name=st[1].strip("()") if len(st) > 1 else "",
            tgid=int(kv["Tgid"]),
            pid=int(kv["Pid"]),
            ppid=int(kv["PPid"]),
            tracer_pid=int(kv.get("TracerPid", "0")),
            uid=four("Uid"),
            gid=four("Gid"),
            groups=_ints(kv.get("Groups", "")),
            nstgid=_ints(kv.get("NStgid", kv["Tgid"])),
            nspid=_ints(kv.get("NSpid", kv["Pid"])),
            nspgid=_ints(kv.get("NSpgid", "")),
            nssid=_ints(kv.get("NSsid", "")),
            sigq=(int(sigq[0]), int(sigq[1])),
            sigpnd=hx("SigPnd"), shdpnd=hx("ShdPnd"), sigblk=hx("SigBlk"),
            sigign=hx("SigIgn"), sigcgt=hx("SigCgt"),
            cap_inh=hx("CapInh"), cap_prm=hx("CapPrm"), cap_eff=hx("CapEff"),
            cap_bnd=hx("CapBnd"), cap_amb=hx("CapAmb"),
            no_new_privs=kv.get("NoNewPrivs", "0") != "0",
            seccomp=int(kv.get("Seccomp", "0")),
            threads=int(kv.get("Threads", "1")),
            umask=int(kv["Umask"], 8) if "Umask" in kv else None,
        )
    except KeyError as e:
        raise ValueError(f"/proc status lacks {e.args[0]}") from None


def read_status(pid: int) -> Status:
    text = _read_text(pid, "status")
    if not text:
        raise ProcessGone(pid, "status")
    return parse_status(text)


def read_comm(pid: int) -> str:
    text = _read_text(pid, "comm")
    if not text:
        raise ProcessGone(pid, "comm")
    return text[:-1] if text.endswith("\n") else text


# --- threads and children -----------------------------------------------------------------

def list_threads(pid: int) -> list[int]:
    """The tids of ``pid``'s thread group, sorted (the leader first as it has the lowest tid
    unless tids wrapped; sorting is numeric)."""
    return sorted(int(t) for t in _listdir(pid, "task") if t.isdigit())


def children(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (from /proc/PID/task/*/children), sorted."""
    kids: set[int] = set()
    for tid in list_threads(pid):
        try:
            with open(_path(pid, f"task/{tid}/children"), "rb") as f:
                data = f.read()
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ESRCH):
                if not process_exists(pid):
                    raise ProcessGone(pid, "children") from None
                continue            # that thread exited meanwhile
            raise
        kids.update(int(x) for x in data.split())
    return sorted(kids)


def subtree(pid: int) -> list[int]:
    """``pid`` and all its descendants, depth-first (pre-order), each task's children in
    ascending pid order. ProcessGone if ``pid`` itself is gone; a descendant that vanishes
    during the walk is left out."""
    order: list[int] = []
    seen: set[int] = set()
    stack = [pid]
    root = True
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        try:
            kids = children(p)
        except ProcessGone:
            if root:
                raise
            continue
        root = False
        seen.add(p)
        order.append(p)
        stack.extend(reversed(kids))
    return order


# --- limits and links ---------------------------------------------------------------------

_LIMIT_NAMES = {
    "Max cpu time": resource.RLIMIT_CPU,
    "Max file size": resource.RLIMIT_FSIZE,
    "Max data size": resource.RLIMIT_DATA,
    "Max stack size": resource.RLIMIT_STACK,
    "Max core file size": resource.RLIMIT_CORE,
    "Max resident set": resource.RLIMIT_RSS,
    "Max processes": resource.RLIMIT_NPROC,
    "Max open files": resource.RLIMIT_NOFILE,
    "Max locked memory": resource.RLIMIT_MEMLOCK,
    "Max address space": resource.RLIMIT_AS,
    "Max file locks": getattr(resource, "RLIMIT_LOCKS", 10),
    "Max pending signals": getattr(resource, "RLIMIT_SIGPENDING", 11),
    "Max msgqueue size": getattr(resource, "RLIMIT_MSGQUEUE", 12),
    "Max nice priority": getattr(resource, "RLIMIT_NICE", 13),
    "Max realtime priority": getattr(resource, "RLIMIT_RTPRIO", 14),
    "Max realtime timeout": getattr(resource, "RLIMIT_RTTIME", 15),
}


@dataclass(frozen=True)
class Limit:
    """One rlimit. ``soft``/``hard`` use resource.RLIM_INFINITY for "unlimited", so they
    compare directly with resource.getrlimit / prlimit."""
    resource: int
    name: str
    soft: int
    hard: int
    units: str


def parse_limits(text: str) -> list[Limit]:
    out = []
    for line in text.splitlines()[1:]:
        if not line.strip():
            continue
        name = line[:25].strip()
        if name not in _LIMIT_NAMES:
            raise ValueError(f"unknown /proc limits line: {line!r}")
        parts = line[25:].split()
        if len(parts) < 2:
            raise ValueError(f"malformed /proc limits line: {line!r}")

        def val(s: str) -> int:
            return resource.RLIM_INFINITY if s == "unlimited" else int(s)

        out.append(Limit(_LIMIT_NAMES[name], name, val(parts[0]), val(parts[1]),
                         parts[2] if len(parts) > 2 else ""))
    return sorted(out, key=lambda lim: lim.resource)


def read_limits(pid: int) -> list[Limit]:
    """Every rlimit of ``pid``, ordered by RLIMIT_* number."""
    text = _read_text(pid, "limits")
    if not text:
        raise ProcessGone(pid, "limits")
    return parse_limits(text)


def read_exe(pid: int) -> str | None:
    """The exe link (with " (deleted)" if the binary was unlinked); None for a zombie or a
    kernel thread."""
    return _readlink(pid, "exe")


def read_cwd(pid: int) -> str | None:
    return _readlink(pid, "cwd")


def read_root(pid: int) -> str | None:
    return _readlink(pid, "root")

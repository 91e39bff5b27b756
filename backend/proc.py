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
    list_threads(pid) -> list[int]          /proc/PID/task
    children(pid) -> list[int]              /proc/PID/task/*/children, sorted
    subtree(pid) -> list[int]               pid and every descendant, depth-first, sorted children
    read_fds(pid) -> list[FdInfo]           /proc/PID/fd + /proc/PID/fdinfo
    read_limits(pid) -> list[Limit]         /proc/PID/limits
    read_exe / read_cwd / read_root(pid) -> str | None
    read_comm(pid) -> str
"""
from __future__ import annotations

import enum
import errno
import os
import re
import resource
import stat as _stat
from dataclasses import dataclass, field

from ckptsim.errors import CkptsimError

__all__ = [
    "ProcessGone", "Stat", "Status", "Mapping", "SmapsEntry", "FdKind", "FdInfo", "Limit",
    "read_stat", "read_status", "read_maps", "read_smaps", "list_threads", "children",
    "subtree", "read_fds", "read_limits", "read_exe", "read_cwd", "read_root", "read_comm",
    "sigset_to_signals", "process_exists",
]

PROC = "/proc"


class ProcessGone(CkptsimError, ProcessLookupError):
    """The process (or thread) ``pid`` does not exist, or vanished while it was being read."""

    def __init__(self, pid: int, what: str = ""):
        self.pid = pid
        msg = f"process {pid} is gone" + (f" (while reading {what})" if what else "")
        ProcessLookupError.__init__(self, errno.ESRCH, msg)

    def __str__(self) -> str:
        return self.strerror


# --- low-level access ---------------------------------------------------------------------

def _path(pid: int, name: str) -> str:
    return f"{PROC}/{int(pid)}/{name}"


def process_exists(pid: int) -> bool:
    """True while ``/proc/PID`` exists (a zombie still exists)."""
    return os.path.exists(f"{PROC}/{int(pid)}")


def _gone_or_raise(pid: int, what: str, exc: OSError) -> None:
    """Translate an OSError met while reading ``/proc/PID/what``: raise ProcessGone when the
    process has vanished, re-raise ``exc`` otherwise."""
    if exc.errno == errno.ESRCH or not process_exists(pid):
        raise ProcessGone(pid, what) from None
    raise exc


def _read_bytes(pid: int, name: str) -> bytes:
    path = _path(pid, name)
    try:
        with open(path, "rb", buffering=0) as f:
            chunks = []
            while True:
                b = f.read(1 << 16)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):
            _gone_or_raise(pid, name, e)
        raise


def _read_text(pid: int, name: str) -> str:
    return _read_bytes(pid, name).decode("utf-8", "surrogateescape")


def _readlink(pid: int, name: str) -> str | None:
    """readlink of /proc/PID/name; None when the link exists but has no target now (a zombie,
    a kernel thread); ProcessGone when the process vanished."""
    try:
        return os.readlink(_path(pid, name))
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):
            if e.errno == errno.ESRCH or not process_exists(pid):
                raise ProcessGone(pid, name) from None
            return None
        raise


def _listdir(pid: int, name: str) -> list[str]:
    try:
        return os.listdir(_path(pid, name))
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):
            _gone_or_raise(pid, name, e)
        raise


_OCTAL_ESC = re.compile(r"\\([0-7]{3})")


def _unescape_octal(s: str) -> str:
    """Undo the kernel's ``\\ooo`` escapes (seq_path escapes a newline in a path as ``\\012``)."""
    if "\\" not in s:
        return s
    return _OCTAL_ESC.sub(lambda m: chr(int(m.group(1), 8)), s)


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


# --- /proc/PID/maps and smaps -------------------------------------------------------------

SPECIAL_MAPPINGS = frozenset({"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]",
                              "[stack]", "[heap]", "[uprobes]"})
_DELETED = " (deleted)"


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps. ``path`` is "" for an anonymous mapping, the bracketed name
    for a special one ("[vdso]", "[heap]", "[anon:NAME]"...), the file's path otherwise with
    the " (deleted)" suffix removed (``deleted`` says it was there)."""
    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int
    path: str
    deleted: bool = False

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def special(self) -> bool:
        """A kernel-named mapping ("[vdso]", "[stack]"...), not a file and not plain anon."""
        return self.path.startswith("[") and self.path.endswith("]")

    @property
    def anonymous(self) -> bool:
        return self.inode == 0 and (self.path == "" or self.special)

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end


_MAPS_LINE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) ([-r][-w][-x][-sp]) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+) ?(.*)$")


def parse_maps_line(line: str) -> Mapping:
    m = _MAPS_LINE.match(line)
    if not m:
        raise ValueError(f"malformed /proc maps line: {line[:120]!r}")
    path = m.group(8).lstrip(" ")
    deleted = False
    if path.endswith(_DELETED) and not path.startswith("["):
        path = path[:-len(_DELETED)]
        deleted = True
    path = _unescape_octal(path)
    return Mapping(start=int(m.group(1), 16), end=int(m.group(2), 16), perms=m.group(3),
                   offset=int(m.group(4), 16), dev=(int(m.group(5), 16), int(m.group(6), 16)),
                   inode=int(m.group(7)), path=path, deleted=deleted)


def parse_maps(text: str) -> list[Mapping]:
    return [parse_maps_line(ln) for ln in text.splitlines() if ln]


def read_maps(pid: int) -> list[Mapping]:
    """The VMAs of ``pid`` in address order (empty for a zombie or a kernel thread)."""
    return parse_maps(_read_text(pid, "maps"))


# smaps keys (values in kB) -> SmapsEntry fields (in bytes)
_SMAPS_KB = {
    "Size": "size", "KernelPageSize": "kernel_page_size", "MMUPageSize": "mmu_page_size",
    "Rss": "rss", "Pss": "pss", "Pss_Dirty": "pss_dirty",
    "Shared_Clean": "shared_clean", "Shared_Dirty": "shared_dirty",
    "Private_Clean": "private_clean", "Private_Dirty": "private_dirty",
    "Referenced": "referenced", "Anonymous": "anonymous", "KSM": "ksm", "LazyFree": "lazy_free",
    "AnonHugePages": "anon_huge_pages", "ShmemPmdMapped": "shmem_pmd_mapped",
    "FilePmdMapped": "file_pmd_mapped", "Shared_Hugetlb": "shared_hugetlb",
    "Private_Hugetlb": "private_hugetlb", "Swap": "swap", "SwapPss": "swap_pss",
    "Locked": "locked",
}


@dataclass(frozen=True)
class SmapsEntry:
    """One VMA of /proc/PID/smaps: its maps line, the sizes (in bytes, converted from the
    kernel's kB) and ``vm_flags``, the two-letter VmFlags mnemonics ("rd", "wr", "mr", "sd"...)."""
    mapping: Mapping
    size: int = 0
    kernel_page_size: int = 0
    mmu_page_size: int = 0
    rss: int = 0
    pss: int = 0
    pss_dirty: int = 0
    shared_clean: int = 0
    shared_dirty: int = 0
    private_clean: int = 0
    private_dirty: int = 0
    referenced: int = 0
    anonymous: int = 0
    ksm: int = 0
    lazy_free: int = 0
    anon_huge_pages: int = 0
    shmem_pmd_mapped: int = 0
    file_pmd_mapped: int = 0
    shared_hugetlb: int = 0
    private_hugetlb: int = 0
    swap: int = 0
    swap_pss: int = 0
    locked: int = 0
    thp_eligible: bool = False
    protection_key: int | None = None
    vm_flags: frozenset[str] = field(default_factory=frozenset)

    # convenient pass-throughs
    @property
    def start(self) -> int:
        return self.mapping.start

    @property
    def end(self) -> int:
        return self.mapping.end

    @property
    def path(self) -> str:
        return self.mapping.path


def parse_smaps(text: str) -> list[SmapsEntry]:
    out: list[SmapsEntry] = []
    cur: Mapping | None = None
    vals: dict = {}

    def flush():
        if cur is not None:
            out.append(SmapsEntry(mapping=cur, **vals))

    for line in text.splitlines():
        if not line:
            continue
        if _MAPS_LINE.match(line):
            flush()
            cur = parse_maps_line(line)
            vals = {}
            continue
        key, sep, v = line.partition(":")
        if not sep or cur is None:
            raise ValueError(f"malformed /proc smaps line: {line[:120]!r}")
        v = v.strip()
        if key in _SMAPS_KB:
            num, _, unit = v.partition(" ")
            n = int(num)
            vals[_SMAPS_KB[key]] = n * 1024 if unit.strip() == "kB" else n
        elif key == "VmFlags":
            vals["vm_flags"] = frozenset(v.split())
        elif key == "THPeligible":
            vals["thp_eligible"] = v.strip() not in ("0", "")
        elif key == "ProtectionKey":
            vals["protection_key"] = int(v)
        # other keys (new kernels add some) are ignored
    flush()
    return out


def read_smaps(pid: int) -> list[SmapsEntry]:
    return parse_smaps(_read_text(pid, "smaps"))


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


# --- file descriptors ---------------------------------------------------------------------

class FdKind(enum.Enum):
    REGULAR = "regular"
    DIRECTORY = "directory"
    PIPE = "pipe"               # an anonymous pipe: target "pipe:[INO]"
    FIFO = "fifo"               # a named pipe opened by path
    SOCKET = "socket"           # target "socket:[INO]"
    ANON_INODE = "anon_inode"   # eventfd, epoll, signalfd, timerfd, userfaultfd, bpf-map...
    CHAR_DEVICE = "char_device"
    BLOCK_DEVICE = "block_device"
    SYMLINK = "symlink"         # an O_PATH|O_NOFOLLOW fd on a symlink
    OTHER = "other"             # e.g. a bare "net:[...]"/"mnt:[...]" namespace fd


@dataclass(frozen=True)
class FdInfo:
    """One open fd. ``target`` is the raw readlink of /proc/PID/fd/N; ``path`` is the file's
    path without " (deleted)" for path-named files, "" otherwise; ``anon_name`` is the
    anon_inode name without brackets ("eventfd", "eventpoll", "[userfaultfd]" -> "userfaultfd").
    ``flags`` is the f_flags from fdinfo (octal there); ``mode``/``dev``/``rdev`` come from a
    stat() through the magic link (0 when the fd vanished in between). ``extra`` keeps the
    kind-specific fdinfo lines (eventfd-count, tfd..., in order) as (key, value) pairs."""
    fd: int
    target: str
    kind: FdKind
    pos: int
    flags: int
    mnt_id: int
    ino: int
    path: str = ""
    deleted: bool = False
    anon_name: str = ""
    mode: int = 0
    dev: int = 0
    rdev: int = 0
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def access_mode(self) -> int:
        return self.flags & os.O_ACCMODE

    @property
    def cloexec(self) -> bool:
        return bool(self.flags & os.O_CLOEXEC)


_BRACKET_INO = re.compile(r"^([a-z_]+):\[(\d+)\]$")


def _classify(target: str, st: os.stat_result | None) -> tuple[FdKind, str, bool, str]:
    """(kind, path, deleted, anon_name) for a readlink target and the stat of the fd."""
    if target.startswith("anon_inode:"):
        name = target[len("anon_inode:"):]
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        return FdKind.ANON_INODE, "", False, name
    m = _BRACKET_INO.match(target)
    if m:
        kind = {"pipe": FdKind.PIPE, "socket": FdKind.SOCKET}.get(m.group(1), FdKind.OTHER)
        return kind, "", False, ""
    if not target.startswith("/"):
        return FdKind.OTHER, "", False, ""
    path, deleted = target, False
    if path.endswith(_DELETED):
        path, deleted = path[:-len(_DELETED)], True
    kind = FdKind.OTHER
    if st is not None:
        mode = st.st_mode
        if _stat.S_ISREG(mode):
            kind = FdKind.REGULAR
        elif _stat.S_ISDIR(mode):
            kind = FdKind.DIRECTORY
        elif _stat.S_ISFIFO(mode):
            kind = FdKind.FIFO
        elif _stat.S_ISSOCK(mode):
            kind = FdKind.SOCKET
        elif _stat.S_ISCHR(mode):
            kind = FdKind.CHAR_DEVICE
        elif _stat.S_ISBLK(mode):
            kind = FdKind.BLOCK_DEVICE
        elif _stat.S_ISLNK(mode):
            kind = FdKind.SYMLINK
    return kind, path, deleted, ""


def _parse_fdinfo(text: str) -> tuple[int, int, int, int, tuple[tuple[str, str], ...]]:
    pos = flags = mnt_id = ino = 0
    extra: list[tuple[str, str]] = []
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if not sep:
            continue
        v = v.strip()
        if k == "pos":
            pos = int(v)
        elif k == "flags":
            flags = int(v, 8)
        elif k == "mnt_id":
            mnt_id = int(v)
        elif k == "ino":
            ino = int(v)
        else:
            extra.append((k, v))
    return pos, flags, mnt_id, ino, tuple(extra)


def _read_one_fd(pid: int, fd: int) -> FdInfo | None:
    """None if the fd was closed while we looked (the process itself still exists)."""
    link = _path(pid, f"fd/{fd}")
    try:
        target = os.readlink(link)
        with open(_path(pid, f"fdinfo/{fd}"), "rb") as f:
            info = f.read().decode("utf-8", "surrogateescape")
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):
            if e.errno == errno.ESRCH or not process_exists(pid):
                raise ProcessGone(pid, f"fd {fd}") from None
            return None
        raise
    try:
        # stat through the magic link: the open file itself, even when unlinked
        st: os.stat_result | None = os.stat(link)
    except OSError:
        st = None
    pos, flags, mnt_id, ino, extra = _parse_fdinfo(info)
    kind, path, deleted, anon = _classify(target, st)
    if not ino and st is not None:
        ino = st.st_ino
    if not ino:
        m = _BRACKET_INO.match(target)
        if m:
            ino = int(m.group(2))
    return FdInfo(fd=fd, target=target, kind=kind, pos=pos, flags=flags, mnt_id=mnt_id,
                  ino=ino, path=path, deleted=deleted, anon_name=anon,
                  mode=st.st_mode if st else 0, dev=st.st_dev if st else 0,
                  rdev=st.st_rdev if st else 0, extra=extra)


def read_fd(pid: int, fd: int) -> FdInfo:
    """One fd of ``pid``; FileNotFoundError naming the pid and fd when it is not open."""
    info = _read_one_fd(pid, fd)
    if info is None:
        raise FileNotFoundError(errno.EBADF, f"process {pid} has no fd {fd}")
    return info


def read_fds(pid: int) -> list[FdInfo]:
    """Every open fd of ``pid``, by fd number. An fd closed while we read is left out."""
    fds = sorted(int(n) for n in _listdir(pid, "fd") if n.isdigit())
    out = []
    for fd in fds:
        info = _read_one_fd(pid, fd)
        if info is not None:
            out.append(info)
    return out


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

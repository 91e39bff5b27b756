"""Live incremental checkpoints (docs/image-format.md §11) from a tracking session.

``checkpoint --track PID`` arms a session (backend/track.py) at a full checkpoint; an
incremental one (``checkpoint --parent IMAGE PID``, ``backend.dump.checkpoint(parent=...)``)
asks the session which pages the tree wrote since, writes only those and re-arms it while
the tree is still stopped. ``Tracking`` is what ``backend.dump.checkpoint(tracking=...)`` asks:

- before the stop (``Tracking.prepare``): is the parent the image the session was last armed
  at? (a parent of another tree, or not the last checkpoint, is a CheckpointError EINVAL;
  no session, a session re-armed by someone else, lost eBPF records or an exec make a full
  image, with a one-line notice in ``notices``);
- while stopped (``stopped``): per process, the present private page runs now and, for an
  incremental image, its ``MmDelta`` on its LiveMM: the base (the mm's objref in the parent),
  the pages to write (written pages of the protected ranges that are present, plus every
  present page of a range nobody protected: mapped, moved or unregistrable since) and the
  dropped ranges (pages present at the parent checkpoint that are not now, per private VMA);
  a process the session does not cover (forked since, exec'd) is saved whole (base 0);
- still stopped, once the image is complete (``arm``): the session re-armed; after it
  (``record``) the ``LastCheckpoint`` saved next to the session socket, which the next
  incremental checkpoint takes its base objrefs and previous page runs from.

Shared anonymous segments are always saved whole (SHMEM_BASE 0): nothing write-protects them.
"""
from __future__ import annotations

import bisect
import errno
import mmap
import os
from array import array
from dataclasses import dataclass

from ckptsim.cr.context import CheckpointError
from ckptsim.cr.incremental import tree_identity
from ckptsim.errors import ImageError
from ckptsim.image import core
from ckptsim.image.codec import ImageReader
from ckptsim.kinds.tasktree import TREE, TREE_NESTED
from ckptsim.model.signals import NSIG, SA_RESETHAND, SigAction, SigHand

from . import kabi, proc, track
from .dirty import marker_runs, scan_regions
from .incremental_record import (LastCheckpoint, _vma_record, forget_stale,  # noqa: F401
                                 record_path)      # (re-exported: the record lives there)

PAGE = 4096


# -- page runs (sorted, disjoint [start, end) address pairs) ---------------------------------
def intersect_runs(a, b) -> list[tuple[int, int]]:
    out, j = [], 0
    for lo, hi in a:
        while j < len(b) and b[j][1] <= lo:
            j += 1
        k = j
        while k < len(b) and b[k][0] < hi:
            s, e = max(lo, b[k][0]), min(hi, b[k][1])
            if s < e:
                out.append((s, e))
            k += 1
    return out


def subtract_runs(a, b) -> list[tuple[int, int]]:
    out, j = [], 0
    for lo, hi in a:
        while j < len(b) and b[j][1] <= lo:
            j += 1
        k = j
        while k < len(b) and b[k][0] < hi:
            if b[k][0] > lo:
                out.append((lo, b[k][0]))
            lo = max(lo, b[k][1])
            k += 1
        if lo < hi:
            out.append((lo, hi))
    return out


def merge_runs(runs) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(runs):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def pages_in(pages: array, lo: int, hi: int) -> array:
    """The addresses of the sorted ``pages`` in [lo, hi) (one slice)."""
    return pages[bisect.bisect_left(pages, lo):bisect.bisect_left(pages, hi)]


def without_markers(pid: int, runs: list) -> list[tuple[int, int]]:
    """``runs`` (present or swapped pages, as PAGEMAP_SCAN reports them) minus the pages
    that are uffd-wp PTE markers: PAGEMAP_SCAN calls every non-present, non-none PTE
    "swapped", and write protection leaves markers where a protected page was unpopulated
    or zapped; such a page has no private copy (a zapped one must count as dropped). A
    PAGEMAP_SCAN finds the non-present pages of the runs; only their pagemap entries are
    read (backend.dirty.marker_runs)."""
    if not runs:
        return runs
    markers: list[tuple[int, int]] = []
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for lo, hi in runs:
            try:
                found = scan_regions(fd, lo, hi, flags=0, mask=kabi.PAGE_IS_SWAPPED,
                                     inverted=0, anyof=0, return_mask=kabi.PAGE_IS_SWAPPED,
                                     check_wpasync=False)
                swapped = list(zip(found[0::3], found[1::3]))
            except OSError:                 # no PAGEMAP_SCAN: read every entry of the run
                swapped = [(lo, hi)]
            for a, b in swapped:
                raw = os.pread(fd, ((b - a) // PAGE) * 8, (a // PAGE) * 8)
                markers.extend(marker_runs(raw, a))
    finally:
        os.close(fd)
    return subtract_runs(runs, merge_runs(markers)) if markers else list(runs)


@dataclass
class MmDelta:
    """What an incremental image holds of one mm (LiveMM.delta)."""
    base: int                                   # the mm's objref in the parent image
    pages: array                                # sorted page addresses to write
    drops: list[tuple[int, int]]                # dropped ranges, split at VMA boundaries

    @property
    def nbytes(self) -> int:
        return len(self.pages) * PAGE


def mm_delta(base: int, vmas, present: list, dirty, last_runs: list) -> MmDelta:
    """The delta of an mm whose private VMAs are ``vmas`` ([(start, end)]), its present
    page runs ``present`` now and ``last_runs`` at the parent checkpoint, and ``dirty`` the
    session's ProcessDirty (its ``covered`` ranges and ``pages``)."""
    covered = intersect_runs(present, merge_runs(dirty.covered))
    whole = subtract_runs(present, merge_runs(dirty.covered))
    pieces = [(lo, pages_in(dirty.pages, lo, hi)) for lo, hi in covered]
    pieces += [(lo, array("Q", range(lo, hi, PAGE))) for lo, hi in whole]
    pieces.sort(key=lambda piece: piece[0])
    pages = array("Q")
    for _, part in pieces:
        pages.extend(part)
    gone = subtract_runs(merge_runs(last_runs), present)
    drops = [run for vma in vmas for run in intersect_runs(gone, [vma])]
    return MmDelta(base, pages, drops)


# -- the parent image -------------------------------------------------------------------------
@dataclass(frozen=True)
class ParentImage:
    """What identifies a parent image, read from its header, TREE and tail (no page pass)."""
    name: str
    image_id: bytes
    crid: int
    checksum: int
    time: int
    image_flags: int
    root_vpid: int
    tree: bytes                                 # the tree identity (cr/incremental.py)

    @classmethod
    def read(cls, parent, name: str | None = None) -> "ParentImage":
        """``parent``: a path or the image's bytes. CheckpointError EINVAL if unreadable."""
        from ckptsim.image.storage import read_image_file
        from ckptsim.kinds import load_all
        load_all()
        if isinstance(parent, (str, os.PathLike)):
            name = name or str(parent)
            try:
                data = read_image_file(str(parent))
            except OSError as e:
                raise CheckpointError(e.errno or errno.EIO, f"parent image {name}: "
                                                            f"{e.strerror or e}") from None
        else:
            data, name = parent, name or "the parent image"
        try:
            reader = ImageReader(data, checksum=False)
            hdr = reader.expect(core.HEADER)
            root, tree = 0, b""
            for rec in reader.records():
                if rec.layout is TREE:
                    root = rec.var[0][0] if rec["nr_tasks"] else 0
                    tree = bytes(rec.var.view)
                elif rec.layout is TREE_NESTED:
                    tree += bytes(rec.var.view)
                elif tree:
                    break
            return cls(name, bytes(hdr["image_id"]), hdr["crid"], reader.tail_checksum,
                       hdr["time"], hdr["image_flags"], root, tree_identity(tree))
        except (ImageError, ValueError, IndexError) as e:
            raise CheckpointError(errno.EINVAL, f"{name} is no readable image: {e}") from None

    def describe(self) -> str:
        return f"{self.name} (image {self.image_id.hex()}, crid {self.crid})"


def _root_vpid(pid: int) -> int:
    return proc.read_status(pid).nspid[-1]


def _started_at(pid: int) -> float:
    """The process's start as a wall-clock time (seconds)."""
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return btime + proc.read_stat(pid).start_time / os.sysconf("SC_CLK_TCK")


class Tracking:
    """A tracking session's part in one live checkpoint (see the module doc). Built with
    ``prepare``; ``parent`` is None when the image is a full one."""

    def __init__(self, pid: int, session=None):
        self.pid = pid
        self.session = session
        self.parent: ParentImage | None = None
        self.last: LastCheckpoint | None = None
        self.notices: list[str] = []
        self.arm_error: str | None = None
        self.generation: int | None = None
        self.present: dict[int, list] = {}       # tgid -> present private page runs now
        self.deltas: dict[int, MmDelta] = {}     # tgid -> delta (incremental, based mms)
        self.downtime: float | None = None       # seconds the tree was stopped (dump sets it)
        self.image_id: bytes | None = None
        self.report = None                       # the session's DirtyReport at the stop
        self.expected_bytes = 0                  # the pages written by prepare's time
        self._need: list[int] | None = None      # set when ``seized`` re-armed the session

    # -- before the stop ----------------------------------------------------------------------
    @classmethod
    def prepare(cls, pid: int, parent=None, session=None, *, connect: bool = True) -> "Tracking":
        """The tracking for a checkpoint of ``pid`` against ``parent`` (a path, bytes or a
        ParentImage; None: a full image with tracking). ``session``: a TrackClient, else
        the session of ``pid`` if there is one (``connect``)."""
        t = cls(pid)
        forget_stale()
        if parent is not None and not isinstance(parent, ParentImage):
            parent = ParentImage.read(parent)
        if parent is not None:
            t._check_tree(parent)
        if session is None and connect:
            try:
                session = track.connect(pid)
            except track.NoSession:
                session = None
                LastCheckpoint.forget(pid)          # a record of an ended session
            except track.TrackError as e:
                t.notices.append(f"the tracking session cannot be asked ({e})")
        t.session = session
        if parent is None:
            return t
        if session is None:
            t.notices.append(f"no tracking session for process {pid}: a full image (arm one "
                             f"with checkpoint --track {pid})")
            return t
        last = LastCheckpoint.load(pid)
        if last is None:
            t.notices.append(f"the tracking session of {pid} was not armed by a checkpoint "
                             "this tool recorded: a full image")
            return t
        if last.image_id != parent.image_id:
            raise CheckpointError(errno.EINVAL, f"{parent.describe()} is not the last "
                                  f"checkpoint of process {pid}'s tracked tree: that was image "
                                  f"{last.image_id.hex()} (crid {last.crid}); pass it as the "
                                  "parent, or take a full checkpoint")
        if (last.crid, last.checksum, last.tree) != (parent.crid, parent.checksum, parent.tree):
            raise CheckpointError(errno.EINVAL, f"{parent.describe()} does not match the "
                                  f"checkpoint the session recorded under its id (crid "
                                  f"{last.crid}, checksum {last.checksum:#010x}; the file has "
                                  f"checksum {parent.checksum:#010x})")
        try:
            status = session.status()
        except track.TrackError as e:           # a session that no longer answers
            t.notices.append(f"the tracking session of {pid} does not answer ({e}): a full "
                             "image")
            return t
        if (status.get("generation"), status.get("daemon")) != (last.generation, last.daemon):
            t.notices.append(f"the tracking session of {pid} was re-armed since "
                             f"{parent.describe()}: a full image")
            return t
        try:
            report = session.dirty()
        except track.TrackError as e:
            t.notices.append(f"the tracking session of {pid} does not answer ({e}): a full "
                             "image")
            return t
        why = _incomplete(report)
        if why:
            t.notices.append(f"{why}: a full image")
            return t
        t.parent, t.last = parent, last
        t.expected_bytes = sum(len(p.pages) for p in report.processes.values()) * PAGE
        return t

    def _check_tree(self, parent: ParentImage) -> None:
        if not parent.image_flags & core.IMAGE_LIVE:
            raise CheckpointError(errno.EINVAL, f"{parent.describe()} is no live image (a "
                                                "model image cannot be a live tree's parent)")
        try:
            root, started = _root_vpid(self.pid), _started_at(self.pid)
        except (OSError, proc.ProcessGone):
            raise CheckpointError(errno.ESRCH, f"no process {self.pid}") from None
        if parent.root_vpid != root:
            raise CheckpointError(errno.EINVAL, f"{parent.describe()} is of another tree: its "
                                  f"root is pid {parent.root_vpid}, this tree's is {root}")
        if parent.time + 1 < started:
            raise CheckpointError(errno.EINVAL, f"{parent.describe()} is of another tree: it "
                                  f"was taken before process {self.pid} started")

    @property
    def incremental(self) -> bool:
        return self.parent is not None

    # -- while stopped ------------------------------------------------------------------------
    def seized(self, seized=None) -> None:
        """The tree is stopped (by ``seized``), nothing gathered yet: what the session saw
        written until now, and the session re-armed at once (TrackClient.checkpoint: one walk
        and one eBPF map pass for both). The gathering's injected calls, which write scratch
        bytes on stacks and put them back, come after: the next checkpoint has those pages.
        ``arm`` finishes it (fresh trackers where needed). Without ``seized``: the report
        alone (``arm`` re-arms at the end of the stop)."""
        self.report = None
        if self.incremental:
            try:
                if seized is None:
                    self.report = self.session.dirty()
                else:
                    self.report, self._need = self.session.checkpoint(seized)
            except track.TrackError as e:   # the header says incremental: all saved whole
                self.notices.append(f"the tracking session did not answer ({e}): every "
                                    "process is saved whole")

    def stopped(self, ctx, processes) -> None:
        """The tree is stopped and gathered: present runs of every process, and for an
        incremental image each mm's delta (LiveMM.delta); ctx.incremental set."""
        live = [p for p in processes if not p.zombie and p.mm is not None]
        report = self.report
        for p in live:
            d = report.processes.get(p.pid) if report is not None else None
            if d is not None and d.present is not None:
                self.present[p.pid] = _present_runs(p, d)
            else:
                self.present[p.pid] = without_markers(p.pid, p.mm.present_runs())
        if not self.incremental:
            return
        ctx.incremental = self
        if report is None:
            return
        if _incomplete(report):
            self.notices.append(f"{_incomplete(report)}: those processes are saved whole")
        for p in live:
            d = report.processes.get(p.pid)
            last = self.last.mms.get(p.pid)
            if d is None or d.all_dirty or not d.bpf_complete or last is None \
                    or last[1] != p.stat.start_time:
                continue                        # saved whole: base 0
            p.mm.delta = self.deltas[p.pid] = mm_delta(
                last[0], p.mm.private_ranges(), self.present[p.pid], d, last[2])

    def known_vm_flags(self, pid: int, start_time: int) -> dict | None:
        """For the gathering (backend.snapshot): {Mapping: VmFlags mnemonics} of ``pid``'s
        VMAs at the parent checkpoint, when the session says a maps line unchanged since
        then means VmFlags unchanged (ProcessDirty.vm_flags_kept): the gathering then reads
        /proc/PID/maps instead of smaps, whose page-table walk costs ~15 ms at 1 GiB. None
        when that is not known."""
        if not self.incremental or self.report is None:
            return None
        d = self.report.processes.get(pid)
        last = self.last.mms.get(pid)
        if d is None or not d.vm_flags_kept or d.all_dirty or d.exec or last is None \
                or last[1] != start_time or last[3] is None:
            return None
        return {proc.Mapping(start, end, perms, offset, (major, minor), inode, path, deleted):
                frozenset(flags.split())
                for start, end, perms, offset, major, minor, inode, path, deleted, flags
                in last[3]}

    def known_handlers(self, pid: int, start_time: int) -> SigHand | None:
        """For the gathering: ``pid``'s signal actions at the parent checkpoint, when the
        session says no process of the tree set one since (ProcessDirty.handlers_kept) and
        none of them resets itself when it fires (SA_RESETHAND: the kernel changes it with no
        syscall); reading all 64 costs 128 ptrace stops. None when that is not known."""
        if not self.incremental or self.report is None:
            return None
        d = self.report.processes.get(pid)
        last = self.last.mms.get(pid)
        if d is None or not d.handlers_kept or d.all_dirty or d.exec or last is None \
                or last[1] != start_time or not last[4] or len(last[4]) != NSIG:
            return None
        actions = [SigAction(*a) for a in last[4]]
        if any(a.flags & SA_RESETHAND for a in actions):
            return None
        return SigHand(actions)

    def base_of(self, obj) -> int:
        """kinds/memory.py: the objref of ``obj`` in the parent image (0: saved whole)."""
        delta = getattr(obj, "delta", None)
        return delta.base if delta is not None else 0

    def arm(self, seized) -> None:
        """Re-arm the session at this checkpoint, or finish what ``seized`` began (fresh
        trackers for the processes that need one). Never raises: ``arm_error``."""
        if self.session is None:
            return
        try:
            if self._need is not None:
                self.generation = self.session.finish_checkpoint(seized, self._need)
            else:
                self.generation = self.session.rearm(seized)
        except Exception as e:          # noqa: BLE001 - the image stands; reported by callers
            self.arm_error = str(e) or type(e).__name__

    def record(self, ctx, processes, image_id: bytes, crid: int, checksum: int) -> None:
        """The image is complete: remember it as the session's last checkpoint."""
        self.image_id = image_id
        if self.session is None:
            return
        if self.generation is None:
            LastCheckpoint.forget(self.pid)
            return
        mms = {}
        for p in processes:
            known = ctx.refs.get(id(p.mm)) if p.mm is not None else None
            if known is not None and p.pid in self.present:
                mms[p.pid] = (known[0], p.stat.start_time, self.present[p.pid],
                              _vma_record(p.mm.vmas),
                              [[a.handler, a.flags, a.mask, a.restorer]
                               for a in p.sighand.actions] if p.sighand else None)
        try:
            daemon = self.session.status()["daemon"]
            LastCheckpoint(image_id, crid, checksum, tree_identity(ctx.tree_bytes),
                           self.generation, daemon, mms).save(self.pid)
        except (track.TrackError, OSError) as e:   # the image stands; the next one is full
            self.arm_error = f"the checkpoint could not be recorded for the session: {e}"
            LastCheckpoint.forget(self.pid)

    def spool(self, sink) -> "Spool | None":
        """backend.dump: the sink an incremental image is written to while the tree is
        stopped (None: ``sink`` itself)."""
        if not self.incremental:
            return None
        # room for what was written by prepare's time and as much again, faulted in now
        return Spool(sink, reserve=min(2 * self.expected_bytes + (1 << 20), SPOOL_LIMIT))

    # -- numbers --------------------------------------------------------------------------------
    @property
    def delta_pages(self) -> int:
        return sum(len(d.pages) for d in self.deltas.values())


def _present_runs(p, d) -> list[tuple[int, int]]:
    """The present runs of process ``p``'s private VMAs: the session's (``d.present``) in the
    ranges it walked at the stop, a scan here of the others (mapped since the last arm,
    refused by userfaultfd...)."""
    from .memory import ProcessMemory
    rest = subtract_runs(merge_runs(p.mm.private_ranges()), merge_runs(d.scanned))
    if not rest:
        return list(d.present)
    private = set(p.mm.private_ranges())
    runs = []
    with ProcessMemory(p.pid) as memory:
        for v in p.mm.vmas:
            if (v.start, v.end) in private and intersect_runs([(v.start, v.end)], rest):
                runs.extend(intersect_runs(memory.regions(v.entry), rest))
    return merge_runs(list(d.present) + without_markers(p.pid, merge_runs(runs)))


SPOOL_LIMIT = 256 << 20          # bytes an image keeps in memory before writing through


class Spool:
    """A sink that keeps what is written in memory until ``drain``: an incremental image is
    encoded while the tree is stopped (every page read then) and reaches its file once the
    tree runs again; page-cache writes can wait behind the writeback of earlier images
    (measured: 20-70 ms for 13 MiB). ``reserve`` bytes are mapped and faulted in up front
    (made before the stop: no page fault per 4 KiB copied while stopped); more is kept in
    copies. Past ``limit`` bytes it drains and writes through."""

    def __init__(self, sink, limit: int = SPOOL_LIMIT, reserve: int = 0):
        self.sink, self.limit = sink, limit
        self.buffer = mmap.mmap(-1, reserve, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS |
                                getattr(mmap, "MAP_POPULATE", 0)) if reserve > 0 else None
        self.used = 0                       # bytes of ``buffer`` in use
        self.parts: list[bytes] = []        # what came after the buffer was full
        self.size = 0
        self.through = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        if self.through:
            self.sink.write(view)
        elif not self.parts and self.buffer is not None and self.used + n <= len(self.buffer):
            self.buffer[self.used:self.used + n] = view
            self.used += n
            self.size += n
        else:
            self.parts.append(bytes(view))  # the writer reuses its buffers: copied
            self.size += n
        if not self.through and self.size > self.limit:
            self.drain()
            self.through = True
        return n

    def drain(self) -> None:
        """Everything kept so far into the sink (the buffer is released)."""
        if self.buffer is not None:
            if self.used:
                with memoryview(self.buffer) as whole, whole[:self.used] as used:
                    self.sink.write(used)
            self.buffer.close()
            self.buffer, self.used = None, 0
        parts, self.parts, self.size = self.parts, [], 0
        for part in parts:
            self.sink.write(part)


def _incomplete(report) -> str | None:
    """Why the session's answer cannot make an incremental image of some process, or None."""
    for tgid, p in sorted(report.processes.items()):
        if not p.bpf_complete:
            return f"the eBPF tracker lost records of process {tgid}"
        if p.exec:
            return f"process {tgid} exec'd since the last checkpoint"
    return None


def write_parent(ctx, parent: ParentImage) -> None:
    """The PARENT record (right after HEADER_ARCH)."""
    ctx.write(core.PARENT, parent_crid=parent.crid, parent_checksum=parent.checksum, pad=0,
              parent_tree=parent.tree)

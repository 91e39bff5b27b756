"""The live backend's incremental steps (conformance/README.md, area "incremental"): a
tracking session per run (backend/track.py), releasing the tasks one point at a time, and
what the runner compares: the pages written since the previous image, and page contents.

A mixin of LiveBackend (conformance/backends/live.py), whose runs (LiveRun) it uses: `root`,
`ctl`, `session`; and its `tree`, `_snapshot` and `_wait_quiet`.
"""
from __future__ import annotations

import errno
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .live import LiveRun


class IncrementalSteps:
    def _tracking(self, run: LiveRun, parent):
        from backend import track
        from backend.incremental import Tracking
        from ckptsim.cr.context import CheckpointError
        if run.session is None:
            try:
                run.session = track.launch(run.root)
            except track.TrackError as e:
                raise CheckpointError(errno.EIO, str(e)) from None
        tracking = Tracking.prepare(run.root, parent, run.session)
        if parent is not None and not tracking.incremental:
            raise CheckpointError(errno.EIO, f"no incremental image: {'; '.join(tracking.notices)}")
        return tracking

    def release_step(self, run: LiveRun, step: int) -> None:
        """Let every task waiting at its point go on to its next one, once: a fresh FIFO
        takes the release FIFO's name first (a task reaching its next point blocks on it),
        then the old one is opened for writing through an O_PATH handle (the readers blocked
        in open wake on a writer's open) and closed; then the tree settles."""
        from .live import POLL, START_TIMEOUT   # (live.py imports this module)
        before = self._snapshot(run)[1]
        path = os.path.join(run.ctl, "release")
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            os.mkfifo(path + ".next", 0o666)
            os.chmod(path + ".next", 0o666)
            os.rename(path + ".next", path)
            fd = os.open(f"/proc/self/fd/{handle}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            os.close(fd)
        finally:
            os.close(handle)
        deadline = time.monotonic() + START_TIMEOUT
        while self._snapshot(run)[1] == before and time.monotonic() < deadline:
            time.sleep(POLL)
        self._wait_quiet(run)

    def _processes(self, run: LiveRun) -> dict[int, int]:
        """Global pid -> pid in the container, for the live processes of the tree."""
        from backend import proc
        out = {}
        for pid in self.tree(run):
            try:
                st = proc.read_status(pid)
            except proc.ProcessGone:
                continue
            if st.state != "Z":
                out[pid] = st.nspid[-1]
        return out

    def written_pages(self, run: LiveRun) -> dict[int, list[int]]:
        """Per task: the pages the session's userfaultfd side (PAGEMAP_SCAN, authoritative)
        saw written in the protected ranges that are present now, every present page of a
        range nobody protected, all the pages worth saving of a process the session does not
        cover, and the pages of the shared segments it maps. The image is made with the eBPF
        tracker's pages too: they must add nothing."""
        from backend.incremental import LastCheckpoint, mm_delta, without_markers
        report = run.session.dirty()
        last = LastCheckpoint.load(run.root)
        out = {}
        for pid, vpid in self._processes(run).items():
            mm = _probe_mm(pid)
            try:
                d = report.processes.get(pid)
                base = last.mms.get(pid) if last is not None else None
                if d is not None and not d.all_dirty and base is not None:
                    present = without_markers(pid, mm.present_runs())
                    pages = set(mm_delta(base[0], mm.private_ranges(), present,
                                         _UffdOnly(d), base[2]).pages)
                else:
                    pages = {a for v in mm.vmas for addrs, *_ in mm.present_chunks(v) for a in addrs}
                pages.update(_shared_pages(pid, mm))
            finally:
                mm.close()
            out[vpid] = sorted(pages)
        return out

    def page_contents(self, run: LiveRun) -> dict[int, dict[int, bytes]]:
        """Per task: a digest of every page of its readable anonymous mappings, each
        thread's rseq area blanked (the kernel writes the cpu it runs on there)."""
        import hashlib
        from backend import proc
        from backend.memory import ProcessMemory
        out = {}
        processes = self._processes(run)
        rseq = _rseq_areas(list(processes))
        for pid, vpid in processes.items():
            pages = out[vpid] = {}
            with ProcessMemory(pid) as pm:
                for m in proc.read_maps(pid):
                    if not m.readable or (m.path and m.path not in ("[heap]", "[stack]")) \
                            or m.path.startswith("[v"):
                        continue
                    try:
                        data = pm.read_pages(range(m.start, m.end, 4096))
                    except OSError:
                        continue
                    for addr, size in rseq.get(pid, ()):   # the kernel's cpu number there
                        if m.start <= addr < m.end:
                            data[addr - m.start:addr - m.start + size] = bytes(size)
                    data = memoryview(data)
                    for i in range(0, m.end - m.start, 4096):
                        pages[m.start + i] = hashlib.blake2b(data[i:i + 4096], digest_size=8).digest()
        return out


class _UffdOnly:
    """A ProcessDirty seen through its userfaultfd pages alone (backend.incremental.mm_delta)."""

    def __init__(self, dirty):
        self.covered, self.pages = dirty.covered, dirty.uffd_pages


def _probe_mm(pid: int):
    """A LiveMM of a running process (its VMAs; file mappings stand as placeholders)."""
    from backend import proc
    from backend.memory import VmaKind, classify
    from backend.snapshot import LiveFile, LiveMM, LiveVMA
    vmas = []
    for entry in proc.read_smaps(pid):
        kind = classify(entry).kind
        file = (LiveFile("regular", os.O_RDONLY, 0, entry.mapping.path)
                if kind in (VmaKind.FILE_PRIVATE, VmaKind.FILE_SHARED) else None)
        vmas.append(LiveVMA(entry, file))
    return LiveMM(pid, proc.read_stat(pid), vmas, None)


def _shared_pages(pid: int, mm) -> set[int]:
    """The addresses of the pages of the shared anonymous segments ``pid`` maps that a
    checkpoint saves (the segments are saved whole: nothing protects them)."""
    from backend.memory import VmaKind, classify
    from backend.snapshot import LiveShmem
    out = set()
    for v in mm.vmas:
        if classify(v.entry).kind != VmaKind.ANON_SHARED:
            continue
        m = v.entry.mapping
        seg = LiveShmem((m.dev, m.inode))
        seg.add(pid, v.entry)
        for offsets, _ in seg.present_pages():
            out.update(m.start + off - m.offset for off in offsets if m.offset <= off < m.offset + m.size)
    return out


def _rseq_areas(pids: list[int]) -> dict[int, list[tuple[int, int]]]:
    """Per process: the (address, size) of its threads' rseq areas, asked with the tree
    seized for a moment (a task blocked in a call restarts it)."""
    from backend import ptrace
    from backend.snapshot import _rseq
    out: dict[int, list[tuple[int, int]]] = {}
    if not pids:
        return out
    with ptrace.seized(pids[0]) as s:
        for pid in pids[1:]:
            if pid not in s.threads:
                try:
                    s.add(pid)
                except ptrace.ThreadGone:
                    continue
        for pid, tids in s.threads.items():
            for tid in tids:
                conf = _rseq(tid)
                if conf is not None:
                    out.setdefault(pid, []).append((conf[0], conf[1]))
    return out

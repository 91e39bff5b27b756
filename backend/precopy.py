"""Pre-copy: a chain of live images written while the tree runs, then a short stopped one.

    pre_copy(pid, out_dir, max_downtime, ...) -> PrecopyReport
    checkpoint --pre-copy --max-downtime MS PID -o DIR          (backend/cli.py)

Round 0 is a full image and every later round an incremental one against the round before
(backend/incremental.py). A *running* round stops the tree only to gather its state, ask the
tracking session what was written and re-arm it; the tree is then released and the pages are
copied while it runs (``dump.checkpoint(running_copy=True)``): a page written during the
copy was written after the re-arm, so the next round has it again. After each round the
session's dirty set so far (asked with the tree running) gives the estimated stop of a final
round: the last round's stop (gathering, session, re-arm) plus the dirty bytes at the copy
rate measured in the rounds. When that fits ``max_downtime``, when the dirty set stops
shrinking, or after ``max_rounds``, the final round is taken with the tree stopped throughout
(an ordinary incremental checkpoint): its stop is the downtime reported.

The images are DIR/00.img, DIR/01.img, ...; the last one is the newest of the chain and
``restart -i DIR/NN.img`` restores the tree as it was at the final round (the chain is found
in the image's directory). A session this function launched is stopped at the end.
"""
from __future__ import annotations

import errno
import glob
import os
import time
from dataclasses import dataclass, field

from ckptsim.cr.context import CheckpointError, Log
from ckptsim.errors import CkptsimError
from ckptsim.image import core
from ckptsim.image.storage import AtomicImageFile

from . import dump, track
from .incremental import LastCheckpoint, Tracking

PAGE = 4096
MAX_ROUNDS = 12
SHRINK = 0.9                 # a dirty set not below 90% of the previous one stopped shrinking


class PrecopyError(CkptsimError):
    """Pre-copy could not run (bad directory, ...); the tree runs on as it was."""


@dataclass
class Round:
    path: str
    kind: str                # "full", "running" (pages copied while the tree ran), "final"
    pages: int               # pages the image holds (all of them for a full image)
    nbytes: int              # the image file's size
    stopped: float           # seconds the tree was stopped
    seconds: float           # the whole round


@dataclass
class PrecopyReport:
    rounds: list[Round] = field(default_factory=list)
    reason: str = ""         # why the running rounds ended
    notices: list[str] = field(default_factory=list)

    @property
    def newest(self) -> str:
        return self.rounds[-1].path

    @property
    def downtime(self) -> float:
        return self.rounds[-1].stopped

    def summary(self) -> str:
        lines = [f"round {i}: {r.kind:<7} {r.pages:8d} pages {r.nbytes:12d} bytes  stopped "
                 f"{r.stopped * 1000:8.1f} ms  took {r.seconds * 1000:8.1f} ms  {r.path}"
                 for i, r in enumerate(self.rounds)]
        lines.append(f"final round: {self.reason}")
        lines.append(f"downtime {self.downtime * 1000:.1f} ms; newest image {self.newest}")
        return "\n".join(lines)


def _round(pid: int, path: str, tracking: Tracking | None, log: Log, *, running: bool,
           kill: bool = False, freezer=False) -> tuple[float, float]:
    """One image into ``path``: (stopped seconds, whole seconds)."""
    began = time.monotonic()
    sink = AtomicImageFile(path)
    try:
        dump.checkpoint(pid, sink, core.CHECKPOINT_SUBTREE, log, kill=kill, freezer=freezer,
                        tracking=tracking, running_copy=running)
    except BaseException:
        sink.abort()
        raise
    sink.commit()
    took = time.monotonic() - began
    return (tracking.downtime if tracking is not None else took), took


def pre_copy(pid: int, out_dir: str, max_downtime: float, *, log: Log | None = None,
             kill: bool = False, freezer=False, max_rounds: int = MAX_ROUNDS,
             say=lambda line: None) -> PrecopyReport:
    """Write the chain into ``out_dir`` (created if needed; it must hold no images yet) and
    return what each round did. ``max_downtime`` in seconds. CheckpointError as from
    dump.checkpoint (the tree runs on); PrecopyError for a bad directory."""
    log = log or Log()
    if max_downtime <= 0:
        raise PrecopyError(f"the downtime bound must be positive, not {max_downtime * 1000} ms")
    os.makedirs(out_dir, exist_ok=True)
    if glob.glob(os.path.join(out_dir, "*.img")):
        raise PrecopyError(f"{out_dir} already holds images: pre-copy starts a chain in an "
                           "empty directory")
    report = PrecopyReport()
    why = track.unavailable_reason()
    session, launched = None, False
    if why is None:
        try:
            try:
                session = track.connect(pid)
            except track.NoSession:
                session, launched = track.launch(pid), True
        except track.TrackError as e:
            why = str(e)
    path = lambda k: os.path.join(out_dir, f"{k:02d}.img")   # noqa: E731
    try:
        if session is None:
            report.notices.append(f"no tracking ({why}): one full image with the tree stopped")
            say(f"notice: {report.notices[-1]}")
            stopped, took = _round(pid, path(0), None, log, running=False, kill=kill,
                                   freezer=freezer)
            report.rounds.append(Round(path(0), "full", -1, os.path.getsize(path(0)), took, took))
            report.reason = "no tracking session: the only round was a stopped full dump"
            return report
        _run_rounds(pid, session, report, path, max_downtime, log, kill, freezer, max_rounds, say)
        return report
    finally:
        if session is not None:
            if launched or kill:
                try:
                    session.stop()
                except track.TrackError:
                    session.close()
                LastCheckpoint.forget(pid)
            else:
                session.close()


def _run_rounds(pid, session, report, path, max_downtime, log, kill, freezer, max_rounds,
                say) -> None:
    tracking = Tracking.prepare(pid, None, session)
    stopped, took = _round(pid, path(0), tracking, log, running=True, freezer=freezer)
    _check_armed(tracking)
    size = os.path.getsize(path(0))
    report.rounds.append(Round(path(0), "full", size // PAGE, size, stopped, took))
    say(f"round 0: full image, {size} bytes copied while running, stopped {stopped * 1000:.1f} ms")
    rate = size / max(took - stopped, 1e-6)          # bytes per second of a running copy
    last_dirty = None
    k = 1
    while True:
        dirty = sum(len(p.pages) for p in session.dirty().processes.values())
        estimate = stopped + dirty * PAGE / rate
        if estimate <= max_downtime:
            report.reason = (f"{dirty} dirty pages: estimated stop {estimate * 1000:.1f} ms "
                             f"fits {max_downtime * 1000:.1f} ms")
            break
        if last_dirty is not None and dirty >= SHRINK * last_dirty:
            report.reason = (f"the dirty set stopped shrinking ({last_dirty} -> {dirty} pages); "
                             f"estimated stop {estimate * 1000:.1f} ms")
            break
        if k >= max_rounds:
            report.reason = f"{max_rounds} rounds; estimated stop {estimate * 1000:.1f} ms"
            break
        tracking = Tracking.prepare(pid, path(k - 1), session)
        _check_incremental(tracking)
        stopped, took = _round(pid, path(k), tracking, log, running=True, freezer=freezer)
        _check_armed(tracking)
        nbytes = tracking.delta_pages * PAGE
        if took - stopped > 0 and nbytes:
            rate = nbytes / (took - stopped)
        report.rounds.append(Round(path(k), "running", tracking.delta_pages,
                                   os.path.getsize(path(k)), stopped, took))
        say(f"round {k}: {tracking.delta_pages} pages copied while running, stopped "
            f"{stopped * 1000:.1f} ms")
        last_dirty, k = dirty, k + 1
    tracking = Tracking.prepare(pid, path(k - 1), session)
    _check_incremental(tracking)
    stopped, took = _round(pid, path(k), tracking, log, running=False, kill=kill, freezer=freezer)
    report.rounds.append(Round(path(k), "final", tracking.delta_pages, os.path.getsize(path(k)),
                               stopped, took))
    say(f"round {k}: final, {tracking.delta_pages} pages with the tree stopped: downtime "
        f"{stopped * 1000:.1f} ms")


def _check_incremental(tracking: Tracking) -> None:
    if not tracking.incremental:
        raise CheckpointError(errno.EAGAIN, "pre-copy lost its tracking session's state "
                              f"({'; '.join(tracking.notices) or 'no reason given'})")


def _check_armed(tracking: Tracking) -> None:
    if tracking.arm_error or tracking.generation is None:
        raise CheckpointError(errno.EAGAIN, "pre-copy could not re-arm its tracking session: "
                              f"{tracking.arm_error or 'no session'}")

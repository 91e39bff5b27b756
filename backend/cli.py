"""``checkpoint``: the seed's checkpoint(1) for live processes.

    checkpoint PID [-o FILE] [--container] [--freezer] [--leave-running | --kill] [--log FILE] [-v]
               [--track] [--parent IMAGE]
    checkpoint --pre-copy --max-downtime MS PID -o DIR

Writes an image of the process tree at PID (a subtree checkpoint by default) to FILE (mode
0600, replaced atomically) or to standard output. On failure the image ends with an error
record (``ckptinfo -e`` prints it), the tree runs on, and the exit status is 1.

``--track``: a full image, then the tree stays tracked (backend/track.py): a daemon answers at
/run/ckptsim/track-PID.sock what the tree wrote since this checkpoint (printed on stderr). An
existing session of PID is re-armed at this checkpoint instead. Where tracking cannot run (not
root, no eBPF tracker, no PAGEMAP_SCAN or uffd-wp) a one-line notice says so and the exit
status is still 0: later checkpoints are full ones.

``--parent IMAGE``: an incremental image (docs/image-format.md §11) holding only what the tree
wrote since IMAGE, which must be the last checkpoint of PID's tracking session (see
backend/incremental.py); the session is re-armed at this checkpoint. Without a usable session
a one-line notice says why and a full image is written (with tracking armed when possible).

``--pre-copy --max-downtime MS``: a chain of images in DIR written while the tree runs, then a
final one with the tree stopped, as short as the measured copy rate allows (backend/precopy.py);
prints the rounds, their bytes and the downtime. ``restart -i DIR/<newest>`` restores it.
"""
from __future__ import annotations

import argparse
import sys

from ckptsim.cr.context import CheckpointError, Log
from ckptsim.errors import CkptsimError
from ckptsim.image import core
from ckptsim.image.storage import AtomicImageFile


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="checkpoint", description="Checkpoint a live process tree.")
    p.add_argument("pid", type=int)
    p.add_argument("-o", "--output", help="image file (default: standard output)")
    p.add_argument("-c", "--container", action="store_true",
                   help="whole-container checkpoint: PID must be a pid-namespace init; "
                        "fails (EBUSY) if anything is shared with processes outside")
    p.add_argument("--freezer", action="store_true", help="stop the tree with the cgroup freezer")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--leave-running", action="store_true", help="the tree runs on (the default)")
    how.add_argument("--kill", action="store_true", help="kill the tree once the image is written")
    p.add_argument("-l", "--log", help="write debug and error lines to this file")
    p.add_argument("-v", "--verbose", action="store_true", help='print "checkpoint id N"')
    p.add_argument("--track", action="store_true",
                   help="keep tracking the tree's writes after this checkpoint (a session at "
                        "/run/ckptsim/track-PID.sock)")
    p.add_argument("--parent", metavar="IMAGE",
                   help="an incremental image against IMAGE, the tree's last checkpoint "
                        "(needs a session from --track)")
    p.add_argument("--pre-copy", action="store_true",
                   help="write a chain into the directory -o DIR while the tree runs, then "
                        "stop it for the final incremental image")
    p.add_argument("--max-downtime", type=float, metavar="MS",
                   help="--pre-copy: the stop the final image may take, in milliseconds")
    return p


def _tracking_session(pid: int):
    """A client of the session that will be armed at this checkpoint (an existing one of
    ``pid``, else a new daemon), or None after a one-line notice saying why not."""
    from . import track
    why = track.unavailable_reason()
    if why is None:
        try:
            try:
                return track.connect(pid)
            except track.NoSession:
                return track.launch(pid)
        except track.TrackError as e:
            why = str(e)
    print(f"checkpoint: notice: no tracking ({why}): later checkpoints of {pid} will be "
          "full dumps", file=sys.stderr)
    return None


def _report_session(session, pid: int) -> None:
    if session.arm_error:
        print(f"checkpoint: notice: tracking was not armed ({session.arm_error}): later "
              f"checkpoints of {pid} will be full dumps", file=sys.stderr)
        _end_session(session)
        return
    print(f"checkpoint: tracking {pid}: session {session.path} (daemon {session.daemon_pid})",
          file=sys.stderr)
    session.close()


def _end_session(session) -> None:
    from .track import TrackError
    try:
        session.stop()
    except TrackError:
        session.close()


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    log_file = None
    session = None
    try:
        if args.track and args.kill:
            raise CkptsimError("--track keeps tracking a tree that runs on: not with --kill")
        if args.pre_copy:
            return _pre_copy(args)
        if args.max_downtime is not None:
            raise CkptsimError("--max-downtime goes with --pre-copy")
        if args.output is None and sys.stdout.isatty():
            raise CkptsimError("refusing to write an image to a terminal: use -o FILE or a redirection")
        log_file = open(args.log, "w") if args.log else None
        log = Log(log_file.write if log_file else None)
        flags = 0 if args.container else core.CHECKPOINT_SUBTREE
        from .dump import checkpoint  # imported late: it probes nothing until called
        tracking = None
        if args.parent is not None:
            from .incremental import Tracking
            tracking = Tracking.prepare(args.pid, args.parent)
            session = tracking.session
            for line in tracking.notices:
                print(f"checkpoint: notice: {line}", file=sys.stderr)
        elif args.track:
            session = _tracking_session(args.pid)
            if session is not None:
                from .incremental import Tracking
                tracking = Tracking.prepare(args.pid, None, session)
        sink = AtomicImageFile(args.output) if args.output else sys.stdout.buffer
        try:
            crid = checkpoint(args.pid, sink, flags, log, kill=args.kill, freezer=args.freezer,
                              tracking=tracking)
        except CheckpointError as e:
            if isinstance(sink, AtomicImageFile):
                sink.commit()  # the image holds the error record, as Linux-CR's does
            print(f"checkpoint: error: {e.message}", file=sys.stderr)
            print("checkpoint: the image's error record: ckptinfo -e IMAGE", file=sys.stderr)
            return 1
        except BaseException:
            if isinstance(sink, AtomicImageFile):
                sink.abort()
            raise
        if isinstance(sink, AtomicImageFile):
            sink.commit()
        else:
            sink.flush()
        if args.verbose:
            print(f"checkpoint id {crid}", file=sys.stderr)
        if tracking is not None and tracking.incremental:
            pages = tracking.delta_pages
            print(f"checkpoint: incremental image against {tracking.parent.describe()}: "
                  f"{pages} changed pages ({pages * 4096} bytes), stopped "
                  f"{tracking.downtime * 1000:.1f} ms", file=sys.stderr)
        if session is not None:
            session, armed = None, session
            if tracking is not None and tracking.arm_error:
                armed.arm_error = tracking.arm_error
            _report_session(armed, args.pid)
        return 0
    except KeyboardInterrupt:
        print("checkpoint: interrupted; the tree runs on", file=sys.stderr)
        return 130
    except (CkptsimError, OSError) as e:
        print(f"checkpoint: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours: still one line, and the tree was released
        print(f"checkpoint: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 70
    finally:
        if session is not None:         # the checkpoint failed: nothing was armed; a new
            session.close()             # daemon exits when its launcher's connection closes
        if log_file is not None:
            log_file.close()


def _pre_copy(args) -> int:
    from .precopy import PrecopyError, pre_copy
    if args.max_downtime is None or args.max_downtime <= 0:
        raise CkptsimError("--pre-copy needs --max-downtime MS (a positive number)")
    if args.output is None:
        raise CkptsimError("--pre-copy writes a chain of images: give the directory with -o DIR")
    if args.parent or args.track or args.container:
        raise CkptsimError("--pre-copy starts its own chain: not with --parent, --track or --container")
    log_file = open(args.log, "w") if args.log else None
    try:
        report = pre_copy(args.pid, args.output, args.max_downtime / 1000.0,
                          log=Log(log_file.write if log_file else None), kill=args.kill,
                          freezer=args.freezer,
                          say=lambda line: print(f"checkpoint: {line}", file=sys.stderr))
    except (PrecopyError, CheckpointError) as e:
        print(f"checkpoint: error: {getattr(e, 'message', None) or e}", file=sys.stderr)
        return 1
    finally:
        if log_file is not None:
            log_file.close()
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

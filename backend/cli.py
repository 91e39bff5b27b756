"""``checkpoint``: the seed's checkpoint(1) for live processes.

    checkpoint PID [-o FILE] [--container] [--freezer] [--leave-running | --kill] [--log FILE] [-v]

Writes an image of the process tree at PID (a subtree checkpoint by default) to FILE (mode
0600, replaced atomically) or to standard output. On failure the image ends with an error
record (``ckptinfo -e`` prints it), the tree runs on, and the exit status is 1.
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
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    log_file = None
    try:
        if args.output is None and sys.stdout.isatty():
            raise CkptsimError("refusing to write an image to a terminal: use -o FILE or a redirection")
        log_file = open(args.log, "w") if args.log else None
        log = Log(log_file.write if log_file else None)
        flags = 0 if args.container else core.CHECKPOINT_SUBTREE
        from .dump import checkpoint  # imported late: it probes nothing until called
        sink = AtomicImageFile(args.output) if args.output else sys.stdout.buffer
        try:
            crid = checkpoint(args.pid, sink, flags, log, kill=args.kill, freezer=args.freezer)
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
        if log_file is not None:
            log_file.close()


if __name__ == "__main__":
    sys.exit(main())

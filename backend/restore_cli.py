"""``restart``: the seed's restart(1) for live images.

    restart [-i FILE] [--frozen] [--pidns | --no-pidns] [--log FILE] [--wait | --detach | --ghost] [-v]
    restart --self [-i FILE] [--log FILE]

``--self`` (the seed's RESTART_TASKSELF) restarts a one-task image in place of this process:
it becomes the image's program, keeping this process's pid, parent and session (as a shell's
``exec`` would); it returns only if the restart fails before this process was touched.

Reads an image written by ``checkpoint`` (from FILE, or standard input) and rebuilds its tree
as real processes. By default the tree gets a new pid namespace (its pids as in the image) and
the tool waits for it: its exit status is the restored root's (128 + signal if a signal ended
it). ``--detach`` prints the root's pid and returns at once: the tree runs on by itself.
``--ghost`` is the seed's RESTART_GHOST (backend.api.restart): the tool exits with status 0 once
the tree is restored, printing nothing; the tree runs on, orphaned to the tool's nearest child
subreaper (else its pid namespace's init), which waits for it.
``--frozen`` leaves every restored process stopped (SIGSTOP; continue it with SIGCONT).
On failure nothing the restart made is left behind, the reason is one line on standard error,
and the exit status is 1 (2 for bad usage or an unreadable image).
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

from ckptsim.cr.context import RestartError
from ckptsim.errors import CkptsimError, ImageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="restart", description="Restart a live checkpoint image.")
    p.add_argument("-i", "--input", help="image file (default: standard input)")
    p.add_argument("--frozen", action="store_true",
                   help="leave the restored processes stopped (SIGSTOP)")
    ns = p.add_mutually_exclusive_group()
    ns.add_argument("--pidns", dest="pidns", action="store_true", default=True,
                    help="restore in a new pid namespace (the default)")
    ns.add_argument("--no-pidns", dest="pidns", action="store_false",
                    help="restore in this pid namespace (the image's pids must be free)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--wait", action="store_true",
                     help="wait for the restored tree and exit with its root's status (default)")
    how.add_argument("--detach", action="store_true",
                     help="print the root's pid and return; the tree runs on")
    how.add_argument("--ghost", action="store_true",
                     help="RESTART_GHOST: exit (status 0) once the tree is restored; the tree "
                          "runs on, orphaned to the nearest subreaper")
    p.add_argument("--self", action="store_true",
                   help="restart a one-task image in place of this process (RESTART_TASKSELF)")
    p.add_argument("--chain", metavar="DIR",
                   help="where an incremental image's ancestors are (default: the input's "
                        "directory)")
    p.add_argument("-l", "--log", help="write progress lines to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="print timings and pids")
    return p


def _read_input(path: str | None):
    from ckptsim.image.storage import read_image_file
    if path is None:
        if sys.stdin.isatty():
            raise CkptsimError("refusing to read an image from a terminal: use -i FILE or a "
                               "redirection")
        return sys.stdin.buffer.read()
    return read_image_file(path)


def _ghost(args, log_file) -> None:
    """restart(0, fd, RESTART_GHOST) on the input file (or standard input): this process
    exits once the tree is restored."""
    from ckptsim.image import core
    from .api import restart
    if args.input is None and sys.stdin.isatty():
        raise CkptsimError("refusing to read an image from a terminal: use -i FILE or a "
                           "redirection")
    fd = os.open(args.input, os.O_RDONLY | os.O_CLOEXEC) if args.input else 0
    flags = core.RESTART_GHOST | (core.RESTART_FROZEN if args.frozen else 0)
    try:
        restart(0, fd, flags, log_file.fileno() if log_file else -1, pidns=args.pidns)
    finally:
        if fd:
            os.close(fd)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    if args.self and (args.frozen or args.detach or args.ghost or not args.pidns):
        print("restart: error: --self takes no --frozen, --detach, --ghost or --no-pidns (the "
              "image becomes this process)", file=sys.stderr)
        return 2
    log_file = None
    try:
        log_file = open(args.log, "w") if args.log else None
        if args.ghost:
            _ghost(args, log_file)           # returns only on failure, raising
            raise RestartError(errno.EIO, "RESTART_GHOST: the restart returned")
        data = _read_input(args.input)
        if args.self:
            from .restore.self_restart import restart_self
            restart_self(data)               # returns only on failure, raising
        from .restore.job import restart_image
        chain = args.chain or (os.path.dirname(os.path.abspath(args.input)) if args.input
                               else None)
        restored = restart_image(data, pidns=args.pidns, frozen=args.frozen, chain=chain,
                                 log=(lambda m: print(m, file=log_file)) if log_file else None)
    except (ImageError, RestartError, CkptsimError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"restart: error: {msg}", file=sys.stderr)
        # 1: the restart itself failed (a bad image, a refused or failed step); 2: usage,
        # an unreadable input file
        failed = isinstance(e, (ImageError, RestartError)) or type(e).__name__ == "RestoreError"
        return 1 if failed else 2
    except KeyboardInterrupt:
        print("restart: interrupted; nothing was left behind", file=sys.stderr)
        return 130
    finally:
        if log_file is not None:
            log_file.close()
    if args.verbose:
        t = restored.timings
        print(f"restart: {len(restored.pids)} tasks, {restored.pages} pages in "
              f"{t.get('total', 0) + t.get('decode', 0):.3f} s; root pid {restored.root}",
              file=sys.stderr)
    if args.detach:
        print(restored.root)
        sys.stdout.flush()
        return 0
    _, status = os.waitpid(restored.child, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main())

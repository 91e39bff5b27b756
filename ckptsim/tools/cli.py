"""``ckptsim``: the model's command-line tool (scenarios, simulate, replay, demo)."""
from __future__ import annotations

import argparse
import io
import os
import sys

from ..errors import CkptsimError
from ..image.storage import read_image_file, write_image_file


def _conformance_scenarios() -> dict:
    """The conformance suite's scenarios, when its package is installed beside ckptsim."""
    try:
        from conformance.scenario import all_scenarios
    except ImportError:
        return {}
    return {s.name: s for s in all_scenarios()}


def _cmd_scenarios(args) -> int:
    from .scenarios import SCENARIOS
    for name in sorted(SCENARIOS):
        print(f"{name:32} demo       {SCENARIOS[name].summary}")
    for name, scn in sorted(_conformance_scenarios().items()):
        print(f"{name:32} {scn.area:10} {scn.summary}")
    return 0


def _checkpoint_scenario(name: str, seed: int, steps: int | None = None) -> tuple[bytes, object, object]:
    from ..cr.api import checkpoint
    from .scenarios import prepare
    kernel, root = prepare(name, seed, steps)
    buf = io.BytesIO()
    checkpoint(kernel, kernel.init, root.pid.nr_in(kernel.init.ns), buf, 0)
    return buf.getvalue(), kernel, root


def _simulate_conformance(scn) -> bytes:
    from conformance.backend import CheckpointFailed
    from conformance.backends.sim import SimBackend
    backend = SimBackend()
    run = backend.start(scn)
    try:
        return backend.checkpoint(run)
    except CheckpointFailed as e:
        raise CkptsimError(f"scenario {scn.name}: checkpoint failed: {e.message}") from None


def _cmd_simulate(args) -> int:
    from .scenarios import SCENARIOS
    if args.scenario in SCENARIOS:
        data, _, _ = _checkpoint_scenario(args.scenario, args.seed)
    else:
        scn = _conformance_scenarios().get(args.scenario)
        if scn is None:
            raise CkptsimError(f"no scenario {args.scenario!r} (see `ckptsim scenarios`)")
        data = _simulate_conformance(scn)
    write_image_file(args.output, data)
    print(f"wrote {args.output}: {len(data)} bytes")
    return 0


def _cmd_replay(args) -> int:
    from ..cr.incremental import ImageChain
    from ..cr.replay import replay
    data = read_image_file(args.image)
    places = args.parent or [os.path.dirname(os.path.abspath(args.image))
                             if args.image != "-" else os.getcwd()]
    chain = ImageChain([(p, read_image_file(p)) for p in places if not os.path.isdir(p)],
                       [p for p in places if os.path.isdir(p)])
    report = replay(data, roundtrip=args.roundtrip, chain=chain)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.seed, model=args.model)


def _cmd_check(args) -> int:
    """The kernel features the live backend uses: exit 0 when every must-have is present."""
    from backend import features
    found = features.probe()
    print(features.format_table(found))
    missing = [f.name for f in found if f.must_have and not f.present]
    if missing:
        print(f"live checkpoint unavailable: missing {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def _cmd_conformance(args) -> int:
    """Run the conformance suite through pytest (parallel with xdist, junit XML for free)."""
    import os

    try:
        import pytest
    except ImportError:
        raise CkptsimError("the conformance suite needs pytest (pip install 'ckptsim[test]')") from None
    import conformance

    argv = [os.path.dirname(conformance.__file__), "-q", "-p", "no:cacheprovider",
            "--backend", args.backend, "-n", str(args.jobs)]
    if "conformance.plugin" not in _loaded_pytest_plugins():
        argv += ["-p", "conformance.plugin"]
    if args.k:
        argv += ["-k", args.k]
    if args.junit_xml:
        argv += ["--junit-xml", args.junit_xml]
    code = pytest.main(argv)
    return int(code)


def _loaded_pytest_plugins() -> set[str]:
    from importlib.metadata import entry_points
    return {ep.value for ep in entry_points(group="pytest11")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckptsim", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scenarios", help="list the built-in model scenarios")
    s.set_defaults(func=_cmd_scenarios)
    s = sub.add_parser("simulate", help="run a scenario in the model to its checkpoint point and write the image")
    s.add_argument("scenario")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_simulate)
    s = sub.add_parser("replay", help="restore an image into the model and check every invariant")
    s.add_argument("image")
    s.add_argument("--roundtrip", action="store_true", help="checkpoint again and compare the "
                   "bytes (an incremental image: again against the same parent)")
    s.add_argument("--parent", action="append", default=[], metavar="PATH",
                   help="an incremental image's ancestors: an image file or a directory of "
                        "images (repeatable; default: the image's directory)")
    s.set_defaults(func=_cmd_replay)
    s = sub.add_parser("conformance", help="run the C/R conformance suite on a backend")
    s.add_argument("--backend", choices=("sim", "live"), default="sim")
    s.add_argument("-k", metavar="PATTERN", help="only scenarios matching PATTERN (pytest -k)")
    s.add_argument("--junit-xml", metavar="FILE", help="also write a JUnit XML report")
    s.add_argument("-j", "--jobs", default="auto", help="parallel workers (default: auto)")
    s.set_defaults(func=_cmd_conformance)
    s = sub.add_parser("check", help="probe the kernel features the live backend uses")
    s.set_defaults(func=_cmd_check)
    s = sub.add_parser("demo", help="checkpoint, kill and restart the built-in example "
                                     "(real processes when the live backend can run here)")
    s.add_argument("--model", action="store_true",
                   help="the model's demo, even where the live one can run")
    s.add_argument("--seed", type=int, default=0, help="the model demo's seed")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    except BrokenPipeError:  # the reader went away (``ckptsim scenarios | head``)
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141
    except KeyboardInterrupt:
        print("ckptsim: interrupted", file=sys.stderr)
        return 130
    except (CkptsimError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ckptsim: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

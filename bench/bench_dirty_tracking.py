"""What write-protect dirty tracking (backend/dirty.py) costs the tracked process.

    PYTHONPATH=. .venv/bin/python bench/bench_dirty_tracking.py [--pages N] [--rounds R]

A C target (tests/backend/targets/dirty_target.c, compiled with gcc unless --exe is given)
populates N pages, then, once per round, writes one byte in each of them and times that loop
itself (clock_gettime around it: no pipe or Python in the measurement). Untracked rounds
first; then the target is seized, a WriteTracker set up and released, and each tracked round
is preceded by written_pages() (which reprotects every page, so every write of the round is
a first write after protection and takes a write-protect fault). Prints ns per page written,
untracked and tracked, the setup time and the scan time; checks that every tracked round
reports exactly the N pages (exit 1 if not). Not a test of speed: nothing fails on timing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend import ptrace                       # noqa: E402
from backend.dirty import WriteTracker           # noqa: E402
from backend.memory_pages import PAGE_SIZE       # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "tests", "backend", "targets", "dirty_target.c")


def _ask(proc, line: str) -> str:
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()
    reply = proc.stdout.readline().decode().strip()
    if not reply:
        raise RuntimeError(f"target {proc.pid} did not answer {line!r}")
    return reply


def measure(exe: str, data_file: str, pages: int, rounds: int) -> dict:
    proc = subprocess.Popen([exe, data_file], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    tracker = None
    try:
        if not proc.stdout.readline().startswith(b"READY"):
            raise RuntimeError("the target did not start")
        base = int(_ask(proc, f"b {pages}").split("=")[1], 16)
        untracked = [int(_ask(proc, "t").split("=")[1]) for _ in range(rounds)]
        t0 = time.perf_counter()
        with ptrace.seized(proc.pid):
            tracker = WriteTracker(proc.pid)
        setup = time.perf_counter() - t0
        tracked, scans, counts = [], [], []
        for _ in range(rounds):
            tracker.written_pages()                   # reprotect everything
            tracked.append(int(_ask(proc, "t").split("=")[1]))
            t0 = time.perf_counter()
            written = tracker.written_pages()
            scans.append(time.perf_counter() - t0)
            end = base + pages * PAGE_SIZE
            counts.append(sum(1 for a in written if base <= a < end))
        return {"pages": pages, "untracked_ns": min(untracked), "tracked_ns": min(tracked),
                "setup_s": setup, "scan_s": min(scans), "counts": counts}
    finally:
        if tracker is not None:
            tracker.close()
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            f.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, action="append")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--exe", help="a built dirty_target (default: compile it)")
    ap.add_argument("--file", help="a file of at least 8 pages for the target")
    args = ap.parse_args(argv)
    sizes = args.pages or [1024, 16384, 131072]
    with tempfile.TemporaryDirectory() as tmp:
        exe = args.exe
        if exe is None:
            gcc = shutil.which("gcc")
            if gcc is None:
                print("gcc is not installed: cannot build the target", file=sys.stderr)
                return 2
            exe = os.path.join(tmp, "dirty_target")
            subprocess.run([gcc, "-O1", "-o", exe, SRC], check=True)
        data = args.file
        if data is None:
            data = os.path.join(tmp, "data")
            with open(data, "wb") as f:
                f.write(b"\1" * 8 * PAGE_SIZE)
        ok = True
        print(f"{'pages':>8} {'untracked ns/page':>18} {'tracked ns/page':>16} {'x':>6} "
              f"{'setup ms':>9} {'scan ms':>8}")
        for n in sizes:
            r = measure(exe, data, n, args.rounds)
            u, t = r["untracked_ns"] / n, r["tracked_ns"] / n
            print(f"{n:>8} {u:>18.1f} {t:>16.1f} {t / u:>6.1f} {r['setup_s'] * 1e3:>9.2f} "
                  f"{r['scan_s'] * 1e3:>8.2f}")
            if any(c != n for c in r["counts"]):
                print(f"  tracked rounds reported {r['counts']} pages, not {n}", file=sys.stderr)
                ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

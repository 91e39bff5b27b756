"""What a tracking session (backend/track.py: userfaultfd-wp + the eBPF tracker) costs the
tracked process's own run time.

    PYTHONPATH=. .venv/bin/python bench/bench_tracking.py [--mib 1024] [--rounds 10] [--reps 2]
    PYTHONPATH=. .venv/bin/python bench/bench_tracking.py --quick          # 256 MiB, 2 rounds, 1 rep

The target (C, built here with gcc) maps and populates MIB MiB of private anonymous memory,
then runs a fixed workload: ROUNDS rounds, each 100 slices of calibrated compute (about 10 ms
each, so a round takes about 1 s untracked) and, after each slice, writes to 1/100 of a round's
share of pages: 1% of the memory per round, pages picked by an LCG (so about 1% of 1 GiB per
second). It times the whole workload itself (CLOCK_MONOTONIC and its CPU time), so no pipe or
Python is measured. Three ways, in rotating order, each REPS times:

- untracked: no session;
- tracked: a session armed on the stopped target (``TrackClient.rearm``: the checkpoint hook's
  arming, without writing an image), then the workload; nothing else;
- tracked + rearm/s: the same, and once a second the bench stops the target (ptrace), asks
  ``dirty`` and ``rearm``s (what each incremental checkpoint adds, its dump excluded), so
  every round's writes are first writes after protection again.

Prints the best run time of each way, the ratio to untracked (the issue's target: at most
1.10), the stop time per rearm, and checks (exit 1 if not) that each tracked run's dirty set
holds every page the workload wrote and that the uffd and BPF sets agree inside the
protected ranges. Nothing fails on timing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend import ptrace, track                # noqa: E402

PAGE = 4096
SLICES = 100
TARGET_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static unsigned long long now(clockid_t c)
{
    struct timespec t;
    clock_gettime(c, &t);
    return t.tv_sec * 1000000000ULL + t.tv_nsec;
}

static unsigned work[16384];                    /* 64 KiB: stays in cache */

static unsigned compute(long iters)
{
    unsigned x = 2463534242u, s = 0;
    for (long i = 0; i < iters; i++) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        work[x & 16383] += x;
        s += work[(x >> 7) & 16383];
    }
    return s;
}

int main(int argc, char **argv)
{
    size_t pages = (size_t)atol(argv[1]) << 8;
    unsigned char *mem = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return 2;
    madvise(mem, pages * 4096, MADV_NOHUGEPAGE);  /* 4 KiB pages whatever THP says */
    for (size_t i = 0; i < pages; i++)
        mem[i * 4096] = 1;
    long iters = 1 << 16;                          /* calibrate: iters per 10 ms */
    for (;;) {
        unsigned long long t0 = now(CLOCK_MONOTONIC);
        compute(iters);
        if (now(CLOCK_MONOTONIC) - t0 > 5000000)
            break;
        iters *= 2;
    }
    unsigned long long t0 = now(CLOCK_MONOTONIC);
    compute(iters);
    iters = (long)(iters * (10000000.0 / (now(CLOCK_MONOTONIC) - t0)));
    printf("READY mem=%p pages=%zu iters=%ld\n", (void *)mem, pages, iters);
    fflush(stdout);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        long rounds, slices, it;
        unsigned long long seed;
        if (sscanf(line, "t %ld %ld %ld %llu", &rounds, &slices, &it, &seed) != 4)
            break;
        size_t per_slice = pages / 100 / slices;
        unsigned long long x = seed, w0 = now(CLOCK_MONOTONIC);
        unsigned long long c0 = now(CLOCK_PROCESS_CPUTIME_ID);
        unsigned sink = 0;
        for (long r = 0; r < rounds; r++)
            for (long s = 0; s < slices; s++) {
                sink += compute(it);
                for (size_t k = 0; k < per_slice; k++) {
                    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
                    mem[((x >> 33) % pages) * 4096 + 8]++;
                }
            }
        printf("NS=%llu CPU=%llu SINK=%u\n", now(CLOCK_MONOTONIC) - w0,
               now(CLOCK_PROCESS_CPUTIME_ID) - c0, sink);
        fflush(stdout);
    }
    return 0;
}
"""


def written_pages(base: int, pages: int, rounds: int, seed: int) -> set[int]:
    """The addresses the target's LCG writes in one workload (the same arithmetic)."""
    per_slice = pages // 100 // SLICES
    x, out, mask = seed, set(), (1 << 64) - 1
    for _ in range(rounds * SLICES * per_slice):
        x = (x * 6364136223846793005 + 1442695040888963407) & mask
        out.add(base + ((x >> 33) % pages) * PAGE)
    return out


class Target:
    def __init__(self, exe: str, mib: int):
        self.proc = subprocess.Popen([exe, str(mib)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        line = self.proc.stdout.readline().decode().split()
        if not line or line[0] != "READY":
            raise RuntimeError("the target did not start")
        info = {k: int(v, 0) for k, v in (item.split("=") for item in line[1:])}
        self.pid, self.base, self.pages, self.iters = (self.proc.pid, info["mem"],
                                                       info["pages"], info["iters"])

    def run(self, rounds: int, seed: int) -> tuple[float, float]:
        self.proc.stdin.write(f"t {rounds} {SLICES} {self.iters} {seed}\n".encode())
        self.proc.stdin.flush()
        fields = dict(f.split("=") for f in self.proc.stdout.readline().decode().split())
        return int(fields["NS"]) / 1e9, int(fields["CPU"]) / 1e9

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


def _check(report, target: Target, expected: set[int], problems: list[str], way: str):
    p = report.processes.get(target.pid)
    if p is None:
        problems.append(f"{way}: the target is not in the dirty answer")
        return
    got = {a for a in p.pages if target.base <= a < target.base + target.pages * PAGE}
    if not expected <= got:
        problems.append(f"{way}: {len(expected - got)} written pages missing from dirty")
    if list(p.uffd_pages) != list(p.bpf_in_covered()):
        problems.append(f"{way}: uffd and BPF sets differ "
                        f"({len(p.uffd_pages)} vs {len(p.bpf_in_covered())} pages)")


def tracked_run(target: Target, rounds: int, seed: int, rearm_every: float | None,
                problems: list[str]) -> tuple[float, float, list[float]]:
    client = track.launch(target.pid)
    stops: list[float] = []
    done = threading.Event()
    expected = written_pages(target.base, target.pages, rounds, seed)
    union: set[int] = set()

    def rearm_loop():
        while not done.wait(rearm_every):
            t0 = time.perf_counter()
            with ptrace.seized(target.pid) as seized:
                union.update(client.dirty().processes[target.pid].pages)
                client.rearm(seized)
            stops.append(time.perf_counter() - t0)

    try:
        with ptrace.seized(target.pid) as seized:
            client.rearm(seized)
        helper = threading.Thread(target=rearm_loop, daemon=True) if rearm_every else None
        if helper:
            helper.start()
        wall, cpu = target.run(rounds, seed)
        done.set()
        if helper:
            helper.join()
        with ptrace.seized(target.pid):
            report = client.dirty()
        if rearm_every:      # what the successive checkpoints took, then the last answer
            for p in report.processes.values():
                union.update(p.pages)
            got = {a for a in union if target.base <= a < target.base + target.pages * PAGE}
            if not expected <= got:
                problems.append(f"tracked + rearm: {len(expected - got)} written pages "
                                "missing from the dirty answers")
        else:
            _check(report, target, expected, problems, "tracked")
    finally:
        done.set()
        client.stop()
    return wall, cpu, stops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=10, help="about 1 s each untracked")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="256 MiB, 2 rounds, 1 rep (still "
                    "more than one PAGEMAP_SCAN vector of written runs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.mib, args.rounds, args.reps = 256, 2, 1
    why = track.unavailable_reason()
    if why:
        print(f"tracking cannot run here: {why}", file=sys.stderr)
        return 2
    gcc = shutil.which("gcc")
    if gcc is None:
        print("gcc is needed to build the target", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="bench-tracking-")
    src, exe = os.path.join(tmp, "target.c"), os.path.join(tmp, "target")
    with open(src, "w") as f:
        f.write(TARGET_C)
    subprocess.run([gcc, "-O2", "-o", exe, src], check=True)
    ways = ["untracked", "tracked", "tracked + rearm/s"]
    results: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
    stops: list[float] = []
    problems: list[str] = []
    target = Target(exe, args.mib)
    try:
        for rep in range(args.reps):
            for i in range(len(ways)):
                way = ways[(i + rep) % len(ways)]
                seed = 12345 + rep * 7 + i
                if way == "untracked":
                    results[way].append(target.run(args.rounds, seed))
                else:
                    wall, cpu, s = tracked_run(target, args.rounds, seed,
                                               1.0 if "rearm" in way else None, problems)
                    results[way].append((wall, cpu))
                    stops.extend(s)
    finally:
        target.end()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"target: {args.mib} MiB populated, {args.rounds} rounds of ~1 s, each writing 1% "
          f"of the pages ({target.pages // 100} pages); best of {args.reps}")
    base_wall = min(r[0] for r in results["untracked"])
    base_cpu = min(r[1] for r in results["untracked"])
    print(f"{'way':<20} {'run s':>8} {'ratio':>7} {'cpu s':>8} {'cpu ratio':>9}")
    for way in ways:
        wall, cpu = min(r[0] for r in results[way]), min(r[1] for r in results[way])
        print(f"{way:<20} {wall:8.3f} {wall / base_wall:7.3f} {cpu:8.3f} {cpu / base_cpu:9.3f}")
    if stops:
        print(f"rearm stops: {len(stops)}, median {sorted(stops)[len(stops) // 2] * 1000:.1f} "
              f"ms, max {max(stops) * 1000:.1f} ms (target stopped for dirty + rearm)")
    for p in problems:
        print(f"CHECK FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

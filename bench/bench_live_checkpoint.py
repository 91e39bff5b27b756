#!/usr/bin/env python3
"""Live checkpoint speed: the FULL checkpoint path against the raw process_vm_readv limit.

    .venv/bin/python bench/bench_live_checkpoint.py            # targets of 64 MiB, 256 MiB and 1 GiB
    .venv/bin/python bench/bench_live_checkpoint.py --quick    # 64 MiB only
    .venv/bin/python bench/bench_live_checkpoint.py --dir DIR  # write the images elsewhere (/dev/shm)

The target is bench_live_dump.py's: a Python child that maps N bytes of private anonymous
memory and writes every page (each page holds the same non-zero 4 KiB pattern). For each
size, alternating, best of --repeat:
  checkpoint: backend.dump.checkpoint(pid, open(FILE, "wb")) in a FRESH Python subprocess
         (so that its VmHWM is the checkpoint's own peak: interpreter, imports, gathering and
         streaming, nothing the bench allocated). It times the call, and the interval during
         which the tree is seized (the whole ``ptrace.seized`` block: seizing, gathering,
         writing, detaching), by wrapping backend.ptrace.seized.
  raw:   bench_live_dump.raw(): process_vm_readv of the same page ranges into one reused
         4 MiB buffer, each batch written to a file on the same file system (the limit).
It reports MB/s of page data (MB = 10^6 bytes), the seized time, the ratio checkpoint/raw
speed, and the checkpointer's peak RSS (VmHWM of the subprocess), next to that of a fresh
subprocess that only imports the same modules. Targets: ratio >= 0.7, peak < 64 MiB.
Not a test: it fails only when what it measured is wrong (an image that does not decode, or
whose pages of the target's block are missing or differ from the pattern).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

import bench_live_dump as base                                   # noqa: E402
from backend.memory import PAGE_SIZE                             # noqa: E402

MiB = 1 << 20
PATTERN = bytes((i * 7 + 1) % 251 + 1 for i in range(4096))      # every page of the block


# -- the checkpointer (a fresh subprocess) ---------------------------------------------------
def child(pid: int, path: str) -> int:
    """Run one checkpoint of ``pid`` into ``path``; print JSON timings and VmHWM."""
    from backend import ptrace
    from backend.dump import checkpoint
    times: dict[str, float] = {}
    if pid:
        seized = ptrace.seized

        @contextlib.contextmanager
        def timed(*args, **kwargs):
            times["enter"] = time.perf_counter()
            try:
                with seized(*args, **kwargs) as s:
                    yield s
            finally:
                times["exit"] = time.perf_counter()

        ptrace.seized = timed
        with open(path, "wb") as sink:
            t0 = time.perf_counter()
            checkpoint(pid, sink)
            t1 = time.perf_counter()
        if "exit" not in times:
            raise SystemExit("the checkpoint did not go through backend.ptrace.seized")
    else:
        t0 = t1 = times["enter"] = times["exit"] = 0.0
    print(json.dumps({"ckpt_s": t1 - t0, "seized_s": times["exit"] - times["enter"],
                      "hwm": base.vm_hwm()}))
    return 0


def run_child(pid: int, path: str) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(pid), path],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"checkpoint of {pid} failed:\n{r.stderr.strip()}")
    return json.loads(r.stdout)


# -- checking what was measured --------------------------------------------------------------
def check_image(path: str, lo: int, hi: int) -> int:
    """Decode the image (framing, objrefs, tail checksum) and check that every page of the
    target's block [lo, hi) is in it, holding the pattern. Returns the pages in the image."""
    from ckptsim.image.codec import ImageReader
    from ckptsim.kinds import load_all
    load_all()                          # every kind's record layouts
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    reader = ImageReader(m)
    total = in_block = 0
    pattern = memoryview(PATTERN)
    for rec in reader.records():
        if rec.layout.name != "BUFFER":
            continue
        n = len(rec.var) // (8 + PAGE_SIZE)
        addrs = rec.var[:8 * n].cast("Q")
        data = rec.var[8 * n:]
        total += n
        for k in range(n):
            if lo <= addrs[k] < hi:
                if data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] != pattern:
                    raise SystemExit(f"page {addrs[k]:#x} of the block differs")
                in_block += 1
    reader.finish()
    del reader, rec, addrs, data
    m.close()
    if in_block != (hi - lo) // PAGE_SIZE:
        raise SystemExit(f"the image holds {in_block} pages of the block, not {(hi - lo) // PAGE_SIZE}")
    return total


def bench_size(nbytes: int, outdir: str, repeat: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", base.TARGET, str(nbytes)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    path = os.path.join(outdir, f"bench-live-ckpt-{os.getpid()}.img")
    try:
        line = proc.stdout.readline().split()
        if len(line) != 2:
            raise RuntimeError(f"target exited with {proc.wait()}")
        lo = int(line[0])
        hi = lo + int(line[1])
        pid = proc.pid
        ranges = base.ranges_of(pid)
        best_ckpt = best_raw = best_seized = float("inf")
        hwm = 0
        pages_raw = 0
        for i in range(2 * repeat):          # alternate which one goes first
            if (i + i // 2) % 2 == 0:
                pages_raw, t, _crc = base.raw(pid, ranges, path)
                best_raw = min(best_raw, t)
            else:
                r = run_child(pid, path)
                best_ckpt = min(best_ckpt, r["ckpt_s"])
                best_seized = min(best_seized, r["seized_s"])
                hwm = max(hwm, r["hwm"])
                pages_img = check_image(path, lo, hi)
                image_size = os.path.getsize(path)
            os.unlink(path)
        idle = run_child(0, path)["hwm"]
        data = pages_raw * PAGE_SIZE
        return {"size": nbytes, "pages": pages_raw, "pages_img": pages_img,
                "image": image_size, "ckpt_s": best_ckpt, "raw_s": best_raw,
                "ckpt_mbs": data / best_ckpt / 1e6, "raw_mbs": data / best_raw / 1e6,
                "seized_s": best_seized, "ratio": best_raw / best_ckpt, "hwm": hwm,
                "idle_hwm": idle}
    finally:
        if os.path.exists(path):
            os.unlink(path)
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(int(argv[1]), argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB only")
    ap.add_argument("--dir", default="/dev/shm", help="where the images go (default /dev/shm)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per size, best kept")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.dir):
        print(f"bench_live_checkpoint: {args.dir} is not a directory", file=sys.stderr)
        return 2
    sizes = [64 * MiB] if args.quick else [64 * MiB, 256 * MiB, 1024 * MiB]
    print(f"images into {args.dir}, best of {args.repeat}; MB = 10^6 bytes of page data")
    print("| target | pages | image MB | ckpt s | ckpt MB/s | raw s | raw MB/s | ratio "
          "| seized s | peak RSS (idle) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        r = bench_size(size, args.dir, args.repeat)
        print(f"| {size // MiB} MiB | {r['pages']:,} | {r['image'] / 1e6:,.1f} "
              f"| {r['ckpt_s']:.3f} | {r['ckpt_mbs']:,.0f} | {r['raw_s']:.3f} "
              f"| {r['raw_mbs']:,.0f} | {r['ratio']:.2f} | {r['seized_s']:.3f} "
              f"| {r['hwm'] / MiB:.1f} MiB ({r['idle_hwm'] / MiB:.1f}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Live memory dump speed: backend/memory.py against the raw process_vm_readv limit.

    .venv/bin/python bench/bench_live_dump.py            # targets of 64 MiB, 256 MiB and 1 GiB
    .venv/bin/python bench/bench_live_dump.py --quick    # 64 MiB only
    .venv/bin/python bench/bench_live_dump.py --dir DIR  # write the dumps elsewhere (default /dev/shm)

A target is a Python child that maps N bytes of private anonymous memory and writes every
page with non-zero data. For each size the target is stopped with SIGSTOP (and resumed with
SIGCONT on every path) and dumped, best of 3, in two ways into a file on tmpfs:
  dump:  what the checkpoint does: read_smaps, classify every VMA, pages_to_dump (PAGEMAP_SCAN)
         and the bulk reads of ProcessMemory.dump_vma_pages, each chunk written with one
         os.writev (its 8-byte page addresses, then the page data);
  raw:   the limit: process_vm_readv of the same page ranges (known beforehand, so no /proc
         or pagemap work is timed) into one reused 4 MiB buffer, each batch written with
         os.write to the same file system.
It reports MB/s of page data (MB = 10^6 bytes), the time the target stays stopped (SIGSTOP
to SIGCONT, the dump inside), the ratio dump/raw, and this process's peak RSS (VmHWM), an
upper bound of the dumper's own memory. Targets: ratio >= 0.7, peak RSS < 64 MiB.
Not a test: it fails only when what it measured is wrong (page counts that differ, a dump
whose bytes differ from the raw copy).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend import kabi                                        # noqa: E402
from backend.memory import (CHUNK_PAGES, PAGE_SIZE, ProcessMemory, classify,  # noqa: E402
                            dump_kinds)
from backend.proc import read_smaps, read_stat                  # noqa: E402

MiB = 1 << 20

TARGET = r"""
import mmap, sys
n = int(sys.argv[1])
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
block = bytes((i * 7 + 1) % 251 + 1 for i in range(4096)) * 256          # 1 MiB, no zero page
for off in range(0, n, len(block)):
    m[off:off + len(block)] = block[:n - off]
import ctypes
sys.stdout.write("%d %d\n" % (ctypes.addressof(ctypes.c_char.from_buffer(m)), n))
sys.stdout.flush()
sys.stdin.read()
"""

_libc = ctypes.CDLL(None, use_errno=True)
_pvr = _libc.process_vm_readv
_pvr.restype = ctypes.c_ssize_t
_pvr.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                 ctypes.c_ulong, ctypes.c_ulong]


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def stop(pid: int) -> float:
    """SIGSTOP and wait until the kernel shows the stop; returns the time SIGSTOP was sent."""
    t = time.perf_counter()
    os.kill(pid, signal.SIGSTOP)
    while read_stat(pid).state != "T":
        time.sleep(0.0005)
    return t


def dump(pid: int, path: str) -> tuple[int, float, float, int]:
    """(pages, dump seconds, stopped seconds, crc of the page data) of one checkpoint-style
    dump of every VMA."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    pages = 0
    crc = 0
    t_stop = stop(pid)
    try:
        t0 = time.perf_counter()
        with ProcessMemory(pid) as pm:
            def emit(addrs, data):
                nonlocal crc
                os.writev(fd, [addrs, data])
                if CHECK:
                    crc = check_crc(crc, addrs, data)
            for vma in read_smaps(pid):
                if classify(vma).kind in dump_kinds():
                    pages += pm.dump_vma_pages(vma, emit, drop_zero=False)
        t1 = time.perf_counter()
    finally:
        os.kill(pid, signal.SIGCONT)
        t_cont = time.perf_counter()
        os.close(fd)
    return pages, t1 - t0, t_cont - t_stop, crc


def ranges_of(pid: int) -> list[tuple[int, int]]:
    out = []
    with ProcessMemory(pid) as pm:
        for vma in read_smaps(pid):
            if classify(vma).kind in dump_kinds():
                out.extend(pm.regions(vma))
    return out


def raw(pid: int, ranges, path: str) -> tuple[int, float, int]:
    """(pages, seconds, crc): process_vm_readv of ``ranges`` in 4 MiB batches, each written."""
    size = CHUNK_PAGES * PAGE_SIZE
    buf = bytearray(size)
    view = memoryview(buf)
    local = kabi.iovec(ctypes.addressof(ctypes.c_char.from_buffer(buf)), size)
    remote = (kabi.iovec * CHUNK_PAGES)()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    pages = crc = 0
    stop(pid)
    try:
        t0 = time.perf_counter()
        n = filled = 0

        def flush():
            nonlocal n, filled, crc
            local.iov_len = filled
            got = _pvr(pid, ctypes.byref(local), 1, remote, n, 0)
            if got != filled:
                raise OSError(ctypes.get_errno(), f"process_vm_readv read {got} of {filled}")
            os.write(fd, view[:filled])
            if CHECK:
                addrs = [a + k for j in range(n)
                         for a in [remote[j].iov_base]
                         for k in range(0, remote[j].iov_len, PAGE_SIZE)]
                crc = check_crc(crc, addrs, view[:filled])
            n = filled = 0
        for a, b in ranges:
            while a < b:
                take = min(b - a, size - filled)
                remote[n].iov_base, remote[n].iov_len = a, take
                n += 1
                filled += take
                a += take
                pages += take // PAGE_SIZE
                if filled == size or n == CHUNK_PAGES:
                    flush()
        if n:
            flush()
        t1 = time.perf_counter()
    finally:
        os.kill(pid, signal.SIGCONT)
        os.close(fd)
    return pages, t1 - t0, crc


CHECK = False
REGION = (0, 0)     # the target's filled block: [start, end)


def check_crc(crc: int, addrs, data) -> int:
    """CRC-32 over the pages of ``data`` that lie in REGION, in address order. Only the
    target's own block is compared: the kernel itself writes some pages of a task that runs
    between two dumps (the rseq area's cpu_id when it moves to another CPU)."""
    lo, hi = REGION
    for k, a in enumerate(addrs):
        if lo <= a < hi:
            crc = zlib.crc32(data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE], crc)
    return crc


def bench_size(nbytes: int, outdir: str, repeat: int) -> dict:
    global CHECK, REGION
    proc = subprocess.Popen([sys.executable, "-c", TARGET, str(nbytes)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    path = os.path.join(outdir, f"bench-live-dump-{os.getpid()}.img")
    try:
        line = proc.stdout.readline().split()
        if len(line) != 2:
            raise RuntimeError(f"target exited with {proc.wait()}")
        REGION = (int(line[0]), int(line[0]) + int(line[1]))
        pid = proc.pid
        ranges = ranges_of(pid)
        best_dump = best_raw = best_stop = float("inf")
        pages_dump = pages_raw = 0
        for i in range(2 * repeat):          # alternate which one goes first
            if (i + i // 2) % 2 == 0:
                pages_raw, t, _crc = raw(pid, ranges, path)
                best_raw = min(best_raw, t)
            else:
                pages_dump, t, stopped, _crc = dump(pid, path)
                best_dump = min(best_dump, t)
                best_stop = min(best_stop, stopped)
            os.unlink(path)
        # what was measured must be right: the same pages, the same bytes
        CHECK = True
        try:
            p1, _, c1 = raw(pid, ranges, path)
            os.unlink(path)
            p2, _, _, c2 = dump(pid, path)
            os.unlink(path)
        finally:
            CHECK = False
        if not (p1 == p2 == pages_dump == pages_raw) or c1 != c2 or c1 == 0:
            raise SystemExit(f"dump and raw copy differ: pages {p1}/{p2}, crc {c1:#x}/{c2:#x}")
        if pages_dump * PAGE_SIZE < nbytes:
            raise SystemExit(f"dumped {pages_dump} pages, fewer than the {nbytes // PAGE_SIZE} "
                             "the target touched")
        data = pages_dump * PAGE_SIZE
        return {"size": nbytes, "pages": pages_dump, "dump_s": best_dump, "raw_s": best_raw,
                "dump_mbs": data / best_dump / 1e6, "raw_mbs": data / best_raw / 1e6,
                "stopped_s": best_stop, "ratio": best_raw / best_dump, "hwm": vm_hwm()}
    finally:
        if os.path.exists(path):
            os.unlink(path)
        try:
            os.kill(proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB only")
    ap.add_argument("--dir", default="/dev/shm", help="where the dumps go (default /dev/shm)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per size, best kept")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.dir):
        print(f"bench_live_dump: {args.dir} is not a directory", file=sys.stderr)
        return 2
    sizes = [64 * MiB] if args.quick else [64 * MiB, 256 * MiB, 1024 * MiB]
    print(f"dump into {args.dir}, best of {args.repeat}; MB = 10^6 bytes of page data")
    print("| target | pages | dump s | dump MB/s | raw s | raw MB/s | ratio | stopped s "
          "| peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        r = bench_size(size, args.dir, args.repeat)
        print(f"| {size // MiB} MiB | {r['pages']:,} | {r['dump_s']:.3f} | {r['dump_mbs']:,.0f} "
              f"| {r['raw_s']:.3f} | {r['raw_mbs']:,.0f} | {r['ratio']:.2f} "
              f"| {r['stopped_s']:.3f} | {r['hwm'] / MiB:.1f} MiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

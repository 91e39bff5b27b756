#!/usr/bin/env python3
"""Live restart speed: restart_image against the raw process_vm_writev limit.

    .venv/bin/python bench/bench_live_restart.py            # targets of 64 MiB, 256 MiB and 1 GiB
    .venv/bin/python bench/bench_live_restart.py --quick    # 64 MiB only
    .venv/bin/python bench/bench_live_restart.py --profile  # also cProfile one restart per size
    .venv/bin/python bench/bench_live_restart.py --dir DIR  # images elsewhere (default /dev/shm)

The target is a small C program (compiled here with gcc) that maps N bytes of private
anonymous memory, writes every 8 bytes of it (a pattern of the offset: no zero page) and
pauses. It is checkpointed once with kill=True into an image on tmpfs. Then, alternating,
best of --repeat, each in a FRESH Python subprocess (so that its VmHWM is its own):
  restart: backend.restore.job.restart_image(read_image_file(IMAGE)), timed from the call
           to its return (the tree is detached and running: "time to a running process");
           the image is mmap'd as the restart tool does. Afterwards (not timed) the block of
           the restored process is read back and its CRC compared with the original's; then
           the tree is ended by pid (its namespace init, SIGKILL, waited for).
  raw:     the limit: the image decoded (not timed) into the same page chunks the restart
           writes; a fresh process (the same C program, `hold` mode) maps the same anonymous
           VMAs (at the same addresses where free, elsewhere otherwise, with the same runs);
           then only the process_vm_writev calls are timed: one per chunk, with the same
           iovecs (local: the chunk in the mmap'd image; remote: its page runs). The issue's
           target is the ratio to this. Then, in a second fresh holder, the same runs by
           UFFDIO_COPY (one ioctl per run, the VMAs registered before the timer starts): the
           limit of the way the restart writes the long runs of anonymous memory.
It reports MB/s of page data (MB = 10^6 bytes), the ratio restart/raw speed (target >= 0.7),
the restorer's peak RSS (VmHWM: note that the image's tmpfs pages it reads count in it, as
RssShmem, since process_vm_writev reads them through the mapping) with its RssAnon and
RssShmem at the end, and restart_image's own step timings.
Not a test: it fails only when what it measured is wrong (a restored block whose CRC differs,
page counts that differ between the restart and the raw copy).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))

MiB = 1 << 20
PAGE = 4096

TARGET_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "hold")) {      /* hold START:LEN ...: map, print, wait */
        /* first line: the fd of a userfaultfd of this mm (O_CLOEXEC | UFFD_USER_MODE_ONLY) */
        printf("%ld\n", (long)syscall(SYS_userfaultfd, 02000000 | 1));
        for (int i = 2; i < argc; i++) {
            unsigned long start, len;
            sscanf(argv[i], "%lx:%lx", &start, &len);
            void *p = mmap((void *)start, len, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
            if (p == MAP_FAILED)
                p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) { perror("mmap"); return 1; }
            printf("%lx\n", (unsigned long)p);
        }
        fflush(stdout);
        for (;;) pause();
    }
    size_t n = (size_t)atol(argv[1]);
    uint64_t *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 1; }
    for (size_t i = 0; i < n / 8; i++)
        p[i] = (i * 0x9E3779B97F4A7C15ull) | 1;
    printf("%lx %zu\n", (unsigned long)p, n);
    fflush(stdout);
    for (;;) pause();
}
"""


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def vm_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def block_crc(pid: int, lo: int, hi: int) -> int:
    """CRC-32 of [lo, hi) of ``pid``, read from /proc/PID/mem in 4 MiB pieces."""
    crc = 0
    buf = bytearray(4 * MiB)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for off in range(lo, hi, len(buf)):
            n = os.preadv(fd, [memoryview(buf)[:min(len(buf), hi - off)]], off)
            crc = zlib.crc32(memoryview(buf)[:n], crc)
    finally:
        os.close(fd)
    return crc


def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, _ = os.waitpid(pid, os.WNOHANG)
        if got:
            return
        time.sleep(0.002)
    raise SystemExit(f"process {pid} did not exit")


# -- the restart (a fresh subprocess) --------------------------------------------------------
def child_restart(path: str, lo: int, hi: int, crc: int, profile: bool, view: bool) -> int:
    from backend.restore.job import preload, restart_image
    from ckptsim.image.storage import read_image_file
    t_import = time.perf_counter()
    preload()              # the first use's imports: timed apart (the restart tool pays them)
    import_s = time.perf_counter() - t_import
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
    data = read_image_file(path)
    if view:                         # what a caller passing a buffer view gets: no copy
        data = memoryview(data)
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    restored = restart_image(data)
    t1 = time.perf_counter()
    if prof:
        prof.disable()
    mem = vm_status()
    try:
        got = block_crc(restored.root, lo, hi)
    finally:
        os.kill(restored.child, signal.SIGKILL)   # a namespace init: takes its tree with it
        _wait_gone(restored.child)
    if got != crc:
        raise SystemExit(f"the restored block's CRC is {got:#x}, not {crc:#x}")
    if prof:
        import io
        import pstats
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
        print(text.getvalue(), file=sys.stderr)
    print(json.dumps({"restart_s": t1 - t0, "import_s": import_s, "timings": restored.timings,
                      "page_writes": restored.page_writes,
                      "pages": restored.pages, **mem}))
    return 0


# -- the raw limit (a fresh subprocess) ------------------------------------------------------
class _PyBuffer(ctypes.Structure):         # CPython's Py_buffer: a chunk's address, no copy
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def _address(view: memoryview) -> int:
    get = ctypes.pythonapi.PyObject_GetBuffer
    get.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
    release = ctypes.pythonapi.PyBuffer_Release
    release.argtypes = (ctypes.POINTER(_PyBuffer),)
    b = _PyBuffer()
    get(view, ctypes.byref(b), 0)
    try:
        return b.buf                 # the mmap stays open: the address stays valid
    finally:
        release(ctypes.byref(b))


def child_raw(path: str, exe: str) -> int:
    from backend import kabi
    from backend.restore.memory import PageSink, runs_of
    from ckptsim.cr.api import restart_job
    from ckptsim.image import core
    from ckptsim.image.storage import read_image_file
    from ckptsim.model.kernel import Kernel
    libc = ctypes.CDLL(None, use_errno=True)
    writev = libc.process_vm_writev
    writev.restype = ctypes.c_ssize_t

    data = read_image_file(path)
    kernel, sink = Kernel(0), PageSink()
    _, rctx = restart_job(kernel, kernel.init, 0, data, core.RESTART_FROZEN, restore_fs=True,
                          page_sink=sink)
    vmas = [(v, sink.private[id(v)]) for t in rctx.tasks_by_vpid.values() if t.mm
            for v in t.mm.vmas if id(v) in sink.private]
    times = {}
    for way in ("process_vm_writev", "UFFDIO_COPY"):
        holder = subprocess.Popen([exe, "hold"] + [f"{v.start:x}:{v.end - v.start:x}"
                                                   for v, _ in vmas],
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            holder_uffd = int(holder.stdout.readline())
            bases = [int(holder.stdout.readline(), 16) for _ in vmas]
            calls = []               # (local iovec, remote iovecs, count, bytes) per chunk
            copies = []              # (destination, source, bytes) per run
            pages = 0
            for (vma, chunks), base in zip(vmas, bases):
                shift = base - vma.start
                for addrs, view in chunks:
                    runs = runs_of(addrs)
                    remote = (kabi.iovec * len(runs))(*[kabi.iovec(a + shift, b - a)
                                                        for a, b in runs])
                    src = _address(view)
                    calls.append((kabi.iovec(src, len(view)), remote, len(runs), len(view)))
                    for a, b in runs:
                        copies.append((a + shift, src, b - a))
                        src += b - a
                    pages += len(addrs)
            if way == "process_vm_writev":
                t0 = time.perf_counter()
                for local, remote, n, size in calls:
                    if writev(holder.pid, ctypes.byref(local), 1, remote, n, 0) != size:
                        raise SystemExit(f"process_vm_writev: {os.strerror(ctypes.get_errno())}")
                times[way] = time.perf_counter() - t0
            else:
                times[way] = _raw_uffd(holder.pid, holder_uffd, bases, vmas, copies)
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()
    print(json.dumps({"raw_s": times["process_vm_writev"], "raw_uffd_s": times["UFFDIO_COPY"],
                      "pages": pages, "relocated":
                      sum(b != v.start for (v, _), b in zip(vmas, bases))}))
    return 0


def _raw_uffd(pid: int, holder_uffd: int, bases, vmas, copies) -> float:
    """The limit of the other way the restart writes pages: UFFDIO_COPY of the same runs into
    the holder's VMAs through a userfaultfd of its mm (registered before the timer starts)."""
    import fcntl
    from backend import kabi
    if holder_uffd < 0:
        return float("nan")              # no userfaultfd here
    pidfd = kabi.syscall(kabi.SYS_pidfd_open, pid, 0)
    uffd = kabi.syscall(kabi.SYS_pidfd_getfd, pidfd, holder_uffd, 0)
    os.close(pidfd)
    try:
        fcntl.ioctl(uffd, kabi.UFFDIO_API, kabi.uffdio_api(api=kabi.UFFD_API))
        for (vma, _), base in zip(vmas, bases):
            fcntl.ioctl(uffd, kabi.UFFDIO_REGISTER, kabi.uffdio_register(
                range=kabi.uffdio_range(base, vma.end - vma.start),
                mode=kabi.UFFDIO_REGISTER_MODE_MISSING))
        ioctl = ctypes.CDLL(None, use_errno=True).ioctl
        ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
        arg = kabi.uffdio_copy(mode=kabi.UFFDIO_COPY_MODE_DONTWAKE)
        t0 = time.perf_counter()
        for dst, src, size in copies:
            arg.dst, arg.src, arg.len = dst, src, size
            if ioctl(uffd, kabi.UFFDIO_COPY, ctypes.byref(arg)):
                raise SystemExit(f"UFFDIO_COPY: {os.strerror(ctypes.get_errno())}")
        return time.perf_counter() - t0
    finally:
        os.close(uffd)


def run_child(*args: str) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{args[0]} failed:\n{r.stderr.strip()}")
    if r.stderr.strip():
        print(r.stderr.rstrip(), file=sys.stderr)
    return json.loads(r.stdout)


# -- one size --------------------------------------------------------------------------------
def bench_size(exe: str, nbytes: int, outdir: str, repeat: int, profile: bool) -> dict:
    from backend.dump import checkpoint
    path = os.path.join(outdir, f"bench-live-restart-{os.getpid()}.img")
    proc = subprocess.Popen([exe, str(nbytes)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline().split()
        if len(line) != 2:
            raise SystemExit(f"target exited with {proc.wait()}")
        lo = int(line[0], 16)
        hi = lo + int(line[1])
        crc = block_crc(proc.pid, lo, hi)
        with open(path, "wb") as sink:
            checkpoint(proc.pid, sink, kill=True)
        proc.wait()
        best_raw = best_uffd = float("inf")
        best: dict[str, dict] = {}           # per way of passing the image: the best run
        hwm: dict[str, dict] = {}            # ... and the run with the highest VmHWM
        raw = {}
        args = [path, str(lo), str(hi), str(crc)]
        for i in range(3 * repeat):          # rotate which one goes first
            how = ("raw", "mmap", "view")[(i + i // 3) % 3]
            if how == "raw":
                raw = run_child("--raw", path, exe)
                best_raw = min(best_raw, raw["raw_s"])
                best_uffd = min(best_uffd, raw["raw_uffd_s"])
                continue
            r = run_child("--restart", *args, "0", how)
            if r["restart_s"] < best.get(how, {}).get("restart_s", float("inf")):
                best[how] = r
            hwm[how] = max(hwm.get(how, {}), r, key=lambda x: x.get("VmHWM", 0))
        for how, r in best.items():
            if raw["pages"] != r["pages"]:
                raise SystemExit(f"the raw copy wrote {raw['pages']} pages, the restart "
                                 f"({how}) {r['pages']}")
        if profile:
            for how in ("mmap", "view"):
                print(f"-- cProfile, {nbytes // MiB} MiB, image passed as {how}:",
                      file=sys.stderr)
                run_child("--restart", *args, "1", how)
        data = raw["pages"] * PAGE
        out = {"size": nbytes, "pages": raw["pages"], "image": os.path.getsize(path),
               "raw_s": best_raw, "raw_mbs": data / best_raw / 1e6, "raw_uffd_s": best_uffd,
               "relocated": raw["relocated"]}
        for how, r in best.items():
            out[how] = {"restart_s": r["restart_s"], "mbs": data / r["restart_s"] / 1e6,
                        "ratio": best_raw / r["restart_s"], "timings": r["timings"],
                        "uffd_ratio": best_uffd / r["restart_s"], "mem": hwm[how],
                        "ways": r["page_writes"]}
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if os.path.exists(path):
            os.unlink(path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--restart"]:
        return child_restart(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5] == "1",
                             argv[6] == "view")
    if argv[:1] == ["--raw"]:
        return child_raw(argv[1], argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB only")
    ap.add_argument("--dir", default="/dev/shm", help="where the images go (default /dev/shm)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per size, best kept")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile one more restart per size (top functions on stderr)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.dir):
        print(f"bench_live_restart: {args.dir} is not a directory", file=sys.stderr)
        return 2
    gcc = shutil.which("gcc")
    if gcc is None:
        print("bench_live_restart: gcc is needed to build the target", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "target.c"), os.path.join(tmp, "target")
        with open(src, "w") as f:
            f.write(TARGET_C)
        subprocess.run([gcc, "-O2", "-o", exe, src], check=True)
        sizes = [64 * MiB] if args.quick else [64 * MiB, 256 * MiB, 1024 * MiB]
        print(f"images in {args.dir}, best of {args.repeat}; MB = 10^6 bytes of page data; "
              f"load average at the start {_load()}")
        print("image passed as: mmap = read_image_file's mmap, as the restart tool does; "
              "view = memoryview of that mmap")
        print("ratio: to the raw process_vm_writev limit (the issue's); the restart writes the "
              "long runs of private anonymous VMAs with UFFDIO_COPY (share: 'by uffd'), whose "
              "own raw limit ('raw uffd s') is given too, with the ratio to that")
        print("| target | pages | image MB | raw s | raw MB/s | raw uffd s | image as | restart s "
              "| MB/s | ratio | ratio to uffd | by uffd | peak RSS | RssAnon / RssShmem at end |")
        print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        steps = []
        for size in sizes:
            r = bench_size(exe, size, args.dir, args.repeat, args.profile)
            for how in ("mmap", "view"):
                v, m = r[how], r[how]["mem"]
                print(f"| {size // MiB} MiB | {r['pages']:,} | {r['image'] / 1e6:,.1f} "
                      f"| {r['raw_s']:.3f} | {r['raw_mbs']:,.0f} | {r['raw_uffd_s']:.3f} | {how} "
                      f"| {v['restart_s']:.3f} | {v['mbs']:,.0f} | {v['ratio']:.2f} "
                      f"| {v['uffd_ratio']:.2f} "
                      f"| {v['ways']['UFFDIO_COPY'] / max(1, sum(v['ways'].values())):.0%} "
                      f"| {m['VmHWM'] / MiB:.1f} MiB "
                      f"| {m['RssAnon'] / MiB:.1f} / {m['RssShmem'] / MiB:.1f} MiB |", flush=True)
                steps.append((size, how, v["timings"], r["relocated"]))
        print(f"load average at the end {_load()} (other processes share the 2 cores: compare "
              "runs made at similar loads)")
        print("\nrestart_image's steps of the best runs (decode: s; then cumulative s from "
              "the start of run(); 'pages' is the page writer thread's time from the submission (planning, waiting "
              "for the VMAs, writing); 'pages wait' and 'checksum wait' how long the restart "
              "waited for the pages and the checksum):")
        for size, how, t, relocated in steps:
            print(f"  {size // MiB} MiB, {how}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items())
                  + (f" (raw: {relocated} VMAs mapped elsewhere)" if relocated else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

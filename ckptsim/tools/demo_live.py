"""``ckptsim demo`` on real processes: checkpoint, kill and restart a running counter.

The counter is a small Python program (Python is always there; no compiler needed), run by
this interpreter. It keeps its state in three places: in memory (``n`` and the running total),
in a file (one "n total" line per step, appended) and in a pipe (the next ``n`` is written to
the pipe and read back at the next step: it is in flight at any moment, so the restart must
bring the pipe's buffered bytes back). The demo lets it run, checkpoints it with the live
backend (``backend.dump.checkpoint``, killing it once the image is complete), restarts the
image (``backend.restore.job.restart_image``: a new pid namespace where it has its old pid),
lets it run again, and checks its file: the numbers run 0, 1, 2, ... with no gap and no
repeat across the restart, each total is the sum so far (memory), and no step found its pipe
wrong. Then ``ckptinfo`` shows the image. Everything it started is ended by pid, also on a
failure or Ctrl-C.
"""
from __future__ import annotations

import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

STEP_SECONDS = 0.02
LINES_BEFORE = 25           # steps before the checkpoint, and after the restart
WAIT_SECONDS = 30.0

COUNTER = r"""
import os, sys, time
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
r, w = os.pipe()
os.set_blocking(r, False)
n = total = 0
os.write(w, b"0\n")
while True:
    try:
        in_pipe = os.read(r, 64)
    except BlockingIOError:
        in_pipe = b"(empty)"
    if in_pipe != b"%d\n" % n:
        os.write(out, b"ERROR step %d: the pipe held %r\n" % (n, in_pipe))
        sys.exit(3)
    total += n
    os.write(out, b"%d %d\n" % (n, total))
    n += 1
    os.write(w, b"%d\n" % n)
    time.sleep(float(sys.argv[2]))
"""


class DemoFailed(Exception):
    """The live demo did not show what it should: the message says what went wrong."""


def unavailable_reason() -> str | None:
    """Why the live demo cannot run here (None: it can)."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return "the live backend needs Linux on x86-64"
    if os.geteuid() != 0:
        return ("not running as root: the live restart needs CAP_SYS_ADMIN (a new pid "
                "namespace) and CAP_CHECKPOINT_RESTORE (pids chosen with clone3)")
    try:
        from backend import features
    except ImportError:
        return "the live backend (the backend package) is not installed beside ckptsim"
    found = features.probed()
    missing = [f"{f.name} ({f.detail})" for f in found
               if (f.must_have or f.name == "clone3_set_tid") and not f.present]
    if missing:
        return "kernel features missing: " + ", ".join(missing)
    return None


def _lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]


def _wait_lines(path: str, count: int, alive, what: str) -> list[str]:
    """Poll ``path`` until it has ``count`` lines; fails if ``alive()`` turns false first."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        lines = _lines(path)
        if len(lines) >= count:
            return lines
        if any(x.startswith("ERROR") for x in lines):
            raise DemoFailed(next(x for x in lines if x.startswith("ERROR")))
        if not alive():
            raise DemoFailed(f"{what}: the counter ended after {len(lines)} lines")
        if time.monotonic() > deadline:
            raise DemoFailed(f"{what}: only {len(lines)} lines after {WAIT_SECONDS:.0f} s")
        time.sleep(STEP_SECONDS / 2)


def check_count(lines: list[str]) -> None:
    """Line i must be "i total(i)": no gap, no repeat, the memory's total right."""
    total = 0
    for i, line in enumerate(lines):
        total += i
        if line != f"{i} {total}":
            raise DemoFailed(f"line {i + 1} is {line!r}, expected '{i} {total}' (a gap, a "
                             "repeat or a lost total)")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_live_demo(out=print) -> int:
    from backend.dump import checkpoint
    from backend.restore.job import restart_image
    from ckptsim.image import core
    from ckptsim.image.storage import AtomicImageFile

    workdir = tempfile.mkdtemp(prefix="ckptsim-demo-")
    counts, image = os.path.join(workdir, "counts.txt"), os.path.join(workdir, "counter.img")
    original: subprocess.Popen | None = None
    restored = None
    try:
        with open(os.path.join(workdir, "counter.err"), "w") as err:
            original = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", COUNTER, counts, str(STEP_SECONDS)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=workdir)
        out(f"started the counter (a Python program), pid {original.pid}: n and the running "
            f"total in memory, the next n in a pipe, one 'n total' line per step in {counts}")
        lines = _wait_lines(counts, LINES_BEFORE, lambda: original.poll() is None, "before the checkpoint")
        out(f"it ran a bit: {len(lines)} lines so far, the last '{lines[-1]}'")

        sink = AtomicImageFile(image)
        try:
            crid = checkpoint(original.pid, sink, core.CHECKPOINT_SUBTREE, kill=True)
        except BaseException:
            sink.abort()
            raise
        sink.commit()
        original.wait(timeout=10)
        at_checkpoint = _lines(counts)
        out(f"checkpoint {crid}: {os.path.getsize(image)} bytes written to {image} (mode 0600); "
            f"the counter was killed once the image was complete (pid {original.pid} is gone); "
            f"its last line: '{at_checkpoint[-1]}'")

        t0 = time.perf_counter()
        with open(image, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            restored = restart_image(data)
        finally:
            try:
                data.close()
            except BufferError:
                pass
        out(f"restarted from the image in {time.perf_counter() - t0:.3f} s: pid {restored.root} "
            f"here, pid {original.pid} inside its new pid namespace, as before the checkpoint")
        root = restored.root
        lines = _wait_lines(counts, len(at_checkpoint) + LINES_BEFORE, lambda: _alive(root),
                            "after the restart")
        check_count(lines)
        out(f"it carried on: '{lines[len(at_checkpoint)]}' right after '{at_checkpoint[-1]}', "
            f"now {len(lines)} lines, the last '{lines[-1]}'")
        out(f"checked: lines 0..{len(lines) - 1} with no gap and no repeat, every total right "
            "(memory), every step found its number in the pipe")
    except DemoFailed as e:
        out(f"FAILED: {e} (its files are kept in {workdir})")
        return 1
    finally:
        _end(original, restored)
    from .ckptinfo import main as ckptinfo_main
    out("--- ckptinfo " + image)
    ckptinfo_main([image])
    shutil.rmtree(workdir, ignore_errors=True)
    out("OK: the restarted counter carried on from where it was checkpointed")
    return 0


def _end(original, restored) -> None:
    """End, by pid, everything the demo started, and reap what is ours."""
    if original is not None and original.poll() is None:
        original.kill()
        original.wait(timeout=10)
    if restored is not None:
        for pid in list(restored.pids.values()) + [restored.child]:
            _kill(pid)
        try:
            os.waitpid(restored.child, 0)
        except ChildProcessError:
            pass

"""`restart --self` (RESTART_TASKSELF): the calling process becomes the image's one task,
keeping its pid and parent; a refused restart returns with a one-line error and the caller
as it was. Every process is ended by pid."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from backend.dump import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def _wait_lines(path: str, n: int, timeout: float = 10.0, tool=None) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            lines = [x for x in f.read().splitlines() if x.startswith("n ")]
        if len(lines) >= n:
            return lines
        time.sleep(0.01)
    pytest.fail(f"fewer than {n} counts in {path} after {timeout:g} s" + _tool_state(tool))


def _tool_state(tool) -> str:
    """What became of the restart tool (for a failure message: it failed twice in ~25
    parallel runs, never alone)."""
    if tool is None:
        return ""
    if tool.poll() is not None:
        return f"; the tool exited {tool.returncode}: {tool.stderr.read().decode()[-2000:]!r}"
    try:
        with open(f"/proc/{tool.pid}/status") as f:
            fields = [x for x in f.read().splitlines()
                      if x.startswith(("Name:", "State:", "TracerPid:", "SigPnd", "ShdPnd"))]
        with open(f"/proc/{tool.pid}/wchan") as f:
            fields.append(f"wchan: {f.read()}")
    except OSError as e:
        fields = [str(e)]
    return f"; the tool (pid {tool.pid}) still runs: {fields}"


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def _image(procs, exe, tmp_path) -> tuple[str, str]:
    out = str(tmp_path / "out.txt")
    with open(out, "w") as f:
        p = subprocess.Popen([exe, "1", "1"], stdout=f, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    procs.append(p)
    _wait_lines(out, 3)
    buf = io.BytesIO()
    checkpoint(p.pid, buf, kill=True)
    p.wait(timeout=10)
    image = str(tmp_path / "self.img")
    with open(image, "wb") as f:
        f.write(buf.getvalue())
    return image, out


def _self_restart(procs, image: str) -> subprocess.Popen:
    """`restart --self -i IMAGE` in a tool process of ours (ended by pid at teardown)."""
    tool = subprocess.Popen([sys.executable, "-m", "backend.restore_cli", "--self", "-i", image],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs.append(tool)
    return tool


def test_the_caller_becomes_the_image_and_keeps_its_pid(procs, c_target, tmp_path):
    image, out = _image(procs, c_target("restore_prog_counter"), tmp_path)
    before = _wait_lines(out, 1)
    tool = _self_restart(procs, image)
    after = _wait_lines(out, len(before) + 3, timeout=30.0, tool=tool)
    numbers = [int(x.split()[1]) for x in after]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    with open(f"/proc/{tool.pid}/comm") as f:
        assert f.read().strip() == "restore_prog_co"          # the same pid, now the program
    with open(f"/proc/{tool.pid}/status") as f:
        status = f.read()
    assert f"PPid:\t{os.getpid()}" in status and "TracerPid:\t0" in status
    assert not [fd for fd in os.listdir(f"/proc/{tool.pid}/fd") if int(fd) > 250]


def test_a_refused_self_restart_returns_with_the_reason(procs, c_target, tmp_path):
    image, _ = _image(procs, c_target("restore_prog_counter"), tmp_path)
    with open(image, "r+b") as f:                 # break the checksum: refused before anything
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = subprocess.run([sys.executable, "-m", "backend.restore_cli", "--self", "-i", image],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "checksum" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_self_refuses_options_that_make_no_sense():
    out = subprocess.run([sys.executable, "-m", "backend.restore_cli", "--self", "--detach",
                          "-i", "/dev/null"], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--self" in out.stderr


def _signal_masks(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    return fields["SigCgt"], fields["SigIgn"]


def test_the_callers_own_signal_actions_do_not_survive(procs, c_target, tmp_path):
    # the tool is Python: it catches SIGINT and ignores SIGPIPE and SIGXFSZ; the image's
    # program has none of that, and must not get them
    image, out = _image(procs, c_target("restore_prog_counter"), tmp_path)
    before = _wait_lines(out, 1)
    tool = _self_restart(procs, image)
    _wait_lines(out, len(before) + 2, timeout=30.0, tool=tool)
    fresh = subprocess.Popen([c_target("restore_prog_counter"), "1", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL)
    procs.append(fresh)
    time.sleep(0.2)
    assert _signal_masks(tool.pid) == _signal_masks(fresh.pid)


def test_a_pid_namespace_init_is_refused_with_the_reason(procs, c_target, tmp_path):
    image, _ = _image(procs, c_target("restore_prog_counter"), tmp_path)
    out = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                          sys.executable, "-m", "backend.restore_cli", "--self", "-i", image],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "pid namespace's init" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1


def test_a_new_pid_namespace_init_is_restored_in_place_by_its_parent(procs, c_target, tmp_path):
    from backend import proc
    from backend.restore.self_restart import restart_new_pidns_init
    image, out = _image(procs, c_target("restore_prog_counter"), tmp_path)
    before = _wait_lines(out, 1)
    child = restart_new_pidns_init(open(image, "rb").read())
    try:
        after = _wait_lines(out, len(before) + 3, timeout=30.0)
        numbers = [int(x.split()[1]) for x in after]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
        st = proc.read_status(child)
        assert st.nspid[-1] == 1 and st.ppid == os.getpid() and st.name == "restore_prog_co"
        assert proc.children(child) == []         # no worker or zombie left under it
        fresh = subprocess.Popen([c_target("restore_prog_counter"), "1", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 stdin=subprocess.DEVNULL)
        procs.append(fresh)
        time.sleep(0.2)
        assert _signal_masks(child) == _signal_masks(fresh.pid)
        # later children of this process are in its own pid namespace again
        probe = subprocess.run(["sh", "-c", "cat /proc/self/status"], capture_output=True,
                               text=True, timeout=10)
        depth = len(proc.read_status(os.getpid()).nspid)
        assert [x for x in probe.stdout.splitlines()
                if x.startswith("NSpid:")][0].count("\t") == depth
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(child, 0)

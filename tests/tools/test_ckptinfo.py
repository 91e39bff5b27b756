"""ckptinfo, run in-process on images of the model and on hand-made ones."""
import io
import json

import pytest

from ckptsim.cr.api import checkpoint
from ckptsim.cr.context import CheckpointError
from ckptsim.image import core
from ckptsim.image.codec import ImageWriter
from ckptsim.image.types import MAGIC_HEAD
from ckptsim.model.kernel import Kernel
from ckptsim.tools import ckptinfo
from ckptsim.tools.scenarios import CGROUP, prepare


def scenario_image(name: str) -> bytes:
    kernel, root = prepare(name)
    buf = io.BytesIO()
    checkpoint(kernel, kernel.init, root.pid.nr_in(kernel.init.ns), buf, 0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "family.img"
    path.write_bytes(scenario_image("family"))
    return str(path)


@pytest.fixture(scope="module")
def signals(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "signals.img"
    path.write_bytes(scenario_image("signals"))
    return str(path)


@pytest.fixture
def leaked(tmp_path):
    """The image a failed container checkpoint leaves: a pipe shared with init is a leak."""
    k = Kernel()
    k.mkdir(k.init, "/bin", 0o755)
    k.cgroup_create(k.init, CGROUP)
    from ckptsim.model.tasks_ops import CLONE_NEWPID
    root = k.spawn("/bin/loop", [[None, "set", 1, 1], [None, "jnz", 1, 1]], flags=CLONE_NEWPID)
    k.cgroup_attach(k.init, CGROUP, root.tid)
    k.run(3)
    rfd, _ = k.pipe(root)
    k.init.files.install(root.files.get(rfd).get())
    k.freeze(k.init, CGROUP)
    buf = io.BytesIO()
    with pytest.raises(CheckpointError):
        checkpoint(k, k.init, root.tid, buf, 0)
    path = tmp_path / "leak.img"
    path.write_bytes(buf.getvalue())
    return str(path)


def run(capsys, *argv):
    code = ckptinfo.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_text_view_of_a_family(capsys, family):
    code, out, err = run(capsys, family)
    assert code == 0 and err == ""
    assert "version      1" in out and "arch         model" in out
    assert "ckptsim-model #1 model" in out and "crid         1" in out
    assert "Task tree (3 tasks):" in out
    assert "state zombie" in out                        # the exited child
    assert "fd_objref -> @" in out and "PIPE" in out     # fd table resolved to the pipe
    assert "vma_type=SHM_ANON" in out and "SHMEM, 1 pages" in out
    assert "TASK_CREDS" in out and "CRED uid=0" in out
    assert "Shared objects (" in out


def test_signals_are_shown(capsys, signals):
    code, out, _ = run(capsys, signals)
    assert code == 0
    assert "SIGHAND nsig=64 <64 items, 2 set" in out      # handlers set
    assert "SIGNAL_TASK blocked=" in out                   # blocked mask
    assert "SIGPENDING nr_pending=2" in out                # queued rt signals


def test_json_view(capsys, family):
    code, out, _ = run(capsys, "--json", family)
    assert code == 0
    view = json.loads(out)
    assert view["header"]["version"] == 1 and view["header"]["parent_id"] is None
    assert [t["vpid"] for t in view["tree"]] == [1, 2, 3]
    assert [t["state"] for t in view["tasks"]] == ["running", "zombie", "running"]
    types = {o["type"] for o in view["objects"]}
    assert {"FILE_TABLE", "FILE", "PIPE", "MM", "SHMEM", "SIGHAND", "CRED"} <= types
    refs = [o["objref"] for o in view["objects"]]
    assert refs == list(range(1, len(refs) + 1))
    assert view["error"] is None
    # page data is summarised as counts, never dumped
    assert "pages" in json.dumps([o for o in view["objects"] if o["type"] == "SHMEM"])
    assert len(out) < 200_000


def test_verbose_lists_every_record(capsys, family):
    code, out, _ = run(capsys, "-v", family)
    assert code == 0
    lines = [ln for ln in out.splitlines() if " object " in ln]
    assert lines[0] == "info: [@0] object    1 HEADER len 104"
    assert lines[-1].split()[-3:] == ["TAIL", "len", "32"]
    assert any("OBJREF" in ln for ln in lines)
    assert "info:     objtype FILE_TABLE objref 1" in out


def test_pids(capsys, family):
    code, out, _ = run(capsys, "-p", family)
    assert code == 0
    assert out.splitlines()[0] == "Task 0: pid 1 ppid 0 tgid 1 pgid 1 sid 1 depth 0"
    assert len(out.splitlines()) == 3


def test_error_record_of_a_failed_checkpoint(capsys, leaked):
    code, out, _ = run(capsys, "-e", leaked)
    assert code == 0
    assert out.startswith("CKPT_HDR_ERROR: EBUSY:") and "leak" in out
    code, out, _ = run(capsys, leaked)
    assert code == 0 and "Checkpoint failed: EBUSY" in out


def test_no_error_record_exits_1(capsys, family):
    code, out, err = run(capsys, "-e", family)
    assert code == 1 and out == "" and "no error record" in err


def test_error_record_written_by_hand(capsys, tmp_path):
    out = io.BytesIO()
    w = ImageWriter(out)
    w.write(core.HEADER, magic=MAGIC_HEAD, version=1, arch=100, major=6, minor=18, patch=0,
            page_size=4096, uflags=0, image_flags=core.IMAGE_MODEL, time=0, crid=1,
            image_id=bytes(16), parent_id=bytes(16))
    w.write_error("ENOSYS: unsupported VMA")
    w.finish()
    path = tmp_path / "err.img"
    path.write_bytes(out.getvalue())
    code, text, _ = run(capsys, "--error", str(path))
    assert (code, text) == (0, "CKPT_HDR_ERROR: ENOSYS: unsupported VMA\n")


def test_stdin(capsys, monkeypatch, family):
    data = open(family, "rb").read()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, out, _ = run(capsys, "-p")
    assert code == 0 and out.startswith("Task 0: pid 1")


@pytest.mark.parametrize("mangle, message", [
    (lambda d: d[:-3], "not a multiple of 8"),
    (lambda d: d[:len(d) // 2 & ~7], "no tail record"),
    (lambda d: d[:200] + bytes([d[200] ^ 1]) + d[201:], "checksum mismatch"),
    (lambda d: b"hello world, no image\n", "bad image"),
    (lambda d: b"", "too short"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, family, mangle, message):
    path = tmp_path / "bad.img"
    path.write_bytes(mangle(open(family, "rb").read()))
    code, out, err = run(capsys, str(path))
    assert code == 2 and out == ""
    assert err.startswith("ckptinfo: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, str(tmp_path / "nope.img"))
    assert code == 2 and err == f"ckptinfo: error: {tmp_path / 'nope.img'}: No such file or directory\n"


def test_usage_error_and_help(capsys, family):
    code, _, err = run(capsys, "--no-such-option", family)
    assert code == 2 and "usage:" in err
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "ckptinfo" in out


def test_keyboard_interrupt_is_130(monkeypatch, family):
    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(ckptinfo, "_run", interrupted)
    assert ckptinfo.main([family]) == 130

"""ckptinfo --chain: an incremental image's chain, with what each link holds."""
import io
import json

import pytest

from ckptsim.cr.api import checkpoint
from ckptsim.image import core
from ckptsim.model.kernel import Kernel
from ckptsim.model.tasks_ops import CLONE_NEWPID
from ckptsim.tools import ckptinfo
from ckptsim.tools.scenarios import CGROUP

P, A = 4096, 0x10000000


def _image(k, root, parent=None):
    buf = io.BytesIO()
    checkpoint(k, k.init, root.tid, buf, core.CHECKPOINT_INCREMENTAL if parent else 0,
               parent=parent)
    return buf.getvalue()


@pytest.fixture
def chain(tmp_path):
    return build(tmp_path)


def build(directory, word=b"one"):
    """full.img (3 pages), inc1.img (1 page written), inc2.img (2 pages written)."""
    k = Kernel()
    k.mkdir(k.init, "/bin", 0o755)
    k.cgroup_create(k.init, CGROUP)
    root = k.spawn("/bin/wait", [[None, "ckpt_point"]], flags=CLONE_NEWPID)
    k.cgroup_attach(k.init, CGROUP, root.tid)
    k.run(5)
    k.freeze(k.init, CGROUP)
    k.mmap(root, A, 8 * P, 3, 0x32)
    for i in range(3):
        k.mem_write(root, A + i * P, b"full")
    full = _image(k, root)
    k.mem_write(root, A + 4 * P, word)
    inc1 = _image(k, root, full)
    k.mem_write(root, A, b"two")
    k.mem_write(root, A + 6 * P, b"two")
    inc2 = _image(k, root, inc1)
    paths = {}
    for name, data in (("full", full), ("inc1", inc1), ("inc2", inc2)):
        paths[name] = directory / f"{name}.img"
        paths[name].write_bytes(data)
    return paths


def run(capsys, *argv):
    code = ckptinfo.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_chain_oldest_first_with_what_each_link_holds(chain, capsys):
    code, out, err = run(capsys, "--chain", "--json", chain["inc2"])
    assert code == 0, err
    links = json.loads(out)
    assert [link["file"] for link in links] == [str(chain[n]) for n in ("full", "inc1", "inc2")]
    assert [link["pages"] for link in links] == [3, 1, 2]
    assert [link["crid"] for link in links] == [1, 2, 3]
    assert links[0]["parent_id"] is None and not links[0]["incremental"]
    assert links[1]["parent_id"] == links[0]["image_id"]
    assert links[2]["parent_id"] == links[1]["image_id"]
    assert all(link["bytes"] == chain[n].stat().st_size
               for link, n in zip(links, ("full", "inc1", "inc2")))
    assert links[2]["records"] > 10 and links[2]["page_bytes"] == 2 * P
    code, out, _ = run(capsys, "--chain", chain["inc2"])
    assert code == 0
    assert "Chain of 3 images" in out and "(full image)" in out
    assert out.count(links[1]["image_id"]) == 2     # inc1's id, and inc2's parent id


def test_ancestors_named_elsewhere(chain, capsys, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    chain["inc1"].rename(elsewhere / "x")
    code, out, err = run(capsys, "--chain", chain["inc2"])
    assert code == 2 and out == ""
    assert err.startswith("ckptinfo: error: ") and "needs its parent image" in err
    assert len(err.splitlines()) == 1
    code, out, err = run(capsys, "--chain", chain["inc2"], "--parent", elsewhere,
                         "--parent", chain["full"])
    assert code == 0, err
    assert str(elsewhere / "x") in out


def test_a_mismatched_parent_is_named(chain, capsys, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    impostor = build(other, word=b"ONE")["inc1"]    # same seed and crid: the same image id
    chain["inc1"].write_bytes(impostor.read_bytes())
    code, _, err = run(capsys, "--chain", chain["inc2"])
    assert code == 2 and "does not match" in err and "checksum" in err
    assert str(chain["inc1"]) in err


def test_summary_shows_the_parent_link(chain, capsys):
    code, out, _ = run(capsys, chain["inc2"])
    assert code == 0
    assert "INCREMENTAL" in out and "parent id" in out and "(crid 2, checksum 0x" in out
    code, out, _ = run(capsys, "--json", chain["inc2"])
    assert json.loads(out)["header"]["parent"]["crid"] == 2
    assert json.loads(out)["filesystem"]["types"].get("PARENT") is None


def test_usage_errors(chain, capsys):
    code, _, err = run(capsys, "--parent", chain["full"], chain["inc2"])
    assert code == 2 and "--parent goes with --chain" in err
    code, _, err = run(capsys, "--chain", "-v", chain["inc2"])
    assert code == 2

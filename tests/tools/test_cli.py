"""The ckptsim command line: scenarios, simulate, replay, demo, and bad input."""
import os
import stat

import pytest

from ckptsim.tools.cli import main
from ckptsim.tools.scenarios import names


def test_scenarios_lists_every_builtin(capsys):
    assert main(["scenarios"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in names())


@pytest.mark.parametrize("name", names())
def test_simulate_then_replay_roundtrips_byte_for_byte(tmp_path, capsys, name):
    img = tmp_path / f"{name}.img"
    assert main(["simulate", name, "-o", str(img)]) == 0
    assert stat.S_IMODE(os.stat(img).st_mode) == 0o600
    assert main(["replay", str(img), "--roundtrip"]) == 0
    out = capsys.readouterr().out
    assert "invariants: all hold" in out and "roundtrip: identical" in out


def test_demo_restarts_the_counter(capsys):
    assert main(["demo"]) == 0
    assert "OK: the restarted counter carried on" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["replay", "/nonexistent/image"],
    ["simulate", "no-such-scenario", "-o", "/tmp/x.img"],
    ["frobnicate"],
])
def test_bad_input_is_one_line_and_nonzero(capsys, argv):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)


def test_replay_of_garbage_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"\x01" * 100)
    assert main(["replay", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ckptsim: error: bad image") and len(err.strip().splitlines()) == 1


def test_conformance_scenarios_are_listed_and_simulated(tmp_path, capsys):
    assert main(["scenarios"]) == 0
    listing = capsys.readouterr().out
    name = next(line.split()[0] for line in listing.splitlines() if line.split()[1] == "tree")
    img = tmp_path / "conf.img"
    assert main(["simulate", name, "-o", str(img)]) == 0
    assert main(["replay", str(img), "--roundtrip"]) == 0
    assert "roundtrip: identical" in capsys.readouterr().out

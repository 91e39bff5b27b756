"""The program interpreter's scenario checks (ckptsim/model/program.py)."""
from ckptsim.model.kernel import Kernel


def _run(ops):
    k = Kernel(0)
    k.mkdir(k.init, "/bin", 0o755)
    k.spawn("/bin/prog", ops)
    k.run()
    return k.output


def test_check_mem_on_unmapped_memory_fails():
    out = _run([[None, "check_mem", 0x20000000, "abc", "unmapped"], [None, "emit", "done"]])
    fails = [o for o in out if o[0] == "FAIL"]
    assert len(fails) == 1 and fails[0][2] == "unmapped" and "fault" in fails[0][3]
    assert out[-1] == ("emit", fails[0][1], "done")  # the program goes on


def test_check_mem_passes_and_fails_on_contents():
    out = _run([[1, "mmap", 0, 4096, 3, 0x22], [None, "store", "$r1", "abc"],
                [None, "check_mem", "$r1", "abc", "same"], [None, "check_mem", "$r1", "abd", "differs"]])
    assert [o[2] for o in out if o[0] == "FAIL"] == ["differs"]

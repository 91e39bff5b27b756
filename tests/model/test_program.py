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


def test_sendmsg_and_sendto_take_a_buffer_and_pass_fds():
    # sendmsg/sendto take (addr, n) like send; sendmsg's fd list may name registers.
    out = _run([[1, "mmap", 0, 4096, 3, 0x22], [None, "store", "$r1", "data"],
                [2, "pipe", 3], [None, "write", "$r3", "$r1", 4],
                [4, "socketpair", 1, 5],
                [6, "sendmsg", "$r4", "$r1", 2, ["$r2"]], [None, "emit", "$r6"],
                [None, "close", "$r2"],
                [None, "recvmsg", "$r5", 2],     # the pipe's read end comes back as the lowest fd
                [None, "store", "$r1", "...."],
                [7, "read", "$r2", "$r1", 4], [None, "emit_mem", "$r1", 4],
                [8, "socket", 1, 2], [None, "bind", "$r8", "\u0000dg"],
                [9, "socket", 1, 2], [10, "sendto", "$r9", "$r1", 3, "\u0000dg"],
                [None, "emit", "$r10"], [11, "recv", "$r8", "$r1", 9], [None, "emit", "$r11"]])
    assert [o[2] for o in out if o[0] == "emit"] == [2, b"data", 3, 3]


def test_stack_vma_gives_the_bounds_of_the_vma_holding_the_stack():
    from ckptsim.model.mm_pages import STACK_INIT_SIZE, STACK_TOP
    out = _run([[1, "stack_vma", 2], [None, "emit", "$r1", "$r2"],
                [None, "munmap", "$r1", STACK_INIT_SIZE],
                [3, "stack_vma", 4], [None, "emit", "$r3"]])
    emits = [o[2:] for o in out if o[0] == "emit"]
    assert emits[0] == (STACK_TOP - STACK_INIT_SIZE, STACK_TOP)
    assert emits[1] == ((-14) & ((1 << 64) - 1),)   # no VMA holds the stack any more: EFAULT

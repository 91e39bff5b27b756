"""Conformance scenarios: incremental checkpoints.

Each scenario checkpoints at step 1 (a full image) and then, after the program wrote some
more, at steps 2, 3... (incremental images, each against the previous one). The runner checks
that every incremental image holds exactly the pages written since the previous checkpoint
(the model sees every write), then restarts the newest image of the chain; the program checks
from the inside that every page has its latest contents, and that dropped pages read as zeros.
"""
from ..dsl import *  # noqa: F401,F403
from ..scenario import scenario
from .memory_common import *  # noqa: F401,F403

MADV_DONTNEED = 4


@scenario("incremental", "two incremental steps over a private anonymous mapping: pages "
          "written at each step, one rewritten, others left alone", incremental=2)
def incr_anon_private(p):
    p.mmap(A, 8 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    for i in (0, 2, 4):
        p.store(A + i * PAGE + 10, f"step1-page{i}")
    p.ckpt()
    p.store(A + 2 * PAGE + 10, "step2-page2")           # rewritten
    p.store(A + 3 * PAGE - 4, "across-2-and-3")         # one write over a page boundary
    p.ckpt(step=2)
    p.store(A + 7 * PAGE, "step3-page7")
    p.ckpt(step=3)
    p.check_mem(A + 10, "step1-page0", "page 0 from the full image")
    p.check_mem(A + 2 * PAGE + 10, "step2-page2", "page 2 as rewritten at step 2")
    p.check_mem(A + 3 * PAGE - 4, "across-2-and-3", "the write across pages 2 and 3")
    p.check_mem(A + 4 * PAGE + 10, "step1-page4", "page 4 from the full image")
    p.check_mem(A + 7 * PAGE, "step3-page7", "page 7 from the newest image")
    p.check_mem(A + 6 * PAGE, zeros(), "page 6, never written")


@scenario("incremental", "nothing written between the steps: the incremental images hold no "
          "pages and the contents come from the full image", incremental=2)
def incr_nothing_written(p):
    p.mmap(A, 2 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.store(A + PAGE, "only-in-the-full-image")
    p.ckpt()
    p.ckpt(step=2)
    p.ckpt(step=3)
    p.check_mem(A + PAGE, "only-in-the-full-image", "page 1")


@scenario("incremental", "pages dropped between the steps (MADV_DONTNEED, munmap and a new "
          "mapping at the same place) read as zeros after restart, not as the parent's",
          incremental=1)
def incr_dropped_pages(p):
    p.mmap(A, 6 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    for i in range(6):
        p.store(A + i * PAGE, f"full-{i}")
    p.ckpt()
    p.do("madvise", A + PAGE, 2 * PAGE, MADV_DONTNEED)
    p.do("munmap", A + 4 * PAGE, PAGE)
    p.do("mmap", A + 4 * PAGE, PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.store(A + 2 * PAGE + 100, "written-after-dontneed")
    p.ckpt(step=2)
    p.check_mem(A, "full-0", "page 0 kept")
    p.check_mem(A + PAGE, zeros(8), "page 1 dropped")
    p.check_mem(A + 2 * PAGE, zeros(8), "page 2 dropped, its start")
    p.check_mem(A + 2 * PAGE + 100, "written-after-dontneed", "page 2 written again")
    p.check_mem(A + 3 * PAGE, "full-3", "page 3 kept")
    p.check_mem(A + 4 * PAGE, zeros(8), "page 4 unmapped and mapped again")
    p.check_mem(A + 5 * PAGE, "full-5", "page 5 kept")


@scenario("incremental", "a moved mapping (mremap) between the steps keeps its contents at "
          "the new place", incremental=1)
def incr_mremap_moved(p):
    p.mmap(A, 2 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.store(A, "moving-0")
    p.store(A + PAGE, "moving-1")
    p.ckpt()
    p.do("mremap", A, 2 * PAGE, 2 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, C)
    p.ckpt(step=2)
    p.check_mem(C, "moving-0", "moved page 0")
    p.check_mem(C + PAGE, "moving-1", "moved page 1")
    m = Mem(p, probe=False)
    m.unmapped(A, PAGE, "the old place")


@scenario("incremental", "a shared anonymous mapping written by a parent and by a child "
          "forked between the steps, and the child's private copy-on-write pages",
          incremental=2)
def incr_shared_and_fork(p):
    p.mmap(A, 4 * PAGE, PROT_RW, ANON_SHARED_FIXED)
    p.mmap(B, 2 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.store(A, "shared-full")
    p.store(B, "private-full")
    p.ckpt()
    p.store(A + PAGE, "shared-step2-parent")
    child = p.fork()
    with p.child(child):
        p.store(A + 2 * PAGE, "shared-step2-child")
        p.store(B + PAGE, "child-private")
        p.ckpt(step=2)
        p.store(A + 3 * PAGE, "shared-step3-child")
        p.ckpt(step=3)
        p.check_mem(B, "private-full", "child: its copy of the parent's private page")
        p.check_mem(B + PAGE, "child-private", "child: its own private page")
        p.check_mem(A + PAGE, "shared-step2-parent", "child: the parent's shared write")
    p.ckpt(step=2)
    p.ckpt(step=3)
    p.check_mem(A, "shared-full", "shared page 0")
    p.check_mem(A + PAGE, "shared-step2-parent", "shared page 1")
    p.check_mem(A + 2 * PAGE, "shared-step2-child", "shared page 2 (the child's)")
    p.check_mem(A + 3 * PAGE, "shared-step3-child", "shared page 3 (the child's, at step 3)")
    p.check_mem(B + PAGE, zeros(8), "the parent does not see the child's private page")
    p.wait_child(child)

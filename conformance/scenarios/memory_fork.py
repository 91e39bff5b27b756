"""Conformance scenarios: memory across fork, large and sparse sizes, zero pages, brk, the
stack, repeated restarts."""
import random
import string

from ..dsl import *  # noqa: F401,F403
from ..scenario import scenario
from .memory_common import *  # noqa: F401,F403


@scenario("memory", "copy-on-write after fork: parent and child each keep their own private "
          "pages across restart, and a write by one after restart is not seen by the other")
def memory_fork_cow_private(p):
    p.mmap(A, 2 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    scratch(p)
    p.store(A, "before-fork-0")
    p.store(A + PAGE, "before-fork-1")
    ready_r, ready_w = p.pipe()
    n = p.reg()
    child = p.fork()
    with p.child(child):
        p.store(A, "child-page-0")
        p.ckpt()
        p.check_mem(A, "child-page-0", "child: its own page 0")
        p.check_mem(A + PAGE, "before-fork-1", "child: page 1 from before the fork")
        p.store(A + PAGE, "child-after-1")
        p.raw(n, "write", ready_w, A + PAGE, 1)
        p.check(n, "==", 1, "child: signal the parent")
    p.store(A, "parent-page-0")
    p.ckpt()
    p.check_mem(A, "parent-page-0", "parent: its own page 0")
    p.raw(n, "read", ready_r, SCRATCH, 1)
    p.check(n, "==", 1, "parent: the child wrote")
    p.check_mem(A + PAGE, "before-fork-1", "parent: the child's write after restart is not seen")
    p.wait_child(child)


@scenario("memory", "a shared anonymous mapping inherited by fork stays shared between parent "
          "and child after restart, while a private one does not")
def memory_fork_shared_stays_shared(p):
    p.mmap(A, PAGE, PROT_RW, ANON_SHARED_FIXED)
    p.mmap(B, PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    scratch(p)
    p.store(A, "parent-before")
    p.store(B, "private-before")
    to_parent_r, to_parent_w = p.pipe()
    to_child_r, to_child_w = p.pipe()
    n = p.reg()
    child = p.fork()
    with p.child(child):
        p.store(A + 100, "child-before")
        p.store(B, "child-private")
        p.ckpt()
        p.check_mem(A, "parent-before", "child: parent's write before fork")
        p.check_mem(B, "child-private", "child: its private page")
        p.store(A + 200, "child-after")
        p.raw(n, "write", to_parent_w, A, 1)
        p.check(n, "==", 1, "child: signal the parent")
        p.raw(n, "read", to_child_r, SCRATCH, 1)
        p.check(n, "==", 1, "child: the parent wrote")
        p.check_mem(A + 300, "parent-after", "child sees the parent's write after restart")
    p.ckpt()
    p.check_mem(A + 100, "child-before", "parent sees the child's write before the point")
    p.check_mem(B, "private-before", "parent: its private page")
    p.raw(n, "read", to_parent_r, SCRATCH, 1)
    p.check(n, "==", 1, "parent: the child wrote")
    p.check_mem(A + 200, "child-after", "parent sees the child's write after restart")
    p.store(A + 300, "parent-after")
    p.raw(n, "write", to_child_w, A, 1)
    p.check(n, "==", 1, "parent: signal the child")
    p.wait_child(child)


@scenario("memory", "a shared anonymous mapping split differently in parent and child "
          "(mprotect and munmap in the child): the pieces still share one segment at the "
          "right offsets after restart", files=PROBE_FILE)
def memory_shared_anon_split_fork(p):
    m = Mem(p)
    p.mmap(A, 4 * PAGE, PROT_RW, ANON_SHARED_FIXED)
    scratch(p)
    for i in range(4):
        p.store(A + i * PAGE, f"seg-{i}")
    to_parent_r, to_parent_w = p.pipe()
    to_child_r, to_child_w = p.pipe()
    child = p.fork()
    with p.child(child):
        p.do("mprotect", A + PAGE, PAGE, PROT_READ)
        p.do("munmap", A + 2 * PAGE, PAGE)
        p.ckpt()
        m.read_only(A + PAGE, "child: page 1")
        m.unmapped(A + 2 * PAGE, PAGE, "child: page 2")
        m.ok("read", to_child_r, SCRATCH, 1, want=1, label="child: the parent wrote")
        p.check_mem(A + PAGE + 8, "parent-p1", "child sees the parent's write in page 1")
        p.check_mem(A + 3 * PAGE + 8, "parent-p3", "child sees the parent's write in page 3")
        p.store(A + 3 * PAGE + 100, "child-p3")
        m.ok("write", to_parent_w, A, 1, want=1, label="child: signal the parent")
    p.ckpt()
    p.check_mem(A + 2 * PAGE, "seg-2", "parent: page 2")
    p.store(A + PAGE + 8, "parent-p1")
    p.store(A + 3 * PAGE + 8, "parent-p3")
    m.ok("write", to_child_w, A, 1, want=1, label="parent: signal the child")
    m.ok("read", to_parent_r, SCRATCH, 1, want=1, label="parent: the child wrote")
    p.check_mem(A + 3 * PAGE + 100, "child-p3", "parent sees the child's write in page 3")
    p.wait_child(child)


@scenario("memory", "after fork the child replaces a mapping at the same address: each task "
          "keeps its own mapping and contents across restart")
def memory_fork_child_remaps(p):
    p.mmap(A, 2 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.store(A, "parent-mapping")
    child = p.fork()
    with p.child(child):
        p.do("munmap", A, 2 * PAGE)
        p.mmap(A, PAGE, PROT_RW, ANON_SHARED_FIXED)
        p.store(A + 1, "child-mapping")
        p.ckpt()
        p.check_mem(A, "\0child-mapping", "child: its own mapping")
    p.ckpt()
    p.check_mem(A, "parent-mapping", "parent: its mapping")
    p.check_mem(A + PAGE, zeros(), "parent: its second page")
    p.wait_child(child)


# ---- sizes: sparse, large, zero pages --------------------------------------------------------
GIB = 1 << 30
SPARSE = 0x100000000


@scenario("memory", "sparse mappings: a 1 GiB private and a 256 MiB shared anonymous mapping "
          "with a few pages written far apart")
def memory_sparse(p):
    p.mmap(SPARSE, GIB, PROT_RW, ANON_PRIVATE_FIXED)
    p.mmap(SPARSE + 2 * GIB, GIB // 4, PROT_RW, ANON_SHARED_FIXED)
    spots = [0, 3 * PAGE + 17, (64 << 20) + 123, GIB // 2, GIB - 16]
    for i, off in enumerate(spots):
        p.store(SPARSE + off, f"sp{i}")
    shared_spots = [5, (100 << 20) + PAGE, GIB // 4 - 8]
    for i, off in enumerate(shared_spots):
        p.store(SPARSE + 2 * GIB + off, f"sh{i}")
    p.ckpt()
    for i, off in enumerate(spots):
        p.check_mem(SPARSE + off, f"sp{i}", f"private spot {i}")
    for i, off in enumerate(shared_spots):
        p.check_mem(SPARSE + 2 * GIB + off, f"sh{i}", f"shared spot {i}")
    p.check_mem(SPARSE + GIB // 4, zeros(), "private, never written")
    p.check_mem(SPARSE + 2 * GIB + (200 << 20), zeros(), "shared, never written")


LARGE = 4 << 20
STRIDE = PAGE - 1                       # not a page multiple: every page holds different bytes
LARGE_TEXT = "".join(random.Random(4).choices(string.ascii_letters + string.digits, k=STRIDE))
LARGE_STEPS = LARGE // STRIDE           # 1024 strides, then a tail up to the end
LARGE_TAIL = LARGE_TEXT[:LARGE - LARGE_STEPS * STRIDE]


@scenario("memory", "a large private mapping: all of 4 MiB written (a non-periodic pattern, so "
          "every page differs) and read back after restart")
def memory_large(p):
    addr, count = p.reg(), p.reg()
    p.mmap(A, LARGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.set(addr, A)
    p.set(count, LARGE_STEPS)
    fill = p.label()
    p.place(fill)
    p.store(addr, LARGE_TEXT)
    p.add(addr, STRIDE)
    p.add(count, -1)
    p.jnz(count, fill)
    p.store(A + LARGE_STEPS * STRIDE, LARGE_TAIL)
    p.ckpt()
    p.set(addr, A)
    p.set(count, LARGE_STEPS)
    verify = p.label()
    p.place(verify)
    p.check_mem(addr, LARGE_TEXT, "contents")
    p.add(addr, STRIDE)
    p.add(count, -1)
    p.jnz(count, verify)
    p.check(addr, "==", A + LARGE_STEPS * STRIDE, "every stride was checked")
    p.check_mem(addr, LARGE_TAIL, "the tail up to 4 MiB")


@scenario("memory", "zero pages: pages written with zeros (one after holding data, one in a "
          "shared mapping, one a child zeroed after fork) and pages never written read as "
          "zero after restart, next to pages with data", files=PROBE_FILE)
def memory_zero_pages(p):
    m = Mem(p)
    p.mmap(A, 4 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.mmap(B, 2 * PAGE, PROT_RW, ANON_SHARED_FIXED)
    p.mmap(C, PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.store(A, "data-0")
    p.store(A + PAGE, zeros(PAGE))               # written with zeros
    p.store(A + 3 * PAGE + 40, "was-here")       # written, then zeroed again
    p.store(A + 3 * PAGE + 40, zeros(8))
    p.store(B, zeros(PAGE))
    p.store(B + PAGE + 9, "shared-1")
    p.store(C + 20, "inherited")
    child = p.fork()
    with p.child(child):
        p.store(C, zeros(PAGE))                  # the child's copy is all zeros
        p.ckpt()
        p.check_mem(C, zeros(PAGE), "child: its zeroed copy")
        m.writable(C + 20, "child: its zeroed copy")
    p.ckpt()
    p.check_mem(A, "data-0", "page 0")
    p.check_mem(A + PAGE, zeros(PAGE), "page 1, written with zeros")
    p.check_mem(A + 2 * PAGE, zeros(PAGE), "page 2, never written")
    p.check_mem(A + 3 * PAGE, zeros(PAGE), "page 3, zeroed again")
    p.check_mem(B, zeros(PAGE), "shared page 0, written with zeros")
    p.check_mem(B + PAGE, zeros(9) + "shared-1", "shared page 1")
    p.wait_child(child)
    p.check_mem(C + 20, "inherited", "parent: its copy is not the child's zeros")
    m.writable(A + 2 * PAGE + 7, "page 2")


# ---- brk and the stack -------------------------------------------------------------------------
@scenario("memory", "brk: the heap grown by three pages, written, shrunk to the middle of a "
          "page; the break and the heap survive, and regrowing gives zero pages",
          files=PROBE_FILE)
def memory_brk(p):
    m = Mem(p)
    base = p.brk(0)
    cur = p.brk(0)
    p.add(cur, 3 * PAGE)
    p.check(m.call("brk", cur), "==", cur, "brk grows by 3 pages")
    a = p.brk(0)                                  # a walks the heap: base + 3 pages now
    p.add(a, -3 * PAGE)
    p.check(a, "==", base, "heap walker at the base")
    p.store(a, "heap-0")
    p.add(a, PAGE + 10)
    p.store(a, "heap-1")
    p.add(a, PAGE - 10)                           # base + 2 pages
    p.store(a, "heap-2")
    p.add(cur, -(2 * PAGE - 100))                 # base + 1 page + 100: not page aligned
    p.check(m.call("brk", cur), "==", cur, "brk shrinks")
    p.ckpt()
    p.check(m.call("brk", 0), "==", cur, "the break is where it was")
    p.check_mem(base, "heap-0", "heap page 0")
    m.unmapped(a, PAGE, "heap page 2, given back")
    p.add(a, -(PAGE - 10))
    p.check_mem(a, "heap-1", "heap page 1, kept by the unaligned break")
    p.add(a, PAGE - 10)
    p.add(cur, 2 * PAGE - 100)
    p.check(m.call("brk", cur), "==", cur, "brk grows again")
    p.check_mem(a, zeros(8), "heap page 2 is zero after regrowing")
    m.writable(a, "heap page 2")
    m.writable(base, "heap page 0")


@scenario("memory", "the stack: data near its top, at its bottom and across a page boundary "
          "survive, an untouched stack page stays zero, and it stays writable", files=PROBE_FILE)
def memory_stack(p):
    # Addresses from the [stack] VMA itself, not a fixed layout: the kernel randomizes it. Its
    # bottom pages are below anything the program's calls have used (132 KiB at exec).
    m = Mem(p)
    start, top = p.stack_vma()
    near_top, bottom, crossing, untouched = p.reg(), p.reg(), p.reg(), p.reg()
    for reg, base, offset in ((near_top, top, -64), (bottom, start, 8),
                              (crossing, start, 2 * PAGE - 4), (untouched, start, 4 * PAGE)):
        p.set(reg, base)
        p.add(reg, offset)
    p.store(near_top, "top-of-the-stack")
    p.store(bottom, "bottom-of-the-stack")
    p.store(crossing, "crosses-a-page")
    p.ckpt()
    again_start, again_top = p.stack_vma()
    p.check(again_start, "==", start, "the stack starts where it did")
    p.check(again_top, "==", top, "the stack ends where it did")
    p.check_mem(near_top, "top-of-the-stack", "near the top")
    p.check_mem(bottom, "bottom-of-the-stack", "bottom of the stack")
    p.check_mem(crossing, "crosses-a-page", "across a page boundary")
    p.check_mem(untouched, zeros(), "an untouched stack page")
    p.add(bottom, 100)
    m.writable(bottom, "the stack")


# ---- several restarts in a row ------------------------------------------------------------------
FILE_MULTI = file_pages("multi", 2)


@scenario("memory", "three checkpoint/restart rounds in a row of one task's varied memory "
          "(private, shared file, read-only part, hole, moved pages, brk): restored state "
          "checkpoints again unchanged", restarts=3,
          files=PROBE_FILE + (("/data/multi", FILE_MULTI),))
def memory_restarts_three(p):
    m = Mem(p)
    scratch(p)
    fd = p.open("/data/multi", O_RDWR, 0)
    p.mmap(A, 4 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    for i in range(4):
        p.store(A + i * PAGE, f"multi-{i}")
    p.do("mprotect", A + PAGE, PAGE, PROT_READ)
    p.do("munmap", A + 2 * PAGE, PAGE)
    p.mmap(B, 2 * PAGE, PROT_RW, MAP_SHARED_FIXED, fd, 0)
    p.store(B + PAGE + 30, "shared-file")
    p.do("mremap", A + 3 * PAGE, PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, C)
    cur = p.brk(0)
    p.add(cur, PAGE)
    p.do("brk", cur)
    p.add(cur, -PAGE)
    p.store(cur, "heap")
    p.ckpt()
    p.check_mem(A, "multi-0", "page 0")
    p.check_mem(A + PAGE, "multi-1", "read-only page 1")
    m.read_only(A + PAGE, "page 1")
    m.unmapped(A + 2 * PAGE, 2 * PAGE, "hole and moved page")
    p.check_mem(C, "multi-3", "moved page")
    p.check_mem(B + PAGE + 30, "shared-file", "shared file mapping")
    m.file_has(fd, PAGE + 30, "shared-file", "the file")
    p.store(B, "later")
    m.file_has(fd, 0, "later", "a write after three restarts reaches the file")
    p.check_mem(cur, "heap", "heap")
    m.writable(A + 100, "page 0")


@scenario("memory", "three checkpoint/restart rounds in a row of a parent and child with "
          "copy-on-write and shared pages: still separate and still shared after the third",
          restarts=3)
def memory_restarts_three_fork(p):
    p.mmap(A, 2 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.mmap(B, PAGE, PROT_RW, ANON_SHARED_FIXED)
    scratch(p)
    p.store(A, "common")
    p.store(A + PAGE, "page-1")
    done_r, done_w = p.pipe()
    n = p.reg()
    child = p.fork()
    with p.child(child):
        p.store(A + PAGE, "child-1")
        p.ckpt()
        p.check_mem(A, "common", "child: unchanged page after fork")
        p.check_mem(A + PAGE, "child-1", "child: its copy")
        p.store(A, "child-0")
        p.store(B + 50, "from-child")
        p.raw(n, "write", done_w, A, 1)
        p.check(n, "==", 1, "child: signal")
    p.store(A + PAGE, "parent-1")
    p.store(B, "from-parent")
    p.ckpt()
    p.raw(n, "read", done_r, SCRATCH, 1)
    p.check(n, "==", 1, "parent: the child wrote")
    p.check_mem(A, "common", "parent: the child's write to the page shared at fork is not seen")
    p.check_mem(A + PAGE, "parent-1", "parent: its copy")
    p.check_mem(B + 50, "from-child", "parent sees the child's shared write")
    p.check_mem(B, "from-parent", "parent: shared page")
    p.wait_child(child)


# ---- more sharing: CLONE_VM, read-only files, unlinked private files, three generations -------
CLONE_VM = 0x100


@scenario("memory", "a child created with CLONE_VM (not a thread) shares the whole address space "
          "with its parent across restart: its writes to a private mapping and a mapping it "
          "creates after restart are the parent's too")
def memory_clone_vm(p):
    p.mmap(A, 2 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    scratch(p)
    p.store(A, "parent-wrote")
    done_r, done_w = p.pipe()
    n = p.reg()
    child = p.call("fork", CLONE_VM)
    with p.child(child):
        p.store(A + 100, "child-wrote")
        p.ckpt()
        p.check_mem(A, "parent-wrote", "child sees the parent's write")
        p.store(A + PAGE, "child-after")
        p.mmap(B, PAGE, PROT_RW, ANON_PRIVATE_FIXED)
        p.store(B, "child-mapped")
        p.raw(n, "write", done_w, A, 1)
        p.check(n, "==", 1, "child: signal")
    p.ckpt()
    p.check_mem(A + 100, "child-wrote", "parent sees the child's write before the point")
    p.raw(n, "read", done_r, SCRATCH, 1)
    p.check(n, "==", 1, "parent: the child wrote")
    p.check_mem(A + PAGE, "child-after", "parent sees the child's write after restart")
    p.check_mem(B, "child-mapped", "parent sees the mapping the child made after restart")
    p.wait_child(child)


FILE_RO = file_pages("ro", 2)


@scenario("memory", "a shared mapping of a file opened read-only: contents follow the file and "
          "write permission can still not be granted by mprotect after restart (EACCES)",
          files=(("/data/ro", FILE_RO),))
def memory_file_shared_readonly(p):
    m = Mem(p, probe=False)
    scratch(p)
    ro = p.open("/data/ro", O_RDONLY, 0)
    rw = p.open("/data/ro", O_RDWR, 0)
    p.mmap(A, 2 * PAGE, PROT_READ, MAP_SHARED_FIXED, ro, 0)
    p.do("close", ro)
    p.ckpt()
    p.check_mem(A, page_of(FILE_RO, 0), "page 0")
    p.check_mem(A + PAGE, page_of(FILE_RO, 1), "page 1")
    p.check(m.call("mprotect", A, PAGE, PROT_RW), "==", (-errno.EACCES) & U64,
            "write permission refused")
    p.check(m.call("pread", rw, A, 1, 0), "==", EFAULT, "the mapping is not writable")
    p.store(SCRATCH, "changed-file")
    m.ok("pwrite", rw, SCRATCH, 12, PAGE + 4, want=12, label="pwrite")
    p.check_mem(A + PAGE + 4, "changed-file", "the mapping follows the file")


FILE_UNL = file_pages("unl", 3)


@scenario("memory", "a private mapping of a file closed and unlinked after a copy-on-write: the "
          "copy and the file's other pages both survive", files=(("/data/unl", FILE_UNL),))
def memory_file_private_unlinked(p):
    fd = p.open("/data/unl", O_RDWR, 0)
    p.mmap(A, 3 * PAGE, PROT_RW, MAP_PRIVATE_FIXED, fd, 0)
    p.store(A + 2 * PAGE + 1, "private-copy")
    p.do("close", fd)
    p.do("unlink", "/data/unl")
    p.ckpt()
    p.check_mem(A, page_of(FILE_UNL, 0), "page 0 from the unlinked file")
    p.check_mem(A + PAGE, page_of(FILE_UNL, 1), "page 1 from the unlinked file")
    p.check_mem(A + 2 * PAGE, "u" + "private-copy" + FILE_UNL[2 * PAGE + 13:2 * PAGE + 30],
                "page 2: the private copy")


@scenario("memory", "three generations (parent, child, grandchild) copy-on-write the same "
          "pages: each keeps its own version across restart and later writes stay private")
def memory_cow_three_generations(p):
    p.mmap(A, 3 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    for i in range(3):
        p.store(A + i * PAGE, f"origin-{i}")
    child = p.fork()
    with p.child(child):
        p.store(A + PAGE, "child-1")
        grandchild = p.fork()
        with p.child(grandchild):
            p.store(A + 2 * PAGE, "grandchild-2")
            p.ckpt()
            p.check_mem(A, "origin-0", "grandchild: page 0")
            p.check_mem(A + PAGE, "child-1", "grandchild: page 1 from the child")
            p.check_mem(A + 2 * PAGE, "grandchild-2", "grandchild: its page 2")
            p.store(A, "grandchild-0")
        p.ckpt()
        p.wait_child(grandchild, label="grandchild")
        p.check_mem(A, "origin-0", "child: page 0 (grandchild's later write not seen)")
        p.check_mem(A + PAGE, "child-1", "child: its page 1")
        p.check_mem(A + 2 * PAGE, "origin-2", "child: page 2")
        p.store(A, "child-0")
    p.ckpt()
    p.wait_child(child)
    p.check_mem(A, "origin-0", "parent: page 0 (later writes not seen)")
    p.check_mem(A + PAGE, "origin-1", "parent: page 1")
    p.check_mem(A + 2 * PAGE, "origin-2", "parent: page 2")


MANY = 400


@scenario("memory", f"{MANY} mappings made in a loop, alternately private and shared and "
          "apart (none merge), each written: all come back with their contents")
def memory_many_vmas_loop(p):
    addr, count = p.reg(), p.reg()
    p.set(addr, A)
    p.set(count, MANY // 2)
    make = p.label()
    p.place(make)
    p.mmap(addr, PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.store(addr, "private-one")
    p.add(addr, 2 * PAGE)
    p.mmap(addr, PAGE, PROT_RW, ANON_SHARED_FIXED)
    p.store(addr, "shared-one")
    p.add(addr, 2 * PAGE)
    p.add(count, -1)
    p.jnz(count, make)
    p.ckpt()
    p.set(addr, A)
    p.set(count, MANY // 2)
    check = p.label()
    p.place(check)
    p.check_mem(addr, "private-one", "private mapping")
    p.add(addr, 2 * PAGE)
    p.check_mem(addr, "shared-one", "shared mapping")
    p.add(addr, 2 * PAGE)
    p.add(count, -1)
    p.jnz(count, check)
    p.check(addr, "==", A + 2 * MANY * PAGE, "every mapping was checked")
    m = Mem(p, probe=False)
    m.unmapped(A + PAGE, PAGE, "the gap after the first mapping")
    m.unmapped(A + (2 * MANY - 1) * PAGE, PAGE, "the gap after the last mapping")


@scenario("memory", "mappings placed by the kernel (no address given): after restart new "
          "mappings do not land on restored ones, and all keep their contents")
def memory_kernel_placed(p):
    first = p.mmap(0, 3 * PAGE, PROT_RW, MAP_PRIVATE_ANON)
    second = p.mmap(0, PAGE, PROT_RW, MAP_SHARED_ANON)
    p.store(first, "first-mapping")
    p.store(second, "second-mapping")
    p.ckpt()
    third = p.mmap(0, 2 * PAGE, PROT_RW, MAP_PRIVATE_ANON)
    p.check(third, "!=", first, "a new mapping is not at the first one")
    p.check(third, "!=", second, "a new mapping is not at the second one")
    p.store(third, "third-mapping")
    p.check_mem(first, "first-mapping", "first mapping")
    p.check_mem(second, "second-mapping", "second mapping")
    p.check_mem(third, "third-mapping", "third mapping")
    p.add(third, PAGE)
    p.store(third, "third-page-1")
    p.check_mem(first, "first-mapping", "first mapping after writing the third's 2nd page")
    p.check_mem(second, "second-mapping", "second mapping after writing the third's 2nd page")


@scenario("memory", "after fork the parent moves its copy of a mapping with mremap: parent "
          "(new address) and child (old address) keep their own pages across restart")
def memory_mremap_after_fork(p):
    p.mmap(A, 2 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.store(A, "before-fork-0")
    p.store(A + PAGE, "before-fork-1")
    child = p.fork()
    with p.child(child):
        p.store(A + PAGE, "child-1")
        p.ckpt()
        p.check_mem(A, "before-fork-0", "child: page 0")
        p.check_mem(A + PAGE, "child-1", "child: its page 1")
        p.store(A, "child-0")
    p.do("mremap", A, 2 * PAGE, 2 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, C)
    p.store(C, "parent-0")
    p.ckpt()
    p.wait_child(child)
    p.check_mem(C, "parent-0", "parent: moved page 0")
    p.check_mem(C + PAGE, "before-fork-1", "parent: moved page 1 (not the child's)")
    m = Mem(p, probe=False)
    m.unmapped(A, 2 * PAGE, "parent: the old range")


@scenario("memory", "a shared anonymous segment whose first pages were unmapped in every task "
          "(only offsets 2 and 3 mapped, the child keeps only 3): contents and sharing survive")
def memory_shared_anon_tail_only(p):
    p.mmap(A, 4 * PAGE, PROT_RW, ANON_SHARED_FIXED)
    p.store(A + 2 * PAGE, "segment-2")
    p.store(A + 3 * PAGE, "segment-3")
    p.do("munmap", A, 2 * PAGE)
    scratch(p)
    done_r, done_w = p.pipe()
    n = p.reg()
    child = p.fork()
    with p.child(child):
        p.do("munmap", A + 2 * PAGE, PAGE)
        p.ckpt()
        p.check_mem(A + 3 * PAGE, "segment-3", "child: offset 3")
        p.store(A + 3 * PAGE + 10, "child-wrote")
        p.raw(n, "write", done_w, A + 3 * PAGE, 1)
        p.check(n, "==", 1, "child: signal")
    p.ckpt()
    p.check_mem(A + 2 * PAGE, "segment-2", "parent: offset 2")
    p.check_mem(A + 3 * PAGE, "segment-3", "parent: offset 3")
    p.raw(n, "read", done_r, SCRATCH, 1)
    p.check(n, "==", 1, "parent: the child wrote")
    p.check_mem(A + 3 * PAGE + 10, "child-wrote", "parent sees the child's write at offset 3")
    p.wait_child(child)


FILE_NONE = file_pages("none", 3)


@scenario("memory", "a private file mapping with a copied-on-write page, then made PROT_NONE "
          "and the heap split by mprotect: nothing readable until mprotect after restart, then "
          "the copy and the file pages are there",
          files=PROBE_FILE + (("/data/none", FILE_NONE),))
def memory_prot_none_file_and_heap(p):
    m = Mem(p)
    fd = p.open("/data/none", O_RDWR, 0)
    p.mmap(A, 3 * PAGE, PROT_RW, MAP_PRIVATE_FIXED, fd, 0)
    p.store(A + PAGE + 5, "cow-then-hidden")
    p.do("mprotect", A, 3 * PAGE, 0)
    heap = p.brk(0)
    p.add(heap, 2 * PAGE)
    p.do("brk", heap)
    p.add(heap, -2 * PAGE)
    p.store(heap, "heap-ro")
    p.do("mprotect", heap, PAGE, PROT_READ)
    p.ckpt()
    m.unreadable(A + PAGE + 5, "PROT_NONE file page 1")
    m.unreadable(A, "PROT_NONE file page 0")
    m.ok("mprotect", A, 3 * PAGE, PROT_READ, label="mprotect readable")
    p.check_mem(A + PAGE + 5, "cow-then-hidden", "the private copy")
    p.check_mem(A + 2 * PAGE, page_of(FILE_NONE, 2), "file page 2")
    p.check_mem(heap, "heap-ro", "read-only heap page")
    m.read_only(heap, "heap page 0")
    p.add(heap, PAGE)
    m.writable(heap, "heap page 1")

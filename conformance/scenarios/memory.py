"""Conformance scenarios: memory.

Mappings are placed with MAP_FIXED at constant addresses (0x10000000 and up), so a program can
name any byte of them without address arithmetic. Protections are checked from the inside
with syscalls that touch user memory: ``pread`` from the probe file into a page must fail
with EFAULT when the page is not writable, ``pwrite`` from a page must fail with EFAULT when it
is not readable, and ``mprotect`` over a range fails with ENOMEM when part of it is unmapped.
"""
from ..dsl import *  # noqa: F401,F403
from ..scenario import scenario
from .memory_common import *  # noqa: F401,F403

# ---- anonymous mappings --------------------------------------------------------------------
@scenario("memory", "private anonymous mapping: written pages (one write across a page "
          "boundary) and an unwritten range survive, and stay writable", files=PROBE_FILE)
def memory_anon_private(p):
    m = Mem(p)
    m.ok("mmap", A, 3 * PAGE, PROT_RW, ANON_PRIVATE_FIXED, want=A, label="mmap")
    p.store(A, "anon-private-0")
    p.store(A + PAGE - 6, "across-the-boundary")
    p.store(A + 2 * PAGE + 100, "anon-private-2")
    p.ckpt()
    p.check_mem(A, "anon-private-0", "page 0")
    p.check_mem(A + PAGE - 6, "across-the-boundary", "write across pages 0 and 1")
    p.check_mem(A + 2 * PAGE + 100, "anon-private-2", "page 2")
    p.check_mem(A + PAGE + 100, zeros(64), "unwritten part of page 1 is zero")
    m.writable(A + 2 * PAGE, "page 2")
    m.writable(A + PAGE + 200, "page 1")


@scenario("memory", "shared anonymous mapping: contents survive and it is still shared "
          "(a child forked after restart writes, the parent sees it)")
def memory_anon_shared(p):
    p.mmap(A, 2 * PAGE, PROT_RW, ANON_SHARED_FIXED)
    p.store(A, "anon-shared-0")
    p.store(A + PAGE + 7, "anon-shared-1")
    p.ckpt()
    p.check_mem(A, "anon-shared-0", "page 0")
    p.check_mem(A + PAGE + 7, "anon-shared-1", "page 1")
    child = p.fork()
    with p.child(child):
        p.check_mem(A + PAGE + 7, "anon-shared-1", "child sees page 1")
        p.store(A + 200, "from-the-child")
    p.wait_child(child)
    p.check_mem(A + 200, "from-the-child", "the child's write reaches the parent (still shared)")


@scenario("memory", "many single-page mappings, adjacent or apart, with mixed protections and "
          "private or shared backing, each with its own contents", files=PROBE_FILE)
def memory_many_vmas(p):
    m = Mem(p)
    kinds = []
    for i in range(12):
        prot = PROT_RW if i % 3 != 1 else PROT_READ
        flags = ANON_SHARED_FIXED if i % 4 == 3 else ANON_PRIVATE_FIXED
        addr = A + 2 * i * PAGE + (i % 2) * PAGE      # some adjacent, some with gaps
        kinds.append((addr, prot))
        p.do("mmap", addr, PAGE, PROT_RW, flags)
        p.store(addr + 8 * i, f"vma-{i}")
        if prot != PROT_RW:
            p.do("mprotect", addr, PAGE, prot)
    p.ckpt()
    for i, (addr, prot) in enumerate(kinds):
        p.check_mem(addr + 8 * i, f"vma-{i}", f"vma {i}")
        if prot == PROT_READ:
            m.read_only(addr, f"vma {i}")
    m.writable(kinds[0][0] + 1000, "vma 0")


# ---- file-backed mappings ------------------------------------------------------------------
FILE_PRIV = file_pages("priv", 3)


@scenario("memory", "private file mapping: a copied-on-write page keeps the private copy, the "
          "file stays unchanged; pages never written still follow the file after restart",
          files=(("/data/priv", FILE_PRIV),))
def memory_file_private_cow(p):
    m = Mem(p, probe=False)
    scratch(p)
    fd = p.open("/data/priv", O_RDWR, 0)
    p.mmap(A, 3 * PAGE, PROT_RW, MAP_PRIVATE_FIXED, fd, 0)
    p.store(A + PAGE, "cow-copy")
    p.check_mem(A + 2 * PAGE, page_of(FILE_PRIV, 2), "page 2 reads the file before the point")
    p.ckpt()
    p.check_mem(A, page_of(FILE_PRIV, 0), "page 0: the file's page")
    p.check_mem(A + PAGE, "cow-copy" + FILE_PRIV[PAGE + 8:PAGE + 40], "page 1: the private copy")
    p.check_mem(A + 2 * PAGE, page_of(FILE_PRIV, 2), "page 2: the file's page")
    m.file_has(fd, PAGE, page_of(FILE_PRIV, 1), "the file is not changed by the private write")
    # The file changes after restart: pages never copied follow it, the copied one does not.
    p.store(SCRATCH, "file-updated")
    m.ok("pwrite", fd, SCRATCH, 12, 2 * PAGE, want=12, label="pwrite page 2")
    m.ok("pwrite", fd, SCRATCH, 12, PAGE, want=12, label="pwrite page 1")
    p.check_mem(A + 2 * PAGE, "file-updated", "uncopied page 2 follows the file")
    p.check_mem(A + PAGE, "cow-copy", "copied page 1 keeps the private copy")


FILE_SHARED = file_pages("shared", 2)


@scenario("memory", "shared file mapping: writes before the checkpoint are in the file, writes "
          "after restart still reach it, file writes show in the mapping",
          files=(("/data/shared", FILE_SHARED),))
def memory_file_shared(p):
    m = Mem(p, probe=False)
    scratch(p)
    fd = p.open("/data/shared", O_RDWR, 0)
    p.mmap(A, 2 * PAGE, PROT_RW, MAP_SHARED_FIXED, fd, 0)
    p.store(A + 10, "written-via-map")
    p.ckpt()
    p.check_mem(A, "shared-p0" + "a", "page 0 start")
    p.check_mem(A + 10, "written-via-map", "page 0 write")
    m.file_has(fd, 10, "written-via-map", "the write before the point is in the file")
    p.check_mem(A + PAGE, page_of(FILE_SHARED, 1), "page 1")
    p.store(A + PAGE + 100, "after-restart")
    m.file_has(fd, PAGE + 100, "after-restart", "a write after restart reaches the file")
    p.store(SCRATCH, "via-the-file")
    m.ok("pwrite", fd, SCRATCH, 12, 500, want=12, label="pwrite")
    p.check_mem(A + 500, "via-the-file", "a file write shows in the mapping")


FILE_GONE = file_pages("gone", 2)


@scenario("memory", "a shared file mapping kept only by its mappings (fd closed, file "
          "unlinked), mapped twice: both views still share the file after restart",
          files=(("/data/gone", FILE_GONE),))
def memory_file_shared_unlinked(p):
    fd = p.open("/data/gone", O_RDWR, 0)
    p.mmap(A, 2 * PAGE, PROT_RW, MAP_SHARED_FIXED, fd, 0)
    p.mmap(B, PAGE, PROT_RW, MAP_SHARED_FIXED, fd, PAGE)
    p.do("close", fd)
    p.do("unlink", "/data/gone")
    p.store(A + PAGE + 20, "before-point")
    p.ckpt()
    p.check_mem(A, page_of(FILE_GONE, 0), "first view, page 0")
    p.check_mem(B + 20, "before-point", "second view sees the first view's write")
    p.check_mem(B + 40, FILE_GONE[PAGE + 40:PAGE + 60], "second view, rest of the page")
    p.store(B + 300, "after-restart")
    p.check_mem(A + PAGE + 300, "after-restart", "the first view sees a write after restart")


FILE_MOVE = file_pages("move", 4)


@scenario("memory", "private file mapping at an offset, one page copied-on-write, moved by "
          "mremap: offsets and the private copy survive, other pages still follow the file",
          files=(("/data/move", FILE_MOVE),))
def memory_mremap_file_private(p):
    m = Mem(p, probe=False)
    scratch(p)
    fd = p.open("/data/move", O_RDWR, 0)
    p.mmap(A, 3 * PAGE, PROT_RW, MAP_PRIVATE_FIXED, fd, PAGE)   # file pages 1..3
    p.store(A + PAGE, "cow-moved")
    m.ok("mremap", A, 3 * PAGE, 3 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, C, want=C, label="mremap")
    p.ckpt()
    p.check_mem(C, page_of(FILE_MOVE, 1), "page 0 is file page 1")
    p.check_mem(C + PAGE, "cow-moved" + FILE_MOVE[2 * PAGE + 9:2 * PAGE + 20],
                "page 1: private copy")
    p.check_mem(C + 2 * PAGE, page_of(FILE_MOVE, 3), "page 2 is file page 3")
    m.unmapped(A, 3 * PAGE, "the old range")
    p.store(SCRATCH, "file-page-3-new")
    m.ok("pwrite", fd, SCRATCH, 15, 3 * PAGE, want=15, label="pwrite file page 3")
    p.check_mem(C + 2 * PAGE, "file-page-3-new", "page 2 still follows file page 3")
    m.file_has(fd, 2 * PAGE, page_of(FILE_MOVE, 2), "file page 2 is not changed")


# ---- holes: munmap, mprotect, mremap -----------------------------------------------------------
@scenario("memory", "munmap makes two holes in a mapping: the rest keeps its contents, the "
          "holes stay unmapped, and a page mapped into a hole after restart is zero",
          files=PROBE_FILE)
def memory_munmap_holes(p):
    m = Mem(p)
    p.mmap(A, 5 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    for i in range(5):
        p.store(A + i * PAGE + 3, f"page-{i}")
    p.do("munmap", A + PAGE, PAGE)
    p.do("munmap", A + 3 * PAGE, PAGE)
    p.ckpt()
    for i in (0, 2, 4):
        p.check_mem(A + i * PAGE + 3, f"page-{i}", f"page {i}")
    m.unmapped(A + PAGE, PAGE, "hole at page 1")
    m.unmapped(A + 3 * PAGE, PAGE, "hole at page 3")
    m.ok("mmap", A + PAGE, PAGE, PROT_RW, MAP_PRIVATE_ANON | MAP_FIXED_NOREPLACE, want=A + PAGE,
         label="the hole at page 1 is free")
    p.check_mem(A + PAGE + 3, zeros(6), "a page mapped into the hole is zero (old contents gone)")
    m.writable(A + 4 * PAGE, "page 4")


@scenario("memory", "mprotect splits a mapping into read-write, read-only and PROT_NONE parts: "
          "each keeps its protection and contents after restart", files=PROBE_FILE)
def memory_mprotect_split(p):
    m = Mem(p)
    p.mmap(A, 4 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    for i in range(4):
        p.store(A + i * PAGE + 50, f"prot-page-{i}")
    m.ok("mprotect", A + PAGE, 2 * PAGE, PROT_READ, label="mprotect read-only")
    m.ok("mprotect", A + 3 * PAGE, PAGE, 0, label="mprotect none")
    p.ckpt()
    p.check_mem(A + 50, "prot-page-0", "page 0")
    m.writable(A, "page 0")
    p.check_mem(A + PAGE + 50, "prot-page-1", "read-only page 1")
    p.check_mem(A + 2 * PAGE + 50, "prot-page-2", "read-only page 2")
    m.read_only(A + PAGE, "page 1")
    m.read_only(A + 2 * PAGE + PAGE - 1, "page 2, last byte")
    m.unreadable(A + 3 * PAGE + 50, "PROT_NONE page 3")
    m.read_only(A + 3 * PAGE, "PROT_NONE page 3")
    m.ok("mprotect", A + 3 * PAGE, PAGE, PROT_READ, label="page 3 made readable")
    p.check_mem(A + 3 * PAGE + 50, "prot-page-3", "PROT_NONE page 3 kept its contents")
    m.ok("mprotect", A + PAGE, PAGE, PROT_RW, label="page 1 made writable")
    m.writable(A + PAGE, "page 1 after mprotect")
    m.read_only(A + 2 * PAGE, "page 2 still")


@scenario("memory", "mremap grows a mapping in place: old pages keep contents, new pages are "
          "zero and writable", files=PROBE_FILE)
def memory_mremap_grow(p):
    m = Mem(p)
    p.mmap(A, 2 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.store(A, "grow-0")
    p.store(A + PAGE, "grow-1")
    m.ok("mremap", A, 2 * PAGE, 4 * PAGE, 0, want=A, label="mremap in place")
    p.store(A + 3 * PAGE + 9, "grown-3")
    p.ckpt()
    p.check_mem(A, "grow-0", "page 0")
    p.check_mem(A + PAGE, "grow-1", "page 1")
    p.check_mem(A + 2 * PAGE, zeros(), "new page 2 is zero")
    p.check_mem(A + 3 * PAGE + 9, "grown-3", "new page 3")
    m.writable(A + 2 * PAGE + 100, "new page 2")


@scenario("memory", "mremap shrinks a mapping: the head keeps its contents, the tail is "
          "unmapped, and growing it again after restart gives zero pages", files=PROBE_FILE)
def memory_mremap_shrink(p):
    m = Mem(p)
    p.mmap(A, 4 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    for i in range(4):
        p.store(A + i * PAGE, f"shrink-{i}")
    m.ok("mremap", A, 4 * PAGE, PAGE, 0, want=A, label="mremap shrink")
    p.ckpt()
    p.check_mem(A, "shrink-0", "page 0")
    m.unmapped(A + PAGE, PAGE, "page 1")
    m.unmapped(A + 3 * PAGE, PAGE, "page 3")
    m.ok("mremap", A, PAGE, 3 * PAGE, 0, want=A, label="grow again")
    p.check_mem(A + PAGE, zeros(8), "page 1 is zero after regrowing")
    p.check_mem(A + 2 * PAGE, zeros(8), "page 2 is zero after regrowing")
    p.check_mem(A, "shrink-0", "page 0 after regrowing")


@scenario("memory", "mremap moves a mapping (MAYMOVE|FIXED, and MAYMOVE when it cannot grow in "
          "place): contents move with it, the old ranges are unmapped", files=PROBE_FILE)
def memory_mremap_move(p):
    m = Mem(p)
    p.mmap(A, 3 * PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    for i in range(3):
        p.store(A + i * PAGE + 1, f"move-{i}")
    m.ok("mremap", A, 3 * PAGE, 3 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, C, want=C,
         label="mremap fixed")
    # B cannot grow in place (a guard mapping follows it): the kernel picks a new address.
    p.mmap(B, PAGE, PROT_RW, ANON_PRIVATE_FIXED)
    p.mmap(B + PAGE, PAGE, PROT_READ, ANON_PRIVATE_FIXED)
    p.store(B + 5, "grows-elsewhere")
    moved = p.mremap(B, PAGE, 2 * PAGE, MREMAP_MAYMOVE)
    p.check(moved, "!=", B, "B moved")
    p.ckpt()
    for i in range(3):
        p.check_mem(C + i * PAGE + 1, f"move-{i}", f"moved page {i}")
    m.unmapped(A, 3 * PAGE, "the old range")
    m.writable(C + 2 * PAGE + 100, "moved page 2")
    p.add(moved, 5)
    p.check_mem(moved, "grows-elsewhere", "B's contents at its new address")
    m.unmapped(B, PAGE, "B's old page")
    p.check_mem(B + PAGE, zeros(8), "the guard mapping is still there")


# ---- fork: copy-on-write and sharing ------------------------------------------------------------

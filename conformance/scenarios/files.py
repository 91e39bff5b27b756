"""Conformance scenarios: files.

Regular files survive a checkpoint in the file system, so what these scenarios check is what
lives in the open file descriptions and fd tables: offsets, status flags, sharing by dup and
fork, close-on-exec, access modes, fd numbers, the cwd, and the contents of files that only an
open fd still reaches (unlinked).

Status flags are compared exactly with F_GETFL. Linux adds O_LARGEFILE to every regular open
on 64-bit machines, so the scenarios that read F_GETFL pass O_LARGEFILE themselves: the value
is then the same on every backend.
"""
import errno
import os

from ..dsl import *  # noqa: F401,F403
from ..scenario import scenario  # noqa: F401

O_LARGEFILE = 0o100000          # the kernel's value (Python's os.O_LARGEFILE is 0 on x86-64)
SEEK_SET, SEEK_CUR, SEEK_END = os.SEEK_SET, os.SEEK_CUR, os.SEEK_END
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL = 0, 1, 2, 3, 4
F_DUPFD_CLOEXEC = 1030
FD_CLOEXEC = 1
RW_CREAT = O_RDWR | O_CREAT | O_TRUNC
TEXT = "0123456789abcdefghijklmnopqrstuvwxyz"  # 36 bytes: a read shows where the offset was


def err(e: int) -> int:
    """What a failing syscall leaves in its register: -errno as an unsigned 64-bit value."""
    return (-e) & (2**64 - 1)


def res(p):
    """The program's one scratch result register (syscall results that are only checked)."""
    if "_res" not in p.__dict__:
        p._res = p.reg()
    return p._res


def sc(p, name, *args):
    """A syscall whose result goes to the scratch register (returned, for one check)."""
    r = res(p)
    p.raw(r, name, *args)
    return r


def write_text(p, fd, buf, text: str):
    p.store(buf, text)
    return sc(p, "write", fd, buf, len(text.encode()))


def read_check(p, fd, buf, text: str, label: str) -> None:
    """Read len(text) bytes from fd into buf: the count and the bytes must be ``text``'s."""
    n = len(text.encode())
    p.check(sc(p, "read", fd, buf, n), "==", n, f"{label}: byte count")
    p.check_mem(buf, text, label)


def buffer(p):
    return p.mmap(0, PAGE, PROT_RW, MAP_PRIVATE_ANON)


def offset_is(p, fd, want: int, label: str) -> None:
    """lseek(fd, 0, SEEK_CUR) == want (the file offset, without moving it)."""
    p.check(sc(p, "lseek", fd, 0, SEEK_CUR), "==", want, label)


@scenario("files", "a regular file's offset is kept: the next read continues where it was")
def files_offset(p):
    buf = buffer(p)
    fd = p.open("/data/f", RW_CREAT, 0o644)
    p.check(write_text(p, fd, buf, TEXT), "==", len(TEXT), "setup write")
    p.check(sc(p, "lseek", fd, 7, SEEK_SET), "==", 7, "setup lseek")
    read_check(p, fd, buf, "789", "setup read")            # offset 10 now
    p.ckpt()
    offset_is(p, fd, 10, "offset after restart")
    read_check(p, fd, buf, "abcde", "read continues at the saved offset")
    offset_is(p, fd, 15, "offset moves on from the saved one")
    p.store(buf, "XY")
    p.check(sc(p, "write", fd, buf, 2), "==", 2, "write after restart")
    p.check(sc(p, "pread", fd, buf, 6, 13), "==", 6, "pread count")
    p.check_mem(buf, "deXYhi", "write went to the saved offset")


@scenario("files", "a file offset survives several checkpoint/restart cycles in a row",
          restarts=3)
def files_offset_restarts(p):
    buf = buffer(p)
    fd = p.open("/data/g", RW_CREAT, 0o644)
    write_text(p, fd, buf, TEXT)
    p.do("lseek", fd, 20, SEEK_SET)
    p.ckpt()
    offset_is(p, fd, 20, "offset after three restarts")
    read_check(p, fd, buf, "klmn", "read at the saved offset")


@scenario("files", "an O_APPEND file still appends after restart, whatever its offset")
def files_append(p):
    buf = buffer(p)
    setup = p.open("/data/log", RW_CREAT, 0o644)
    write_text(p, setup, buf, "head;")
    p.do("close", setup)
    fd = p.open("/data/log", O_RDWR | O_APPEND | O_LARGEFILE)
    write_text(p, fd, buf, "one;")
    p.do("lseek", fd, 1, SEEK_SET)                               # reading position: 1
    p.ckpt()
    p.check(sc(p, "fcntl", fd, F_GETFL), "==", O_RDWR | O_APPEND | O_LARGEFILE, "O_APPEND kept")
    offset_is(p, fd, 1, "offset kept")
    p.check(write_text(p, fd, buf, "two;"), "==", 4, "write after restart")
    offset_is(p, fd, 13, "an appending write leaves the offset at the end")
    p.check(sc(p, "pread", fd, buf, 13, 0), "==", 13, "file size after the append")
    p.check_mem(buf, "head;one;two;", "write after restart appended")


@scenario("files", "dup'ed fds share one description after restart: a read through one moves the other")
def files_dup_shared_offset(p):
    buf = buffer(p)
    a = p.open("/data/d", RW_CREAT | O_LARGEFILE, 0o644)   # F_GETFL is read below
    write_text(p, a, buf, TEXT)
    p.do("lseek", a, 4, SEEK_SET)
    b = p.dup(a)
    c = p.fcntl(a, F_DUPFD, 30)                            # fd 30 or above
    p.ckpt()
    offset_is(p, b, 4, "dup sees the saved offset")
    read_check(p, a, buf, "456", "read through the first fd")
    offset_is(p, b, 7, "the read moved the dup's offset")
    offset_is(p, c, 7, "the read moved the F_DUPFD copy's offset")
    read_check(p, c, buf, "78", "read through the F_DUPFD copy")
    offset_is(p, a, 9, "the copy's read moved the first fd's offset")
    p.check(sc(p, "fcntl", a, F_SETFL, O_APPEND), "==", 0, "F_SETFL O_APPEND on one fd")
    p.check(sc(p, "fcntl", b, F_GETFL), "==", O_RDWR | O_APPEND | O_LARGEFILE,
            "status flags are shared too")


@scenario("files", "parent and child share a description inherited over fork after restart")
def files_fork_shared_offset(p):
    buf = buffer(p)
    fd = p.open("/data/shared", RW_CREAT, 0o644)
    write_text(p, fd, buf, TEXT)
    p.do("lseek", fd, 2, SEEK_SET)
    child = p.fork()
    with p.child(child):
        p.ckpt()
        read_check(p, fd, buf, "2345", "child reads at the shared offset")
        offset_is(p, fd, 6, "child's offset after its read")
    p.ckpt()
    p.wait_child(child)
    offset_is(p, fd, 6, "the child's read moved the parent's offset")
    read_check(p, fd, buf, "67", "parent reads after the child's bytes")


@scenario("files", "close-on-exec flags are kept per fd (F_GETFD), apart from the shared file")
def files_cloexec(p):
    plain = p.open("/data/c1", RW_CREAT, 0o644)
    cloexec = p.open("/data/c2", RW_CREAT | O_CLOEXEC, 0o644)
    dup_ce = p.fcntl(plain, F_DUPFD_CLOEXEC, 0)             # same file as plain, flag set
    dup3_ce = p.dup3(plain, 40, O_CLOEXEC)
    set_later = p.dup(cloexec)                              # dup clears the flag...
    p.do("fcntl", set_later, F_SETFD, FD_CLOEXEC)                 # ...and F_SETFD sets it again
    cleared = p.dup(cloexec)
    p.ckpt()
    p.check(sc(p, "fcntl", plain, F_GETFD), "==", 0, "plain open: no close-on-exec")
    p.check(sc(p, "fcntl", cloexec, F_GETFD), "==", FD_CLOEXEC, "O_CLOEXEC open")
    p.check(sc(p, "fcntl", dup_ce, F_GETFD), "==", FD_CLOEXEC, "F_DUPFD_CLOEXEC")
    p.check(sc(p, "fcntl", dup3_ce, F_GETFD), "==", FD_CLOEXEC, "dup3 O_CLOEXEC")
    p.check(sc(p, "fcntl", set_later, F_GETFD), "==", FD_CLOEXEC, "F_SETFD FD_CLOEXEC")
    p.check(sc(p, "fcntl", cleared, F_GETFD), "==", 0, "dup of a close-on-exec fd")


@scenario("files", "an unlinked but open file keeps its contents; its path stays absent")
def files_unlinked_open(p):
    buf = buffer(p)
    fd = p.open("/data/gone", RW_CREAT, 0o644)
    write_text(p, fd, buf, "still here after unlink")
    p.do("lseek", fd, 6, SEEK_SET)
    ro = p.open("/data/gone", O_RDONLY)
    p.do("unlink", "/data/gone")
    p.ckpt()
    p.check(sc(p, "open", "/data/gone", O_RDONLY), "==", err(errno.ENOENT), "path still absent")
    offset_is(p, fd, 6, "offset kept")
    read_check(p, fd, buf, "here", "contents readable at the offset")
    p.store(buf, "HERE")
    p.check(sc(p, "pwrite", fd, buf, 4, 6), "==", 4, "write to the unlinked file")
    p.check(sc(p, "pread", ro, buf, 23, 0), "==", 23, "second open: byte count")
    p.check_mem(buf, "still HERE after unlink", "both fds reach the same unlinked inode")
    p.check(sc(p, "open", "/data/gone", O_RDONLY), "==", err(errno.ENOENT), "path absent at the end")


@scenario("files", "the cwd is kept: relative paths resolve in it after restart")
def files_cwd(p):
    buf = buffer(p)
    p.do("mkdir", "/data/dir", 0o755)
    for path, text in (("/data/dir/rel", "in dir"), ("/data/rel", "in data")):
        fd = p.open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        write_text(p, fd, buf, text)
        p.do("close", fd)
    p.do("chdir", "/data/dir")
    child = p.fork()
    with p.child(child):
        p.do("chdir", "..")                                        # a cwd of its own: /data
        p.ckpt()
        fd = p.open("rel", O_RDONLY)
        read_check(p, fd, buf, "in data", "child's relative open resolves in its own cwd")
    p.ckpt()
    fd = p.open("rel", O_RDONLY)
    read_check(p, fd, buf, "in dir", "relative open resolves in the saved cwd")
    new = p.open("made", O_WRONLY | O_CREAT, 0o644)
    write_text(p, new, buf, "made here")
    ab = p.open("/data/dir/made", O_RDONLY)
    read_check(p, ab, buf, "made here", "a relative create lands in the saved cwd")
    p.wait_child(child)


@scenario("files", "access modes are kept: read-only, write-only and read-write fds")
def files_access_modes(p):
    buf = buffer(p)
    fd = p.open("/data/modes", RW_CREAT, 0o644)
    write_text(p, fd, buf, TEXT)
    p.do("close", fd)
    ro = p.open("/data/modes", O_RDONLY | O_LARGEFILE)
    wo = p.open("/data/modes", O_WRONLY | O_LARGEFILE)
    rw = p.open("/data/modes", O_RDWR | O_LARGEFILE)
    p.ckpt()
    p.check(sc(p, "write", ro, buf, 1), "==", err(errno.EBADF), "write to a read-only fd: EBADF")
    p.check(sc(p, "read", wo, buf, 1), "==", err(errno.EBADF), "read from a write-only fd: EBADF")
    p.check(sc(p, "fcntl", ro, F_GETFL), "==", O_RDONLY | O_LARGEFILE, "read-only flags")
    p.check(sc(p, "fcntl", wo, F_GETFL), "==", O_WRONLY | O_LARGEFILE, "write-only flags")
    p.check(sc(p, "fcntl", rw, F_GETFL), "==", O_RDWR | O_LARGEFILE, "read-write flags")
    p.check(write_text(p, wo, buf, "W"), "==", 1, "write-only fd writes")
    read_check(p, ro, buf, "W1", "read-only fd reads")
    p.do("lseek", rw, 2, SEEK_SET)
    p.check(write_text(p, rw, buf, "R"), "==", 1, "read-write fd writes")
    read_check(p, rw, buf, "3", "read-write fd reads")


@scenario("files", "O_NONBLOCK and other status flags set with F_SETFL are kept")
def files_status_flags(p):
    a = p.open("/data/nb", RW_CREAT | O_NONBLOCK | O_LARGEFILE, 0o644)
    b = p.open("/data/nb", O_RDONLY | O_LARGEFILE)
    p.do("fcntl", b, F_SETFL, O_NONBLOCK | O_APPEND)
    c = p.open("/data/nb", O_WRONLY | O_APPEND | O_NONBLOCK | O_LARGEFILE)
    p.do("fcntl", c, F_SETFL, 0)                                   # clears both
    p.ckpt()
    p.check(sc(p, "fcntl", a, F_GETFL), "==", O_RDWR | O_NONBLOCK | O_LARGEFILE, "O_NONBLOCK at open")
    p.check(sc(p, "fcntl", b, F_GETFL), "==", O_RDONLY | O_NONBLOCK | O_APPEND | O_LARGEFILE,
            "O_NONBLOCK|O_APPEND by F_SETFL")
    p.check(sc(p, "fcntl", c, F_GETFL), "==", O_WRONLY | O_LARGEFILE, "flags cleared by F_SETFL")


@scenario("files", "a file truncated below and one extended above the offset keep both offset and size")
def files_truncate_extend(p):
    buf = buffer(p)
    small = p.open("/data/small", RW_CREAT, 0o644)
    write_text(p, small, buf, TEXT)                           # offset 36
    p.do("ftruncate", small, 10)                                   # offset now past the end
    big = p.open("/data/big", RW_CREAT, 0o644)
    write_text(p, big, buf, "abc")
    p.do("ftruncate", big, 3 * PAGE)                               # a hole after "abc"
    p.do("lseek", big, PAGE - 2, SEEK_SET)
    p.ckpt()
    offset_is(p, small, 36, "offset past the end kept")
    p.check(sc(p, "read", small, buf, 4), "==", 0, "read past the end: nothing")
    p.check(sc(p, "pread", small, buf, 16, 0), "==", 10, "truncated size")
    p.check_mem(buf, "0123456789", "contents before the truncation point")
    offset_is(p, big, PAGE - 2, "offset in the extended file kept")
    p.store(buf, "zzzz")
    read_check(p, big, buf, "\0\0\0\0", "the extension reads as zeros")
    p.check(sc(p, "lseek", big, 0, SEEK_END), "==", 3 * PAGE, "extended size")
    p.check(sc(p, "pread", big, buf, 4, 0), "==", 4, "pread the head")
    p.check_mem(buf, "abc\0", "head of the extended file")


@scenario("files", "fifty open fds: ten descriptions at their own offsets, each on five fds")
def files_many_fds(p):
    buf = buffer(p)
    fd = p.open("/data/many", RW_CREAT, 0o644)
    text = "".join(chr(ord("A") + i % 26) + chr(ord("a") + i // 26) for i in range(20))
    write_text(p, fd, buf, text)
    p.do("close", fd)
    for j in range(10):                  # description j: fds 200+5j .. 204+5j, offset 3j
        first = 200 + 5 * j
        p.raw(fd, "open", "/data/many", O_RDONLY)
        p.do("dup2", fd, first)
        p.do("close", fd)
        p.do("lseek", first, 3 * j, SEEK_SET)
        for k in range(1, 5):
            p.do("dup3", first, first + k, O_CLOEXEC if k == 4 else 0)
    p.ckpt()
    p.check(sc(p, "fcntl", 200, F_DUPFD, 200), "==", 250, "fds 200..249 are all open")
    for j in range(10):
        first = 200 + 5 * j
        read_check(p, first + 3, buf, text[3 * j:3 * j + 2], f"fd {first + 3} reads at its offset")
        offset_is(p, first, 3 * j + 2, f"fd {first} shares the offset of fd {first + 3}")
    for fd_no, want in ((203, 0), (204, FD_CLOEXEC), (248, 0), (249, FD_CLOEXEC)):
        p.check(sc(p, "fcntl", fd_no, F_GETFD), "==", want, f"fd {fd_no} close-on-exec flag")


@scenario("files", "fd numbers with gaps (dup2 to 100, 517, 1023) keep their numbers")
def files_fd_gaps(p):
    buf = buffer(p)
    fd = p.open("/data/gaps", RW_CREAT, 0o644)
    write_text(p, fd, buf, TEXT)
    p.do("lseek", fd, 3, SEEK_SET)
    p.do("dup2", fd, 100)
    p.do("dup2", fd, 517)
    p.do("dup2", fd, 1023)
    p.do("close", fd)
    p.ckpt()
    p.check(sc(p, "fcntl", fd, F_GETFD), "==", err(errno.EBADF), "the original fd stays closed")
    p.check(sc(p, "fcntl", 99, F_GETFD), "==", err(errno.EBADF), "fd 99 stays free")
    p.check(sc(p, "fcntl", 101, F_GETFD), "==", err(errno.EBADF), "fd 101 stays free")
    read_check(p, 100, buf, "34", "fd 100")
    read_check(p, 517, buf, "56", "fd 517 shares the description")
    read_check(p, 1023, buf, "78", "fd 1023 shares the description")
    p.check(sc(p, "dup", 1023), "==", fd, "the lowest free fd is the closed one")


@scenario("files", "an open directory fd stays a directory (EISDIR on read) with its flags")
def files_directory_fd(p):
    buf = buffer(p)
    p.do("mkdir", "/data/opened", 0o755)
    d = p.open("/data/opened", O_RDONLY | os.O_DIRECTORY | O_LARGEFILE)
    p.ckpt()
    p.check(sc(p, "read", d, buf, 1), "==", err(errno.EISDIR), "read on the directory fd: EISDIR")
    p.check(sc(p, "fcntl", d, F_GETFL), "==", O_RDONLY | os.O_DIRECTORY | O_LARGEFILE,
            "directory fd flags")
    p.check(sc(p, "write", d, buf, 1), "==", err(errno.EBADF), "write on it: EBADF")

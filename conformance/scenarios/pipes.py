"""Conformance scenarios: pipes and FIFOs.

What must survive: the bytes queued in a pipe (in order, none lost, none added), the reader
and writer counts (EOF and EPIPE come from them), the status flags of each end, the sharing of
one pipe among tasks, and tasks blocked on a pipe (or in a FIFO open) at the checkpoint, which
carry on once a peer acts after restart.

Checks of emptiness use a non-blocking read: EAGAIN means "empty, and a writer is still
there"; 0 would mean the writers were lost, data would mean bytes were made up.
"""
import errno

from ..dsl import *  # noqa: F401,F403
from ..dsl import Reg, STATUS_REG
from ..scenario import scenario  # noqa: F401
from .files import (F_GETFD, F_GETFL, F_SETFL, FD_CLOEXEC, O_LARGEFILE, buffer, err, read_check,
                    sc, write_text)

PIPE_CAPACITY = 65536
SIGPIPE, SIG_IGN = 13, 1


def pipe2(p, flags: int) -> tuple[Reg, Reg]:
    r, w = p.reg(), p.reg()
    p.raw(r, "pipe2", flags, w.n)
    return r, w


def pattern(n: int, seed: int = 1) -> str:
    """n printable bytes that do not repeat with a short period (a lost or moved chunk shows)."""
    out, x = [], seed
    for _ in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(chr(0x21 + (x >> 16) % 94))
    return "".join(out)


def check_empty(p, rfd, buf, label: str) -> None:
    """The pipe is empty and still has a writer: a non-blocking read gets EAGAIN.
    (Leaves the read end non-blocking.)"""
    p.do("fcntl", rfd, F_SETFL, O_NONBLOCK)
    p.check(sc(p, "read", rfd, buf, 1), "==", err(errno.EAGAIN), label)


@scenario("pipes", "an empty pipe stays empty, with both ends working")
def pipe_empty(p):
    buf = buffer(p)
    r, w = p.pipe()
    p.ckpt()
    check_empty(p, r, buf, "empty pipe: EAGAIN, not EOF or data")
    p.check(write_text(p, w, buf, "ping"), "==", 4, "write after restart")
    read_check(p, r, buf, "ping", "the write end feeds the read end")
    p.do("close", w)
    p.check(sc(p, "read", r, buf, 1), "==", 0, "EOF once the only writer closes")


@scenario("pipes", "a partly full pipe keeps its unread bytes, in order")
def pipe_partly_full(p):
    buf = buffer(p)
    r, w = p.pipe()
    write_text(p, w, buf, "hello, ")
    write_text(p, w, buf, "checkpointed world")
    read_check(p, r, buf, "hel", "setup read")
    p.ckpt()
    read_check(p, r, buf, "lo, checkpointed world", "the unread bytes after restart")
    check_empty(p, r, buf, "no byte added")
    write_text(p, w, buf, "more")
    read_check(p, r, buf, "more", "a write after restart")


@scenario("pipes", "a full pipe (64 KiB) stays full: EAGAIN on write, the same bytes read back",
          restarts=2)
def pipe_full(p):
    data = pattern(PIPE_CAPACITY)
    buf = p.mmap(0, PIPE_CAPACITY, PROT_RW, MAP_PRIVATE_ANON)
    r, w = pipe2(p, O_NONBLOCK)
    p.store(buf, data)
    p.check(sc(p, "write", w, buf, PIPE_CAPACITY), "==", PIPE_CAPACITY, "fill the pipe")
    p.check(sc(p, "write", w, buf, 1), "==", err(errno.EAGAIN), "full before the checkpoint")
    p.store(buf, "x" * 16)
    p.ckpt()
    p.check(sc(p, "write", w, buf, 1), "==", err(errno.EAGAIN), "still full after restart")
    p.check(sc(p, "read", r, buf, PIPE_CAPACITY + 1), "==", PIPE_CAPACITY, "64 KiB read back")
    p.check_mem(buf, data, "the same 64 KiB, in order")
    p.check(sc(p, "read", r, buf, 1), "==", err(errno.EAGAIN), "nothing more")
    p.check(sc(p, "write", w, buf, 1), "==", 1, "room again once drained")


@scenario("pipes", "a pipe whose write end was closed: the queued bytes, then EOF")
def pipe_writer_closed_eof(p):
    buf = buffer(p)
    r, w = p.pipe()
    write_text(p, w, buf, "last words")
    p.do("close", w)
    p.ckpt()
    p.check(sc(p, "fcntl", w, F_GETFD), "==", err(errno.EBADF), "the write end stays closed")
    read_check(p, r, buf, "last words", "queued bytes after restart")
    p.check(sc(p, "read", r, buf, 1), "==", 0, "then EOF")


@scenario("pipes", "a pipe whose read end was closed: EPIPE on write (SIGPIPE ignored)")
def pipe_reader_closed_epipe(p):
    buf = buffer(p)
    p.do("sigaction", SIGPIPE, SIG_IGN, 0, 0)
    r, w = p.pipe()
    write_text(p, w, buf, "unread")
    p.do("close", r)
    p.ckpt()
    p.check(write_text(p, w, buf, "x"), "==", err(errno.EPIPE), "write with no reader: EPIPE")
    p.check(sc(p, "fcntl", r, F_GETFD), "==", err(errno.EBADF), "the read end stays closed")


@scenario("pipes", "a write to a pipe with no reader after restart kills the writer by SIGPIPE")
def pipe_sigpipe_kills(p):
    buf = buffer(p)
    r, w = p.pipe()
    child = p.fork()
    with p.child(child):
        p.do("close", r)
        p.ckpt()
        write_text(p, w, buf, "x")                           # SIGPIPE: dies here
        p.exit(3)
    p.do("close", r)
    p.ckpt()
    got = p.call("wait4", child)
    p.check(got, "==", child, "child reaped")
    p.check(Reg(STATUS_REG), "==", SIGPIPE, "child killed by SIGPIPE")


@scenario("pipes", "a pipe shared by parent and child: bytes from before and after, then EOF")
def pipe_shared_parent_child(p):
    buf = buffer(p)
    r, w = p.pipe()
    write_text(p, w, buf, "before;")
    child = p.fork()
    with p.child(child):
        p.do("close", w)
        p.ckpt()
        read_check(p, r, buf, "before;", "child reads what the parent queued")
        read_check(p, r, buf, "after;", "child reads what the parent wrote after restart")
        p.check(sc(p, "read", r, buf, 1), "==", 0, "EOF when the parent closes its end")
    p.do("close", r)
    p.ckpt()
    write_text(p, w, buf, "after;")
    p.do("close", w)
    p.wait_child(child)


@scenario("pipes", "reader and writer counts: EOF only after the last of two writers closes")
def pipe_two_writers(p):
    buf = buffer(p)
    r, w = p.pipe()
    child = p.fork()
    with p.child(child):
        p.ckpt()
        p.do("close", r)
        write_text(p, w, buf, "child")
        p.do("close", w)                                     # a writer remains: the parent
    p.ckpt()
    p.wait_child(child)
    read_check(p, r, buf, "child", "the child's bytes")
    check_empty(p, r, buf, "the parent still holds a write end: EAGAIN, not EOF")
    p.do("close", w)
    p.check(sc(p, "read", r, buf, 1), "==", 0, "EOF after the last writer")


@scenario("pipes", "a task blocked reading an empty pipe at the checkpoint gets the bytes written after restart")
def pipe_reader_blocked(p):
    buf = buffer(p)
    r, w = p.pipe()
    child = p.fork()
    with p.child(child):
        read_check(p, r, buf, "wake up", "the blocked read returns the parent's bytes")
    p.ckpt()
    write_text(p, w, buf, "wake up")
    p.wait_child(child)
    check_empty(p, r, buf, "the child took all of it")


@scenario("pipes", "a task blocked writing to a full pipe at the checkpoint finishes once the pipe drains")
def pipe_writer_blocked(p):
    data = pattern(PIPE_CAPACITY, seed=7)
    buf = p.mmap(0, PIPE_CAPACITY, PROT_RW, MAP_PRIVATE_ANON)
    r, w = p.pipe()
    p.store(buf, data)
    p.check(sc(p, "write", w, buf, PIPE_CAPACITY), "==", PIPE_CAPACITY, "fill the pipe")
    child = p.fork()
    with p.child(child):
        p.check(write_text(p, w, buf, "blocked tail"), "==", 12, "the blocked write completes")
    p.ckpt()
    p.check(sc(p, "read", r, buf, PIPE_CAPACITY), "==", PIPE_CAPACITY, "drain 64 KiB")
    p.check_mem(buf, data, "the 64 KiB queued before the checkpoint")
    read_check(p, r, buf, "blocked tail", "then the blocked writer's bytes")
    p.wait_child(child)


@scenario("pipes", "a round trip through two pipes between parent and child after restart")
def pipe_round_trip(p):
    buf = buffer(p)
    down_r, down_w = p.pipe()
    up_r, up_w = p.pipe()
    write_text(p, down_w, buf, "ping")
    child = p.fork()
    with p.child(child):
        p.ckpt()
        read_check(p, down_r, buf, "ping", "child reads the request")
        write_text(p, up_w, buf, "pong")
    p.ckpt()
    read_check(p, up_r, buf, "pong", "parent reads the answer")
    p.wait_child(child)


@scenario("pipes", "O_NONBLOCK on pipe ends (pipe2 and F_SETFL) is kept per end")
def pipe_nonblock(p):
    buf = buffer(p)
    r, w = pipe2(p, O_NONBLOCK)
    r2, w2 = p.pipe()
    p.do("fcntl", r2, F_SETFL, O_NONBLOCK)                   # the read end only
    p.ckpt()
    p.check(sc(p, "fcntl", r, F_GETFL), "==", O_RDONLY | O_NONBLOCK, "pipe2 read end")
    p.check(sc(p, "fcntl", w, F_GETFL), "==", O_WRONLY | O_NONBLOCK, "pipe2 write end")
    p.check(sc(p, "fcntl", r2, F_GETFL), "==", O_RDONLY | O_NONBLOCK, "F_SETFL read end")
    p.check(sc(p, "fcntl", w2, F_GETFL), "==", O_WRONLY, "the other end stays blocking")
    p.check(sc(p, "read", r, buf, 1), "==", err(errno.EAGAIN), "non-blocking read: EAGAIN")
    p.check(sc(p, "read", r2, buf, 1), "==", err(errno.EAGAIN), "F_SETFL'd read: EAGAIN")


@scenario("pipes", "close-on-exec pipe ends and a pipe end dup'ed to a high fd")
def pipe_cloexec_dup(p):
    buf = buffer(p)
    r, w = pipe2(p, O_CLOEXEC)
    p.do("dup2", w, 77)
    p.do("close", w)
    p.ckpt()
    p.check(sc(p, "fcntl", r, F_GETFD), "==", FD_CLOEXEC, "pipe2 O_CLOEXEC read end")
    p.check(sc(p, "fcntl", 77, F_GETFD), "==", 0, "dup2 clears close-on-exec")
    write_text(p, 77, buf, "via 77")
    read_check(p, r, buf, "via 77", "fd 77 is the pipe's write end")
    p.do("close", 77)
    p.check(sc(p, "read", r, buf, 1), "==", 0, "fd 77 was the only writer")


@scenario("pipes", "a FIFO open at both ends keeps its queued bytes and its path")
def pipe_fifo(p):
    buf = buffer(p)
    p.do("mkfifo", "/tmp/fifo", 0o600)
    r = p.open("/tmp/fifo", O_RDONLY | O_NONBLOCK | O_LARGEFILE)
    w = p.open("/tmp/fifo", O_WRONLY | O_LARGEFILE)
    write_text(p, w, buf, "queued in the fifo")
    p.ckpt()
    p.check(sc(p, "fcntl", r, F_GETFL), "==", O_RDONLY | O_NONBLOCK | O_LARGEFILE, "read end flags")
    p.check(sc(p, "fcntl", w, F_GETFL), "==", O_WRONLY | O_LARGEFILE, "write end flags")
    read_check(p, r, buf, "queued in the fifo", "queued bytes after restart")
    p.check(sc(p, "read", r, buf, 1), "==", err(errno.EAGAIN), "empty, writer present")
    w2 = p.open("/tmp/fifo", O_WRONLY | O_NONBLOCK)          # ENXIO if no reader were there
    write_text(p, w2, buf, "new opener")
    read_check(p, r, buf, "new opener", "a new open of the path joins the restored FIFO")
    p.do("close", w)
    p.do("close", w2)
    p.check(sc(p, "read", r, buf, 1), "==", 0, "EOF after both writers close")


@scenario("pipes", "a FIFO opened read-write by a parent and read by its child")
def pipe_fifo_rdwr_shared(p):
    buf = buffer(p)
    p.do("mkfifo", "/tmp/rw", 0o600)
    fd = p.open("/tmp/rw", O_RDWR)
    write_text(p, fd, buf, "one;")
    child = p.fork()
    with p.child(child):
        p.ckpt()
        # two reads: one read of 8 would race with the parent's write on a real system
        read_check(p, fd, buf, "one;", "child reads the write from before the checkpoint")
        read_check(p, fd, buf, "two;", "child waits for and reads the write after it")
    p.ckpt()
    write_text(p, fd, buf, "two;")
    p.wait_child(child)


@scenario("pipes", "a task blocked opening a FIFO for reading at the checkpoint completes when a writer opens")
def pipe_fifo_open_blocked(p):
    # The writer stays open until the reader acknowledges: a writer that opened, wrote and
    # closed before the blocked reader ran would find the model short of Linux (the reader
    # misses it; see the report of this module's author), which is not what this scenario tests.
    buf = buffer(p)
    ack_r, ack_w = p.pipe()
    p.do("mkfifo", "/tmp/wait", 0o600)
    child = p.fork()
    with p.child(child):
        fd = p.open("/tmp/wait", O_RDONLY)                   # blocks: no writer yet
        read_check(p, fd, buf, "hi", "the reader gets the writer's bytes")
        write_text(p, ack_w, buf, "ok")
        p.check(sc(p, "read", fd, buf, 1), "==", 0, "EOF when the writer closes")
    p.do("close", ack_w)
    p.ckpt()
    w = p.open("/tmp/wait", O_WRONLY)
    p.check(w, "<", 1024, "open for writing finds the waiting reader")
    write_text(p, w, buf, "hi")
    read_check(p, ack_r, buf, "ok", "the reader acknowledges")
    p.do("close", w)
    p.wait_child(child)


@scenario("pipes", "a FIFO whose writers all closed: the queued bytes, then EOF")
def pipe_fifo_writer_gone(p):
    buf = buffer(p)
    p.do("mkfifo", "/tmp/gone", 0o600)
    r = p.open("/tmp/gone", O_RDONLY | O_NONBLOCK)
    w = p.open("/tmp/gone", O_WRONLY)
    write_text(p, w, buf, "left behind")
    p.do("close", w)
    p.ckpt()
    read_check(p, r, buf, "left behind", "queued bytes after restart")
    p.check(sc(p, "read", r, buf, 1), "==", 0, "EOF: no writer")


@scenario("pipes", "an unlinked FIFO still open read-write keeps its bytes; the path stays absent")
def pipe_fifo_unlinked(p):
    buf = buffer(p)
    p.do("mkfifo", "/tmp/unl", 0o600)
    fd = p.open("/tmp/unl", O_RDWR | O_NONBLOCK)
    write_text(p, fd, buf, "nameless")
    p.do("unlink", "/tmp/unl")
    p.ckpt()
    p.check(sc(p, "open", "/tmp/unl", O_RDONLY | O_NONBLOCK), "==", err(errno.ENOENT),
            "path still absent")
    read_check(p, fd, buf, "nameless", "queued bytes after restart")
    p.check(sc(p, "read", fd, buf, 1), "==", err(errno.EAGAIN), "empty; its own write end remains")

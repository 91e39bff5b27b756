"""The seed's two calls for live processes, with its shapes and return values.

    checkpoint(pid, fd, flags=CHECKPOINT_SUBTREE, logfd=-1) -> crid
    restart(pid, fd, flags=0, logfd=-1) -> the restored root's pid

``checkpoint`` writes the image of the tree at ``pid`` to the open file descriptor ``fd``
(at its position, which it advances) and returns a positive crid. ``pid`` 0 (or the caller's
own pid) is a *self-checkpoint*: the caller is checkpointed while it waits inside this call,
and the call returns the crid; in a process restarted from that image the same call returns
0, as fork() does in a child. ``restart`` reads an image from ``fd`` (mmap'd when ``fd`` is a
regular file, read to its end otherwise) and builds the tree (``pid`` must be 0: the seed's
other form, restoring into processes the caller made, is not supported). With RESTART_GHOST
the caller is only the restart's placeholder: once the tree is restored (and running, or
stopped with RESTART_FROZEN) it exits with status 0 and the call never returns; the tree runs
on, orphaned to the caller's nearest child subreaper (PR_SET_CHILD_SUBREAPER), else to the
init of the caller's pid namespace, which must wait for it.

How a self-checkpoint works with a checkpointer that cannot stop itself: the caller makes a
pipe, forks a helper twice over (so the helper is no descendant of the caller and stays out
of the image), closes the pipe's write end and blocks in read(). The helper checkpoints the
caller, which is stopped inside that read() (the restart re-runs it), writes the crid to the
pipe and exits; the caller returns it. A restarted caller finds the pipe with no writer left:
read() returns end-of-file, and since its start time is not the one it saved before waiting,
the call knows it was restarted and returns 0. A helper that dies without a word (same start
time, no result) is an error, never a false "restarted".

A pid namespace's init gets every orphan of its namespace back as its child, so its helper
is its own child: the helper checkpoints the tree leaving itself out (dump's
``leave_out_self``; it keeps only the fds it uses), and the caller reaps it once it has
answered (a restarted caller has no helper to reap). The helper names the caller by its pid
and finds it in /proc: a caller whose /proc is another pid namespace's (``unshare --pid``
without ``--mount-proc``) is refused with EINVAL rather than checkpointing someone else.

Errors: CheckpointError / RestartError with an errno and a one-line message naming the fd,
flag or object; a failed checkpoint leaves the caller (or target) running as it was.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat

from ckptsim.cr.context import CheckpointError, Log, RestartError
from ckptsim.image import core

from . import kabi

_SUPPORTED_RESTART_FLAGS = core.RESTART_FROZEN | core.RESTART_GHOST
_RESTART_FLAG_NAMES = {core.RESTART_TASKSELF: "RESTART_TASKSELF", core.RESTART_GHOST: "RESTART_GHOST",
                       core.RESTART_KEEP_LSM: "RESTART_KEEP_LSM",
                       core.RESTART_CONN_RESET: "RESTART_CONN_RESET"}
_READ_CHUNK = 1 << 20
_CAP_SYS_PTRACE = 19


# -- file descriptors ---------------------------------------------------------------------
def _check_fd(fd: int, what: str, writable: bool, error=CheckpointError) -> None:
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
        raise error(errno.EBADF, f"{what} {fd!r} is not a file descriptor")
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        raise error(errno.EBADF, f"{what} {fd} is not open") from None
    if writable and mode == os.O_RDONLY:
        raise error(errno.EBADF, f"{what} {fd} is not open for writing")
    if not writable and mode == os.O_WRONLY:
        raise error(errno.EBADF, f"{what} {fd} is not open for reading")


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


class _FdSink:
    """The image writer's sink: the caller's fd, written at its position."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> int:
        _write_all(self.fd, data)
        return len(data)

    def fileno(self) -> int:
        return self.fd


def _log_for(logfd: int) -> Log | None:
    if logfd == -1:
        return None
    log = Log(lambda line: _write_all(logfd, line.encode()))
    log.fd = logfd                      # the leak check's own fds (backend/leaks.py)
    return log


def read_image_fd(fd: int):
    """The image from ``fd``'s position to its end: a private (copy-on-write) mmap for a
    regular file at a page-aligned position, else the bytes read, in a bytearray (the restart
    hands pages to process_vm_writev without a copy, so the buffer is writable). The fd's
    position ends at the end of the file, as after reading the stream."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        if st.st_size <= pos:
            raise RestartError(errno.EINVAL, f"fd {fd} holds no image (empty at position {pos})")
        if pos % mmap.ALLOCATIONGRANULARITY == 0:
            data = mmap.mmap(fd, st.st_size - pos, access=mmap.ACCESS_COPY, offset=pos)
            os.lseek(fd, st.st_size, os.SEEK_SET)
            return data
    chunks = []
    while chunk := os.read(fd, _READ_CHUNK):
        chunks.append(chunk)
    if not chunks:
        raise RestartError(errno.EINVAL, f"fd {fd} holds no image (end of file at once)")
    return bytearray(b"".join(chunks))


# -- restart ------------------------------------------------------------------------------
def restart_from_fd(fd: int, flags: int = 0, logfd: int = -1, *, pidns: bool = True):
    """``restart(0, fd, flags, logfd)`` returning the whole Restored (root, pids, the
    namespace's reaper; ``Restored.child`` is this process's child, to wait for).
    RESTART_GHOST is restart()'s (the caller's exit): here it changes nothing."""
    if flags & ~core.RESTART_USER_FLAGS:
        raise RestartError(errno.EINVAL, f"unknown restart flags {flags & ~core.RESTART_USER_FLAGS:#x}")
    for bit, name in _RESTART_FLAG_NAMES.items():
        if flags & bit and not bit & _SUPPORTED_RESTART_FLAGS:
            raise RestartError(errno.EOPNOTSUPP, f"{name} is not supported yet by the live restart")
    _check_fd(fd, "image fd", writable=False, error=RestartError)
    if logfd != -1:
        _check_fd(logfd, "logfd", writable=True, error=RestartError)
    from .restore.job import restart_image
    data = read_image_fd(fd)
    log = _log_for(logfd)
    try:
        return restart_image(data, pidns=pidns, frozen=bool(flags & core.RESTART_FROZEN),
                             log=(lambda m: log._emit(m)) if log else None)
    finally:
        if isinstance(data, mmap.mmap):
            try:
                data.close()
            except BufferError:      # a view still held (an exception's traceback): GC frees it
                pass


def restart(pid: int, fd: int, flags: int = 0, logfd: int = -1, *, pidns: bool = True) -> int:
    """Restart the image read from ``fd``; returns the restored root's pid (as this process
    sees it). ``flags``: RESTART_FROZEN leaves every restored process stopped (SIGSTOP).
    With ``pidns`` (the default) the tree gets a new pid namespace with its image pids and a
    reaper as its init, this process's child. RESTART_GHOST: this process exits (status 0)
    once the tree is restored; the call returns only by raising."""
    if flags & core.RESTART_TASKSELF:
        # the seed's self_restart: the caller becomes the image's one task (never returns)
        if pid not in (0, os.getpid()) or flags & ~(core.RESTART_TASKSELF):
            raise RestartError(errno.EINVAL, "RESTART_TASKSELF restarts in place of the caller:"
                                             " pass its pid (or 0) and no other flag")
        _check_fd(fd, "image fd", writable=False, error=RestartError)
        from .restore.self_restart import restart_self
        restart_self(read_image_fd(fd))
    if pid != 0:
        raise RestartError(errno.EINVAL, f"restart(pid={pid}): restoring into processes the "
                                         "caller made is not supported; pass 0 to build the tree")
    restored = restart_from_fd(fd, flags, logfd, pidns=pidns)
    if flags & core.RESTART_GHOST:
        # the seed's ghost does do_exit(0) once every task is active: so does this process
        # (its exit hands the tree to the nearest subreaper, as an orphan)
        _ghost_exit()
    return restored.root


def _ghost_exit() -> None:
    import sys
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass                     # closed or absent: nothing to flush
    os._exit(0)


# -- checkpoint ---------------------------------------------------------------------------
def checkpoint(pid: int, fd: int, flags: int = core.CHECKPOINT_SUBTREE, logfd: int = -1) -> int:
    """Checkpoint the live tree at ``pid`` to ``fd``; the crid (> 0). ``pid`` 0 or the
    caller's own pid: a self-checkpoint, which returns 0 in the restarted process."""
    if flags & ~core.CHECKPOINT_USER_FLAGS:
        raise CheckpointError(errno.EINVAL, f"unknown checkpoint flags {flags & ~core.CHECKPOINT_USER_FLAGS:#x}")
    if not isinstance(pid, int) or pid < 0:
        raise CheckpointError(errno.ESRCH, f"no process {pid!r}")
    _check_fd(fd, "image fd", writable=True)
    if logfd != -1:
        _check_fd(logfd, "logfd", writable=True)
    if pid in (0, os.getpid()):
        return _self_checkpoint(fd, flags, logfd)
    from .dump import checkpoint as dump_checkpoint
    return dump_checkpoint(pid, _FdSink(fd), flags, _log_for(logfd))


def _start_time() -> int:
    """This process's start time (clock ticks after boot): a restarted process is a new one."""
    with open("/proc/self/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


def _has_cap(bit: int) -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def _yama_scope() -> int:
    try:
        with open(kabi.YAMA_PTRACE_SCOPE) as f:
            return int(f.read())
    except (FileNotFoundError, ValueError):
        return 0


def _check_traceable() -> None:
    """Refuse early, with the reason, when the helper will not be allowed to trace us."""
    if _has_cap(_CAP_SYS_PTRACE):
        return
    if kabi.syscall(kabi.SYS_prctl, kabi.PR_GET_DUMPABLE, 0, 0, 0, 0) != 1:
        raise CheckpointError(errno.EPERM, "self-checkpoint: this process is not dumpable "
                                           "(PR_SET_DUMPABLE 0), so its helper cannot trace it")
    if _yama_scope() >= 2:
        raise CheckpointError(errno.EPERM, f"self-checkpoint: Yama ptrace_scope {_yama_scope()} "
                                           "allows tracing only with CAP_SYS_PTRACE")


def _check_own_proc() -> None:
    """The checkpointer names processes by their pids in its own pid namespace (ptrace) and
    finds them in /proc: both must agree, or it would checkpoint someone else."""
    try:
        seen = int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        seen = None
    if seen != os.getpid():
        where = f"this process is {seen} there" if seen else "this process is not there"
        raise CheckpointError(errno.EINVAL, f"self-checkpoint: /proc shows another pid "
                                            f"namespace's pids ({where}, {os.getpid()} to "
                                            "itself): mount a /proc of its own (unshare "
                                            "--mount-proc)")


def _self_checkpoint(fd: int, flags: int, logfd: int) -> int:
    """The helper is a grandchild out of the tree; for a pid namespace's init, whose orphans
    all come back to it, a child left out of the image (dump's leave_out_self) that the
    caller reaps once it has answered."""
    from .dump import checkpoint as dump_checkpoint   # before the fork: the helper imports nothing
    _check_traceable()
    _check_own_proc()
    started = _start_time()
    me = os.getpid()
    ns_init = me == 1
    result_r, result_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    subreaper = not ns_init and _is_subreaper()
    helper = 0
    try:
        if subreaper:       # else the orphaned helper would come back to us as our child
            kabi.syscall(kabi.SYS_prctl, kabi.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        if ns_init:
            helper = os.fork()
            if helper == 0:
                _helper(dump_checkpoint, me, fd, flags, logfd, result_r, result_w, go_r, go_w,
                        in_tree=True)
        else:
            middle = os.fork()
            if middle == 0:
                try:
                    if os.fork() == 0:
                        _helper(dump_checkpoint, me, fd, flags, logfd, result_r, result_w, go_r,
                                go_w)
                finally:
                    os._exit(0)
            os.waitpid(middle, 0)
        os.close(result_w)
        result_w = -1
        os.close(go_r)
        go_r = -1
    except BaseException:
        for end in (result_r, result_w, go_r, go_w):
            if end >= 0:
                os.close(end)
        _end_helper(helper)
        raise
    finally:
        if subreaper:
            kabi.syscall(kabi.SYS_prctl, kabi.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    answer = ""
    try:
        hello = _read_until_eof(result_r, stop_at_newline=True)
        if not hello.startswith(b"helper "):
            raise CheckpointError(errno.EIO, "self-checkpoint: the helper process did not start")
        _allow_tracer(int(hello.split()[1]))
        os.write(go_w, b"g")
        os.close(go_w)
        go_w = -1
        # Stopped, checkpointed and (in the original) resumed somewhere in here.
        answer = _read_until_eof(result_r).decode(errors="replace").strip()
    finally:
        os.close(result_r)
        if go_w >= 0:
            os.close(go_w)
        _allow_tracer(kabi.PR_SET_PTRACER_NONE)
        if answer or _start_time() == started:   # not in a restarted process: no helper there
            _end_helper(helper)
    if answer.startswith("crid "):
        return int(answer.split()[1])
    if answer.startswith("error "):
        _, err, message = answer.split(" ", 2)
        raise CheckpointError(int(err), message)
    if _start_time() != started:
        return 0                     # a restarted process: the helper's pipe has no writer
    raise CheckpointError(errno.EIO, "self-checkpoint: the helper process ended without a result")


def _end_helper(helper: int, timeout: float = 10.0) -> None:
    """Reap a helper that is our child: it exits once it has answered (or seen no go); one
    that does not within ``timeout`` is killed."""
    if not helper:
        return
    import signal
    import time
    deadline = time.monotonic() + timeout
    try:
        while not os.waitpid(helper, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.kill(helper, signal.SIGKILL)
                os.waitpid(helper, 0)
                return
            time.sleep(0.002)
    except ChildProcessError:
        pass


def _is_subreaper() -> bool:
    flag = ctypes.c_int(0)
    kabi.syscall(kabi.SYS_prctl, kabi.PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
    return bool(flag.value)


def _allow_tracer(pid: int) -> None:
    if _yama_scope() == 1:
        try:
            kabi.syscall(kabi.SYS_prctl, kabi.PR_SET_PTRACER, pid, 0, 0, 0)
        except OSError:
            pass                     # no Yama after all: nothing to allow


def _read_until_eof(fd: int, stop_at_newline: bool = False) -> bytes:
    got = b""
    while chunk := os.read(fd, 4096):
        got += chunk
        if stop_at_newline and b"\n" in got:
            break
    return got


def _helper(dump_checkpoint, target: int, fd: int, flags: int, logfd: int,
            result_r: int, result_w: int, go_r: int, go_w: int, in_tree: bool = False) -> None:
    """Checkpoint ``target`` once it says go, report, exit (never returns). ``in_tree``: the
    helper is the target's child, left out of the image; it keeps only the fds it uses (the
    others would be references to the tree's files from outside it)."""
    try:
        os.close(result_r)
        os.close(go_w)
        if in_tree:
            keep = sorted({fd, result_w, go_r} | ({logfd} if logfd != -1 else set()))
            low = 0
            for n in keep:
                os.closerange(low, n)
                low = n + 1
            os.closerange(low, 1 << 20)
        _write_all(result_w, f"helper {os.getpid()}\n".encode())
        if os.read(go_r, 1) != b"g":
            os._exit(0)              # the caller gave up before go
        try:
            crid = dump_checkpoint(target, _FdSink(fd), flags, _log_for(logfd),
                                   leave_out_self=in_tree, own_fds=(result_w, go_r))
            answer = f"crid {crid}"
        except CheckpointError as e:
            answer = f"error {e.errno} {e.message}"
        except BaseException as e:   # noqa: BLE001 - reported to the caller as one line
            answer = f"error {errno.EIO} self-checkpoint helper: {type(e).__name__}: {e}"
        _write_all(result_w, (" ".join(answer.split()) + "\n").encode())
    finally:
        os._exit(0)

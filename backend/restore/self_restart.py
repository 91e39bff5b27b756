"""RESTART_TASKSELF: a one-task image restarted in place of the calling process.

As in the seed's self_restart.c, the caller becomes the image's process: it keeps its pid, its
parent, session and group, and from the caller's point of view the call never returns (the
caller's memory, fds, signal state and registers are the image's afterwards). Only a failure
before the caller was touched returns, as a RestoreError.

How: the caller decodes and checks the image (load_job, checksum included: nothing runs on a
corrupted image), makes the transport, then double-forks a worker (the worker is not the
restored program's child: no stray zombie for it to reap) and blocks in read() on a pipe. The
worker seizes the caller with ptrace (PTRACE_O_EXITKILL: a worker that dies half-way takes the
half-restored caller with it), treats it as a stub and runs the per-process and per-thread
steps of job.py on it. On a failure before the first destructive step it writes the reason
into the pipe and lets the caller go, which raises it; after that the caller cannot go on and
is killed (a failed restart leaves no half-restored process running). The caller's own
signal actions are reset to the default first (the restore sets only the image's non-default
ones), and a child subreaper caller is not one while it forks (the worker would come back).

A pid namespace's init cannot restart itself so: every orphan of its namespace comes back to
it, so the worker would stay a zombie child of the restored process; it is refused (EINVAL).
``restart_new_pidns_init`` does it from outside instead: this process forks a child as pid 1
of a new pid namespace, which blocks in read(), and restores it in place as the worker would
(the child keeps its pid 1 and its parent; nothing of the restart is left in the namespace).
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct

from backend import kabi, proc
from backend.ptrace import _ptrace, find_syscall_insn
from .job import RestoreError, load_job
from .memory import free_spot, stub_maps
from .stub import PAGE, STUB_OPTIONS, Stub, StubError
from .transport import Transport
from .tree import TRAMPOLINE_CODE


def _one_task_job(data, log):
    """The decoded, checked job of a one-task image, with its transport made."""
    job = load_job(data, log, background_checksum=False)
    tasks = [t for t in job.by_vpid.values()]
    if len(job.entries) != 1 or tasks[0].state == "zombie":
        raise RestoreError(errno.EINVAL, f"RESTART_TASKSELF needs an image of one live task; "
                                         f"this one has {len(job.entries)} tasks")
    from .elfcheck import verify      # executables and vdso still match, before anything
    verify(tasks, log)
    max_fd = max(list(tasks[0].files.fds) + [2])
    job.transport = Transport(max_fd + 1)
    return job


def restart_self(data, log=None) -> None:
    """Replace the calling process by the image's one task; returns only on failure
    (raising RestoreError), with the caller as it was."""
    if os.getpid() == 1:
        raise RestoreError(errno.EINVAL, "restart --self by a pid namespace's init: its restart "
                                         "worker would come back to it as an orphan and stay a "
                                         "zombie child of the restored process (a new init is "
                                         "restarted in place by its parent: "
                                         "restart_new_pidns_init)")
    job = _one_task_job(data, log)
    me = os.getpid()
    r, w = os.pipe()
    _allow_tracing()
    subreaper = _is_subreaper()
    if subreaper:                            # else the orphaned worker would come back to us
        kabi.syscall(kabi.SYS_prctl, kabi.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    try:
        first = os.fork()
        if first == 0:                       # the first child: fork the worker, then go
            try:
                if os.fork() == 0:
                    os.close(r)
                    os._exit(_worker(job, me, w))
            finally:
                os._exit(0)
        os.waitpid(first, 0)
    finally:
        if subreaper:
            kabi.syscall(kabi.SYS_prctl, kabi.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    os.close(w)                              # (the transport's fd N stays: the stub's end)
    try:
        reason = b""
        while True:                          # returns only if the worker let us go
            chunk = os.read(r, 4096)
            if not chunk:
                break
            reason += chunk
    finally:
        os.close(r)
    job.close()
    _forbid_tracing()
    text = reason.decode(errors="replace").strip() or "the restart worker ended early"
    raise RestoreError(errno.EIO, f"restart --self failed: {text}")


def _allow_tracing() -> None:
    try:
        with open(kabi.YAMA_PTRACE_SCOPE) as f:
            scope = int(f.read())
    except (OSError, ValueError):
        return
    if scope == 1:
        kabi.syscall(kabi.SYS_prctl, kabi.PR_SET_PTRACER, kabi.PR_SET_PTRACER_ANY, 0, 0, 0)


def _forbid_tracing() -> None:
    """Undo _allow_tracing (the restart failed before the caller was touched)."""
    try:
        kabi.syscall(kabi.SYS_prctl, kabi.PR_SET_PTRACER, kabi.PR_SET_PTRACER_NONE, 0, 0, 0)
    except OSError:
        pass                                  # no Yama: nothing was allowed


def _is_subreaper() -> bool:
    flag = ctypes.c_int(0)
    kabi.syscall(kabi.SYS_prctl, kabi.PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
    return bool(flag.value)


def restart_new_pidns_init(data, log=None) -> int:
    """RESTART_TASKSELF for a new pid namespace's init: a child of this process, made pid 1
    of a new pid namespace and blocked in read(), is restored in place (keeping its pid 1 and
    its parent) by this process, outside the namespace. (restart_self in that child cannot
    do it: its worker would come back to it as an orphan and stay its zombie child.)

    Returns the child's pid, this process's child to wait for. On failure the child is killed
    and reaped, and RestoreError raised."""
    job = _one_task_job(data, log)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        child = _fork_new_init(keep=(r, job.transport.fd))
    except BaseException:
        for end in (r, w):
            os.close(end)
        job.close()
        raise
    if child == 0:                           # the new init: wait here to be replaced
        try:
            while os.read(r, 4096):
                pass
        finally:
            os._exit(1)                      # let go: the restart failed
    os.close(r)
    job.transport.seed_spawned()             # the child has the stubs' end
    restore = _InPlace(job, child)
    try:
        restore.run()
    except BaseException as e:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(child, 0)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise RestoreError(getattr(e, "errno", None) or errno.EIO,
                           f"restart of a new pid namespace's init in place failed: {e}") from None
    finally:
        os.close(w)
        job.close()
    return child


def _fork_new_init(keep) -> int:
    """fork(), the child as pid 1 of a new pid namespace holding only the fds ``keep``; this
    process's later children stay in its own namespace (0 in the child)."""
    own = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    pid = -1
    try:
        kabi.syscall(kabi.SYS_unshare, kabi.CLONE_NEWPID, what="unshare(CLONE_NEWPID)")
        pid = os.fork()
        if pid == 0:
            low = 0
            for fd in sorted(keep):
                os.closerange(low, fd)
                low = fd + 1
            os.closerange(low, 1 << 20)
            return 0
    finally:
        if pid != 0:
            try:
                kabi.syscall(kabi.SYS_setns, own, kabi.CLONE_NEWPID,
                             what="setns back to this process's pid namespace")
            finally:
                os.close(own)
    return pid


class _InPlace:
    """The restore of the image's one task into the live process ``target`` (blocked in a
    syscall, not traced yet) by this process. ``touched``: ``target`` was changed, so it
    cannot go on as it was; ``undo`` lets an untouched one go."""

    def __init__(self, job, target: int):
        self.job, self.target = job, target
        self.touched = False
        self.stub = None
        self.tramp = 0

    def run(self) -> None:
        job, target = self.job, self.target
        _ptrace(kabi.PTRACE_SEIZE, target, 0, STUB_OPTIONS)
        _ptrace(kabi.PTRACE_INTERRUPT, target, 0, 0)
        _, status = os.waitpid(target, kabi.WALL)
        if not os.WIFSTOPPED(status):
            raise StubError(errno.ESRCH, "the caller is gone")
        stub = self.stub = Stub(target, target)
        vpid = job.entries[0][0]
        task = job.by_vpid[vpid]
        busy = [(v.start, v.end) for v in task.mm.vmas] + \
            [(s, e) for s, e, _ in stub_maps(target)]
        wanted = free_spot(PAGE, busy, below=0x7e0000000000)
        stub.tramp = find_syscall_insn(target)
        got = stub.syscall(kabi.SYS_mmap, wanted, PAGE,
                           kabi.PROT_READ | kabi.PROT_WRITE | kabi.PROT_EXEC,
                           kabi.MAP_PRIVATE | kabi.MAP_ANONYMOUS | kabi.MAP_FIXED_NOREPLACE,
                           -1, 0, what="mmap of the trampoline")
        self.tramp = stub.tramp = got
        if got != wanted:
            raise StubError(errno.EEXIST, f"trampoline landed at {got:#x}")
        stub.write(self.tramp, TRAMPOLINE_CODE)
        own = _own_ids(target)
        self.touched = True                  # from here on the target cannot go back
        _default_handlers(stub, target)
        stub.unregister_rseq()
        exe = os.readlink(f"/proc/{target}/exe")
        group = job.restore_process(vpid, stub, exe)
        stub.syscall(kabi.SYS_prctl, kabi.PR_SET_PTRACER, kabi.PR_SET_PTRACER_NONE, 0, 0, 0,
                     check=False)      # the caller's Yama exception for us goes with it
        job.finish_group(vpid, group, own_ids=own)
        _ptrace(kabi.PTRACE_DETACH, target, 0, 0)

    def undo(self) -> None:
        """An untouched target: its trampoline unmapped, detached (it runs on as it was)."""
        try:
            if self.tramp and self.stub is not None and self.stub.tramp == self.tramp:
                self.stub.syscall(kabi.SYS_munmap, self.tramp, PAGE, check=False)
        except BaseException:
            pass
        try:
            _ptrace(kabi.PTRACE_DETACH, self.target, 0, 0)
        except OSError:
            pass


def _default_handlers(stub: Stub, target: int) -> None:
    """Every signal the target catches or ignores back to SIG_DFL: the restore sets only the
    image's actions that are not the default (a new stub has no others; a caller may)."""
    st = proc.read_status(target)
    stale = st.sigcgt | st.sigign
    for sig in range(1, 65):
        if stale >> (sig - 1) & 1 and sig not in kabi.UNBLOCKABLE_SIGNALS:
            addr = stub.put_scratch(struct.pack("<QQQQ", 0, 0, 0, 0), 0)   # SIG_DFL
            stub.syscall(kabi.SYS_rt_sigaction, sig, addr, 0, 8,
                         what=f"rt_sigaction({sig}, SIG_DFL)")


def _worker(job, target: int, w: int) -> int:
    """Restore the image into ``target`` (the caller); 0 when done."""
    restore = _InPlace(job, target)
    try:
        restore.run()
        return 0
    except BaseException as e:               # report, and never leave a broken caller
        if restore.touched:                  # the caller can no longer say it: we do
            os.write(2, f"restart: error: restart --self failed after process {target} "
                        f"was changed, so it was killed: {e}\n".encode(errors="replace"))
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            try:
                restore.undo()
            finally:
                os.write(w, str(e).encode()[:4000])
        return 1
    finally:
        os.close(w)


def _own_ids(pid: int) -> tuple[int, int]:
    """The caller's pid in its own pid namespace (what it is to itself)."""
    own = proc.read_status(pid).nspid[-1]
    return own, own

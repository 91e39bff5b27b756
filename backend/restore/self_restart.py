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
is killed (a failed restart leaves no half-restored process running).
"""
from __future__ import annotations

import errno
import os
import signal

from backend import kabi, proc
from backend.ptrace import _ptrace, find_syscall_insn
from .job import RestoreError, load_job
from .memory import free_spot, stub_maps
from .stub import PAGE, STUB_OPTIONS, Stub, StubError
from .transport import Transport
from .tree import TRAMPOLINE_CODE


def restart_self(data, log=None) -> None:
    """Replace the calling process by the image's one task; returns only on failure
    (raising RestoreError), with the caller as it was."""
    job = load_job(data, log, background_checksum=False)
    tasks = [t for t in job.by_vpid.values()]
    if len(job.entries) != 1 or tasks[0].state == "zombie":
        raise RestoreError(errno.EINVAL, f"RESTART_TASKSELF needs an image of one live task; "
                                         f"this one has {len(job.entries)} tasks")
    from .elfcheck import verify      # executables and vdso still match, before anything
    verify(tasks, log)
    max_fd = max(list(tasks[0].files.fds) + [2])
    job.transport = Transport(max_fd + 1)
    me = os.getpid()
    r, w = os.pipe()
    _allow_tracing()
    first = os.fork()
    if first == 0:                           # the first child: fork the worker, then go
        try:
            if os.fork() == 0:
                os.close(r)
                os._exit(_worker(job, me, w))
        finally:
            os._exit(0)
    os.waitpid(first, 0)
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


def _worker(job, target: int, w: int) -> int:
    """Restore the image into ``target`` (the caller); 0 when done."""
    touched = False
    tramp = 0
    try:
        _ptrace(kabi.PTRACE_SEIZE, target, 0, STUB_OPTIONS)
        _ptrace(kabi.PTRACE_INTERRUPT, target, 0, 0)
        _, status = os.waitpid(target, kabi.WALL)
        if not os.WIFSTOPPED(status):
            raise StubError(errno.ESRCH, "the caller is gone")
        stub = Stub(target, target)
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
        tramp = stub.tramp = got
        if got != wanted:
            raise StubError(errno.EEXIST, f"trampoline landed at {got:#x}")
        stub.write(tramp, TRAMPOLINE_CODE)
        own = _own_ids(target)
        touched = True                       # from here on the caller cannot go back
        stub.unregister_rseq()
        exe = os.readlink(f"/proc/{target}/exe")
        group = job.restore_process(vpid, stub, exe)
        stub.syscall(kabi.SYS_prctl, kabi.PR_SET_PTRACER, kabi.PR_SET_PTRACER_NONE, 0, 0, 0,
                     check=False)      # the caller's Yama exception for us goes with it
        job.finish_group(vpid, group, own_ids=own)
        _ptrace(kabi.PTRACE_DETACH, target, 0, 0)
        return 0
    except BaseException as e:               # report, and never leave a broken caller
        if touched:                          # the caller can no longer say it: we do
            os.write(2, f"restart: error: restart --self failed after process {target} "
                        f"was changed, so it was killed: {e}\n".encode(errors="replace"))
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            try:
                if tramp and stub.tramp == tramp:
                    stub.syscall(kabi.SYS_munmap, tramp, PAGE, check=False)
            except BaseException:
                pass
            try:
                os.write(w, str(e).encode()[:4000])
            finally:
                try:
                    _ptrace(kabi.PTRACE_DETACH, target, 0, 0)
                except OSError:
                    pass
        return 1
    finally:
        os.close(w)


def _own_ids(pid: int) -> tuple[int, int]:
    """The caller's pid in its own pid namespace (what it is to itself)."""
    own = proc.read_status(pid).nspid[-1]
    return own, own

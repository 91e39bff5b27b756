"""Live checkpoint: ``checkpoint(pid, fd, flags, logfd)`` for a real process tree.

The tree below ``pid`` is seized with ptrace (every thread of every task, tasks forked
meanwhile included), gathered (backend/snapshot.py) and written through the image codec with
the same resource kinds as the model, then released: it runs on exactly as before, also on
an error or Ctrl-C (or is killed with ``kill=True`` once the image is complete).

Supported now: task trees (pids, parents, process groups, sessions, threads, zombies, pid
namespaces nested below the root's whose inits their parents made with CLONE_NEWPID),
credentials, x86-64 registers and XSAVE state, signal handlers, masks, pending signals and
altstacks, rlimits, cwd and root, private memory (pages from PAGEMAP_SCAN, read with
process_vm_readv), file-backed and special mappings, regular files (an unlinked one by its
contents), pipes and FIFOs with their buffered bytes, UNIX sockets, shared anonymous memory.
Anything else fails the checkpoint with a message naming the task and the object (a thread
with a file table or fs of its own, unshared from its leader's, and processes sharing one
address space, too: a vfork child before its exec is refused before the tree is touched).
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import time

from ckptsim.cr.context import CheckpointContext, CheckpointError, Log
from ckptsim.image import core
from ckptsim.image.types import FORMAT_VERSION, MAGIC_HEAD, PAGE_SIZE
from ckptsim.kinds import load_all
from ckptsim.kinds.registry import task_kinds
from ckptsim.kinds.tasktree import STATE_NUMBERS, TASK, TASK_OBJS, TREE, TREE_NESTED

from . import features, leaks, proc, ptrace
from .memory import MemoryDumpError
from .snapshot import (Gatherer, LiveProcess, Unsupported, address_space_owners,
                       refuse_seccomp, refuse_shared_tables, refuse_vfork_sharing)
from .snapshot_mm import prefetch_chunk_buffers
from .sockets import live_kernel


def _kernel_version() -> tuple[int, int, int]:
    parts = (os.uname().release.split("-")[0].split(".") + ["0", "0"])[:3]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)


def _header(ctx, flags: int, crid: int, parent=None) -> bytes:
    """HEADER to LSM_INFO (PARENT after HEADER_ARCH when ``parent``, an incremental.
    ParentImage, is given); returns the image id."""
    major, minor, patch = _kernel_version()
    image_id = os.urandom(16)
    incremental = parent is not None
    ctx.write(core.HEADER, magic=MAGIC_HEAD, version=FORMAT_VERSION, arch=core.ARCH_X86_64,
              major=major, minor=minor, patch=patch, page_size=PAGE_SIZE,
              uflags=flags | (core.CHECKPOINT_INCREMENTAL if incremental else 0),
              image_flags=core.IMAGE_LIVE | (core.IMAGE_INCREMENTAL if incremental else 0),
              time=int(time.time()), crid=crid, image_id=image_id,
              parent_id=parent.image_id if incremental else bytes(16))
    uname = os.uname()
    for text in (uname.release, uname.version, uname.machine):
        ctx.write(core.STRING, var=text)
    ctx.write(core.HEADER_ARCH, has_fxsr=1, has_xsave=1, xstate_size=0, pad=0)
    if incremental:
        from .incremental import write_parent
        write_parent(ctx, parent)
    ctx.write(core.CONTAINER, flags=0, pad=0)
    ctx.write(core.STRING, var="lsm_none")
    ctx.write(core.LSM_INFO, var="dummy")
    return image_id


def _tree_order(root: int, left_out: int = 0) -> list[int]:
    return [p for p in proc.subtree(root) if p != left_out]


def _write_tree(ctx, processes: list[LiveProcess]) -> list:
    """TREE (and TREE_NESTED), with pids as the root's pid namespace sees them (what the tasks
    themselves see when the root is a namespace init, as a container's is); 0 for a group or
    session, or the root's parent, outside the tree. A task in a pid namespace nested below
    the root's has ``depth`` > 0 and its numbers there, outermost first, in TREE_NESTED."""
    level, numbers = _pid_numbers(processes)
    vpid = {tid: nums[level] for tid, nums in numbers.items()}
    container = vpid.get(processes[0].pid) == 1
    tasks, entries, nested = [], [], []
    for p in processes:
        st = p.stat
        ppid = vpid.get(st.ppid, 0) if p is not processes[0] else 0
        pgid, sid = vpid.get(st.pgrp, 0), vpid.get(st.session, 0)
        if container:   # a group or session whose leader is gone still lives in the container
            _, nspgid, nssid = _ns_numbers(p.pid)
            pgid = pgid or (nspgid[level] if len(nspgid) > level else 0)
            sid = sid or (nssid[level] if len(nssid) > level else 0)
        for t in p.threads:
            inner = numbers[t.tid][level + 1:]
            entries.append((vpid[t.tid], ppid, vpid[p.pid], pgid, sid, len(inner)))
            nested.extend(inner)
            tasks.append(t)
    ctx.write(TREE, nr_tasks=len(entries), var=entries)
    tree_bytes = b"".join(TREE.item_struct.pack(*e) for e in entries)
    if nested:
        ctx.write(TREE_NESTED, var=[(n,) for n in nested])
        tree_bytes += b"".join(TREE_NESTED.item_struct.pack(n) for n in nested)
    ctx.tree_bytes = tree_bytes    # the tree's identity (a child image's PARENT names it)
    return tasks


def _ns_numbers(pid: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """NSpid, NSpgid, NSsid of a task (empty when it is gone)."""
    try:
        st = proc.read_status(pid)
    except proc.ProcessGone:
        return (), (), ()
    return st.nspid, st.nspgid, st.nssid


def _pid_numbers(processes: list[LiveProcess]) -> tuple[int, dict[int, tuple[int, ...]]]:
    """The root's pid namespace level, and for every tid of the tree its NSpid numbers
    (outermost first). A process is in its parent's pid namespace or is the init of one its
    parent made (one level deeper): the shapes a restart can rebuild with clone3; any other
    (a child a setns'd parent put into a deeper namespace with an init of its own) is
    refused."""
    root = processes[0]
    level = max(len(_ns_numbers(root.pid)[0]) - 1, 0)
    numbers: dict[int, tuple[int, ...]] = {}
    for p in processes:
        for t in p.threads:
            nums = _ns_numbers(t.tid)[0] or (t.tid,) * (level + 1)
            if len(nums) <= level:
                raise CheckpointError(errno.EOPNOTSUPP, f"task {t.tid} is in a pid namespace "
                                                        f"above the root's: not supported")
            numbers[t.tid] = nums
    for p in processes[1:]:
        nums, parent = numbers.get(p.pid), numbers.get(p.stat.ppid)
        if nums is None or parent is None:
            continue                    # (a zombie's or an orphan's parent: see _write_tree)
        if len(nums) == len(parent) or (len(nums) == len(parent) + 1 and nums[-1] == 1):
            continue
        raise CheckpointError(errno.EOPNOTSUPP,
                              f"task {p.pid} is {len(nums) - len(parent)} pid namespace levels "
                              f"below its parent {p.stat.ppid}"
                              + ("" if nums[-1] == 1 else " and not the init there")
                              + ": not supported (only a namespace init a parent made with "
                                "CLONE_NEWPID, one level down)")
    return level, numbers


def _write_tasks(ctx, tasks) -> None:
    kinds = task_kinds()
    for t in tasks:
        ctx.write(TASK, state=STATE_NUMBERS[t.state], exit_signal=t.exit_signal,
                  exit_code=t.exit_code, pdeath_signal=t.pdeath_signal, flags=0, var=t.comm[:63])
        if t.state == "zombie":
            continue
        refs = {name: ctx.ref(getattr(t, attr)) for name, attr in (
            ("files_objref", "files"), ("fs_objref", "fs"), ("mm_objref", "mm"),
            ("sighand_objref", "sighand"), ("signal_objref", "signal"))}
        ctx.write(TASK_OBJS, pad=0, **refs)
        for kind in kinds:
            kind.save_task(ctx, t)


def checkpoint(pid: int, sink, flags: int = core.CHECKPOINT_SUBTREE, log: Log | None = None,
               *, kill: bool = False, freezer: bool | int = False, on_stopped=None,
               parent=None, tracking=None, running_copy: bool = False,
               leave_out_self: bool = False, own_fds=()) -> int:
    """Checkpoint the live tree at ``pid`` into ``sink`` (a binary file-like); the crid.

    ``on_stopped(seized, processes)``, if given, runs once the image is complete and before
    the tree is released (backend/track.py arms a tracking session there, at the checkpoint
    instant); it must not raise: it records its own failure.

    ``parent`` (an image path or bytes): an incremental image against it, from the tree's
    tracking session (backend/incremental.py; a full image, with a notice in the log, when
    the session cannot say what changed). ``tracking``: an incremental.Tracking prepared by
    the caller instead (its ``notices``, ``downtime`` and deltas stay readable): the session
    is re-armed at this checkpoint and it is recorded as the session's last one.
    ``running_copy`` (with ``tracking``, pre-copy rounds): the tree is released once it is
    gathered and the session re-armed; its pages are copied while it runs (pages written
    meanwhile are the next image's), so this image is only good as a chain's parent.
    ``leave_out_self``: this checkpointer, a childless process of the tree other than its
    root, is left out of it (the helper of a self-checkpointing pid namespace init, which
    can only be that init's child: backend/api.py). ``own_fds``: more of this checkpointer's
    fds that a container checkpoint's leak check does not count (a self-checkpoint's pipes
    to its caller), besides the image's and the log's.

    Raises CheckpointError (with an errno and a message naming what failed); the tree is
    then running as before and ``sink`` holds an image ending in an ERROR record."""
    load_all()
    log = log or Log()
    if flags & ~core.CHECKPOINT_USER_FLAGS:
        raise CheckpointError(errno.EINVAL, f"unknown checkpoint flags {flags & ~core.CHECKPOINT_USER_FLAGS:#x}")
    if not flags & core.CHECKPOINT_SUBTREE:
        leaks.require_container_init(pid)   # EINVAL unless pid is 1 in its pid namespace
    try:
        features.require_must_haves()
    except features.MissingFeatures as e:
        raise CheckpointError(errno.ENOSYS, str(e)) from None
    if pid <= 0 or not proc.process_exists(pid):
        raise CheckpointError(errno.ESRCH, f"no process {pid}")
    if proc.read_stat(pid).state in ("Z", "X"):
        raise CheckpointError(errno.ESRCH, f"process {pid} is a zombie: nothing to checkpoint")
    me = os.getpid() if leave_out_self else 0
    if me and (me == pid or proc.children(me) or freezer):
        raise CheckpointError(errno.EINVAL, "only a childless checkpointer other than the root "
                                            "is left out of the tree, without the freezer")
    if os.getpid() in _tree_order(pid, me):
        raise CheckpointError(errno.EINVAL, f"the tree of {pid} contains this checkpointer "
                                            f"({os.getpid()}): it cannot stop itself")
    if parent is not None and tracking is None:
        from .incremental import Tracking
        tracking = Tracking.prepare(pid, parent)
        for line in tracking.notices:
            log.debug(0, f"notice: {line}")
    prefetch_chunk_buffers(core.MAX_PAGES_PER_CHUNK)   # populated while the tree is seized
    crid = (time.time_ns() // 1000) & 0x7FFFFFFFFFFFFFFF or 1
    # an incremental image is kept in memory while the tree is stopped, written after
    spool = tracking.spool(sink) if tracking is not None and not running_copy else None
    ctx = CheckpointContext(None, None, _Root(), [], spool or sink, log)
    image_id = _header(ctx, flags, crid, tracking.parent if tracking is not None else None)
    gatherer = Gatherer(log)
    ctx.kernel = live_kernel(gatherer)   # the names of unix sockets (backend/sockets.py)
    processes: list[LiveProcess] = []
    stop_began = time.monotonic()
    try:
        refuse_vfork_sharing(_tree_order(pid, me))
        with _stopped(pid, freezer, me) as seized:
            for p in _tree_order(pid, me):  # re-read: the tree is stopped now
                if p not in seized.threads:
                    seized.add(p)
            _let_exiting_go(seized, pid)
            refuse_seccomp(seized.threads)   # before tracking.seized injects anything
            refuse_shared_tables(_tree_order(pid, me))
            gatherer.mm_owner = address_space_owners(_tree_order(pid, me))
            if gatherer.mm_owner and tracking is not None:
                later, first = next(iter(gatherer.mm_owner.items()))
                raise Unsupported(f"processes {first} and {later} share one address space: "
                                  "tracking and incremental images follow each process's "
                                  "own writes, not a shared mm's; not supported")
            if tracking is not None:    # before gathering: its injected calls write stacks
                tracking.seized(seized)
                gatherer.known_vm_flags = tracking.known_vm_flags
                gatherer.known_handlers = tracking.known_handlers
            if not flags & core.CHECKPOINT_SUBTREE:  # a container: nothing shared with outside
                leaks.check(list(seized.threads),
                            lambda line: log.error(errno.EBUSY, ctx.writer.offset, line),
                            own_fds=_own_fds(sink, log) + list(own_fds))
            for p in _tree_order(pid, me):
                tids = seized.threads.get(p) or []
                if not tids:
                    processes.append(gatherer.zombie(p))
                else:
                    processes.append(gatherer.process(p, tids))
            if tracking is not None:
                tracking.stopped(ctx, processes)
            if not running_copy:
                _write_body(ctx, processes)
            if tracking is not None:
                tracking.arm(seized)
            if on_stopped is not None:
                on_stopped(seized, processes)
            if kill:
                for p in processes:
                    if not p.zombie:
                        os.kill(p.pid, signal.SIGKILL)
        if tracking is not None:
            tracking.downtime = time.monotonic() - stop_began
        if spool is not None:
            spool.drain()
        if running_copy:
            _write_body(ctx, processes)
        if tracking is not None:
            tracking.record(ctx, processes, image_id, crid, ctx.checksum)
    except (Unsupported, MemoryDumpError, ptrace.PtraceError, proc.ProcessGone, OSError) as e:
        message = str(e)
        log.error(getattr(e, "errno", None) or errno.EBUSY, ctx.writer.offset, message)
        ctx.writer.write_error(message)
        ctx.writer.finish()
        if spool is not None:
            spool.drain()
        err = errno.ENOSYS if isinstance(e, Unsupported) else (getattr(e, "errno", None) or errno.EIO)
        raise CheckpointError(err, message) from None
    finally:
        for p in processes:
            if p.mm is not None:
                p.mm.close()
        gatherer.close()            # the fds that peeks at files in flight brought here
    log.debug(ctx.writer.offset, f"checkpoint {crid}: {sum(len(p.threads) for p in processes)} tasks")
    return crid


def _let_exiting_go(seized, root: int, timeout: float = 2.0) -> None:
    """Threads seized in their exit stop (exiting as the tree was stopped) can be neither
    injected into nor saved as running: each goes on to its end. A process left with no
    live thread is then a zombie (its parent is stopped: nobody reaps it), saved as one, or
    gone (its parent ignores SIGCHLD), and left out like any process gone before the stop.
    Refused: the root exiting (nothing would be left to restart), and an exiting process
    with children (they would be handed to a reaper outside the tree, and left out)."""
    for pid in list(seized.threads):
        exiting = [t for t in seized.threads[pid] if seized.stops[t].kind == "exit"]
        if exiting and len(exiting) == len(seized.threads[pid]):
            if pid == root:
                raise Unsupported(f"the root {pid} was exiting when the tree was stopped")
            if proc.children(pid):
                raise Unsupported(f"process {pid} was exiting when the tree was stopped, and "
                                  "its children would leave the tree")
        for tid in exiting:
            seized.let_go(tid)
        deadline = time.monotonic() + timeout
        for tid in exiting:
            while _thread_running(pid, tid):
                if time.monotonic() > deadline:
                    raise Unsupported(f"task {tid} of process {pid} was exiting when the tree "
                                      f"was stopped and did not end within {timeout} s")
                time.sleep(0.001)


def _thread_running(pid: int, tid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def _own_fds(sink, log) -> list[int]:
    """The fds this checkpointer writes the image and the log to (see leaks.find_leaks)."""
    fds = [getattr(log, "fd", None)]
    try:
        fds.append(sink.fileno())
    except (AttributeError, OSError, ValueError):   # BytesIO, a closed file...
        pass
    return [fd for fd in fds if isinstance(fd, int) and fd >= 0]


def _write_body(ctx, processes) -> None:
    tasks = _write_tree(ctx, processes)
    _write_tasks(ctx, tasks)
    ctx.checksum = ctx.writer.crc        # the tail's checksum: a child image's PARENT names it
    ctx.writer.finish()


def _stopped(pid: int, freezer: bool | int, left_out: int = 0):
    """The tree stopped: with ptrace alone, or (``freezer``: True for v1 when mounted else
    v2, or 1 or 2) through the cgroup freezer first (backend/freezer.py)."""
    if freezer:
        from .freezer import frozen_seized
        return frozen_seized(pid, version=None if freezer is True else int(freezer))
    return _seized_tree(pid, left_out)


@contextlib.contextmanager
def _seized_tree(pid: int, left_out: int = 0):
    """ptrace.seized for the tree at ``pid``: a descendant that exits (and is reaped) between
    the listing and its turn is skipped, and the tree is re-read until no new process shows
    up (a parent stopped forks no more)."""
    with ptrace.seized(pid) as s:
        for _ in range(100):
            new = [p for p in _tree_order(pid, left_out) if p not in s.threads]
            if not new:
                break
            for p in new:
                try:
                    s.add(p)
                except ptrace.ThreadGone:
                    pass                      # gone before its turn: not part of the tree
        yield s


class _Root:
    """The checkpoint context's notion of a root: a live tree has no model pid namespace."""

    ns = None

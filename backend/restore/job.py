"""Restart a live image into real processes: the steps, in order, and the clean-up on failure.

  1. the image is restored into a fresh model (``ckptsim.cr.api.restart_job``: every record is
     checked there, by the same kind modules the checkpoint wrote it with); page chunks go to a
     PageSink instead of the model (memoryviews of the mmap'd image, written later in bulk);
  2. the caller may set every credential the image asks for (else EPERM, before anything runs);
  3. the tree: the seed and then every process by clone3 with its pid (tree.py), sessions and
     groups joined, zombies made to exit with their status;
  4. each process: its address space (memory.py), fds, cwd/root/umask (files.py), rlimits and
     signal handlers; then its other threads (clone3 with CLONE_THREAD and their tids);
  5. each thread: name, altstack, credentials, pending signals; the trampoline goes; registers,
     XSAVE state and the signal mask last (task.py);
  6. detach (``frozen``: each process is sent SIGSTOP first, so it stays stopped).

Any failure kills every process this restart created (stubs are traced with
PTRACE_O_EXITKILL too, so even a killed restorer leaves nothing behind) and raises
RestoreError naming the step and the object.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field

from backend import kabi
from backend.ptrace import PtraceError, set_sigmask
from ckptsim.errors import CkptsimError
from ckptsim.image import core
from ckptsim.image.codec import ImageReader
from .checksum import ImageChecksum
from .files import FileFactory, restore_fdtable, restore_fs_context
from .memory import PageSink, SharedSegments, free_spot, protect_written, restore_mm, stub_maps
from .pagewriter import PageWriter
from .stub import PAGE, Stub, StubError, Watchdog
from .task import (caller_cred_matches, check_creds, int3_stops_safe, queue_pending,
                   restore_creds, restore_handlers, restore_rlimits, restore_rseq,
                   restore_thread_basics, set_cpu)
from .transport import Transport
from .tree import THREAD_FLAGS, EarlySeed, become_reaper, clone_child, map_trampoline, \
    seed_hint, set_options, spawn_seed

EARLY_TRANSPORT_FD = 100     # an early seed's transport fd; moved up if the image uses it




class RestoreError(CkptsimError, OSError):
    def __init__(self, err: int, message: str):
        OSError.__init__(self, err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class Restored:
    """What a successful restart made: ``pids`` maps image pids (and tids) to the pids this
    process sees; ``root`` is the image root's; ``reaper`` the new namespace's init that the
    restart added (None when the root is that init, or without a new namespace)."""
    root: int
    pids: dict[int, int]
    reaper: int | None
    new_pidns: bool
    frozen: bool
    timings: dict[str, float] = field(default_factory=dict)
    pages: int = 0
    page_writes: dict[str, int] = field(default_factory=dict)   # bytes of pages, by way

    @property
    def child(self) -> int:
        """The process of this restart that is this process's child (to wait for)."""
        return self.reaper if self.reaper is not None else self.root


def preload() -> None:
    """Import what restart_image imports on first use (the model, every kind module, the
    ELF checks): a long-lived caller (or a benchmark) pays it once, not in its first
    restart's time."""
    from ckptsim.cr import api  # noqa: F401
    from ckptsim.kinds import load_all
    from ckptsim.model import kernel  # noqa: F401
    from backend import ptrace_inject  # noqa: F401  (the seed's first syscall instruction)
    from . import elfcheck  # noqa: F401
    from .tree import _spawn_function
    load_all()
    _spawn_function()              # the seed's spawner page


def restart_image(data, *, pidns: bool = True, frozen: bool = False, log=None,
                  timeout: float = 120.0, chain=None) -> Restored:
    """Restart the live image ``data`` (bytes, bytearray, memoryview or an mmap of the image
    file: pages go to process_vm_writev straight from it) as a new tree of processes."""
    t0 = time.perf_counter()
    early = _early_seed(data, pidns)
    try:
        job = load_job(data, log, background_checksum=True, chain=chain, timeout=timeout)
    except BaseException:
        if early is not None:
            early.kill()
            early.transport.close()
        raise
    job.early = early
    job.timings["decode"] = time.perf_counter() - t0
    try:
        return job.run(pidns, frozen, timeout)
    except (StubError, PtraceError, OSError) as e:
        job.abort()
        if isinstance(e, RestoreError):
            raise
        raise RestoreError(getattr(e, "errno", None) or errno.EIO, f"restart failed: {e}") \
            from None
    except BaseException:
        job.abort()                    # a bug or Ctrl-C: still leave nothing behind
        raise
    finally:
        job.close()


def _early_seed(data, pidns: bool) -> EarlySeed | None:
    """The seed spawned from a quick look at the image, its exec running while the image is
    decoded (with its transport, which it inherits); None where the look finds nothing or
    the spawn fails (the job then spawns its own, and reports any error itself)."""
    hint = seed_hint(data)
    if hint is None:
        return None
    exe, root = hint
    try:
        transport = Transport(EARLY_TRANSPORT_FD)
    except OSError:                    # (a soft RLIMIT_NOFILE at or below that number)
        return None
    try:
        early = EarlySeed(exe, 1 if pidns else root, pidns)
    except (StubError, OSError, ValueError):
        transport.close()
        return None
    transport.seed_spawned()           # (the child has its own copy of the fd table)
    early.transport = transport
    return early


def load_job(data, log=None, *, background_checksum: bool, chain=None,
             timeout: float | None = None) -> "_Job":
    """Steps 1 and 2: the image restored into a fresh model (refusing model images, other
    architectures and credentials the caller could not set). ``background_checksum``: the
    CRC pass runs on a helper thread, checked by run() before anything runs (else it is
    checked here, for a caller about to fork). ``chain``: where an incremental image's
    ancestors are (a directory, a list of images or an ImageChain; ckptsim/cr/incremental.py):
    their pages come first, this image's on top, all written by the page sink in that order.
    ``timeout``: with ``background_checksum``, the checksum's thread then serves as the
    watchdog of the job's run() (one thread start fewer)."""
    from ckptsim.cr.api import restart_job
    from ckptsim.model.kernel import Kernel

    reader = ImageReader(data, checksum=False)
    header = reader.expect(core.HEADER)
    if not header["image_flags"] & core.IMAGE_LIVE:
        raise RestoreError(errno.EINVAL, "this is a model image: run it with `ckptsim replay`"
                                         " (only live images restart into real processes)")
    if header["arch"] != core.ARCH_X86_64:
        raise RestoreError(errno.EINVAL, f"image architecture {header['arch']} is not x86-64")
    # The CRC pass runs on a helper thread (zlib releases the GIL) while the records are
    # decoded and the pages written; job.run checks it before any restored process runs.
    watchdog = None
    if background_checksum and timeout is not None:
        watchdog = Watchdog(timeout, own_thread=False)
    checksum = ImageChecksum(reader, watchdog) if background_checksum else None
    if checksum is None:
        reader.verify_checksum()
    kernel, sink = Kernel(0), PageSink()
    try:
        try:
            tasks, rctx = restart_job(kernel, kernel.init, 0, data, core.RESTART_FROZEN,
                                      restore_fs=True, page_sink=sink, checksum=False,
                                      chain=chain)
        except BaseException:
            if checksum is not None:
                checksum.result()          # a corrupted image is reported as such first
            raise
        job = _Job(kernel, rctx, sink, log)
        if job.entries[0][5]:
            raise RestoreError(errno.EOPNOTSUPP, f"the image's root {job.entries[0][0]} is in a "
                                                 "pid namespace nested below the checkpoint's: "
                                                 "not restorable live (a live checkpoint "
                                                 "never writes one)")
        job.checksum = checksum or ImageChecksum.done()
        job.watchdog = watchdog
        try:
            check_creds([t.cred for t in tasks if t.state != "zombie"])
        except StubError as e:
            raise RestoreError(e.errno, str(e)) from None
    except BaseException:
        if checksum is not None:
            checksum.cancel()
        if watchdog is not None:
            watchdog.disarm()              # its thread ends
        raise
    return job


class _Job:
    def __init__(self, kernel, rctx, sink: PageSink, log):
        self.kernel, self.rctx, self.sink, self.log = kernel, rctx, sink, log
        self.entries = list(rctx.tree_entries)
        self.by_vpid = rctx.tasks_by_vpid
        # image tid -> its numbers in the pid namespaces nested below the image root's,
        # outermost first (TREE_NESTED, as the model placed them)
        self.inner = {e[0]: tuple(nr for _, nr in self.by_vpid[e[0]].pid.numbers[-e[5]:])
                      if e[5] else () for e in self.entries}
        self.stubs: dict[int, Stub] = {}
        self.created: list[int] = []         # pids/tids this restart made, to kill on failure
        self.factory = FileFactory(kernel)
        self.segments = SharedSegments(sink)
        self.transport: Transport | None = None
        self.watchdog: Watchdog | None = None
        self.timings: dict[str, float] = {}
        self.writer = PageWriter()
        self.to_protect: dict[int, list] = {}  # pid -> VMAs to mprotect once written
        self.mm_built: set[int] = set()        # id() of the image mms restored so far
        self.mm_groups_left: dict[int, int] = {}   # id(mm) -> its processes not finished
        self.early: EarlySeed | None = None    # a seed spawned before the decode, if any
        self.checksum = ImageChecksum.done()       # (load_job sets the image's)

    def _log(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    # -- the steps -------------------------------------------------------------------------
    def run(self, pidns: bool, frozen: bool, timeout: float) -> Restored:
        t0 = time.perf_counter()
        for vpid, *_ in self.entries:
            code = self.by_vpid[vpid].exit_code
            if self.by_vpid[vpid].state == "zombie" and self.inner[vpid][-1:] == (1,) \
                    and code & 0x7F:
                # a zombie is made by its own kill(): the kernel drops a fatal signal a
                # namespace init sends itself
                raise RestoreError(errno.EOPNOTSUPP, f"task {vpid}: the init of a nested pid "
                                                     f"namespace killed by signal {code & 0x7F}"
                                                     " (a zombie): not restorable live")
        root_vpid = self.entries[0][0]
        root = self.by_vpid[root_vpid]
        if root.state == "zombie" or root.mm is None:
            raise RestoreError(errno.EINVAL, f"the image's root {root_vpid} is a zombie: "
                                             "nothing to restart")
        exe = root.mm.exe_file.path if root.mm.exe_file is not None else None
        if exe is None:
            raise RestoreError(errno.EINVAL, f"task {root_vpid} has no executable in the image")
        max_fd = max([fd for t in self.by_vpid.values() if t.state != "zombie"
                      for fd in t.files.fds] + [2])
        if self.watchdog is None:
            self.watchdog = Watchdog(timeout)
        use_reaper = pidns and root_vpid != 1
        early, self.early = self.early, None
        if early is not None and (early.exe, early.pid_wanted, early.new_pidns) == \
                (exe, 1 if pidns else root_vpid, pidns):
            seed_pid, self.transport = early.pid, early.transport
            self._created(seed_pid)
            seed = Stub.adopt(seed_pid)
            early.adopted()
            set_options(seed_pid)
        else:
            if early is not None:                    # (the quick look disagreed)
                early.kill()
                early.transport.close()
            self.transport = Transport(max_fd + 1)
            seed_pid = spawn_seed(exe, 1 if pidns else root_vpid, pidns)
            self._created(seed_pid)
            self.transport.seed_spawned()
            seed = Stub.adopt(seed_pid)
            set_options(seed_pid)
        busy = [(v.start, v.end) for t in self.by_vpid.values() if t.state != "zombie"
                for v in t.mm.vmas] + [(s, e) for s, e, _ in stub_maps(seed_pid)]
        map_trampoline(seed, free_spot(PAGE, busy, below=0x7e0000000000))
        if self.transport.fd <= max_fd:      # (an early seed's) a number the image uses
            self.transport.move(seed, max_fd + 1)
        self.timings["seed"] = time.perf_counter() - t0
        # 3. the tree
        if use_reaper:
            root_stub = clone_child(seed, root_vpid, what=f"clone3 of the root {root_vpid}")
            self._created(root_stub.pid)
        else:
            root_stub = seed
        self.stubs[root_vpid] = root_stub
        pgid_of = {root_vpid: self._join_groups(root_stub, self.entries[0], None)}
        members = {e[0] for e in self.entries}
        helpers: list[tuple[Stub, Stub, int]] = []    # (helper, its parent, its pid)
        for vpid, vppid, vtgid, vpgid, vsid, _ in self.entries[1:]:
            if vtgid != vpid:
                continue
            task = self.by_vpid[vpid]
            parent = self.stubs[vppid]
            if vsid and vsid not in members and vsid != pgid_of.get(vppid) and \
                    not any(h[2] == vsid for h in helpers):
                if vsid != self._session_of(vppid):
                    raise RestoreError(errno.EOPNOTSUPP, f"task {vpid}: its session {vsid} "
                                                         "has no leader in the image: not "
                                                         "restorable live yet")
            if vpgid and vpgid not in members and vpgid != pgid_of[vppid] and \
                    not any(h[2] == vpgid for h in helpers):
                if self.inner[vpid]:
                    raise RestoreError(errno.EOPNOTSUPP, f"task {vpid}: its process group "
                                                         f"{vpgid} has no leader in the image "
                                                         "and it is in a nested pid "
                                                         "namespace: not restorable live yet")
                # a process group whose leader is gone: a helper with its pid leads it
                # until every member has joined, then exits and is reaped by its parent
                helper = clone_child(parent, vpgid, what=f"clone3 of a leader for group {vpgid}")
                self._created(helper.pid)
                helper.syscall(kabi.SYS_setpgid, 0, 0, what=f"setpgid of group {vpgid}")
                helpers.append((helper, parent, vpgid))
            # one level deeper than its parent: the init of a namespace the parent made (the
            # model accepts no other shape)
            newpid = len(self.inner[vpid]) > len(self.inner[vppid])
            stub = clone_child(parent, vpid, (kabi.CLONE_NEWPID if newpid else 0)
                               | (kabi.CLONE_VM if self._shares_parent_mm(vpid, vppid) else 0),
                               exit_signal=max(task.exit_signal, 0),
                               what=f"clone3 of {vpid} in {vppid}", inner=self.inner[vpid])
            self._created(stub.pid)
            self.stubs[vpid] = stub
            pgid_of[vpid] = self._join_groups(stub, (vpid, vppid, vtgid, vpgid, vsid, 0),
                                              pgid_of[vppid])
        for helper, parent, gid in helpers:
            _make_zombie(helper, 0, gid)
            parent.syscall(kabi.SYS_wait4, gid, 0, 0, 0, what=f"wait4 for the group {gid} helper")
        for vpid, stub in list(self.stubs.items()):
            if self.by_vpid[vpid].state == "zombie":
                code = self.by_vpid[vpid].exit_code
                restore_thread_basics(stub, self.by_vpid[vpid])
                _make_zombie(stub, code, self.own(vpid))
                del self.stubs[vpid]
        self.timings["tree"] = time.perf_counter() - t0
        # 4. each process
        threads: dict[int, list[tuple[int, Stub]]] = {}
        for vpid, stub in self.stubs.items():
            threads[vpid] = self.restore_process(vpid, stub, exe)
        self.timings["processes"] = time.perf_counter() - t0
        # the executables and vdso still match (before anything runs): while pages are written
        from .elfcheck import verify
        verify(self.by_vpid.values(), self._log)
        self.timings["elfcheck"] = time.perf_counter() - t0
        # 5. each thread, then the registers
        for vpid, group in threads.items():
            self.finish_group(vpid, group)
        if use_reaper:
            become_reaper(seed, (seed.tramp, seed.tramp + PAGE), root_vpid)
        self.timings["tasks"] = time.perf_counter() - t0
        # 6. let go, once the image is known to be intact
        self.checksum.result()
        self.timings["checksum wait"] = time.perf_counter() - t0 - self.timings["tasks"]
        self.watchdog.disarm()
        for vpid, group in threads.items():
            if frozen:
                os.kill(group[0][1].pid, signal.SIGSTOP)
            for _, stub in group:
                stub.detach()
        if use_reaper:
            seed.detach()
        if frozen:
            _wait_stopped([group[0][1].pid for group in threads.values()])
        self.timings["total"] = time.perf_counter() - t0
        pids = {vpid: stub.tid for group in threads.values() for vpid, stub in group}
        return Restored(root=root_stub.pid, pids=pids,
                        reaper=seed_pid if use_reaper else None, new_pidns=pidns,
                        frozen=frozen, timings=dict(self.timings), pages=self.sink.pages,
                        page_writes=dict(self.writer.written))

    def restore_process(self, vpid: int, stub: Stub, stub_exe: str) -> list[tuple[int, Stub]]:
        """Step 4 for the process ``vpid`` of the image, built in ``stub`` (whose executable
        is ``stub_exe``): memory, fds, cwd/root, limits, handlers, then its other threads.
        Returns [(image tid, stub)] for the thread group, the leader first."""
        task = self.by_vpid[vpid]
        if id(task.mm) not in self.mm_built:     # else cloned with CLONE_VM: built already
            self.mm_built.add(id(task.mm))
            self.to_protect[stub.pid] = restore_mm(
                stub, task.mm, self.sink, self.segments, self.transport, self.factory.open_path,
                task.mm.exe_file.path if task.mm.exe_file is not None else None, stub_exe,
                self.writer)
            self.checksum.start()              # pages are being written: the tracer waits
        restore_fdtable(stub, task.files, self.factory, self.transport)
        restore_fs_context(stub, task.fs, self.factory, self.transport)
        restore_rlimits(stub.pid, task.signal.rlimits)
        if not int3_stops_safe(task, pending=False):
            stub.int3_stops = False        # (its threads, cloned below, inherit that)
        restore_handlers(stub, task.sighand)
        group = [(vpid, stub)]
        for tid, _, vtgid, *_ in self.entries:
            if vtgid == vpid and tid != vpid:
                t_stub = clone_child(stub, tid, THREAD_FLAGS, 0, what=f"clone3 of thread {tid}",
                                     inner=self.inner[tid])
                self._created(t_stub.tid)
                group.append((tid, t_stub))
        stub.syscall(kabi.SYS_close, self.transport.fd, what="close of the transport")
        return group

    def finish_group(self, vpid: int, group: list[tuple[int, Stub]],
                     own_ids: tuple[int, int] | None = None) -> None:
        """Step 5 for a thread group: per thread its name, altstack, credentials and pending
        signals; the trampoline goes; registers, XSAVE and the mask last. ``own_ids``: the
        leader's (pid, tid) in its own namespace when they are not the image's (a restart
        in place of the caller)."""
        leader = group[0][1]
        t0 = time.perf_counter()
        self.writer.wait()                 # every process's pages (the first call waits)
        self.timings.setdefault("pages wait", time.perf_counter() - t0)
        self.timings["pages"] = self.writer.busy_s
        protect_written(leader, self.to_protect.pop(leader.pid, ()))
        if not all(int3_stops_safe(self.by_vpid[tid], pending=True) for tid, _ in group):
            for _, stub in group:
                stub.int3_stops = False
        for _, stub in group:
            # every thread blocks every signal before any is queued: a shared pending signal
            # would otherwise be taken (and lost) by a sibling stub that still accepts it
            set_sigmask(stub.tid, (1 << 64) - 1)
        for tid, stub in group:
            task = self.by_vpid[tid]
            restore_thread_basics(stub, task)
            if not caller_cred_matches(task.cred):
                restore_creds(stub, task.cred)
            ids = own_ids if own_ids is not None and tid == vpid else \
                (self.own(vpid), self.own(tid))
            restore_rseq(stub, task)
            queue_pending(stub, task, tid == vpid, *ids)
        mm = id(self.by_vpid[vpid].mm)
        self.mm_groups_left[mm] = self.mm_groups_left.get(mm, 1) - 1
        if not self.mm_groups_left[mm]:    # the last process of this address space
            leader.syscall(kabi.SYS_munmap, leader.tramp, PAGE, what="munmap of the trampoline",
                           exit_stop=True)
        for tid, stub in group:
            set_cpu(stub, self.by_vpid[tid])

    def _shares_parent_mm(self, vpid: int, vppid: int) -> bool:
        """Whether process ``vpid`` shares its parent's address space (clone(CLONE_VM)
        without CLONE_THREAD): it is then cloned with CLONE_VM, and its mm built once. An
        mm shared with a process other than the parent (the child of a CLONE_VM child
        reparented, say) cannot be made so: refused."""
        mm = self.by_vpid[vpid].mm
        if mm is None:
            return False
        sharers = [e[0] for e in self.entries if e[0] == e[2] and self.by_vpid[e[0]].mm is mm]
        self.mm_groups_left[id(mm)] = len(sharers)
        if len(sharers) == 1:
            return False
        if self.by_vpid[vppid].mm is mm:
            return True
        if sharers[0] != vpid:
            raise RestoreError(errno.EOPNOTSUPP, f"task {vpid} shares its address space with "
                                                 f"{sharers[0]}, which is not its parent: not "
                                                 "restorable live (only clone(CLONE_VM) "
                                                 "children of the sharer are)")
        return False

    def own(self, vpid: int) -> int:
        """The image task's pid (or tid) in its own pid namespace."""
        inner = self.inner.get(vpid)
        return inner[-1] if inner else vpid

    def _join_groups(self, stub: Stub, entry, inherited: int | None) -> int | None:
        """setsid/setpgid as the image says; returns the stub's pgid (image numbers; None:
        a group outside the tree)."""
        vpid, _, _, vpgid, vsid, _ = entry
        pgid = inherited
        if vsid == vpid:
            stub.syscall(kabi.SYS_setsid, what=f"setsid in {vpid}")
            pgid = vpid
        if vpgid == vpid and pgid != vpid:
            stub.syscall(kabi.SYS_setpgid, 0, 0, what=f"setpgid(0, 0) in {vpid}")
            pgid = vpid
        elif vpgid not in (0, pgid) and vpgid != vpid:
            # (a nested task names the group by its leader's number in its own namespace)
            stub.syscall(kabi.SYS_setpgid, 0, self._group_nr(vpid, vpgid),
                         what=f"setpgid(0, {vpgid}) in {vpid}")
            pgid = vpgid
        return pgid

    def _group_nr(self, vpid: int, vpgid: int) -> int:
        """The number ``vpid`` names the group ``vpgid`` by: the leader's number in the
        namespace of ``vpid`` (the same depth: a group lives in one session)."""
        depth = len(self.inner.get(vpid, ()))
        if not depth:
            return vpgid
        leader = self.inner.get(vpgid)
        if leader is None or len(leader) != depth:
            raise RestoreError(errno.EOPNOTSUPP, f"task {vpid} (in a nested pid namespace) "
                                                 f"joined the group {vpgid}, whose leader is "
                                                 "not in its namespace: not restorable live")
        return leader[-1]

    def _session_of(self, vpid: int) -> int:
        for e in self.entries:
            if e[0] == vpid:
                return e[4]
        return 0

    def _created(self, pid: int) -> None:
        self.created.append(pid)
        if self.watchdog is not None:
            self.watchdog.pids.append(pid)

    # -- failure and the end ---------------------------------------------------------------
    def abort(self) -> None:
        """Kill and reap everything this restart made (and remove the socket files it bound)."""
        if self.early is not None:               # (never taken: a refusal before the seed)
            self.early.kill()
            self.early.transport.close()
            self.early = None
        try:
            self.factory.abort()
        except OSError:
            pass
        for pid in reversed(self.created):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.writer.close()              # a write under way fails at once: its target is gone
        Stub.close_mems(set(self.created))
        for pid in reversed(self.created):
            try:
                os.waitpid(pid, kabi.WALL)
            except ChildProcessError:
                pass

    def close(self) -> None:
        self.writer.close()
        self.checksum.cancel()
        if self.watchdog is not None:
            self.watchdog.disarm()
        if self.transport is not None:
            self.transport.close()
        self.factory.close()
        self.segments.close()


def _wait_stopped(pids: list[int], timeout: float = 10.0) -> None:
    """Until every process of ``pids`` shows the stopped state (its SIGSTOP taken)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while True:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
            if state in ("T", "t"):
                break
            if time.monotonic() > deadline:
                raise RestoreError(errno.ETIMEDOUT, f"restored process {pid} did not stop")
            time.sleep(0.001)


def _make_zombie(stub: Stub, exit_code: int, vpid: int) -> None:
    """Make the stub exit with wait status ``exit_code``; it stays a zombie for its parent."""
    sig = exit_code & 0x7F
    if sig:
        stub.syscall(kabi.SYS_rt_sigaction, sig, 0, 0, 8, check=False)  # (default already)
        regs = stub._regs
        regs.rip, regs.rax, regs.orig_rax = stub.tramp, kabi.SYS_kill, (1 << 64) - 1
        regs.rdi, regs.rsi = vpid, sig
    else:
        regs = stub._regs
        regs.rip, regs.rax, regs.orig_rax = stub.tramp, kabi.SYS_exit_group, (1 << 64) - 1
        regs.rdi = (exit_code >> 8) & 0xFF
    stub.set_final_regs(regs)
    from backend.ptrace import _ptrace
    deliver = 0
    while True:
        _ptrace(kabi.PTRACE_CONT, stub.tid, 0, deliver)
        _, status = os.waitpid(stub.tid, kabi.WALL)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return
        deliver = os.WSTOPSIG(status) if os.WSTOPSIG(status) == sig else 0

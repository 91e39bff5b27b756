"""The model backend: scenarios run as modelled tasks in a ckptsim Kernel."""
from __future__ import annotations

import hashlib
import io

from ckptsim.cr.api import checkpoint, restart_tasks
from ckptsim.cr.context import CheckpointError
from ckptsim.cr.replay import replay
from ckptsim.errors import ImageError
from ckptsim.image import core, decode_all
from ckptsim.image.types import PAGE_SHIFT, PAGE_SIZE
from ckptsim.model.creds import Cred
from ckptsim.model.kernel import Kernel
from ckptsim.model.shared import Shared
from ckptsim.model.tasks_ops import CLONE_NEWPID, SIGKILL

from ..backend import Backend, CheckpointFailed
from ..scenario import Scenario

CGROUP = "/ct"
MAX_STEPS = 200_000


class SimRun:
    def __init__(self, scenario: Scenario, kernel: Kernel, root):
        self.scenario = scenario
        self.kernel = kernel
        self.root = root
        self.ghost = None
        self.caller = None  # the unprivileged caller, when the scenario asks for one


class SimBackend(Backend):
    name = "sim"

    def start(self, scenario: Scenario) -> SimRun:
        k = Kernel(scenario.seed)
        init = k.init
        k.umask(init, 0)  # /data and /tmp are world-writable, as /tmp is
        for d in ("/bin", "/data", "/tmp"):
            k.mkdir(init, d, 0o777)
        k.umask(init, 0o022)
        for path, text in scenario.files:
            fd = k.open(init, path, 0o1101, 0o666)
            k.write(init, fd, text.encode())
            k.close(init, fd)
        k.install_program(f"/bin/{scenario.name}", scenario.ops)
        k.cgroup_create(init, CGROUP)
        root = k.spawn(f"/bin/{scenario.name}", flags=CLONE_NEWPID)
        k.cgroup_attach(init, CGROUP, root.tid)
        run = SimRun(scenario, k, root)
        k.run(MAX_STEPS)
        if scenario.leak is not None:
            # The world outside keeps a reference to one of the container's descriptors.
            init.files.install(Shared.get(root.files.get(scenario.leak)))
        return run

    # -- what the world sees -------------------------------------------------------------
    def container_tasks(self, run) -> list:
        ns = run.root.ns
        return sorted((t for t in run.kernel.live_tasks() if t.pid.nr_in(ns)),
                      key=lambda t: t.pid.nr_in(ns))

    def visible_state(self, run) -> dict:
        ns = run.root.ns
        names: dict[int, str] = {}

        def name_of(obj, kind: str) -> str:
            # Shared objects are named by first sight, so sharing shows and addresses don't.
            return names.setdefault(id(obj), f"{kind}#{len(names) + 1}")

        tasks, fds, maps, signals = {}, {}, {}, {}
        for t in self.container_tasks(run):
            vpid = t.pid.nr_in(ns)
            leader = t.leader
            tasks[vpid] = {
                "tgid": leader.pid.nr_in(ns),
                "ppid": leader.parent.pid.nr_in(ns) if leader.parent is not None else 0,
                "pgid": leader.pgrp.nr_in(ns) if leader.pgrp else 0,
                "sid": leader.session.nr_in(ns) if leader.session else 0,
                "state": t.state, "comm": t.comm,
                "exit_code": t.exit_code if t.state == "zombie" else None,
            }
            if t.state == "zombie":
                continue  # a zombie has no CPU state, files, memory or signals left to see
            tasks[vpid]["pc"] = t.cpu.pc
            tasks[vpid]["regs"] = list(t.cpu.regs)
            fds[vpid] = {"table": name_of(t.files, "fdtable"), "fds": {
                fd: {"file": name_of(f, "file"), "kind": f.ftype.kind, "flags": f.flags, "pos": f.pos,
                     "cloexec": cloexec, "path": getattr(f, "path", ""),
                     "object": name_of(f.private, f.ftype.kind) if f.private is not None else None,
                     # what FIONREAD would tell: bytes waiting in a pipe
                     "queued": len(f.private.buffer) if f.ftype.kind in ("pipe", "fifo") else None}
                for fd, f, cloexec in t.files.items()}}
            maps[vpid] = {"mm": name_of(t.mm, "mm"), "vmas": [
                [v.start, v.end, v.prot, v.flags, v.name or "",
                 name_of(v.shmem, "shmem") if v.shmem is not None else None]
                for v in t.mm.vmas]}
            sig = t.sigstate
            signals[vpid] = {
                "blocked": sig.blocked,
                "pending": [repr(i) for i in sig.pending.items],
                "shared_pending": [repr(i) for i in t.signal.shared_pending.items],
                "altstack": repr(sig.altstack),
                "handlers": {s: repr(t.sighand.action(s)) for s in range(1, 65)
                             if t.sighand.action(s).handler != 0},
            }
        return {"tasks": tasks, "fds": fds, "maps": maps, "signals": signals}

    # -- C/R ---------------------------------------------------------------------------------
    def _caller(self, run):
        scn, k = run.scenario, run.kernel
        if scn.unpriv_level is not None:
            k.sysctl["kernel.ckpt_unpriv_allowed"] = scn.unpriv_level
        if scn.caller_uid == 0:
            return k.init
        if run.caller is None:
            run.caller = k.clone(k.init)
            run.caller.cred = Cred.user(scn.caller_uid, scn.caller_uid)
        return run.caller

    def checkpoint(self, run, parent: bytes | None = None) -> bytes:
        """A full image, or with ``parent`` an incremental image against it."""
        scn, k = run.scenario, run.kernel
        if scn.freeze:
            k.freeze(k.init, CGROUP)
        buf = io.BytesIO()
        flags = scn.checkpoint_flags | (core.CHECKPOINT_INCREMENTAL if parent is not None else 0)
        try:
            checkpoint(k, self._caller(run), run.root.pid.nr_in(k.init.ns), buf, flags,
                       parent=parent)
        except CheckpointError as e:
            k.thaw(k.init, CGROUP)
            raise CheckpointFailed(e.errno, str(e)) from None
        return buf.getvalue()

    def kill(self, run) -> None:
        k = run.kernel
        ns = run.root.ns
        if run.root.state not in ("zombie", "dead"):
            k.do_group_exit(run.root, SIGKILL)  # the namespace dies with its init
        for child in list(k.init.children):  # reap the container's init and its orphans
            if child.state == "zombie" and child.pid.nr_in(ns):
                k.wait4(k.init, child.tid)

    def restart(self, run, image: bytes, ancestors=()) -> None:
        scn, k = run.scenario, run.kernel
        caller = self._caller(run)
        flags = scn.restart_flags
        if flags & core.RESTART_GHOST:
            caller = run.ghost = k.clone(caller)
        if flags & core.RESTART_TASKSELF:
            # A fresh container task of the same program becomes the image's task in place.
            caller = k.spawn(f"/bin/{scn.name}", flags=CLONE_NEWPID)
            k.cgroup_attach(k.init, CGROUP, caller.tid)
            run.taskself = caller
        try:
            tasks = restart_tasks(k, caller, 0, image, flags, chain=list(ancestors) or None)
        except (CheckpointError, ImageError) as e:
            if flags & core.RESTART_TASKSELF and caller.state != "dead":
                if caller.state != "zombie":  # a failed restart leaves no process behind
                    k.do_group_exit(caller, SIGKILL)
                k.wait4(k.init, caller.tid)
            raise CheckpointFailed(getattr(e, "errno", 22), str(e)) from None
        run.root = tasks[0]
        if flags & core.RESTART_TASKSELF:
            return
        for t in tasks:
            if t.is_leader() and not flags & core.RESTART_FROZEN:
                k.cgroup_attach(k.init, CGROUP, t.tid)

    def is_frozen(self, run) -> bool:
        return all(t.frozen for t in self.container_tasks(run) if t.state != "zombie")

    def thaw(self, run) -> None:
        k = run.kernel
        for t in self.container_tasks(run):
            if t.is_leader():
                k.cgroup_attach(k.init, CGROUP, t.tid)
        k.thaw(k.init, CGROUP)

    def resume(self, run) -> None:
        k = run.kernel
        k.thaw(k.init, CGROUP)
        k.points_released = True
        k.run(MAX_STEPS)

    def verdict(self, run) -> list[str]:
        k = run.kernel
        problems = [f"check failed in pid {pid}: {label}: got {got!r}, want {want!r}"
                    for kind, pid, label, got, want in (o for o in k.output if o[0] == "FAIL")]
        for t in self.container_tasks(run):
            if t is run.root and t.state == "zombie":
                continue
            problems.append(f"task {t.pid.nr_in(run.root.ns)} ({t.comm}) left {t.state}"
                            f"{' at pc ' + str(t.cpu.pc) if t.state != 'zombie' else ''}")
        root = run.root
        if root.state == "zombie":
            if root.exit_code != 0:
                problems.append(f"container init exited with wait status {root.exit_code:#x}")
        elif root.state != "dead":
            problems.append(f"container init did not finish ({root.state})")
        if run.ghost is not None and run.ghost.state != "dead":
            problems.append(f"the ghost restart caller is still {run.ghost.state}")
        return problems

    # -- incremental steps ------------------------------------------------------------------
    def release_step(self, run, step: int) -> None:
        """Let the tasks on from their points of ``step`` to those of the next step."""
        k = run.kernel
        k.thaw(k.init, CGROUP)
        k.released_steps = step
        k.run(MAX_STEPS)

    def written_pages(self, run) -> dict[int, list[int]]:
        """Per task: the page addresses the model saw written since the last checkpoint (in
        its private mappings, and in the shared segments it maps)."""
        ns, out = run.root.ns, {}
        for t in self.container_tasks(run):
            if t.state == "zombie" or t.mm is None:
                continue
            mm, pages = t.mm, set()
            for v in mm.vmas:
                if v.is_private:
                    pages.update(a for a in mm.dirty_pages() if v.start <= a < v.end)
                elif v.shmem is not None:
                    base = v.pgoff << PAGE_SHIFT
                    pages.update(v.start + off - base for off in v.shmem.dirty_offsets()
                                 if 0 <= off - base < v.end - v.start)
            out[t.pid.nr_in(ns)] = sorted(pages)
        return out

    def page_contents(self, run) -> dict[int, dict[int, bytes]]:
        """Per task: a digest of every page of its anonymous mappings (private and shared)."""
        ns, out = run.root.ns, {}
        for t in self.container_tasks(run):
            if t.state == "zombie" or t.mm is None:
                continue
            pages = out[t.pid.nr_in(ns)] = {}
            for v in t.mm.vmas:
                if v.file is None and v.name != "[vdso]":
                    blob = memoryview(t.mm._read_vma(v, v.start, v.end))
                    for i in range(0, v.end - v.start, PAGE_SIZE):
                        pages[v.start + i] = hashlib.blake2b(blob[i:i + PAGE_SIZE], digest_size=8).digest()
        return out

    def self_image(self, run, path: str) -> bytes:
        k = run.kernel
        fd = k.open(k.init, path, 0)
        try:
            f = k.init.files.get(fd)
            return f.inode.read_at(0, f.inode.size)
        finally:
            k.close(k.init, fd)

    def check_image(self, run, image: bytes, ancestors=()) -> list[str]:
        try:
            decode_all(image)
            report = replay(image, roundtrip=True, chain=list(ancestors) or None)
        except (ImageError, CheckpointError) as e:
            return [f"image does not replay: {e}"]
        problems = [f"replay invariant: {p}" for p in report.problems]
        if report.roundtrip != "identical":
            problems.append(f"image round trip: {report.roundtrip}")
        return problems

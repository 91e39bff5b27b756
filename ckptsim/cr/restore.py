"""Restart: read an image in order and rebuild its tree in a kernel.

Tasks are created first from the TREE section (pids as saved, like clone3 with set_tid), then
each task's records are read in tree order. On any failure ``discard()`` removes every task
this restart created and drops every object it restored: nothing is left behind.
"""
from __future__ import annotations

import errno

from ..image import core
from ..image.types import FORMAT_VERSION, MAGIC_HEAD, ObjType
from ..kinds.registry import task_kinds
from ..kinds.tasktree import TASK, TASK_OBJS, TASK_STATES, TREE, TREE_NESTED
from ..model.shared import Shared
from ..model.task import PidNamespace, Task
from .context import RestartContext, RestartError


class RestoreJob:
    def __init__(self, kernel, caller, reader, log, flags, restore_fs, pidns):
        self.kernel = kernel
        self.caller = caller
        self.flags = flags
        self.pidns = pidns
        self.ctx = RestartContext(kernel, caller, reader, log, restore_fs)
        self.created: list[Task] = []
        self.reserved = []  # Pids held for process groups and sessions without a task
        self.touched_caller = False
        self.chain = None           # an ImageChain: where an incremental image's parents are

    # -- the sections ------------------------------------------------------------------------
    def run(self) -> list[Task]:
        ctx = self.ctx
        self._header()
        self._container()
        tasks = self._tree()
        for t in tasks:
            self._task(t)
        ctx.reader.finish()
        self._finish(tasks)
        return tasks

    def _header(self) -> None:
        ctx = self.ctx
        hdr = ctx.read(core.HEADER)
        if hdr["magic"] != MAGIC_HEAD:
            raise ctx.image_error(f"bad header magic {hdr['magic']:#x}")
        if hdr["version"] != FORMAT_VERSION:
            raise RestartError(errno.EINVAL, f"image format version {hdr['version']}, this tool reads {FORMAT_VERSION}")
        live = bool(hdr["image_flags"] & core.IMAGE_LIVE)
        if not hdr["image_flags"] & core.IMAGE_MODEL and not live:
            raise RestartError(errno.EINVAL, "neither a model nor a live image: image_flags "
                                             f"{hdr['image_flags']:#x}")
        if live and hdr["arch"] != core.ARCH_X86_64:
            raise RestartError(errno.EINVAL, f"a live image of arch {hdr['arch']}: only x86_64 "
                                             "live images are restored")
        ctx.header = hdr
        ctx.live = live
        ctx.header_strings = tuple(ctx.read(core.STRING).var for _ in range(3))
        ctx.header_arch = ctx.read(core.HEADER_ARCH)
        ctx.chain_links = []
        if hdr["image_flags"] & core.IMAGE_INCREMENTAL:
            self._chain(hdr, ctx.read(core.PARENT))

    def _chain(self, hdr, parent) -> None:
        """Find and check the ancestors of an incremental image; their pages become the base
        the image's own pages overlay (kinds/memory.py)."""
        from .incremental import ChainPages
        what = f"incremental image {bytes(hdr['image_id']).hex()} (crid {hdr['crid']})"
        if self.chain is None:
            raise RestartError(errno.ENOENT, f"{what} needs its parent image "
                                             f"{bytes(hdr['parent_id']).hex()} (crid "
                                             f"{parent['parent_crid']}): no image chain given")
        scans = self.chain.resolve(self.ctx.reader.data, "the restarted image")
        self.ctx.base_pages = ChainPages(scans[:-1])
        self.ctx.chain_links = [scan.link for scan in scans[:-1]]

    def _container(self) -> None:
        from ..kinds import files
        ctx = self.ctx
        ctx.read(core.CONTAINER)
        ctx.read(core.STRING)
        ctx.read(core.LSM_INFO)
        if ctx.live and ctx.reader.peek() is not files.FS_SNAPSHOT:
            # A live image names files by path but holds no file system: a replay into a
            # fresh model creates the paths it names as placeholders (kinds/files.py).
            if ctx.restore_fs:
                ctx.placeholders = []
            return
        files.load_filesystem(ctx, self.kernel.vfs)

    def _tree(self) -> list[Task]:
        ctx = self.ctx
        rec = ctx.read(TREE)
        entries = rec.var
        if rec["nr_tasks"] != len(entries) or not entries:
            raise ctx.image_error(f"TREE says {rec['nr_tasks']} tasks, holds {len(entries)}")
        ctx.tree_entries = entries  # the live restore (backend/restore) builds its tree from it
        ctx.tree_bytes = bytes(rec.var.view)
        nested = []
        if any(e[5] for e in entries):
            nested_rec = ctx.read(TREE_NESTED)
            nested = [n for (n,) in nested_rec.var]
            ctx.tree_bytes += bytes(nested_rec.var.view)
        if self.flags & core.RESTART_TASKSELF:
            if len(entries) != 1:
                raise RestartError(errno.EINVAL, f"RESTART_TASKSELF needs a one-task image, this one has {len(entries)}")
            ctx.tasks_by_vpid[entries[0][0]] = self.caller
            return [self.caller]
        return self._create_tasks(entries, nested)

    def _create_tasks(self, entries, nested) -> list[Task]:
        ctx, kernel = self.ctx, self.kernel
        root_vpid = entries[0][0]
        # A live image holds real pids and 0 for a process group or session outside the tree:
        # in a new pid namespace the caller's groups are invisible, so they read as 0 again.
        new_ns = self.pidns if self.pidns is not None else (root_vpid == 1 or ctx.live)
        base_ns = PidNamespace(self.caller.ns) if new_ns else self.caller.ns
        self.base_ns = base_ns
        tasks, by_vpid, pos = [], {}, 0
        for i, (vpid, vppid, vtgid, vpgid, vsid, depth) in enumerate(entries):
            if vpid <= 0 or vpid in by_vpid or depth < 0 or pos + depth > len(nested):
                raise ctx.image_error(f"bad tree entry {i}: pid {vpid}, depth {depth}")
            inner = nested[pos:pos + depth]
            pos += depth
            leader = by_vpid.get(vtgid) if vtgid != vpid else None
            if vtgid != vpid and leader is None:
                raise ctx.image_error(f"task {vpid}: thread group {vtgid} is not earlier in the tree")
            if leader is not None:
                parent = leader.parent
            elif i == 0:
                parent = self.caller.leader
            else:
                parent = by_vpid.get(vppid)
                if parent is None or parent.leader is not parent:
                    raise ctx.image_error(f"task {vpid}: parent {vppid} is not earlier in the tree")
            ns = self._ns_for(base_ns, parent if i else None, leader, depth, inner, ctx)
            set_tid = list(reversed(inner)) + [vpid]
            try:
                pid = kernel.new_pid(ns, set_tid)
            except Exception as e:
                raise RestartError(errno.EBUSY, f"cannot give task {vpid} its pid: {e}") from None
            t = Task(kernel, pid, "restored")
            kernel.task_by_pid[pid] = t
            self.created.append(t)
            t.ckpt_ctx = ctx  # not runnable until the restart completes
            if ns.reaper is None:
                ns.reaper = t
            if leader is not None:
                t.leader = leader
                leader.threads.append(t)
                t.threads = []
            else:
                t.parent = parent
                parent.children.append(t)
            by_vpid[vpid] = t
            tasks.append(t)
        if pos != len(nested):
            raise ctx.image_error("TREE_NESTED holds more pids than the tree's depths use")
        for t, (vpid, _, vtgid, vpgid, vsid, _) in zip(tasks, entries):
            if vtgid == vpid:
                t.pgrp = self._group_pid(vpgid, self.caller.leader.pgrp)
                t.session = self._group_pid(vsid, self.caller.leader.session)
        ctx.tasks_by_vpid = by_vpid
        return tasks

    def _ns_for(self, base_ns, parent, leader, depth, inner, ctx) -> PidNamespace:
        if leader is not None:
            return leader.ns
        if parent is None:
            ns = base_ns
            for _ in range(depth):
                ns = PidNamespace(ns)
            return ns
        parent_depth = parent.ns.level - base_ns.level
        if depth == parent_depth:
            return parent.ns
        if depth == parent_depth + 1 and inner and inner[-1] == 1:
            return PidNamespace(parent.ns)  # this task is the init of a new namespace
        raise ctx.image_error(f"pid namespace depth {depth} under a parent at depth {parent_depth}")

    def _group_pid(self, vnr: int, outside):
        if vnr == 0:
            return outside.attach()
        pid = self.base_ns.pids.get(vnr)
        if pid is None:
            pid = self.kernel.new_pid(self.base_ns, [vnr])
            self.reserved.append(pid)
        return pid.attach()

    def _task(self, t: Task) -> None:
        ctx, kernel = self.ctx, self.kernel
        rec = ctx.read(TASK)
        state = TASK_STATES.get(rec["state"])
        if state is None:
            raise ctx.image_error(f"unknown task state {rec['state']}")
        t.comm = rec.var
        t.pdeath_signal = rec["pdeath_signal"]
        if t is not self.caller:  # RESTART_TASKSELF: the caller keeps its place in its tree
            t.exit_signal = rec["exit_signal"]
        if state == "zombie":
            if t is self.caller or t.leader is not t:
                raise ctx.image_error("only a thread-group leader can be restored as a zombie")
            t.state = "zombie"
            t.exit_code = rec["exit_code"]
            if ctx.peek() is TASK_OBJS:  # a leader whose threads outlive it
                objs = ctx.read(TASK_OBJS)
                if any(objs[f] for f in ("files_objref", "fs_objref", "mm_objref", "sighand_objref")):
                    raise ctx.image_error("a zombie leader holds only its group's signal state")
                signal = ctx.obj(objs["signal_objref"], ObjType.SIGNAL)
                if signal is None:
                    raise ctx.image_error("a zombie leader's TASK_OBJS names no signal state")
                t.signal = Shared.get(signal)
            return
        objs = ctx.read(TASK_OBJS)
        if t is self.caller:
            self.touched_caller = True
        new = {
            "files": ctx.obj(objs["files_objref"], ObjType.FILE_TABLE),
            "fs": ctx.obj(objs["fs_objref"], ObjType.FS),
            "mm": ctx.obj(objs["mm_objref"], ObjType.MM),
            "sighand": ctx.obj(objs["sighand_objref"], ObjType.SIGHAND),
            "signal": ctx.obj(objs["signal_objref"], ObjType.SIGNAL),
        }
        for attr, obj in new.items():
            if obj is None:
                raise ctx.image_error(f"task {t.tid} has no {attr}")
            old = getattr(t, attr)
            setattr(t, attr, Shared.get(obj))  # FdTable.get() looks up an fd
            if old is not None:
                old.put(kernel)
        for kind in task_kinds():
            kind.load_task(ctx, t)
        if state == "stopped":
            t.state = "stopped"
        exe = t.mm.exe_file
        if t.cpu is None:
            t.program = None  # a live task: x86 state (t.x86) the model cannot run
        else:
            t.program = kernel.load_program(exe) if exe is not None else None

    def _finish(self, tasks) -> None:
        kernel = self.kernel
        self._note_image()
        for ref, obj in sorted(self.ctx.objects.items()):
            if isinstance(obj, Shared):
                obj.put(kernel)
        self.ctx.objects.clear()
        if self.flags & core.RESTART_FROZEN:
            path = f"/restart.{len(kernel.cgroups)}"
            kernel.cgroup_create(self.caller, path)
            kernel.freeze(self.caller, path)
            for t in tasks:
                if t.leader is t:
                    kernel.cgroup_attach(t, path)
        else:
            for t in tasks:
                if t.cgroup is None:
                    t.cgroup = self.caller.cgroup
                    t.cgroup.members.append(t)
        for t in tasks:
            t.ckpt_ctx = None
        if self.flags & core.RESTART_GHOST:
            self.caller.leader.exit_signal = -1
            kernel.do_group_exit(self.caller, 0)

    def _note_image(self) -> None:
        """The restored objects are as the image holds them: the base of the next incremental
        checkpoint; the kernel knows the image (and its ancestors) by id."""
        from ..model.mm import MM, Shmem
        from .incremental import ImageLink, tree_identity
        ctx = self.ctx
        hdr = ctx.header
        link = ImageLink(bytes(hdr["image_id"]), hdr["crid"], ctx.reader.tail_checksum,
                         tree_identity(ctx.tree_bytes))
        for ref, obj in ctx.objects.items():
            if isinstance(obj, (MM, Shmem)):
                obj.checkpointed((link.image_id, ref))
        for known in ctx.chain_links + [link]:
            self.kernel.image_links[known.image_id] = known

    # -- failure -----------------------------------------------------------------------------
    def discard(self) -> None:
        """Remove every task this restart created and drop the objects it restored."""
        kernel = self.kernel
        for t in reversed(self.created):
            for attr in ("mm", "files", "fs", "sighand", "signal"):
                obj = getattr(t, attr)
                if obj is not None:
                    setattr(t, attr, None)
                    obj.put(kernel)
            if t.parent is not None and t in t.parent.children:
                t.parent.children.remove(t)
            if t.leader is not t and t in t.leader.threads:
                t.leader.threads.remove(t)
            for pid in (t.pgrp, t.session):
                if pid is not None:
                    pid.detach()
            if t.cgroup is not None:
                t.cgroup.members.remove(t)
            kernel.task_by_pid.pop(t.pid, None)
            t.pid.detach()
            t.state = "dead"
        self.created.clear()
        if self.flags & core.RESTART_TASKSELF and self.touched_caller:
            # A partly restored task is undefined: Linux-CR kills it, and so do we.
            self.kernel.do_group_exit(self.caller, 9)
        for ref, obj in sorted(self.ctx.objects.items()):
            if isinstance(obj, Shared) and obj.refs > 0:
                obj.put(kernel)
        self.ctx.objects.clear()

"""checkpoint() and restart() over the model, with Linux-CR's rules.

``checkpoint(kernel, caller, pid, fd, flags, logfd)`` writes an image of the tree rooted at
``pid`` (0: the caller itself, a self-checkpoint) and returns a positive checkpoint id.
``restart(kernel, caller, pid, fd, flags, logfd)`` rebuilds the tree below the caller (as the
seed's restart tool does: the model creates the tasks with their saved pids, like clone3 with
set_tid) and returns 0; with RESTART_TASKSELF the caller itself becomes the image's one task.

Incremental images: ``checkpoint(..., flags | CHECKPOINT_INCREMENTAL, parent=P)`` writes only
what changed since the parent image P (its bytes, its ImageLink, or its 16-byte image id when
this kernel wrote or restarted from it); ``restart(..., chain=C)`` restarts the newest image of
a chain, finding its ancestors in C (an ImageChain, a directory, or a list of images). Every
successful checkpoint or restart makes its image the base of the next incremental one.

``fd`` and ``logfd`` are either model file descriptors of the caller (ints) or host file
objects (binary for the image, text for the log); ``logfd`` may be None or -1.
Errors raise CheckpointError / RestartError (carrying ``.errno``) or ImageError.
"""
from __future__ import annotations

import errno
import mmap
import hashlib
import io
import struct
from dataclasses import dataclass

from ..errors import ImageError, ModelError
from ..image import core
from ..image.codec import ImageReader
from ..image.types import FORMAT_VERSION, MAGIC_HEAD, PAGE_SIZE
from ..kinds import load_all
from ..kinds.registry import task_kinds
from ..model.creds import may_ptrace
from .context import CheckpointContext, CheckpointError, Log, RestartError
from .incremental import ImageChain, ImageLink, ImageScan, tree_identity
from .restore import RestoreJob
from .tree import tree_order, write_tree

CAP_SYS_ADMIN = 21
MODEL_RELEASE = ("ckptsim-model", "#1", "model")
_RESTART_INPUT_ERRORS = (ModelError, ValueError, KeyError, IndexError, OverflowError,
                         TypeError, struct.error)


# -- sinks ---------------------------------------------------------------------------------
class _ModelFileSink:
    """Collects an image and writes it to a model fd in one write when done."""

    def __init__(self, kernel, task, fd):
        self.kernel, self.task, self.fd = kernel, task, fd
        self.buf = io.BytesIO()

    def write(self, data) -> int:
        return self.buf.write(data)

    def close(self) -> None:
        self.kernel.write(self.task, self.fd, self.buf.getvalue())


def _log_sink(kernel, task, logfd):
    if logfd is None or logfd == -1:
        return None
    if isinstance(logfd, int):
        return lambda line: kernel.write(task, logfd, line.encode())
    return logfd.write


def _check_privilege(kernel, caller, is_restart: bool, err_cls) -> None:
    level = kernel.sysctl["kernel.ckpt_unpriv_allowed"]
    needs_admin = level == 0 or (level == 1 and is_restart)
    if needs_admin and not kernel.capable(caller, CAP_SYS_ADMIN):
        op = "restart" if is_restart else "checkpoint"
        raise err_cls(errno.EPERM, f"{op} needs CAP_SYS_ADMIN (kernel.ckpt_unpriv_allowed={level})")


def image_id_for(kernel, crid: int) -> bytes:
    """A deterministic unique id: the model has no wall clock and no entropy but its seed."""
    return hashlib.blake2b(f"ckptsim:{kernel.seed}:{crid}".encode(), digest_size=16).digest()


@dataclass(frozen=True)
class HeaderIdentity:
    """What a header says about the system that wrote the image: the model's by default;
    ``replay --roundtrip`` passes an input image's own (a live image's kernel and arch).
    An image without IMAGE_MODEL in ``image_flags`` gets no file-system snapshot."""

    arch: int = 100
    major: int = 6
    minor: int = 18
    patch: int = 0
    image_flags: int = core.IMAGE_MODEL
    release: tuple[str, str, str] = MODEL_RELEASE
    has_fxsr: int = 0
    has_xsave: int = 0
    xstate_size: int = 0

    @classmethod
    def of_image(cls, data) -> "HeaderIdentity":
        """The identity in an image's HEADER, its three STRINGs and HEADER_ARCH."""
        reader = ImageReader(data)
        hdr = reader.expect(core.HEADER)
        release = tuple(reader.expect(core.STRING).var for _ in range(3))
        arch = reader.expect(core.HEADER_ARCH)
        return cls(hdr["arch"], hdr["major"], hdr["minor"], hdr["patch"], hdr["image_flags"],
                   release, arch["has_fxsr"], arch["has_xsave"], arch["xstate_size"])

    @property
    def has_fs_snapshot(self) -> bool:
        return bool(self.image_flags & core.IMAGE_MODEL)


MODEL_IDENTITY = HeaderIdentity()


# -- checkpoint ------------------------------------------------------------------------------
class _IncrementalSave:
    """What the kinds ask while writing an incremental image (kinds/memory.py)."""

    def __init__(self, parent: ImageLink):
        self.parent = parent

    def base_of(self, obj) -> int:
        """The objref of ``obj`` in the parent image, or 0 when its changes since the parent
        are not known (the object is new, or its last image is another one)."""
        base = obj.ckpt_base
        return base[1] if base is not None and base[0] == self.parent.image_id else 0


def _parent_link(kernel, parent) -> ImageLink:
    """The parent named by ``parent``: an ImageLink, an image id, or the parent image itself."""
    if isinstance(parent, ImageLink):
        link = parent
    elif isinstance(parent, (bytes, bytearray)) and len(parent) == 16:
        link = kernel.image_links.get(bytes(parent))
        if link is None:
            raise CheckpointError(errno.ENOENT, f"parent image {bytes(parent).hex()} is not one "
                                                "this kernel wrote or restarted from: pass the image")
    else:
        try:
            link = ImageScan(parent, "the parent image").link
        except ImageError as e:
            raise CheckpointError(errno.EINVAL, f"the parent image is not readable: {e}") from None
    known = kernel.image_links.get(link.image_id)
    if known is not None and known != link:
        raise CheckpointError(errno.EINVAL, f"parent image {link.describe()} is not the image "
                                            f"{known.describe()} this kernel knows by that id")
    return link


def checkpoint(kernel, caller, pid: int, fd, flags: int = 0, logfd=None, *,
               image_id: bytes | None = None, time: int | None = None, crid: int | None = None,
               identity: HeaderIdentity | None = None, parent=None) -> int:
    """Checkpoint the tree at ``pid``; returns the crid. ``image_id``/``time``/``crid`` and
    ``identity`` override the header (``replay --roundtrip`` re-creates an image's own header).
    With CHECKPOINT_INCREMENTAL, ``parent`` names the parent image (see the module doc)."""
    load_all()
    log = Log(_log_sink(kernel, caller, logfd))
    known_flags = core.CHECKPOINT_USER_FLAGS | core.CHECKPOINT_INCREMENTAL
    if flags & ~known_flags:
        raise CheckpointError(errno.EINVAL, f"unknown checkpoint flags {flags & ~known_flags:#x}")
    incremental = bool(flags & core.CHECKPOINT_INCREMENTAL)
    if incremental != (parent is not None):
        raise CheckpointError(errno.EINVAL, "CHECKPOINT_INCREMENTAL needs a parent image, and a "
                                            "parent image needs CHECKPOINT_INCREMENTAL")
    _check_privilege(kernel, caller, False, CheckpointError)
    link = _parent_link(kernel, parent) if incremental else None
    try:
        root = caller if pid == 0 else kernel.find_task(caller, pid)
    except ModelError:
        raise CheckpointError(errno.ESRCH, f"no task {pid}") from None
    root = root.leader
    if root.state == "zombie":
        raise CheckpointError(errno.ESRCH, f"task {pid} has exited")
    subtree = bool(flags & core.CHECKPOINT_SUBTREE)
    if not subtree and root.ns.reaper is not root:
        raise CheckpointError(errno.EINVAL, f"task {pid} is not a container init (use CHECKPOINT_SUBTREE)")
    tasks = tree_order(root)
    _check_tasks(kernel, caller, root, tasks)
    sink = _ModelFileSink(kernel, caller, fd) if isinstance(fd, int) else fd
    if crid is None:
        crid = kernel.next_crid
        kernel.next_crid += 1
    identity = identity or MODEL_IDENTITY
    image_id = image_id or image_id_for(kernel, crid)
    ctx = CheckpointContext(kernel, caller, root, tasks, sink, log)
    _write_header(ctx, flags, crid, image_id, kernel.ticks if time is None else time, identity,
                  link)
    ctx.fs_snapshot = dry_fs = identity.has_fs_snapshot
    ctx.incremental = _IncrementalSave(link) if link is not None else None
    try:
        if not subtree:
            dry = CheckpointContext(kernel, caller, root, tasks, None, log, collecting=True)
            dry.fs_snapshot = dry_fs
            dry.incremental = ctx.incremental
            _write_body(dry)
            leaks = dry.leaks()
            if leaks:
                for line in leaks:
                    log.error(errno.EBUSY, 0, line)
                raise CheckpointError(errno.EBUSY, leaks[0])
        _write_body(ctx)
    except CheckpointError as e:
        log.error(e.errno, ctx.writer.offset, e.message)
        ctx.writer.write_error(str(e))
        ctx.writer.finish()
        if isinstance(sink, _ModelFileSink):
            sink.close()
        raise
    checksum = ctx.writer.crc            # what the tail says: the image's link for a child
    ctx.writer.finish()
    if isinstance(sink, _ModelFileSink):
        sink.close()
    _saved(kernel, ctx.objects(), ImageLink(image_id, crid, checksum, tree_identity(ctx.tree_bytes)))
    log.debug(ctx.writer.offset, f"checkpoint {crid} done: {len(tasks)} tasks, {ctx.writer.nr_records} records")
    kernel.checkpoints_taken += 1
    return crid


def _saved(kernel, objects, link: ImageLink) -> None:
    """An image of these objects now exists: the next incremental checkpoint is relative to it."""
    from ..model.mm import MM, Shmem
    for ref, obj in objects:
        if isinstance(obj, (MM, Shmem)):
            obj.checkpointed((link.image_id, ref))
    kernel.image_links[link.image_id] = link


def _check_tasks(kernel, caller, root, tasks) -> None:
    for t in tasks:
        if t.state == "zombie":
            continue
        if not may_ptrace(caller.cred, t.cred):
            raise CheckpointError(errno.EPERM, f"may not ptrace task {t.tid} ({t.comm})")
        if t.ptraced_by is not None:
            raise CheckpointError(errno.EBUSY, f"task {t.tid} ({t.comm}) is being ptraced")
        if t.leader is caller.leader:
            continue  # a self-checkpoint: the caller's own group runs it
        if not t.frozen:
            raise CheckpointError(errno.EBUSY, f"task {t.tid} ({t.comm}) is not frozen")
        if t.cgroup is not root.cgroup and root.leader is not caller.leader:
            raise CheckpointError(errno.EBUSY, f"task {t.tid} ({t.comm}) is not in the root's freezer cgroup")


def _write_header(ctx, flags, crid, image_id, time, ident: HeaderIdentity = MODEL_IDENTITY,
                  parent: ImageLink | None = None) -> None:
    image_flags = ident.image_flags & ~core.IMAGE_INCREMENTAL
    if parent is not None:
        image_flags |= core.IMAGE_INCREMENTAL
    ctx.write(core.HEADER, magic=MAGIC_HEAD, version=FORMAT_VERSION, arch=ident.arch,
              major=ident.major, minor=ident.minor, patch=ident.patch, page_size=PAGE_SIZE,
              uflags=flags, image_flags=image_flags, time=time, crid=crid,
              image_id=image_id, parent_id=parent.image_id if parent is not None else bytes(16))
    for text in ident.release:
        ctx.write(core.STRING, var=text)
    ctx.write(core.HEADER_ARCH, has_fxsr=ident.has_fxsr, has_xsave=ident.has_xsave,
              xstate_size=ident.xstate_size, pad=0)
    if parent is not None:
        ctx.write(core.PARENT, parent_crid=parent.crid, parent_checksum=parent.checksum, pad=0,
                  parent_tree=parent.tree)


def _write_body(ctx) -> None:
    from ..kinds import files
    ctx.write(core.CONTAINER, flags=0, pad=0)
    ctx.write(core.STRING, var="lsm_none")
    ctx.write(core.LSM_INFO, var="dummy")
    if getattr(ctx, "fs_snapshot", True):  # a live image's identity: none (paths only)
        files.save_filesystem(ctx, ctx.kernel.vfs)
    write_tree(ctx)
    kinds = task_kinds()
    from ..kinds.tasktree import STATE_NUMBERS, TASK, TASK_OBJS
    for t in ctx.tasks:
        state = "zombie" if t.state == "zombie" else t.state
        ctx.write(TASK, state=STATE_NUMBERS[state], exit_signal=t.exit_signal,
                  exit_code=t.exit_code, pdeath_signal=t.pdeath_signal, flags=0, var=t.comm)
        if state == "zombie":
            if len(t.threads) > 1:
                # A leader that exited before its threads keeps the group's signal state.
                ctx.write(TASK_OBJS, files_objref=0, fs_objref=0, mm_objref=0, sighand_objref=0,
                          signal_objref=ctx.ref(t.signal), pad=0)
            continue
        refs = {name: ctx.ref(getattr(t, attr)) for name, attr in (
            ("files_objref", "files"), ("fs_objref", "fs"), ("mm_objref", "mm"),
            ("sighand_objref", "sighand"), ("signal_objref", "signal"))}
        ctx.write(TASK_OBJS, pad=0, **refs)
        for kind in kinds:
            kind.save_task(ctx, t)


# -- restart ------------------------------------------------------------------------------------
def restart(kernel, caller, pid: int, fd, flags: int = 0, logfd=None, *, restore_fs: bool = False,
            pidns: bool | None = None, chain=None):
    """Restart an image; returns 0 (the coordinator's result). See ``restart_tasks``."""
    restart_tasks(kernel, caller, pid, fd, flags, logfd, restore_fs=restore_fs, pidns=pidns,
                  chain=chain)
    return 0


def restart_tasks(kernel, caller, pid: int, fd, flags: int = 0, logfd=None, *,
                  restore_fs: bool = False, pidns: bool | None = None, chain=None) -> list:
    """Restart and return the restored tasks, root first.

    ``pid`` must be 0: the model builds the tree itself, below the caller.
    ``restore_fs`` also recreates the image's file system snapshot (replay into a fresh kernel);
    for a live image, which has none, it creates the paths the image names as placeholders.
    ``pidns``: restore into a new pid namespace (default: when the image root is pid 1, and
    for live images).
    ``chain``: where an incremental image's ancestors are (ImageChain, a directory, or a
    list of images); the chain is walked to a full image and applied oldest first.
    """
    return restart_job(kernel, caller, pid, fd, flags, logfd, restore_fs=restore_fs,
                       pidns=pidns, chain=chain)[0]


def restart_job(kernel, caller, pid: int, fd, flags: int = 0, logfd=None, *,
                restore_fs: bool = False, pidns: bool | None = None, page_sink=None,
                checksum: bool = True, chain=None):
    """``restart_tasks``, also returning the finished restart's context: its ``header``,
    ``live`` (a live image) and ``placeholders`` (paths created for a live image, or absent)."""
    load_all()
    log = Log(_log_sink(kernel, caller, logfd))
    if flags & ~core.RESTART_USER_FLAGS:
        raise RestartError(errno.EINVAL, f"unknown restart flags {flags & ~core.RESTART_USER_FLAGS:#x}")
    if pid != 0 and not flags & core.RESTART_TASKSELF:
        raise RestartError(errno.EINVAL, "the model creates the restored tree itself: pass pid 0")
    _check_privilege(kernel, caller, True, RestartError)
    data = _read_image(kernel, caller, fd)
    reader = ImageReader(data, checksum=checksum)  # False: the caller verifies it (see codec)
    job = RestoreJob(kernel, caller, reader, log, flags, restore_fs, pidns)
    job.ctx.page_sink = page_sink
    job.chain = ImageChain.of(chain) if chain is not None else None
    try:
        return job.run(), job.ctx
    except (ImageError, RestartError) as e:
        job.discard()
        log.error(getattr(e, "errno", errno.EINVAL), reader.pos, str(e))
        raise
    except _RESTART_INPUT_ERRORS as e:
        job.discard()
        err = ImageError(reader.pos, None, f"inconsistent image: {type(e).__name__}: {e}")
        log.error(errno.EINVAL, reader.pos, str(err))
        raise err from None


def _read_image(kernel, caller, fd):
    if isinstance(fd, int):
        f = caller.files.get(fd)
        return f.inode.read_at(0, f.inode.size)
    if isinstance(fd, (bytes, bytearray, memoryview, mmap.mmap)):
        return fd                          # an mmap'd image file is read in place, not copied
    return fd.read()


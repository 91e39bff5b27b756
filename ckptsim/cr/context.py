"""The contexts the resource kinds work in: one for checkpoint, one for restart.

Kinds see only these (docs/design.md, "The kind API"); the image bytes stay in the codec.
"""
from __future__ import annotations

import errno as _errno
from array import array

from ..errors import CkptsimError, ImageError
from ..image import core
from ..image.codec import ImageReader, ImageWriter
from ..image.schema import Layout, Record
from ..image.types import ObjType
from ..kinds.registry import BY_OBJTYPE, kind_for_object
from ..model.shared import Shared


class CheckpointError(CkptsimError):
    """A checkpoint failed with a Linux errno; the message names the object at fault."""

    def __init__(self, err: int, message: str):
        super().__init__(f"{_errno.errorcode.get(err, err)}: {message}")
        self.errno = err
        self.message = message


class RestartError(CheckpointError):
    """A restart failed; every task it created has been killed."""


class Log:
    """Linux-CR style log lines, ``[err N][pos P][E @ where] message``, to a text sink."""

    def __init__(self, sink=None):
        self.sink = sink
        self.lines: list[str] = []

    def _emit(self, line: str) -> None:
        self.lines.append(line)
        if self.sink is not None:
            self.sink(line + "\n")

    def debug(self, pos: int, message: str) -> None:
        self._emit(f"[pos {pos}] {message}")

    def error(self, err: int, pos: int, message: str) -> None:
        self._emit(f"[err {-err}][pos {pos}][E] {message}")


class _NullSink:
    def write(self, data) -> int:
        return len(data)


class CheckpointContext:
    """What a kind's save side uses. ``collecting`` is the leak-detection dry run."""

    def __init__(self, kernel, caller, root, tasks, sink, log: Log, collecting: bool = False):
        self.kernel = kernel
        self.caller = caller
        self.root = root
        self.tasks = tasks
        self.ns = root.ns
        self.writer = ImageWriter(_NullSink() if collecting else sink)
        self.log_ = log
        self.collecting = collecting
        self.refs: dict[int, tuple[int, object]] = {}   # id(obj) -> (objref, obj)
        self.uses: dict[int, int] = {}                  # objref -> references seen

    # -- records --------------------------------------------------------------------------
    def write(self, lay: Layout, var=None, **fields) -> None:
        self.writer.write(lay, var, **fields)

    def write_pages(self, addrs: array, data, data_crc: int | None = None) -> None:
        if len(addrs):
            self.writer.write_pages(addrs, data, data_crc)

    def end_pages(self) -> None:
        self.writer.end_pages()

    # -- shared objects -----------------------------------------------------------------
    def ref(self, obj) -> int:
        """The objref of ``obj``; the first time, write OBJREF and the object itself."""
        return self.ref_first(obj)[0]

    def ref_first(self, obj) -> tuple[int, bool]:
        """``ref(obj)``, and whether this call wrote the object (its first reference)."""
        if obj is None:
            return 0, False
        known = self.refs.get(id(obj))
        if known is not None:
            ref = known[0]
            self.uses[ref] += 1
            return ref, False
        kind = kind_for_object(obj)
        ref = len(self.refs) + 1
        self.refs[id(obj)] = (ref, obj)
        self.uses[ref] = 1
        self.writer.write(core.OBJREF, objtype=int(kind.objtype), objref=ref)
        kind.save_object(self, obj)
        return ref, True

    def objects(self) -> list[tuple[int, object]]:
        """(objref, object) in objref order."""
        return sorted(self.refs.values(), key=lambda r: r[0])

    def leaks(self) -> list[str]:
        """Shared objects referenced from outside the checkpointed set (Linux-CR's check)."""
        found = []
        for ref, obj in self.objects():
            if isinstance(obj, Shared) and obj.refs != self.uses[ref]:
                found.append(f"[obj {ref}] usage leak (real {obj.refs} != counted {self.uses[ref]}): "
                             f"{describe_object(obj)}")
        return found

    # -- tasks -------------------------------------------------------------------------------
    def vpid(self, task) -> int:
        return task.pid.nr_in(self.ns) if task is not None else 0

    def vpid_of(self, pid) -> int:
        return pid.nr_in(self.ns) if pid is not None else 0

    def fail(self, err: int, message: str):
        raise CheckpointError(err, message)

    def log(self, message: str) -> None:
        if not self.collecting:
            self.log_.debug(self.writer.offset, message)


def describe_object(obj) -> str:
    name = type(obj).__name__
    detail = getattr(obj, "describe", None)
    return f"{name} {detail()}" if callable(detail) else name


class RestartContext:
    """What a kind's restore side uses."""

    def __init__(self, kernel, caller, reader: ImageReader, log: Log, restore_fs: bool = False):
        self.kernel = kernel
        self.caller = caller
        self.reader = reader
        self.log_ = log
        self.restore_fs = restore_fs
        self.objects: dict[int, object] = {}
        self.types: dict[int, ObjType] = {}
        self._loading: list[int] = []
        self.tasks_by_vpid: dict[int, object] = {}
        self.header: Record | None = None
        # Set by a live restore (backend/restore): takes page chunks instead of the model's mm
        # (.private_pages(vma, addrs, data), .shmem_pages(seg, offsets, data)).
        self.page_sink = None
        # An incremental image: the parent chain's pages (cr/incremental.ChainPages), and per
        # restored mm / segment (obj, base objref, own page addresses, dropped ranges).
        self.base_pages = None
        self.deltas: list = []

    # -- records --------------------------------------------------------------------------
    def _objrefs(self) -> None:
        """Handle OBJREF records ahead: load each object and enter it under its objref."""
        while self.reader.peek() is core.OBJREF:
            rec = self.reader.next()
            ref, otype = rec["objref"], ObjType(rec["objtype"])
            kind = BY_OBJTYPE.get(otype)
            if kind is None:
                raise ImageError(rec.offset, "OBJREF", f"no resource kind restores {otype.name} objects")
            self.types[ref] = otype
            self._loading.append(ref)
            try:
                obj = kind.load_object(self)
            finally:
                self._loading.pop()
            if obj is None:
                raise ImageError(rec.offset, "OBJREF", f"{otype.name} objref {ref} restored nothing")
            self.objects.setdefault(ref, obj)

    def peek(self) -> Layout | None:
        self._objrefs()
        return self.reader.peek()

    def read(self, lay: Layout) -> Record:
        self._objrefs()
        rec = self.reader.expect(lay)
        return rec

    def read_pages(self):
        return self.reader.read_pages()

    def bind(self, obj) -> None:
        """Enter the object being loaded under its objref now (for records that refer back)."""
        self.objects[self._loading[-1]] = obj

    def obj(self, ref: int, otype: ObjType):
        if ref == 0:
            return None
        if ref not in self.objects:
            raise ImageError(self.reader.pos, None, f"objref {ref} is used before its object is complete")
        if self.types.get(ref) != otype:
            raise ImageError(self.reader.pos, None, f"objref {ref} is not a {otype.name}")
        return self.objects[ref]

    def task(self, vpid: int):
        try:
            return self.tasks_by_vpid[vpid]
        except KeyError:
            raise ImageError(self.reader.pos, None, f"no task with pid {vpid} in the image") from None

    def fail(self, err: int, message: str):
        raise RestartError(err, message)

    def log(self, message: str) -> None:
        self.log_.debug(self.reader.pos, message)

    def image_error(self, message: str) -> ImageError:
        return ImageError(self.reader.pos, None, message)

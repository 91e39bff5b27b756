"""ckptinfo: show a checkpoint image, as CRIU's ``crit show`` does (and Linux-CR's ckptinfo).

    ckptinfo [IMAGE|-]       summary: header, task tree, shared objects, per-task state
    ckptinfo --json IMAGE    the same, as JSON
    ckptinfo -v IMAGE        every record: offset, type, length and decoded fields
    ckptinfo -e IMAGE        the error record of a failed checkpoint (exit 1 if none)
    ckptinfo -p IMAGE        "Task i: pid ppid tgid pgid sid depth" per task
    ckptinfo --chain IMAGE [--parent PATH]...
                             an incremental image's chain, oldest first: per image its id,
                             parent id, crid, records, pages and bytes; ancestors are looked
                             for in IMAGE's directory, or in the files/directories named

The view is built from the decoded record stream alone (``decode_all`` plus the generic
printer), never by restoring the image: records are grouped by the section they are in,
tracking the current task (TASK records) and the open shared objects (OBJREF records).
A record belongs to the innermost open object whose kind owns its layout; a record of a
per-task kind closes every open object; framing records (PGARR, BUFFER, STRING) stay with
the innermost open object. Page chunks are counted against the record they follow.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

from ..errors import ImageError
from ..image import core
from ..image.codec import decode_all
from ..image.pretty import describe, load_layouts, render, show_value
from ..image.schema import Record
from ..image.types import ObjType

PROG = "ckptinfo"
EXIT_BAD_INPUT = 2


class InputError(Exception):
    """The input cannot be shown: reported as one ``ckptinfo: error:`` line, exit 2."""


# -- the view ---------------------------------------------------------------------------------
@dataclass
class Entry:
    """A record of a section, with the page chunks that followed it."""
    record: Record
    pages: int = 0

    def to_json(self) -> dict:
        out = describe(self.record)
        if self.pages:
            out["pages"] = self.pages
        return out


@dataclass
class SharedObject:
    objref: int
    objtype: ObjType
    offset: int
    task: int | None                    # index of the task whose section declared it
    entries: list[Entry] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return sum(e.pages for e in self.entries)

    @property
    def data_bytes(self) -> int:
        """Raw bytes the object carries outside page chunks (queued pipe or socket data)."""
        return sum(len(e.record.var) for e in self.entries
                   if e.record.layout.var == "bytes" and e.record.layout is not core.BUFFER)

    @property
    def name(self) -> str | None:
        """The first text the object carries (a path, a socket address...)."""
        for e in self.entries:
            if e.record.layout.var == "str" and e.record.var:
                return e.record.var
        return None


@dataclass
class TaskView:
    index: int
    pids: dict
    task: Record | None = None
    entries: list[Entry] = field(default_factory=list)

    @property
    def objrefs(self) -> dict[str, int]:
        """The task's objref fields (TASK_OBJS), by field name."""
        refs = {}
        for e in self.entries:
            for f in e.record.layout.objref_fields:
                refs.setdefault(f.name, e.record.values[f.name])
        return refs


@dataclass
class ImageView:
    size: int
    records: list[Record]
    tail: Record
    header: Record | None = None
    uts: list[str] = field(default_factory=list)
    arch: Record | None = None
    container: Record | None = None
    lsm: list[str] = field(default_factory=list)
    filesystem: list[Entry] = field(default_factory=list)
    tree: list[dict] = field(default_factory=list)
    nested: list[int] = field(default_factory=list)
    objects: dict[int, SharedObject] = field(default_factory=dict)
    tasks: list[TaskView] = field(default_factory=list)
    error: str | None = None
    parent: Record | None = None            # PARENT: an incremental image's link


def _owners() -> dict:
    from ..kinds.registry import KINDS
    owners = {}
    for kind in KINDS.values():
        for lay in kind.layouts:
            owners[lay.type_id] = kind
    return owners


def _tail_record(data: bytes) -> Record:
    start = len(data) - core.TAIL_SIZE
    values = core.TAIL.struct.unpack_from(data, start + 8)
    return Record(core.TAIL, dict(zip((f.name for f in core.TAIL.fields), values)), None, start)


def build_view(data: bytes) -> ImageView:
    """Decode ``data`` (raises ImageError) and group its records by section."""
    records = decode_all(data)
    view = ImageView(len(data), records, _tail_record(data))
    owners = _owners()
    stack: list[SharedObject] = []          # open objects, innermost last
    section: list[Entry] = view.filesystem  # where records outside objects go
    last: list[Entry] = []                  # the list the previous entry went to (for pages)
    pages_pending = False                   # a PGARR{n>0} waits for its BUFFER
    after_error = False

    for rec in records:
        lay = rec.layout
        if pages_pending and lay is core.BUFFER:
            pages_pending = False
            continue                        # page data: counted by the PGARR before it
        pages_pending = False
        if after_error and lay is core.STRING:
            view.error = rec.var[1:] if rec.var.startswith("\0") else rec.var
            after_error = False
            continue
        if lay is core.HEADER:
            view.header = rec
        elif lay is core.STRING and view.container is None:
            view.uts.append(rec.var)
        elif lay is core.HEADER_ARCH:
            view.arch = rec
        elif lay is core.PARENT:
            view.parent = rec
        elif lay is core.CONTAINER:
            view.container = rec
        elif lay is core.STRING and len(view.lsm) < 1 and not view.tree:
            view.lsm.append(rec.var)
        elif lay is core.LSM_INFO:
            view.lsm.append(rec.var)
        elif lay is core.ERROR:
            after_error = True
        elif lay.name == "TREE" and not view.tasks:
            stack.clear()
            names = [f.name for f in lay.var]
            view.tree = [dict(zip(names, item)) for item in rec.var]
        elif lay.name == "TREE_NESTED" and not view.tasks:
            view.nested = [n for (n,) in rec.var]
        elif lay.name == "TASK":
            stack.clear()
            index = len(view.tasks)
            pids = view.tree[index] if index < len(view.tree) else {}
            view.tasks.append(TaskView(index, pids, rec))
            section = view.tasks[-1].entries
        elif lay is core.OBJREF:
            task = len(view.tasks) - 1 if view.tasks else None
            obj = SharedObject(rec["objref"], ObjType(rec["objtype"]), rec.offset, task)
            view.objects[obj.objref] = obj
            stack.append(obj)
        elif lay is core.PGARR:
            if rec["nr_pages"]:
                pages_pending = True
                if last:
                    last[-1].pages += rec["nr_pages"]
        else:
            last = _place(rec, owners, stack, section)
            continue
    return view


def _place(rec: Record, owners: dict, stack: list[SharedObject], section: list[Entry]) -> list:
    kind = owners.get(rec.layout.type_id)
    if kind is not None and kind.objtype is not None and any(o.objtype == kind.objtype for o in stack):
        while stack[-1].objtype != kind.objtype:
            stack.pop()
        target = stack[-1].entries
    elif kind is not None and (kind.save_task is not None or kind.name == "tasktree"):
        stack.clear()
        target = section
    else:
        target = stack[-1].entries if stack else section
    target.append(Entry(rec))
    return target


# -- presentation -------------------------------------------------------------------------------
def _field(rec: Record, name: str):
    f = next(f for f in rec.layout.fields if f.name == name)
    return show_value(f, rec.values[name])


def header_info(view: ImageView) -> dict:
    h = view.header
    uts = view.uts + [""] * (3 - len(view.uts))
    parent = bytes(h["parent_id"])
    return {
        "version": h["version"], "arch": _field(h, "arch"),
        "kernel": {"release": uts[0], "version": uts[1], "machine": uts[2],
                   "major": h["major"], "minor": h["minor"], "patch": h["patch"]},
        "page_size": h["page_size"], "time": h["time"], "crid": h["crid"],
        "image_id": bytes(h["image_id"]).hex(),
        "parent_id": parent.hex() if any(parent) else None,
        "parent": None if view.parent is None else {
            "crid": view.parent["parent_crid"],
            "checksum": hex(view.parent["parent_checksum"]),
            "tree": bytes(view.parent["parent_tree"]).hex()},
        "flags": _field(h, "uflags"), "image_flags": _field(h, "image_flags"),
        "lsm": view.lsm[0] if view.lsm else None,
        "lsm_info": view.lsm[1] if len(view.lsm) > 1 else None,
        "records": len(view.records) + 1, "size": view.size,
        "checksum": hex(view.tail["checksum"]),
    }


def object_short(view: ImageView, ref: int, depth: int = 0) -> str:
    """``@ref TYPE 'name'`` plus what the object's first record refers to (one level)."""
    obj = view.objects.get(ref)
    if obj is None:
        return f"@{ref}"
    text = f"@{ref} {obj.objtype.name}"
    if obj.name:
        text += f" {obj.name!r}"
    if obj.entries and depth == 0:
        first = obj.entries[0].record
        for f in first.layout.objref_fields:
            target = first.values[f.name]
            if target and target != ref:
                text += f" ({f.name} {object_short(view, target, 1)})"
    if obj.data_bytes:
        text += f", {obj.data_bytes} bytes queued"
    if obj.pages:
        text += f", {obj.pages} pages"
    return text


def object_summary(view: ImageView, obj: SharedObject) -> str:
    head = render(obj.entries[0].record) if obj.entries else "(no records)"
    extra = []
    if obj.data_bytes:
        extra.append(f"{obj.data_bytes} bytes queued")
    if obj.pages:
        extra.append(f"{obj.pages} pages")
    return head + (f" [{', '.join(extra)}]" if extra else "")


def entry_text(view: ImageView, entry: Entry, arrows: bool = True) -> str:
    """The record's line; ``arrows`` adds what each objref field points at."""
    rec = entry.record
    text = render(rec)
    if entry.pages:
        text += f" [{entry.pages} pages]"
    for f in rec.layout.objref_fields if arrows else ():
        ref = rec.values[f.name]
        if ref:
            text += f"\n      {f.name} -> {object_short(view, ref)}"
    return text


def to_json(view: ImageView) -> dict:
    return {
        "header": header_info(view),
        "filesystem": {"records": len(view.filesystem),
                       "types": _count_types(e.record for e in view.filesystem)},
        "tree": [dict(t, index=i, comm=_comm(view, i)) for i, t in enumerate(view.tree)],
        "nested_pids": view.nested,
        "objects": [{"objref": o.objref, "type": o.objtype.name, "offset": o.offset,
                     "task": o.task, "summary": object_short(view, o.objref),
                     "pages": o.pages, "data_bytes": o.data_bytes,
                     "records": [e.to_json() for e in o.entries]}
                    for o in view.objects.values()],
        "tasks": [{"index": t.index, **t.pids, "comm": t.task.var,
                   "state": _field(t.task, "state"), "exit_code": t.task["exit_code"],
                   "objects": t.objrefs, "records": [e.to_json() for e in t.entries]}
                  for t in view.tasks],
        "error": view.error,
    }


def _count_types(records) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec.name] = counts.get(rec.name, 0) + 1
    return counts


def _comm(view: ImageView, index: int) -> str | None:
    return view.tasks[index].task.var if index < len(view.tasks) else None


def _tree_lines(view: ImageView) -> list[str]:
    """The tree, indented by ancestry among the checkpointed tasks."""
    indent: dict[int, int] = {}
    lines = [f"  {'PID':>6} {'PPID':>6} {'TGID':>6} {'PGID':>6} {'SID':>6}  COMM"]
    for i, t in enumerate(view.tree):
        if t["vpid"] != t["vtgid"]:
            level = indent.get(t["vtgid"], 0) + 1      # a thread, under its leader
        else:
            level = indent[t["vppid"]] + 1 if t["vppid"] in indent else 0
        indent.setdefault(t["vpid"], level)
        comm = _comm(view, i) or "?"
        thread = " (thread)" if t["vpid"] != t["vtgid"] else ""
        lines.append(f"  {t['vpid']:>6} {t['vppid']:>6} {t['vtgid']:>6} {t['vpgid']:>6} "
                     f"{t['vsid']:>6}  {'  ' * level}{comm}{thread}")
    return lines


def render_text(view: ImageView) -> str:
    h = header_info(view)
    k = h["kernel"]
    out = ["Header:",
           f"  version      {h['version']}",
           f"  arch         {h['arch']}",
           f"  kernel       {k['release']} {k['version']} {k['machine']} "
           f"({k['major']}.{k['minor']}.{k['patch']})",
           f"  time         {h['time']}",
           f"  crid         {h['crid']}",
           f"  image id     {h['image_id']}",
           f"  parent id    {h['parent_id'] or 'none'}"
           + (f" (crid {h['parent']['crid']}, checksum {h['parent']['checksum']})"
              if h["parent"] else ""),
           f"  flags        {h['flags']} (image: {h['image_flags']})",
           f"  lsm          {h['lsm']} ({h['lsm_info']})",
           f"  size         {h['size']} bytes, {h['records']} records, checksum {h['checksum']}",
           ""]
    if view.filesystem:
        counts = ", ".join(f"{n} {name}" for name, n in _count_types(e.record for e in view.filesystem).items())
        out += [f"File system snapshot: {counts}", ""]
    out += [f"Task tree ({len(view.tree)} tasks):"] + _tree_lines(view) + [""]
    out.append(f"Shared objects ({len(view.objects)}):")
    for obj in view.objects.values():
        out.append(f"  @{obj.objref:<4} {obj.objtype.name:<11} {object_summary(view, obj)}")
    out.append("")
    for t in view.tasks:
        out += _task_lines(view, t)
    if view.error is not None:
        out += [f"Checkpoint failed: {view.error}", ""]
    return "\n".join(out)


def _task_lines(view: ImageView, t: TaskView) -> list[str]:
    p = t.pids
    out = [f"Task {t.index}: pid {p.get('vpid')} comm {t.task.var!r} state {_field(t.task, 'state')}"
           f" exit_code {t.task['exit_code']:#x}"]
    for entry in t.entries:   # the objects these name are expanded below
        out.append("    " + entry_text(view, entry, arrows=False))
    expanded: set[int] = set()
    for name, ref in t.objrefs.items():
        obj = view.objects.get(ref)
        if not ref or obj is None:
            continue
        if ref in expanded:
            out.append(f"  {name}: @{ref} {obj.objtype.name} (as above)")
            continue
        expanded.add(ref)
        if obj.task != t.index:
            out.append(f"  {name}: {object_short(view, ref)} (shared, saved with task {obj.task})")
            continue
        out.append(f"  {name}: @{ref} {obj.objtype.name}")
        out += ["    " + entry_text(view, e) for e in obj.entries]
    out.append("")
    return out


def verbose_lines(view: ImageView) -> list[str]:
    lines = []
    for rec in view.records + [view.tail]:
        lines.append(f"info: [@{rec.offset}] object {rec.layout.type_id:4d} {rec.name} "
                     f"len {describe(rec)['len']}")
        detail = render(rec)[len(rec.name):].strip()
        if rec.layout is core.OBJREF:
            detail = f"objtype {_field(rec, 'objtype')} objref {rec['objref']}"
        if detail:
            lines.append(f"info:     {detail}")
    return lines


def pids_lines(view: ImageView) -> list[str]:
    return [f"Task {i}: pid {t['vpid']} ppid {t['vppid']} tgid {t['vtgid']} pgid {t['vpgid']} "
            f"sid {t['vsid']} depth {t['depth']}" for i, t in enumerate(view.tree)]


# -- chains ------------------------------------------------------------------------------------
def chain_of(name: str, data, parents: list[str]) -> list:
    """The ImageScans of the chain ending with ``data``, oldest first (InputError if broken)."""
    from ..cr.context import RestartError
    from ..cr.incremental import ImageChain
    places = parents or [os.path.dirname(os.path.abspath(name)) if name != "-" else os.getcwd()]
    files = [p for p in places if not os.path.isdir(p)]
    images = []
    for path in files:
        images.append((path, _read_input(path)))
    try:
        chain = ImageChain(images, [p for p in places if os.path.isdir(p)])
        return chain.resolve(data, "stdin" if name == "-" else name)
    except RestartError as e:
        raise InputError(e.message) from None


def chain_json(scans) -> list[dict]:
    return [{"file": s.name, "image_id": s.image_id.hex(),
             "parent_id": s.parent_id.hex() if s.incremental else None,
             "crid": s.header["crid"], "incremental": s.incremental, "records": s.nr_records,
             "pages": s.nr_pages, "page_bytes": s.page_bytes, "bytes": s.size} for s in scans]


def chain_lines(scans) -> list[str]:
    lines = [f"Chain of {len(scans)} images, oldest first (pages: the pages each image holds; "
             "an incremental image holds only those written since its parent):",
             f"  {'#':>2} {'image id':32} {'parent id':32} {'crid':>5} {'records':>8} "
             f"{'pages':>7} {'bytes':>10}  file"]
    for i, link in enumerate(chain_json(scans)):
        lines.append(f"  {i:>2} {link['image_id']:32} {link['parent_id'] or '(full image)':32} "
                     f"{link['crid']:>5} {link['records']:>8} {link['pages']:>7} "
                     f"{link['bytes']:>10}  {link['file']}")
    return lines


# -- command line -------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Show a checkpoint image.")
    p.add_argument("image", nargs="?", default="-", help="image file (default or '-': stdin)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="print the view as JSON")
    mode.add_argument("-v", "--verbose", action="store_true", help="list every record")
    mode.add_argument("-e", "--error", action="store_true",
                      help="print the error record of a failed checkpoint (exit 1 if none)")
    mode.add_argument("-p", "--pids", "--pids-only", dest="pids", action="store_true",
                      help="print the task tree's pids")
    p.add_argument("--chain", action="store_true",
                   help="show the chain of images IMAGE is the newest of")
    p.add_argument("--parent", action="append", default=[], metavar="PATH",
                   help="with --chain: an image file or a directory of images where the "
                        "ancestors are (repeatable; default: IMAGE's directory)")
    return p


def _read_input(name: str) -> bytes:
    try:
        if name == "-":
            return sys.stdin.buffer.read()
        with open(name, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise InputError(f"{name}: {e.strerror or e}") from None


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    data = _read_input(args.image)
    load_layouts()
    try:
        view = build_view(data)
    except ImageError as e:
        raise InputError(f"{'stdin' if args.image == '-' else args.image}: {e}") from None
    if args.parent and not args.chain:
        raise InputError("--parent goes with --chain")
    if args.chain:
        if args.verbose or args.error or args.pids:
            raise InputError("--chain shows the chain only (with --json as JSON)")
        scans = chain_of(args.image, data, args.parent)
        lines = [json.dumps(chain_json(scans), indent=2)] if args.json else chain_lines(scans)
        sys.stdout.write("\n".join(lines) + "\n")
        return 0
    if args.error:
        if view.error is None:
            print(f"{PROG}: no error record in the image", file=sys.stderr)
            return 1
        print(f"CKPT_HDR_ERROR: {view.error}")
        return 0
    if args.json:
        lines = [json.dumps(to_json(view), indent=2)]
    elif args.verbose:
        lines = verbose_lines(view)
    elif args.pids:
        lines = pids_lines(view)
    else:
        lines = [render_text(view)]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def main(argv=None) -> int:
    """Entry point (console script ``ckptinfo``): returns the exit status."""
    try:
        return _run(argv)
    except SystemExit as e:                 # argparse: --help (0) and usage errors (2)
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(f"{PROG}: error: {e.code}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:                 # e.g. ckptinfo -v img | head: not an error
        try:
            sys.stdout = open(os.devnull, "w")  # so the interpreter's final flush is quiet
        except OSError:
            pass
        return 141
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:                  # a bug must still not print a traceback at users
        print(f"{PROG}: error: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

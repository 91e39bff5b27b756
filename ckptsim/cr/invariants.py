"""Invariants of a model kernel, checked after a replay (and by the property tests)."""
from __future__ import annotations

import bisect

from ..image.types import PAGE_SIZE


def check_invariants(kernel) -> list[str]:
    """Every violated invariant, as one line each (empty when all hold)."""
    problems: list[str] = []
    tasks = kernel.live_tasks()
    problems += _tree(kernel, tasks)
    seen_mm, seen_files = set(), set()
    for t in tasks:
        if t.state == "zombie":
            continue
        if t.mm is not None and id(t.mm) not in seen_mm:
            seen_mm.add(id(t.mm))
            problems += [f"task {t.tid}: {p}" for p in _mm(t.mm)]
        if t.files is not None and id(t.files) not in seen_files:
            seen_files.add(id(t.files))
            problems += [f"task {t.tid}: {p}" for p in _files(t.files)]
        for attr in ("mm", "files", "fs", "sighand", "signal", "cred", "sigstate"):
            if getattr(t, attr) is None:
                problems.append(f"task {t.tid}: no {attr}")
    return problems


def _tree(kernel, tasks) -> list[str]:
    out = []
    for t in tasks:
        if t.pid.ns.pids.get(t.pid.nr_in(t.pid.ns)) is not t.pid:
            out.append(f"task {t.tid}: pid not registered in its namespace")
        if t.leader is t:
            if t.parent is not None and t not in t.parent.children:
                out.append(f"task {t.tid}: missing from its parent's children")
            for c in t.children:
                if c.parent is not t:
                    out.append(f"task {t.tid}: child {c.tid} names another parent")
            if t.pgrp is None or t.session is None:
                out.append(f"task {t.tid}: no process group or session")
            elif t.pgrp.users <= 0 or t.session.users <= 0:
                out.append(f"task {t.tid}: process group or session pid not held")
        elif t not in t.leader.threads:
            out.append(f"thread {t.tid}: missing from its group {t.leader.tid}")
        elif t.mm is not t.leader.mm and t.state != "zombie":
            out.append(f"thread {t.tid}: does not share its group's mm")
    return out


def _mm(mm) -> list[str]:
    out = []
    prev_end = 0
    starts = []
    for v in mm.vmas:
        if v.start % PAGE_SIZE or v.end % PAGE_SIZE or v.start >= v.end:
            out.append(f"VMA {v.start:#x}-{v.end:#x} is empty or not page aligned")
        if v.start < prev_end:
            out.append(f"VMA {v.start:#x}-{v.end:#x} overlaps the one before it")
        prev_end = max(prev_end, v.end)
        starts.append(v.start)
    for index in sorted(mm.pages):
        addr = index * PAGE_SIZE
        i = bisect.bisect_right(starts, addr) - 1
        if i < 0 or not mm.vmas[i].start <= addr < mm.vmas[i].end:
            out.append(f"page {addr:#x} lies outside every VMA")
    return out


def _files(fdtable) -> list[str]:
    out = []
    for fd, file, _cloexec in fdtable.items():
        if file.refs <= 0:
            out.append(f"fd {fd} points at a released file")
        private = getattr(file, "private", None)
        if private is not None and getattr(private, "refs", 1) <= 0:
            out.append(f"fd {fd} points at a released {type(private).__name__}")
    return out

"""The conformance runner: drives any backend through a scenario and judges the result.

    from conformance.runner import run_one, run_all
    result = run_one("pipe_partly_full", "sim")   # Result(status, problems, ...)

For each scenario: start it; then ``restarts`` times: note the visible state, checkpoint,
check the image (decodes, replays in the model, round-trips), kill the container, restart it,
and compare the visible state with the one noted (any difference the scenario did not declare
in ``allowed_diffs`` fails it); then release the checkpoint points, let it run to the end and
collect its verdict (its own checks, exit statuses, nothing left behind). A scenario whose
checkpoint must fail (``expect_errno``) is checked for that errno, then resumed as it was.
A scenario a backend cannot run is ``unsupported``, with the backend's reason.

An incremental scenario (``incremental`` = N) is checkpointed at each of its N + 1 steps, the
first time in full and then against the previous image; each incremental image must hold
exactly the pages the backend says were written since the previous checkpoint (the model sees
every write), and at least every page whose contents changed (unless dropped); then the
container is restarted from the newest image of the chain and must show the same visible
state and the same memory as before that checkpoint, as a restart of a full image would.
"""
from __future__ import annotations

import errno as errno_names
import time
from dataclasses import dataclass, field

from ckptsim.image import core

from .backend import Backend, CheckpointFailed
from .scenario import Scenario, all_scenarios

PASSED, FAILED, UNSUPPORTED = "passed", "failed", "unsupported"


@dataclass
class Result:
    scenario: str
    area: str
    status: str
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        head = f"{self.scenario} [{self.area}]: {self.status}"
        return head + "".join(f"\n  - {p}" for p in self.problems)


def backend_named(name: str) -> Backend:
    if name == "sim":
        from .backends.sim import SimBackend
        return SimBackend()
    if name == "live":
        from .backends.live import LiveBackend
        return LiveBackend()
    raise ValueError(f"unknown backend {name!r} (sim or live)")


def _errname(err: int | None) -> str:
    return errno_names.errorcode.get(err, str(err)) if err is not None else "none"


def diff_states(before, after, allowed: frozenset, path: str = "") -> list[str]:
    """Differences between two visible states, except under the allowed top-level keys."""
    if path.split("/")[0] in allowed or path in allowed:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            sub = f"{path}/{key}" if path else str(key)
            if key not in after:
                out.append(f"{sub}: gone after restart (was {before[key]!r})")
            elif key not in before:
                out.append(f"{sub}: new after restart ({after[key]!r})")
            else:
                out.extend(diff_states(before[key], after[key], allowed, sub))
        return out
    if before != after:
        return [f"{path}: {before!r} before, {after!r} after restart"]
    return []


def run_scenario(scn: Scenario, backend: Backend) -> Result:
    started = time.monotonic()
    reason = backend.unsupported(scn)
    if reason is not None:
        return Result(scn.name, scn.area, UNSUPPORTED, [reason])
    problems: list[str] = []
    run = None
    try:
        run = backend.start(scn)
        problems = _drive(scn, backend, run)
    except CheckpointFailed as e:
        problems = [f"unexpected failure ({_errname(e.errno)}): {e.message}"]
        if run is not None and not backend.can_restart:
            problems += getattr(backend, "reported_problems", lambda run: [])(run)
    finally:
        if run is not None:
            backend.cleanup(run)
    if not problems and not backend.can_restart:  # never passed without a restart
        return Result(scn.name, scn.area, UNSUPPORTED, [NO_RESTART_REASON], time.monotonic() - started)
    status = FAILED if problems else PASSED
    return Result(scn.name, scn.area, status, problems, time.monotonic() - started)


NO_RESTART_REASON = "live restart is not implemented yet (issue 5); checkpoint and image checks passed"


def _checkpoint_only(scn: Scenario, backend: Backend, run) -> list[str]:
    """For a backend that cannot restart: checkpoint (or the expected errno), check the image,
    and check that the tree runs on exactly as before; the problems found."""
    before = backend.visible_state(run)
    try:
        image = backend.checkpoint(run)
    except CheckpointFailed as e:
        if scn.expect_errno is None:
            raise
        if e.errno != scn.expect_errno:
            return [f"checkpoint failed with {_errname(e.errno)}, expected {_errname(scn.expect_errno)}: {e.message}"]
        problems = []
    else:
        if scn.expect_errno is not None:
            return [f"checkpoint succeeded, expected {_errname(scn.expect_errno)}"]
        problems = backend.check_image(run, image)
    problems += [f"after the checkpoint: {d}"
                 for d in diff_states(before, backend.visible_state(run), scn.allowed_diffs)]
    problems += getattr(backend, "reported_problems", lambda run: [])(run)
    return problems


def _drive(scn: Scenario, backend: Backend, run) -> list[str]:
    problems: list[str] = []
    if not backend.can_restart:
        return _checkpoint_only(scn, backend, run)
    if scn.self_image is not None:
        before = backend.visible_state(run)
        image = backend.self_image(run, scn.self_image)
        problems += backend.check_image(run, image)
        if scn.expect_restart_errno is not None:
            return problems + _expected_restart_failure(scn, backend, run, image, before)
        backend.kill(run)
        backend.restart(run, image)
        return problems + _finish(scn, backend, run)
    if scn.incremental:
        return problems + _drive_incremental(scn, backend, run)
    for round_ in range(scn.restarts):
        before = backend.visible_state(run)
        try:
            image = backend.checkpoint(run)
        except CheckpointFailed as e:
            if scn.expect_errno is None:
                raise
            if e.errno != scn.expect_errno:
                return [f"checkpoint failed with {_errname(e.errno)}, expected {_errname(scn.expect_errno)}: {e.message}"]
            # A failed checkpoint leaves the tree exactly as it was, and it runs on.
            problems += diff_states(before, backend.visible_state(run), scn.allowed_diffs)
            return problems + _finish(scn, backend, run)
        if scn.expect_errno is not None:
            return [f"checkpoint succeeded, expected {_errname(scn.expect_errno)}"]
        problems += backend.check_image(run, image)
        if scn.expect_restart_errno is not None:
            return problems + _expected_restart_failure(scn, backend, run, image, before)
        backend.kill(run)
        backend.restart(run, image)
        if scn.restart_flags & core.RESTART_FROZEN:
            if not backend.is_frozen(run):
                problems.append("RESTART_FROZEN: the restored tasks are not frozen")
            backend.thaw(run)
        after = backend.visible_state(run)
        problems += [f"round {round_ + 1}: {d}" for d in diff_states(before, after, scn.allowed_diffs)]
    return problems + _finish(scn, backend, run)


def _drive_incremental(scn: Scenario, backend: Backend, run) -> list[str]:
    problems: list[str] = []
    images: list[bytes] = []
    contents = {}
    for step in range(1, scn.incremental + 2):
        if step > 1:
            backend.release_step(run, step - 1)
        before = backend.visible_state(run)
        now = backend.page_contents(run)
        written = backend.written_pages(run) if images else None
        image = backend.checkpoint(run, parent=images[-1] if images else None)
        problems += [f"step {step}: {p}" for p in backend.check_image(run, image, ancestors=images)]
        if images:
            problems += [f"step {step}: {p}" for p in check_delta(image, written, contents, now)]
        images.append(image)
        contents = now
    backend.kill(run)
    backend.restart(run, images[-1], ancestors=images[:-1])
    problems += [f"restart of the chain: {d}"
                 for d in diff_states(before, backend.visible_state(run), scn.allowed_diffs)]
    after = backend.page_contents(run)
    problems += [f"restart of the chain: memory of pid {pid} page {addr:#x} differs"
                 for pid, addr in _changed_pages(contents, after)][:10]
    return problems + _finish(scn, backend, run)


def _changed_pages(old: dict, new: dict) -> list[tuple[int, int]]:
    """(pid, page) whose digest differs, for pages mapped in both (tasks in both)."""
    return sorted((pid, addr) for pid, pages in new.items() if pid in old
                  for addr, digest in pages.items()
                  if addr in old[pid] and old[pid][addr] != digest)


def check_delta(image: bytes, written: dict, old: dict, new: dict) -> list[str]:
    """An incremental image's pages, per task, against what was written since its parent
    (exactly) and against the pages whose contents changed (each must be in the image or in
    one of its dropped ranges)."""
    from ckptsim.cr.incremental import ImageScan
    scan = ImageScan(image)
    if not scan.incremental:
        return ["the image is not incremental"]
    held = scan.task_pages()
    problems = []
    for pid in sorted(set(held) | set(written)):
        have, want = set(held.get(pid, ())), set(written.get(pid, ()))
        if have != want:
            problems.append(f"pid {pid}: the image holds {len(have)} pages, {len(want)} were "
                            f"written; missing {_pages(want - have)}, extra {_pages(have - want)}")
    drops = {pid: scan.mms[ref].drops for pid, ref in scan.task_mms}
    for pid, addr in _changed_pages(old, new):
        dropped = any(start <= addr < end for start, end in drops.get(pid, ()))
        if addr not in held.get(pid, ()) and not dropped:
            problems.append(f"pid {pid}: page {addr:#x} changed but is neither in the image "
                            "nor dropped")
    return problems


def _pages(addrs) -> str:
    shown = ", ".join(hex(a) for a in sorted(addrs)[:4])
    return f"[{shown}{', ...' if len(addrs) > 4 else ''}]"


def _expected_restart_failure(scn: Scenario, backend: Backend, run, image: bytes, before) -> list[str]:
    """The restart must fail with the expected errno, create nothing, and leave the original
    tree (still alive, frozen) to run on."""
    try:
        backend.restart(run, image)
    except CheckpointFailed as e:
        if e.errno != scn.expect_restart_errno:
            return [f"restart failed with {_errname(e.errno)}, expected {_errname(scn.expect_restart_errno)}: {e.message}"]
        problems = diff_states(before, backend.visible_state(run), scn.allowed_diffs)
        backend.thaw(run)
        return problems + _finish(scn, backend, run)
    return [f"restart succeeded, expected {_errname(scn.expect_restart_errno)}"]


def _finish(scn: Scenario, backend: Backend, run) -> list[str]:
    backend.resume(run)
    return backend.verdict(run)


def select(pattern: str | None = None) -> list[Scenario]:
    scns = all_scenarios()
    if pattern:
        scns = [s for s in scns if pattern in s.name or pattern == s.area]
    return scns


def run_one(name: str, backend: str = "sim") -> Result:
    scn = next((s for s in all_scenarios() if s.name == name), None)
    if scn is None:
        raise KeyError(f"no scenario {name!r}")
    return run_scenario(scn, backend_named(backend))


def run_all(backend: str = "sim", pattern: str | None = None) -> list[Result]:
    b = backend_named(backend)
    return [run_scenario(s, b) for s in select(pattern)]


def area_table(results: list[Result]) -> str:
    """One line per area: passed, failed, unsupported (and a total)."""
    rows: dict[str, list[int]] = {}
    for r in results:
        counts = rows.setdefault(r.area, [0, 0, 0])
        counts[(PASSED, FAILED, UNSUPPORTED).index(r.status)] += 1
    width = max([10, *map(len, rows)])
    lines = [f"{'area':{width}} {'passed':>7} {'failed':>7} {'unsupported':>12}"]
    total = [0, 0, 0]
    for area in sorted(rows):
        p, f, u = rows[area]
        total = [total[0] + p, total[1] + f, total[2] + u]
        lines.append(f"{area:{width}} {p:7} {f:7} {u:12}")
    lines.append(f"{'total':{width}} {total[0]:7} {total[1]:7} {total[2]:12}")
    return "\n".join(lines)

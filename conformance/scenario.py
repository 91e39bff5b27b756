"""Scenarios: backend-neutral C/R test cases, and the registry that collects them.

A scenario is a program for a container init (built with ``conformance.dsl.Program``) that
sets up state, waits at its checkpoint point(s) (``p.ckpt()``), is checkpointed and restarted
by the runner (``restarts`` times in a row), then carries on and checks its own state from the
inside (``p.check``/``p.check_mem``), as CRIU's zdtm tests do. Tasks the init forks run their
part of the same program. A scenario that checks nothing after its checkpoint point is refused
at registration.

The fields beyond the program describe how the runner drives it and what it expects:
``checkpoint_flags`` (0: a container checkpoint with leak detection; CHECKPOINT_SUBTREE),
``expect_errno`` (the checkpoint must fail with this errno; the scenario then checks that the
tree still runs and passes its checks), ``expect_restart_errno`` (the restart must fail with
this errno, leaving nothing behind; the original tree then runs on), ``freeze`` (False: check that unfrozen trees are
refused), ``leak`` (the runner keeps an outside reference to the container's fd ``leak``),
``caller_uid``/``unpriv_level`` (who checkpoints, under which ckpt_unpriv_allowed),
``restart_flags`` (RESTART_FROZEN, RESTART_GHOST, RESTART_TASKSELF), ``self_image`` (the
program checkpoints itself into this model path; the runner restarts from it),
``allowed_diffs`` (visible-state keys that may differ across C/R), ``needs`` (features a
backend must have: the backend reports the scenario unsupported, with the reason, otherwise),
``incremental`` (N > 0: after the full checkpoint at step 1, N incremental checkpoints at the
program's points of steps 2..N+1, each against the previous image; the runner checks that each
holds exactly the pages written since the previous one, then restarts the newest image of the
chain).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .dsl import Program

AREAS = ("memory", "files", "pipes", "unix", "signals", "tree", "creds", "api", "images",
         "incremental")


class ScenarioError(Exception):
    """A scenario that is not well formed."""


@dataclass(frozen=True)
class Scenario:
    name: str
    area: str
    summary: str
    program: tuple  # the built op list (JSON-able)
    restarts: int = 1
    checkpoint_flags: int = 0
    expect_errno: int | None = None
    expect_restart_errno: int | None = None
    freeze: bool = True
    leak: int | None = None
    caller_uid: int = 0
    unpriv_level: int | None = None
    restart_flags: int = 0
    self_image: str | None = None
    allowed_diffs: frozenset = frozenset()
    needs: frozenset = frozenset()
    files: tuple = ()  # ((path, text), ...) present in the container's file system at start
    seed: int = 0
    incremental: int = 0

    @property
    def ops(self) -> list:
        return [list(op) for op in self.program]


REGISTRY: dict[str, Scenario] = {}


def scenario(area: str, summary: str = "", **options) -> Callable:
    """Decorator: ``@scenario("pipes", "a partly full pipe") def pipe_partial(p): ...``."""
    if area not in AREAS:
        raise ScenarioError(f"unknown area {area!r}")

    def register(build: Callable[[Program], None]) -> Callable:
        p = Program()
        build(p)
        name = build.__name__
        if name in REGISTRY:
            raise ScenarioError(f"scenario {name} defined twice")
        if p.points == 0 and options.get("self_image") is None:
            raise ScenarioError(f"{name}: no checkpoint point (p.ckpt())")
        expects_failure = (options.get("expect_errno") is not None
                           or options.get("expect_restart_errno") is not None)
        if p.checks_after_point == 0 and not expects_failure:
            raise ScenarioError(f"{name}: checks nothing after its checkpoint point")
        steps = options.get("incremental", 0) + 1
        if p.steps != steps and options.get("self_image") is None:
            raise ScenarioError(f"{name}: {steps - 1} incremental checkpoints need points up to "
                                f"step {steps}, the program's go up to step {p.steps}")
        options.setdefault("needs", frozenset())
        options["needs"] = frozenset(options["needs"])
        options["allowed_diffs"] = frozenset(options.get("allowed_diffs", ()))
        REGISTRY[name] = Scenario(name=name, area=area, summary=summary or (build.__doc__ or "").strip(),
                                  program=tuple(tuple(op) for op in p.build()), **options)
        return build

    return register


def all_scenarios() -> list[Scenario]:
    from . import scenarios  # noqa: F401  (importing registers every scenario module)
    return [REGISTRY[name] for name in sorted(REGISTRY)]

"""The live Linux backend's side of the conformance suite.

The live backend (issues 4 and 5) does not exist yet, so every scenario is reported as
unsupported with that reason: nothing is run, nothing is counted as passed.
"""
from __future__ import annotations

from ..backend import Backend

REASON = "the live backend is not implemented yet (issues 4 and 5): no live checkpoint or restart"


class LiveBackend(Backend):
    name = "live"

    def unsupported(self, scenario) -> str | None:
        return REASON

    def _never(self, *args):
        raise NotImplementedError(REASON)

    start = visible_state = checkpoint = kill = restart = _never
    is_frozen = thaw = resume = verdict = _never

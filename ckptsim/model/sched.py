"""Blocking, and the seeded deterministic scheduler."""
from __future__ import annotations


class Blocked(Exception):
    """A syscall would block; the scheduler runs the task again later.

    ``reason`` names what the task waits for (shown in traces and deadlock reports).
    """

    def __init__(self, reason: str = ""):
        super().__init__(reason)
        self.reason = reason

"""The interface a C/R backend implements to run the conformance suite.

A backend starts a scenario's program as a container, checkpoints it, kills it, restarts it,
lets it continue, and reports what it sees. The runner (conformance/runner.py) drives every
backend the same way and judges the results; backends hold no verdict logic of their own.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from .scenario import Scenario


class CheckpointFailed(Exception):
    """The backend's checkpoint (or restart) failed with ``errno``."""

    def __init__(self, errno: int, message: str):
        super().__init__(message)
        self.errno = errno
        self.message = message


class Backend(ABC):
    name: str = "?"
    # False: the backend checkpoints but cannot restart yet; the runner then only checks the
    # checkpoint and the image, and never counts a scenario as passed (conformance/runner.py).
    can_restart: bool = True

    def unsupported(self, scenario: Scenario) -> str | None:
        """Why this backend cannot run ``scenario``, or None when it can."""
        return None

    @abstractmethod
    def start(self, scenario: Scenario):
        """Start the scenario; return a run handle once every task waits (at its points)."""

    @abstractmethod
    def visible_state(self, run) -> dict:
        """What the world sees of the container: tasks, fds, maps, signal state (JSON-able)."""

    @abstractmethod
    def checkpoint(self, run) -> bytes:
        """Checkpoint the container as the scenario asks; CheckpointFailed on failure.

        The tree must be left exactly as it was (running, or waiting at its points)."""

    @abstractmethod
    def kill(self, run) -> None:
        """End every task of the container (and reap them)."""

    @abstractmethod
    def restart(self, run, image: bytes) -> None:
        """Restart the container from ``image``; CheckpointFailed on failure, with nothing
        left behind."""

    @abstractmethod
    def is_frozen(self, run) -> bool:
        """Whether every restored task is frozen (RESTART_FROZEN)."""

    @abstractmethod
    def thaw(self, run) -> None:
        """Let a frozen container run again."""

    @abstractmethod
    def resume(self, run) -> None:
        """Release the checkpoint points and run the container to its end."""

    @abstractmethod
    def verdict(self, run) -> list[str]:
        """Problems seen at the end: failed checks, bad exit statuses, tasks left behind."""

    def self_image(self, run, path: str) -> bytes:
        """The image a self-checkpointing scenario wrote to ``path`` (its own file system)."""
        raise NotImplementedError

    def check_image(self, run, image: bytes) -> list[str]:
        """Problems with an image this backend wrote (decoding, replay, round trip)."""
        return []

    def cleanup(self, run) -> None:
        """Release everything the run holds, even after a failure."""

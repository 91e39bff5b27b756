"""Fixtures shared by the live-restart tests: every restored tree is ended by pid at
teardown (its processes, the namespace init the restart added) and the restart's child is
reaped, also when the test fails."""
from __future__ import annotations

import io
import os
import signal

import pytest

from backend.dump import checkpoint
from backend.restore.job import restart_image


def _end(made: list) -> None:
    for restored in made:
        for pid in list(restored.pids.values()) + [restored.reaper]:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.waitpid(restored.child, 0)
        except ChildProcessError:
            pass


@pytest.fixture
def restarts():
    """``restarts(target)``: checkpoint the target (a started C target: .pid, .proc) with
    kill=True and restart its image."""
    made = []

    def run(target):
        sink = io.BytesIO()
        checkpoint(target.pid, sink, kill=True)
        target.proc.wait(timeout=10)
        restored = restart_image(bytearray(sink.getvalue()))
        made.append(restored)
        return restored

    yield run
    _end(made)


@pytest.fixture
def restart_images():
    """``restart_images(image, log=None)``: restart_image of an image already taken."""
    made = []

    def run(image: bytes, log=None):
        restored = restart_image(bytearray(image), log=log)
        made.append(restored)
        return restored

    yield run
    _end(made)

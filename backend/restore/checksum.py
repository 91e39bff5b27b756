"""The image's CRC-32 during a restart, computed on a helper thread that then serves as the
job's watchdog (backend/restore/job.py): checked before any restored process runs."""
from __future__ import annotations

import threading
import time

from ckptsim.image.codec import ImageReader
from ckptsim.threads import Background
from .stub import Watchdog

GO_WAIT = 10.0             # the checksum starts by itself after this, without a watchdog


class ImageChecksum:
    """The image's CRC-32, computed on a helper thread; ``result()`` raises its ImageError.
    Then the thread serves as ``watchdog`` (so a hang before the pages are written is ended
    at the watchdog's deadline plus the checksum's own time). (Run at a lower priority, it was no faster on an
    idle machine and was starved on a busy one: the restart then waited ~20 ms for it.)"""

    def __init__(self, reader: ImageReader, watchdog: Watchdog | None = None):
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._go = threading.Event()
        self._cancelled = False
        self._thread = Background(self._run, reader, watchdog, name="image-checksum")

    def start(self) -> None:
        """Compute it now. (It waits for this, or for result(): before, the tree is being
        built, one injected syscall after the other, and a woken stub queued behind this
        pass on a busy CPU for up to ~4 ms each time; while the pages are written, the
        tracer mostly waits.)"""
        if self._go is not None:
            self._go.set()

    def cancel(self) -> None:
        """Not needed any more (the job ends): the thread goes on to its watchdog role."""
        if self._go is not None:
            self._cancelled = True
            self._go.set()

    def _run(self, reader: ImageReader, watchdog: Watchdog | None) -> None:
        try:
            self._go.wait(GO_WAIT if watchdog is None else
                          max(0.0, watchdog._deadline - time.monotonic()))
            if not self._cancelled:
                reader.verify_checksum()
        except BaseException as e:       # handed to the restoring thread
            self._error = e
        finally:
            self._done.set()
        if watchdog is not None:
            watchdog.run()

    @classmethod
    def done(cls) -> "ImageChecksum":
        """An already verified checksum."""
        c = cls.__new__(cls)
        c._error, c._done, c._go = None, None, None
        return c

    def result(self) -> None:
        if self._done is None:
            return
        self._go.set()
        self._done.wait()
        if self._error is not None:
            raise self._error

"""Helper threads that the caller does not wait for to begin.

threading.Thread.start() returns only once the new thread runs. The kernel puts a new thread
on the idlest CPU, and on a VM whose other vCPU is halted, waking it took ~3.7 ms here (most
starts: 1.4-11 ms, against 0.06-0.1 ms for the start alone). The checkpoint and the restart
start their helpers (page reader, page writer, checksum) on their critical path, so they
use this instead: the caller goes on at once, and the helper runs when its CPU is up (a
helper's job not begun when it is needed is taken back by the caller: snapshot_mm).

    Background(fn, *args, name="") -> runs fn(*args) on a new thread at once
    .join(timeout=None) -> bool      until fn has returned (True) or the timeout passed
    .is_alive() -> bool
    Background.running() -> [names]  the helpers not finished (for tests)
"""
from __future__ import annotations

import _thread
import threading


class Background:
    _live: set = set()
    _lock = threading.Lock()

    def __init__(self, fn, *args, name: str = ""):
        self.name = name
        self._done = threading.Event()
        with Background._lock:
            Background._live.add(self)
        try:
            _thread.start_new_thread(self._run, (fn, args))
        except BaseException:
            self._finish()
            raise

    def _run(self, fn, args) -> None:
        try:
            fn(*args)       # (fn handles its own errors: an escaping one is printed)
        finally:
            self._finish()

    def _finish(self) -> None:
        with Background._lock:
            Background._live.discard(self)
        self._done.set()

    def join(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def is_alive(self) -> bool:
        return not self._done.is_set()

    @classmethod
    def running(cls) -> list[str]:
        with cls._lock:
            return sorted(b.name for b in cls._live)

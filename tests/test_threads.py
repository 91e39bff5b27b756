"""ckptsim/threads.py: helper threads the caller does not wait for to begin."""
from __future__ import annotations

import threading

from ckptsim.threads import Background


def test_a_background_helper_runs_is_listed_while_it_runs_and_joins():
    go, ran = threading.Event(), []
    helper = Background(lambda x: (go.wait(10), ran.append(x)), 7, name="test-helper")
    assert helper.is_alive() and "test-helper" in Background.running()
    assert not helper.join(0.01)                 # still waiting for ``go``
    go.set()
    assert helper.join(10) and ran == [7]
    assert not helper.is_alive() and "test-helper" not in Background.running()


def test_a_failing_helper_still_ends_and_its_error_is_reported(monkeypatch):
    import sys
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(info.exc_value))

    def boom():
        raise ValueError("expected in this test")
    helper = Background(boom, name="test-failing")
    assert helper.join(10) and "test-failing" not in Background.running()
    for _ in range(1000):               # (reported just after join() returns)
        if seen:
            break
        threading.Event().wait(0.01)
    assert [str(e) for e in seen] == ["expected in this test"]

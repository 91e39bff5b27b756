"""ckptsim/threads.py: helper threads the caller does not wait for to begin."""
from __future__ import annotations

import threading

import pytest

from ckptsim.threads import Background


def test_a_background_helper_runs_is_listed_while_it_runs_and_joins():
    go, ran = threading.Event(), []
    helper = Background(lambda x: (go.wait(10), ran.append(x)), 7, name="test-helper")
    assert helper.is_alive() and "test-helper" in Background.running()
    assert not helper.join(0.01)                 # still waiting for ``go``
    go.set()
    assert helper.join(10) and ran == [7]
    assert not helper.is_alive() and "test-helper" not in Background.running()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_failing_helper_still_ends():
    def boom():
        raise ValueError("expected in this test")
    helper = Background(boom, name="test-failing")
    assert helper.join(10) and "test-failing" not in Background.running()

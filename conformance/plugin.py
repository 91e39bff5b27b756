"""pytest plugin: ``pytest conformance/ --backend=sim|live``.

Adds the ``--backend`` option and the ``conformance_backend`` fixture, records each
scenario's result, and ends the run with the table per area (passed, failed, unsupported).
An unsupported scenario is reported as skipped with its reason, and counted as unsupported in
that table: never as passed.
"""
from __future__ import annotations

import pytest

from .runner import FAILED, UNSUPPORTED, Result, area_table, backend_named

_RESULT_KEY = "conformance_result"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("ckptsim conformance")
    group.addoption("--backend", default="sim", choices=("sim", "live"),
                    help="C/R backend the conformance scenarios run on (default: sim)")


@pytest.fixture(scope="session")
def conformance_backend(request):
    return backend_named(request.config.getoption("--backend"))


def record(request, result: Result) -> None:
    """Attach the result to the test report (it travels back from xdist workers)."""
    request.node.user_properties.append((_RESULT_KEY, (result.scenario, result.area, result.status)))
    if result.status == UNSUPPORTED:
        pytest.skip(f"unsupported on this backend: {'; '.join(result.problems)}")
    if result.status == FAILED:
        pytest.fail(str(result), pytrace=False)


class _Tally:
    """Collects results on the controlling process (reports come back from xdist workers)."""

    def __init__(self, config):
        self.config = config
        self.results: dict[str, Result] = {}

    def pytest_runtest_logreport(self, report) -> None:
        for key, value in getattr(report, "user_properties", ()):
            if key == _RESULT_KEY:
                name, area, status = value
                self.results[name] = Result(name, area, status)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.results:
            terminalreporter.section(f"conformance on backend {self.config.getoption('--backend')}")
            terminalreporter.write_line(area_table(list(self.results.values())))


def pytest_configure(config) -> None:
    config.pluginmanager.register(_Tally(config), "ckptsim-conformance-tally")

"""Every conformance scenario, on the backend chosen with ``--backend`` (default: sim)."""
import pytest

from conformance.plugin import record
from conformance.runner import run_scenario
from conformance.scenario import all_scenarios

SCENARIOS = all_scenarios()


@pytest.mark.parametrize("scn", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scn, conformance_backend, request):
    record(request, run_scenario(scn, conformance_backend))


def test_every_area_has_scenarios():
    areas = {s.area for s in SCENARIOS}
    assert {"memory", "files", "pipes", "unix", "signals", "tree", "creds", "api"} <= areas
    assert len(SCENARIOS) >= 80

"""The runner's incremental steps: it passes the model and fails backends that get them wrong."""
from conformance.backends.live import LiveBackend
from conformance.backends.sim import SimBackend
from conformance.runner import FAILED, PASSED, UNSUPPORTED, run_scenario
from conformance.scenario import REGISTRY, all_scenarios


def scn(name):
    all_scenarios()
    return REGISTRY[name]


class LosesDirtyPages(SimBackend):
    """Faulty: forgets what was written before each incremental checkpoint."""

    def checkpoint(self, run, parent=None):
        if parent is not None:
            for t in self.container_tasks(run):
                if t.state != "zombie":
                    t.mm.clear_dirty()
        return super().checkpoint(run, parent)


class WritesEveryPage(SimBackend):
    """Faulty: its incremental images are correct but hold pages nobody wrote."""

    def checkpoint(self, run, parent=None):
        if parent is not None:
            for t in self.container_tasks(run):
                if t.state != "zombie":
                    t.mm._dirty.update(i >> 12 for i in range(0x10000000, 0x10008000, 4096)
                                       if i >> 12 in t.mm.pages)
        return super().checkpoint(run, parent)


class SkipsAnAncestor(SimBackend):
    def restart(self, run, image, ancestors=()):
        super().restart(run, image, ancestors[:1])


def test_the_model_passes_every_incremental_scenario():
    names = [s.name for s in all_scenarios() if s.area == "incremental"]
    assert len(names) >= 5
    for name in names:
        result = run_scenario(scn(name), SimBackend())
        assert result.status == PASSED, str(result)


def test_lost_dirty_pages_fail_the_exact_page_check_and_the_contents():
    result = run_scenario(scn("incr_anon_private"), LosesDirtyPages())
    assert result.status == FAILED
    assert any("step 2: pid 1: the image holds 0 pages, 2 were written" in p
               for p in result.problems), result.problems
    assert any("changed but is neither in the image nor dropped" in p for p in result.problems)
    assert any("check failed" in p and "page 7 from the newest image" in p
               for p in result.problems), result.problems


def test_extra_pages_fail_the_exact_page_check():
    result = run_scenario(scn("incr_nothing_written"), WritesEveryPage())
    assert result.status == FAILED
    assert any("extra [0x10001000]" in p for p in result.problems), result.problems


def test_a_missing_link_fails_the_restart():
    result = run_scenario(scn("incr_anon_private"), SkipsAnAncestor())
    assert result.status == FAILED
    assert any("ENOENT" in p and "needs its parent image" in p for p in result.problems), \
        result.problems


def test_the_live_backend_runs_dropped_pages_where_it_can_track():
    """MADV_DONTNEED, munmap and a new mapping between the steps (the live interpreter's
    madvise op): passed on the live backend, or unsupported saying why sessions cannot run."""
    from backend import track
    why = track.unavailable_reason()
    result = run_scenario(scn("incr_dropped_pages"), LiveBackend())
    if why is not None:
        assert result.status == UNSUPPORTED and why in result.problems[0], result.problems
    else:
        assert result.status == PASSED, result.problems

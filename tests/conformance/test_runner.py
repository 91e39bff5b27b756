"""The conformance runner judges backends: it must catch a backend that loses state."""
import errno

from conformance.backends.sim import SimBackend
from conformance.dsl import MAP_PRIVATE_ANON, PROT_RW, Program
from conformance.runner import FAILED, PASSED, UNSUPPORTED, Result, area_table, diff_states, run_scenario
from conformance.scenario import Scenario


def make(name, build, **options) -> Scenario:
    p = Program()
    build(p)
    return Scenario(name=name, area="pipes", summary="test", program=tuple(tuple(op) for op in p.build()),
                    **options)


def pipe_program(p):
    buf = p.mmap(0, 4096, PROT_RW, MAP_PRIVATE_ANON)
    r, w = p.pipe()
    p.write_text(w, buf, "hello")
    p.ckpt()
    p.read_check(r, buf, "hello", "pipe data")


class DropsPipeData(SimBackend):
    """A faulty backend: restart loses whatever the pipes held."""

    def restart(self, run, image):
        super().restart(run, image)
        for t in self.container_tasks(run):
            for _fd, f, _ in t.files.items():
                if f.ftype.kind == "pipe":
                    f.private.buffer.clear()


class ShiftsTheOffset(SimBackend):
    def restart(self, run, image):
        super().restart(run, image)
        for t in self.container_tasks(run):
            for _fd, f, _ in t.files.items():
                f.pos += 1


class Refuses(SimBackend):
    def unsupported(self, scenario):
        return "no pipes here"


def test_a_correct_backend_passes():
    assert run_scenario(make("ok", pipe_program), SimBackend()).status == PASSED


def test_lost_pipe_data_fails_the_scenario():
    result = run_scenario(make("lossy", pipe_program), DropsPipeData())
    assert result.status == FAILED
    assert any("/queued: 5 before, 0 after" in p for p in result.problems)
    assert any("left running" in p for p in result.problems)  # its read never returns


def test_visible_state_difference_fails_even_when_the_program_does_not_notice():
    def program(p):
        fd = p.open("/data/f", 0o102, 0o644)  # O_RDWR|O_CREAT
        p.ckpt()
        p.check(fd, "==", 0, "fd number")
    result = run_scenario(make("offset", program), ShiftsTheOffset())
    assert result.status == FAILED
    assert any("/pos" in p for p in result.problems)


def test_unsupported_is_reported_with_its_reason():
    result = run_scenario(make("refused", pipe_program), Refuses())
    assert (result.status, result.problems) == (UNSUPPORTED, ["no pipes here"])


def test_expected_checkpoint_error_must_happen():
    result = run_scenario(make("not_refused", pipe_program, expect_errno=errno.EBUSY), SimBackend())
    assert result.status == FAILED and "expected EBUSY" in result.problems[0]


def test_unfrozen_tree_is_refused_and_runs_on():
    result = run_scenario(make("unfrozen", pipe_program, freeze=False, expect_errno=errno.EBUSY), SimBackend())
    assert result.status == PASSED, result


def test_a_task_left_blocked_fails():
    def program(p):
        r, _w = p.pipe()
        p.ckpt()
        p.check(r, "==", 0, "read end number")
        p.call("read", r, 0, 1)  # blocks forever: nothing writes
    result = run_scenario(make("hang", program), SimBackend())
    assert result.status == FAILED and any("left running" in p for p in result.problems)


def test_diff_states_respects_allowed_keys():
    before = {"tasks": {1: {"ppid": 0}}, "fds": {1: {"fds": {0: {"pos": 3}}}}}
    after = {"tasks": {1: {"ppid": 9}}, "fds": {1: {"fds": {0: {"pos": 3}}}}}
    assert diff_states(before, after, frozenset()) == ["tasks/1/ppid: 0 before, 9 after restart"]
    assert diff_states(before, after, frozenset({"tasks"})) == []


def test_area_table_counts_each_status():
    table = area_table([Result("a", "pipes", PASSED), Result("b", "pipes", FAILED),
                        Result("c", "unix", UNSUPPORTED)])
    assert "pipes            1       1            0" in table
    assert "total            1       1            1" in table

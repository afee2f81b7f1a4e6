"""The check vocabulary doctor and health share (deploykit.checks): statuses, hints, running."""

from __future__ import annotations

from deploykit import checks, health
from deploykit.checks import CheckResult, Status
from deploykit.errors import CheckFailed, DockerError


class Layer:
    """A check that knows what to look at whenever it fails."""

    hint = "see `deploykit logs engine`"

    def __init__(self, name: str, outcome: CheckResult | Exception) -> None:
        self.name, self.outcome, self.ran = name, outcome, False

    def run(self) -> CheckResult:
        self.ran = True
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class Probe:
    """A check whose failures each say what to do (no hint of its own)."""

    def __init__(self, name: str, outcome: CheckResult | Exception) -> None:
        self.name, self.outcome = name, outcome

    def run(self) -> CheckResult:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def test_a_failure_gets_the_hint_of_the_check_that_knows_it() -> None:
    returned = checks.run_check(Layer("engine", checks.failed("engine", "exited")))
    raised = checks.run_check(Layer("engine", CheckFailed("no engine container", "deploykit up")))
    assert (returned.status, returned.hint) == (Status.FAIL, "see `deploykit logs engine`")
    assert (raised.detail, raised.hint) == ("no engine container", "see `deploykit logs engine`")
    own = checks.run_check(Probe("compose", checks.failed("compose", "missing", "install it")))
    error = checks.run_check(Probe("docker", DockerError("not reachable", "start it")))
    assert (own.hint, error.hint, error.detail) == ("install it", "start it", "not reachable")
    passed = checks.run_check(Layer("engine", checks.ok("engine", "healthy")))
    assert passed.passed and passed.hint is None


def test_skip_does_not_fail_and_only_layered_runs_stop() -> None:
    assert checks.skipped("broker", "no stack").passed
    down = [Probe("a", checks.failed("a", "x")), Probe("b", checks.ok("b", "y"))]
    assert [r.status for r in checks.run_checks(down)] == [Status.FAIL, Status.OK]
    layers = [Layer("a", checks.failed("a", "x")), Layer("b", checks.ok("b", "y"))]
    results = checks.run_checks(layers, layered=True)
    assert [r.status for r in results] == [Status.FAIL, Status.FAIL] and not layers[1].ran
    assert results[1].detail == "not run: a failed"


def test_health_reports_layers_in_its_own_words() -> None:
    results = health.run_layers(
        [Layer("broker", checks.ok("broker", "up")), Layer("engine", checks.failed("engine", "x"))]
    )
    err = health.failure(results, None)
    assert err.message == "health check engine failed: x"
    assert err.hint == "see `deploykit logs engine`"
    report = health.report_json(results)
    assert report["ok"] is False
    assert report["checks"][1] == {
        "check": "engine",
        "ok": False,
        "status": "fail",
        "detail": "x",
        "hint": "see `deploykit logs engine`",
    }

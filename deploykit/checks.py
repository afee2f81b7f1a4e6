"""The check vocabulary ``deploykit doctor`` (this host) and ``deploykit health`` (a running stack)
share.

A check has a ``name`` and ``run()`` gives a :class:`CheckResult`: a :class:`Status`, a detail and,
when it fails, a hint saying what to do. The hint comes from the check that knows it: a check whose
every failure calls for the same look (a layer of a running stack: "see `deploykit logs engine`")
says so once, in its ``hint`` attribute; a check whose failures differ puts the hint in each failed
result; an error a check raises brings its own. :func:`run_checks` runs checks in order and turns a
``DeployKitError`` a check raises into a failed result, so no check wraps its own work in ``try``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

from deploykit.errors import DeployKitError


class Status(StrEnum):
    OK = "ok"
    FAIL = "fail"
    SKIP = "skip"  # not applicable here (the detail says why); does not fail the run


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    hint: str | None = None

    @property
    def passed(self) -> bool:
        return self.status is not Status.FAIL

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": str(self.status),
            "detail": self.detail,
            "hint": self.hint,
        }


class Check(Protocol):
    """A check; it may also carry a ``hint`` attribute: what to do when it fails."""

    @property
    def name(self) -> str: ...

    def run(self) -> CheckResult: ...


def ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.OK, detail)


def failed(name: str, detail: str, hint: str | None = None) -> CheckResult:
    return CheckResult(name, Status.FAIL, detail, hint)


def skipped(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, detail)


def run_check(check: Check) -> CheckResult:
    """Run one check; a DeployKitError it raises is a failed result. A failure's hint is the check's
    own ``hint`` when it has one, else the result's, else the error's."""
    own_hint: str | None = getattr(check, "hint", None)
    try:
        result = check.run()
    except DeployKitError as err:
        return failed(check.name, err.message, own_hint or err.hint)
    if not result.passed and own_hint:
        return replace(result, hint=own_hint)
    return result


def run_checks(checks: Sequence[Check], *, layered: bool = False) -> list[CheckResult]:
    """Run every check in order. ``layered``: each check stands on the ones before it, so after the
    first failure the rest are reported as failed without running (they could not pass)."""
    results: list[CheckResult] = []
    first_failed: str | None = None
    for check in checks:
        if layered and first_failed is not None:
            results.append(failed(check.name, f"not run: {first_failed} failed"))
            continue
        result = run_check(check)
        results.append(result)
        if not result.passed and first_failed is None:
            first_failed = check.name
    return results

"""Health check building blocks: the stack target, the clock protocol, and running the checks
(``deploykit.checks``, the vocabulary ``deploykit doctor`` shares) layer by layer with an injectable
clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from deploykit import mqttclient
from deploykit.checks import Check, CheckResult, run_checks
from deploykit.docker import Docker
from deploykit.errors import CheckFailed
from deploykit.stack import COMPOSE_PROJECT_LABEL, COMPOSE_SERVICE_LABEL, StackRecord


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass(frozen=True)
class StackTarget:
    """Where the checks look: the stack's broker address, accounts, engine container, names.
    A ``deploykit serve`` instance has no containers (``docker`` None)."""

    record: StackRecord
    docker: Docker | None
    host: str = "127.0.0.1"
    project: str | None = None  # the project whose account the MQTT checks use

    @property
    def address(self) -> mqttclient.BrokerAddress:
        return self.record.broker_address(self.host)

    @property
    def project_name(self) -> str:
        return self.project or self.record.projects[0]

    def credentials(self) -> mqttclient.Credentials:
        return self.record.client_credentials(self.project_name)

    def container(self, service: str) -> str:
        if self.docker is None:
            raise CheckFailed(
                f"the stack {self.record.name!r} runs no containers", "see `deploykit serve`"
            )
        found = self.docker.containers(
            {COMPOSE_PROJECT_LABEL: self.record.name, COMPOSE_SERVICE_LABEL: service}
        )
        if not found:
            raise CheckFailed(
                f"the stack {self.record.name!r} has no {service} container",
                "start it: deploykit up",
            )
        return found[0].name or found[0].id or service


def run_layers(checks: Sequence[Check]) -> list[CheckResult]:
    """The stack's checks, bottom layer first: after the first failure the layers above it are
    reported as failed without running (they could not pass)."""
    return run_checks(checks, layered=True)


def wait_healthy(
    checks: Sequence[Check] | Callable[[], Sequence[Check]],
    *,
    timeout_s: float,
    pause_s: float = 2.0,
    clock: Clock | None = None,
    on_round: Callable[[list[CheckResult], float], None] | None = None,
) -> tuple[list[CheckResult], float]:
    """Repeat the checks until all pass or ``timeout_s`` passes; returns (results, seconds).
    ``on_round`` sees each round's results that did not all pass (to show progress)."""
    clock = clock or SystemClock()
    start = clock.monotonic()
    while True:
        current = checks() if callable(checks) else checks
        results = run_layers(current)
        elapsed = clock.monotonic() - start
        if all(r.passed for r in results) or elapsed >= timeout_s:
            return results, elapsed
        if on_round is not None:
            on_round(results, elapsed)
        clock.sleep(min(pause_s, max(0.0, timeout_s - elapsed)))


def failure(results: Sequence[CheckResult], waited_s: float | None = None) -> CheckFailed:
    """The error for a failed health run: names the first failed layer and what to look at."""
    first = next(r for r in results if not r.passed)
    waited = f" after {waited_s:.0f} s" if waited_s else ""
    return CheckFailed(
        f"health check {first.name} failed{waited}: {first.detail}",
        first.hint or "see `deploykit logs`",
    )


def report_json(results: Sequence[CheckResult]) -> dict[str, Any]:
    """``deploykit health --json``: each layer as ``check``/``ok`` (and its status, detail, hint)."""
    return {
        "ok": all(r.passed for r in results),
        "checks": [
            {
                "check": r.name,
                "ok": r.passed,
                "status": str(r.status),
                "detail": r.detail,
                "hint": r.hint,
            }
            for r in results
        ],
    }

"""Health check building blocks: results, the check and clock protocols, the stack target,
and running the checks layer by layer with an injectable clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from deploykit import mqttclient
from deploykit.docker import Docker
from deploykit.errors import CheckFailed, DeployKitError
from deploykit.secrets import SecretsFolder
from deploykit.stack import COMPOSE_PROJECT_LABEL, COMPOSE_SERVICE_LABEL, StackRecord


@dataclass(frozen=True)
class CheckResult:
    check: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "ok": self.ok, "detail": self.detail}


class Check(Protocol):
    name: str

    def run(self) -> CheckResult: ...


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
    """Where the checks look: the stack's broker address, accounts, engine container, names."""

    record: StackRecord
    docker: Docker
    host: str = "127.0.0.1"
    project: str | None = None  # the project whose account the MQTT checks use

    @property
    def address(self) -> mqttclient.BrokerAddress:
        return mqttclient.BrokerAddress(self.host, self.record.mqtt_port)

    @property
    def project_name(self) -> str:
        return self.project or self.record.projects[0]

    def credentials(self) -> mqttclient.Credentials:
        folder = SecretsFolder(self.record.secrets_dir)
        return mqttclient.Credentials(self.project_name, folder.client_password(self.project_name))

    def container(self, service: str) -> str:
        found = self.docker.containers(
            {COMPOSE_PROJECT_LABEL: self.record.name, COMPOSE_SERVICE_LABEL: service}
        )
        if not found:
            raise CheckFailed(
                f"the stack {self.record.name!r} has no {service} container",
                "start it: deploykit up",
            )
        return found[0].name or found[0].id or service


def ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail)


def fail(name: str, detail: str) -> CheckResult:
    return CheckResult(name, False, detail)


def run_checks(checks: Sequence[Check]) -> list[CheckResult]:
    """Run in order; after the first failure the rest are reported as not run."""
    results: list[CheckResult] = []
    failed: str | None = None
    for check in checks:
        if failed is not None:
            results.append(fail(check.name, f"not run: {failed} failed"))
            continue
        try:
            result = check.run()
        except DeployKitError as err:
            result = fail(check.name, err.message)
        results.append(result)
        if not result.ok:
            failed = check.name
    return results


def wait_healthy(
    checks: Sequence[Check] | Callable[[], Sequence[Check]],
    *,
    timeout_s: float,
    pause_s: float = 2.0,
    clock: Clock | None = None,
) -> tuple[list[CheckResult], float]:
    """Repeat the checks until all pass or ``timeout_s`` passes; returns (results, seconds)."""
    clock = clock or SystemClock()
    start = clock.monotonic()
    while True:
        current = checks() if callable(checks) else checks
        results = run_checks(current)
        elapsed = clock.monotonic() - start
        if all(r.ok for r in results) or elapsed >= timeout_s:
            return results, elapsed
        clock.sleep(min(pause_s, max(0.0, timeout_s - elapsed)))


def failure(results: Sequence[CheckResult], waited_s: float | None = None) -> CheckFailed:
    """The error for a failed health run: names the first failed layer and what to look at."""
    first = next(r for r in results if not r.ok)
    waited = f" after {waited_s:.0f} s" if waited_s else ""
    hints = {
        "broker": "check `deploykit ps` and `deploykit logs broker`; is the MQTT port published?",
        "engine-container": "see `deploykit logs engine` (a large model takes minutes to load)",
        "engine-health": "see `deploykit logs engine`",
        "engine-models": "the engine serves another model name; check --model/--served-model-name",
        "engine-completion": "see `deploykit logs engine`; the engine cannot generate",
        "bridge-status": "see `deploykit logs bridge`; the bridge is not connected to the broker",
        "bridge-probe": "see `deploykit logs bridge`; the bridge does not answer through MQTT",
    }
    return CheckFailed(
        f"health check {first.check} failed{waited}: {first.detail}",
        hints.get(first.check, "see `deploykit logs`"),
    )

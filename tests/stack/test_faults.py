"""Faults of the running cpu stack under load (deploykit.soak): each fault once, mid-run, with clients
that retry by requestId after a timeout or a retryable error, as the protocol reference tells them
to; nothing may be lost, no request may end in a non-retryable error, and the stack must be
healthy again by itself. Duplicated generations are counted and printed (after a bridge crash the
de-duplication cache is gone, so a repeat can be generated again: the README says so).

The stack runs with benchmarks/soak-bridge.yaml (rate limits off, MQTT keepalive 5 s); the crash
faults kill the container's process from this host, as root (CI runs as root)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploykit import build, health, soak, stack
from deploykit.docker import Docker

from .conftest import free_port
from .test_stack_e2e import built  # noqa: F401  (the session's images, built once)

pytestmark = pytest.mark.integration

NAME = "dktest-faults"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def faulty(
    built: list[build.Built],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[stack.StackRecord]:
    if os.geteuid() != 0:
        pytest.skip("the crash faults kill container processes from the host: needs root")
    state = tmp_path_factory.mktemp("faults")
    where = ["--name", NAME, "--state-dir", str(state)]
    up = subprocess.run(
        [sys.executable, "-m", "deploykit", "up", *where, "--projects", "soak",
         "--mqtt-port", str(free_port()), "--bridge-config", str(REPO / "benchmarks" / "soak-bridge.yaml"),
         "--wait", "--timeout", "300"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        yield stack.load_stack(NAME, state)
    finally:
        subprocess.run(
            [sys.executable, "-m", "deploykit", "down", *where], capture_output=True, check=False
        )


def run_with_fault(
    record: stack.StackRecord,
    fault: str,
    duration_s: float = 24.0,
    project: str = "soak",
    recovery_s: float = 400.0,
) -> soak.SoakReport:
    """``fault`` once, mid-run, under load; the stack must be healthy again within
    ``recovery_s``."""
    docker = Docker.connect()
    target = health.StackTarget(record, docker, project=project)

    def wait_healthy() -> float | None:
        results, waited = health.wait_healthy(
            lambda: health.default_checks(target), timeout_s=recovery_s, pause_s=2.0
        )
        return waited if all(r.passed for r in results) else None

    async def main() -> soak.SoakReport:
        async with soak.RetryingClients(
            target.address, project, target.credentials(), sessions=16, timeout_s=20
        ) as clients:
            return await soak.soak(
                clients,
                soak.StackFaults(docker, record, cut_s=20),
                duration_s=duration_s,
                fault_names=[fault],
                wait_healthy=wait_healthy,
                grace_s=240,
                after_s=8.0,
            )

    started = time.monotonic()
    report = asyncio.run(main())
    print(f"\n{fault} ({time.monotonic() - started:.0f} s):\n{report.text()}")
    return report


@pytest.mark.parametrize("fault", soak.FAULTS)
def test_a_fault_under_load_loses_nothing(fault: str, faulty: stack.StackRecord) -> None:
    report = run_with_fault(faulty, fault)
    # the load ran on both sides of the fault (as many answers as sessions, at least, on each)
    assert report.answered_before_faults >= 16, report.text()
    assert report.answered_after_faults >= 16, report.text()
    assert report.faults and report.faults[0].name == fault
    assert report.faults[0].recovered_s is not None, f"the stack did not recover from {fault}"
    assert not report.lost, f"{len(report.lost)} requests lost: {report.lost[:5]}"
    assert not report.failed, f"non-retryable errors: {report.failed}"
    if fault != "bridge-kill":  # only a bridge crash forgets what it generated
        assert not report.duplicated, f"{len(report.duplicated)} generated twice"

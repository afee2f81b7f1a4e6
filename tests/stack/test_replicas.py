"""The cpu stack with two engine+bridge pairs (`deploykit up --replicas 2`), on real Docker: both
replicas take a fair share of 200 requests, multi-turn sessions keep their history across them,
`deploykit ps`/`health` show every replica, killing one replica's bridge or engine mid-run loses
nothing for clients that retry by requestId, and scaling back to one replica works.

The engines are the cpu image (its KV cache capped at 1 GiB by the image, VLLM_CPU_KVCACHE_SPACE),
with benchmarks/soak-bridge.yaml (rate limits off); the crash faults need root (CI runs as root)."""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploykit import build, health, stack, top
from deploykit.docker import Docker
from deploykit.health.layers import Layer
from deploykit.mqttclient import Credentials, parse_broker_url
from deploykit.mqttclient import request as mqtt_request
from deploykit.ports import BRIDGE_HTTP_PORT
from deploykit.secrets import SecretsFolder

from .conftest import cli, free_port
from .test_faults import run_with_fault
from .test_stack_e2e import built  # noqa: F401  (the session's images, built once)

pytestmark = pytest.mark.integration

NAME = "dktest-replicas"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def where(
    built: list[build.Built],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[str]]:
    state = tmp_path_factory.mktemp("replicas")
    where = ["--name", NAME, "--state-dir", str(state)]
    port = str(free_port())
    up = cli("up", *where, "--replicas", "2", "--projects", "general", "--mqtt-port", port,
             "--bridge-config", str(REPO / "benchmarks" / "soak-bridge.yaml"),
             "--wait", "--timeout", "600")  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert "2 replicas" in up.stderr, up.stderr[-1000:]
        yield where
    finally:
        cli("down", *where)


def record(where: list[str]) -> stack.StackRecord:
    return stack.load_stack(NAME, Path(where[-1]))


def answered(docker: Docker, service: str) -> float:
    """Requests a replica's bridge answered, from its own metrics (read inside its container)."""
    container = next(
        c.name
        for c in docker.containers(
            {stack.COMPOSE_PROJECT_LABEL: NAME, stack.COMPOSE_SERVICE_LABEL: service}
        )
    )
    metrics, problem = top._metrics_inside(docker, container, BRIDGE_HTTP_PORT)
    assert metrics is not None, problem
    return top.total(metrics, "deploykit_bridge_requests_total", project="general")


def test_ps_and_health_show_every_replica(where: list[str]) -> None:
    ps = cli("ps", *where)
    assert ps.returncode == 0, ps.stderr
    services = {line.split()[0]: line.split()[2] for line in ps.stdout.splitlines()[1:]}
    assert set(services) == {"broker", "redis", "engine", "bridge", "engine-2", "bridge-2"}, (
        ps.stdout
    )
    assert all(state == "running" for state in services.values()), ps.stdout
    health = cli("health", *where, "--json")
    assert health.returncode == 0, health.stdout + health.stderr
    checks = {c["check"]: c["ok"] for c in json.loads(health.stdout)["checks"]}
    for name in ("engine-completion[engine]", "engine-completion[engine-2]",
                 "bridge-status[bridge]", "bridge-status[bridge-2]", "redis-container"):  # fmt: skip
        assert checks.get(name) is True, checks
    assert all(checks.values()), checks


def test_two_replicas_share_200_requests_and_sessions_keep_their_history(
    where: list[str],
) -> None:
    rec = record(where)
    docker = Docker.connect()
    before = {s: answered(docker, s) for s in ("bridge", "bridge-2")}
    address = parse_broker_url(f"mqtt://127.0.0.1:{rec.mqtt_port}")
    creds = Credentials("general", SecretsFolder(rec.secrets_dir).client_password("general"))
    prompts: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def session(i: int) -> None:
        seen = prompts.setdefault(i, [])
        try:
            for turn in range(10):  # 20 sessions x 10 turns = 200 requests
                reply = mqtt_request(
                    address, "general", f"turn {turn}", credentials=creds,
                    session_id=f"multi-{i}", timeout_s=120, fields={"maxTokens": 8},
                )  # fmt: skip
                env = reply.json()
                assert env["status"] == "ok", env
                seen.append(env["usage"]["prompt_tokens"])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert not errors, errors[:3]
    served = {s: answered(docker, s) - before[s] for s in before}
    print(f"\nrequests answered per replica: {served}")
    assert sum(served.values()) == 200, served
    assert min(served.values()) >= 0.3 * 200, f"not a fair share: {served}"
    for i, seen in prompts.items():  # every turn saw the turns before it, wherever they ran
        assert all(b > a for a, b in itertools.pairwise(seen)), (i, seen)


def recovery_limit_s(rec: stack.StackRecord, service: str) -> float:
    """How long the stack may take to be healthy again after ``service``'s process died: what its
    own HEALTHCHECK allows a restart (the start period, then retries x interval before Docker
    calls it unhealthy: 315 s for the cpu engine, whose restart competes with the load on the
    other replica), then one round of every health layer at its own timeout."""
    docker = Docker.connect()
    target = health.StackTarget(rec, docker, project="general")
    check = docker.container_attrs(target.container(service))["Config"]["Healthcheck"]
    start_s = (check["StartPeriod"] + check["Retries"] * check["Interval"]) / 1e9
    layers = health.default_checks(target)
    return start_s + sum(c.timeout_s for c in layers if isinstance(c, Layer))


@pytest.mark.parametrize("fault", ["bridge-kill", "engine-kill"])
def test_killing_one_replica_mid_run_loses_nothing(where: list[str], fault: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("the crash faults kill container processes from the host: needs root")
    rec = record(where)
    limit = recovery_limit_s(rec, fault.split("-")[0])
    # 40 s of load around the kill: the load goes on while the killed part restarts
    report = run_with_fault(rec, fault, duration_s=40.0, project="general", recovery_s=limit)
    # the load ran on both sides of the fault (as many answers as sessions, at least, on each)
    assert report.answered_before_faults >= 16, report.text()
    assert report.answered_after_faults >= 16, report.text()
    assert report.faults[0].recovered_s is not None, (
        f"the stack did not recover from {fault} within {limit:.0f} s"
    )
    assert not report.lost, f"{len(report.lost)} requests lost: {report.lost[:5]}"
    assert not report.failed, f"non-retryable errors: {report.failed}"
    # what a replica answered before it died is in Redis: a repeat is not generated again
    assert not report.duplicated, f"{len(report.duplicated)} generated twice"


def test_scaling_back_to_one_replica(where: list[str]) -> None:
    rec = record(where)
    up = cli("up", *where, "--replicas", "1", "--projects", "general",
             "--mqtt-port", str(rec.mqtt_port),
             "--bridge-config", str(REPO / "benchmarks" / "soak-bridge.yaml"),
             "--wait", "--timeout", "600")  # fmt: skip
    assert up.returncode == 0, up.stderr[-3000:]
    ps = cli("ps", *where)
    services = {line.split()[0] for line in ps.stdout.splitlines()[1:]}
    assert services == {"broker", "engine", "bridge"}, ps.stdout  # one bridge: no Redis
    address = parse_broker_url(f"mqtt://127.0.0.1:{rec.mqtt_port}")
    creds = Credentials("general", SecretsFolder(rec.secrets_dir).client_password("general"))
    for i in range(10):  # each sent once: the one bridge left takes them all
        env = mqtt_request(address, "general", f"alone {i}", credentials=creds, timeout_s=60).json()
        assert env["status"] == "ok", env

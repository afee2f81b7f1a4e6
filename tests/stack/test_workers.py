"""Worker hosts, with two stacks on this machine: a broker stack that publishes its Redis
(`up --redis-port`), a bundle from `deploykit credentials --worker NAME` (owner-only files), and a
worker stack (`up --role worker --worker-credentials DIR`) whose bridge reaches the broker
through its published port (host.docker.internal, the host's gateway). Requests sent to the broker
are answered by both hosts' replicas, sessions keep their history across them, the worker's
containers carry no secret in `docker inspect`, their processes' command lines or the logs, and
a worker whose bridge is killed mid-run loses nothing for clients that retry by requestId (its
unanswered requests wait in its Mosquitto session; retries reach the broker host's replica)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploykit import build, health, soak, stack, top
from deploykit.docker import Docker
from deploykit.mqttclient import Credentials, parse_broker_url
from deploykit.mqttclient import request as mqtt_request
from deploykit.ports import BRIDGE_HTTP_PORT
from deploykit.secrets import WORKER_SECRETS, SecretsFolder

from .conftest import cli, free_port
from .test_stack_e2e import built  # noqa: F401  (the session's images, built once)

pytestmark = pytest.mark.integration

BROKER, WORKER = "dktest-brokerhost", "dktest-workerhost"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hosts(
    built: list[build.Built],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[stack.StackRecord, stack.StackRecord, Path]]:
    state = tmp_path_factory.mktemp("workers")
    b_where = ["--name", BROKER, "--state-dir", str(state / "broker")]
    w_where = ["--name", WORKER, "--state-dir", str(state / "worker")]
    bundle = state / "bundle-w1"
    config = str(REPO / "benchmarks" / "soak-bridge.yaml")
    try:
        up = cli("up", *b_where, "--projects", "general", "--mqtt-port", str(free_port()),
                 "--redis-port", str(free_port()), "--bridge-config", config,
                 "--wait", "--timeout", "600")  # fmt: skip
        assert up.returncode == 0, up.stderr[-3000:]
        issued = cli("credentials", *b_where, "--worker", "w1", "--host",
                     "host.docker.internal", "--out", str(bundle))  # fmt: skip
        assert issued.returncode == 0, issued.stderr
        up = cli("up", *w_where, "--role", "worker", "--worker-credentials", str(bundle),
                 "--bridge-config", config, "--wait", "--timeout", "600")  # fmt: skip
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        assert "joined mqtt://host.docker.internal:" in up.stderr, up.stderr[-1000:]
        yield (
            stack.load_stack(BROKER, state / "broker"),
            stack.load_stack(WORKER, state / "worker"),
            bundle,
        )
    finally:
        cli("down", *w_where)
        cli("down", *b_where)


def answered(docker: Docker, stack_name: str) -> float:
    container = next(
        c.name
        for c in docker.containers(
            {stack.COMPOSE_PROJECT_LABEL: stack_name, stack.COMPOSE_SERVICE_LABEL: "bridge"}
        )
    )
    metrics, problem = top._metrics_inside(docker, container, BRIDGE_HTTP_PORT)
    assert metrics is not None, problem
    return top.total(metrics, "deploykit_bridge_requests_total", project="general")


def test_the_bundle_is_owner_only_files(
    hosts: tuple[stack.StackRecord, stack.StackRecord, Path],
) -> None:
    broker, _worker, bundle = hosts
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700
    for path in bundle.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for name in WORKER_SECRETS:  # the broker host's own secrets, copied
        assert (bundle / name).read_text() == (broker.secrets_dir / name).read_text()
    assert (bundle / "broker_url").read_text().strip() == (
        f"mqtt://host.docker.internal:{broker.mqtt_port}"
    )


def test_the_worker_runs_no_broker_and_is_healthy(
    hosts: tuple[stack.StackRecord, stack.StackRecord, Path],
) -> None:
    broker, worker, _bundle = hosts
    docker = Docker.connect()
    services = {
        (c.labels or {}).get(stack.COMPOSE_SERVICE_LABEL)
        for c in docker.containers({stack.COMPOSE_PROJECT_LABEL: worker.name})
    }
    assert services == {"engine", "bridge"}, services
    listed = {s["name"]: s for s in json.loads(cli("ls", "--json").stdout)}
    assert listed[WORKER]["state"] == "2/2 running" and listed[WORKER]["mqtt_port"] is None
    assert listed[broker.name]["state"] == "4/4 running", listed[broker.name]  # with its Redis
    ps = cli("ps", "--name", WORKER, "--state-dir", str(worker.folder.parent))
    assert [line.split()[0] for line in ps.stdout.splitlines()[1:]] == ["bridge", "engine"], ps
    health = cli("health", "--name", WORKER, "--state-dir", str(worker.folder.parent), "--json")
    assert health.returncode == 0, health.stdout + health.stderr
    report = json.loads(health.stdout)
    assert report["ok"] and all(c["ok"] for c in report["checks"]), report
    assert [c["check"] for c in report["checks"]] == [  # no broker, no project account here
        "engine-container[engine]",
        "engine-health[engine]",
        "engine-models[engine]",
        "engine-completion[engine]",
        "bridge-container[bridge]",
    ]
    secrets = [
        (worker.secrets_dir / n).read_text().strip()
        for n in (
            "mqtt_bridge_password",
            "bridge_client_id",
            "bridge_share_group",
            "redis_password",
        )
    ]
    for c in docker.containers({stack.COMPOSE_PROJECT_LABEL: worker.name}):
        dump = json.dumps(c.attrs)
        assert not any(s in dump for s in secrets), f"a secret in docker inspect of {c.name}"
        processes = json.dumps(c.top(ps_args="-eo pid,args"))
        assert not any(s in processes for s in secrets), f"a secret in a command line in {c.name}"
    logs = cli("logs", "--name", WORKER, "--state-dir", str(worker.folder.parent), "--tail", "all")
    assert logs.returncode == 0 and "bridge" in logs.stdout, logs.stderr
    assert not any(s in logs.stdout + logs.stderr for s in secrets), "a secret in the logs"
    for refused in (
        ["chat", "--message", "hi"],
        ["credentials"],
        ["credentials", "--worker", "w2"],
    ):
        out = cli(*refused, "--name", WORKER, "--state-dir", str(worker.folder.parent))
        assert out.returncode != 0 and "has no broker of its own" in out.stderr, out.stderr


def test_both_hosts_answer_and_sessions_keep_their_history(
    hosts: tuple[stack.StackRecord, stack.StackRecord, Path],
) -> None:
    broker, worker, _bundle = hosts
    docker = Docker.connect()
    before = {s: answered(docker, s) for s in (broker.name, worker.name)}
    address = parse_broker_url(f"mqtt://127.0.0.1:{broker.mqtt_port}")
    creds = Credentials("general", SecretsFolder(broker.secrets_dir).client_password("general"))
    prompts: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def session(i: int) -> None:
        seen = prompts.setdefault(i, [])
        try:
            for turn in range(6):
                env = mqtt_request(
                    address, "general", f"turn {turn}", credentials=creds,
                    session_id=f"w-{i}", timeout_s=120, fields={"maxTokens": 8},
                ).json()  # fmt: skip
                assert env["status"] == "ok", env
                seen.append(env["usage"]["prompt_tokens"])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert not errors, errors[:3]
    served = {s: answered(docker, s) - before[s] for s in before}
    print(f"\nrequests answered per host: {served}")
    assert sum(served.values()) == 48, served
    assert min(served.values()) > 0, f"one host answered nothing: {served}"
    for i, seen in prompts.items():
        assert all(b > a for a, b in itertools.pairwise(seen)), (i, seen)


def test_a_worker_killed_mid_run_loses_nothing(
    hosts: tuple[stack.StackRecord, stack.StackRecord, Path],
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the crash kills the worker's bridge process from the host: needs root")
    broker, worker, _bundle = hosts
    docker = Docker.connect()
    worker_target = health.StackTarget(worker, docker)

    def wait_healthy() -> float | None:
        results, waited = health.wait_healthy(
            lambda: health.default_checks(worker_target), timeout_s=400, pause_s=2.0
        )
        return waited if all(r.passed for r in results) else None

    async def main() -> soak.SoakReport:
        address = parse_broker_url(f"mqtt://127.0.0.1:{broker.mqtt_port}")
        creds = Credentials("general", SecretsFolder(broker.secrets_dir).client_password("general"))
        async with soak.RetryingClients(
            address, "general", creds, sessions=16, timeout_s=20
        ) as clients:
            return await soak.soak(
                clients,
                soak.StackFaults(docker, worker),  # SIGKILL of the worker's bridge
                duration_s=24.0,
                fault_names=["bridge-kill"],
                wait_healthy=wait_healthy,
                grace_s=240,
                after_s=8.0,
            )

    report = asyncio.run(main())
    print(f"\nthe worker's bridge killed:\n{report.text()}")
    # the load ran on both sides of the fault (as many answers as sessions, at least, on each)
    assert report.answered_before_faults >= 16, report.text()
    assert report.answered_after_faults >= 16, report.text()
    assert report.faults[0].recovered_s is not None, "the worker did not recover"
    assert not report.lost, f"{len(report.lost)} requests lost: {report.lost[:5]}"
    assert not report.failed, f"non-retryable errors: {report.failed}"
    # what the worker answered before it died is in the broker host's Redis: not generated again
    assert not report.duplicated, f"{len(report.duplicated)} generated twice"

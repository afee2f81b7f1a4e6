"""Two bridge replicas in one share group, their session state in a real redis-server, on a real
Mosquitto and the real vLLM CPU server: both take work, a session's history and order hold
whichever replica answers, a requestId is answered once across replicas, a replica that is
killed mid-run loses nothing for clients that retry, and one that is stopped drains: afterwards
no request goes to it."""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploykit import soak
from deploykit.mqttclient import parse_broker_url

from .conftest import BridgeProcess, Broker, Client, Redis, new_session, wait_until

pytestmark = pytest.mark.integration

Replicas = tuple[Broker, list[BridgeProcess]]


@pytest.fixture
def replicas(
    broker_factory: Callable[..., Broker],
    bridge_factory: Callable[..., BridgeProcess],
    redis_server: Redis,
    tmp_path: Path,
) -> Replicas:
    broker = broker_factory()
    group = tmp_path / "share_group"
    group.write_text(f"g{uuid.uuid4().hex[:12]}\n")
    made = []
    for i in (1, 2):
        b = bridge_factory(broker, "general", f"replica-{i}")
        b.extra_env = redis_server.bridge_env(group, f"r{i}")
        b.start()
        made.append(b)
    return broker, made


def answered(bridge: BridgeProcess) -> int:
    """Requests this replica answered (any status), from its own metrics."""
    return sum(
        int(float(v))
        for v in re.findall(
            r'^deploykit_bridge_requests_total\{project="general",status="\w+"\} (\S+)$',
            bridge.metrics(),
            re.MULTILINE,
        )
    )


def metric(bridge: BridgeProcess, name: str) -> float:
    found = re.search(rf"^deploykit_bridge_{name} (\S+)$", bridge.metrics(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def ask(client: Client, session: str, message: str, rid: str | None = None) -> dict[str, Any]:
    rid = rid or uuid.uuid4().hex
    topic = f"general/out/{session}/{rid}"
    body = {"sessionId": session, "message": message, "requestId": rid, "format": "json",
            "maxTokens": 8, "replyTopic": topic}  # fmt: skip
    client.publish("general/user_input", body)
    return client.get(90, topic=topic).json()


def test_both_replicas_take_work_and_sessions_keep_their_history(
    replicas: Replicas, client_factory: Callable[..., Client]
) -> None:
    broker, bridges = replicas
    sessions = [new_session() for _ in range(8)]
    prompts: dict[str, list[int]] = {s: [] for s in sessions}
    errors: list[BaseException] = []
    clients = {s: client_factory(broker) for s in sessions}  # one inbox per session's thread
    for session, client in clients.items():
        client.subscribe(f"general/out/{session}/#")

    def converse(session: str) -> None:
        client = clients[session]
        try:
            for turn in range(4):
                env = ask(client, session, f"turn {turn} of {session}")
                assert env["status"] == "ok", env
                prompts[session].append(env["usage"]["prompt_tokens"])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=converse, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    counts = [answered(b) for b in bridges]
    assert sum(counts) == 32, counts
    assert min(counts) >= 0.3 * 32, f"one replica took too little of the work: {counts}"
    # every turn saw the turns before it, whichever replica answered them (the turns of a session
    # spread over both: one bridge's memory would have started each replica's part afresh)
    for session, seen in prompts.items():
        assert all(b > a for a, b in itertools.pairwise(seen)), (session, seen)


def test_a_sessions_pipelined_requests_run_one_at_a_time_across_replicas(
    replicas: Replicas, client_factory: Callable[..., Client]
) -> None:
    """Eight requests of one session sent back to back land on both replicas: they run one at a
    time, each with the history of every request answered before it. (Their order is the order
    the replicas received them in, which is the order sent unless two reach different replicas
    within a few milliseconds: the README says so; tests/bridge/test_shared_state.py checks the
    queue's order itself.)"""
    broker, bridges = replicas
    client = client_factory(broker)
    session = new_session()
    topic = f"general/assistant_response/{session}"
    client.subscribe(topic)
    ids = [f"ord-{i}" for i in range(8)]
    for rid in ids:
        body = {"sessionId": session, "message": f"message {rid}", "requestId": rid,
                "format": "json", "maxTokens": 8}  # fmt: skip
        client.publish("general/user_input", body, wait=False)
    envs = [r.json() for r in client.collect(8, 120, topic_prefix=topic)]
    got = [e["requestId"] for e in envs]
    assert sorted(got) == ids and all(e["status"] == "ok" for e in envs)
    prompts = [e["usage"]["prompt_tokens"] for e in envs]
    assert all(b > a for a, b in itertools.pairwise(prompts)), prompts
    assert all(answered(b) > 0 for b in bridges), "the session's requests stayed on one replica"
    print(f"\nanswered in the order {got}")


def test_a_request_id_is_generated_once_across_replicas(
    replicas: Replicas, client_factory: Callable[..., Client]
) -> None:
    broker, bridges = replicas
    client = client_factory(broker)
    client.subscribe("general/out/#")
    session = new_session()
    first = ask(client, session, "hello", rid="dup-1")
    assert first["status"] == "ok"
    repeats = [ask(client, session, "hello", rid="dup-1") for _ in range(4)]
    assert all(r == first for r in repeats)  # the stored reply, from either replica
    assert sum(answered(b) for b in bridges) == 1  # generated once
    assert sum(metric(b, "duplicates_total") for b in bridges) == 4
    assert all(metric(b, "duplicates_total") > 0 for b in bridges)
    other = ask(client, session, "something else", rid="dup-1")
    assert other["status"] == "error" and other["error"]["code"] == "conflict"


class ReplicaFaults:
    """Faults of one replica for deploykit.soak: a crash (SIGKILL; started again 2 s later, as a
    restart policy does) and a stop (SIGTERM: it drains; started again)."""

    def __init__(self, bridge: BridgeProcess) -> None:
        self.bridge = bridge

    async def inject(self, name: str) -> None:
        assert self.bridge.proc is not None
        if name == "replica-kill":
            self.bridge.proc.send_signal(signal.SIGKILL)
        else:
            self.bridge.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.bridge.proc.wait, 60)
        await asyncio.sleep(2.0)
        self.bridge.start(wait=False)


@pytest.mark.parametrize("fault", ["replica-kill", "replica-stop"])
def test_a_replica_failing_mid_run_loses_nothing(replicas: Replicas, fault: str) -> None:
    broker, bridges = replicas

    def healthy() -> float | None:
        started = time.monotonic()
        try:
            for b in bridges:
                b.wait_healthy(60)
        except (TimeoutError, RuntimeError):
            return None
        return time.monotonic() - started

    async def main() -> soak.SoakReport:
        async with soak.RetryingClients(
            parse_broker_url(broker.url), "general", None, sessions=8, connections=2,
            timeout_s=10, max_tokens=8,
        ) as clients:  # fmt: skip
            return await soak.soak(
                clients,
                ReplicaFaults(bridges[0]),  # type: ignore[arg-type]
                duration_s=20,
                fault_names=[fault],
                wait_healthy=healthy,
                grace_s=90,
                after_s=5.0,
            )

    report = asyncio.run(main())
    print(f"\n{fault}:\n{report.text()}")
    # the load ran on both sides of the fault (as many answers as sessions, at least, on each)
    assert report.answered_before_faults >= 8, report.text()
    assert report.answered_after_faults >= 8, report.text()
    assert report.faults[0].recovered_s is not None
    assert not report.lost, f"{len(report.lost)} lost: {report.lost[:5]}"
    assert not report.failed, report.failed
    # a repeat of a request answered before the crash comes from Redis, not a new generation
    assert not report.duplicated, f"{len(report.duplicated)} generated twice"


def test_a_stopped_replica_leaves_the_share_group(
    replicas: Replicas, client_factory: Callable[..., Client]
) -> None:
    """After a drain, every request goes to the replica that is left, even requests sent once:
    no session of the stopped one stays in the group taking its share."""
    broker, bridges = replicas
    bridges[1].stop()  # SIGTERM: drains, ends its MQTT sessions
    log = bridges[1].log.read_text()
    assert "drained: every request answered" in log, log[-2000:]
    client = client_factory(broker)
    client.subscribe("general/out/#")
    before = answered(bridges[0])
    for i in range(12):
        env = ask(client, new_session(), f"alone {i}")
        assert env["status"] == "ok", env
    assert answered(bridges[0]) - before == 12


def test_redis_away_answers_retryable_errors(
    replicas: Replicas, redis_server: Redis, client_factory: Callable[..., Client]
) -> None:
    broker, bridges = replicas
    client = client_factory(broker)
    client.subscribe("general/out/#")
    redis_server.stop()
    try:
        env = ask(client, new_session(), "hello", rid="r-away")
        assert env["status"] == "error", env
        assert env["error"]["code"] == "state_unavailable" and env["error"]["retryable"]
    finally:
        redis_server.start()
    wait_until(lambda: all(b.health()[0] == 200 for b in bridges), 30, "healthy replicas")
    assert ask(client, new_session(), "hello", rid="r-away")["status"] == "ok"

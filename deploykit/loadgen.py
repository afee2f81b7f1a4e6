"""The load generator: the same chat requests through MQTT (client -> broker -> bridge -> engine) and
directly over HTTP to the engine, at a given concurrency, with per-request latency, time to first
token (streamed requests), output tokens and errors. Used by ``deploykit bench`` (the direct path
runs inside a helper container on the stack's engine network: deploykit/bench/helper.py) and by
benchmarks/bridge_throughput.py.

Both paths are asyncio and cheap per request, so the generator is not what limits a run:
- MQTT: a few paho clients driven by the loop (deploykit.mqttloop, no network threads), each
  carrying up to ``per_client`` requests at once, replies matched by MQTT 5 Correlation Data;
- direct: aiohttp with one connection per concurrent request, streamed answers parsed per event.
Each request is a fresh session with one user message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import paho.mqtt.client as mqtt

from deploykit import names
from deploykit.errors import CheckFailed
from deploykit.mqttclient import BrokerAddress, Credentials, make_client, use_tls
from deploykit.mqttloop import AsyncMqtt, publish_properties

DEFAULT_PROMPT = (
    "Tell me a long story about a robot that finds its way through a maze, step by step."
)


@dataclass
class Sample:
    """One request: seconds to the full answer, to the first streamed text, tokens, error code."""

    latency: float
    ttft: float | None = None
    output_tokens: int = 0
    error: str | None = None


@dataclass
class Run:
    path: str  # "mqtt" or "direct"
    concurrency: int
    stream: bool
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    label: str = ""

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]

    @property
    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.samples:
            if s.error is not None:
                out[s.error] = out.get(s.error, 0) + 1
        return out

    @property
    def rps(self) -> float:
        return len(self.ok) / self.seconds if self.seconds else 0.0

    @property
    def tps(self) -> float:
        return sum(s.output_tokens for s in self.ok) / self.seconds if self.seconds else 0.0

    def latency(self, q: float) -> float | None:
        return percentile([s.latency for s in self.ok], q)

    def ttft(self, q: float) -> float | None:
        return percentile([s.ttft for s in self.ok if s.ttft is not None], q)

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "path": self.path,
            "concurrency": self.concurrency,
            "stream": self.stream,
            "seconds": self.seconds,
            "requests": len(self.samples),
            "errors": self.errors,
            "rps": self.rps,
            "output_tokens_per_s": self.tps,
            "latency_p50": self.latency(50),
            "latency_p95": self.latency(95),
            "latency_p99": self.latency(99),
            "ttft_p50": self.ttft(50),
            "ttft_p95": self.ttft(95),
        }


#: Called with each request's sample as soon as it is done (progress, and what an interrupted run
#: keeps).
OnSample = Callable[[Sample], None]


def percentile(values: Sequence[float], q: float) -> float | None:
    data = sorted(values)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    return statistics.quantiles(data, n=100, method="inclusive")[max(0, min(98, int(q) - 1))]


async def _drive(
    concurrency: int, n: int, one: Any, on_sample: OnSample | None = None
) -> tuple[list[Sample], float]:
    """Run ``n`` calls of ``one(i)`` with ``concurrency`` workers; returns samples and seconds."""
    counter = itertools.count()
    samples: list[Sample] = []

    async def worker() -> None:
        while (i := next(counter)) < n:
            sample = await one(i)
            samples.append(sample)
            if on_sample is not None:
                on_sample(sample)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - start


# ---------------------------------------------------------------------------------- direct HTTP
class DirectLoad:
    """Chat requests straight to the engine's OpenAI API."""

    def __init__(
        self,
        engine_url: str,
        model: str,
        *,
        api_key: str | None = None,
        extra: dict[str, Any] | None = None,
        system_prompt: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.url = engine_url.rstrip("/") + "/v1/chat/completions"
        self.system_prompt = system_prompt
        self.model = model
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.extra = extra if extra is not None else {"ignore_eos": True}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    def _body(self, prompt: str, max_tokens: int, stream: bool) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": (
                [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            )
            + [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            **self.extra,
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    async def run(
        self,
        concurrency: int,
        n: int,
        max_tokens: int,
        *,
        stream: bool = False,
        prompts: Sequence[str] = (DEFAULT_PROMPT,),
        on_sample: OnSample | None = None,
    ) -> Run:
        connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=4.0)
        async with aiohttp.ClientSession(
            connector=connector, headers=self.headers, timeout=self.timeout
        ) as http:

            async def one(i: int) -> Sample:
                body = self._body(prompts[i % len(prompts)], max_tokens, stream)
                t0 = time.perf_counter()
                try:
                    async with http.post(self.url, data=body) as resp:
                        if resp.status != 200:
                            await resp.read()
                            return Sample(time.perf_counter() - t0, error=f"http_{resp.status}")
                        if not stream:
                            data = orjson.loads(await resp.read())
                            tokens = int(data["usage"]["completion_tokens"])
                            return Sample(time.perf_counter() - t0, None, tokens)
                        ttft, tokens = await _read_sse(resp, t0)
                        return Sample(time.perf_counter() - t0, ttft, tokens)
                except (aiohttp.ClientError, TimeoutError) as err:
                    return Sample(time.perf_counter() - t0, error=type(err).__name__)

            samples, seconds = await _drive(concurrency, n, one, on_sample)
        return Run("direct", concurrency, stream, seconds, samples)


async def _read_sse(resp: aiohttp.ClientResponse, t0: float) -> tuple[float | None, int]:
    ttft: float | None = None
    tokens = 0
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            payload = event[5:].strip() if event.startswith(b"data:") else b""
            if not payload or payload == b"[DONE]":
                continue
            item = orjson.loads(payload)
            if ttft is None and any(
                (c.get("delta") or {}).get("content") for c in item.get("choices") or ()
            ):
                ttft = time.perf_counter() - t0
            if item.get("usage"):
                tokens = int(item["usage"].get("completion_tokens") or 0)
    return ttft, tokens


# ---------------------------------------------------------------------------------- MQTT
class _Requester:
    """One MQTT connection carrying many requests; replies resolve futures by correlation data."""

    mq: AsyncMqtt

    def __init__(self, loop: asyncio.AbstractEventLoop, reply_topic: str) -> None:
        self.loop = loop
        self.reply_topic = reply_topic
        self.stream_topic = reply_topic + "/stream"
        self.waiting: dict[bytes, tuple[asyncio.Future[bytes], list[float]]] = {}

    def on_message(self, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        entry = self.waiting.get(corr or b"")
        if entry is None:
            return
        future, first = entry
        if msg.topic == self.stream_topic:
            if not first:
                first.append(time.perf_counter())
            return
        if not future.done():
            future.set_result(bytes(msg.payload))


class MqttLoad:
    """Chat requests through the broker and the bridge, as real clients send them."""

    def __init__(
        self,
        address: BrokerAddress,
        project: str,
        *,
        credentials: Credentials | None = None,
        clients: int = 4,
        timeout_s: float = 600.0,
    ) -> None:
        self.address = address
        self.project = project
        self.credentials = credentials
        self.n_clients = clients
        self.timeout_s = timeout_s
        self._requesters: list[_Requester] = []

    async def __aenter__(self) -> MqttLoad:
        loop = asyncio.get_running_loop()
        for _ in range(self.n_clients):
            tag = uuid.uuid4().hex[:8]
            client = make_client(f"loadgen-{tag}", credentials=self.credentials)
            use_tls(client, self.address)
            client.max_inflight_messages_set(1000)
            connected: asyncio.Future[bool] = loop.create_future()
            req = _Requester(loop, f"{self.project}/loadgen/{tag}")
            req.mq = mq = AsyncMqtt(
                loop,
                client,
                self.address.host,
                self.address.port,
                keepalive=60,
                on_message=req.on_message,
                on_connect=functools.partial(_settle, connected),
                name=f"loadgen-{tag}",
            )
            mq.start()
            self._requesters.append(req)
            try:
                await asyncio.wait_for(connected, 10)
            except TimeoutError:
                await self.__aexit__()
                raise CheckFailed(
                    f"cannot connect to the broker at {self.address} as "
                    f"{self.credentials.username if self.credentials else 'anonymous'!r}: "
                    f"{mq.refused or 'no answer within 10 s'}",
                    "check the stack with `deploykit health`; the project's password file must "
                    "be readable by you",
                ) from None
            await mq.subscribe([(req.reply_topic, 1), (req.stream_topic, 1)])
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for req in self._requesters:
            await req.mq.stop()
        self._requesters.clear()

    async def ask(self, req: _Requester, body: dict[str, Any]) -> Sample:
        rid = uuid.uuid4().hex
        corr = rid.encode()
        future: asyncio.Future[bytes] = req.loop.create_future()
        first: list[float] = []
        req.waiting[corr] = (future, first)
        payload = orjson.dumps({**body, "requestId": rid, "sessionId": f"lg-{rid[:16]}"})
        props = publish_properties(response_topic=req.reply_topic, correlation=corr)
        t0 = time.perf_counter()
        try:
            req.mq.publish(names.request_topic(self.project), payload, properties=props)
            raw = await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            return Sample(time.perf_counter() - t0, error="no_reply")
        finally:
            req.waiting.pop(corr, None)
        latency = time.perf_counter() - t0
        try:
            env = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return Sample(latency, error="not_json")
        if env.get("status") != "ok":
            return Sample(latency, error=str((env.get("error") or {}).get("code", "error")))
        ttft = first[0] - t0 if first else None
        return Sample(latency, ttft, int((env.get("usage") or {}).get("completion_tokens") or 0))

    async def run(
        self,
        concurrency: int,
        n: int,
        max_tokens: int,
        *,
        stream: bool = False,
        prompts: Sequence[str] = (DEFAULT_PROMPT,),
        on_sample: OnSample | None = None,
    ) -> Run:
        if not self._requesters:
            raise RuntimeError("use MqttLoad as an async context manager")
        requesters = self._requesters

        async def one(i: int) -> Sample:
            body = {
                "message": prompts[i % len(prompts)],
                "format": "json",
                "maxTokens": max_tokens,
                "temperature": 0,
                "stream": stream,
            }
            return await self.ask(requesters[i % len(requesters)], body)

        samples, seconds = await _drive(concurrency, n, one, on_sample)
        return Run("mqtt", concurrency, stream, seconds, samples)


def _settle(future: asyncio.Future[bool], _session_present: bool) -> None:
    if not future.done():
        future.set_result(True)


async def model_name(engine_url: str, api_key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.get(engine_url.rstrip("/") + "/v1/models") as resp,
    ):
        data = orjson.loads(await resp.read())
    return str(data["data"][0]["id"])


async def clear_sessions(
    address: BrokerAddress, client_ids: Sequence[str], credentials: Credentials | None = None
) -> None:
    """End the persistent sessions of these client ids (connect with a clean start and no expiry),
    so a run that died leaves nothing that takes part of the next run's requests."""
    loop = asyncio.get_running_loop()
    for cid in client_ids:
        client = make_client(cid, credentials=credentials)
        use_tls(client, address)
        connected: asyncio.Future[bool] = loop.create_future()
        mq = AsyncMqtt(
            loop,
            client,
            address.host,
            address.port,
            clean_start=True,
            on_connect=functools.partial(_settle, connected),
            name=f"clear-{cid}",
        )
        mq.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(connected, 10)
        await mq.stop()

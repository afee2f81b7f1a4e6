"""One stack's benchmark: per concurrency, the load through MQTT (the stack's published broker
port, the project's account, streaming on), then the same load directly over HTTP to the engine
(deploykit/bench/engine.py: from a helper container on a compose stack's engine network, from a
helper process to a ``deploykit serve`` instance's loopback port).

Before measuring: a few requests on each path (not counted), and the MQTT path's fixed cost:
1-token requests at concurrency 1, MQTT and direct in alternating blocks. The direct path sends
what the bridge sends for the project (its system prompt and ``engine_extra``, e.g. ``ignore_eos``),
so both paths ask the engine for the same work.

Ctrl-C stops the run in progress; everything measured until then is kept (the interrupted run
with the requests it finished) and :func:`run` returns it, marked interrupted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import deploykit
from deploykit import loadgen
from deploykit.bench import enginelog, limits
from deploykit.bench.engine import Engine, connect
from deploykit.bench.gpumemory import Sampler
from deploykit.bench.results import BenchResult, Overhead, RunRecord
from deploykit.errors import DeployKitError, UsageError
from deploykit.loadgen import Sample
from deploykit.mqttclient import BrokerAddress, Credentials
from deploykit.stack import StackRecord

MIN_REQUESTS = 8


@dataclass(frozen=True)
class Load:
    """What a benchmark sends."""

    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    requests: int | None = None  # per concurrency; None: 2 x concurrency, at least MIN_REQUESTS
    max_tokens: int = 128
    prompts: tuple[str, ...] = (loadgen.DEFAULT_PROMPT,)
    prompt_source: str = "deploykit.loadgen.DEFAULT_PROMPT"
    warmup: int = 4  # requests per path before measuring, not counted
    overhead_requests: int = 20  # 1-token requests per path at concurrency 1 (0: skip)
    clients: int = 4  # MQTT connections carrying the requests

    def requests_at(self, concurrency: int) -> int:
        """Requests at one concurrency: never fewer than the concurrency itself (else fewer
        would be in flight than asked)."""
        n = self.requests if self.requests is not None else max(MIN_REQUESTS, 2 * concurrency)
        return max(n, concurrency)

    def to_json(self) -> dict[str, Any]:
        return {
            "concurrency": list(self.concurrency),
            "requests": {str(c): self.requests_at(c) for c in self.concurrency},
            "max_tokens": self.max_tokens,
            "prompts": len(self.prompts),
            "prompt_source": self.prompt_source,
            "warmup": self.warmup,
            "overhead_requests": self.overhead_requests,
            "mqtt_connections": self.clients,
            "stream": True,
            "temperature": 0,
        }


class Progress(Protocol):
    """What a benchmark tells as it goes (the command shows it)."""

    def start(self, label: str, total: int) -> None: ...

    def advance(self, sample: Sample) -> None: ...

    def done(self, record: RunRecord) -> None: ...

    def note(self, text: str) -> None: ...


@dataclass
class Target:
    """The stack a benchmark talks to, and how."""

    record: StackRecord
    engine: Engine
    settings: limits.ProjectSettings
    address: BrokerAddress
    credentials: Credentials

    @property
    def project(self) -> str:
        return self.settings.project


def prepare(record: StackRecord, docker: Any | None, project: str, load: Load) -> Target:
    """Check that the project exists and that no limit of it shapes this load; find the engine
    (``docker`` for a compose stack; a serve instance needs none)."""
    if project not in record.projects:
        raise UsageError(
            f"the stack {record.name!r} serves projects {', '.join(record.projects)}, not "
            f"{project!r}",
            limits.refusal_hint(record.name, record.projects, project),
        )
    engine = connect(record, docker)
    settings = engine.settings(project)
    problems = limits.problems(settings, max(load.concurrency), load.max_tokens)
    if problems:
        raise UsageError(
            f"project {project!r} of stack {record.name!r} has limits that would shape the load "
            f"({'; '.join(problems)}): a benchmark through them measures the limits, not the stack",
            limits.refusal_hint(record.name, record.projects),
        )
    return Target(
        record=record,
        engine=engine,
        settings=settings,
        address=record.broker_address(),
        credentials=record.client_credentials(project),
    )


@dataclass
class _Collect:
    """The samples of a run as they come (what an interrupted run keeps)."""

    progress: Progress
    samples: list[Sample] = field(default_factory=list)
    started: float | None = None

    def __call__(self, sample: Sample) -> None:
        self.samples.append(sample)
        self.progress.advance(sample)

    def seconds(self) -> float:
        return time.perf_counter() - self.started if self.started is not None else 0.0


def _mqtt(target: Target, load: Load, c: int, n: int, max_tokens: int, got: _Collect) -> float:
    """One MQTT run; returns its seconds (KeyboardInterrupt passes through)."""

    async def go() -> float:
        async with loadgen.MqttLoad(
            target.address, target.project, credentials=target.credentials, clients=load.clients
        ) as mq:
            got.started = time.perf_counter()
            run = await mq.run(c, n, max_tokens, stream=True, prompts=load.prompts, on_sample=got)
            return run.seconds

    return asyncio.run(go())


def _direct(target: Target, load: Load, c: int, n: int, max_tokens: int, got: _Collect) -> float:
    """One direct run in the helper (container or process); returns its seconds."""
    seconds: list[float] = []

    def on_line(item: dict[str, Any]) -> None:
        if "started" in item:
            got.started = time.perf_counter()
        elif "sample" in item:
            got(Sample(**item["sample"]))
        elif "done" in item:
            seconds.append(float(item["done"]["seconds"]))

    job = {
        "kind": "load",
        "model": target.record.served_model_name,
        "concurrency": c,
        "requests": n,
        "max_tokens": max_tokens,
        "stream": True,
        "prompts": list(load.prompts),
        "extra": target.settings.engine_extra,
        "system_prompt": target.settings.system_prompt,
    }
    target.engine.run_job(job, on_line)
    return seconds[0] if seconds else got.seconds()


_OnePath = Callable[[Target, Load, int, int, int, _Collect], float]
_PATHS: dict[str, _OnePath] = {"mqtt": _mqtt, "direct": _direct}


def _measure(
    target: Target,
    load: Load,
    path: str,
    c: int,
    n: int,
    progress: Progress,
    sampler: Sampler | None,
    max_tokens: int | None = None,
) -> RunRecord:
    """One run. On Ctrl-C: the run so far, marked interrupted, then KeyboardInterrupt again."""
    got = _Collect(progress)
    progress.start(f"c={c} {path}", n)
    if sampler is not None:
        sampler.take()
    try:
        seconds = _PATHS[path](target, load, c, n, max_tokens or load.max_tokens, got)
    except KeyboardInterrupt:
        record = RunRecord(path, c, n, got.seconds(), got.samples, interrupted=True)
        if sampler is not None:
            record.gpu_peak = sampler.take()
        raise _Interrupted(record) from None
    record = RunRecord(path, c, n, seconds, got.samples)
    if sampler is not None:
        record.gpu_peak = sampler.take()
    progress.done(record)
    return record


class _Interrupted(Exception):
    def __init__(self, record: RunRecord) -> None:
        super().__init__("interrupted")
        self.record = record


class _Quiet:
    """A progress that shows nothing (warm-up)."""

    def start(self, label: str, total: int) -> None:
        return None

    def advance(self, sample: Sample) -> None:
        return None

    def done(self, record: RunRecord) -> None:
        return None

    def note(self, text: str) -> None:
        return None


def run(
    target: Target,
    load: Load,
    progress: Progress,
    *,
    sampler: Sampler | None = None,
    gpu: dict[str, Any] | None = None,
    command: str = "",
) -> BenchResult:
    """Measure; Ctrl-C ends it early and what was measured is returned, marked interrupted."""
    record = target.record
    result = BenchResult(
        stack={
            "name": record.name,
            "kind": "serve" if record.serve is not None else "compose",
            "quant": record.quant,
            "gpu_class": record.gpu_class,
            "model": record.served_model_name,
            "vllm": target.engine.vllm,
            "engine_image": target.engine.runs_in,
            "gpu_ids": list(record.gpu_ids),
        },
        project=target.project,
        limits=limits.statement(target.settings, max(load.concurrency)),
        settings={
            **load.to_json(),
            "fixed_length": target.settings.fixed_length,
            "engine_extra": target.settings.engine_extra,
            "system_prompt": target.settings.system_prompt is not None,
        },
        started=_now(),
        command=command,
        host={"cpus": os.cpu_count(), "load_average_before": list(os.getloadavg())},
        deploykit=deploykit.__version__,
        gpu=gpu,
    )
    for c in load.concurrency:
        if load.requests is not None and load.requests < c:
            result.notes.append(
                f"concurrency {c}: {c} requests instead of --requests {load.requests}"
            )
    quiet = _Quiet()
    try:
        if load.warmup:
            progress.note(f"warm-up: {load.warmup} requests on each path (not counted)")
            for path in ("mqtt", "direct"):
                _measure(target, load, path, min(4, load.warmup), load.warmup, quiet, None)
        if load.overhead_requests:
            result.overhead = _overhead(target, load, progress)
        for c in load.concurrency:
            n = load.requests_at(c)
            for path in ("mqtt", "direct"):
                try:
                    result.runs.append(_measure(target, load, path, c, n, progress, sampler))
                except _Interrupted as stop:
                    if stop.record.samples:
                        result.runs.append(stop.record)
                    raise
    except (_Interrupted, KeyboardInterrupt):
        result.interrupted = True
        result.notes.append("interrupted (Ctrl-C): the results hold what was measured until then")
    result.finished = _now()
    result.host["load_average_after"] = list(os.getloadavg())
    try:
        result.engine_memory = enginelog.parse(target.engine.log_lines()).to_json()
    except DeployKitError as err:  # the figures are measured; this costs only the memory line
        result.notes.append(f"engine memory not read: {err.message}")
    return result


def _overhead(target: Target, load: Load, progress: Progress) -> Overhead:
    """1-token requests at concurrency 1: MQTT, direct, MQTT (alternating blocks, so drifting
    load hits both paths alike)."""
    n = load.overhead_requests
    progress.note(f"fixed cost: {n} 1-token requests on each path at concurrency 1")
    quiet = _Quiet()
    first = _measure(target, load, "mqtt", 1, n // 2, quiet, None, max_tokens=1)
    direct = _measure(target, load, "direct", 1, n, quiet, None, max_tokens=1)
    second = _measure(target, load, "mqtt", 1, n - n // 2, quiet, None, max_tokens=1)
    mqtt = [s.latency for s in first.samples + second.samples if s.error is None]
    return Overhead(mqtt, [s.latency for s in direct.samples if s.error is None])


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

"""``deploykit top``: a live view of a running stack from the bridge's and vLLM's own Prometheus
metrics, read inside their containers (``docker exec``), so neither port is published.

Pure core: :func:`parse_metrics` (Prometheus text format), :func:`view` (two samples -> what to
show: per project requests/s, in flight, queued, errors, tokens/s, p50 latency; the engine's running
and waiting requests, KV cache use and tokens/s). The edge, :func:`sample`, reads the metrics.
The bridge's metrics are documented in deploykit/bridge/README.md.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from deploykit.ports import BRIDGE_HTTP_PORT, ENGINE_PORT

Series = list[tuple[dict[str, str], float]]

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, Series]:
    """Prometheus text format -> {metric name: [(labels, value), ...]}; comments skipped."""
    metrics: dict[str, Series] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or line.startswith("#"):
            continue
        name, labels, value = m.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        found = {
            k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(labels or "")
        }
        metrics.setdefault(name, []).append((found, number))
    return metrics


def total(metrics: dict[str, Series], name: str, **match: str) -> float:
    """The sum of a metric's series whose labels match."""
    return sum(
        v
        for labels, v in metrics.get(name, [])
        if all(labels.get(k) == x for k, x in match.items())
    )


def label_values(metrics: dict[str, Series], name: str, label: str) -> set[str]:
    return {labels[label] for labels, _ in metrics.get(name, []) if label in labels}


def buckets(metrics: dict[str, Series], name: str, **match: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound (``+Inf`` as math.inf)."""
    out: dict[float, float] = {}
    for labels, v in metrics.get(name + "_bucket", []):
        if all(labels.get(k) == x for k, x in match.items()) and "le" in labels:
            out[math.inf if labels["le"] == "+Inf" else float(labels["le"])] = v
    return out


def quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """``q`` of a histogram, interpolated inside its bucket as Prometheus' histogram_quantile."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class Sample:
    """The stack's metrics at one moment; None where a part did not answer."""

    at: float
    bridge: dict[str, Series] | None
    engine: dict[str, Series] | None
    gpus: tuple[tuple[str, int, int], ...] = ()  # (name, used bytes, total bytes)
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProjectRow:
    project: str
    requests_per_s: float | None
    in_flight: int
    queued: int
    errors: int
    tokens_per_s: float | None
    p50_s: float | None


@dataclass(frozen=True)
class EngineRow:
    running: int | None
    waiting: int | None
    kv_cache_use: float | None  # 0..1
    tokens_per_s: float | None


@dataclass(frozen=True)
class View:
    window_s: float
    projects: list[ProjectRow]
    engine: EngineRow
    gpus: tuple[tuple[str, int, int], ...]
    problems: tuple[str, ...] = field(default=())


def _delta_buckets(new: dict[float, float], old: dict[float, float]) -> dict[float, float]:
    return {b: v - old.get(b, 0.0) for b, v in new.items()}


def view(first: Sample, last: Sample, projects: Iterable[str]) -> View:
    """What ``top`` shows for the window from ``first`` to ``last`` (rates over that window)."""
    span = last.at - first.at
    rated = span > 0 and first is not last

    def rate(new: float, old: float) -> float | None:
        return max(0.0, new - old) / span if rated else None

    rows = []
    b1, b0 = last.bridge, first.bridge
    for project in projects:
        if b1 is None:
            rows.append(ProjectRow(project, None, 0, 0, 0, None, None))
            continue
        old = b0 or {}
        requests = total(b1, "deploykit_bridge_requests_total", project=project)
        tokens = total(
            b1, "deploykit_bridge_project_tokens_total", project=project, kind="completion"
        )
        hist = "deploykit_bridge_project_request_seconds"
        window = _delta_buckets(
            buckets(b1, hist, project=project), buckets(old, hist, project=project)
        )
        rows.append(
            ProjectRow(
                project,
                rate(requests, total(old, "deploykit_bridge_requests_total", project=project)),
                int(total(b1, "deploykit_bridge_project_running", project=project)),
                int(total(b1, "deploykit_bridge_project_queued", project=project)),
                int(total(b1, "deploykit_bridge_requests_total", project=project, status="error")),
                rate(
                    tokens,
                    total(
                        old,
                        "deploykit_bridge_project_tokens_total",
                        project=project,
                        kind="completion",
                    ),
                ),
                quantile(0.5, window if rated else buckets(b1, hist, project=project)),
            )
        )
    e1, e0 = last.engine, first.engine
    if e1 is None:
        engine = EngineRow(None, None, None, None)
    else:
        generated = total(e1, "vllm:generation_tokens_total")
        engine = EngineRow(
            int(total(e1, "vllm:num_requests_running")),
            int(total(e1, "vllm:num_requests_waiting")),
            total(e1, "vllm:kv_cache_usage_perc") if "vllm:kv_cache_usage_perc" in e1 else None,
            rate(generated, total(e0 or {}, "vllm:generation_tokens_total")),
        )
    return View(span, rows, engine, last.gpus, last.problems)


# --- the edge: reading the metrics inside the containers --------------------------------------

_GET = """
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        sys.stdout.write(r.read().decode(errors="replace"))
except Exception as e:
    sys.stdout.write("deploykit-top-error: %s: %s" % (type(e).__name__, e)); sys.exit(1)
"""


def _metrics_inside(docker: Any, container: str, port: int) -> tuple[dict[str, Series] | None, str]:
    code, out = docker.exec(container, ["python3", "-c", _GET, f"http://127.0.0.1:{port}/metrics"])
    if code != 0:
        return None, out.strip()[-200:]
    return parse_metrics(out), ""


def sample(record: Any, docker: Any, gpu_reader: Any = None) -> Sample:
    """Read the bridge's and the engine's metrics (and the pinned GPUs' memory, when NVML is here)."""
    from deploykit.errors import DeployKitError
    from deploykit.stack import COMPOSE_PROJECT_LABEL, COMPOSE_SERVICE_LABEL

    problems = []
    found: dict[str, dict[str, Series] | None] = {}
    for service, port in (("bridge", BRIDGE_HTTP_PORT), ("engine", ENGINE_PORT)):
        running = [
            c
            for c in docker.containers(
                {COMPOSE_PROJECT_LABEL: record.name, COMPOSE_SERVICE_LABEL: service}
            )
            if c.status == "running"
        ]
        if not running:
            found[service] = None
            problems.append(f"{service}: not running")
            continue
        try:
            found[service], problem = _metrics_inside(docker, running[0].name, port)
        except DeployKitError as err:
            found[service], problem = None, err.message
        if problem:
            problems.append(f"{service}: {problem}")
    gpus: tuple[tuple[str, int, int], ...] = ()
    if gpu_reader is not None and record.gpu_ids:
        gpus = gpu_reader(record.gpu_ids)
    return Sample(time.monotonic(), found["bridge"], found["engine"], gpus, tuple(problems))


def pinned_gpu_memory(gpu_ids: Iterable[str]) -> tuple[tuple[str, int, int], ...]:
    """(name, used, total) of the pinned GPUs, from this host's NVML; () without NVML."""
    from deploykit import devices
    from deploykit.errors import GpuError

    try:
        inventory = devices.read_inventory()
    except GpuError:
        return ()
    wanted = set(gpu_ids)
    return tuple(
        (f"{g.index}: {g.name}", g.memory_total - g.memory_free, g.memory_total)
        for g in inventory.gpus
        if g.uuid in wanted or str(g.index) in wanted
    )

"""Counters for /metrics (Prometheus text format 0.0.4) and a tiny HTTP server for /health and
/metrics, run on the bridge's asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Metrics:
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (project, status)
    errors: Counter[str] = field(default_factory=Counter)  # by error code
    duplicates: int = 0
    dropped: int = 0  # messages that are not requests and had no reply topic
    in_flight: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0
    latency_count: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Per project (what ``deploykit top`` shows): latency bucket counts and tokens by kind.
    project_latency: dict[str, list[int]] = field(default_factory=dict)
    project_latency_count: Counter[str] = field(default_factory=Counter)
    project_tokens: Counter[tuple[str, str]] = field(default_factory=Counter)

    def observe_latency(self, seconds: float, project: str | None = None) -> None:
        self.latency_sum += seconds
        self.latency_count += 1
        buckets = None
        if project is not None:
            buckets = self.project_latency.setdefault(project, [0] * len(LATENCY_BUCKETS))
            self.project_latency_count[project] += 1
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_counts[i] += 1
                if buckets is not None:
                    buckets[i] += 1

    def count_tokens(self, project: str, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.project_tokens[(project, "prompt")] += prompt
        self.project_tokens[(project, "completion")] += completion

    def render(
        self,
        gauges: dict[str, float],
        counters: dict[str, float] | None = None,
        per_project: dict[str, dict[str, int]] | None = None,
    ) -> str:
        lines = [
            "# HELP deploykit_bridge_requests_total Requests answered, by project and status.",
            "# TYPE deploykit_bridge_requests_total counter",
        ]
        for (project, status), n in sorted(self.requests.items()):
            lines.append(
                f'deploykit_bridge_requests_total{{project="{_esc(project)}",status="{status}"}} {n}'
            )
        lines += [
            "# HELP deploykit_bridge_errors_total Error replies and dropped messages, by code.",
            "# TYPE deploykit_bridge_errors_total counter",
        ]
        for code, n in sorted(self.errors.items()):
            lines.append(f'deploykit_bridge_errors_total{{code="{_esc(code)}"}} {n}')
        lines += [
            "# HELP deploykit_bridge_duplicates_total Repeated requestIds answered from the cache.",
            "# TYPE deploykit_bridge_duplicates_total counter",
            f"deploykit_bridge_duplicates_total {self.duplicates}",
            "# HELP deploykit_bridge_dropped_total Messages without any usable reply topic.",
            "# TYPE deploykit_bridge_dropped_total counter",
            f"deploykit_bridge_dropped_total {self.dropped}",
            "# HELP deploykit_bridge_tokens_total Tokens processed by the engine.",
            "# TYPE deploykit_bridge_tokens_total counter",
            f'deploykit_bridge_tokens_total{{kind="prompt"}} {self.prompt_tokens}',
            f'deploykit_bridge_tokens_total{{kind="completion"}} {self.completion_tokens}',
            "# HELP deploykit_bridge_in_flight Requests received and not yet acknowledged.",
            "# TYPE deploykit_bridge_in_flight gauge",
            f"deploykit_bridge_in_flight {self.in_flight}",
            "# HELP deploykit_bridge_request_seconds Time from receipt to reply publication.",
            "# TYPE deploykit_bridge_request_seconds histogram",
        ]
        for bound, n in zip(LATENCY_BUCKETS, self.latency_counts, strict=True):
            lines.append(f'deploykit_bridge_request_seconds_bucket{{le="{bound}"}} {n}')
        lines += [
            f'deploykit_bridge_request_seconds_bucket{{le="+Inf"}} {self.latency_count}',
            f"deploykit_bridge_request_seconds_sum {self.latency_sum:.6f}",
            f"deploykit_bridge_request_seconds_count {self.latency_count}",
        ]
        lines += [
            "# HELP deploykit_bridge_project_request_seconds Time from receipt to reply, by project.",
            "# TYPE deploykit_bridge_project_request_seconds histogram",
        ]
        for project, counts in sorted(self.project_latency.items()):
            label = f'project="{_esc(project)}"'
            for bound, n in zip(LATENCY_BUCKETS, counts, strict=True):
                lines.append(
                    f'deploykit_bridge_project_request_seconds_bucket{{{label},le="{bound}"}} {n}'
                )
            total = self.project_latency_count[project]
            lines += [
                f'deploykit_bridge_project_request_seconds_bucket{{{label},le="+Inf"}} {total}',
                f"deploykit_bridge_project_request_seconds_count{{{label}}} {total}",
            ]
        lines += [
            "# HELP deploykit_bridge_project_tokens_total Tokens processed, by project and kind.",
            "# TYPE deploykit_bridge_project_tokens_total counter",
        ]
        for (project, kind), n in sorted(self.project_tokens.items()):
            lines.append(
                f'deploykit_bridge_project_tokens_total{{project="{_esc(project)}",kind="{kind}"}} {n}'
            )
        for name, value in sorted(gauges.items()):
            lines += [f"# TYPE deploykit_bridge_{name} gauge", f"deploykit_bridge_{name} {value:g}"]
        for name, value in sorted((counters or {}).items()):
            lines += [
                f"# TYPE deploykit_bridge_{name} counter",
                f"deploykit_bridge_{name} {value:g}",
            ]
        for name, values in sorted((per_project or {}).items()):
            lines.append(f"# TYPE deploykit_bridge_project_{name} gauge")
            for project, value in sorted(values.items()):
                lines.append(
                    f'deploykit_bridge_project_{name}{{project="{_esc(project)}"}} {value:g}'
                )
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class HttpEndpoint:
    """GET /health (200 when healthy, else 503, JSON body) and GET /metrics."""

    def __init__(
        self,
        health: Callable[[], tuple[bool, dict[str, object]]],
        metrics: Callable[[], str],
    ) -> None:
        self._health = health
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import json

        try:
            request_line = await asyncio.wait_for(reader.readline(), 5.0)
            while True:  # skip headers
                line = await asyncio.wait_for(reader.readline(), 5.0)
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request_line.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            if method not in ("GET", "HEAD"):
                status, ctype, body = (
                    "405 Method Not Allowed",
                    "text/plain",
                    b"method not allowed\n",
                )
            elif path == "/health":
                ok, detail = self._health()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "application/json", json.dumps(detail).encode() + b"\n"
            elif path == "/metrics":
                status = "200 OK"
                ctype = "text/plain; version=0.0.4; charset=utf-8"
                body = self._metrics().encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("health endpoint failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

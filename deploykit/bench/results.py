"""What a benchmark measured, the figures drawn from it, and its JSON (``results.json``). Pure.

A run is one path (``mqtt``: client -> broker -> bridge -> engine; ``direct``: HTTP to the engine
from its own network) at one concurrency: its per-request samples (loadgen.Sample) and how long
it took. From the runs: MQTT/direct ratios per concurrency, each path's gain from the lowest to the
highest concurrency, and the issue's targets, which are figures to read, never assertions.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from deploykit.loadgen import Run, Sample

RESULTS_KIND = "deploykit-bench"
RESULTS_VERSION = 1

#: The targets of "Measured, not claimed" (issue 12), read against each run's figures.
TARGET_TPS_RATIO = 0.95  # MQTT/direct output tokens/s at concurrency 64
TARGET_RATIO_AT = 64
TARGET_ADDED_P50_S = 0.003  # what the MQTT path adds to p50 latency at concurrency 1
TARGET_GAIN_RATIO = 0.95  # the MQTT path's concurrency gain against the direct path's


@dataclass
class RunRecord:
    """One path at one concurrency."""

    path: str  # "mqtt" or "direct"
    concurrency: int
    planned: int  # requests planned; fewer samples when interrupted
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    interrupted: bool = False
    gpu_peak: dict[str, int] = field(default_factory=dict)  # GPU -> peak bytes used in this run

    @property
    def run(self) -> Run:
        return Run(self.path, self.concurrency, True, self.seconds, self.samples)

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples if s.error is not None)

    def to_json(self) -> dict[str, Any]:
        summary = self.run.as_dict()
        for key in ("label", "stream", "path", "concurrency", "seconds"):
            summary.pop(key)
        return {
            "path": self.path,
            "concurrency": self.concurrency,
            "planned": self.planned,
            "seconds": self.seconds,
            "interrupted": self.interrupted,
            **summary,
            "errors": self.errors,
            "error_codes": self.run.errors,
            "gpu_peak_bytes": self.gpu_peak,
            "samples": [asdict(s) for s in self.samples],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        return cls(
            path=data["path"],
            concurrency=int(data["concurrency"]),
            planned=int(data["planned"]),
            seconds=float(data["seconds"]),
            samples=[Sample(**s) for s in data["samples"]],
            interrupted=bool(data.get("interrupted")),
            gpu_peak={k: int(v) for k, v in (data.get("gpu_peak_bytes") or {}).items()},
        )


@dataclass
class Overhead:
    """1-token requests at concurrency 1 on both paths: the fixed cost of the MQTT path."""

    mqtt: list[float]
    direct: list[float]

    @property
    def added_s(self) -> float | None:
        if not self.mqtt or not self.direct:
            return None
        return statistics.median(self.mqtt) - statistics.median(self.direct)

    def to_json(self) -> dict[str, Any]:
        return {
            "mqtt_s": self.mqtt,
            "direct_s": self.direct,
            "mqtt_p50_s": statistics.median(self.mqtt) if self.mqtt else None,
            "direct_p50_s": statistics.median(self.direct) if self.direct else None,
            "added_p50_s": self.added_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Overhead:
        return cls([float(x) for x in data["mqtt_s"]], [float(x) for x in data["direct_s"]])


@dataclass(frozen=True)
class Ratio:
    """MQTT against direct at one concurrency."""

    concurrency: int
    tps: float | None  # output tokens/s, MQTT / direct
    rps: float | None
    p50_added_s: float | None
    ttft_p50_added_s: float | None


@dataclass(frozen=True)
class Gain:
    """Output tokens/s at the highest concurrency over the lowest, per path."""

    low: int
    high: int
    mqtt: float
    direct: float

    @property
    def ratio(self) -> float:
        return self.mqtt / self.direct if self.direct else 0.0


@dataclass(frozen=True)
class Target:
    text: str
    measured: str
    met: bool | None  # None: not measured in this run


@dataclass
class BenchResult:
    """One stack's benchmark: what was asked, what ran, what it measured."""

    stack: dict[str, Any]  # name, quant, gpu_class, model, vllm, gpu_ids
    project: str
    limits: str  # the statement that no limit shapes the load (limits.statement)
    settings: dict[str, Any]  # concurrency, requests, max_tokens, fixed_length, prompts, ...
    runs: list[RunRecord] = field(default_factory=list)
    overhead: Overhead | None = None
    engine_memory: dict[str, Any] | None = None
    gpu: dict[str, Any] | None = None  # GPUs (name, total) and the peak use over the benchmark
    started: str = ""
    finished: str = ""
    command: str = ""
    host: dict[str, Any] = field(default_factory=dict)
    deploykit: str = ""
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    def run(self, path: str, concurrency: int) -> RunRecord | None:
        found = [r for r in self.runs if r.path == path and r.concurrency == concurrency]
        return found[-1] if found else None

    @property
    def concurrencies(self) -> list[int]:
        return sorted({r.concurrency for r in self.runs})

    def ratios(self) -> list[Ratio]:
        out = []
        for c in self.concurrencies:
            m, d = self.run("mqtt", c), self.run("direct", c)
            if m is None or d is None:
                continue
            mr, dr = m.run, d.run
            out.append(
                Ratio(
                    c,
                    mr.tps / dr.tps if dr.tps else None,
                    mr.rps / dr.rps if dr.rps else None,
                    _minus(mr.latency(50), dr.latency(50)),
                    _minus(mr.ttft(50), dr.ttft(50)),
                )
            )
        return out

    def gain(self) -> Gain | None:
        both = [c for c in self.concurrencies if self.run("mqtt", c) and self.run("direct", c)]
        if len(both) < 2:
            return None
        low, high = both[0], both[-1]
        tps = {path: (self._tps(path, high), self._tps(path, low)) for path in ("mqtt", "direct")}
        if not all(lo for _hi, lo in tps.values()):
            return None
        return Gain(low, high, tps["mqtt"][0] / tps["mqtt"][1], tps["direct"][0] / tps["direct"][1])

    def _tps(self, path: str, c: int) -> float:
        r = self.run(path, c)
        return r.run.tps if r is not None else 0.0

    def targets(self) -> list[Target]:
        ratios = {r.concurrency: r for r in self.ratios()}
        at = ratios.get(TARGET_RATIO_AT)
        out = [
            Target(
                f"MQTT/direct output tokens/s >= {TARGET_TPS_RATIO} at concurrency "
                f"{TARGET_RATIO_AT}",
                "not measured" if at is None or at.tps is None else f"{at.tps:.3f}",
                None if at is None or at.tps is None else at.tps >= TARGET_TPS_RATIO,
            )
        ]
        added = self.overhead.added_s if self.overhead is not None else None
        how = "1-token requests"
        if added is None and 1 in ratios:
            added, how = ratios[1].p50_added_s, "full-length requests"
        out.append(
            Target(
                f"MQTT path adds <= {TARGET_ADDED_P50_S * 1000:.0f} ms to p50 latency at "
                "concurrency 1",
                "not measured" if added is None else f"{added * 1000:+.1f} ms ({how})",
                None if added is None else added <= TARGET_ADDED_P50_S,
            )
        )
        gain = self.gain()
        out.append(
            Target(
                f"MQTT gain from concurrency {gain.low if gain else 1} to "
                f"{gain.high if gain else TARGET_RATIO_AT} >= {TARGET_GAIN_RATIO} x the direct "
                "path's",
                "not measured"
                if gain is None
                else f"{gain.ratio:.3f} (MQTT {gain.mqtt:.2f}x, direct {gain.direct:.2f}x)",
                None if gain is None else gain.ratio >= TARGET_GAIN_RATIO,
            )
        )
        return out

    @property
    def gpu_peak(self) -> dict[str, int]:
        """Peak GPU memory used over the whole benchmark, per GPU."""
        peak: dict[str, int] = {}
        for r in self.runs:
            for gpu, used in r.gpu_peak.items():
                peak[gpu] = max(peak.get(gpu, 0), used)
        return peak

    def to_json(self) -> dict[str, Any]:
        gain = self.gain()
        return {
            "kind": RESULTS_KIND,
            "version": RESULTS_VERSION,
            "deploykit": self.deploykit,
            "command": self.command,
            "started": self.started,
            "finished": self.finished,
            "interrupted": self.interrupted,
            "host": self.host,
            "stack": self.stack,
            "project": self.project,
            "limits": self.limits,
            "settings": self.settings,
            "runs": [r.to_json() for r in self.runs],
            "ratios": [asdict(r) for r in self.ratios()],
            "gain": None if gain is None else {**asdict(gain), "ratio": gain.ratio},
            "overhead": self.overhead.to_json() if self.overhead else None,
            "targets": [asdict(t) for t in self.targets()],
            "engine_memory": self.engine_memory,
            "gpu": self.gpu,
            "gpu_peak_bytes": self.gpu_peak,
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchResult:
        if data.get("kind") != RESULTS_KIND:
            raise ValueError(f"not a {RESULTS_KIND} result: kind {data.get('kind')!r}")
        return cls(
            stack=data["stack"],
            project=data["project"],
            limits=data["limits"],
            settings=data["settings"],
            runs=[RunRecord.from_json(r) for r in data["runs"]],
            overhead=Overhead.from_json(data["overhead"]) if data.get("overhead") else None,
            engine_memory=data.get("engine_memory"),
            gpu=data.get("gpu"),
            started=data.get("started", ""),
            finished=data.get("finished", ""),
            command=data.get("command", ""),
            host=data.get("host") or {},
            deploykit=data.get("deploykit", ""),
            interrupted=bool(data.get("interrupted")),
            notes=list(data.get("notes") or []),
        )


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b

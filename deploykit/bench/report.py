"""``results.md``: a benchmark as Markdown a README can include (pure: results in, text out)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deploykit.bench.results import BenchResult, RunRecord

GIB = 1024**3


def _s(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:+.1f} ms"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def describe_stack(r: BenchResult) -> str:
    s = r.stack
    vllm = f", vLLM {s['vllm']}" if s.get("vllm") else ""
    return f"`{s['name']}` ({s['quant']} on {s['gpu_class']}, model `{s['model']}`{vllm})"


def describe_requests(settings: dict[str, Any]) -> str:
    length = (
        f"{settings['max_tokens']} output tokens (fixed: ignore_eos)"
        if settings.get("fixed_length")
        else f"up to {settings['max_tokens']} output tokens (the model may stop earlier)"
    )
    counts = ", ".join(f"{n} at {c}" for c, n in settings["requests"].items())
    return (
        f"one user message each in a fresh session, {length}, greedy, streamed; "
        f"{settings['prompts']} prompt(s) from {settings['prompt_source']}; requests per "
        f"concurrency: {counts}"
    )


def runs_table(runs: Sequence[RunRecord]) -> list[str]:
    lines = [
        "| concurrency | path | requests | errors | req/s | output tok/s | TTFT p50 s | "
        "TTFT p95 s | latency p50 s | p95 s | p99 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in sorted(runs, key=lambda x: (x.concurrency, x.path != "mqtt")):
        r = rec.run
        done = f"{len(rec.samples)}" + (
            f" of {rec.planned} (interrupted)" if rec.interrupted else ""
        )
        lines.append(
            f"| {rec.concurrency} | {'MQTT' if rec.path == 'mqtt' else 'direct'} | {done} | "
            f"{rec.errors} | {r.rps:.2f} | {r.tps:.1f} | {_s(r.ttft(50))} | {_s(r.ttft(95))} | "
            f"{_s(r.latency(50))} | {_s(r.latency(95))} | {_s(r.latency(99))} |"
        )
    return lines


def error_lines(runs: Sequence[RunRecord]) -> list[str]:
    out = []
    for rec in runs:
        if rec.errors:
            codes = ", ".join(f"{code} {n}" for code, n in sorted(rec.run.errors.items()))
            out.append(f"- errors at concurrency {rec.concurrency}, {rec.path}: {codes}")
    return out


def memory_lines(r: BenchResult) -> list[str]:
    out = []
    if r.engine_memory:
        from deploykit.bench.enginelog import EngineMemory

        out.append(f"- Engine memory (vLLM's log): {EngineMemory(**r.engine_memory).describe()}.")
    if r.gpu is None or not r.gpu.get("totals"):
        out.append(f"- Peak GPU memory: {(r.gpu or {}).get('source') or 'not measured'}.")
    else:
        peak = r.gpu_peak
        parts = [
            f"{gpu}: {peak.get(gpu, 0) / GIB:.1f} of {total / GIB:.1f} GiB"
            for gpu, total in r.gpu["totals"].items()
        ]
        out.append(f"- Peak GPU memory ({r.gpu.get('source')}): {'; '.join(parts)}.")
    return out


def markdown(r: BenchResult, title: str | None = None) -> str:
    """The whole report: setup, the runs, MQTT against direct, the targets."""
    load = r.host.get("load_average_before")
    blocks: list[list[str]] = [
        [f"## {title or 'deploykit bench: ' + describe_stack(r)}"],
        [
            f"`{r.command}` ({r.started}, {r.host.get('cpus')} CPUs"
            + (f", load average {load[0]:.2f} before" if load else "")
            + (", **interrupted**" if r.interrupted else "")
            + ")"
        ],
        [
            f"- Stack {describe_stack(r)}; {r.limits}.",
            f"- Requests: {describe_requests(r.settings)}.",
            "- MQTT: through the broker's published port with the project's account; direct: the "
            "same requests over HTTP to the engine "
            + (
                "from a helper process on the serve instance's host (its loopback port)."
                if r.stack.get("kind") == "serve"
                else "from a helper container on the stack's engine network."
            ),
        ],
        runs_table(r.runs) + error_lines(r.runs),
    ]
    ratios = r.ratios()
    if ratios:
        blocks.append(
            [
                "| concurrency | output tok/s MQTT/direct | req/s MQTT/direct | p50 latency added "
                "| TTFT p50 added |",
                "|---|---|---|---|---|",
            ]
            + [
                f"| {x.concurrency} | {_ratio(x.tps)} | {_ratio(x.rps)} | {_ms(x.p50_added_s)} | "
                f"{_ms(x.ttft_p50_added_s)} |"
                for x in ratios
            ]
        )
    figures = []
    gain = r.gain()
    if gain is not None:
        figures.append(
            f"- Gain from concurrency {gain.low} to {gain.high} (output tokens/s): MQTT "
            f"{gain.mqtt:.2f}x, direct {gain.direct:.2f}x; MQTT/direct {gain.ratio:.3f}."
        )
    if r.overhead is not None and r.overhead.added_s is not None:
        o = r.overhead.to_json()
        figures.append(
            f"- Fixed cost of the MQTT path (1-token requests at concurrency 1, "
            f"{len(r.overhead.mqtt)} MQTT and {len(r.overhead.direct)} direct, in alternating "
            f"blocks): p50 MQTT {o['mqtt_p50_s'] * 1000:.1f} ms, direct "
            f"{o['direct_p50_s'] * 1000:.1f} ms: {_ms(r.overhead.added_s)}."
        )
    blocks.append(figures + memory_lines(r))
    blocks.append(
        ["| target (issue 12: a figure, not a test) | measured | |", "|---|---|---|"]
        + [
            f"| {t.text} | {t.measured} | "
            f"{'-' if t.met is None else ('met' if t.met else '**not met**')} |"
            for t in r.targets()
        ]
    )
    if r.notes:
        blocks.append([f"- {note}" for note in r.notes])
    return "\n\n".join("\n".join(b) for b in blocks if b) + "\n"

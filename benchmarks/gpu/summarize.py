#!/usr/bin/env python3
"""Summarize one GPU run of bridge_h200.sh (the folder its archive unpacks to): per model and
concurrency, direct and MQTT requests/s (whole and streamed), their ratio, the engine's ceiling
from `vllm bench serve`, MQTT against that ceiling, and the bridge's CPU per request.

With several runs per cell (REPEAT, paths alternating), each figure is the median over the runs
and the ratio is the median of the per-run ratios (direct and MQTT of the same run follow each
other), with its range.

    python3 benchmarks/gpu/summarize.py benchmarks/results/h200-run3

A run that measured several bridges (BRIDGES) gets a table per bridge, each against the same
direct runs. Given several folders, it pools them instead: per model and concurrency, the median of every
run's MQTT/direct ratio over all the folders, with their range and count (the engine's own rate
moves between runs, so one run's ratio settles little), and the median bridge CPU per request.

    python3 benchmarks/gpu/summarize.py benchmarks/results/h200-run3 benchmarks/results/h200-run5

A run of several bridges takes part in a pool with one of them, named after a colon:
``benchmarks/results/h200-run7:new``.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

Cells = dict[tuple[str, bool, int], list[dict[str, Any]]]


def labels(folder: Path, model: str) -> list[str]:
    """The bridges measured (several when BRIDGES named them)."""
    data = json.loads((folder / f"bridge-{model}.json").read_text())
    return sorted({c["label"] for c in data["cells"] if c["path"] == "mqtt"})


def load(
    folder: Path, model: str, label: str | None = None
) -> tuple[Cells, dict[int, float], list[str]]:
    """The cells of one run; with ``label``, the MQTT cells of that bridge only."""
    data = json.loads((folder / f"bridge-{model}.json").read_text())
    cells: Cells = defaultdict(list)
    for c in data["cells"]:
        if label is None or c["path"] != "mqtt" or c["label"] == label:
            cells[(c["path"], c["stream"], c["concurrency"])].append(c)
    ceiling = {}
    for c in (64, 256, 512):
        path = folder / f"vllm-bench-{model}-c{c}.json"
        if path.is_file():
            ceiling[c] = float(json.loads(path.read_text())["request_throughput"])
    return cells, ceiling, data.get("overhead", [])


def ratio(direct: list[dict[str, Any]], mqtt: list[dict[str, Any]]) -> str:
    """Median of the per-run MQTT/direct ratios, and their range when there are several."""
    ratios = sorted(m["rps"] / d["rps"] for d, m in zip(direct, mqtt, strict=False))
    text = f"{statistics.median(ratios):.2f}"
    return f"{text} ({ratios[0]:.2f} to {ratios[-1]:.2f})" if len(ratios) > 1 else text


def med(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def table(folder: Path, model: str, label: str | None = None) -> str:
    cells, ceiling, overhead = load(folder, model, label)
    rows = [
        "| conc. | runs | ceiling req/s (vllm bench) | whole: direct / MQTT req/s | MQTT/direct "
        "| MQTT/ceiling | stream: direct / MQTT req/s | MQTT/direct | MQTT/ceiling "
        "| stream TTFT p50 direct / MQTT | errors | bridge CPU/req whole / stream |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in (1, 64, 256, 512):
        dw, mw = cells.get(("direct", False, c)), cells.get(("mqtt", False, c))
        ds, ms = cells.get(("direct", True, c)), cells.get(("mqtt", True, c))
        if not (dw and mw and ds and ms):
            continue
        ceil = ceiling.get(c)
        errors = sum(sum(x["errors"].values()) for runs in (dw, mw, ds, ms) for x in runs)
        rps = {k: med(v, "rps") or 0.0 for k, v in (("dw", dw), ("mw", mw), ("ds", ds), ("ms", ms))}
        ttft = [med(ds, "ttft_p50"), med(ms, "ttft_p50")]

        def vs_ceiling(value: float, ceil: float | None = ceil) -> str:
            return f"{value / ceil:.2f}" if ceil else "-"

        def ms_text(value: float | None) -> str:
            return f"{value * 1000:.0f}" if value is not None else "-"

        rows.append(
            f"| {c} | {len(mw)} | {f'{ceil:.1f}' if ceil else '-'} | "
            f"{rps['dw']:.1f} / {rps['mw']:.1f} | {ratio(dw, mw)} | {vs_ceiling(rps['mw'])} | "
            f"{rps['ds']:.1f} / {rps['ms']:.1f} | {ratio(ds, ms)} | {vs_ceiling(rps['ms'])} | "
            f"{ms_text(ttft[0])} / {ms_text(ttft[1])} ms | {errors} | "
            f"{med(mw, 'bridge_cpu_ms') or 0:.2f} / {med(ms, 'bridge_cpu_ms') or 0:.2f} ms |"
        )
    return "\n".join(rows + [""] + [f"- {line}" for line in overhead])


def run_ratios(direct: list[dict[str, Any]], mqtt: list[dict[str, Any]]) -> list[float]:
    return [m["rps"] / d["rps"] for d, m in zip(direct, mqtt, strict=False)]


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{statistics.median(values):.2f} ({values[0]:.2f} to {values[-1]:.2f}, n={len(values)})"


def pooled(runs: list[tuple[Path, str | None]], model: str) -> str:
    rows = [
        "| conc. | whole MQTT/direct | stream MQTT/direct | bridge CPU/req whole / stream | errors |",
        "|---|---|---|---|---|",
    ]
    for c in (1, 64, 256, 512):
        whole: list[float] = []
        stream: list[float] = []
        cpu_w: list[float] = []
        cpu_s: list[float] = []
        errors = 0
        for folder, label in runs:
            if not (folder / f"bridge-{model}.json").is_file():
                continue
            found = labels(folder, model)
            if label is None and len(found) > 1:
                raise SystemExit(
                    f"{folder}: a run of {len(found)} bridges ({', '.join(found)}); name the one "
                    f"to pool: {folder}:{found[0]}"
                )
            if label is not None and label not in found:
                raise SystemExit(f"{folder}: no bridge {label!r} (it has {', '.join(found)})")
            cells = load(folder, model, label)[0]
            dw, mw = cells.get(("direct", False, c), []), cells.get(("mqtt", False, c), [])
            ds, ms = cells.get(("direct", True, c), []), cells.get(("mqtt", True, c), [])
            whole += run_ratios(dw, mw)
            stream += run_ratios(ds, ms)
            cpu_w += [r["bridge_cpu_ms"] for r in mw if r.get("bridge_cpu_ms") is not None]
            cpu_s += [r["bridge_cpu_ms"] for r in ms if r.get("bridge_cpu_ms") is not None]
            errors += sum(sum(x["errors"].values()) for runs in (dw, mw, ds, ms) for x in runs)
        if not (whole or stream):
            continue
        cpu = " / ".join(f"{statistics.median(v):.2f}" if v else "-" for v in (cpu_w, cpu_s))
        rows.append(f"| {c} | {spread(whole)} | {spread(stream)} | {cpu} ms | {errors} |")
    return "\n".join(rows)


def run_arg(arg: str) -> tuple[Path, str | None]:
    """``FOLDER`` or ``FOLDER:BRIDGE``."""
    folder, sep, label = arg.rpartition(":")
    if sep and label and "/" not in label:
        return Path(folder), label
    return Path(arg), None


if __name__ == "__main__":
    runs = [run_arg(a) for a in sys.argv[1:]]
    folders = [folder for folder, _ in runs]
    for model in ("bench", "8b"):
        if len(runs) > 1:
            print(f"### {model}, pooled over {len(runs)} runs\n\n{pooled(runs, model)}\n")
        elif (folders[0] / f"bridge-{model}.json").is_file():
            bridges = labels(folders[0], model)
            for label in bridges:
                title = f"{model}, bridge {label!r}" if len(bridges) > 1 else model
                print(f"### {title}\n\n{table(folders[0], model, label)}\n")

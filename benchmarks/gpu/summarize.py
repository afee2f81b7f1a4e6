#!/usr/bin/env python3
"""Summarize one GPU run of bridge_h200.sh (the folder its archive unpacks to): per model and
concurrency, direct and MQTT requests/s (whole and streamed), their ratio, the engine's ceiling
from `vllm bench serve`, MQTT against that ceiling, and the bridge's CPU per request.

    python3 benchmarks/gpu/summarize.py benchmarks/results/h200-run2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def load(
    folder: Path, model: str
) -> tuple[dict[tuple[str, bool, int], dict[str, Any]], dict[int, float], list[str]]:
    data = json.loads((folder / f"bridge-{model}.json").read_text())
    cells = {(c["path"], c["stream"], c["concurrency"]): c for c in data["cells"]}
    ceiling = {}
    for c in (64, 256, 512):
        path = folder / f"vllm-bench-{model}-c{c}.json"
        if path.is_file():
            ceiling[c] = float(json.loads(path.read_text())["request_throughput"])
    return cells, ceiling, data.get("overhead", [])


def table(folder: Path, model: str) -> str:
    cells, ceiling, overhead = load(folder, model)
    rows = [
        "| conc. | ceiling req/s (vllm bench) | whole: direct / MQTT req/s | MQTT/direct | MQTT/ceiling "
        "| stream: direct / MQTT req/s | MQTT/direct | MQTT/ceiling | errors | bridge CPU/req whole / stream |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in (1, 64, 256, 512):
        dw, mw = cells.get(("direct", False, c)), cells.get(("mqtt", False, c))
        ds, ms = cells.get(("direct", True, c)), cells.get(("mqtt", True, c))
        if not (dw and mw and ds and ms):
            continue
        ceil = ceiling.get(c)
        errors = sum(sum(x["errors"].values()) for x in (dw, mw, ds, ms))

        def vs_ceiling(rps: float, ceil: float | None = ceil) -> str:
            return f"{rps / ceil:.2f}" if ceil else "-"

        rows.append(
            f"| {c} | {f'{ceil:.1f}' if ceil else '-'} | "
            f"{dw['rps']:.1f} / {mw['rps']:.1f} | {mw['rps'] / dw['rps']:.2f} | "
            f"{vs_ceiling(mw['rps'])} | {ds['rps']:.1f} / {ms['rps']:.1f} | "
            f"{ms['rps'] / ds['rps']:.2f} | {vs_ceiling(ms['rps'])} | {errors} | "
            f"{mw['bridge_cpu_ms']:.2f} / {ms['bridge_cpu_ms']:.2f} ms |"
        )
    return "\n".join(rows + [""] + [f"- {line}" for line in overhead])


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    for model in ("bench", "8b"):
        if (folder / f"bridge-{model}.json").is_file():
            print(f"### {model}\n\n{table(folder, model)}\n")

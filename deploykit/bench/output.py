"""The files a benchmark writes: ``results.json``, ``results.md`` and ``results.png`` in one
folder, for one stack or for ``--methods`` (one table, each method's own files in a sub-folder)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from deploykit.bench import methods, plot, report
from deploykit.bench.results import BenchResult

FILES = ("results.json", "results.md", "results.png")


def write_bench(result: BenchResult, folder: Path) -> list[Path]:
    """One stack's results."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / name for name in FILES]
    files[0].write_text(json.dumps(result.to_json(), indent=1) + "\n")
    files[1].write_text(report.markdown(result))
    plot.bench_png(result, files[2])
    return files


def write_methods(
    results: dict[str, BenchResult],
    plans: Sequence[methods.MethodPlan],
    folder: Path,
    command: str,
) -> list[Path]:
    """One table for all methods (each method's own files are in ``folder/<method>``)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / name for name in FILES]
    data = {
        "kind": "deploykit-bench-methods",
        "version": 1,
        "command": command,
        "methods": [p.to_json() for p in plans],
        "results": {m: r.to_json() for m, r in results.items()},
    }
    files[0].write_text(json.dumps(data, indent=1) + "\n")
    first = next(iter(results.values()), None)
    setup = (
        f"- Requests: {report.describe_requests(first.settings)}.\n- {first.limits}.\n\n"
        if first is not None
        else ""
    )
    files[1].write_text(
        f"## deploykit bench --methods\n\n`{command}`\n\n{setup}"
        "Figures of the MQTT path; each method's own results (both paths) are in its folder.\n\n"
        + methods.table(results, plans)
    )
    plot.methods_png(results, files[2])
    return files

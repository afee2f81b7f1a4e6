#!/usr/bin/env python3
"""The engine images' start-up guard (deploykit/guard.py) on this machine's GPUs, without Docker:
each engine image of a GPU class runs the guard before vLLM, and here the guard's own checks run
with that image's facts (rendered from the matrix, as ``deploykit render`` writes facts.json).

    python benchmarks/gpu/guard_check.py --gpu-class cuda-fp8 --model none=DIR,awq=DIR,... > out.json

For every supported cell of the class: the GPU check (NVML, else nvidia-smi) and the checkpoint
check against the method's model, then the vLLM command the image would run. Then one cell made to
need a compute capability above the GPU's (its facts with ``min_compute_capability`` raised): the
guard must refuse it with its message and exit code. Prints one JSON document; exits 1 when a
supported cell is refused or the raised one is not.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import sys
from typing import Any

from deploykit import matrix, render
from deploykit.guard import Guard, ImageFacts


def run_guard(facts: ImageFacts, model: str | None) -> dict[str, Any]:
    """The guard's checks with ``facts``, as the image's ENTRYPOINT runs them before vLLM."""
    guard = Guard(facts)
    args = ["--model", model] if model else []
    err = io.StringIO()
    out: dict[str, Any] = {"quant": facts.quant, "gpu_class": facts.gpu_class}
    out["min_compute_capability"] = facts.min_compute_capability
    try:
        with contextlib.redirect_stderr(err):
            out["command"] = guard.command(args)
        out["exit"] = 0
    except SystemExit as stop:
        out["exit"] = stop.code
    with contextlib.redirect_stderr(io.StringIO()):
        gpus = guard.visible_gpus()
    out["gpus"] = [{"name": n, "compute_capability": cc} for n, cc in gpus]
    out["log"] = err.getvalue().splitlines()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-class", default="cuda-fp8")
    parser.add_argument("--model", default="", help="METHOD=DIR,... (the checkpoint per method)")
    args = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in args.model.split(",") if "=" in item)
    gpu_class = matrix.parse_gpu_class(args.gpu_class)
    cells = [c for c in matrix.supported_cells() if c.gpu_class is gpu_class]
    report: dict[str, Any] = {"gpu_class": str(gpu_class), "cells": [], "raised": None}
    ok = True
    for cell in cells:
        result = run_guard(render.image_facts(cell), models.get(str(cell.quant)))
        report["cells"].append(result)
        ok &= result["exit"] == 0
    # a cell made to need more than this GPU has: refused with its message and exit code
    facts = render.image_facts(cells[0])
    with contextlib.redirect_stderr(io.StringIO()):
        have = max((cc for _, cc in Guard(facts).visible_gpus()), default=0.0)
    raised = dataclasses.replace(facts, min_compute_capability=round(have + 1.0, 1))
    result = run_guard(raised, models.get(str(cells[0].quant)))
    report["raised"] = result
    ok &= result["exit"] == 3 and any("needs compute capability" in line for line in result["log"])
    report["ok"] = ok
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

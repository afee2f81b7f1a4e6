"""The engine images' start-up guard, replayed on what it saw and decided on an H200.

tests/data/h200-guard.json was written on the GPU machine (2026-11-30, vLLM 0.24.0, no Docker) by
`benchmarks/gpu/guard_check.py --gpu-class cuda-fp8`: the guard's own checks with each cuda-fp8 engine
image's facts, the GPU as NVML reported it, and a cell made to need compute capability 10.0. Here the
same checks run with today's facts on the recorded GPU (NVML replaced by the recording), and must
decide as the GPU machine did: every cuda-fp8 cell starts, with the same vLLM arguments, and the
raised cell is refused with exit 3 naming the GPU and what runs on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest

from deploykit import matrix, render
from deploykit.guard import Guard, ImageFacts

RECORDED = json.loads((Path(__file__).parents[1] / "data" / "h200-guard.json").read_text())


def replay(
    facts: ImageFacts, gpus: list[tuple[str, float]], model: str
) -> tuple[object, list[str] | None, list[str]]:
    guard = Guard(facts)
    guard.visible_gpus = lambda: gpus  # type: ignore[method-assign]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            command = guard.command(["--model", model])
        return 0, command, err.getvalue().splitlines()
    except SystemExit as stop:
        return stop.code, None, err.getvalue().splitlines()


def recorded_gpus(cell: dict) -> list[tuple[str, float]]:
    return [(g["name"], g["compute_capability"]) for g in cell["gpus"]]


@pytest.mark.parametrize("cell", RECORDED["cells"], ids=lambda c: c["quant"])
def test_every_cuda_fp8_cell_starts_on_the_h200(cell: dict, tmp_path: Path) -> None:
    assert recorded_gpus(cell) == [("NVIDIA H200", 9.0)] and cell["exit"] == 0
    facts = render.image_facts(matrix.resolve_target(matrix.Quant(cell["quant"]), "cuda-fp8"))
    # no local checkpoint here: the checkpoint check is skipped, so compare the image's own flags
    code, command, log = replay(facts, recorded_gpus(cell), str(tmp_path / "absent"))
    assert code == 0, log
    assert command is not None
    recorded_flags = cell["command"][2 : cell["command"].index("--model")]
    assert command[2 : command.index("--model")] == recorded_flags
    assert cell["log"][0] in log


def test_a_cell_needing_more_than_the_h200_is_refused_with_its_message() -> None:
    raised = RECORDED["raised"]
    assert raised["exit"] == 3 and raised["min_compute_capability"] == 10.0
    cell = matrix.resolve_target(matrix.Quant(raised["quant"]), "cuda-fp8")
    facts = dataclasses.replace(render.image_facts(cell), min_compute_capability=10.0)
    code, _command, log = replay(facts, recorded_gpus(raised), "/nonexistent")
    assert code == 3
    assert log == raised["log"]
    assert "NVIDIA H200 (compute capability 9.0)" in log[0] and "fp8" in log[1]

"""`deploykit bench --methods`: which methods run on the pinned GPUs (as `up` decides, from the
recorded H100 and hand-written inventories), each with its own model, and the reasons of those
that cannot; the one table of the results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from deploykit.bench import methods
from deploykit.bench.results import BenchResult, RunRecord
from deploykit.devices import GpuInventory
from deploykit.errors import UsageError
from deploykit.loadgen import Sample

from .conftest import LLAMA3_8B, QWEN25_7B, QWEN25_7B_AWQ

ALL = ("none", "fp8", "awq", "gptq", "bitsandbytes", "squeezellm")


def plan(
    tmp_path: Path,
    inventory: GpuInventory | None,
    models: dict[str, str | None],
    chosen: tuple[str, ...] = ALL,
    **kwargs: object,
) -> dict[str, methods.MethodPlan]:
    config = tmp_path / "bench.yaml"
    config.write_text("{}\n")
    plans = methods.plan_methods(
        chosen,
        models,
        name_prefix="bench",
        state_dir=tmp_path / "state",
        bridge_config=config,
        mqtt_port=18830,
        inventory=list(inventory.gpus) if inventory is not None else [],
        driver=inventory.driver if inventory is not None else None,
        **kwargs,  # type: ignore[arg-type]
    )
    assert [p.method for p in plans] == list(chosen)
    return {p.method: p for p in plans}


def test_methods_and_models_parse() -> None:
    assert methods.parse_methods("none, FP8,awq,none") == ("none", "fp8", "awq")
    with pytest.raises(UsageError, match="unknown quantization method 'int3'"):
        methods.parse_methods("none,int3")
    with pytest.raises(UsageError, match="--methods is empty"):
        methods.parse_methods(" , ")
    assert methods.parse_models(None, ("none", "awq")) == {"none": None, "awq": None}
    assert methods.parse_models("/m/llama", ("none", "fp8")) == {
        "none": "/m/llama",
        "fp8": "/m/llama",
    }
    assert methods.parse_models("none=/m/a, awq=/m/b", ("none", "fp8", "awq")) == {
        "none": "/m/a",
        "fp8": None,
        "awq": "/m/b",
    }
    with pytest.raises(UsageError, match="names gptq, which is not in --methods none"):
        methods.parse_models("gptq=/m/q", ("none",))
    with pytest.raises(UsageError, match="is not METHOD=MODEL"):
        methods.parse_models("none=/m/a,awq", ("none", "awq"))


def test_on_the_recorded_h100_each_method_with_its_own_checkpoint(
    tmp_path: Path, h100: GpuInventory, make_model: Callable[..., Path]
) -> None:
    bf16 = str(make_model(LLAMA3_8B))
    awq = str(make_model(QWEN25_7B_AWQ))
    models = {"none": bf16, "fp8": bf16, "awq": awq, "gptq": bf16, "bitsandbytes": bf16}
    plans = plan(tmp_path, h100, {**models, "squeezellm": None})
    runs = {m for m, p in plans.items() if p.plan is not None}
    assert runs == {"none", "fp8", "awq", "bitsandbytes"}
    assert all(str(plans[m].plan.cell.gpu_class) == "cuda-fp8" for m in runs)  # type: ignore[union-attr]
    assert plans["fp8"].plan.name == "bench-fp8"  # type: ignore[union-attr]
    assert plans["fp8"].plan.options.projects == ("bench",)  # type: ignore[union-attr]
    # a bf16 checkpoint is not a GPTQ checkpoint: the gate's own reason, with its hint
    assert plans["gptq"].refused is not None and "gptq" in plans["gptq"].refused.lower()
    assert "removed from vLLM in 0.6.1" in (plans["squeezellm"].refused or "")
    assert plans["awq"].to_json() == {
        "method": "awq",
        "model": awq,
        "runs": True,
        "refused": None,
        "stack": "bench-awq",
        "gpu_class": "cuda-fp8",
    }


def test_a_gpu_below_the_images_capability_runs_nothing(
    tmp_path: Path, v100: GpuInventory, make_model: Callable[..., Path]
) -> None:
    model = str(make_model(QWEN25_7B))
    plans = plan(tmp_path, v100, dict.fromkeys(ALL, model))
    assert all(p.plan is None and p.refused for p in plans.values())
    assert "7.0" in (plans["none"].refused or "")


def test_on_a_machine_without_gpus_only_none_runs_on_the_cpu_stack(
    tmp_path: Path, make_model: Callable[..., Path]
) -> None:
    plans = plan(
        tmp_path, None, dict.fromkeys(("none", "fp8", "awq"), None), ("none", "fp8", "awq")
    )
    assert plans["none"].plan is not None and str(plans["none"].plan.cell.gpu_class) == "cpu"
    for m in ("fp8", "awq"):
        assert f"{m} needs CUDA kernels" in (plans[m].refused or "")


def bench_result(model: str, tps_scale: float) -> BenchResult:
    def run(path: str, c: int) -> RunRecord:
        seconds = 4.0 / tps_scale
        return RunRecord(path, c, 4, seconds, [Sample(1.0, 0.1, 128) for _ in range(4)])

    r = BenchResult(
        stack={"name": "bench-x", "model": model},
        project="bench",
        limits="rate limit off",
        settings={},
        runs=[run(p, c) for c in (1, 64) for p in ("mqtt", "direct")],
        engine_memory={
            "weights_gib": 14.96,
            "weights_source": "vLLM: model loading",
            "kv_cache_gib": 112.41,
            "kv_cache_tokens": 920864,
            "device": "GPU",
        },
    )
    r.runs[0].gpu_peak = {"0: NVIDIA H100 80GB HBM3": 74 * 2**30}
    return r


def test_the_table_has_a_row_per_method_that_ran_and_the_reasons_of_the_rest(
    tmp_path: Path, h100: GpuInventory, make_model: Callable[..., Path]
) -> None:
    bf16 = str(make_model(LLAMA3_8B))
    plans = plan(tmp_path, h100, {"none": bf16, "fp8": bf16, "gptq": bf16}, ("none", "fp8", "gptq"))
    results = {"none": bench_result("llama", 1.0), "fp8": bench_result("llama", 2.0)}
    text = methods.table(results, list(plans.values()))
    lines = text.splitlines()
    assert lines[0].startswith("| method | model | weights | KV cache | tok/s c=1 | tok/s c=64 |")
    assert lines[2] == (
        "| none | `llama` | 14.96 GiB | 112.41 GiB (920,864 tokens) | 128.0 | 128.0 | 0.100 | "
        "1.000 | 1.000 | 74.0 GiB | 0 |"
    )
    assert lines[3].startswith("| fp8 | `llama` | 14.96 GiB |") and "| 256.0 | 256.0 |" in lines[3]
    assert "Not run here:" in text and "- gptq: " in text
    # a method that would run but was not reached (interrupted) says so
    partial = methods.table({"none": results["none"]}, list(plans.values()))
    assert "Not measured (interrupted before its turn): fp8" in partial

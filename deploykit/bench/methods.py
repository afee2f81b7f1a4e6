"""``deploykit bench --methods none,fp8,awq``: the same load against each method the pinned GPUs
run, one stack after another, each with its own model, and one table.

Which methods run is decided by what ``deploykit up`` decides: :func:`plan_methods` asks
``stack.plan_up`` (the matrix, then the pre-flight gate: compute capability, driver, checkpoint
against method, memory fit) for each method, and keeps its refusal as the reason. Pure given an
inventory (tests feed recorded ones); starting and stopping the stacks is the command's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit import matrix, stack
from deploykit.bench.enginelog import EngineMemory
from deploykit.bench.limits import BENCH_PROJECT
from deploykit.bench.results import BenchResult
from deploykit.errors import DeployKitError, UsageError

GIB = 1024**3


def parse_methods(text: str) -> tuple[str, ...]:
    """``none,fp8,awq`` -> the methods, in the order given, each once (UsageError otherwise)."""
    out: list[str] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        value = str(matrix.parse_quant(item))
        if value not in out:
            out.append(value)
    if not out:
        raise UsageError("--methods is empty", "e.g. --methods none,fp8,awq")
    return tuple(out)


def parse_models(text: str | None, methods: Sequence[str]) -> dict[str, str | None]:
    """``--model``: one model for every method (``DIR`` or a Hub id), or one per method
    (``none=DIR,awq=DIR``; methods left out get their default). AWQ and GPTQ need their own
    pre-quantized checkpoints."""
    models: dict[str, str | None] = dict.fromkeys(methods)
    if not text:
        return models
    if "=" not in text:
        return dict.fromkeys(methods, text)
    for item in (x.strip() for x in text.split(",") if x.strip()):
        method, sep, model = item.partition("=")
        if not sep or not model:
            raise UsageError(
                f"--model {text!r}: {item!r} is not METHOD=MODEL",
                "give one model for all methods, or e.g. --model none=/models/llama,awq=/models/llama-awq",
            )
        key = str(matrix.parse_quant(method.strip()))
        if key not in models:
            raise UsageError(
                f"--model names {key}, which is not in --methods {','.join(methods)}",
                "name only the methods you benchmark",
            )
        models[key] = model.strip()
    return models


@dataclass(frozen=True)
class MethodPlan:
    """One method: the stack that would run it, or why it cannot run here."""

    method: str
    model: str | None
    plan: stack.StackPlan | None
    refused: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self.model,
            "runs": self.plan is not None,
            "refused": self.refused,
            "stack": self.plan.name if self.plan else None,
            "gpu_class": str(self.plan.cell.gpu_class) if self.plan else None,
        }


def plan_methods(
    methods: Sequence[str],
    models: dict[str, str | None],
    *,
    name_prefix: str,
    state_dir: Path,
    bridge_config: Path | None,
    gpus: str | None = None,
    gpu_class: str | None = None,
    mqtt_port: int,
    inventory: Sequence[Any] | None = None,
    driver: Any | None = None,
    images: bool = True,
) -> list[MethodPlan]:
    """Each method's stack as ``up`` would plan it (serving the bench project only), or its
    refusal. ``inventory``/``driver`` default to this host's (NVML). ``images=False``: the
    methods run through ``deploykit serve`` from a Python environment whose vLLM brings its own
    CUDA, so the engine images' driver requirement does not apply (as serve plans it)."""
    if not images and inventory is None:
        host = stack.host_inventory()
        inventory = list(host.gpus) if host is not None else []
        driver = None
    out = []
    for method in methods:
        request = stack.UpRequest(
            quant=method,
            gpus=gpus,
            gpu_class=gpu_class,
            model=models.get(method),
            projects=(BENCH_PROJECT,),
            name=f"{name_prefix}-{method}",
            state_dir=state_dir,
            mqtt_port=mqtt_port,
            bridge_config=bridge_config,
        )
        try:
            plan = stack.plan_up(request, inventory=inventory, driver=driver)
        except UsageError:
            raise  # a malformed request is the user's to fix, not a method the GPUs cannot run
        except DeployKitError as err:
            reason = err.message + (f" ({err.hint})" if err.hint else "")
            out.append(MethodPlan(method, models.get(method), None, reason))
            continue
        out.append(MethodPlan(method, models.get(method), plan))
    return out


# --- the table -----------------------------------------------------------------------------------


def _tps(r: BenchResult, c: int) -> str:
    run = r.run("mqtt", c)
    return "-" if run is None else f"{run.run.tps:.1f}"


def _p50(r: BenchResult, c: int, ttft: bool = False) -> str:
    run = r.run("mqtt", c)
    value = None if run is None else (run.run.ttft(50) if ttft else run.run.latency(50))
    return "-" if value is None else f"{value:.3f}"


def _memory(r: BenchResult) -> tuple[str, str]:
    if not r.engine_memory:
        return "-", "-"
    m = EngineMemory(**r.engine_memory)
    weights = "-" if m.weights_gib is None else f"{m.weights_gib:.2f} GiB"
    kv = "-" if m.kv_cache_gib is None else f"{m.kv_cache_gib:.2f} GiB"
    if m.kv_cache_tokens:
        kv += f" ({m.kv_cache_tokens:,} tokens)"
    return weights, kv


def table(
    results: dict[str, BenchResult],
    plans: Sequence[MethodPlan],
    describe: Callable[[BenchResult], str] | None = None,
) -> str:
    """One row per method that ran (the MQTT path's figures), then the methods that could not."""
    cs = sorted({c for r in results.values() for c in r.concurrencies})
    low, high = (cs[0], cs[-1]) if cs else (1, 1)
    head = (
        "| method | model | weights | KV cache | "
        + " | ".join(f"tok/s c={c}" for c in cs)
        + f" | TTFT p50 s c={low} | p50 s c={low} | p50 s c={high} | peak GPU memory | errors |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for plan in plans:
        r = results.get(plan.method)
        if r is None:
            continue
        weights, kv = _memory(r)
        peak = "; ".join(f"{used / GIB:.1f} GiB" for used in r.gpu_peak.values()) or "-"
        errors = sum(x.errors for x in r.runs)
        lines.append(
            f"| {plan.method} | `{r.stack.get('model')}` | {weights} | {kv} | "
            + " | ".join(_tps(r, c) for c in cs)
            + f" | {_p50(r, low, ttft=True)} | {_p50(r, low)} | {_p50(r, high)} | {peak} | "
            f"{errors}{' (interrupted)' if r.interrupted else ''} |"
        )
    refused = [p for p in plans if p.refused is not None]
    skipped = [p for p in plans if p.refused is None and p.method not in results]
    out = "\n".join(lines) + "\n"
    if refused:
        out += "\nNot run here:\n\n" + "".join(f"- {p.method}: {p.refused}\n" for p in refused)
    if skipped:
        out += (
            "\nNot measured (interrupted before its turn): "
            + ", ".join(p.method for p in skipped)
            + "\n"
        )
    return out

"""Memory fit and candidate profiles (method x tensor-parallel size x KV-cache dtype), best first.

The memory model (docs/facts.md, "VRAM estimate"; vLLM 0.33):
- weights: bf16 16 bits a parameter, fp8 8, awq/gptq (group 128) ~4.16, bitsandbytes nf4 4.5; only
  the linear layers are quantized, embeddings / lm_head / norms stay bf16. A pre-quantized checkpoint
  weighs what its safetensors hold. Split evenly over the tensor-parallel GPUs.
- KV cache per token per GPU: 2 x layers x ceil(kv_heads / TP) x head_dim x bytes (2 for bf16/fp16,
  1 for fp8) -- vllm/v1/kv_cache_interface.py (AttentionSpec.page_size_bytes).
- budget per GPU: total x gpu_memory_utilization (a fraction of TOTAL memory; default 0.92 in 0.33,
  vllm/config/cache.py) minus weights, minus overhead (CUDA context -- 527 MiB measured on an H100,
  tests/data/README.md -- activations and CUDA graphs), the rest is KV cache. vLLM refuses to start when
  one sequence of max_model_len does not fit (vllm/v1/core/kv_cache_utils.py check_enough_kv_cache_memory),
  and when less than utilization x total is free at start (vllm/v1/worker/gpu_worker.py).
Not modelled: MLA attention (DeepSeek), sliding-window layers (over-estimates KV), vision towers,
LoRA, speculative decoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from deploykit.devices import GIB, GpuInfo
from deploykit.errors import DeployKitError, GpuError, UnsupportedError, UsageError
from deploykit.matrix import (
    METHODS,
    VLLM_VERSION,
    Cell,
    GpuClass,
    Quant,
    gpu_class_for,
    parse_quant,
    resolve_target,
)
from deploykit.plan.model import ModelInfo, check_checkpoint, kv_bytes

#: vLLM 0.33's default --gpu-memory-utilization (vllm/config/cache.py; docs/facts.md, "VRAM estimate").
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
#: Per-GPU memory outside weights and KV cache: CUDA context, activation peak, CUDA graphs.
OVERHEAD_GIB = 1.5
#: Extra per GPU when tensor-parallel (NCCL buffers, custom all-reduce).
TP_OVERHEAD_GIB = 0.5
TP_SIZES = (1, 2, 4, 8)
#: Below this many tokens a profile is "does not fit", not "low memory".
MIN_USEFUL_LEN = 256
#: Method preference per GPU class, best first (docs/facts.md, "Measured throughput": FP8 is
#: 1.2-1.6x faster than bf16 at every batch on H100 and H200; 4-bit gains only at small batches;
#: bitsandbytes is slower than bf16).
PREFERENCE: dict[GpuClass, tuple[Quant, ...]] = {
    GpuClass.CUDA_FP8: (Quant.FP8, Quant.NONE, Quant.AWQ, Quant.GPTQ, Quant.BITSANDBYTES),
    GpuClass.CUDA: (Quant.NONE, Quant.AWQ, Quant.GPTQ, Quant.FP8, Quant.BITSANDBYTES),
}

# --- profiles -------------------------------------------------------------------------------------


class Status(StrEnum):
    COMPATIBLE = "compatible"
    LOW_MEMORY = "low_memory"
    INCOMPATIBLE = "incompatible"


@dataclass(frozen=True)
class Profile:
    """One way to serve the model: method x tensor-parallel size x KV-cache dtype, and its fit."""

    quant: Quant
    tensor_parallel_size: int
    kv_cache_dtype: str
    status: Status
    reason: str
    weights_gib: float | None = None  # the whole model
    weights_gib_per_gpu: float | None = None
    kv_gib_per_1k_tokens: float | None = None  # per GPU
    kv_budget_gib_per_gpu: float | None = None
    max_model_len: int | None = None  # what was asked (or the model's maximum)
    max_model_len_fit: int | None = None  # the largest that fits (capped at the model's maximum)
    gpus: tuple[str, ...] = ()  # UUIDs
    vllm_args: tuple[str, ...] = ()
    note: str = ""  # what the matrix says about this method on this GPU class

    def to_json(self) -> dict[str, Any]:
        r = lambda v: None if v is None else round(v, 3)  # noqa: E731
        return {
            "quant": str(self.quant),
            "tensor_parallel_size": self.tensor_parallel_size,
            "kv_cache_dtype": self.kv_cache_dtype,
            "status": str(self.status),
            "reason": self.reason,
            "weights_gib": r(self.weights_gib),
            "weights_gib_per_gpu": r(self.weights_gib_per_gpu),
            "kv_gib_per_1k_tokens": r(self.kv_gib_per_1k_tokens),
            "kv_budget_gib_per_gpu": r(self.kv_budget_gib_per_gpu),
            "max_model_len": self.max_model_len,
            "max_model_len_fit": self.max_model_len_fit,
            "gpus": list(self.gpus),
            "vllm_args": list(self.vllm_args),
            "note": self.note,
        }


@dataclass(frozen=True)
class Plan:
    model: ModelInfo
    gpus: tuple[GpuInfo, ...]
    gpu_memory_utilization: float
    profiles: tuple[Profile, ...]

    @property
    def best(self) -> Profile | None:
        return next((p for p in self.profiles if p.status is not Status.INCOMPATIBLE), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model.to_json(),
            "gpus": [g.to_json() for g in self.gpus],
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "vllm_version": VLLM_VERSION,
            "profiles": [p.to_json() for p in self.profiles],
        }


def gpu_class_of(gpus: Sequence[GpuInfo]) -> GpuClass:
    """The one GPU class of these GPUs; refuses a mix (tensor parallelism needs alike GPUs)."""
    classes = {gpu_class_for(g.compute_capability) for g in gpus}
    if len(classes) > 1:
        raise UnsupportedError(
            "the selected GPUs are of different classes: "
            + "; ".join(f"{g.index} {g.name} (CC {g.compute_capability:.1f})" for g in gpus),
            "select GPUs of one kind with --gpus",
        )
    return classes.pop()


def evaluate(
    model: ModelInfo,
    quant: Quant,
    gpus: Sequence[GpuInfo],
    tp: int,
    kv_dtype: str = "auto",
    max_model_len: int | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    *,
    cell: Cell | None = None,
) -> Profile:
    """Fit one profile on the first ``tp`` of ``gpus``.

    ``cell``: the method already resolved for these GPUs and checked against the checkpoint (what
    the gate has done; ``matrix.for_device``); without it, both happen here.
    """
    wanted = max_model_len or model.max_position_embeddings
    base: dict[str, Any] = {"max_model_len": wanted}
    use = list(gpus[:tp])
    base["gpus"] = tuple(g.uuid for g in use)

    def no(reason: str) -> Profile:
        return Profile(quant, tp, kv_dtype, Status.INCOMPATIBLE, reason, **base)

    if len(use) < tp:
        return no(f"needs {tp} GPUs, {len(gpus)} selected")
    if cell is None:
        try:
            check_checkpoint(quant, model)
            cc = min(g.compute_capability for g in use)
            cell = resolve_target(quant, gpu_class_of(use), cc)
        except DeployKitError as err:
            return no(err.message)
    if model.num_attention_heads % tp or (model.num_kv_heads % tp and tp % model.num_kv_heads):
        return no(
            f"{model.num_attention_heads} attention / {model.num_kv_heads} KV heads do not split over {tp} GPUs"
        )
    if "--kv-cache-dtype" in cell.vllm_args:
        fixed = cell.vllm_args[cell.vllm_args.index("--kv-cache-dtype") + 1]
        if kv_bytes(fixed) != kv_bytes(kv_dtype):
            return no(f"the {cell.image_name} engine sets --kv-cache-dtype {fixed}")
    mig = [g.index for g in use if g.mig_mode]
    if mig:
        return no(f"MIG is enabled on GPU {', '.join(map(str, mig))}; vLLM needs whole GPUs here")

    weights = model.weights_bytes(quant)
    per_gpu = weights / tp
    total = min(g.memory_total for g in use)
    overhead = (OVERHEAD_GIB + (TP_OVERHEAD_GIB if tp > 1 else 0)) * GIB
    budget = total * gpu_memory_utilization - per_gpu - overhead
    kv_token = model.kv_bytes_per_token(tp, kv_dtype)
    fit = max(0, int(budget // kv_token) // 16 * 16) if budget > 0 else 0
    fit = min(fit, model.max_position_embeddings)
    base.update(
        weights_gib=weights / GIB,
        weights_gib_per_gpu=per_gpu / GIB,
        kv_gib_per_1k_tokens=kv_token * 1000 / GIB,
        kv_budget_gib_per_gpu=budget / GIB,
        max_model_len_fit=fit,
    )
    args: list[str] = [*cell.vllm_args]
    if tp > 1:
        args += ["--tensor-parallel-size", str(tp)]
    if kv_dtype != "auto" and "--kv-cache-dtype" not in args:
        args += ["--kv-cache-dtype", kv_dtype]
    short = [g.index for g in use if g.memory_free < gpu_memory_utilization * g.memory_total]
    if short:
        g = next(x for x in use if x.index == short[0])
        most = math.floor(g.memory_free / g.memory_total * 100) / 100
        return no(
            f"GPU {g.index} has {g.memory_free_gib:.1f} of {g.memory_total_gib:.1f} GiB free; vLLM needs "
            f"gpu_memory_utilization x total = {gpu_memory_utilization * g.memory_total_gib:.1f} GiB free "
            f"at start (use --gpu-memory-utilization {most} or free the GPU)"
        )
    need = per_gpu / GIB + overhead / GIB
    if fit < MIN_USEFUL_LEN:
        return no(
            f"does not fit: {need:.1f} GiB per GPU (weights {per_gpu / GIB:.1f} + overhead "
            f"{overhead / GIB:.1f}) before any KV cache, {total * gpu_memory_utilization / GIB:.1f} GiB "
            f"usable ({gpu_memory_utilization} x {total / GIB:.1f} GiB)"
        )
    args += ["--max-model-len", str(min(wanted, fit))]
    if gpu_memory_utilization != DEFAULT_GPU_MEMORY_UTILIZATION:
        args += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    base["vllm_args"] = tuple(args)
    base["note"] = cell.reason
    if fit < wanted:
        return Profile(
            quant,
            tp,
            kv_dtype,
            Status.LOW_MEMORY,
            f"max_model_len {wanted} needs {kv_token * wanted / GIB:.1f} GiB of KV cache per GPU, "
            f"{budget / GIB:.1f} GiB left: use --max-model-len {fit}",
            **base,
        )
    return Profile(
        quant,
        tp,
        kv_dtype,
        Status.COMPATIBLE,
        f"fits: {per_gpu / GIB:.1f} GiB weights per GPU, KV cache for up to {fit} tokens",
        **base,
    )


def _one_row_per_refusal(profiles: list[Profile], *, several_kv: bool) -> list[Profile]:
    """An incompatible method is listed once per reason, not at every TP size and KV dtype; a KV
    dtype the engine overrides (the cuda-fp8 fp8 engine sets fp8) is not listed at all."""
    kept: list[Profile] = []
    seen: set[tuple[object, ...]] = set()
    for p in profiles:
        if p.status is Status.INCOMPATIBLE:
            if several_kv and "sets --kv-cache-dtype" in p.reason:
                continue
            key: tuple[object, ...] = (p.quant, p.reason)
        else:
            key = (p.quant, p.tensor_parallel_size, p.kv_cache_dtype)
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


def make_plan(
    model: ModelInfo,
    gpus: Sequence[GpuInfo],
    *,
    quant: Quant | str | None = None,
    max_model_len: int | None = None,
    kv_cache_dtype: str | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    tensor_parallel_size: int | None = None,
) -> Plan:
    """Every candidate profile for ``model`` on ``gpus``, best first.

    With ``quant``, a checkpoint mismatch raises ModelError (exit 6) instead of listing it.
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise UsageError(f"--gpu-memory-utilization {gpu_memory_utilization} is not in (0, 1]")
    if not gpus:
        raise GpuError("no GPUs to plan for", "select GPUs with --gpus, or pass --gpus-file")
    if quant is not None:
        q = parse_quant(quant)
        resolve_target(q, GpuClass.CUDA)  # refuses removed methods with alternatives
        check_checkpoint(q, model)
        quants = [q]
    else:
        quants = [q for q in Quant if not METHODS[q].removed]
    kv_dtypes = [kv_cache_dtype] if kv_cache_dtype else ["auto", "fp8"]
    for kv in kv_dtypes:
        kv_bytes(kv)
    tps = (
        [tensor_parallel_size]
        if tensor_parallel_size
        else [t for t in TP_SIZES if t <= max(len(gpus), 1)]
    )
    profiles = [
        evaluate(model, q, gpus, tp, kv, max_model_len, gpu_memory_utilization)
        for q in quants
        for tp in tps
        for kv in kv_dtypes
    ]
    kept = _one_row_per_refusal(profiles, several_kv=len(kv_dtypes) > 1)
    try:
        order = PREFERENCE[gpu_class_of(gpus)]
    except DeployKitError:
        order = tuple(quants)
    status_rank = {Status.COMPATIBLE: 0, Status.LOW_MEMORY: 1, Status.INCOMPATIBLE: 2}

    def rank(p: Profile) -> tuple[int, int, int, int, int]:
        return (
            status_rank[p.status],
            order.index(p.quant) if p.quant in order else len(order),
            p.tensor_parallel_size,
            0 if p.kv_cache_dtype == "auto" else 1,
            -(p.max_model_len_fit or 0),
        )

    return Plan(model, tuple(gpus), gpu_memory_utilization, tuple(sorted(kept, key=rank)))

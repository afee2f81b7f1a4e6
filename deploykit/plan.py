"""Will this model run with this method on these GPUs? Checkpoint detection, memory fit, profiles, gate.

Pure: reads a model directory (config.json, hf_quant_config.json, safetensors headers; never weights)
and takes the GPUs as :class:`deploykit.devices.GpuInfo` records, so recorded NVML output drives it in
tests. ``make_plan`` lists candidate profiles (method x tensor-parallel size x KV-cache dtype) as
compatible / low memory / incompatible, best first; ``gate`` is what ``deploykit up``/``build`` call to
refuse what cannot work (the caller passes ``force`` to turn refusals into warnings).

The memory model (FACTS.md "VRAM estimate", vLLM 0.33):
- weights: bf16 16 bits a parameter, fp8 8, awq/gptq (group 128) ~4.16, bitsandbytes nf4 ~4.13; only
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

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from deploykit.devices import GIB, DriverInfo, GpuInfo
from deploykit.errors import DeployKitError, GpuError, ModelError, UnsupportedError, UsageError
from deploykit.matrix import (
    METHODS,
    VLLM_IMAGE,
    VLLM_IMAGE_CU129_SUFFIX,
    VLLM_IMAGE_CUDA,
    VLLM_VERSION,
    Checkpoint,
    GpuClass,
    Quant,
    gpu_class_for,
    parse_quant,
    resolve_target,
)

#: vLLM 0.33's default --gpu-memory-utilization (vllm/config/cache.py; FACTS.md).
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
#: Per-GPU memory outside weights and KV cache: CUDA context, activation peak, CUDA graphs.
OVERHEAD_GIB = 1.5
#: Extra per GPU when tensor-parallel (NCCL buffers, custom all-reduce).
TP_OVERHEAD_GIB = 0.5
#: Bits a parameter of a quantized linear layer takes, scales and zero points included.
BITS_PER_PARAM: dict[Quant, float] = {
    Quant.NONE: 16.0,
    Quant.FP8: 8.0,
    Quant.AWQ: 4.16,
    Quant.GPTQ: 4.16,
    Quant.BITSANDBYTES: 4.13,
}
KV_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
TP_SIZES = (1, 2, 4, 8)
#: Below this many tokens a profile is "does not fit", not "low memory".
MIN_USEFUL_LEN = 256
#: Method preference per GPU class, best first (FACTS.md measurements: FP8 is 1.3-1.6x faster than
#: bf16 on H100 at every batch; 4-bit gains only at small batches; bitsandbytes is slower than bf16).
PREFERENCE: dict[GpuClass, tuple[Quant, ...]] = {
    GpuClass.CUDA_FP8: (Quant.FP8, Quant.NONE, Quant.AWQ, Quant.GPTQ, Quant.BITSANDBYTES),
    GpuClass.CUDA: (Quant.NONE, Quant.AWQ, Quant.GPTQ, Quant.FP8, Quant.BITSANDBYTES),
}


# --- the checkpoint -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointQuant:
    """How a checkpoint is quantized, as its files say."""

    quant_method: (
        str | None
    )  # raw value ("awq", "compressed-tensors", "modelopt"); None: unquantized
    method: Quant | None  # the deploykit method that serves it; None when unquantized or unknown
    description: str  # "AWQ 4-bit, group 128" / "unquantized bfloat16"
    bits: int | None = None
    group_size: int | None = None

    @property
    def quantized(self) -> bool:
        return self.quant_method is not None


@dataclass(frozen=True)
class ModelInfo:
    """What plan needs from a model directory."""

    path: str
    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype: str
    checkpoint: CheckpointQuant
    linear_params: int  # parameters of the quantizable linear layers
    other_params: int  # embeddings, lm_head, norms, biases
    safetensors_bytes: int | None = None  # sum of the tensors' sizes, when safetensors are present

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def kv_bytes_per_token(self, tp: int = 1, kv_dtype: str = "auto") -> int:
        """KV cache bytes one token takes on each GPU: 2 x layers x ceil(kv_heads/TP) x head_dim x bytes."""
        return (
            2
            * self.num_layers
            * math.ceil(self.num_kv_heads / tp)
            * self.head_dim
            * kv_bytes(kv_dtype)
        )

    def weights_bytes(self, quant: Quant) -> int:
        """Weight memory of the whole model served with ``quant`` (all GPUs together)."""
        if self.checkpoint.quantized:
            if self.safetensors_bytes:
                return self.safetensors_bytes
            bits = BITS_PER_PARAM.get(self.checkpoint.method or quant, 16.0)
            if self.checkpoint.bits and self.checkpoint.group_size:
                bits = self.checkpoint.bits + 20 / self.checkpoint.group_size
            return int(self.linear_params * bits / 8 + self.other_params * 2)
        return int(self.linear_params * BITS_PER_PARAM[quant] / 8 + self.other_params * 2)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "dtype": self.dtype,
            "params": self.params,
            "checkpoint": {
                "quantized": self.checkpoint.quantized,
                "quant_method": self.checkpoint.quant_method,
                "method": str(self.checkpoint.method) if self.checkpoint.method else None,
                "description": self.checkpoint.description,
            },
            "safetensors_bytes": self.safetensors_bytes,
        }


def parse_length(text: str | int | None) -> int | None:
    """A --max-model-len as vLLM reads it: ``32768``, ``32k`` (x1000), ``32K`` (x1024), ``auto`` (None).

    Same rules as vLLM's ``human_readable_int`` (vllm/engine/arg_utils.py).
    """
    if text is None or isinstance(text, int):
        return text
    raw = text.strip()
    if raw.lower() in ("", "auto", "-1"):
        return None
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
    try:
        value = int(float(raw[:-1]) * units[raw[-1]]) if raw[-1] in units else int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"--max-model-len {text!r} is not a length", "e.g. 8192, 32k or 32K")
    return value


def kv_bytes(kv_dtype: str) -> int:
    try:
        return KV_BYTES[kv_dtype]
    except KeyError:
        raise UsageError(
            f"unknown --kv-cache-dtype {kv_dtype!r}", f"choose one of: {', '.join(KV_BYTES)}"
        ) from None


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def detect_checkpoint_quant(
    config: dict[str, Any], hf_quant_config: dict[str, Any] | None
) -> CheckpointQuant:
    """Read how a checkpoint is quantized: quantization_config / compression_config / hf_quant_config.json."""
    qc = config.get("quantization_config") or config.get("compression_config")
    if isinstance(qc, dict):
        raw = str(
            qc.get("quant_method")
            or ("compressed-tensors" if "compression_config" in config else "")
        ).lower()
        bits, group = qc.get("bits"), qc.get("group_size")
        if raw == "compressed-tensors" or (not raw and "config_groups" in qc):
            return _compressed_tensors(qc)
        if raw == "modelopt":
            algo = str(qc.get("quant_algo", "")).upper()
            return _modelopt(algo)
        for method in Quant:
            if raw in METHODS[method].checkpoint_quant_methods:
                detail = f"{method.value.upper()} {bits}-bit" if bits else method.value.upper()
                if group:
                    detail += f", group {group}"
                if method is Quant.BITSANDBYTES:
                    detail = "bitsandbytes " + ("4-bit" if qc.get("load_in_4bit") else "8-bit")
                return CheckpointQuant(raw, method, detail, bits, group)
        return CheckpointQuant(
            raw or "unknown", None, f"quantized with {raw or 'an unnamed method'!r}"
        )
    if hf_quant_config:
        algo = str((hf_quant_config.get("quantization") or {}).get("quant_algo", "")).upper()
        return _modelopt(algo)
    dtype = str(_first(config, "torch_dtype", "dtype", default="bfloat16"))
    return CheckpointQuant(None, None, f"unquantized {dtype}")


def _compressed_tensors(qc: dict[str, Any]) -> CheckpointQuant:
    weights = [
        g.get("weights") or {}
        for g in (qc.get("config_groups") or {}).values()
        if isinstance(g, dict)
    ]
    w = weights[0] if weights else {}
    bits, kind = w.get("num_bits"), str(w.get("type", "")).lower()
    if bits == 8 and kind == "float":
        return CheckpointQuant("compressed-tensors", Quant.FP8, "FP8 (compressed-tensors)", 8)
    desc = f"compressed-tensors {kind or '?'} {bits or '?'}-bit"
    return CheckpointQuant("compressed-tensors", None, desc, bits, w.get("group_size"))


def _modelopt(algo: str) -> CheckpointQuant:
    if algo.startswith("FP8"):
        return CheckpointQuant("modelopt", Quant.FP8, f"FP8 (NVIDIA ModelOpt, {algo})", 8)
    return CheckpointQuant("modelopt", None, f"NVIDIA ModelOpt {algo or '?'}")


def _estimate_params(cfg: dict[str, Any]) -> tuple[int, int]:
    """(linear, other) parameters of a decoder-only transformer, from its config."""
    hidden = int(_first(cfg, "hidden_size", "n_embd", "d_model"))
    layers = int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_first(cfg, "num_attention_heads", "n_head"))
    kv_heads = int(_first(cfg, "num_key_value_heads", "multi_query_group_num", default=heads))
    head_dim = int(_first(cfg, "head_dim", default=hidden // heads))
    inter = int(_first(cfg, "intermediate_size", "ffn_hidden_size", "n_inner", default=4 * hidden))
    vocab = int(_first(cfg, "vocab_size", default=32000))
    experts = int(_first(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0))
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    if experts:
        expert_inter = int(_first(cfg, "moe_intermediate_size", default=inter))
        mlp = 3 * hidden * expert_inter * experts + hidden * experts  # + router
        shared = int(_first(cfg, "shared_expert_intermediate_size", default=0))
        mlp += 3 * hidden * shared
    else:
        mlp = 3 * hidden * inter  # gated (SwiGLU) MLP: gate, up, down
    linear = layers * (attn + mlp)
    tied = bool(cfg.get("tie_word_embeddings", False))
    other = vocab * hidden * (1 if tied else 2) + layers * 2 * hidden + hidden
    return linear, other


_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def read_safetensors_headers(model_dir: Path) -> tuple[int, int, int] | None:
    """(bytes, linear params, other params) from the safetensors headers; None when there are none.

    Reads only each file's JSON header (8-byte length + JSON), never the tensors.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = linear = other = 0
    for path in files:
        try:
            with path.open("rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (OSError, struct.error, ValueError) as err:
            raise ModelError(
                f"cannot read the safetensors header of {path}: {err}", "is the download complete?"
            ) from None
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            total += end - start
            numel = math.prod(meta["shape"]) if meta["shape"] else 1
            is_linear = len(meta["shape"]) == 2 and not any(
                k in name for k in ("embed", "lm_head", "wte", "wpe", "norm")
            )
            if is_linear:
                linear += numel
            else:
                other += numel
    return total, linear, other


def read_model(path: str | Path) -> ModelInfo:
    """Read a local model directory (config.json; hf_quant_config.json and safetensors when present)."""
    model_dir = Path(path)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(
            f"{model_dir} has no config.json",
            "give the local directory of a Hugging Face model (e.g. `hf download ORG/NAME --local-dir DIR`)",
        )
    try:
        config = json.loads(config_path.read_text())
        hf_quant_path = model_dir / "hf_quant_config.json"
        hf_quant = json.loads(hf_quant_path.read_text()) if hf_quant_path.is_file() else None
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the model config in {model_dir}: {err}") from None
    cfg = (
        {**config, **config["text_config"]}
        if isinstance(config.get("text_config"), dict)
        else config
    )
    try:
        hidden = int(_first(cfg, "hidden_size", "n_embd", "d_model"))
        heads = int(_first(cfg, "num_attention_heads", "n_head"))
        layers = int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers"))
        linear, other = _estimate_params(cfg)
    except (TypeError, ValueError) as err:
        raise ModelError(
            f"{config_path} does not describe a decoder-only transformer deploykit can size ({err})",
            "it needs hidden_size, num_attention_heads and num_hidden_layers",
        ) from None
    checkpoint = detect_checkpoint_quant(config, hf_quant)
    sizes = read_safetensors_headers(model_dir)
    st_bytes = None
    if sizes:
        st_bytes, st_linear, st_other = sizes
        if not checkpoint.quantized:  # exact parameter counts; quantized tensors are packed
            linear, other = st_linear, st_other
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return ModelInfo(
        path=str(model_dir),
        architecture=str(archs[0]),
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=int(
            _first(cfg, "num_key_value_heads", "multi_query_group_num", default=heads)
        ),
        head_dim=int(_first(cfg, "head_dim", default=hidden // heads)),
        hidden_size=hidden,
        vocab_size=int(_first(cfg, "vocab_size", default=0)),
        max_position_embeddings=int(
            _first(cfg, "max_position_embeddings", "n_positions", "seq_length", default=2048)
        ),
        dtype=str(_first(cfg, "torch_dtype", "dtype", default="bfloat16")),
        checkpoint=checkpoint,
        linear_params=linear,
        other_params=other,
        safetensors_bytes=st_bytes,
    )


def methods_for_checkpoint(checkpoint: CheckpointQuant) -> list[Quant]:
    """deploykit methods that can serve this checkpoint (matrix: Checkpoint kinds, quant methods)."""
    if not checkpoint.quantized:
        return [
            q
            for q in Quant
            if not METHODS[q].removed and METHODS[q].checkpoint is not Checkpoint.PREQUANTIZED
        ]
    return [checkpoint.method] if checkpoint.method else []


def check_checkpoint(quant: Quant, model: ModelInfo) -> None:
    """Raise ModelError (exit 6) when ``quant`` cannot serve this checkpoint, naming what fits."""
    fits = methods_for_checkpoint(model.checkpoint)
    if quant in fits:
        return
    what = model.checkpoint.description
    if METHODS[quant].checkpoint is Checkpoint.PREQUANTIZED and not model.checkpoint.quantized:
        need = " or ".join(METHODS[quant].checkpoint_quant_methods)
        why = (
            f"--quant {quant} needs a pre-quantized {quant.value.upper()} checkpoint "
            f"(config.json quantization_config.quant_method: {need}), but {model.path} is {what}"
        )
    elif model.checkpoint.quantized:
        why = (
            f"--quant {quant} does not match the checkpoint: {model.path} is already quantized "
            f"({what}); vLLM would refuse it or ignore the flag"
        )
    else:  # pragma: no cover - every unquantized mismatch is a PREQUANTIZED method
        why = f"--quant {quant} cannot serve {what}"
    hint = (
        f"methods that fit this checkpoint: {', '.join(q.value for q in fits)}"
        if fits
        else "deploykit has no method for this checkpoint's quantization; use an unquantized, AWQ, "
        "GPTQ or FP8 checkpoint"
    )
    if quant in (Quant.AWQ, Quant.GPTQ) and not model.checkpoint.quantized:
        hint += f"; or use a pre-quantized {quant.value.upper()} model of it"
    raise ModelError(why, hint)


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


def _gpu_class(gpus: Sequence[GpuInfo]) -> GpuClass:
    classes = {gpu_class_for(g.compute_capability) for g in gpus}
    if len(classes) > 1:
        raise UnsupportedError(
            "the selected GPUs are of different classes: "
            + "; ".join(f"{g.index} {g.name} (CC {g.compute_capability:g})" for g in gpus),
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
) -> Profile:
    """Fit one profile on the first ``tp`` of ``gpus``."""
    wanted = max_model_len or model.max_position_embeddings
    base: dict[str, Any] = {"max_model_len": wanted}
    use = list(gpus[:tp])
    base["gpus"] = tuple(g.uuid for g in use)

    def no(reason: str) -> Profile:
        return Profile(quant, tp, kv_dtype, Status.INCOMPATIBLE, reason, **base)

    if len(use) < tp:
        return no(f"needs {tp} GPUs, {len(gpus)} selected")
    try:
        check_checkpoint(quant, model)
        cc = min(g.compute_capability for g in use)
        cell = resolve_target(quant, _gpu_class(use), cc)
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
    # Drop fp8-KV duplicates of engines that fix the KV dtype, and KV variants of impossible methods.
    seen: set[tuple[Quant, int, str]] = set()
    kept = []
    for p in profiles:
        key = (
            (p.quant, 0, p.reason)  # one line per reason: the same refusal at every TP / KV dtype
            if p.status is Status.INCOMPATIBLE and "GPUs" not in p.reason
            else (
                p.quant,
                p.tensor_parallel_size,
                p.kv_cache_dtype + p.reason * (p.status is Status.INCOMPATIBLE),
            )
        )
        if (
            p.status is Status.INCOMPATIBLE
            and "sets --kv-cache-dtype" in p.reason
            and len(kv_dtypes) > 1
        ):
            continue
        if key not in seen:
            seen.add(key)
            kept.append(p)
    try:
        order = PREFERENCE[_gpu_class(gpus)]
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


# --- the gate (up / build) ------------------------------------------------------------------------


@dataclass
class GateResult:
    """What the gate found. ``problems`` are refusals; with ``force`` they come back as warnings."""

    problems: list[DeployKitError] = field(default_factory=list)
    profile: Profile | None = None
    forced: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def warnings(self) -> list[str]:
        return [p.message for p in self.problems] if self.forced else []


def check_driver(driver: DriverInfo) -> DeployKitError | None:
    """The pinned image's CUDA needs a new enough driver (CUDA 13.0 -> R580+)."""
    if driver.supports_cuda(VLLM_IMAGE_CUDA):
        return None
    return GpuError(
        f"driver {driver.driver_version} supports CUDA {driver.cuda_version}, but "
        f"{VLLM_IMAGE}:v{VLLM_VERSION} is built for CUDA {VLLM_IMAGE_CUDA} (driver R580 or newer)",
        f"upgrade the driver to R580+, or use the {VLLM_IMAGE}:v{VLLM_VERSION}{VLLM_IMAGE_CU129_SUFFIX} "
        "image (CUDA 12.9)",
    )


def gate(
    quant: Quant | str,
    *,
    gpu_class: GpuClass | str | None = None,
    gpus: Sequence[GpuInfo] = (),
    driver: DriverInfo | None = None,
    model: ModelInfo | str | Path | None = None,
    max_model_len: int | None = None,
    kv_cache_dtype: str | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    tensor_parallel_size: int | None = None,
    force: bool = False,
) -> GateResult:
    """Refuse what cannot work before anything is built or started; ``force`` turns refusals into warnings.

    Checks what it is given: the method on the GPUs' compute capability and class (``gpu_class`` is the
    image's class; default: the GPUs' own), MIG, the driver against the image's CUDA, the checkpoint
    against the method, and the memory fit at ``max_model_len`` (default: the model's maximum) with
    ``tensor_parallel_size`` (default: all selected GPUs). Without GPUs (building for another host,
    or the cpu class) only the method/class and the checkpoint are checked.

    Raises the first refusal (others appended) unless ``force``; returns the result either way.
    """
    result = GateResult(forced=force)
    q = parse_quant(quant)
    try:
        cls = (
            GpuClass(str(gpu_class)) if gpu_class else (_gpu_class(gpus) if gpus else GpuClass.CUDA)
        )
        resolve_target(q, cls)
        if gpus and cls is not GpuClass.CPU:
            for g in gpus:
                actual = gpu_class_for(g.compute_capability)
                if actual is not cls:
                    raise UnsupportedError(
                        f"GPU {g.index} ({g.name}, CC {g.compute_capability:g}) is class {actual}, "
                        f"not {cls}",
                        f"use --gpu-class {actual} for this GPU",
                    )
                resolve_target(q, cls, g.compute_capability)
    except DeployKitError as err:
        result.problems.append(err)
        cls = None
    on_gpu = bool(gpus) and cls is not GpuClass.CPU
    if on_gpu and driver is not None:
        problem = check_driver(driver)
        if problem:
            result.problems.append(problem)
    if on_gpu:
        mig = [g for g in gpus if g.mig_mode]
        if mig:
            result.problems.append(
                GpuError(
                    f"MIG is enabled on GPU {', '.join(str(g.index) for g in mig)}",
                    "disable MIG (nvidia-smi -mig 0) or select other GPUs",
                )
            )
    info = read_model(model) if isinstance(model, str | Path) else model
    if info is not None:
        try:
            check_checkpoint(q, info)
        except ModelError as err:
            result.problems.append(err)
        else:
            if on_gpu and cls is not None and not any(g.mig_mode for g in gpus):
                tp = tensor_parallel_size or len(gpus)
                kv = kv_cache_dtype or _engine_kv(q, cls)
                p = evaluate(info, q, gpus, tp, kv, max_model_len, gpu_memory_utilization)
                result.profile = p
                if p.status is not Status.COMPATIBLE:
                    hint = (
                        f"use --max-model-len {p.max_model_len_fit}"
                        if p.status is Status.LOW_MEMORY
                        else "run `deploykit plan` for the profiles that fit"
                    )
                    result.problems.append(
                        ModelError(
                            f"{q} with tensor-parallel {tp} on GPU {', '.join(str(g.index) for g in gpus[:tp])}: "
                            f"{p.reason}",
                            hint,
                        )
                    )
    if result.problems and not force:
        first = result.problems[0]
        if len(result.problems) > 1:
            first.message += "; also: " + "; ".join(p.message for p in result.problems[1:])
        raise first
    return result


def _engine_kv(quant: Quant, gpu_class: GpuClass) -> str:
    cell = resolve_target(quant, gpu_class)
    if "--kv-cache-dtype" in cell.vllm_args:
        return cell.vllm_args[cell.vllm_args.index("--kv-cache-dtype") + 1]
    return "auto"

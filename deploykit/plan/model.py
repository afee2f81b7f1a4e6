"""A model directory as plan sees it: architecture, parameters, and how the checkpoint is quantized.

Reads config.json and hf_quant_config.json (ModelOpt) and the safetensors headers (never the weights).
How the checkpoint is quantized, and which methods serve it, is ``deploykit.checkpoint``'s to say (the
engine images' start-up guard runs the same module); ``check_checkpoint`` refuses a method that does
not match the checkpoint, naming what the checkpoint is and which methods fit it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deploykit import checkpoint as ckpt
from deploykit.checkpoint import CheckpointQuant
from deploykit.errors import ModelError, UsageError
from deploykit.matrix import (
    METHODS,
    Checkpoint,
    Quant,
    methods_serving,
)

#: Bits a parameter of a quantized linear layer takes, scales and zero points included.
BITS_PER_PARAM: dict[Quant, float] = {
    Quant.NONE: 16.0,
    Quant.FP8: 8.0,
    Quant.AWQ: 4.16,
    Quant.GPTQ: 4.16,
    # vLLM's in-flight NF4: blocks of 64 weights, each with a float32 absmax (4 + 32/64 bits);
    # vLLM 0.24 with bitsandbytes 0.50.2 loaded an 8B shape's linear layers at 4.51 bits on an H200
    # (tests/data/estimator_h200.json)
    Quant.BITSANDBYTES: 4.5,
}
#: Bytes a KV-cache element takes per --kv-cache-dtype ("auto": the model's bf16/fp16).
KV_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


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
            method = Quant(self.checkpoint.method) if self.checkpoint.method else quant
            bits = BITS_PER_PARAM.get(method, 16.0)
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
    """How a checkpoint is quantized (``deploykit.checkpoint``: the rules the engine images' start-up
    guard runs too), with the method that serves it as a :class:`Quant`."""
    found = ckpt.detect(config, hf_quant_config)
    return replace(found, method=Quant(found.method)) if found.method else found


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
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot read {index}: {err}") from None
        missing = sorted(s for s in shards if not (model_dir / s).is_file())
        if missing:
            raise ModelError(
                f"{model_dir} is incomplete: {len(missing)} of {len(shards)} safetensors shards are "
                f"missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})",
                "finish the download (`hf download ORG/NAME --local-dir DIR` resumes)",
            )
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
    download = "e.g. `hf download ORG/NAME --local-dir DIR`, then --model DIR"
    if not model_dir.exists():
        raise UsageError(
            f"the model folder {model_dir} does not exist",
            f"give the local folder of a Hugging Face model ({download})",
        )
    if not model_dir.is_dir():
        raise UsageError(
            f"--model {model_dir} is a file, not a model folder",
            f"give the folder that holds config.json and the safetensors ({download})",
        )
    if not config_path.is_file():
        raise UsageError(
            f"{model_dir} is not a model folder: it has no config.json",
            f"give the local folder of a Hugging Face model ({download})",
        )
    try:
        config, hf_quant = ckpt.read_configs(model_dir)
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
    """deploykit methods that can serve this checkpoint (``deploykit.checkpoint.serves``)."""
    return methods_serving(checkpoint)


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

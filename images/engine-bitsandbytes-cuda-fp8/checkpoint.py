"""How a checkpoint is quantized, as its files say, and which deploykit method serves it.

Standard library only, importing nothing from deploykit: ``deploykit.plan`` imports this module, and
``deploykit render`` copies this very file into every engine image's build folder, where the start-up
guard (``deploykit/guard.py``, copied beside it) imports it. The pre-flight plan and the guard in the
image decide alike by construction.

The rules follow vLLM (docs/facts.md, "Pre-quantized checkpoints"): ``config.json`` ->
``quantization_config``, else ``compression_config`` (older compressed-tensors checkpoints), else
``hf_quant_config.json`` (ModelOpt 0.29 and older); ``quant_method`` names the format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
MODELOPT_FILE = "hf_quant_config.json"

COMPRESSED_TENSORS = "compressed-tensors"
MODELOPT = "modelopt"
#: ``quant_method`` of a quantization config that names no format deploykit can tell.
UNNAMED = "unknown"
#: ``quantization_config.quant_method`` of a pre-quantized checkpoint -> the deploykit method that
#: serves it. ``awq_marlin`` and ``gptq_marlin`` are vLLM's names of the same formats.
QUANT_METHODS: dict[str, str] = {
    "fp8": "fp8",
    "awq": "awq",
    "awq_marlin": "awq",
    "gptq": "gptq",
    "gptq_marlin": "gptq",
    "bitsandbytes": "bitsandbytes",
}
#: The deploykit methods that serve a pre-quantized checkpoint.
SERVED_METHODS: tuple[str, ...] = tuple(dict.fromkeys(QUANT_METHODS.values()))
#: The deploykit method of FP8 checkpoints in the compressed-tensors and ModelOpt formats.
FP8_METHOD = "fp8"
_FORMAT_NAMES = {COMPRESSED_TENSORS: "compressed-tensors", MODELOPT: "NVIDIA ModelOpt"}


@dataclass(frozen=True)
class CheckpointQuant:
    """How a checkpoint is quantized, as its files say."""

    #: The format's name (``awq``, ``compressed-tensors``, ``modelopt``); None: unquantized.
    quant_method: str | None
    #: The deploykit method that serves it; None when unquantized, or when no method does.
    method: str | None
    #: The scheme within the format: ``AWQ 4-bit, group 128``, ``FP8``, ``int 4-bit``; "" unknown.
    scheme: str = ""
    bits: int | None = None
    group_size: int | None = None
    #: The weights' dtype an unquantized checkpoint declares (``torch_dtype``).
    dtype: str = "bfloat16"

    @property
    def quantized(self) -> bool:
        return self.quant_method is not None

    @property
    def format_name(self) -> str:
        """The format as a phrase: ``awq``, ``compressed-tensors``, ``an unnamed method``."""
        if self.quant_method == UNNAMED:
            return "an unnamed method"
        return self.quant_method or "none"

    @property
    def description(self) -> str:
        """``AWQ 4-bit, group 128``, ``FP8 (compressed-tensors)``, ``unquantized bfloat16``."""
        if self.quant_method is None:
            return f"unquantized {self.dtype}"
        if self.quant_method in _FORMAT_NAMES:
            return f"{self.scheme or '?'} ({_FORMAT_NAMES[self.quant_method]})"
        if self.method is None:
            named = self.quant_method != UNNAMED
            return (
                f"quantized with {self.format_name!r}"
                if named
                else "quantized with an unnamed method"
            )
        return self.scheme


def quant_methods_of(method: str) -> tuple[str, ...]:
    """The ``quant_method`` values of the pre-quantized checkpoints ``method`` serves."""
    return tuple(raw for raw, served in QUANT_METHODS.items() if served == method)


def serves(method: str, found: CheckpointQuant, *, needs_prequantized: bool) -> bool:
    """Whether ``method`` can serve this checkpoint: a quantized one only by the method of its
    format; an unquantized one by every method that does not need a pre-quantized checkpoint."""
    if found.quantized:
        return found.method == method
    return not needs_prequantized


def detect(config: Mapping[str, Any], hf_quant_config: Mapping[str, Any] | None) -> CheckpointQuant:
    """How a checkpoint is quantized, from its ``config.json`` and ``hf_quant_config.json``."""
    qc = config.get("quantization_config") or config.get("compression_config")
    if isinstance(qc, Mapping):
        raw = (
            str(qc.get("quant_method") or "")
            .lower()
            .replace("compressed_tensors", COMPRESSED_TENSORS)
        )
        if raw == COMPRESSED_TENSORS or (
            not raw and ("compression_config" in config or "config_groups" in qc)
        ):
            return _compressed_tensors(qc)
        if raw == MODELOPT:
            return _modelopt(qc.get("quant_algo"))
        if not raw and _is_modelopt(qc):  # the hf_quant_config.json layout inside config.json
            return _modelopt((qc.get("quantization") or {}).get("quant_algo"))
        if not raw:
            return CheckpointQuant(UNNAMED, None)
        method = QUANT_METHODS.get(raw)
        bits, group = _int(qc.get("bits")), _int(qc.get("group_size"))
        scheme = (method or raw).upper() + (f" {bits}-bit" if bits else "")
        if method == "bitsandbytes":
            scheme = "bitsandbytes " + ("4-bit" if qc.get("load_in_4bit") else "8-bit")
        elif group:
            scheme += f", group {group}"
        return CheckpointQuant(raw, method, scheme, bits, group)
    if isinstance(hf_quant_config, Mapping):
        return _modelopt((hf_quant_config.get("quantization") or {}).get("quant_algo"))
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return CheckpointQuant(None, None, dtype=str(dtype))


def read_configs(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``config.json`` and, when present, ``hf_quant_config.json`` of a checkpoint folder.

    Raises OSError when ``config.json`` cannot be read and ValueError when a file is not JSON.
    """
    root = Path(folder)
    config = json.loads((root / CONFIG_FILE).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{root / CONFIG_FILE} is not a JSON object")
    modelopt = root / MODELOPT_FILE
    hf_quant = json.loads(modelopt.read_text()) if modelopt.is_file() else None
    return config, hf_quant if isinstance(hf_quant, dict) else None


def _compressed_tensors(qc: Mapping[str, Any]) -> CheckpointQuant:
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, Mapping)]
    weights = (groups[0].get("weights") or {}) if groups else {}
    bits, kind = _int(weights.get("num_bits")), str(weights.get("type") or "").lower()
    if bits == 8 and kind == "float":
        return CheckpointQuant(COMPRESSED_TENSORS, FP8_METHOD, "FP8", 8)
    scheme = f"{kind or '?'} {bits or '?'}-bit" if groups else "no quantization scheme"
    return CheckpointQuant(COMPRESSED_TENSORS, None, scheme, bits, _int(weights.get("group_size")))


def _is_modelopt(qc: Mapping[str, Any]) -> bool:
    producer = qc.get("producer")
    return isinstance(producer, Mapping) and producer.get("name") == MODELOPT


def _modelopt(algo: object) -> CheckpointQuant:
    name = str(algo or "").upper()
    if name.startswith("FP8"):
        return CheckpointQuant(MODELOPT, FP8_METHOD, name, 8)
    return CheckpointQuant(MODELOPT, None, name)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None

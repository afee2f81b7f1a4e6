"""Will this model run with this method on these GPUs? Checkpoint detection, memory fit, profiles, gate.

Pure: reads a model directory (config.json, hf_quant_config.json, safetensors headers; never weights)
and takes the GPUs as :class:`deploykit.devices.GpuInfo` records, so recorded NVML output drives it in
tests. ``make_plan`` lists candidate profiles (method x tensor-parallel size x KV-cache dtype) as
compatible / low memory / incompatible, best first; ``gate`` is what ``deploykit up``/``build`` call to
refuse what cannot work (the caller passes ``force`` to turn refusals into warnings).

Pure throughout: tests drive it with recorded NVML output (tests/data) and configs written into them.
``model`` reads the checkpoint, ``fit`` sizes profiles, ``gate`` refuses what cannot work.
"""

from __future__ import annotations

from deploykit.plan.fit import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    OVERHEAD_GIB,
    PREFERENCE,
    TP_OVERHEAD_GIB,
    Plan,
    Profile,
    Status,
    evaluate,
    make_plan,
)
from deploykit.plan.gate import GateResult, check_driver, gate
from deploykit.plan.model import (
    BITS_PER_PARAM,
    KV_BYTES,
    CheckpointQuant,
    ModelInfo,
    check_checkpoint,
    detect_checkpoint_quant,
    kv_bytes,
    methods_for_checkpoint,
    parse_length,
    read_model,
    read_safetensors_headers,
)

__all__ = [
    "BITS_PER_PARAM",
    "DEFAULT_GPU_MEMORY_UTILIZATION",
    "KV_BYTES",
    "OVERHEAD_GIB",
    "PREFERENCE",
    "TP_OVERHEAD_GIB",
    "CheckpointQuant",
    "GateResult",
    "ModelInfo",
    "Plan",
    "Profile",
    "Status",
    "check_checkpoint",
    "check_driver",
    "detect_checkpoint_quant",
    "evaluate",
    "gate",
    "kv_bytes",
    "make_plan",
    "methods_for_checkpoint",
    "parse_length",
    "read_model",
    "read_safetensors_headers",
]

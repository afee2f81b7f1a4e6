"""Fixtures for the pre-flight tests: real architectures' config.json files (configs only, no weights)
and the GPU inventories under tests/data (one recorded on a real H100, the others written by hand)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploykit.devices import GpuInventory, load_inventory

DATA = Path(__file__).resolve().parent.parent / "data"

# Qwen/Qwen2.5-32B-Instruct config.json (as published on the Hugging Face Hub).
QWEN25_32B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 27648,
    "max_position_embeddings": 32768,
    "max_window_layers": 70,
    "model_type": "qwen2",
    "num_attention_heads": 40,
    "num_hidden_layers": 64,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

# meta-llama/Meta-Llama-3-8B-Instruct config.json.
LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

# Qwen/Qwen2.5-7B-Instruct-AWQ config.json (its safetensors are 5.58 GB on the Hub).
QWEN25_7B_AWQ: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "quantization_config": {
        "bits": 4,
        "group_size": 128,
        "modules_to_not_convert": None,
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    },
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.41.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

# Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4: the AWQ config with GPTQ's quantization_config.
QWEN25_7B_GPTQ: dict[str, Any] = {
    **QWEN25_7B_AWQ,
    "quantization_config": {
        "bits": 4,
        "damp_percent": 0.01,
        "desc_act": False,
        "group_size": 128,
        "modules_in_block_to_quantize": None,
        "quant_method": "gptq",
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
    },
}

# An FP8 checkpoint in compressed-tensors format (llm-compressor's FP8_DYNAMIC scheme).
LLAMA3_8B_FP8_CT: dict[str, Any] = {
    **LLAMA3_8B,
    "quantization_config": {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
            }
        },
        "ignore": ["lm_head"],
    },
}

# Qwen/Qwen2.5-7B-Instruct (unquantized), for the in-memory plans.
QWEN25_7B: dict[str, Any] = {
    k: v for k, v in QWEN25_7B_AWQ.items() if k != "quantization_config"
} | {"torch_dtype": "bfloat16"}


def write_model(
    root: Path,
    config: dict[str, Any],
    *,
    hf_quant_config: dict[str, Any] | None = None,
    tensors: dict[str, tuple[str, list[int]]] | None = None,
) -> Path:
    """A model directory: config.json, optional hf_quant_config.json, optional safetensors whose
    header describes ``tensors`` (name -> (dtype, shape)); the data section is left empty."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    if hf_quant_config is not None:
        (root / "hf_quant_config.json").write_text(json.dumps(hf_quant_config))
    if tensors:
        size = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "F8_E4M3": 1}
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, (dtype, shape) in tensors.items():
            n = size[dtype]
            for d in shape:
                n *= d
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header).encode()
        (root / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return root


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(config: dict[str, Any], **kwargs: Any) -> Path:
        return write_model(tmp_path / f"model{next(counter)}", config, **kwargs)

    return make


@pytest.fixture(scope="session")
def h100() -> GpuInventory:
    """Recorded on a real H100 (tests/data/README.md)."""
    return load_inventory(DATA / "h100-nvml.json")


@pytest.fixture(scope="session")
def a100() -> GpuInventory:
    """Written, not recorded: 2x A100 80GB, driver R570."""
    return load_inventory(DATA / "a100-written.json")


@pytest.fixture(scope="session")
def t4() -> GpuInventory:
    """Written, not recorded: 1x T4 16GB."""
    return load_inventory(DATA / "t4-written.json")


@pytest.fixture(scope="session")
def v100() -> GpuInventory:
    """Written, not recorded: 1x V100 16GB."""
    return load_inventory(DATA / "v100-written.json")

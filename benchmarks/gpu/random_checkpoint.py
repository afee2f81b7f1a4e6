#!/usr/bin/env python3
"""Random-weight checkpoints of a real shape, unquantized or in the real 4-bit GPTQ/AWQ layouts, so
every method can be served and measured on a GPU without downloading a model.

    python make_demo_model.py CFG --size llama3-8b --config-only   # config + tokenizer, no weights
    python random_checkpoint.py CFG OUT --layout bf16               # for none, fp8, bitsandbytes
    python random_checkpoint.py CFG OUT --layout gptq               # for gptq (4 bits, group 128)
    python random_checkpoint.py CFG OUT --layout awq                # for awq (4 bits, group 128, GEMM)

Needs torch and safetensors (any vLLM environment has both); uses the GPU when there is one (the
8B shape's 16 GB of bf16 weights are drawn there in seconds). Output: the config folder's tokenizer
and generation config, ``config.json`` (with ``quantization_config`` for the 4-bit layouts, whose
non-linear tensors are float16), and the weights in safetensors shards of a few layers each with
their index. Deterministic for a given --seed.

The 4-bit layouts (what vLLM's GPTQ and AWQ loaders read, vllm/model_executor/layers/quantization/
gptq.py and awq.py), for a linear layer of ``fin`` inputs and ``fout`` outputs, group size ``g``:

- GPTQ: ``qweight`` int32 [fin/8, fout] (8 nibbles along the input), ``qzeros`` int32
  [fin/g, fout/8], ``scales`` float16 [fin/g, fout], ``g_idx`` int32 [fin]; symmetric 4-bit stores
  the zero point 8 as 7 (GPTQ's historical off-by-one), so every nibble of qzeros is 7.
- AWQ (GEMM): ``qweight`` int32 [fin, fout/8] (8 nibbles along the output), ``qzeros`` int32
  [fin/g, fout/8] with the zero point 8 in every nibble, ``scales`` float16 [fin/g, fout].

Random weights answer with random tokens: they measure speed and memory, never quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

LAYOUTS = ("bf16", "gptq", "awq")
#: Files of the config folder copied as they are (everything but config.json and weights).
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
LAYERS_PER_SHARD = 4
STD = 0.02


def linear_shapes(cfg: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(name, fin, fout) of one decoder layer's linear layers (Llama)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q = cfg["num_attention_heads"] * head_dim
    kv = cfg["num_key_value_heads"] * head_dim
    return [
        ("self_attn.q_proj", h, q),
        ("self_attn.k_proj", h, kv),
        ("self_attn.v_proj", h, kv),
        ("self_attn.o_proj", q, h),
        ("mlp.gate_proj", h, i),
        ("mlp.up_proj", h, i),
        ("mlp.down_proj", i, h),
    ]


def quantization_config(layout: str, group: int) -> dict[str, Any] | None:
    if layout == "gptq":
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group,
            "desc_act": False,
            "sym": True,
        }
    if layout == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "zero_point": True,
            "version": "gemm",
        }
    return None


class Draw:
    """Random tensors, on the GPU when there is one, returned on the CPU."""

    def __init__(self, seed: int) -> None:
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def normal(self, shape: tuple[int, ...], dtype: Any) -> Any:
        t = self.torch.empty(shape, dtype=self.torch.float32, device=self.device)
        t.normal_(0.0, STD, generator=self.gen)
        return t.to(dtype).cpu()

    def words(self, shape: tuple[int, ...]) -> Any:
        """int32 words of 8 random nibbles each."""
        torch = self.torch
        return torch.randint(
            -(2**31), 2**31 - 1, shape, dtype=torch.int32, device=self.device, generator=self.gen
        ).cpu()


def linear_tensors(
    draw: Draw, name: str, fin: int, fout: int, layout: str, group: int
) -> dict[str, Any]:
    torch = draw.torch
    if layout == "bf16":
        return {f"{name}.weight": draw.normal((fout, fin), torch.bfloat16)}
    if fin % group or fout % 8 or fin % 8:
        raise SystemExit(f"{name}: {fin}x{fout} does not split into groups of {group} / 8 nibbles")
    groups = fin // group
    out = {f"{name}.scales": torch.full((groups, fout), 0.001, dtype=torch.float16)}
    if layout == "gptq":
        out[f"{name}.qweight"] = draw.words((fin // 8, fout))
        out[f"{name}.qzeros"] = torch.full((groups, fout // 8), 0x77777777, dtype=torch.int32)
        out[f"{name}.g_idx"] = torch.arange(fin, dtype=torch.int32) // group
    else:
        out[f"{name}.qweight"] = draw.words((fin, fout // 8))
        zeros = 0x88888888 - (1 << 32)  # every nibble 8, as a signed int32
        out[f"{name}.qzeros"] = torch.full((groups, fout // 8), zeros, dtype=torch.int32)
    return out


def write(cfg_dir: Path, out: Path, layout: str, group: int = 128, seed: int = 0) -> int:
    """Write the checkpoint; returns the bytes of its weights."""
    from safetensors.torch import save_file

    cfg = json.loads((cfg_dir / "config.json").read_text())
    draw = Draw(seed)
    torch = draw.torch
    other = torch.bfloat16 if layout == "bf16" else torch.float16
    h, vocab, layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    current: dict[str, Any] = {
        "model.embed_tokens.weight": draw.normal((vocab, h), other),
    }
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for name, fin, fout in linear_shapes(cfg):
            current.update(linear_tensors(draw, prefix + name, fin, fout, layout, group))
        current[prefix + "input_layernorm.weight"] = torch.ones(h, dtype=other)
        current[prefix + "post_attention_layernorm.weight"] = torch.ones(h, dtype=other)
        if (layer + 1) % LAYERS_PER_SHARD == 0:
            shards.append(current)
            current = {}
    current["model.norm.weight"] = torch.ones(h, dtype=other)
    if not cfg.get("tie_word_embeddings"):
        current["lm_head.weight"] = draw.normal((vocab, h), other)
    shards.append(current)
    index: dict[str, str] = {}
    total = 0
    for n, shard in enumerate(shards, 1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        for key, tensor in shard.items():
            index[key] = file
            total += tensor.numel() * tensor.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    quant = quantization_config(layout, group)
    if quant is not None:
        cfg["quantization_config"] = quant
        cfg["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in COPIED:
        if (cfg_dir / name).is_file():
            shutil.copy2(cfg_dir / name, out / name)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config_dir", type=Path, help="folder with config.json and a tokenizer")
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--layout", choices=LAYOUTS, required=True)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.config_dir / "config.json").is_file():
        parser.error(f"{args.config_dir} has no config.json (make_demo_model.py --config-only)")
    total = write(args.config_dir, args.out, args.layout, args.group_size, args.seed)
    print(f"wrote {args.layout} weights, {total / 2**30:.2f} GiB, to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

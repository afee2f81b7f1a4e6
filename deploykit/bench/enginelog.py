"""Weight and KV cache memory from the engine's own start-up log (pure: lines in, figures out).

vLLM says what it loaded and what it kept for the KV cache once, at start-up
(docs/facts.md, "The engine server"):

- CUDA: ``Model loading took 14.96 GiB memory and 0.369531 seconds`` (``gpu_model_runner.py``;
  vLLM 0.24's model runner V2 leaves out "memory"),
  ``Available KV cache memory: 112.41 GiB`` (``gpu_worker.py``) and
  ``GPU KV cache size: 920,864 tokens`` (``kv_cache_utils.py``);
- the CPU build reports no weight memory, only the checkpoint's size on disk
  (``Checkpoint size: 0.23 GiB``), and ``Explicitly set (1.0/17.59) GiB for KV cache`` and
  ``CPU KV cache size: 131,072 tokens``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

_WEIGHTS = re.compile(r"Model loading took ([\d.]+) GiB(?: memory)? and")
_CHECKPOINT = re.compile(r"Checkpoint size: ([\d.]+) GiB")
_KV_GPU = re.compile(r"Available KV cache memory: ([\d.]+) GiB")
_KV_CPU = re.compile(r"Explicitly set \(([\d.]+)/[\d.]+\) GiB for KV cache")
_KV_TOKENS = re.compile(r"\b([GC]PU) KV cache size: ([\d,]+) tokens")


@dataclass(frozen=True)
class EngineMemory:
    weights_gib: float | None
    weights_source: (
        str | None
    )  # what the figure is: vLLM's loaded weights, or the checkpoint's size
    kv_cache_gib: float | None
    kv_cache_tokens: int | None
    device: str | None  # "GPU" or "CPU", as vLLM names it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = []
        if self.weights_gib is not None:
            parts.append(f"weights {self.weights_gib:.2f} GiB ({self.weights_source})")
        if self.kv_cache_gib is not None or self.kv_cache_tokens is not None:
            kv = f"{self.kv_cache_gib:.2f} GiB" if self.kv_cache_gib is not None else "? GiB"
            tokens = f", {self.kv_cache_tokens:,} tokens" if self.kv_cache_tokens else ""
            parts.append(f"KV cache {kv}{tokens}")
        return "; ".join(parts) or "not in the engine's log"


def parse(lines: Iterable[str]) -> EngineMemory:
    """The last start-up's figures (an engine that restarted logged them again)."""
    weights = checkpoint = kv = None
    tokens: int | None = None
    device: str | None = None
    for line in lines:
        if m := _WEIGHTS.search(line):
            weights = float(m.group(1))
        elif m := _CHECKPOINT.search(line):
            checkpoint = float(m.group(1))
        elif m := _KV_GPU.search(line) or _KV_CPU.search(line):
            kv = float(m.group(1))
        elif m := _KV_TOKENS.search(line):
            device, tokens = m.group(1), int(m.group(2).replace(",", ""))
    if weights is not None:
        return EngineMemory(weights, "vLLM: model loading", kv, tokens, device)
    source = "checkpoint size on disk; vLLM's CPU build reports no weight memory"
    return EngineMemory(checkpoint, source if checkpoint is not None else None, kv, tokens, device)

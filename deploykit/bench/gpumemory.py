"""Peak GPU memory while a benchmark runs: NVML (through deploykit.devices, the one module that
reads it) sampled on a thread; the arithmetic is pure and runs on recorded inventories.

vLLM takes ``--gpu-memory-utilization`` of each GPU at start-up (weights, activations, KV cache),
so the peak is mostly that reservation; what the weights and the KV cache take is in the engine's
log (deploykit/bench/enginelog.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from deploykit.errors import GpuError

SAMPLE_INTERVAL_S = 0.5


def label(gpu: Any) -> str:
    """How a GPU is named in results: ``0: NVIDIA H200`` (its NVML index and name)."""
    return f"{gpu.index}: {gpu.name}"


def used(inventory: Any, gpu_ids: Sequence[str]) -> dict[str, int]:
    """Bytes in use on each pinned GPU (by UUID or index) of one NVML inventory."""
    wanted = set(gpu_ids)
    return {
        label(g): g.memory_total - g.memory_free
        for g in inventory.gpus
        if g.uuid in wanted or str(g.index) in wanted
    }


def totals(inventory: Any, gpu_ids: Sequence[str]) -> dict[str, int]:
    wanted = set(gpu_ids)
    return {
        label(g): g.memory_total
        for g in inventory.gpus
        if g.uuid in wanted or str(g.index) in wanted
    }


def peaks(readings: Iterable[dict[str, int]]) -> dict[str, int]:
    """The highest use of each GPU over the readings."""
    out: dict[str, int] = {}
    for reading in readings:
        for gpu, value in reading.items():
            out[gpu] = max(out.get(gpu, 0), value)
    return out


class Sampler:
    """Reads the pinned GPUs' memory every ``interval_s`` on a thread; :meth:`take` returns the
    peak since the last take. ``read`` returns an inventory (deploykit.devices.read_inventory)."""

    def __init__(
        self, read: Callable[[], Any], gpu_ids: Sequence[str], interval_s: float = SAMPLE_INTERVAL_S
    ) -> None:
        self.read = read
        self.gpu_ids = tuple(gpu_ids)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-memory", daemon=True)
        self.totals = totals(read(), self.gpu_ids)

    def _sample(self) -> None:
        reading = used(self.read(), self.gpu_ids)
        with self._lock:
            self._peak = peaks([self._peak, reading])

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(GpuError):  # a failed read is a missing sample
                self._sample()
            self._stop.wait(self.interval_s)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def take(self) -> dict[str, int]:
        """The peak since the last take (one reading now, so a short run has one too)."""
        with contextlib.suppress(GpuError):
            self._sample()
        with self._lock:
            peak, self._peak = self._peak, {}
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 1)


def sampler_for(gpu_ids: Sequence[str]) -> tuple[Sampler | None, str]:
    """A started sampler for these GPUs, or None and why not (no GPUs pinned, no NVML)."""
    from deploykit import devices

    if not gpu_ids:
        return None, "none: the cpu stack has no GPU"
    try:
        sampler = Sampler(devices.read_inventory, gpu_ids)
    except GpuError as err:
        return None, f"not measured: NVML is not available here ({err.message})"
    if not sampler.totals:
        return None, f"not measured: the pinned GPUs {', '.join(gpu_ids)} are not in NVML's list"
    return sampler.start(), f"NVML, sampled every {SAMPLE_INTERVAL_S:g} s"

"""Named GPUs to plan for without having them: ``deploykit plan --gpu H100-80GB --count 2``.

A small catalogue of common data-centre, workstation and consumer NVIDIA GPUs: memory and compute
capability, each with its source. Where a GPU was recorded through NVML (tests/data), its memory is
the recorded total; otherwise the vendor's nominal size in GiB, which NVML reports slightly lower
(the recorded H100 80GB: 79.6 GiB), so those plans are up to ~1% optimistic. Compute capabilities:
NVIDIA's table, https://developer.nvidia.com/cuda-gpus. Pure data; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploykit.devices import GIB, GpuInfo
from deploykit.errors import UsageError

CC_SOURCE = "compute capability: https://developer.nvidia.com/cuda-gpus"


@dataclass(frozen=True)
class CatalogueGpu:
    """One GPU model as ``plan`` needs it."""

    key: str  # what --gpu takes: "H100-80GB"
    name: str  # as NVML names it
    memory_bytes: int
    compute_capability: float
    kind: str  # data centre | workstation | consumer
    source: str

    def gpus(self, count: int = 1) -> tuple[GpuInfo, ...]:
        """``count`` of these GPUs as plan takes them (no UUIDs: nothing to pin)."""
        return tuple(
            GpuInfo(
                index=i,
                uuid=f"catalogue-{self.key}-{i}",
                name=self.name,
                compute_capability=self.compute_capability,
                memory_total=self.memory_bytes,
                memory_free=self.memory_bytes,
                mig_mode=None,
                pci_bus_id="",
            )
            for i in range(count)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "memory_gib": round(self.memory_bytes / GIB, 1),
            "compute_capability": self.compute_capability,
            "kind": self.kind,
            "source": self.source,
        }


def _nominal(gib: int, page: str) -> tuple[int, str]:
    return gib * GIB, f"memory: {gib} GiB nominal, {page}; {CC_SOURCE}"


def _recorded(total: int, record: str) -> tuple[int, str]:
    return total, f"memory: NVML total recorded in tests/data/{record}; {CC_SOURCE}"


_NV = "https://www.nvidia.com/en-us"
CATALOGUE: tuple[CatalogueGpu, ...] = tuple(
    CatalogueGpu(key, name, memory[0], cc, kind, memory[1])
    for key, name, memory, cc, kind in (
        # data centre
        (
            "H200-141GB",
            "NVIDIA H200",
            _recorded(150754820096, "h200-nvml.json"),
            9.0,
            "data centre",
        ),
        (
            "H100-80GB",
            "NVIDIA H100 80GB HBM3",
            _recorded(85520809984, "h100-nvml.json"),
            9.0,
            "data centre",
        ),
        (
            "A100-80GB",
            "NVIDIA A100 80GB",
            _nominal(80, f"{_NV}/data-center/a100/"),
            8.0,
            "data centre",
        ),
        (
            "A100-40GB",
            "NVIDIA A100 40GB",
            _nominal(40, f"{_NV}/data-center/a100/"),
            8.0,
            "data centre",
        ),
        ("L40S-48GB", "NVIDIA L40S", _nominal(48, f"{_NV}/data-center/l40s/"), 8.9, "data centre"),
        ("L4-24GB", "NVIDIA L4", _nominal(24, f"{_NV}/data-center/l4/"), 8.9, "data centre"),
        (
            "A10-24GB",
            "NVIDIA A10",
            _nominal(24, f"{_NV}/data-center/products/a10-gpu/"),
            8.6,
            "data centre",
        ),
        ("T4-16GB", "Tesla T4", _nominal(16, f"{_NV}/data-center/tesla-t4/"), 7.5, "data centre"),
        (
            "V100-32GB",
            "Tesla V100 32GB",
            _nominal(32, f"{_NV}/data-center/v100/"),
            7.0,
            "data centre",
        ),
        # workstation
        (
            "RTX-6000-Ada-48GB",
            "NVIDIA RTX 6000 Ada Generation",
            _nominal(48, f"{_NV}/design-visualization/rtx-6000/"),
            8.9,
            "workstation",
        ),
        (
            "RTX-A6000-48GB",
            "NVIDIA RTX A6000",
            _nominal(48, f"{_NV}/design-visualization/rtx-a6000/"),
            8.6,
            "workstation",
        ),
        # consumer
        (
            "RTX-5090-32GB",
            "NVIDIA GeForce RTX 5090",
            _nominal(32, f"{_NV}/geforce/graphics-cards/50-series/rtx-5090/"),
            12.0,
            "consumer",
        ),
        (
            "RTX-4090-24GB",
            "NVIDIA GeForce RTX 4090",
            _nominal(24, f"{_NV}/geforce/graphics-cards/40-series/rtx-4090/"),
            8.9,
            "consumer",
        ),
        (
            "RTX-4080-16GB",
            "NVIDIA GeForce RTX 4080",
            _nominal(16, f"{_NV}/geforce/graphics-cards/40-series/rtx-4080-family/"),
            8.9,
            "consumer",
        ),
        (
            "RTX-3090-24GB",
            "NVIDIA GeForce RTX 3090",
            _nominal(24, f"{_NV}/geforce/graphics-cards/30-series/rtx-3090-3090ti/"),
            8.6,
            "consumer",
        ),
    )
)


def _norm(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def find_gpu(key: str) -> CatalogueGpu:
    """A catalogue GPU by key, case and punctuation ignored; a unique prefix is enough
    (``h100``, ``rtx4090``). The error lists every name."""
    wanted = _norm(key)
    exact = [g for g in CATALOGUE if _norm(g.key) == wanted]
    found = exact or [g for g in CATALOGUE if wanted and _norm(g.key).startswith(wanted)]
    if len(found) == 1:
        return found[0]
    names = ", ".join(g.key for g in CATALOGUE)
    if found:
        raise UsageError(
            f"--gpu {key!r} could be {', '.join(g.key for g in found)}",
            f"give one of: {names} (`deploykit gpus --catalogue` lists them)",
        )
    raise UsageError(
        f"--gpu {key!r} is not in the GPU catalogue",
        f"give one of: {names} (`deploykit gpus --catalogue` lists them); for another GPU, "
        "plan with --gpus-file (a `deploykit gpus --json` made on that machine)",
    )


def catalogue_gpus(key: str, count: int = 1) -> tuple[GpuInfo, ...]:
    """``--gpu KEY --count N`` as GPUs for plan."""
    if not 1 <= count <= 64:
        raise UsageError(f"--count {count} is out of range", "give 1 to 64 GPUs")
    return find_gpu(key).gpus(count)

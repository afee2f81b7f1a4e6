"""The host's NVIDIA GPUs, read through NVML (nvidia-ml-py), and the ``--gpus`` selection.

The only module that reads NVML. ``read_inventory()`` is the thin edge; everything else here is pure:
the :class:`GpuInfo` / :class:`DriverInfo` records, their JSON form (the output of
``deploykit gpus --json``, which can be recorded on a real machine and fed back as test data) and
:func:`resolve_gpu_spec`, which turns a ``--gpus`` spec into the GPUs to pin.

Importable with nothing but the standard library (pynvml is imported lazily), so the recording script
under tests/data/ runs on a GPU machine that has only nvidia-ml-py.

NVML numbers GPUs in PCI bus order, as nvidia-smi and ``NVIDIA_VISIBLE_DEVICES`` do; CUDA numbers them
fastest-first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (docs/facts.md, "GPUs and pinning"). deploykit pins by UUID, so the
difference never matters once a spec is resolved.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import GpuError, UsageError

GIB = 1024**3


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as NVML reports it."""

    index: int  # NVML index (PCI bus order, as nvidia-smi)
    uuid: str  # "GPU-xxxxxxxx-..."; what deploykit pins
    name: str  # "NVIDIA H100 80GB HBM3"
    compute_capability: float  # 9.0 for Hopper; major + minor / 10, as deploykit.matrix takes it
    memory_total: int  # bytes
    memory_free: int  # bytes, at the time it was read
    mig_mode: bool | None  # True: MIG enabled; None: the GPU does not support MIG
    pci_bus_id: str  # "00000000:19:00.0"

    @property
    def memory_total_gib(self) -> float:
        return self.memory_total / GIB

    @property
    def memory_free_gib(self) -> float:
        return self.memory_free / GIB

    def label(self) -> str:
        """Short human description: ``0: NVIDIA H100 80GB HBM3 (GPU-1234…, CC 9.0, 79.2 GiB)``."""
        return (
            f"{self.index}: {self.name} ({self.uuid}, CC {self.compute_capability:.1f}, "
            f"{self.memory_total_gib:.1f} GiB)"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GpuInfo:
        try:
            return cls(
                index=int(data["index"]),
                uuid=str(data["uuid"]),
                name=str(data["name"]),
                compute_capability=float(data["compute_capability"]),
                memory_total=int(data["memory_total"]),
                memory_free=int(data["memory_free"]),
                mig_mode=None if data.get("mig_mode") is None else bool(data["mig_mode"]),
                pci_bus_id=str(data.get("pci_bus_id", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(
                f"not a GPU record: {data!r} ({err})",
                "use the output of `deploykit gpus --json`",
            ) from None


@dataclass(frozen=True)
class DriverInfo:
    """The NVIDIA driver: its version and the CUDA level it supports."""

    driver_version: str  # "580.159.04"
    cuda_driver_version: int  # nvmlSystemGetCudaDriverVersion: 13000 for CUDA 13.0

    @property
    def cuda_version(self) -> str:
        """The driver's CUDA level as ``major.minor`` ("13.0")."""
        major, minor = divmod(self.cuda_driver_version, 1000)
        return f"{major}.{minor // 10}"

    @property
    def driver_major(self) -> int:
        """The driver branch (580 for 580.159.04); 0 when the version does not parse."""
        try:
            return int(self.driver_version.split(".")[0])
        except ValueError:
            return 0

    def supports_cuda(self, version: str) -> bool:
        """Whether this driver runs programs built for CUDA ``version`` ("13.0")."""
        major, _, minor = version.partition(".")
        wanted = int(major) * 1000 + int(minor or 0) * 10
        return self.cuda_driver_version >= wanted

    def to_json(self) -> dict[str, Any]:
        return {
            "driver_version": self.driver_version,
            "cuda_driver_version": self.cuda_driver_version,
            "cuda_version": self.cuda_version,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DriverInfo:
        try:
            return cls(str(data["driver_version"]), int(data["cuda_driver_version"]))
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(
                f"not a driver record: {data!r} ({err})",
                "use the output of `deploykit gpus --json`",
            ) from None


@dataclass(frozen=True)
class GpuInventory:
    """What ``deploykit gpus --json`` prints: the driver and every GPU, in NVML index order."""

    driver: DriverInfo
    gpus: tuple[GpuInfo, ...]
    #: Free text carried through JSON (where and when a recording was made); never interpreted.
    source: str = field(default="")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "driver": self.driver.to_json(),
            "gpus": [g.to_json() for g in self.gpus],
        }
        if self.source:
            data["source"] = self.source
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GpuInventory:
        if not isinstance(data, dict) or "gpus" not in data or "driver" not in data:
            raise UsageError(
                "not a GPU inventory: expected an object with 'driver' and 'gpus'",
                "use the output of `deploykit gpus --json`",
            )
        gpus = tuple(sorted((GpuInfo.from_json(g) for g in data["gpus"]), key=lambda g: g.index))
        return cls(DriverInfo.from_json(data["driver"]), gpus, str(data.get("source", "")))


def dumps_inventory(inventory: GpuInventory) -> str:
    return json.dumps(inventory.to_json(), indent=2, sort_keys=True) + "\n"


def load_inventory(path: str | Path) -> GpuInventory:
    """Read a recorded ``deploykit gpus --json`` output (to plan for another machine, or test)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise UsageError(f"cannot read GPU inventory {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{path} is not JSON: {err}", "use the output of `deploykit gpus --json`"
        ) from None
    return GpuInventory.from_json(data)


# --- NVML (the edge) ------------------------------------------------------------------------------

_NO_DRIVER_HINT = (
    "install the NVIDIA driver (R580 or newer for the CUDA 13 vLLM images) and check that "
    "`nvidia-smi` works; on a machine without an NVIDIA GPU use the cpu GPU class"
)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_inventory() -> GpuInventory:
    """Read the driver and every GPU through NVML. Raises GpuError when there is no driver/GPU."""
    try:
        import pynvml
    except ImportError:  # pragma: no cover - a declared dependency
        raise GpuError(
            "nvidia-ml-py is not installed, so GPUs cannot be listed",
            "pip install nvidia-ml-py",
        ) from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise GpuError(f"no NVIDIA driver found: NVML says {err}", _NO_DRIVER_HINT) from None
    except OSError as err:  # a broken libnvidia-ml
        raise GpuError(f"NVML could not be loaded: {err}", _NO_DRIVER_HINT) from None
    try:
        driver = DriverInfo(
            _text(pynvml.nvmlSystemGetDriverVersion()),
            int(pynvml.nvmlSystemGetCudaDriverVersion()),
        )
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
                mig: bool | None = current == pynvml.NVML_DEVICE_MIG_ENABLE
            except pynvml.NVMLError:  # NVML_ERROR_NOT_SUPPORTED on GPUs without MIG
                mig = None
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    compute_capability=major + minor / 10,
                    memory_total=int(memory.total),
                    memory_free=int(memory.free),
                    mig_mode=mig,
                    pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
                )
            )
    except pynvml.NVMLError as err:
        raise GpuError(f"NVML failed while listing GPUs: {err}", _NO_DRIVER_HINT) from None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    if not gpus:
        raise GpuError(
            f"the NVIDIA driver {driver.driver_version} is loaded but reports no GPUs",
            "check `nvidia-smi -L`; inside a container, run it with the NVIDIA runtime (--gpus all)",
        )
    return GpuInventory(driver, tuple(gpus))


def list_gpus() -> list[GpuInfo]:
    """Every GPU of this host in NVML index order. Raises GpuError (exit 5) without a driver."""
    return list(read_inventory().gpus)


# --- --gpus specs (pure) --------------------------------------------------------------------------

GPU_SPEC_HELP = (
    "Which GPUs to use: 'all'; GPU indices as nvidia-smi numbers them ('0,1'; a single number such as "
    "'2' is the ONE GPU with index 2, as in NVIDIA_VISIBLE_DEVICES); GPU UUIDs ('GPU-8f1c…,GPU-…', a "
    "unique prefix is enough); or 'count=N' for the first N GPUs by index. Pinned by UUID."
)


def _available(gpus: list[GpuInfo] | tuple[GpuInfo, ...]) -> str:
    if not gpus:
        return "this host has no NVIDIA GPUs"
    return "GPUs on this host: " + "; ".join(g.label() for g in gpus)


def resolve_gpu_spec(spec: str, gpus: list[GpuInfo] | tuple[GpuInfo, ...]) -> list[GpuInfo]:
    """Turn a ``--gpus`` spec into the GPUs it names, in the order given. Pure.

    Forms (whitespace ignored, case-insensitive):

    - ``all``: every GPU, by index.
    - ``2``: the single GPU whose NVML index is 2 (the index nvidia-smi shows), NOT two GPUs. A bare
      number selects, as in ``NVIDIA_VISIBLE_DEVICES=2`` and ``CUDA_VISIBLE_DEVICES=2``, so that
      ``2`` and ``0,1`` mean the same kind of thing (``make up GPU=2`` runs on GPU 2). Docker's own
      ``--gpus 2`` is a count; to ask for a count write ``count=2``.
    - ``0,1``: the GPUs with these indices.
    - ``GPU-8f1c…,GPU-…``: GPUs by UUID (full, or a prefix that matches exactly one GPU).
    - ``count=N`` (or ``count:N``): the first N GPUs by index.

    Indices and UUIDs may be mixed. Raises UsageError (exit 2) for a malformed spec or a GPU named
    twice, and GpuError (exit 5) for GPUs that do not exist; both list the GPUs that do.
    """
    text = spec.strip()
    ordered = sorted(gpus, key=lambda g: g.index)
    forms = "use 'all', indices like '0,1', UUIDs like 'GPU-…', or 'count=N'. " + _available(
        ordered
    )
    if not text:
        raise UsageError("empty --gpus spec", forms)
    lowered = text.lower()
    if lowered == "all":
        if not ordered:
            raise GpuError("--gpus all: no NVIDIA GPUs found", _NO_DRIVER_HINT)
        return ordered
    for prefix in ("count=", "count:"):
        if lowered.startswith(prefix):
            raw = text[len(prefix) :].strip()
            if not raw.isdigit() or int(raw) < 1:
                raise UsageError(f"--gpus {text!r}: the count must be a positive integer", forms)
            count = int(raw)
            if count > len(ordered):
                raise GpuError(
                    f"--gpus {text!r} asks for {count} GPUs but this host has {len(ordered)}",
                    _available(ordered),
                )
            return ordered[:count]

    chosen: list[GpuInfo] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise UsageError(f"--gpus {text!r} has an empty item", forms)
        if item.isdigit():
            index = int(item)
            match = [g for g in ordered if g.index == index]
            if not match:
                hint = _available(ordered)
                if len(text.split(",")) == 1 and 0 < index <= len(ordered):
                    first = ",".join(str(g.index) for g in ordered[:index])
                    hint += (
                        f". A single number is one GPU's index, not a count: for {index} GPUs "
                        f"write '{first}' or 'count={index}'"
                    )
                raise GpuError(f"--gpus {text!r}: there is no GPU with index {index}", hint)
        elif item.upper().startswith(("GPU-", "MIG-")):
            match = [g for g in ordered if g.uuid.lower().startswith(item.lower())]
            if not match:
                raise GpuError(
                    f"--gpus {text!r}: no GPU has a UUID starting with {item!r}",
                    _available(ordered),
                )
            if len(match) > 1:
                raise UsageError(
                    f"--gpus {text!r}: {item!r} matches {len(match)} GPUs",
                    "give more of the UUID. " + _available(ordered),
                )
        else:
            raise UsageError(f"--gpus {text!r}: cannot read {item!r}", forms)
        gpu = match[0]
        if gpu in chosen:
            raise UsageError(f"--gpus {text!r} names GPU {gpu.index} twice", forms)
        chosen.append(gpu)
    return chosen

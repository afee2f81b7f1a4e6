"""The gate ``deploykit up`` / ``build`` run before anything is built or started."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploykit.devices import DriverInfo, GpuInfo
from deploykit.errors import DeployKitError, GpuError, ModelError, UnsupportedError
from deploykit.matrix import (
    VLLM_IMAGE,
    VLLM_IMAGE_CU129_SUFFIX,
    VLLM_IMAGE_CUDA,
    VLLM_VERSION,
    Cell,
    GpuClass,
    Quant,
    for_device,
    gpu_class_for,
    parse_gpu_class,
    parse_quant,
    resolve_target,
)
from deploykit.plan.fit import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    Profile,
    Status,
    evaluate,
    gpu_class_of,
)
from deploykit.plan.model import ModelInfo, check_checkpoint, read_model

# --- the gate (up / build) ------------------------------------------------------------------------


@dataclass
class GateResult:
    """What the gate found. ``problems`` are refusals; with ``force`` they come back as warnings."""

    problems: list[DeployKitError] = field(default_factory=list)
    #: The image's cell the gate checked (None when the method/class could not be resolved).
    cell: Cell | None = None
    profile: Profile | None = None
    forced: bool = False
    #: What was not checked, and why (e.g. a model given as a Hub id, not a local directory).
    notes: list[str] = field(default_factory=list)

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
    target: Cell | Quant | str,
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

    ``target`` is the image's cell, resolved once by the command that runs the gate (``up``,
    ``build``), or a method resolved here for ``gpu_class`` (default: the GPUs' own class).

    Checks what it is given: the method on the GPUs' compute capability and class, MIG, the driver
    against the image's CUDA, the checkpoint against the method, and the memory fit at
    ``max_model_len`` (default: the model's maximum) with ``tensor_parallel_size`` (default: all
    selected GPUs). Without GPUs (building for another host, or the cpu class) only the method/class
    and the checkpoint are checked.

    ``model`` may be a :class:`ModelInfo`, a local model directory, or a Hub id (not checked; see
    ``notes``). Raises the first refusal (others appended) unless ``force``; returns the result then.
    """
    result = GateResult(forced=force)
    q = target.quant if isinstance(target, Cell) else parse_quant(target)
    cell: Cell | None = None
    gpus_fit = False  # the method and class run on every selected GPU
    try:
        if isinstance(target, Cell):
            cell = target
        else:
            cls = (
                parse_gpu_class(gpu_class)
                if gpu_class
                else (gpu_class_of(gpus) if gpus else GpuClass.CUDA)
            )
            cell = resolve_target(q, cls)
        if gpus and cell.gpu_class is not GpuClass.CPU:
            for g in gpus:
                actual = gpu_class_for(g.compute_capability)
                if actual is not cell.gpu_class:
                    raise UnsupportedError(
                        f"GPU {g.index} ({g.name}, CC {g.compute_capability:.1f}) is class {actual}, "
                        f"not {cell.gpu_class}",
                        f"use --gpu-class {actual} for this GPU",
                    )
                for_device(cell, g.compute_capability)
        gpus_fit = True
    except DeployKitError as err:
        result.problems.append(err)
    result.cell = cell
    on_gpu = bool(gpus) and (cell is None or cell.gpu_class is not GpuClass.CPU)
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
    info: ModelInfo | None
    if isinstance(model, str | Path):
        if Path(model).is_dir():
            info = read_model(model)
        else:
            info = None
            result.notes.append(
                f"model {model} is not a local directory: its checkpoint and memory fit were not "
                "checked (download it and run `deploykit plan --model DIR`)"
            )
    else:
        info = model
    if info is not None:
        try:
            check_checkpoint(q, info)
        except ModelError as err:
            result.problems.append(err)
        else:
            if on_gpu and cell is not None and gpus_fit and not any(g.mig_mode for g in gpus):
                tp = tensor_parallel_size or len(gpus)
                kv = kv_cache_dtype or _engine_kv(cell)
                # the cell on the GPUs that serve it (float16 below compute capability 8.0)
                served = for_device(cell, min(g.compute_capability for g in gpus[:tp]))
                p = evaluate(
                    info, q, gpus, tp, kv, max_model_len, gpu_memory_utilization, cell=served
                )
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


def _engine_kv(cell: Cell) -> str:
    """The KV-cache dtype the cell's engine image sets, else vLLM's ``auto``."""
    if "--kv-cache-dtype" in cell.vllm_args:
        return cell.vllm_args[cell.vllm_args.index("--kv-cache-dtype") + 1]
    return "auto"

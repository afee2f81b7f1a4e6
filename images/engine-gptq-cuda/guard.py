"""The engine images' start-up guard: runs before vLLM, as each engine image's ENTRYPOINT.

1. refuses, with a clear message, a GPU the image's method cannot run on (naming the GPU found and
   the methods that would run on it), or a container that sees no GPU at all;
2. checks a local checkpoint against the method (``deploykit.checkpoint``: the rules
   ``deploykit plan`` runs), and drops the on-the-fly quantization flags for a checkpoint that is
   already quantized with the method;
3. picks float16 instead of bfloat16 on GPUs below compute capability 8.0;
4. copies its secrets (an HF token, the engine's API key) to a private place, drops root, and
   starts the vLLM server under a watchdog: once the server has answered ``/health``, a server that
   stops answering it (``DEPLOYKIT_WATCHDOG_FAILURES`` probes in a row, every
   ``DEPLOYKIT_WATCHDOG_INTERVAL_S`` s, each waiting ``DEPLOYKIT_WATCHDOG_TIMEOUT_S`` s) is killed
   and the container exits, so Docker's restart policy starts it again. Docker itself only marks
   such a container unhealthy; no container holds the Docker socket to do more.

Standard library only. ``deploykit render`` copies this file as it is into every engine image's build
folder, with ``checkpoint.py`` and ``errors.py`` beside it and the image's own facts in
``facts.json`` (:class:`ImageFacts`); in the image it runs as ``/opt/deploykit/guard.py``. Exit codes
are ``deploykit.errors.ExitCode``'s: 3 an unsupported GPU, 5 no GPU visible, 6 a checkpoint that does
not match, 1 a vLLM server that cannot start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
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

    def check_gpus(self, args: Sequence[str] = ()) -> float:
        """The lowest compute capability of the visible GPUs; exits when one cannot run the method
        (with no GPU at all, saying what it would have started with ``args``)."""
        facts = self.facts
        gpus = self.visible_gpus()
        need = facts.min_compute_capability or 0.0
        if not gpus:
            would = " ".join([*facts.serve, *facts.vllm_args, *args])
            fail(
                errors.GpuError(
                    f"no NVIDIA GPU is visible in this container, and the {facts.quant} x "
                    f"{facts.gpu_class} engine needs one of compute capability {need:.1f} or newer; "
                    f"with one it would run: {would}",
                    "start it with GPUs (deploykit up --gpus ...; compose device_ids), and check that "
                    "the NVIDIA container runtime is installed (deploykit doctor); without a GPU, "
                    "the cpu stack runs (deploykit up --gpu-class cpu)",
                )
            )
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
            fixed = self.with_dtype(fixed, self.check_gpus(args))
        fixed = self.check_checkpoint(args, fixed)
        return [*self.facts.serve, *fixed, *args]


def take_secrets_and_drop_root(uid: int) -> None:
    """Copy readable secrets to a private folder for the runtime user, then become that user. The
    API key reaches vLLM as ``VLLM_API_KEY`` in its own environment (not the container's)."""
    token = os.path.join(SECRETS_DIR, "hf_token")
    api_key = os.path.join(SECRETS_DIR, "engine_api_key")
    if os.path.isfile(api_key) and os.access(api_key, os.R_OK):
        key = Path(api_key).read_text().strip()
        if key:
            os.environ["VLLM_API_KEY"] = key
    if os.geteuid() != 0:
        if os.path.isfile(token) and os.access(token, os.R_OK):
            os.environ["HF_TOKEN_PATH"] = token
        return
    os.makedirs(PRIVATE_DIR, mode=0o700, exist_ok=True)
    os.chmod(PRIVATE_DIR, 0o700)
    os.chown(PRIVATE_DIR, uid, uid)
    if os.path.isfile(token) and os.path.getsize(token) > 0:
        private = os.path.join(PRIVATE_DIR, "hf_token")
        shutil.copyfile(token, private)
        os.chmod(private, 0o600)
        os.chown(private, uid, uid)
        os.environ["HF_TOKEN_PATH"] = private
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.environ["HOME"] = os.environ.get("DEPLOYKIT_HOME", "/home/vllm")


@dataclass(frozen=True)
class Watchdog:
    """When a server that answered ``/health`` stops answering it: kill it, so the container
    exits and is restarted."""

    port: int = 8000
    interval_s: float = 5.0
    timeout_s: float = 5.0
    failures: int = 3

    @classmethod
    def from_env(cls, args: Sequence[str], env: Mapping[str, str] = os.environ) -> Watchdog | None:
        """The watchdog for a server started with ``args``; None with DEPLOYKIT_WATCHDOG=0."""
        if env.get("DEPLOYKIT_WATCHDOG", "1") == "0":
            return None
        return cls(
            port=int(arg_value(args, "--port") or 8000),
            interval_s=float(env.get("DEPLOYKIT_WATCHDOG_INTERVAL_S", 5)),
            timeout_s=float(env.get("DEPLOYKIT_WATCHDOG_TIMEOUT_S", 5)),
            failures=int(env.get("DEPLOYKIT_WATCHDOG_FAILURES", 3)),
        )

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}/health", timeout=self.timeout_s
            ) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def supervise(self, command: Sequence[str]) -> int:
        """Run ``command`` (in its own process group) until it ends or stops answering; returns
        the exit code for the container. SIGTERM/SIGINT are passed on to the server."""
        proc = subprocess.Popen(list(command), start_new_session=True)

        def forward(signum: int, _frame: object) -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        answered, misses = False, 0
        while True:
            try:
                return proc.wait(timeout=self.interval_s)
            except subprocess.TimeoutExpired:
                pass
            if self.answers():
                if not answered:
                    log(
                        f"the vLLM server answers /health; watchdog on (every {self.interval_s:g} s)"
                    )
                answered, misses = True, 0
                continue
            if not answered:
                continue  # still loading the model
            misses += 1
            log(
                f"the vLLM server did not answer /health within {self.timeout_s:g} s ({misses}/{self.failures})"
            )
            if misses >= self.failures:
                log("the vLLM server stopped answering: killing it so the container restarts")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return errors.ExitCode.FAILED


def main(argv: Sequence[str]) -> NoReturn:
    facts = load_facts()
    args = list(argv[1:])
    command = Guard(facts).command(args)
    take_secrets_and_drop_root(facts.runtime_uid)
    log("starting: " + " ".join(command))
    if shutil.which(command[0]) is None:
        fail(
            errors.DeployKitError(
                f"cannot start the vLLM server ({command[0]}: not found)",
                "the image's BASE_IMAGE must contain vLLM (the official vllm/vllm-openai image, or "
                "the cpu image's own build stage)",
            )
        )
    watchdog = Watchdog.from_env(args)
    if watchdog is None:
        os.execvp(command[0], command)
    started = time.monotonic()
    code = watchdog.supervise(command)
    log(f"the vLLM server ended with {code} after {time.monotonic() - started:.0f} s")
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main(sys.argv)

"""Every CUDA engine image, built and checked on a machine without a GPU and without pulling.

The ten images are built the way `deploykit build --all` builds them: where the official vLLM image
cannot be pulled, on the local vLLM base (`deploykit base-images --vllm`: vLLM from PyPI's wheels),
each cell a thin layer on it. Then, inside each image:

- its start-up guard, started as the stack starts it, finds no GPU and refuses (exit 5), naming the
  method and the command it would run;
- the engine's complete command as the stack runs it (the compose command `deploykit render` writes
  for a local config-only model folder of the cell's kind, plus what the guard adds on a GPU of the
  cell's class) goes through the image's own vLLM: its CLI and `vllm serve`'s start-up, up to its
  engine configuration (tests/stack/engine_check.py says how far, and why there); wrong values
  are shown to fail there;
- bitsandbytes imports and vllm-bnb-plugin registers the `bitsandbytes` method in the bitsandbytes
  images, and in no other;
- the labels say what `deploykit matrix --json` says for the cell.

No CUDA image is started on a GPU here. Build and check times are printed in the terminal summary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

# Config files of the kinds of checkpoint each method serves (configs only, no weights), shared
# with the pre-flight tests (tests/preflight/conftest.py).
from preflight.conftest import LLAMA3_8B_FP8_CT, QWEN25_7B, QWEN25_7B_AWQ, QWEN25_7B_GPTQ

from deploykit import build, render
from deploykit.docker import Docker
from deploykit.errors import ExitCode
from deploykit.gpucatalogue import find_gpu
from deploykit.matrix import (
    BNB_PACKAGES,
    VLLM_VERSION,
    Cell,
    GpuClass,
    Quant,
    supported_cells,
)

from .conftest import Stopwatch

pytestmark = pytest.mark.integration

CELLS = [c for c in supported_cells() if c.gpu_class is not GpuClass.CPU]
CHECK_SCRIPT = Path(__file__).with_name("engine_check.py")
MARK = "ENGINE-CHECK "
#: Config-only model folders, mounted read-only at /models like `deploykit up --model DIR`.
MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b-instruct": QWEN25_7B,
    "qwen2.5-7b-instruct-awq": QWEN25_7B_AWQ,
    "qwen2.5-7b-instruct-gptq-int4": QWEN25_7B_GPTQ,
    "llama-3-8b-fp8-compressed-tensors": LLAMA3_8B_FP8_CT,
}
CHECKPOINT = {
    Quant.NONE: "qwen2.5-7b-instruct",
    Quant.FP8: "qwen2.5-7b-instruct",
    Quant.AWQ: "qwen2.5-7b-instruct-awq",
    Quant.GPTQ: "qwen2.5-7b-instruct-gptq-int4",
    Quant.BITSANDBYTES: "qwen2.5-7b-instruct",
}
#: The GPUs each class's command is checked for: the slowest of the class, and for cuda also the
#: first with bfloat16 (below compute capability 8.0 the guard switches to float16).
GPUS = {GpuClass.CUDA_FP8: ("L4-24GB",), GpuClass.CUDA: ("T4-16GB", "A100-80GB")}


@dataclass(frozen=True)
class Case:
    """One command checked inside one image."""

    name: str
    gpu_key: str
    model: str
    stack: dict[str, Any] = field(default_factory=dict)  # StackOptions fields
    extra: tuple[str, ...] = ()  # appended to the compose command (values `up` has no flag for)
    rejected: str = ""  # "": vLLM accepts it; else the stage that must refuse it


def cases(cell: Cell) -> list[Case]:
    """What each image checks: the cell's command on each GPU of its class, a pre-quantized FP8
    checkpoint for fp8, and in one image wrong values that vLLM must refuse."""
    found = [Case(key.lower(), key, CHECKPOINT[cell.quant]) for key in GPUS[cell.gpu_class]]
    first = GPUS[cell.gpu_class][0]
    if cell.quant is Quant.FP8:
        found.append(Case("fp8-checkpoint", first, "llama-3-8b-fp8-compressed-tensors"))
    if (cell.quant, cell.gpu_class) == (Quant.AWQ, GpuClass.CUDA_FP8):
        awq = CHECKPOINT[Quant.AWQ]
        found += [
            Case(
                "wrong-quantization",
                first,
                awq,
                extra=("--quantization", "gptq"),
                rejected="engine configuration",
            ),
            Case(
                "too-long",
                first,
                awq,
                stack={"max_model_len": 65536},
                rejected="engine configuration",
            ),
            Case(
                "no-such-kv-dtype",
                first,
                awq,
                stack={"kv_cache_dtype": "fp9"},
                rejected="engine configuration",
            ),
            Case("no-such-dtype", first, awq, extra=("--dtype", "bfloat17"), rejected="cli"),
        ]
    return found


def cell_id(cell: Cell) -> str:
    return f"{cell.quant}-{cell.gpu_class}"


def stack_command(cell: Cell, models: Path, case: Case) -> list[str]:
    """The engine's command in the compose file `deploykit render` writes for this model folder."""
    options = render.StackOptions(
        model=f"/models/{case.model}", models_dir=str(models), **case.stack
    )
    compose = yaml.safe_load(render.render_compose(cell, options))
    return [*compose["services"]["engine"]["command"], *case.extra]


# --- building -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cuda_images(docker_api: Docker, vllm_base: str, timings: Stopwatch) -> dict[str, build.Built]:
    log: list[str] = []
    results = build.build_images(
        docker_api, [render.engine_image(c) for c in CELLS], progress=log.append
    )
    for r in results:
        what = "reused" if r.reused else "built"
        added = (r.size_bytes - r.base_size_bytes) / 1e9
        timings.mark(
            f"{r.tag} {what} ({r.size_bytes / 1e9:.2f} GB, +{added:.3f} GB on its base)", r.seconds
        )
    return {c.image_name: r for c, r in zip(CELLS, results, strict=True)}


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_each_cell_is_a_thin_layer_on_the_vllm_base(
    cell: Cell, cuda_images: dict[str, build.Built], vllm_base: str, docker_api: Docker
) -> None:
    built = cuda_images[cell.image_name]
    assert built.base_image == vllm_base
    assert docker_api.image_labels(built.tag)[build.BASE_LABEL] == vllm_base
    added = built.size_bytes - built.base_size_bytes
    # the guard's files and an account; bitsandbytes adds its wheels' contents (~130 MB)
    assert 0 < added < (200e6 if cell.extra_packages else 5e6), added


# --- labels ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def matrix_json() -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "deploykit", "matrix", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {c["image"]: c for c in json.loads(out) if c["supported"]}


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_labels_say_what_the_matrix_says(
    cell: Cell,
    cuda_images: dict[str, build.Built],
    docker_api: Docker,
    matrix_json: dict[str, dict[str, Any]],
) -> None:
    labels = docker_api.image_labels(cuda_images[cell.image_name].tag)
    entry = matrix_json[cell.image_name]
    assert labels["io.deploykit.quant"] == entry["quant"]
    assert labels["io.deploykit.gpu-class"] == entry["gpu_class"]
    assert float(labels["io.deploykit.min-compute-capability"]) == entry["min_compute_capability"]
    assert labels["io.deploykit.vllm-version"] == entry["vllm_version"] == VLLM_VERSION
    assert labels["io.deploykit.component"] == "engine"


# --- the start-up guard ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name, config in MODELS.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config, indent=2))
    return root


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_the_guard_finds_no_gpu_and_refuses_saying_what_would_run(
    cell: Cell, cuda_images: dict[str, build.Built], docker_api: Docker, models: Path
) -> None:
    args = stack_command(cell, models, Case("stack", "", CHECKPOINT[cell.quant]))
    code, out = run(docker_api, cuda_images[cell.image_name].tag, args, models=models)
    assert code == ExitCode.NO_GPU, out
    would = " ".join(["vllm", "serve", *cell.vllm_args, *args])
    assert f"the {cell.quant} x {cell.gpu_class} engine needs one" in out
    assert f"with one it would run: {would}\n" in out
    assert "deploykit guard: hint:" in out


# --- inside each image: vLLM and its plugins -----------------------------------------------------


def run(
    docker_api: Docker,
    image: str,
    args: list[str],
    *,
    models: Path,
    entrypoint: list[str] | None = None,
    mounts: dict[str, str] | None = None,
    timeout_s: float = 900,
) -> tuple[int, str]:
    """Run a throwaway container of ``image`` (no network, the models at /models) to its end."""
    volumes = {str(models): {"bind": "/models", "mode": "ro"}}
    volumes |= {host: {"bind": path, "mode": "ro"} for host, path in (mounts or {}).items()}
    container = docker_api.client.containers.create(
        image, command=args, entrypoint=entrypoint, network_mode="none", volumes=volumes
    )
    try:
        container.start()
        code = int(container.wait(timeout=timeout_s)["StatusCode"])
        return code, container.logs(stdout=True, stderr=True).decode(errors="replace")
    finally:
        container.remove(force=True)


@dataclass
class ImageChecks:
    results: dict[str, dict[str, Any]]
    seconds: float
    output: str


@pytest.fixture(scope="session")
def engine_checks(
    cuda_images: dict[str, build.Built],
    docker_api: Docker,
    models: Path,
    tmp_path_factory: pytest.TempPathFactory,
    timings: Stopwatch,
) -> dict[str, ImageChecks]:
    """Every image's checks, one container per image, two at a time (the machine's two cores)."""
    folder = tmp_path_factory.mktemp("engine-check")
    shutil.copy(CHECK_SCRIPT, folder / CHECK_SCRIPT.name)

    def check(cell: Cell) -> ImageChecks:
        spec = [
            {
                "kind": "command",
                "name": case.name,
                "gpu": [find_gpu(case.gpu_key).name, find_gpu(case.gpu_key).compute_capability],
                "args": stack_command(cell, models, case),
            }
            for case in cases(cell)
        ]
        spec.append({"kind": "plugins", "name": "plugins"})
        (folder / f"{cell.image_name}.json").write_text(json.dumps(spec, indent=2))
        start = time.monotonic()
        code, out = run(
            docker_api,
            cuda_images[cell.image_name].tag,
            ["/check/engine_check.py", f"/check/{cell.image_name}.json"],
            models=models,
            entrypoint=["python3"],
            mounts={str(folder): "/check"},
        )
        seconds = time.monotonic() - start
        assert code == 0, out[-3000:]
        lines = [
            json.loads(line[len(MARK) :]) for line in out.splitlines() if line.startswith(MARK)
        ]
        return ImageChecks({r["name"]: r for r in lines}, seconds, out)

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip((c.image_name for c in CELLS), pool.map(check, CELLS), strict=True))
    for cell in CELLS:
        n = len(done[cell.image_name].results)
        timings.mark(f"checks in {cell.image_name} ({n} cases)", done[cell.image_name].seconds)
    timings.mark("checks in all CUDA images (two at a time)", time.monotonic() - start)
    return done


def flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


ACCEPTED = [(c, k) for c in CELLS for k in cases(c) if not k.rejected]
REJECTED = [(c, k) for c in CELLS for k in cases(c) if k.rejected]


@pytest.mark.parametrize(
    ("cell", "case"), ACCEPTED, ids=lambda v: cell_id(v) if isinstance(v, Cell) else v.name
)
def test_the_images_vllm_accepts_the_engine_command(
    cell: Cell, case: Case, engine_checks: dict[str, ImageChecks], models: Path
) -> None:
    got = engine_checks[cell.image_name].results[case.name]
    assert got["ok"] and got["stage"] == "engine", got
    command = got["command"]
    stack = stack_command(cell, models, case)
    assert command[:2] == ["vllm", "serve"] and command[-len(stack) :] == stack
    config = got["config"]
    assert config["model"] == f"/models/{case.model}"
    assert config["served_model_name"] == f"/models/{case.model}"
    assert config["tensor_parallel_size"] == 1
    # vLLM's engine configuration took what the command says
    if flag(command, "--dtype"):
        assert config["dtype"] == flag(command, "--dtype")
    if flag(command, "--kv-cache-dtype"):
        assert config["kv_cache_dtype"] == flag(command, "--kv-cache-dtype")
    quant = flag(command, "--quantization")
    checkpoint_method = MODELS[case.model].get("quantization_config", {}).get("quant_method")
    if quant:
        assert config["quantization"] == quant
    elif checkpoint_method:  # detected from the checkpoint: a method of its family, which one
        # depends on the platform (auto_gptq here, gptq_marlin on a GPU: vLLM's choice, not ours)
        assert checkpoint_method in config["quantization"]
    else:
        assert config["quantization"] is None


def test_the_guard_adds_what_the_class_and_checkpoint_need(
    engine_checks: dict[str, ImageChecks],
) -> None:
    """What the guard adds reaches vLLM: float16 below compute capability 8.0, no on-the-fly FP8
    flag for an FP8 checkpoint."""
    none_cuda = engine_checks["engine-none-cuda"].results
    assert flag(none_cuda["t4-16gb"]["command"], "--dtype") == "float16"
    assert none_cuda["t4-16gb"]["config"]["dtype"] == "float16"
    assert flag(none_cuda["a100-80gb"]["command"], "--dtype") == "bfloat16"
    for image in ("engine-fp8-cuda-fp8", "engine-fp8-cuda"):
        fp8 = engine_checks[image].results
        assert "--quantization" not in fp8["fp8-checkpoint"]["command"]
        assert fp8["fp8-checkpoint"]["config"]["quantization"] == "compressed-tensors"
        online = next(r for name, r in fp8.items() if name.endswith("gb"))
        assert flag(online["command"], "--quantization") == "fp8_per_tensor"


@pytest.mark.parametrize(
    ("cell", "case"), REJECTED, ids=lambda v: cell_id(v) if isinstance(v, Cell) else v.name
)
def test_the_images_vllm_rejects_a_wrong_value(
    cell: Cell, case: Case, engine_checks: dict[str, ImageChecks]
) -> None:
    """The check can fail: a wrong value in the command is refused by vLLM itself."""
    got = engine_checks[cell.image_name].results[case.name]
    assert not got["ok"] and got["stage"] == case.rejected, got
    words = {
        "wrong-quantization": "does not match the quantization method specified",
        "too-long": "is greater than the derived max_model_len",
        "no-such-kv-dtype": "Invalid kv_cache_dtype: 'fp9'",
        "no-such-dtype": "invalid choice: 'bfloat17'",
    }[case.name]
    assert words in got["error"], got


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_bitsandbytes_imports_and_registers_only_in_its_images(
    cell: Cell, engine_checks: dict[str, ImageChecks]
) -> None:
    got = engine_checks[cell.image_name].results["plugins"]
    assert got["ok"], got
    if cell.quant is Quant.BITSANDBYTES:
        assert f"bitsandbytes=={got['bitsandbytes']}" in BNB_PACKAGES
        assert "bitsandbytes" in got["plugins"] and "bitsandbytes" in got["quantization_methods"]
    else:
        assert (
            got["bitsandbytes"] is None
            and "No module named 'bitsandbytes'" in got["bitsandbytes_error"]
        )
        assert "bitsandbytes" not in got["quantization_methods"]
    assert {"awq", "gptq", "fp8_per_tensor"} <= set(got["quantization_methods"])


def test_no_check_was_left_out(engine_checks: dict[str, ImageChecks]) -> None:
    """Every case of every image reported (a crash of the check script would leave gaps)."""
    for cell in CELLS:
        expected = {c.name for c in cases(cell)} | {"plugins"}
        assert set(engine_checks[cell.image_name].results) == expected, cell.image_name

"""deploykit.checkpoint against the config files of real checkpoints (tests/data/checkpoints), the
plan and the guard agreeing on them, and the guard as the engine images carry it (copied, run alone).

Configs written here (not recorded) say so where they are defined.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploykit import checkpoint, errors, guard
from deploykit.errors import ExitCode, ModelError
from deploykit.files import write_files
from deploykit.guard import Guard
from deploykit.matrix import Cell, methods_serving, resolve_target, supported_cells
from deploykit.plan import check_checkpoint, read_model
from deploykit.render import image_facts, render_all

CHECKPOINTS = Path(__file__).resolve().parents[1] / "data" / "checkpoints"

#: folder -> (quant_method, method, description), as deploykit reads the recorded files.
RECORDED: dict[str, tuple[str | None, str | None, str]] = {
    "llm-compressor-tinyllama-fp8": ("compressed-tensors", "fp8", "FP8 (compressed-tensors)"),
    "llm-compressor-stories42m-sparse24": (
        "compressed-tensors",
        None,
        "no quantization scheme (compressed-tensors)",
    ),
}


def read(folder: Path) -> checkpoint.CheckpointQuant:
    return checkpoint.detect(*checkpoint.read_configs(folder))


def test_every_recorded_checkpoint_has_an_expectation() -> None:
    folders = {p.name for p in CHECKPOINTS.iterdir() if p.is_dir()}
    assert folders == set(RECORDED) and folders  # a folder without a row is not tested


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_checkpoints_read_as_expected(name: str) -> None:
    found = read(CHECKPOINTS / name)
    assert (found.quant_method, found.method, found.description) == RECORDED[name]


def plan_accepts(cell: Cell, folder: Path) -> bool:
    try:
        check_checkpoint(cell.quant, read_model(folder))
    except ModelError:
        return False
    return True


def guard_accepts(cell: Cell, folder: Path) -> bool:
    image = Guard(image_facts(cell))
    try:
        image.check_checkpoint(["--model", str(folder)], list(image.facts.vllm_args))
    except SystemExit as exit_:
        assert exit_.code == ExitCode.MODEL
        return False
    return True


def written(tmp_path: Path, name: str, quantization_config: dict[str, object] | None) -> Path:
    """A checkpoint folder written here (not recorded): a small Llama config with this quantization."""
    folder = tmp_path / name
    folder.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 512,
        "num_attention_heads": 8,
        "num_hidden_layers": 2,
        "torch_dtype": "bfloat16",
        "quantization_config": quantization_config,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


#: Written here (not recorded): an unquantized checkpoint, and the cases where the start-up guard and
#: the plan used to describe a checkpoint differently.
WRITTEN: dict[str, dict[str, object] | None] = {
    "unquantized": None,
    # a quantization_config that names no format: no method serves it (the guard took it for
    # compressed-tensors before)
    "unnamed": {"bits": 4, "group_size": 128},
    # compressed-tensors without quant_method, told by its config groups
    "groups-only": {"config_groups": {"g": {"weights": {"num_bits": 8, "type": "float"}}}},
    # the hf_quant_config.json layout inside config.json (vLLM reads it as modelopt)
    "modelopt-inline": {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8"}},
    # vLLM normalises compressed_tensors to compressed-tensors
    "underscore": {
        "quant_method": "compressed_tensors",
        "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}},
    },
}


def test_the_cases_that_used_to_disagree(tmp_path: Path) -> None:
    got = {name: read(written(tmp_path, name, qc)) for name, qc in WRITTEN.items()}
    assert got["unnamed"].quantized and got["unnamed"].method is None
    assert got["unnamed"].description == "quantized with an unnamed method"
    assert methods_serving(got["unnamed"]) == []
    assert (got["groups-only"].quant_method, got["groups-only"].method) == (
        "compressed-tensors",
        "fp8",
    )
    assert (got["modelopt-inline"].quant_method, got["modelopt-inline"].method) == (
        "modelopt",
        "fp8",
    )
    assert got["underscore"].description == "int 4-bit (compressed-tensors)"


def checkpoint_folders(tmp_path: Path) -> list[Path]:
    recorded = [CHECKPOINTS / name for name in sorted(RECORDED)]
    return recorded + [written(tmp_path, name, qc) for name, qc in WRITTEN.items()]


def test_plan_and_guard_agree_on_every_checkpoint_and_image(tmp_path: Path) -> None:
    verdicts = {
        (folder.name, f"{cell.quant}-{cell.gpu_class}"): (
            plan_accepts(cell, folder),
            guard_accepts(cell, folder),
        )
        for folder in checkpoint_folders(tmp_path)
        for cell in supported_cells()
    }
    differ = {key: v for key, v in verdicts.items() if v[0] != v[1]}
    assert differ == {}
    accepted = {key for key, (plan, _) in verdicts.items() if plan}
    # FP8 checkpoints are served by the fp8 images only; what no method serves, by none
    assert ("llm-compressor-tinyllama-fp8", "fp8-cuda-fp8") in accepted
    assert ("llm-compressor-tinyllama-fp8", "none-cuda") not in accepted
    assert not {
        key for key in accepted if key[0] in ("unnamed", "llm-compressor-stories42m-sparse24")
    }


# --- the guard as the engine images carry it ------------------------------------------------------


def test_every_engine_image_carries_the_package_modules_unchanged() -> None:
    files = render_all().as_dict()
    package = Path(guard.__file__).parent
    engines = [c.image_name for c in supported_cells()]
    for image in engines:
        for name in guard.IMAGE_FILES:
            assert files[f"images/{image}/{name}"] == (package / name).read_text(), (image, name)
        facts = json.loads(files[f"images/{image}/{guard.FACTS_FILE.name}"])
        assert guard.ImageFacts.from_json(facts).quant == image.split("-")[1]
    assert checkpoint.__file__ and errors.__file__  # the modules the guard imports exist


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rendered")
    write_files(render_all(), root)
    return root / "images"


def run_alone(folder: Path, args: list[str], path: str) -> subprocess.CompletedProcess[str]:
    """The copied guard.py as the image runs it (``python3 /opt/deploykit/guard.py``), with the
    standard library only: no site-packages (so no deploykit), no PYTHON* variables."""
    return subprocess.run(
        [sys.executable, "-E", "-S", str(folder / "guard.py"), *args],
        capture_output=True,
        text=True,
        env={"PATH": path},
        timeout=60,
        check=False,
    )


def test_the_copied_guard_refuses_a_checkpoint_on_its_own(images: Path) -> None:
    fp8 = CHECKPOINTS / "llm-compressor-tinyllama-fp8"
    result = run_alone(images / "engine-none-cpu", ["--model", str(fp8)], os.defpath)
    assert result.returncode == ExitCode.MODEL, result.stderr
    assert "--quant none was asked for" in result.stderr
    assert "quantized with compressed-tensors (FP8)" in result.stderr
    assert "hint: serve it with --quant fp8" in result.stderr


def test_the_copied_guard_checks_gpus_on_its_own(images: Path, tmp_path: Path) -> None:
    image = images / "engine-awq-cuda-fp8"
    empty = tmp_path / "empty"
    empty.mkdir()
    none = run_alone(image, ["--model", "Qwen/Qwen2.5-7B-Instruct-AWQ"], str(empty))
    assert none.returncode == ExitCode.NO_GPU, none.stderr
    assert "no NVIDIA GPU is visible" in none.stderr
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA T4, 7.5'\n")
    smi.chmod(0o755)
    t4 = run_alone(image, ["--model", "Qwen/Qwen2.5-7B-Instruct-AWQ"], f"{fake}:{os.defpath}")
    assert t4.returncode == ExitCode.UNSUPPORTED, t4.stderr
    assert "methods that run on NVIDIA T4: none, fp8, awq, gptq, bitsandbytes" in t4.stderr


def test_a_refusal_prints_error_and_hint_and_exits_with_its_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        guard.fail(errors.GpuError("no GPU", "add one"))
    assert exit_.value.code == ExitCode.NO_GPU
    assert capsys.readouterr().err == (
        "deploykit guard: error: no GPU\ndeploykit guard: hint: add one\n"
    )


def test_facts_survive_their_file() -> None:
    facts = image_facts(resolve_target("fp8", "cuda"))
    assert guard.ImageFacts.from_json(json.loads(json.dumps(facts.to_json()))) == facts

"""The engine images' start-up guard (deploykit/guard.py), fed GPU inventories and real configs.

GPU data: tests/data/h100-nvml.json was recorded on a real H100 (see tests/data/README.md); the
T4 and V100 inventories are written by hand and say so in their `source` field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploykit.errors import ExitCode
from deploykit.guard import Guard
from deploykit.matrix import resolve_target
from deploykit.render import image_facts

DATA = Path(__file__).resolve().parents[1] / "data"


def inventory(name: str) -> list[tuple[str, float]]:
    data = json.loads((DATA / name).read_text())
    return [(g["name"], float(g["compute_capability"])) for g in data["gpus"]]


def load_guard(tmp_path: Path, quant: str, gpu_class: str) -> Guard:
    """The guard of one engine image, with the facts its facts.json holds."""
    return Guard(image_facts(resolve_target(quant, gpu_class)))


def checkpoint(tmp_path: Path, quantization_config: dict | None) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_fp8_w8a8_image_runs_on_the_recorded_h100(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = load_guard(tmp_path, "fp8", "cuda-fp8")
    monkeypatch.setattr(guard, "visible_gpus", lambda: inventory("h100-nvml.json"))
    assert guard.check_gpus() == 9.0


def test_fp8_w8a8_image_refuses_a_t4_and_names_what_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    guard = load_guard(tmp_path, "fp8", "cuda-fp8")
    monkeypatch.setattr(guard, "visible_gpus", lambda: inventory("t4-written.json"))
    with pytest.raises(SystemExit) as exit_:
        guard.check_gpus()
    assert exit_.value.code == ExitCode.UNSUPPORTED
    err = capsys.readouterr().err
    assert "fp8" in err and "NVIDIA T4" in err and "7.5" in err and "8.9" in err
    assert (
        "methods that run on NVIDIA T4: none, fp8, awq, gptq, bitsandbytes (use the cuda images)"
        in err
    )


def test_volta_is_refused_by_every_cuda_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    guard = load_guard(tmp_path, "none", "cuda")
    monkeypatch.setattr(guard, "visible_gpus", lambda: inventory("v100-written.json"))
    with pytest.raises(SystemExit) as exit_:
        guard.check_gpus()
    assert exit_.value.code == ExitCode.UNSUPPORTED
    assert "7.5 or newer" in capsys.readouterr().err


def test_no_gpu_visible_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    guard = load_guard(tmp_path, "fp8", "cuda-fp8")
    monkeypatch.setattr(guard, "visible_gpus", lambda: [])
    with pytest.raises(SystemExit) as exit_:
        guard.command(["--model", "/models/m", "--port", "8000"])
    assert exit_.value.code == ExitCode.NO_GPU
    err = capsys.readouterr().err
    assert "the fp8 x cuda-fp8 engine needs one of compute capability 8.9 or newer" in err
    assert (
        "with one it would run: vllm serve --quantization fp8_per_tensor --kv-cache-dtype fp8 "
        "--model /models/m --port 8000\n" in err
    )
    assert "NVIDIA container runtime" in err and "--gpu-class cpu" in err


def test_bf16_becomes_fp16_on_turing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guard = load_guard(tmp_path, "none", "cuda")
    monkeypatch.setattr(guard, "visible_gpus", lambda: inventory("t4-written.json"))
    cc = guard.check_gpus()
    assert guard.with_dtype(list(guard.facts.vllm_args), cc) == ["--dtype", "float16"]
    assert guard.with_dtype(list(guard.facts.vllm_args), 8.0) == ["--dtype", "bfloat16"]


@pytest.mark.parametrize(
    ("quant", "config", "words"),
    [
        ("awq", None, ["needs a checkpoint quantized with awq", "not quantized"]),
        ("awq", {"quant_method": "gptq", "bits": 4}, ["quantized with gptq", "--quant gptq"]),
        ("gptq", {"quant_method": "awq", "bits": 4}, ["quantized with awq", "--quant awq"]),
        ("fp8", {"quant_method": "awq", "bits": 4}, ["quantized with awq", "--quant awq"]),
        ("bitsandbytes", {"quant_method": "gptq"}, ["quantized with gptq"]),
    ],
)
def test_checkpoint_mismatch_is_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    quant: str,
    config: dict | None,
    words: list[str],
) -> None:
    guard = load_guard(tmp_path, quant, "cuda-fp8")
    model = checkpoint(tmp_path, config)
    with pytest.raises(SystemExit) as exit_:
        guard.check_checkpoint(["--model", model], list(guard.facts.vllm_args))
    assert exit_.value.code == ExitCode.MODEL
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_prequantized_fp8_checkpoint_drops_the_online_flag(tmp_path: Path) -> None:
    guard = load_guard(tmp_path, "fp8", "cuda-fp8")
    model = checkpoint(tmp_path, {"quant_method": "fp8", "activation_scheme": "dynamic"})
    args = guard.check_checkpoint(["--model", model], list(guard.facts.vllm_args))
    assert args == ["--kv-cache-dtype", "fp8"]


def test_bf16_checkpoint_keeps_online_fp8(tmp_path: Path) -> None:
    guard = load_guard(tmp_path, "fp8", "cuda-fp8")
    model = checkpoint(tmp_path, None)
    args = guard.check_checkpoint(["--model", model], list(guard.facts.vllm_args))
    assert args[:2] == ["--quantization", "fp8_per_tensor"]


def test_matching_awq_checkpoint_passes(tmp_path: Path) -> None:
    guard = load_guard(tmp_path, "awq", "cuda")
    model = checkpoint(tmp_path, {"quant_method": "awq", "bits": 4, "group_size": 128})
    assert guard.check_checkpoint(["--model", model], []) == []


def test_hub_model_id_skips_the_checkpoint_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    guard = load_guard(tmp_path, "awq", "cuda")
    assert guard.check_checkpoint(["--model", "Qwen/Qwen2.5-7B-Instruct-AWQ"], []) == []
    assert "checkpoint check skipped" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config",
    [
        {
            "quant_method": "compressed-tensors",
            "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}},
        },
        {"quant_method": "modelopt", "quant_algo": "FP8"},
    ],
    ids=["compressed-tensors", "modelopt"],
)
def test_fp8_checkpoints_in_other_formats_are_fp8(tmp_path: Path, config: dict) -> None:
    guard = load_guard(tmp_path, "fp8", "cuda-fp8")
    model = checkpoint(tmp_path, config)
    assert guard.check_checkpoint(["--model", model], list(guard.facts.vllm_args)) == [
        "--kv-cache-dtype",
        "fp8",
    ]


def test_int4_compressed_tensors_is_not_served_as_fp8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    guard = load_guard(tmp_path, "fp8", "cuda-fp8")
    config = {
        "quant_method": "compressed-tensors",
        "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}},
    }
    with pytest.raises(SystemExit) as exit_:
        guard.check_checkpoint(["--model", checkpoint(tmp_path, config)], [])
    assert exit_.value.code == ExitCode.MODEL
    assert "compressed-tensors (int 4-bit)" in capsys.readouterr().err

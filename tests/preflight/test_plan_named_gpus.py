"""`deploykit plan --gpu NAME [--count N]`: planning for GPUs this machine does not have, from the
catalogue (deploykit/gpucatalogue.py), through the real entry point."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploykit import gpucatalogue
from deploykit.cli import main
from deploykit.devices import load_inventory
from deploykit.matrix import gpu_class_for

from .conftest import DATA, LLAMA3_8B, QWEN25_32B


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_named_gpu_plans_like_the_recorded_one(
    make_model: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """--gpu H100-80GB gives the plan the recorded H100 gives (same memory, same capability)."""
    model = str(make_model(QWEN25_32B))
    code, named, err = run(["plan", "--model", model, "--gpu", "h100", "--json"], capsys)
    assert code == 0, err
    code, recorded, _ = run(
        ["plan", "--model", model, "--gpus-file", str(DATA / "h100-nvml.json"), "--json"], capsys
    )

    def profiles(out: str) -> list[dict[str, Any]]:  # all but the GPUs' ids
        return [{k: v for k, v in p.items() if k != "gpus"} for p in json.loads(out)["profiles"]]

    assert profiles(named) == profiles(recorded)
    assert json.loads(named)["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"


def test_count_gives_tensor_parallel_profiles(
    make_model: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(make_model(QWEN25_32B))
    code, out, err = run(
        ["plan", "--model", model, "--gpu", "RTX-4090-24GB", "--count", "2", "--json"], capsys
    )
    assert code == 0, err
    data = json.loads(out)
    assert len(data["gpus"]) == 2 and {g["name"] for g in data["gpus"]} == {
        "NVIDIA GeForce RTX 4090"
    }
    assert {p["tensor_parallel_size"] for p in data["profiles"]} >= {1, 2}
    # a 32B model does not fit one 24 GB card unquantized; the table says so and names a fit
    code, out, _ = run(["plan", "--model", model, "--gpu", "RTX-4090-24GB"], capsys)
    assert "incompatible" in out or "low memory" in out


def test_a_gpu_too_old_for_every_method_is_refused_with_reasons(
    make_model: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        ["plan", "--model", str(make_model(LLAMA3_8B)), "--gpu", "V100-32GB"], capsys
    )
    assert code == 6, out + err
    assert "error: no profile fits" in err


def test_unknown_or_ambiguous_names_list_the_catalogue(
    make_model: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(make_model(LLAMA3_8B))
    code, _, err = run(["plan", "--model", model, "--gpu", "GTX-1080"], capsys)
    assert code == 2 and "not in the GPU catalogue" in err and "H100-80GB" in err
    code, _, err = run(["plan", "--model", model, "--gpu", "A100"], capsys)
    assert code == 2 and "A100-80GB, A100-40GB" in err
    code, _, err = run(["plan", "--model", model, "--gpu", "L4", "--count", "0"], capsys)
    assert code == 2 and "--count 0" in err
    code, _, err = run(
        ["plan", "--model", model, "--gpu", "L4", "--gpus-file", str(DATA / "h100-nvml.json")],
        capsys,
    )
    assert code == 2 and "--gpu and --gpus-file" in err


def test_catalogue_lists_every_gpu_with_a_source(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["gpus", "--catalogue", "--json"], capsys)
    assert code == 0
    listed = json.loads(out)
    assert [g["key"] for g in listed] == [g.key for g in gpucatalogue.CATALOGUE]
    for g in listed:
        assert g["source"].startswith("memory: ") and "cuda-gpus" in g["source"]
        assert g["memory_gib"] > 10 and 7.0 <= g["compute_capability"] <= 12.0
    code, out, _ = run(["gpus", "--catalogue"], capsys)
    assert code == 0 and "RTX-4090-24GB" in out


@pytest.mark.parametrize("record", ["h100-nvml.json", "h200-nvml.json"])
def test_recorded_entries_match_their_recordings(record: str) -> None:
    """Catalogue entries taken from a recording say so and carry its numbers."""
    gpu = load_inventory(DATA / record).gpus[0]
    entry = next(g for g in gpucatalogue.CATALOGUE if g.name == gpu.name)
    assert entry.memory_bytes == gpu.memory_total
    assert entry.compute_capability == gpu.compute_capability
    assert record in entry.source


def test_every_entry_has_a_gpu_class_or_is_refused_by_the_matrix() -> None:
    classes: dict[str, Any] = {}
    for g in gpucatalogue.CATALOGUE:
        try:
            classes[g.key] = str(gpu_class_for(g.compute_capability))
        except Exception as err:  # the matrix's own refusal (below the lowest class)
            classes[g.key] = type(err).__name__
    assert classes["H100-80GB"] == "cuda-fp8" and classes["A100-80GB"] == "cuda"
    assert classes["T4-16GB"] == "cuda" and classes["V100-32GB"] == "UnsupportedError"

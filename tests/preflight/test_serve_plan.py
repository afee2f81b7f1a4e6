"""``deploykit serve``'s pure parts: the processes' commands and environments from the matrix, the
guard and the compose stack's settings; the tested vLLM range; refused flags. No process starts."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from deploykit import render, stack
from deploykit.devices import GpuInventory, load_inventory
from deploykit.errors import DeployKitError, UsageError
from deploykit.matrix import VLLM_TESTED_RANGE, vllm_version_warning
from deploykit.serve import plan as serve
from deploykit.serve.host import check_not_running, check_ports_free
from deploykit.serve.plan import ServeRequest, plan_serve
from deploykit.serve.record import ServeState

from .conftest import DATA, LLAMA3_8B, LLAMA3_8B_FP8_CT

MakeModel = Callable[..., Path]

PYTHON = "/opt/vllm/bin/python"
TINY = {
    **LLAMA3_8B,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 1024,
    "vocab_size": 1000,
}


def plan_for(
    model: Path, tmp_path: Path, inventory: GpuInventory | None = None, **kw: object
) -> serve.ServePlan:
    given: dict[str, object] = {
        "model": str(model),
        "state_dir": tmp_path / "state",
        "name": "t1",
        "mqtt_port": 1897,
        "engine_port": 18001,
        "bridge_port": 18002,
        **kw,
    }
    request = ServeRequest(**given)  # type: ignore[arg-type]
    gpus = list(inventory.gpus) if inventory is not None else []
    return plan_serve(request, vllm_python=PYTHON, inventory=gpus)


def test_cpu_cell_runs_the_cells_arguments(make_model: MakeModel, tmp_path: Path) -> None:
    model = make_model(TINY)
    plan = plan_for(model, tmp_path)
    assert serve.engine_command(plan) == [
        PYTHON, "-m", "vllm.entrypoints.openai.api_server",
        "--dtype", "bfloat16", "--enforce-eager",
        "--model", str(model.resolve()), "--served-model-name", model.name,
        "--host", "127.0.0.1", "--port", "18001",
    ]  # fmt: skip
    env = serve.engine_environment(plan, "k3y")
    assert env == {**render.ENGINE_ENVIRONMENT, "VLLM_API_KEY": "k3y"}
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_gpus_pinned_by_uuid_with_tensor_parallel(make_model: MakeModel, tmp_path: Path) -> None:
    pair = load_inventory(DATA / "h100x2-nvml.json")
    plan = plan_for(make_model(LLAMA3_8B), tmp_path, pair, quant="fp8", gpus="0,1")
    command = serve.engine_command(plan)
    uuids = [g.uuid for g in pair.gpus]
    env = serve.engine_environment(plan, "k3y")
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(uuids)
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    fixed = ["--quantization", "fp8_per_tensor", "--kv-cache-dtype", "fp8"]
    assert command[3:7] == fixed
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    assert "k3y" not in command


def test_prequantized_checkpoint_drops_the_on_the_fly_flags(
    make_model: MakeModel, h100: GpuInventory, tmp_path: Path
) -> None:
    plan = plan_for(make_model(LLAMA3_8B_FP8_CT), tmp_path, h100, quant="fp8")
    command = serve.engine_command(plan)
    assert "--quantization" not in command
    assert command[command.index("--kv-cache-dtype") + 1] == "fp8"


def test_float16_below_compute_capability_8(
    make_model: MakeModel, t4: GpuInventory, tmp_path: Path
) -> None:
    """On a driver older than the CUDA images need: serve's vLLM brings its own CUDA."""
    plan = plan_for(make_model(TINY), tmp_path, t4)
    command = serve.engine_command(plan)
    assert command[command.index("--dtype") + 1] == "float16"


@pytest.mark.parametrize(
    ("version", "config", "added"),
    [
        ("0.24.0", None, ["--stream-interval", "4"]),  # auto: its floor
        ("0.26.0", "bridge:\n  engine_stream_tokens: 8\n", ["--stream-interval", "8"]),
        ("0.26.0", "bridge:\n  engine_stream_tokens: 1\n", []),  # one token per event, asked
        ("0.27.0", None, []),  # takes the request's stream_interval: the bridge paces per request
        ("0.33.0", None, []),
        ("nightly", None, []),  # unreadable: left as vLLM's default
    ],
)
def test_a_vllm_without_request_stream_interval_gets_the_bridges_floor_server_wide(
    make_model: MakeModel, tmp_path: Path, version: str, config: str | None, added: list[str]
) -> None:
    """vLLM 0.24-0.26 ignore a request's stream_interval (checked in their sdists'
    vllm/sampling_params.py; 0.27.0 has it), so serve asks for the bridge's floor for everyone."""
    extra: dict[str, object] = {}
    if config is not None:
        (tmp_path / "bridge.yaml").write_text(config)
        extra["bridge_config"] = tmp_path / "bridge.yaml"
    plan = plan_for(make_model(TINY), tmp_path, **extra)
    without = serve.engine_command(plan)
    assert serve.stream_interval_args(plan, version) == added
    assert serve.engine_command(plan, added) == without + added  # after the rest


def test_bridge_is_configured_as_in_the_compose_stack(
    make_model: MakeModel, tmp_path: Path
) -> None:
    plan = plan_for(make_model(TINY), tmp_path, projects=("general", "maze"))
    env = serve.bridge_environment(plan)
    secrets = tmp_path / "state" / "t1" / "secrets"
    assert env == {
        "DEPLOYKIT_BROKER": "mqtt://127.0.0.1:1897",
        "DEPLOYKIT_ENGINE": "http://127.0.0.1:18001",
        "DEPLOYKIT_PROJECTS": "general,maze",
        "DEPLOYKIT_BRIDGE_NAME": "bridge-1",
        "DEPLOYKIT_HTTP_PORT": "18002",
        "DEPLOYKIT_HTTP_HOST": "127.0.0.1",
        "DEPLOYKIT_MQTT_USERNAME_FILE": str(secrets / "mqtt_bridge_username"),
        "DEPLOYKIT_MQTT_PASSWORD_FILE": str(secrets / "mqtt_bridge_password"),
        "DEPLOYKIT_CLIENT_ID_FILE": str(secrets / "bridge_client_id"),
        "DEPLOYKIT_ENGINE_API_KEY_FILE": str(secrets / "engine_api_key"),
    }


def test_an_existing_broker_takes_the_given_account(make_model: MakeModel, tmp_path: Path) -> None:
    user, password = tmp_path / "user", tmp_path / "password"
    user.write_text("bridge\n")
    password.write_text("secret\n")
    plan = plan_for(
        make_model(TINY),
        tmp_path,
        broker="mqtts://broker.example:8883",
        mqtt_username_file=user,
        mqtt_password_file=password,
        mqtt_port=18002,  # only serve's own broker listens on --mqtt-port
    )
    env = serve.bridge_environment(plan)
    assert env["DEPLOYKIT_BROKER"] == "mqtts://broker.example:8883"
    assert env["DEPLOYKIT_MQTT_USERNAME_FILE"] == str(user)
    assert plan.ports() == {"engine": 18001, "bridge": 18002}


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"broker": "mqtt://h:1883"}, "needs an account on that broker"),
        ({"mqtt_username_file": Path("/etc/hostname")}, "are for an existing broker"),
        ({"broker": "http://h:1883"}, "unsupported broker URL scheme"),
        ({"engine_port": 1897}, "ports must differ"),
        ({"quant": "awq"}, "awq"),
        ({"quant": "nope"}, "unknown quantization method"),
    ],
)
def test_bad_flags_are_refused_with_what_to_do(
    make_model: MakeModel, tmp_path: Path, kw: dict[str, object], says: str
) -> None:
    with pytest.raises(DeployKitError) as err:
        plan_for(make_model(TINY), tmp_path, **kw)
    assert says in err.value.message
    assert err.value.hint


def test_missing_model_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="the folder does not exist"):
        plan_for(tmp_path / "nothing-here", tmp_path)


def test_broker_runs_the_images_configuration_from_a_folder(tmp_path: Path) -> None:
    layout = render.BrokerLayout(
        user="me",
        config_dir=f"{tmp_path}/conf",
        auth_dir=f"{tmp_path}/auth",
        data_dir=f"{tmp_path}/data",
        health_port=None,
        tls_include=False,
    )
    files = render.broker_config(layout, 1897)
    image = {str(f.path): f.text for f in render.broker_image().files}
    assert files["acl"] == image["acl"]
    assert files["entrypoint.sh"] == image["entrypoint.sh"]
    conf = files["mosquitto.conf"]
    assert f"password_file {tmp_path}/auth/passwd\n" in conf
    assert f"acl_file {tmp_path}/auth/acl\n" in conf
    assert f"persistence_location {tmp_path}/data/\n" in conf
    assert "listener 1897\n" in conf and "user me\n" in conf
    assert "1884" not in conf and "include_dir" not in conf
    # the rest is the image's configuration, line for line
    kept = [line for line in image["mosquitto.conf"].splitlines() if line and "/" not in line]
    ours = conf.splitlines()
    assert [line for line in kept if line not in ours] == [
        "user mosquitto",
        "listener 1883",
        "listener 1884 127.0.0.1",
        "allow_anonymous true",
        "# The TLS listener (8883), written here by the entrypoint when the stack has a certificate.",
    ]


@pytest.mark.parametrize("version", ["0.24.0", "0.32.0+cpu", "0.33.0", "0.33.2rc1"])
def test_versions_in_the_tested_range_pass(version: str) -> None:
    assert vllm_version_warning(version) is None


@pytest.mark.parametrize("version", ["0.23.1", "0.34.0", "1.0.0", "0.8.5", "dev"])
def test_versions_outside_the_tested_range_name_it(version: str) -> None:
    warning = vllm_version_warning(version)
    assert warning is not None and version in warning
    assert f"{VLLM_TESTED_RANGE[0]} to {VLLM_TESTED_RANGE[1]}" in warning


def test_a_taken_port_is_refused_naming_its_flag() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} for the engine is taken") as err:
            check_ports_free({"engine": port})
        assert "--engine-port" in (err.value.hint or "")


def test_an_instance_that_runs_or_a_compose_stack_is_not_replaced(
    make_model: MakeModel, tmp_path: Path
) -> None:
    plan = plan_for(make_model(TINY), tmp_path)
    plan.folder.mkdir(parents=True)
    check_not_running(plan.name, plan.folder)  # nothing recorded
    stack.record_stack(plan.stack)
    with pytest.raises(UsageError, match="is a compose stack"):
        check_not_running(plan.name, plan.folder)
    state = ServeState(
        engine_url=plan.engine_url,
        engine_api_key_file=plan.secrets.engine_api_key_file,
        bridge_url=plan.bridge_url,
        broker_url=str(plan.broker),
        local_broker=True,
        logs_dir=plan.logs_dir,
        supervisor_pid=os.getpid(),
        vllm_python=PYTHON,
        vllm_version="0.32.0",
    )
    stack.record_stack(plan.stack, state)
    with pytest.raises(UsageError, match=f"already runs \\(pid {os.getpid()}\\)"):
        check_not_running(plan.name, plan.folder)
    gone = subprocess.Popen(["true"])
    gone.wait()
    stack.record_stack(plan.stack, replace(state, supervisor_pid=gone.pid))
    check_not_running(plan.name, plan.folder)  # left behind by a serve that was killed
    assert stack.load_record(plan.folder).serve == replace(state, supervisor_pid=gone.pid)

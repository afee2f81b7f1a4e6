"""Containers area logic that needs no Docker: secrets, --gpus, up plans, health layering, errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from deploykit import build, devices, health, render, stack
from deploykit.baseimages import MOSQUITTO_BASE, PYTHON_BASE, BaseKind
from deploykit.checks import Status
from deploykit.docker import explain
from deploykit.errors import CheckFailed, GpuError, UnsupportedError, UsageError
from deploykit.matrix import VLLM_VERSION, GpuClass, resolve_target
from deploykit.secrets import ensure_secrets

DATA = Path(__file__).resolve().parent.parent / "data"


# --- secrets ----------------------------------------------------------------------------------------


def test_secrets_are_private_stable_and_grow_with_projects(tmp_path: Path) -> None:
    folder = ensure_secrets(tmp_path / "s", ["general", "maze"])
    assert stat.S_IMODE(folder.path.stat().st_mode) == 0o700
    names = sorted(p.name for p in folder.path.iterdir())
    assert names == [
        "bridge_client_id",
        "bridge_share_group",
        "engine_api_key",
        "hf_token",
        "mqtt_bridge_password",
        "mqtt_bridge_username",
        "mqtt_client_general_password",
        "mqtt_client_maze_password",
        "mqtt_users",
        "redis_password",
    ]
    for p in folder.path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    users = dict(line.split(":", 1) for line in folder.users_file.read_text().splitlines())
    assert users["deploykit-bridge"] == folder.bridge_password_file.read_text().strip()
    assert users["general"] == folder.client_password("general")
    assert len(users["maze"]) >= 24 and users["maze"] != users["general"]
    assert folder.hf_token_file.read_text() == ""
    # the bridge's client id and share group: secret, valid MQTT ids, not guessable from names
    client_id = folder.bridge_client_id_file.read_text().strip()
    group = folder.bridge_share_group_file.read_text().strip()
    for secret in (client_id, group):
        assert secret.isalnum() and len(secret) >= 32, secret
    assert client_id != group and "bridge" not in client_id
    assert len(folder.engine_api_key_file.read_text().strip()) >= 24
    before = folder.users_file.read_text()
    again = ensure_secrets(tmp_path / "s", ["general", "robot"])
    after = dict(line.split(":", 1) for line in again.users_file.read_text().splitlines())
    assert after["general"] == users["general"] and after["maze"] == users["maze"]
    assert set(after) == {"deploykit-bridge", "general", "maze", "robot"}
    assert before != again.users_file.read_text()
    assert again.bridge_client_id_file.read_text().strip() == client_id  # stable across up
    with pytest.raises(UsageError, match="no MQTT account for project 'nope'"):
        again.client_password("nope")


# --- --gpus and up plans -------------------------------------------------------------------------


def test_gpus_without_nvml_pass_indices_and_uuids_through() -> None:
    assert stack.resolve_gpus("2", []).device_ids == ("2",)
    assert stack.resolve_gpus("0, 1", []).device_ids == ("0", "1")
    assert stack.resolve_gpus("GPU-abc,GPU-def", []).device_ids == ("GPU-abc", "GPU-def")
    with pytest.raises(UsageError, match="needs NVML"):
        stack.resolve_gpus("all", [])
    with pytest.raises(UsageError, match="twice"):
        stack.resolve_gpus("1,1", [])


def test_gpus_with_nvml_pin_by_uuid(four_h100: list[devices.GpuInfo]) -> None:
    pinned = stack.resolve_gpus("2", four_h100)
    assert pinned.device_ids == (four_h100[2].uuid,)
    assert pinned.compute_capability == 9.0
    assert stack.resolve_gpus("0,1", four_h100).device_ids == (four_h100[0].uuid, four_h100[1].uuid)
    with pytest.raises(GpuError, match="no GPU with index 7"):
        stack.resolve_gpus("7", four_h100)


def _compose(plan: stack.StackPlan) -> dict:
    from deploykit.render import render_compose

    return yaml.safe_load(render_compose(plan.cell, plan.options))


def test_up_plan_pins_gpus_and_sets_tensor_parallel(
    four_h100: list[devices.GpuInfo], tmp_path: Path
) -> None:
    plan = stack.plan_up(
        stack.UpRequest(quant="fp8", gpus="1,3", state_dir=tmp_path), inventory=four_h100
    )
    assert plan.cell.gpu_class is GpuClass.CUDA_FP8
    engine = _compose(plan)["services"]["engine"]
    devices_ = engine["deploy"]["resources"]["reservations"]["devices"]
    assert devices_ == [
        {
            "driver": "nvidia",
            "device_ids": [four_h100[1].uuid, four_h100[3].uuid],
            "capabilities": ["gpu"],
        }
    ]
    assert engine["environment"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    cmd = engine["command"]
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"


def test_up_without_gpus_is_the_cpu_stack(tmp_path: Path) -> None:
    plan = stack.plan_up(stack.UpRequest(state_dir=tmp_path), inventory=[])
    assert plan.cell.gpu_class is GpuClass.CPU
    assert plan.served_model_name == "demo"
    assert "deploy" not in _compose(plan)["services"]["engine"]


def test_up_refuses_what_the_pinned_gpus_cannot_run(tmp_path: Path) -> None:
    v100 = devices.load_inventory(DATA / "v100-written.json").gpus
    with pytest.raises(UnsupportedError, match="compute capability 7"):
        stack.plan_up(stack.UpRequest(quant="awq", gpus="0", state_dir=tmp_path), inventory=v100)
    with pytest.raises(GpuError, match="NVML is not available"):
        stack.plan_up(stack.UpRequest(quant="fp8", gpus="0", state_dir=tmp_path), inventory=[])
    with pytest.raises(UsageError, match="unknown quantization"):
        stack.plan_up(stack.UpRequest(quant="int3", state_dir=tmp_path), inventory=[])
    with pytest.raises(UnsupportedError):
        stack.plan_up(
            stack.UpRequest(quant="awq", gpu_class="cpu", state_dir=tmp_path), inventory=[]
        )


def test_written_stack_is_found_again(tmp_path: Path) -> None:
    plan = stack.plan_up(
        stack.UpRequest(projects=["general", "maze"], state_dir=tmp_path, mqtt_port=18999),
        inventory=[],
    )
    stack.write_compose(plan)
    with pytest.raises(UsageError, match="no stack is recorded"):
        stack.load_stack(plan.name, tmp_path)  # a compose file alone is no stack: up failed
    stack.record_stack(plan)
    record = stack.load_stack(stack.default_name(tmp_path), state_dir=tmp_path)
    assert record.projects == ("general", "maze") and record.mqtt_port == 18999
    assert record.served_model_name == "demo" and record.compose_file.is_file()
    assert str(record.secrets_dir).startswith(str(tmp_path.resolve()))
    with pytest.raises(UsageError, match="no stack is recorded"):
        stack.load_stack("other", tmp_path)
    stack.forget_stack(record.folder)
    with pytest.raises(UsageError, match="no stack is recorded"):
        stack.load_stack(record.name, tmp_path)


def test_default_stack_names_differ_per_checkout(tmp_path: Path) -> None:
    """Two checkouts of the same name get different stacks by default; each keeps its own."""
    a, b = tmp_path / "a" / "deploykit", tmp_path / "b" / "deploykit"
    name_a, name_b = (stack.default_name(p / ".deploykit") for p in (a, b))
    assert name_a != name_b and name_a.startswith("deploykit-") and name_b.startswith("deploykit-")
    assert stack.default_name(a / ".deploykit") == name_a  # stable
    assert stack.check_stack_name(name_a) == name_a
    weird = stack.default_name(tmp_path / "My Checkout!" / ".deploykit")
    assert stack.check_stack_name(weird).startswith("my-checkout-")
    for bad in ("Upper", "-dash", "a b", "x" * 64, ""):
        with pytest.raises(UsageError, match="not a valid stack name"):
            stack.check_stack_name(bad)
    plans = [
        stack.plan_up(stack.UpRequest(state_dir=p / ".deploykit"), inventory=[]) for p in (a, b)
    ]
    assert [p.name for p in plans] == [name_a, name_b]
    assert plans[0].options.secrets_dir != plans[1].options.secrets_dir


# --- health layering and waiting ----------------------------------------------------------------


class FakeCheck:
    def __init__(self, name: str, results: list[bool]) -> None:
        self.name, self.results, self.calls = name, results, 0

    def run(self) -> health.CheckResult:
        ok = self.results[min(self.calls, len(self.results) - 1)]
        self.calls += 1
        return health.CheckResult(
            self.name, Status.OK if ok else Status.FAIL, "fine" if ok else "broken"
        )


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


def test_a_failed_layer_stops_the_layers_above() -> None:
    checks = [
        FakeCheck("broker", [True]),
        FakeCheck("engine", [False]),
        FakeCheck("bridge", [True]),
    ]
    results = health.run_layers(checks)
    assert [(r.name, r.passed) for r in results] == [
        ("broker", True),
        ("engine", False),
        ("bridge", False),
    ]
    assert results[2].detail == "not run: engine failed" and checks[2].calls == 0
    err = health.failure(results, 12.0)
    assert isinstance(err, CheckFailed) and "engine failed after 12 s: broken" in err.message


def test_wait_healthy_times_out_on_the_injected_clock() -> None:
    clock = FakeClock()
    results, waited = health.wait_healthy(
        [FakeCheck("engine", [False])], timeout_s=30, pause_s=2, clock=clock
    )
    assert not results[0].passed and waited == 30
    assert sum(clock.slept) == 30 and len(clock.slept) == 15


def test_wait_healthy_returns_when_all_pass() -> None:
    clock = FakeClock()
    engine = FakeCheck("engine", [False, False, True])
    results, waited = health.wait_healthy([engine], timeout_s=60, pause_s=5, clock=clock)
    assert results[0].passed and waited == 10 and engine.calls == 3


# --- docker errors and build plans --------------------------------------------------------------


def test_daemon_errors_get_hints() -> None:
    gpu = explain(Exception('could not select device driver "nvidia" with capabilities: [[gpu]]'))
    assert "NVIDIA Container Toolkit" in (gpu.hint or "") and gpu.exit_code == 4
    down = explain(Exception("Error while fetching server API version: Connection refused"))
    assert "daemon is not reachable" in down.message and "start it" in (down.hint or "")
    base = explain(
        Exception("pull access denied for python, repository does not exist"), image="python:3.11"
    )
    assert "neither present nor pullable" in base.message
    assert "deploykit base-images" in (base.hint or "")


def test_image_specs_carry_their_default_base_and_its_kind() -> None:
    cpu = render.engine_image(resolve_target("none", "cpu"))
    assert cpu.tag.startswith("deploykit/engine:none-cpu-")
    assert cpu.default_base == "python:3.11-slim-bookworm" and cpu.base_kind is BaseKind.PYTHON
    broker = render.broker_image()
    assert broker.base_kind is BaseKind.MOSQUITTO
    assert render.bridge_image().needs_deploykit_wheel
    assert {str(f.path) for f in cpu.files} >= {"Dockerfile", "guard.py", "make_demo_model.py"}
    assert PYTHON_BASE != MOSQUITTO_BASE
    gpu = render.engine_image(resolve_target("fp8", "cuda-fp8"))
    assert gpu.default_base == f"vllm/vllm-openai:v{VLLM_VERSION}"
    assert gpu.base_kind is BaseKind.VLLM
    dockerfile = next(f.text for f in gpu.files if str(f.path) == "Dockerfile")
    assert f"ARG BASE_IMAGE={gpu.default_base}\n" in dockerfile  # the data and the text agree


def test_context_digest_follows_content(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    first = build.context_digest(tmp_path, "sha256:base")
    assert build.context_digest(tmp_path, "sha256:base") == first
    assert build.context_digest(tmp_path, "sha256:other") != first
    (tmp_path / "Dockerfile").write_text("FROM y\n")
    assert build.context_digest(tmp_path, "sha256:base") != first


# --- CLI refusals (before Docker is touched) ------------------------------------------------------


def _cli(*args: str) -> tuple[int, str]:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "deploykit", *args], capture_output=True, text=True, check=False
    )
    return proc.returncode, proc.stderr


def test_up_refusals_exit_with_their_codes(tmp_path: Path) -> None:
    code, err = _cli("up", "--quant", "awq", "--gpu-class", "cpu", "--state-dir", str(tmp_path))
    assert code == 3 and "not supported on GPU class cpu" in err and "hint: on cpu use: none" in err
    code, err = _cli(
        "up", "--quant", "squeezellm", "--gpu-class", "cpu", "--state-dir", str(tmp_path)
    )
    assert code == 3 and "removed from vLLM" in err and "hint: use awq" in err
    code, err = _cli("up", "--quant", "fp8", "--gpus", "0", "--state-dir", str(tmp_path))
    assert code == 5 and "NVML is not available" in err
    code, err = _cli("up", "--quant", "int3", "--state-dir", str(tmp_path))
    assert code == 2 and "unknown quantization method" in err
    code, err = _cli("health", "--name", "nothing-here", "--state-dir", str(tmp_path))
    assert code == 2 and "no stack named 'nothing-here'" in err and "deploykit up" in err


def test_recorded_h100_pinning_matched_nvidia_smi() -> None:
    """The record from a real H100 (tests/stack/data/README.md) agreed with nvidia-smi."""
    import json

    record = json.loads((Path(__file__).parent / "data" / "h100-pinning.json").read_text())
    assert record["ok"] is True
    gpu = record["gpus"][0]
    assert (
        gpu["resolve_index"] == [gpu["nvidia_smi"]["uuid"]] == record["up_fp8_gpus_0"]["device_ids"]
    )

"""The gpus / plan / doctor commands through deploykit's own entry point: exit codes, messages, JSON."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploykit import checks, doctor
from deploykit.cli import main
from deploykit.devices import GpuInventory, load_inventory
from deploykit.errors import DeployKitError, DockerError, ExitCode, GpuError

from .conftest import DATA, LLAMA3_8B, QWEN25_7B_AWQ, QWEN25_32B
from .test_preflight_devices import _fake_pynvml

H100 = str(DATA / "h100-nvml.json")
T4 = str(DATA / "t4-written.json")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


@pytest.mark.skipif(_nvml_works(), reason="this machine has an NVIDIA driver")
def test_gpus_without_driver_exits_5_with_a_message_not_a_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "deploykit", "gpus"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == ExitCode.NO_GPU == 5
    assert "error: no NVIDIA driver found" in proc.stderr
    assert "hint:" in proc.stderr and "nvidia-smi" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_gpus_json_is_a_loadable_inventory(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(count=2))
    code, out, _ = run(["gpus", "--json"], capsys)
    assert code == 0
    (tmp_path / "gpus.json").write_text(out)
    inv = load_inventory(tmp_path / "gpus.json")
    assert [g.index for g in inv.gpus] == [0, 1] and inv.driver.cuda_version == "12.2"
    code, out, _ = run(["gpus"], capsys)
    assert code == 0 and "Tesla T4" in out and "GPU-t4-1" in out


# --- plan -----------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(make_model: Callable[..., Path]) -> Callable[[dict[str, Any]], str]:
    return lambda cfg: str(make_model(cfg))


def test_plan_json_on_recorded_h100(
    model_dir: Callable[[dict[str, Any]], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        ["plan", "--model", model_dir(QWEN25_32B), "--gpus-file", H100, "--json"], capsys
    )
    assert code == 0, err
    data = json.loads(out)
    first = data["profiles"][0]
    assert (
        first["quant"],
        first["tensor_parallel_size"],
        first["kv_cache_dtype"],
        first["status"],
    ) == (
        "fp8",
        1,
        "fp8",
        "compatible",
    )
    assert data["model"]["checkpoint"]["quantized"] is False
    assert data["gpus"][0]["uuid"] == load_inventory(H100).gpus[0].uuid
    assert {p["status"] for p in data["profiles"]} <= {"compatible", "low_memory", "incompatible"}


def test_plan_table(
    model_dir: Callable[[dict[str, Any]], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        ["plan", "-m", model_dir(LLAMA3_8B), "--gpus-file", H100, "--max-model-len", "8k"], capsys
    )
    assert code == 0
    assert "best: fp8" in out and "--max-model-len 8000" in out


@pytest.mark.parametrize(
    ("config", "quant", "says"),
    [
        (LLAMA3_8B, "awq", "needs a pre-quantized AWQ checkpoint"),
        (LLAMA3_8B, "gptq", "needs a pre-quantized GPTQ checkpoint"),
        (QWEN25_7B_AWQ, "gptq", "already quantized (AWQ 4-bit, group 128)"),
        (QWEN25_7B_AWQ, "none", "already quantized"),
        (QWEN25_7B_AWQ, "fp8", "already quantized"),
    ],
)
def test_plan_refuses_mismatch_with_exit_6(
    model_dir: Callable[[dict[str, Any]], str],
    capsys: pytest.CaptureFixture[str],
    config: dict[str, Any],
    quant: str,
    says: str,
) -> None:
    code, out, err = run(
        ["plan", "--model", model_dir(config), "--gpus-file", H100, "--quant", quant], capsys
    )
    assert code == ExitCode.MODEL == 6
    assert says in err and "hint: methods that fit this checkpoint" in err
    assert out == ""


def test_plan_exit_codes_for_other_refusals(
    model_dir: Callable[[dict[str, Any]], str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    m = model_dir(LLAMA3_8B)
    assert (
        run(["plan", "--model", m, "--gpus-file", H100, "--gpus", "3"], capsys)[0]
        == ExitCode.NO_GPU
    )
    assert (
        run(["plan", "--model", m, "--gpus-file", H100, "--quant", "int3"], capsys)[0]
        == ExitCode.USAGE
    )
    assert run(["plan", "--model", m, "--gpus-file", H100, "--quant", "squeezellm"], capsys)[0] == (
        ExitCode.UNSUPPORTED
    )
    # not a model folder at all: a usage error, not a checkpoint mismatch
    assert run(["plan", "--model", str(tmp_path), "--gpus-file", H100], capsys)[0] == ExitCode.USAGE
    code, out, err = run(["plan", "--model", model_dir(QWEN25_32B), "--gpus-file", T4], capsys)
    assert code == ExitCode.MODEL and "no profile fits" in err and "does not fit" in out


# --- doctor ---------------------------------------------------------------------------------------


class FakeProbe(doctor.HostProbe):
    def __init__(
        self,
        *,
        docker_ok: bool = True,
        runtimes: tuple[str, ...] = ("runc", "nvidia"),
        inventory: GpuInventory | None = None,
        compose: tuple[str, str] | None = ("v2", "2.29.1"),
        broker: list[tuple[str, int]] | None = None,
        free_gib: float = 100,
    ) -> None:
        self._docker_ok, self._runtimes, self._inv = docker_ok, runtimes, inventory
        self._compose, self._broker, self._free = compose, broker, free_gib

    @property  # type: ignore[override]
    def docker_info(self) -> dict[str, Any]:
        if not self._docker_ok:
            raise DockerError("the Docker daemon is not reachable", "start it")
        return {
            "ServerVersion": "27.1",
            "Driver": "overlay2",
            "Runtimes": {k: {} for k in self._runtimes},
            "CDISpecDirs": ["/nonexistent/cdi"],
            "DockerRootDir": "/var/lib/docker",
        }

    def running_broker_ports(self) -> list[tuple[str, int]] | None:
        return self._broker

    def compose_version(self) -> tuple[str, str] | None:
        return self._compose

    def inventory(self) -> GpuInventory:
        if self._inv is None:
            raise GpuError("no NVIDIA driver found", "install it")
        return self._inv

    def free_disk(self, path: str) -> tuple[str, int]:
        return path, int(self._free * 1024**3)

    def mqtt_connack(self, host: str, port: int, timeout: float = 3.0) -> int:
        if port != 1883:
            raise OSError("connection refused")
        return 5


def _doctor(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    probe: FakeProbe,
    *args: str,
) -> tuple[int, dict[str, Any]]:
    monkeypatch.setattr(doctor, "HostProbe", lambda: probe)
    code, out, _ = run(["doctor", "--json", *args], capsys)
    return code, json.loads(out)


def test_doctor_json_shape_all_ok(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    h100 = load_inventory(H100)
    code, data = _doctor(
        monkeypatch, capsys, FakeProbe(inventory=h100, broker=[("127.0.0.1", 1883)])
    )
    assert code == 0 and data["ok"] is True
    assert [c["name"] for c in data["checks"]] == [
        "docker daemon",
        "docker compose",
        "NVIDIA driver",
        "NVIDIA runtime for Docker",
        "free disk",
        "MQTT broker",
    ]
    for c in data["checks"]:
        assert set(c) == {"name", "status", "detail", "hint"} and c["status"] == "ok"
    assert "580.159.04" in data["checks"][2]["detail"]
    assert "credentials required" in data["checks"][5]["detail"]
    assert data["cu129_image"].endswith("-cu129")


def test_doctor_fails_with_hints(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old = load_inventory(DATA / "a100-written.json")
    probe = FakeProbe(
        runtimes=("runc",), inventory=old, compose=None, free_gib=5, broker=[("127.0.0.1", 1884)]
    )
    code, data = _doctor(monkeypatch, capsys, probe)
    assert code == ExitCode.FAILED and data["ok"] is False
    by = {c["name"]: c for c in data["checks"]}
    assert by["docker daemon"]["status"] == "ok"
    for name in (
        "docker compose",
        "NVIDIA driver",
        "NVIDIA runtime for Docker",
        "free disk",
        "MQTT broker",
    ):
        assert by[name]["status"] == "fail" and by[name]["hint"], name
    assert "-cu129" in by["NVIDIA driver"]["hint"]
    assert "nvidia-ctk" in by["NVIDIA runtime for Docker"]["hint"]


def test_doctor_without_docker_or_driver(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, data = _doctor(monkeypatch, capsys, FakeProbe(docker_ok=False))
    by = {c["name"]: c for c in data["checks"]}
    assert code == 1
    assert by["docker daemon"]["status"] == "fail" and by["docker daemon"]["hint"] == "start it"
    assert by["NVIDIA driver"]["status"] == "fail"
    assert by["MQTT broker"]["status"] == "skip"


def test_doctor_cpu_class_skips_gpu_checks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, data = _doctor(monkeypatch, capsys, FakeProbe(), "--gpu-class", "cpu")
    assert code == 0
    assert [c["name"] for c in data["checks"]] == [
        "docker daemon",
        "docker compose",
        "free disk",
        "MQTT broker",
    ]
    assert data["checks"][-1]["status"] == "skip"


def test_doctor_table(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(doctor, "HostProbe", lambda: FakeProbe(compose=None))
    code, out, err = run(["doctor", "--gpu-class", "cpu"], capsys)
    assert (
        code == 1
        and "FAIL" in out
        and "hint:" in out
        and "1 check(s) failed: docker compose" in err
    )


def test_a_check_that_raises_becomes_a_failed_result() -> None:
    class Boom(doctor.HostProbe):
        def compose_version(self) -> tuple[str, str] | None:
            raise DeployKitError("boom", "do this")

    (result,) = checks.run_checks([doctor.ComposeCheck(Boom())])
    assert (result.status, result.detail, result.hint) == (checks.Status.FAIL, "boom", "do this")


# --- the real probe's edges -----------------------------------------------------------------------


@pytest.mark.skipif(not shutil.which("mosquitto"), reason="needs the mosquitto binary")
def test_mqtt_connack_against_a_real_mosquitto(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                rc = doctor.HostProbe().mqtt_connack("127.0.0.1", port, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert rc == 5  # not authorised: a broker answered, and it wants credentials
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    with pytest.raises(OSError):
        doctor.HostProbe().mqtt_connack("127.0.0.1", port, timeout=1)


@pytest.mark.docker
def test_real_probe_reads_docker(tmp_path: Path) -> None:
    probe = doctor.HostProbe()
    try:
        info = probe.docker_info
    except DockerError:
        pytest.skip("no Docker daemon here")
    assert "Runtimes" in info
    # The probe's Docker and stack calls work (a broken import or signature would FAIL here).
    result = doctor.BrokerCheck(probe).run()
    assert result.status is not checks.Status.FAIL or "does not answer MQTT" in result.detail
    if shutil.which("docker-compose"):
        compose = doctor.ComposeCheck(probe).run()
        assert compose.status is checks.Status.OK and "docker" in compose.detail


@pytest.mark.skipif(_nvml_works(), reason="this machine has an NVIDIA driver")
def test_plan_without_driver_points_to_gpus_file(
    model_dir: Callable[[dict[str, Any]], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["plan", "--model", model_dir(LLAMA3_8B)], capsys)
    assert code == ExitCode.NO_GPU and "--gpus-file" in err

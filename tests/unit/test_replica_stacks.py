"""Stacks of several engine+bridge pairs (`deploykit up --replicas N`, `--gpus ... --tp N`): the
GPU split, the rendered compose stack (golden, valid for both compose implementations, hardened,
no secret values), and the health layers of every replica."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from deploykit import health, render
from deploykit.errors import UsageError
from deploykit.matrix import resolve_target
from deploykit.stack import StackRecord, split_gpus

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "stacks"

FOUR_GPUS = tuple(f"GPU-0000000{i}-2222-3333-4444-555555555555" for i in range(4))
CASES = {
    "replicas-none-cpu-x2": (
        "none",
        "cpu",
        render.StackOptions(replicas=2, secrets_dir="/s", host_cpus=2),
    ),
    "replicas-fp8-cuda-fp8-2x2gpu": (
        "fp8",
        "cuda-fp8",
        render.StackOptions(gpu_ids=FOUR_GPUS, replicas=2, secrets_dir="/s", mqtt_port=11883),
    ),
    "workers-brokerhost-none-cpu": (
        "none",
        "cpu",
        render.StackOptions(secrets_dir="/s", redis_port=6380),
    ),
    "workers-worker-none-cuda-2gpu": (
        "none",
        "cuda",
        render.StackOptions(
            gpu_ids=FOUR_GPUS[:2],
            replicas=2,
            secrets_dir="/s",
            worker_name="w1",
            broker_url="mqtt://broker.example:1883",
            redis_url="redis://broker.example:6380/0",
        ),
    ),
}


def rendered(case: str) -> str:
    quant, cls, options = CASES[case]
    return render.render_compose(resolve_target(quant, cls), options)


@pytest.mark.parametrize("case", CASES)
def test_replica_stacks_match_golden(case: str, update_golden: bool) -> None:
    path = GOLDEN / f"{case}.yaml"
    if update_golden:
        path.write_text(rendered(case))
    assert path.read_text() == rendered(case), f"{path} differs; run pytest --update-golden"


@pytest.mark.parametrize(
    ("gpus", "replicas", "tp", "want"),
    [
        (0, None, None, (1, 1)),
        (0, 3, None, (3, 1)),
        (4, None, None, (1, 4)),
        (4, None, 2, (2, 2)),
        (4, 2, None, (2, 2)),
        (4, 4, 1, (4, 1)),
        (2, 2, None, (2, 1)),
    ],
)
def test_gpus_split_into_replicas(
    gpus: int, replicas: int | None, tp: int | None, want: tuple[int, int]
) -> None:
    assert split_gpus(gpus, replicas, tp) == want


@pytest.mark.parametrize(
    ("gpus", "replicas", "tp"), [(4, None, 3), (4, 3, None), (4, 1, 2), (0, None, 2), (2, 0, None)]
)
def test_splits_that_do_not_fit_are_refused(
    gpus: int, replicas: int | None, tp: int | None
) -> None:
    with pytest.raises(UsageError):
        split_gpus(gpus, replicas, tp)


def test_each_replica_has_its_own_gpus_and_one_share_group() -> None:
    stack = yaml.safe_load(rendered("replicas-fp8-cuda-fp8-2x2gpu"))
    services = stack["services"]
    assert set(services) == {"broker", "engine", "bridge", "engine-2", "bridge-2", "redis"}
    pinned = [
        services[e]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for e in ("engine", "engine-2")
    ]
    assert pinned == [list(FOUR_GPUS[:2]), list(FOUR_GPUS[2:])]
    for e in ("engine", "engine-2"):
        args = services[e]["command"]
        assert args[args.index("--tensor-parallel-size") + 1] == "2"
    first, second = services["bridge"]["environment"], services["bridge-2"]["environment"]
    assert first["DEPLOYKIT_ENGINE"] == "http://engine:8000"
    assert second["DEPLOYKIT_ENGINE"] == "http://engine-2:8000"
    assert "DEPLOYKIT_REPLICA" not in first and second["DEPLOYKIT_REPLICA"] == "2"
    for env in (first, second):
        assert env["DEPLOYKIT_SHARE_GROUP_FILE"] == "/run/secrets/bridge_share_group"
        assert env["DEPLOYKIT_REDIS"] == "redis://redis:6379/0"
    assert stack["networks"]["state"] == {"internal": True}
    assert services["redis"]["networks"] == ["state"]  # bridges only reach it


def test_one_replica_stack_has_no_redis_and_no_share_group() -> None:
    stack = yaml.safe_load(render.render_compose(resolve_target("none", "cpu")))
    assert "redis" not in stack["services"]
    assert "DEPLOYKIT_SHARE_GROUP_FILE" not in stack["services"]["bridge"]["environment"]
    assert "DEPLOYKIT_REDIS" not in stack["services"]["bridge"]["environment"]


@pytest.mark.parametrize("case", CASES)
def test_replica_stacks_are_hardened_and_carry_no_secret_values(case: str) -> None:
    stack = yaml.safe_load(rendered(case))
    for name, service in stack["services"].items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        for key in service.get("environment", {}):
            if any(w in key.upper() for w in ("PASSWORD", "SECRET", "KEY", "GROUP", "CLIENT_ID")):
                assert key.endswith("_FILE"), f"{name}: {key}"
    assert {"bridge_share_group", "redis_password"} <= set(stack["secrets"])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_replica_stacks_are_valid_compose(
    version: str, tmp_path: Path, compose_clis: dict[str, list[str]]
) -> None:
    cli = compose_clis.get(version)
    if cli is None:
        pytest.fail(f"Compose {version} is not installed")
    for case in CASES:
        path = tmp_path / f"{case}.yaml"
        path.write_text(rendered(case).replace("/s/", f"{tmp_path}/"))
        result = subprocess.run(
            [*cli, "-f", str(path), "config", "-q"], capture_output=True, text=True
        )
        assert result.returncode == 0, f"{version} {case}: {result.stderr}"


def test_health_checks_every_replica() -> None:
    record = StackRecord(
        name="s",
        folder=Path("/tmp/s"),
        quant="none",
        gpu_class="cpu",
        served_model_name="demo",
        projects=("general",),
        mqtt_port=1883,
        secrets_dir=Path("/tmp/s/secrets"),
        bridge_name="bridge-1",
        replicas=2,
    )
    target = health.StackTarget(record, docker=None)  # type: ignore[arg-type]
    names = [c.name for c in health.default_checks(target)]  # type: ignore[attr-defined]
    assert names == [
        "broker",
        "redis-container",
        "engine-container[engine]",
        "engine-container[engine-2]",
        "engine-health[engine]",
        "engine-health[engine-2]",
        "engine-models[engine]",
        "engine-models[engine-2]",
        "engine-completion[engine]",
        "engine-completion[engine-2]",
        "bridge-status[bridge]",
        "bridge-status[bridge-2]",
        "bridge-probe",
    ]
    one = health.default_checks(health.StackTarget(replace(record, replicas=1), docker=None))  # type: ignore[arg-type]
    assert [c.name for c in one][1:3] == ["engine-container", "engine-health"]  # type: ignore[attr-defined]


def test_a_broker_host_publishes_redis_and_a_worker_runs_no_broker() -> None:
    host = yaml.safe_load(rendered("workers-brokerhost-none-cpu"))["services"]
    assert host["redis"]["ports"] == ["0.0.0.0:6380:6379"]
    assert "DEPLOYKIT_REDIS" in host["bridge"]["environment"]  # one local replica shares too
    worker = yaml.safe_load(rendered("workers-worker-none-cuda-2gpu"))
    services = worker["services"]
    assert set(services) == {"engine", "bridge", "engine-2", "bridge-2"}
    for b, i in (("bridge", 1), ("bridge-2", 2)):
        env = services[b]["environment"]
        assert env["DEPLOYKIT_BROKER"] == "mqtt://broker.example:1883"
        assert env["DEPLOYKIT_REDIS"] == "redis://broker.example:6380/0"
        assert env["DEPLOYKIT_REPLICA"] == f"w1-{i}"  # its MQTT sessions: <secret>-w1-<i>-<project>
        assert env["DEPLOYKIT_BRIDGE_NAME"] == f"w1-bridge-{i}"
        assert "depends_on" in services[b] and "broker" not in services[b]["depends_on"]
    assert "mqtt_users" not in worker["secrets"] and "broker-data" not in worker["volumes"]


def test_worker_bundle_round_trips_owner_only(tmp_path: Path) -> None:
    from deploykit import credentials
    from deploykit.secrets import WORKER_SECRETS, ensure_secrets

    folder = ensure_secrets(tmp_path / "secrets", ["general", "maze"])
    record = StackRecord(
        name="host", folder=tmp_path, quant="none", gpu_class="cpu", served_model_name="demo",
        projects=("general", "maze"), mqtt_port=1883, secrets_dir=folder.path,
        bridge_name="bridge-1", redis_port=6380,
    )  # fmt: skip
    out = tmp_path / "bundle"
    written = credentials.write_worker_bundle(record, "gpu-box-2", out, host="10.0.0.5")
    assert oct(out.stat().st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in out.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*WORKER_SECRETS, *credentials.BUNDLE_INFO]
    )
    read = credentials.read_worker_bundle(out)
    assert read == written
    assert read.broker_url == "mqtt://10.0.0.5:1883" and read.redis_url == "redis://10.0.0.5:6380/0"
    assert read.projects == ("general", "maze")
    with pytest.raises(UsageError):  # a stack that does not publish its Redis cannot take workers
        credentials.write_worker_bundle(replace(record, redis_port=None), "w", tmp_path / "x")
    with pytest.raises(UsageError):
        credentials.write_worker_bundle(record, "bad name", tmp_path / "y")
    (out / "redis_password").chmod(0o644)  # a copy that lost its modes is refused, not used
    with pytest.raises(UsageError, match="can be read by others"):
        credentials.read_worker_bundle(out)
    (out / "redis_password").unlink()
    with pytest.raises(UsageError):
        credentials.read_worker_bundle(out)


@pytest.mark.parametrize(
    ("replicas", "cpus", "binds"),
    [
        (2, 2, ["0", "1"]),
        (2, 8, ["0-3", "4-7"]),
        (3, 8, ["0-1", "2-3", "4-5"]),
        (1, 8, [None]),  # one engine: vLLM's own binding
        (3, 2, [None, None, None]),  # fewer cores than engines: no share for each
        (2, None, [None, None]),  # the host's CPUs unknown
    ],
)
def test_cpu_replicas_compute_on_their_own_cores(
    replicas: int, cpus: int | None, binds: list[str | None]
) -> None:
    options = render.StackOptions(replicas=replicas, host_cpus=cpus)
    assert render.cpu_binds(options) == binds

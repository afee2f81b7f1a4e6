"""The helper container on a stack's engine network: how ``deploykit bench`` and ``deploykit
compare`` reach the engine, whose OpenAI port is never published.

The helper is a container of the image the stack's bridge runs (so nothing is pulled), attached to
the stack's internal ``engine`` network only, with a read-only root filesystem, no capabilities and
no new privileges. It runs ``deploykit.bench.helper`` from the deploykit this command runs (its
package folder mounted read-only), so helper and caller always speak the same job format, whatever
deploykit version the bridge image was built from. The engine's API key reaches it as a read-only
mount of the stack's secret file, named by an environment variable: never on a command line. It
runs as the user running this command, who owns the secrets folder (the files are owner-only).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deploykit
from deploykit import interrupts
from deploykit.bench.engine import read_job_lines
from deploykit.errors import CheckFailed, DockerError
from deploykit.ports import ENGINE_PORT
from deploykit.secrets import SecretsFolder
from deploykit.stack import COMPOSE_PROJECT_LABEL, COMPOSE_SERVICE_LABEL, StackRecord

HELPER_LABEL = "io.deploykit.bench-helper"
#: Set by both compose implementations on the networks they create: the network's name in the file.
NETWORK_LABEL = "com.docker.compose.network"
_CODE = "/opt/deploykit-bench"
_JOB = "/job"
_KEY = "/run/secrets/engine_api_key"


@dataclass(frozen=True)
class EngineNet:
    """Where a stack's engine is, seen from its internal network."""

    stack: str
    image: str  # the bridge container's image (id)
    network: str
    api_key_file: Path | None
    engine_url: str = f"http://engine:{ENGINE_PORT}"


def running_container(docker: Any, stack: str, service: str, running: bool = True) -> Any:
    """The stack's (running) container of ``service``; CheckFailed when there is none."""
    found = [
        c
        for c in docker.containers({COMPOSE_PROJECT_LABEL: stack, COMPOSE_SERVICE_LABEL: service})
        if c.status == "running" or not running
    ]
    if not found:
        raise CheckFailed(
            f"the stack {stack!r} has no {'running ' if running else ''}{service} container",
            f"see `deploykit ps --name {stack}`; start it with `deploykit up`",
        )
    return found[0]


def find(record: StackRecord, docker: Any) -> EngineNet:
    """The stack's bridge image, engine network and engine API key file."""
    bridge = running_container(docker, record.name, "bridge")
    running_container(docker, record.name, "engine")
    networks = docker.networks({COMPOSE_PROJECT_LABEL: record.name, NETWORK_LABEL: "engine"})
    if len(networks) != 1:
        raise CheckFailed(
            f"the stack {record.name!r} has {len(networks)} networks named engine, expected one",
            "was the stack started by `deploykit up`?",
        )
    key = SecretsFolder(record.secrets_dir).engine_api_key_file
    if key.is_file() and not os.access(key, os.R_OK):
        raise CheckFailed(
            f"cannot read the engine's API key {key}",
            "run the command as the user who started the stack (the secrets are owner-only)",
        )
    return EngineNet(
        stack=record.name,
        image=bridge.attrs.get("Image") or bridge.image.id,
        network=networks[0],
        api_key_file=key if key.is_file() else None,
    )


def run_job(
    docker: Any, net: EngineNet, job: dict[str, Any], on_line: Callable[[dict[str, Any]], None]
) -> None:
    """Run one helper job (deploykit/bench/helper.py) and hand each line it prints to
    ``on_line`` as it comes. The container is removed afterwards, also when interrupted."""
    folder = Path(tempfile.mkdtemp(prefix="dk-bench-job-"))
    try:
        os.chmod(folder, 0o755)
        (folder / "job.json").write_text(json.dumps({**job, "engine": net.engine_url}))
        os.chmod(folder / "job.json", 0o644)
        code_dir = Path(deploykit.__file__).resolve().parent
        mounts = [(code_dir, f"{_CODE}/deploykit"), (folder, _JOB)]
        # Docker's DNS does not answer for a stopped engine on an internal network, and glibc
        # waits 2 x 5 s per request before its error counts: one second instead
        # (docs/facts.md, "The engine server").
        env = {
            "PYTHONPATH": _CODE,
            "PYTHONDONTWRITEBYTECODE": "1",
            "RES_OPTIONS": "timeout:1 attempts:1",
        }
        if net.api_key_file is not None:
            mounts.append((net.api_key_file, _KEY))
            env["DEPLOYKIT_ENGINE_API_KEY_FILE"] = _KEY
        container = None
        try:
            with interrupts.held():  # a Ctrl-C now lands once the helper is known, below
                container = docker.start_helper(
                    net.image,
                    ["python3", "-m", "deploykit.bench.helper", f"{_JOB}/job.json"],
                    name=f"{net.stack}-bench-{uuid.uuid4().hex[:8]}",
                    network=net.network,
                    mounts=mounts,
                    environment=env,
                    user=f"{os.getuid()}:{os.getgid()}",
                    labels={HELPER_LABEL: net.stack},
                )
            fatal = read_job_lines(docker.output_lines(container), on_line)
        except BaseException:  # interrupted (Ctrl-C) or failed: the helper goes at once
            if container is not None:
                docker.remove_container(container.id)
            raise
        status, stderr = docker.finish(container)
        if fatal is not None or status != 0:
            raise CheckFailed(
                f"the helper on the engine network of stack {net.stack!r} failed (exit "
                f"{status}): {fatal or stderr.strip()[-500:]}",
                f"see `deploykit logs engine --name {net.stack}`",
            )
    except json.JSONDecodeError as err:
        raise DockerError(f"the helper printed something that is not JSON: {err}") from err
    finally:
        shutil.rmtree(folder, ignore_errors=True)

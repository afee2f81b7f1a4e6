"""``deploykit doctor``: is this host ready to build and run a stack? Each check says ok or what to do.

Every check is a small object with a ``name`` and ``run()``, in the vocabulary ``deploykit health``
shares (``deploykit.checks``: ok / fail / skip, a detail and, when it fails, a hint). The facts they
look at come from one :class:`HostProbe`, whose methods are the only edges (docker SDK through
deploykit.docker, NVML through deploykit.devices, the compose command, disk usage, one TCP connection
to the broker); tests pass a fake probe. An error the probe raises is a failed check with the error's
hint (``deploykit.checks.run_checks``).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from deploykit.checks import Check, CheckResult, failed, ok, skipped
from deploykit.devices import GpuInventory, read_inventory
from deploykit.errors import DeployKitError
from deploykit.matrix import VLLM_IMAGE, VLLM_IMAGE_CU129_SUFFIX, VLLM_IMAGE_CUDA, VLLM_VERSION
from deploykit.plan import check_driver
from deploykit.ports import MQTT_PORT

#: Free disk wanted for the images (Docker's root dir): the official vLLM CUDA image unpacks to
#: ~20 GB and a build adds layers; the cpu engine image is 3.7 GB (docs/facts.md, "Disk").
DISK_GIB_CUDA = 40
DISK_GIB_CPU = 10
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")


class HostProbe:
    """Reads the host, once each. Every method may raise DeployKitError; checks turn that into a fail."""

    @cached_property
    def docker_info(self) -> dict[str, Any]:
        """``docker info`` as a dict (pings the daemon first)."""
        from deploykit.docker import Docker  # the only module that talks to Docker

        return dict(Docker.connect().client.info())

    def running_broker_ports(self) -> list[tuple[str, int]] | None:
        """(host, port) published by each running deploykit broker container; None when none runs.

        Found by compose's service label and the image name, so it works from any directory
        (the stack's state folder is not needed).
        """
        from deploykit.docker import Docker
        from deploykit.stack import COMPOSE_SERVICE_LABEL

        found = []
        for c in Docker.connect().containers({COMPOSE_SERVICE_LABEL: "broker"}):
            image = str(c.attrs.get("Config", {}).get("Image", ""))
            if c.status != "running" or not image.startswith("deploykit/broker"):
                continue
            for binding in (c.ports or {}).get(f"{MQTT_PORT}/tcp") or []:
                host = binding.get("HostIp") or "127.0.0.1"
                host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
                found.append((host, int(binding["HostPort"])))
        return found or None

    def compose_version(self) -> tuple[str, str] | None:
        """("v2", version) for ``docker compose``, ("v1", version) for ``docker-compose``, else None."""
        from deploykit.stack import compose_command  # the same choice `deploykit up` makes

        try:
            cmd = compose_command()
        except DeployKitError:
            return None
        try:
            out = subprocess.run(
                [*cmd, "version", "--short"], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        version = (
            out.stdout.strip().splitlines()[0]
            if out.returncode == 0 and out.stdout.strip()
            else "?"
        )
        return ("v2" if cmd[0] == "docker" else "v1"), version

    def inventory(self) -> GpuInventory:
        return read_inventory()

    def cdi_specs(self, dirs: Sequence[str]) -> list[str]:
        specs = []
        for d in dirs:
            p = Path(d)
            if p.is_dir():
                specs += [
                    str(f) for f in sorted(p.iterdir()) if f.suffix in (".yaml", ".yml", ".json")
                ]
        return specs

    def free_disk(self, path: str) -> tuple[str, int]:
        """(path measured, free bytes); falls back to / when Docker's root dir is not visible here."""
        target = path if Path(path).exists() else "/"
        return target, shutil.disk_usage(target).free

    def mqtt_connack(self, host: str, port: int, timeout: float = 3.0) -> int:
        """Send an MQTT 3.1.1 CONNECT with no credentials; the CONNACK return code (5: not authorised
        still proves a broker answers). Raises OSError when nothing answers."""
        client_id = b"deploykit-doctor"
        body = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(client_id).to_bytes(2, "big") + client_id
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(bytes([0x10, len(body)]) + body)
            reply = s.recv(4)
        if len(reply) < 4 or reply[0] != 0x20:
            raise OSError(f"not an MQTT broker (answered {reply!r})")
        return reply[3]


@dataclass
class DockerDaemonCheck:
    probe: HostProbe
    name: str = "docker daemon"

    def run(self) -> CheckResult:
        info = self.probe.docker_info
        return ok(
            self.name,
            f"Docker {info.get('ServerVersion', '?')} reachable ({info.get('Driver', '?')} storage)",
        )


@dataclass
class ComposeCheck:
    probe: HostProbe
    name: str = "docker compose"

    def run(self) -> CheckResult:
        found = self.probe.compose_version()
        if found is None:
            return failed(
                self.name,
                "neither `docker compose` (v2) nor `docker-compose` (v1) works",
                "install the compose plugin (apt: docker-compose-plugin) or docker-compose",
            )
        kind, version = found
        cmd = "docker compose" if kind == "v2" else "docker-compose"
        return ok(self.name, f"{cmd} {version} ({kind})")


@dataclass
class GpuRuntimeCheck:
    probe: HostProbe
    name: str = "NVIDIA runtime for Docker"

    def run(self) -> CheckResult:
        info = self.probe.docker_info
        runtimes = sorted((info.get("Runtimes") or {}).keys())
        dirs = list(info.get("CDISpecDirs") or CDI_DIRS)
        specs = [s for s in self.probe.cdi_specs(dirs) if "nvidia" in Path(s).name]
        if "nvidia" in runtimes or specs:
            how = ["runtime 'nvidia'"] if "nvidia" in runtimes else []
            how += [f"CDI spec {s}" for s in specs]
            return ok(self.name, "Docker can hand GPUs to containers: " + ", ".join(how))
        return failed(
            self.name,
            f"Docker has no NVIDIA runtime (runtimes: {', '.join(runtimes) or 'none'}) and no NVIDIA CDI "
            f"spec in {', '.join(dirs)}",
            "install the NVIDIA Container Toolkit, then `sudo nvidia-ctk runtime configure --runtime=docker "
            "&& sudo systemctl restart docker` (or `sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`)",
        )


@dataclass
class DriverCheck:
    probe: HostProbe
    name: str = "NVIDIA driver"

    def run(self) -> CheckResult:
        inv = self.probe.inventory()
        d = inv.driver
        gpus = ", ".join(f"{g.index}: {g.name} (CC {g.compute_capability:.1f})" for g in inv.gpus)
        problem = check_driver(d)
        if problem:
            return failed(self.name, f"{problem.message}; GPUs: {gpus}", problem.hint)
        return ok(
            self.name,
            f"driver {d.driver_version} (CUDA {d.cuda_version}) runs {VLLM_IMAGE}:v{VLLM_VERSION} "
            f"(CUDA {VLLM_IMAGE_CUDA}); GPUs: {gpus}",
        )


@dataclass
class DiskCheck:
    probe: HostProbe
    need_gib: int
    name: str = "free disk"

    def run(self) -> CheckResult:
        root = "/var/lib/docker"
        with contextlib.suppress(DeployKitError):
            root = str(self.probe.docker_info.get("DockerRootDir") or root)
        where, free = self.probe.free_disk(root)
        gib = free / 1024**3
        if gib < self.need_gib:
            return failed(
                self.name,
                f"{gib:.1f} GiB free on {where}; the images need ~{self.need_gib} GiB",
                "free space (docker system prune) or move Docker's data-root to a larger disk",
            )
        return ok(self.name, f"{gib:.1f} GiB free on {where} (need ~{self.need_gib} GiB)")


@dataclass
class BrokerCheck:
    probe: HostProbe
    name: str = "MQTT broker"

    def run(self) -> CheckResult:
        ports = self.probe.running_broker_ports()
        if not ports:
            return skipped(self.name, "no deploykit stack is up (no running broker container)")
        answers = []
        for host, port in ports:
            try:
                rc = self.probe.mqtt_connack(host, port)
            except OSError as err:
                return failed(
                    self.name,
                    f"the broker container runs but {host}:{port} does not answer MQTT ({err})",
                    f"see `deploykit logs broker`; is port {port} taken by another process?",
                )
            required = ", credentials required" if rc in (4, 5) else ""
            answers.append(f"{host}:{port} answers MQTT (CONNACK {rc}{required})")
        return ok(
            self.name,
            "; ".join(answers) + " (`deploykit health` checks accounts and the engine end to end)",
        )


def default_checks(probe: HostProbe | None = None, *, gpu: bool = True) -> list[Check]:
    """The doctor's checks in order. ``gpu=False`` (the cpu class) leaves out driver and runtime."""
    p = probe or HostProbe()
    checks: list[Check] = [DockerDaemonCheck(p), ComposeCheck(p)]
    if gpu:
        checks += [DriverCheck(p), GpuRuntimeCheck(p)]
    checks += [DiskCheck(p, DISK_GIB_CUDA if gpu else DISK_GIB_CPU), BrokerCheck(p)]
    return checks


def report_json(results: Sequence[CheckResult]) -> dict[str, Any]:
    return {
        "ok": all(r.passed for r in results),
        "checks": [r.to_json() for r in results],
        "cu129_image": f"{VLLM_IMAGE}:v{VLLM_VERSION}{VLLM_IMAGE_CU129_SUFFIX}",
    }

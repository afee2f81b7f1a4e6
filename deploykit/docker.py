"""The only module that talks to Docker (through the docker SDK).

Everything else asks this module for images, builds, containers and networks, and gets
``DockerError`` with a hint when the daemon says no. The daemon's messages are mapped to named
situations (daemon not running, NVIDIA runtime missing, base image not found) so the CLI can say
what to do, the way cog maps "could not select device driver".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import DeviceRequest, Mount
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import ReadTimeout

from deploykit import interrupts
from deploykit.errors import DockerError

ProgressFn = Callable[[str], None]

LABEL_PREFIX = "io.deploykit"


def _no_progress(_line: str) -> None:
    return None


def explain(exc: Exception, *, image: str | None = None) -> DockerError:
    """Turn a docker SDK exception into a DockerError that says what to do."""
    text = str(exc)
    low = text.lower()
    if "could not select device driver" in low or "nvidia-container-cli" in low:
        return DockerError(
            f"Docker cannot give GPUs to containers: {text}",
            "install the NVIDIA Container Toolkit (nvidia-ctk runtime configure --runtime=docker, "
            "then restart dockerd), or run the cpu stack: deploykit up --gpu-class cpu",
        )
    if (
        any(
            s in low
            for s in (
                "connection refused",
                "connection aborted",
                "error while fetching server api version",
                "cannot connect to the docker daemon",
            )
        )
        and "pull access" not in low
    ):
        return DockerError(
            f"the Docker daemon is not reachable ({text})",
            "start it (sudo systemctl start docker, or dockerd &) and check that your user may use "
            "/var/run/docker.sock (group docker); DOCKER_HOST selects another daemon",
        )
    if image and (
        "pull access denied" in low
        or "manifest unknown" in low
        or ("no such image" in low)
        or ("not found" in low and image.lower() in low)
        or "no such host" in low
    ):
        return DockerError(
            f"base image {image} is neither present nor pullable: {text}",
            "pull it where you have network and `docker load` it here, pass another one with "
            "--base-image, or build local Debian bases with: deploykit base-images",
        )
    if "permission denied" in low:
        return DockerError(
            f"Docker refused access: {text}",
            "add your user to the docker group (then log in again) or run as root",
        )
    return DockerError(f"Docker failed: {text}", "run the same step with docker's CLI to see more")


@dataclass(frozen=True)
class BuildResult:
    """What a finished image build returns."""

    tag: str
    image_id: str
    size_bytes: int
    log: list[str] = field(default_factory=list)


class Docker:
    """A thin, typed wrapper around one docker SDK client."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    @classmethod
    def connect(cls) -> Docker:
        """Connect to the daemon named by the environment (DOCKER_HOST) or the default socket."""
        try:
            client = docker.from_env(timeout=600)
            client.ping()
        except docker.errors.DockerException as exc:
            raise explain(exc) from exc
        return cls(client)

    # ---- images ----------------------------------------------------------------------------------
    def image_exists(self, name: str) -> bool:
        try:
            self.client.images.get(name)
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.APIError as exc:
            raise explain(exc) from exc
        return True

    def try_pull(self, name: str) -> bool:
        """Pull an image; False (not an error) when it cannot be pulled from here."""
        try:
            self.client.images.pull(name)
        except (docker.errors.APIError, docker.errors.ImageNotFound):
            return False
        return True

    def image_info(self, name: str) -> dict[str, Any]:
        try:
            return dict(self.client.api.inspect_image(name))
        except docker.errors.ImageNotFound as exc:
            raise DockerError(
                f"image {name} does not exist", "build it first: deploykit build"
            ) from exc
        except docker.errors.APIError as exc:
            raise explain(exc) from exc

    def image_labels(self, name: str) -> dict[str, str]:
        return dict(self.image_info(name).get("Config", {}).get("Labels") or {})

    def image_size(self, name: str) -> int:
        return int(self.image_info(name).get("Size", 0))

    def remove_image(self, name: str) -> None:
        try:
            self.client.images.remove(name, force=True)
        except docker.errors.ImageNotFound:
            return
        except docker.errors.APIError as exc:
            raise explain(exc) from exc

    def remove_unused_image(self, image_id: str) -> bool:
        """Remove an image nothing uses any more (no tag left, no container); False if in use."""
        try:
            if self.client.api.inspect_image(image_id).get("RepoTags"):
                return False
            self.client.api.remove_image(image_id, force=False, noprune=False)
        except docker.errors.APIError:
            return False
        return True

    def image_history(self, name: str) -> list[dict[str, Any]]:
        try:
            return list(self.client.api.history(name))
        except docker.errors.APIError as exc:
            raise explain(exc) from exc

    def import_rootfs(self, tar_path: Path, name: str, changes: list[str]) -> str:
        """``docker import``: a root filesystem tarball becomes an image named ``name``."""
        repository, _, tag = name.partition(":")
        try:
            out = self.client.api.import_image_from_file(
                str(tar_path), repository=repository, tag=tag or "latest", changes=changes
            )
        except docker.errors.APIError as exc:
            raise explain(exc) from exc
        self.image_info(name)  # raises if the import did not produce the image
        return str(out)

    def run_and_commit(
        self,
        image: str,
        command: list[str],
        name: str,
        changes: list[str] | Callable[[list[str]], list[str]],
        progress: ProgressFn = _no_progress,
        read_only_mounts: dict[str, str] | None = None,
    ) -> list[str]:
        """Run ``command`` in a throwaway container of ``image`` (host folders mounted read-only at
        the paths ``read_only_mounts`` maps them to) and commit the result as ``name`` with
        ``changes`` (Dockerfile instructions, or a function of the command's output that returns
        them). Returns the command's output lines. A mounted folder is never part of the image."""
        repository, _, tag = name.partition(":")
        volumes = {
            host: {"bind": path, "mode": "ro"} for host, path in (read_only_mounts or {}).items()
        }
        container: Container | None = None
        log: list[str] = []
        try:
            with interrupts.held():  # a Ctrl-C now lands once it is known (removed below)
                container = self.client.containers.create(
                    image, command=command, network_mode="bridge", volumes=volumes
                )
            container.start()
            for chunk in container.logs(stream=True, follow=True):
                for line in chunk.decode(errors="replace").splitlines():
                    log.append(line)
                    progress(line)
            status = container.wait()
            if status.get("StatusCode", 1) != 0:
                tail = "\n".join(log[-15:])
                raise DockerError(
                    f"building {name} failed: the command exited {status.get('StatusCode')}:\n{tail}",
                    "check that the Debian mirror is reachable from containers",
                )
            final = changes(log) if callable(changes) else changes
            container.commit(repository=repository, tag=tag or "latest", changes=final)
        except docker.errors.APIError as exc:
            raise explain(exc, image=image) from exc
        finally:
            if container is not None:
                container.remove(force=True)
        return log

    def build(
        self,
        context: Path,
        tag: str,
        *,
        buildargs: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        progress: ProgressFn = _no_progress,
        base_image: str | None = None,
    ) -> BuildResult:
        """Build ``context/Dockerfile`` (classic builder, no pull) and tag it."""
        log: list[str] = []
        image_id = ""
        try:
            stream = self.client.api.build(
                path=str(context),
                tag=tag,
                buildargs=buildargs or {},
                labels=labels or {},
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
            )
            for chunk in stream:
                if "error" in chunk:
                    message = str(chunk.get("error", "")).strip()
                    log.append(message)
                    raise _build_failure(tag, message, log, base_image)
                if "stream" in chunk:
                    for line in str(chunk["stream"]).splitlines():
                        if line.strip():
                            log.append(line)
                            progress(line)
                aux = chunk.get("aux")
                if isinstance(aux, dict) and "ID" in aux:
                    image_id = str(aux["ID"])
        except docker.errors.APIError as exc:
            raise explain(exc, image=base_image) from exc
        except docker.errors.DockerException as exc:
            raise explain(exc) from exc
        return BuildResult(tag=tag, image_id=image_id, size_bytes=self.image_size(tag), log=log)

    # ---- containers, networks, volumes -----------------------------------------------------------
    def create_container(
        self,
        image: str,
        *,
        name: str,
        command: list[str] | None = None,
        environment: dict[str, str] | None = None,
        gpu_device_ids: list[str] | None = None,
        labels: dict[str, str] | None = None,
        shm_size: str | None = None,
    ) -> Container:
        """Create (do not start) a container; GPUs are requested by device id, never by count."""
        device_requests = (
            [DeviceRequest(driver="nvidia", device_ids=gpu_device_ids, capabilities=[["gpu"]])]
            if gpu_device_ids
            else None
        )
        try:
            return self.client.containers.create(
                image,
                name=name,
                command=command,
                environment=environment or {},
                device_requests=device_requests,
                labels=labels or {},
                shm_size=shm_size,
            )
        except docker.errors.APIError as exc:
            raise explain(exc, image=image) from exc

    def container_attrs(self, name: str) -> dict[str, Any]:
        try:
            return dict(self.client.api.inspect_container(name))
        except docker.errors.NotFound as exc:
            raise DockerError(
                f"container {name} does not exist", "start the stack: deploykit up"
            ) from exc
        except docker.errors.APIError as exc:
            raise explain(exc) from exc

    def remove_container(self, name: str) -> None:
        try:
            self.client.api.remove_container(name, force=True, v=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            raise explain(exc) from exc

    def containers(self, labels: dict[str, str | None]) -> list[Container]:
        """Containers (running or not) with these labels; a None value: the label with any value."""
        filters = {"label": [k if v is None else f"{k}={v}" for k, v in labels.items()]}
        try:
            return list(self.client.containers.list(all=True, filters=filters))
        except docker.errors.APIError as exc:
            raise explain(exc) from exc

    def exec(
        self, container: str, command: list[str], timeout_s: float = 30.0, user: str = ""
    ) -> tuple[int, str]:
        """Run a command in a running container (as ``user``, default the image's); returns (exit
        code, combined output)."""
        try:
            result = self.client.containers.get(container).exec_run(command, demux=False, user=user)
        except docker.errors.NotFound as exc:
            raise DockerError(
                f"container {container} is not running", "start the stack: deploykit up"
            ) from exc
        except docker.errors.APIError as exc:
            raise explain(exc) from exc
        output = result.output.decode(errors="replace") if result.output else ""
        return int(result.exit_code or 0), output

    def signal(self, container: str, signal: str) -> None:
        """Send a signal to a container's main process (``docker kill --signal``)."""
        try:
            self.client.api.kill(container, signal=signal)
        except docker.errors.NotFound as exc:
            raise DockerError(
                f"container {container} is not running", "start the stack: deploykit up"
            ) from exc
        except docker.errors.APIError as exc:
            raise explain(exc) from exc

    def restart(self, container: str, timeout_s: int = 10) -> None:
        """``docker restart``: stop (SIGTERM, then SIGKILL after ``timeout_s``) and start again."""
        try:
            self.client.api.restart(container, timeout=timeout_s)
        except docker.errors.APIError as exc:
            raise explain(exc) from exc

    def main_pid(self, container: str) -> int:
        """The host's pid of a running container's main process (0 when it is not running)."""
        return int(self.container_attrs(container).get("State", {}).get("Pid") or 0)

    def disconnect_network(self, network: str, container: str) -> None:
        try:
            self.client.api.disconnect_container_from_network(container, network, force=True)
        except docker.errors.APIError as exc:
            raise explain(exc) from exc

    def connect_network(
        self, network: str, container: str, aliases: list[str] | None = None
    ) -> None:
        try:
            self.client.api.connect_container_to_network(container, network, aliases=aliases)
        except docker.errors.APIError as exc:
            raise explain(exc) from exc

    def start_helper(
        self,
        image: str,
        command: list[str],
        *,
        name: str,
        network: str,
        mounts: Sequence[tuple[Path, str]] = (),
        environment: dict[str, str] | None = None,
        user: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> Container:
        """Start a short-lived container on one network: read-only root filesystem (a tmpfs at
        /tmp), no capabilities, no new privileges; ``mounts`` are (host path, container path)
        pairs, bound read-only."""
        try:
            container = self.client.containers.create(
                image,
                entrypoint=command,
                name=name,
                network=network,
                mounts=[
                    Mount(target, str(source), type="bind", read_only=True)
                    for source, target in mounts
                ],
                environment=environment or {},
                user=user,
                labels=labels or {},
                read_only=True,
                tmpfs={"/tmp": "size=16m"},
                cap_drop=["ALL"],
                security_opt=["no-new-privileges:true"],
            )
            container.start()
        except docker.errors.APIError as exc:
            raise explain(exc, image=image) from exc
        return container

    def output_lines(self, container: Container) -> Iterator[str]:
        """A container's standard output, line by line, as it comes, until the container ends."""
        buffer = b""
        try:
            for chunk in container.logs(stdout=True, stderr=False, stream=True, follow=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace")
        except docker.errors.APIError as exc:
            raise explain(exc) from exc
        if buffer:
            yield buffer.decode(errors="replace")

    def finish(self, container: Container, timeout_s: float = 30.0) -> tuple[int, str]:
        """Wait for a container to end, then remove it; returns (exit status, the end of its
        standard error). Stops it first when it is still running after ``timeout_s``."""
        try:
            try:
                status = container.wait(timeout=timeout_s)
            except (ReadTimeout, RequestsConnectionError):  # it is still running
                container.stop(timeout=2)
                status = container.wait(timeout=timeout_s)
            stderr = container.logs(stdout=False, stderr=True, tail=30)
            return int(status.get("StatusCode", 1)), stderr.decode(errors="replace")
        except docker.errors.APIError as exc:
            raise explain(exc) from exc
        finally:
            self.remove_container(container.id or "")

    def log_lines(self, container: str, max_lines: int = 20000) -> list[str]:
        """The first ``max_lines`` lines a container logged (standard output and error)."""
        out: list[str] = []
        buffer = b""
        try:
            stream = self.client.containers.get(container).logs(stream=True, follow=False)
            for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                out.extend(line.decode(errors="replace") for line in lines)
                if len(out) >= max_lines:
                    return out[:max_lines]
        except docker.errors.NotFound as exc:
            raise DockerError(
                f"container {container} does not exist", "start the stack: deploykit up"
            ) from exc
        except docker.errors.APIError as exc:
            raise explain(exc) from exc
        if buffer:
            out.append(buffer.decode(errors="replace"))
        return out

    def networks(self, labels: dict[str, str]) -> list[str]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        try:
            return [n.name or "" for n in self.client.networks.list(filters=filters)]
        except docker.errors.APIError as exc:
            raise explain(exc) from exc

    def volumes(self, labels: dict[str, str]) -> list[str]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        try:
            return [v.name or "" for v in self.client.volumes.list(filters=filters)]
        except docker.errors.APIError as exc:
            raise explain(exc) from exc


def _build_failure(tag: str, message: str, log: list[str], base_image: str | None) -> DockerError:
    low = message.lower()
    if base_image and (
        "pull access denied" in low
        or ("not found" in low and base_image.lower() in low)
        or "no such host" in low
        or "manifest unknown" in low
        or "failed to resolve" in low
        or "repository does not exist" in low
    ):
        return explain(Exception(message), image=base_image)
    tail = "\n".join(log[-15:])
    return DockerError(
        f"building {tag} failed: {message}\n{tail}",
        "read the build log above; rebuild with --no-cache if a cached layer is stale",
    )

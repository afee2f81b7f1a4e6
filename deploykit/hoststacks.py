"""The deploykit stacks on this host, found from their containers' labels: ``deploykit ls``, and
``--name N`` from any folder.

A container of a deploykit image carries the image's ``io.deploykit.component`` label; compose adds
the project (the stack's name) and the compose file it was created from, whose folder holds the
stack's record (``stack.json``). So a stack is found by name wherever it was started.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit import stack
from deploykit.errors import UsageError

COMPONENT_LABEL = "io.deploykit.component"
SERVICES = ("broker", "engine", "bridge")


@dataclass(frozen=True)
class HostStack:
    """One stack on this host, as its containers show it."""

    name: str
    folder: Path | None  # the folder of its record (stack.json), None when compose did not say
    containers: dict[str, str]  # service -> state ("running", "exited", ...)
    mqtt_port: int | None
    record: stack.StackRecord | None  # None when the record is gone (e.g. deleted checkout)

    @property
    def running(self) -> int:
        return sum(1 for s in self.containers.values() if s == "running")

    @property
    def expected(self) -> int:
        """Containers the stack has when complete: broker, and an engine and a bridge per replica
        (and Redis with several, or for worker hosts); a worker host: its engines and bridges."""
        r = self.record
        if r is None:
            return len(SERVICES)
        own = r.worker_name is None  # a worker host has no broker and no Redis of its own
        redis = own and (r.replicas > 1 or r.redis_port is not None)
        return 2 * r.replicas + int(own) + int(redis)

    @property
    def state(self) -> str:
        return f"{self.running}/{max(self.expected, len(self.containers))} running"

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "name": self.name,
            "state": self.state,
            "containers": dict(sorted(self.containers.items())),
            "mqtt_port": self.mqtt_port,
            "folder": str(self.folder) if self.folder else None,
            "projects": list(r.projects) if r else None,
            "quant": r.quant if r else None,
            "gpu_class": r.gpu_class if r else None,
            "model": r.served_model_name if r else None,
        }


def _published_mqtt_port(attrs: dict[str, Any]) -> int | None:
    for bindings in ((attrs.get("NetworkSettings") or {}).get("Ports") or {}).values():
        for binding in bindings or []:
            if binding.get("HostPort"):
                return int(binding["HostPort"])
    # a stopped container has no NetworkSettings ports; its HostConfig still says what it asked
    for bindings in ((attrs.get("HostConfig") or {}).get("PortBindings") or {}).values():
        for binding in bindings or []:
            if binding.get("HostPort"):
                return int(binding["HostPort"])
    return None


def list_stacks(docker: Any | None = None) -> list[HostStack]:
    """Every deploykit stack with containers on this host, by name."""
    if docker is None:
        from deploykit.docker import Docker

        docker = Docker.connect()
    by_name: dict[str, dict[str, Any]] = {}
    for c in docker.containers({COMPONENT_LABEL: None, stack.COMPOSE_PROJECT_LABEL: None}):
        labels = c.labels or {}
        name = labels[stack.COMPOSE_PROJECT_LABEL]
        entry = by_name.setdefault(name, {"containers": {}, "port": None, "folder": None})
        service = labels.get(stack.COMPOSE_SERVICE_LABEL, "?")
        entry["containers"][service] = c.status
        config = labels.get(stack.COMPOSE_CONFIG_FILES_LABEL, "").split(",")[0]
        if config and entry["folder"] is None:
            entry["folder"] = Path(config).parent
        if service == "broker":
            entry["port"] = _published_mqtt_port(c.attrs)
    stacks = []
    for name, entry in sorted(by_name.items()):
        folder = entry["folder"]
        record = None
        if folder is not None:
            try:
                record = stack.load_record(folder)
            except (UsageError, OSError, ValueError, KeyError):
                record = None
        # a worker host's stack runs no broker: it publishes no MQTT port
        own_broker = record is not None and record.worker_name is None
        port = (
            entry["port"]
            if entry["port"] is not None
            else (record.mqtt_port if own_broker and record else None)
        )
        stacks.append(HostStack(name, folder, entry["containers"], port, record))
    return stacks


def describe(stacks: list[HostStack]) -> str:
    """One line per stack, for hints: ``name (3/3 running, MQTT port 1883, from /path)``."""
    return "; ".join(
        f"{s.name} ({s.state}, MQTT port {s.mqtt_port}, from {s.folder})" for s in stacks
    )


def find_stack(name: str | None, state_dir: Path = stack.DEFAULT_STATE_DIR) -> stack.StackRecord:
    """The stack a command acts on: ``name`` from this checkout's state folder or, failing that,
    from the containers of that name on this host; no name: this checkout's default stack."""
    wanted = stack.check_stack_name(name) if name else stack.default_name(state_dir)
    local = (state_dir / wanted).resolve()
    if (local / stack.RECORD_FILE).is_file():
        return stack.load_record(local)
    stacks = list_stacks()
    for s in stacks:
        if s.name == wanted and s.record is not None:
            return s.record
    others = describe(stacks) if stacks else "none"
    if name is None:
        raise UsageError(
            f"this folder has no stack (its default name would be {wanted!r}); "
            f"stacks on this host: {others}",
            "pass --name N for one of them, or start this folder's stack with `deploykit up`",
        )
    found = next((s for s in stacks if s.name == wanted), None)
    if found is not None:
        raise UsageError(
            f"the stack {wanted!r} has containers ({found.state}) but its record is gone "
            f"({found.folder})",
            f"remove its containers: docker compose -p {wanted} down (or docker rm -f them)",
        )
    raise UsageError(
        f"no stack named {wanted!r} on this host; stacks on this host: {others}",
        f"pick a name from `deploykit ls`, or start it with `deploykit up --name {wanted}`",
    )


def port_holder(port: int, name: str, stacks: list[HostStack] | None = None) -> HostStack | None:
    """Another stack (not ``name``) whose broker publishes this host port."""
    for s in stacks if stacks is not None else list_stacks():
        if s.name != name and s.mqtt_port == port and s.running:
            return s
    return None


def stack_containers(name: str, docker: Any | None = None) -> list[tuple[str, str, str, str]]:
    """``deploykit ps``: each container of the stack ``name`` as (service, container, state with
    its health, published ports), by service."""
    if docker is None:
        from deploykit.docker import Docker

        docker = Docker.connect()
    rows = []
    for c in docker.containers({stack.COMPOSE_PROJECT_LABEL: name}):
        attrs = c.attrs or {}
        health = ((attrs.get("State") or {}).get("Health") or {}).get("Status")
        ports = [
            f"{b.get('HostIp', '')}:{b['HostPort']}->{inside}"
            for inside, bindings in sorted(
                ((attrs.get("NetworkSettings") or {}).get("Ports") or {}).items()
            )
            for b in bindings or []
            if b.get("HostPort")
        ]
        rows.append(
            (
                (c.labels or {}).get(stack.COMPOSE_SERVICE_LABEL, "?"),
                c.name or "",
                f"{c.status} ({health})" if health else str(c.status),
                ", ".join(ports),
            )
        )
    return sorted(rows)

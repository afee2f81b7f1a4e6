"""What a running ``deploykit serve`` records beside the compose stack's fields in ``stack.json``.

A compose stack is found through Docker; a serve instance through these facts: the engine's URL and
the file of its API key (so a benchmark can reach vLLM directly), the broker's URL and whether serve
started it, the account health and chat log in with on a broker serve did not start, the logs
folder, and the process groups serve started (their leaders' ids).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ServeState:
    """The serve-only part of a serve instance's record."""

    engine_url: str
    engine_api_key_file: Path
    bridge_url: str
    broker_url: str
    #: True: serve started this Mosquitto; False: an existing broker (``--broker``).
    local_broker: bool
    logs_dir: Path
    supervisor_pid: int
    vllm_python: str
    vllm_version: str
    #: On a broker serve did not start: the account health and chat log in with (files).
    mqtt_username_file: Path | None = None
    mqtt_password_file: Path | None = None
    #: process name (broker, engine, bridge) -> id of its process group's leader
    pids: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "engine_url": self.engine_url,
            "engine_api_key_file": str(self.engine_api_key_file),
            "bridge_url": self.bridge_url,
            "broker_url": self.broker_url,
            "local_broker": self.local_broker,
            "logs_dir": str(self.logs_dir),
            "supervisor_pid": self.supervisor_pid,
            "vllm_python": self.vllm_python,
            "vllm_version": self.vllm_version,
            "mqtt_username_file": _opt(self.mqtt_username_file),
            "mqtt_password_file": _opt(self.mqtt_password_file),
            "pids": dict(sorted(self.pids.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServeState:
        return cls(
            engine_url=str(data["engine_url"]),
            engine_api_key_file=Path(data["engine_api_key_file"]),
            bridge_url=str(data["bridge_url"]),
            broker_url=str(data["broker_url"]),
            local_broker=bool(data["local_broker"]),
            logs_dir=Path(data["logs_dir"]),
            supervisor_pid=int(data["supervisor_pid"]),
            vllm_python=str(data["vllm_python"]),
            vllm_version=str(data["vllm_version"]),
            mqtt_username_file=_path(data.get("mqtt_username_file")),
            mqtt_password_file=_path(data.get("mqtt_password_file")),
            pids={str(k): int(v) for k, v in (data.get("pids") or {}).items()},
        )


def _opt(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _path(value: Any) -> Path | None:
    return Path(value) if value else None

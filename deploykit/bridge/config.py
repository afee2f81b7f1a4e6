"""Bridge settings (where things are: broker, engine, projects, secret files) and the YAML config
(how each project behaves). The only module of the bridge that reads environment variables.

YAML config (every key optional; the values shown are the defaults)::

    defaults:                      # applies to every project unless the project overrides it
      system_prompt: null
      default_max_tokens: 256
      max_max_tokens: 1024
      default_temperature: 0.7
      default_top_p: 1.0
      allow_system_prompt_override: true
      rate_limit_per_minute: 1200  # per project, sustained; null = unlimited
      rate_limit_burst: 200        # requests a project may send at once beyond the rate
      max_queued: 256              # requests waiting for an engine slot; beyond: rate_limited
      max_engine_slots: null       # cap on the engine slots this project may hold; null = all
      receive_maximum: 512         # unacknowledged requests the broker hands the bridge at once
      max_history_tokens: 2048
      engine_extra: {}             # extra fields for the engine's chat request (e.g. ignore_eos)
    projects:
      maze:
        system_prompt: "You guide a player through a maze."
        max_history_tokens: 512
    bridge:
      max_in_flight: 256           # engine slots: requests at the engine at once, all projects
      queue_timeout_s: 60          # waited this long for a slot: answered overloaded
      session_idle_s: 1800
      max_sessions: 10000
      max_payload_bytes: 65536
      max_message_chars: 32000
      dedupe_ttl_s: 600
      dedupe_max_entries: 10000
      mqtt_session_expiry_s: 86400
      mqtt_keepalive_s: 30
      request_timeout_s: 300
      stream_interval_s: 0.1       # stream parts after the first: at most one per interval
      engine_stream_tokens: auto   # tokens per streamed event from the engine after the first:
                                   # auto paces events to stream_interval_s (at least 4), or a number
      engine_keepalive_s: 4        # below the engine's own keep-alive (uvicorn: 5 s)
      engine_retries: 3            # attempts after a connection failure before any token
      drain_timeout_s: 30          # replicas: how long a stopping bridge answers what it holds
      shared_lease_s: 15           # replicas: a dead replica holds a session up this long at most
      order_window_s: 0.05         # replicas: a request waits this long after its receipt before
                                   # it starts, for a session's earlier request at another replica
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deploykit import names
from deploykit.errors import UsageError
from deploykit.ports import ENGINE_PORT, MQTT_PORT

ENV_PREFIX = "DEPLOYKIT_"


class ProjectConfig(BaseModel):
    """Per-project behaviour. Every field has a default, so an empty config works."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str | None = None
    default_max_tokens: int = Field(256, ge=1)
    max_max_tokens: int = Field(1024, ge=1)
    default_temperature: float = Field(0.7, ge=0.0, le=2.0)
    default_top_p: float = Field(1.0, gt=0.0, le=1.0)
    allow_system_prompt_override: bool = True
    rate_limit_per_minute: float | None = Field(1200.0, gt=0)
    rate_limit_burst: int | None = Field(200, ge=1)
    max_queued: int = Field(256, ge=0)
    max_engine_slots: int | None = Field(None, ge=1)
    receive_maximum: int = Field(512, ge=1, le=65535)
    max_history_tokens: int = Field(2048, ge=0)
    engine_extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ProjectConfig:
        if self.default_max_tokens > self.max_max_tokens:
            raise ValueError("default_max_tokens must not exceed max_max_tokens")
        return self


class BridgeTuning(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_in_flight: int = Field(256, ge=1, le=65535)
    queue_timeout_s: float = Field(60.0, gt=0)
    session_idle_s: float = Field(1800.0, gt=0)
    max_sessions: int = Field(10000, ge=1)
    max_payload_bytes: int = Field(65536, ge=256)
    max_message_chars: int = Field(32000, ge=1)
    dedupe_ttl_s: float = Field(600.0, gt=0)
    dedupe_max_entries: int = Field(10000, ge=1)
    mqtt_session_expiry_s: int = Field(86400, ge=1)
    mqtt_keepalive_s: int = Field(30, ge=2, le=65535)
    request_timeout_s: float = Field(300.0, gt=0)
    stream_interval_s: float = Field(0.1, ge=0)
    engine_stream_tokens: int | Literal["auto"] = "auto"
    engine_keepalive_s: float = Field(4.0, gt=0)
    engine_retries: int = Field(3, ge=0, le=10)
    drain_timeout_s: float = Field(30.0, ge=0)
    shared_lease_s: float = Field(15.0, ge=1)
    order_window_s: float = Field(0.05, ge=0, le=5)

    @field_validator("engine_stream_tokens", mode="before")
    @classmethod
    def _tokens_per_event(cls, value: Any) -> Any:
        if value == "auto" or (type(value) is int and 1 <= value <= 64):
            return value
        raise ValueError(f"'auto' or a whole number from 1 to 64, not {value!r}")


class BridgeConfig(BaseModel):
    """The YAML file: defaults, per-project overrides (merged over defaults), bridge tuning."""

    model_config = ConfigDict(extra="forbid")

    defaults: dict[str, Any] = Field(default_factory=dict)
    projects: dict[str, dict[str, Any]] = Field(default_factory=dict)
    bridge: BridgeTuning = Field(default_factory=lambda: BridgeTuning.model_validate({}))

    @field_validator("defaults")
    @classmethod
    def _defaults_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        ProjectConfig(**value)  # fail early with a clear message
        return value

    def project(self, name: str) -> ProjectConfig:
        return ProjectConfig(**{**self.defaults, **self.projects.get(name, {})})


class Settings(BaseModel):
    """Where to connect and what to serve (from CLI flags or DEPLOYKIT_* environment variables).

    ``client_id`` is the bridge's secret: each project's MQTT session is ``<client_id>-<project>``,
    so nobody who does not know it can take a session over (stock Mosquitto cannot bind a client id
    to an account). ``name`` is public: the retained status topic names the bridge by it.
    ``share_group`` (also secret) makes the subscriptions shared (``$share/<group>/...``) for
    several replicas; without it each project is a plain subscription, which the broker keeps
    across its own restarts (Mosquitto 2.0 restores shared ones only when the member reconnects).
    ``replica`` (public) tells the MQTT sessions of replicas apart: ``<client_id>-<replica>-<project>``
    (none: ``<client_id>-<project>``). ``redis`` (``redis://HOST:PORT/DB``, password from a file)
    holds the session state replicas share (deploykit.bridge.shared); none: in memory.
    """

    model_config = ConfigDict(extra="forbid")

    broker: str = f"mqtt://localhost:{MQTT_PORT}"
    engine: str = f"http://localhost:{ENGINE_PORT}"
    projects: list[str] = Field(default_factory=lambda: ["general"])
    config_file: Path | None = None
    client_id: str = "deploykit-bridge-1"
    client_id_file: Path | None = None
    name: str = "bridge-1"
    share_group_file: Path | None = None
    replica: str | None = None
    redis: str | None = None
    redis_password_file: Path | None = None
    http_port: int | None = Field(None, ge=0, le=65535)
    http_host: str = "0.0.0.0"
    mqtt_username_file: Path | None = None
    mqtt_password_file: Path | None = None
    engine_api_key_file: Path | None = None
    log_level: str = "INFO"

    @field_validator("projects")
    @classmethod
    def _projects_valid(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one project is needed")
        for name in value:
            problem = names.project_name_problem(name)
            if problem is not None:
                raise ValueError(f"{problem}; {names.PROJECT_NAME_RULE}")
        if len(set(value)) != len(value):
            raise ValueError("project names repeat")
        return value

    @field_validator("client_id", "name", "replica")
    @classmethod
    def _id_valid(cls, value: str | None) -> str | None:
        if value is None:
            return value
        problem = names.client_string_problem(value, "the id", max_length=128)
        if not value or problem or any(c in value for c in "/+#$"):
            raise ValueError("must be 1-128 characters without '/', '+', '#', '$' or controls")
        return value


def split_projects(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


_ENV_FIELDS = {
    "BROKER": "broker",
    "ENGINE": "engine",
    "PROJECTS": "projects",
    "BRIDGE_CONFIG": "config_file",
    "CLIENT_ID": "client_id",
    "CLIENT_ID_FILE": "client_id_file",
    "BRIDGE_NAME": "name",
    "SHARE_GROUP_FILE": "share_group_file",
    "REPLICA": "replica",
    "REDIS": "redis",
    "REDIS_PASSWORD_FILE": "redis_password_file",
    "ENGINE_API_KEY_FILE": "engine_api_key_file",
    "HTTP_PORT": "http_port",
    "HTTP_HOST": "http_host",
    "MQTT_USERNAME_FILE": "mqtt_username_file",
    "MQTT_PASSWORD_FILE": "mqtt_password_file",
    "LOG_LEVEL": "log_level",
}


def settings_from(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Settings from DEPLOYKIT_* environment variables, then explicit overrides (CLI flags; None
    values are ignored)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for suffix, name in _ENV_FIELDS.items():
        raw = env.get(ENV_PREFIX + suffix)
        if raw is not None and raw != "":
            values[name] = split_projects(raw) if name == "projects" else raw
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = (
                split_projects(value) if name == "projects" and isinstance(value, str) else value
            )
    try:
        return Settings(**values)
    except ValidationError as err:
        raise UsageError(f"bad bridge settings: {_describe(err)}") from err


def load_config(path: Path | None) -> BridgeConfig:
    """Read the YAML config; no file means all defaults."""
    if path is None:
        return BridgeConfig()
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise UsageError(f"cannot read the bridge config {str(path)!r}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise UsageError(f"the bridge config {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise UsageError(f"the bridge config {str(path)!r} must be a mapping")
    try:
        config = BridgeConfig(**raw)
        for name in config.projects:
            config.project(name)
    except ValidationError as err:
        raise UsageError(
            f"bad bridge config {str(path)!r}: {_describe(err)}",
            hint="see the keys documented in deploykit/bridge/config.py",
        ) from err
    return config


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)

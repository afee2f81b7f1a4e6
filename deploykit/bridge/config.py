"""Bridge settings (where things are: broker, engine, projects, credentials files) and the YAML
config (how each project behaves). The only module of the bridge that reads environment variables.

YAML config (every key optional)::

    defaults:                      # applies to every project unless the project overrides it
      system_prompt: "You are a helpful assistant."
      default_max_tokens: 256
      max_max_tokens: 1024
      default_temperature: 0.7
      default_top_p: 1.0
      allow_system_prompt_override: true
      rate_limit_per_minute: 600   # per project; null = unlimited
      rate_limit_burst: 60
      max_history_tokens: 2048
      engine_extra: {}             # extra fields for the engine's chat request (e.g. ignore_eos)
    projects:
      maze:
        system_prompt: "You guide a player through a maze."
        max_history_tokens: 512
    bridge:
      max_in_flight: 128           # requests held at once (MQTT 5 Receive Maximum)
      session_idle_s: 1800
      max_sessions: 10000
      max_payload_bytes: 65536
      max_message_chars: 32000
      dedupe_ttl_s: 600
      dedupe_max_entries: 10000
      mqtt_session_expiry_s: 86400
      request_timeout_s: 300
      stream_interval_s: 0.05
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deploykit import names
from deploykit.errors import UsageError

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
    rate_limit_per_minute: float | None = Field(None, gt=0)
    rate_limit_burst: int | None = Field(None, ge=1)
    max_history_tokens: int = Field(2048, ge=0)
    engine_extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ProjectConfig:
        if self.default_max_tokens > self.max_max_tokens:
            raise ValueError("default_max_tokens must not exceed max_max_tokens")
        return self


class BridgeTuning(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_in_flight: int = Field(128, ge=1, le=65535)
    session_idle_s: float = Field(1800.0, gt=0)
    max_sessions: int = Field(10000, ge=1)
    max_payload_bytes: int = Field(65536, ge=256)
    max_message_chars: int = Field(32000, ge=1)
    dedupe_ttl_s: float = Field(600.0, gt=0)
    dedupe_max_entries: int = Field(10000, ge=1)
    mqtt_session_expiry_s: int = Field(86400, ge=1)
    request_timeout_s: float = Field(300.0, gt=0)
    stream_interval_s: float = Field(0.05, ge=0)
    share_group: str = Field("deploykit", pattern=r"^[A-Za-z0-9_-]+$")


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
    """Where to connect and what to serve (from CLI flags or DEPLOYKIT_* environment variables)."""

    model_config = ConfigDict(extra="forbid")

    broker: str = "mqtt://localhost:1883"
    engine: str = "http://localhost:8000"
    projects: list[str] = Field(default_factory=lambda: ["general"])
    config_file: Path | None = None
    client_id: str = "deploykit-bridge-1"
    http_port: int | None = Field(None, ge=0, le=65535)
    http_host: str = "0.0.0.0"
    mqtt_username_file: Path | None = None
    mqtt_password_file: Path | None = None
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

    @field_validator("client_id")
    @classmethod
    def _client_id_valid(cls, value: str) -> str:
        if not value or any(c in value for c in "/+#$") or len(value) > 128:
            raise ValueError("client id must be 1-128 characters without '/', '+', '#', '$'")
        return value


def split_projects(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


_ENV_FIELDS = {
    "BROKER": "broker",
    "ENGINE": "engine",
    "PROJECTS": "projects",
    "BRIDGE_CONFIG": "config_file",
    "CLIENT_ID": "client_id",
    "HTTP_PORT": "http_port",
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

"""CLI commands: bridge."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("bridge")(bridge)


def bridge(
    broker: str | None = typer.Option(
        None, "--broker", help="MQTT broker, mqtt://HOST:PORT [env DEPLOYKIT_BROKER]"
    ),
    engine: str | None = typer.Option(
        None, "--engine", help="engine base URL, http://HOST:PORT [env DEPLOYKIT_ENGINE]"
    ),
    projects: str | None = typer.Option(
        None, "--projects", help="comma-separated projects to serve [env DEPLOYKIT_PROJECTS]"
    ),
    config: Path | None = typer.Option(
        None, "--config", help="YAML config with per-project settings [env DEPLOYKIT_BRIDGE_CONFIG]"
    ),
    client_id: str | None = typer.Option(
        None, "--client-id", help="stable MQTT client id of this replica [env DEPLOYKIT_CLIENT_ID]"
    ),
    http_port: int | None = typer.Option(
        None, "--http-port", help="port of /health and /metrics [env DEPLOYKIT_HTTP_PORT]"
    ),
    mqtt_username_file: Path | None = typer.Option(
        None, "--mqtt-username-file", help="file holding the MQTT username (none: anonymous)"
    ),
    mqtt_password_file: Path | None = typer.Option(
        None, "--mqtt-password-file", help="file holding the MQTT password"
    ),
    log_level: str | None = typer.Option(
        None, "--log-level", help="DEBUG logs user text too; default INFO"
    ),
) -> None:
    """Run the MQTT bridge in the foreground: answer {project}/user_input through the engine."""
    from deploykit.bridge import run_bridge, settings_from

    settings = settings_from(
        overrides={
            "broker": broker,
            "engine": engine,
            "projects": projects,
            "config_file": config,
            "client_id": client_id,
            "http_port": http_port,
            "mqtt_username_file": mqtt_username_file,
            "mqtt_password_file": mqtt_password_file,
            "log_level": log_level,
        }
    )
    run_bridge(settings)

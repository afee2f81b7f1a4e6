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
    client_id_file: Path | None = typer.Option(
        None,
        "--client-id-file",
        help="file holding this replica's secret MQTT client id [env DEPLOYKIT_CLIENT_ID_FILE]",
    ),
    name: str | None = typer.Option(
        None, "--name", help="public name in the status topic [env DEPLOYKIT_BRIDGE_NAME]"
    ),
    share_group_file: Path | None = typer.Option(
        None,
        "--share-group-file",
        help="file holding the secret share group (replicas); none: plain subscriptions",
    ),
    replica: str | None = typer.Option(
        None,
        "--replica",
        help="public name that tells this replica's MQTT sessions apart [env DEPLOYKIT_REPLICA]",
    ),
    redis: str | None = typer.Option(
        None,
        "--redis",
        help="redis://HOST:PORT/DB holding the session state replicas share [env DEPLOYKIT_REDIS]",
    ),
    redis_password_file: Path | None = typer.Option(
        None, "--redis-password-file", help="file holding the Redis password"
    ),
    engine_api_key_file: Path | None = typer.Option(
        None, "--engine-api-key-file", help="file holding the engine's API key"
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
            "client_id_file": client_id_file,
            "name": name,
            "share_group_file": share_group_file,
            "replica": replica,
            "redis": redis,
            "redis_password_file": redis_password_file,
            "engine_api_key_file": engine_api_key_file,
            "http_port": http_port,
            "mqtt_username_file": mqtt_username_file,
            "mqtt_password_file": mqtt_password_file,
            "log_level": log_level,
        }
    )
    run_bridge(settings)

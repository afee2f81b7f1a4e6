"""CLI commands that talk to a running stack as a client: health, chat, credentials."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from deploykit import chat, credentials, health
from deploykit.commands import options
from deploykit.commands.stack import WaitReport, print_checks
from deploykit.docker import Docker

_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("health")
    def health_cmd(
        wait: bool = options.wait_option(),
        timeout: float = options.timeout_option(),
        as_json: bool = options.json_option("Print results as JSON."),
        project: str | None = typer.Option(
            None, "--project", "-p", help="Project whose account the MQTT checks use."
        ),
        name: str | None = options.name_option(),
        state_dir: Path = options.state_dir_option(),
    ) -> None:
        """Layered checks: broker, engine container, /health, models, completion, bridge.

        Exits 0 only when all pass.
        """
        record = options.find(name, state_dir)
        docker = Docker.connect() if record.serve is None else None
        target = health.StackTarget(record, docker, project=project)
        with WaitReport(_err) if wait and not as_json else _NoReport() as report:
            results, waited = health.wait_healthy(
                lambda: health.default_checks(target),
                timeout_s=timeout if wait else 0.0,
                on_round=report,
            )
        ok = all(r.passed for r in results)
        if as_json:
            print(json.dumps(health.report_json(results), indent=2))
            if not ok:
                raise typer.Exit(1)
            return
        print_checks(results)
        if not ok:
            raise health.failure(results, waited if wait else None)

    @app.command("chat")
    def chat_cmd(
        project: str | None = typer.Option(
            None, "--project", "-p", help="Project to talk to. Default: the stack's first."
        ),
        session: str | None = typer.Option(
            None, "--session", help="Session id; the bridge keeps its history. Default: a new one."
        ),
        message: str | None = typer.Option(
            None, "--message", "-m", help="Send one message, print the reply, exit."
        ),
        max_tokens: int | None = typer.Option(
            None, "--max-tokens", help="Longest answer in tokens. Default: the project's."
        ),
        name: str | None = options.name_option(),
        state_dir: Path = options.state_dir_option(),
    ) -> None:
        """Talk to the stack over MQTT from the terminal (/quit to leave)."""
        record = options.find(name, state_dir)
        chosen = credentials.chosen_project(record, project)
        sess = chat.ChatSession(
            record, chosen, session or chat.new_session_id(), max_tokens=max_tokens
        )
        failed = False

        def say(turn: chat.ChatTurn) -> None:
            nonlocal failed
            if turn.ok:
                _out.print(turn.text, markup=False)
            else:
                failed = True
                _err.print(f"[bold red]error:[/] {turn.text}")

        if message is not None:
            say(sess.send(message))
            if failed:
                raise typer.Exit(1)
            return
        _err.print(f"project {chosen}, session {sess.session_id}; /quit to leave")

        chat.repl(sess, _input_lines(), say)

    @app.command("credentials")
    def credentials_cmd(
        project: str | None = typer.Option(
            None, "--project", "-p", help="Project (its MQTT account). Default: the stack's first."
        ),
        as_json: bool = options.json_option(
            "Print JSON (broker, username, password_file, snippets)."
        ),
        worker: str | None = typer.Option(
            None,
            "--worker",
            help="Write a bundle for worker host NAME instead (--out): what `deploykit up --role "
            "worker` there needs to join this stack. Files, owner-only; copy the folder over.",
        ),
        host: str | None = typer.Option(
            None, "--host", help="--worker: how the worker reaches this host (default: its FQDN)."
        ),
        out: Path | None = typer.Option(
            None, "--out", help="--worker: the bundle's folder (default: ./deploykit-worker-NAME)."
        ),
        name: str | None = options.name_option(),
        state_dir: Path = options.state_dir_option(),
    ) -> None:
        """How a client reaches a project: broker address, username, password file, and clients
        to paste (mosquitto_pub/sub, Python paho, JavaScript mqtt.js). Never prints the password.
        With --worker NAME: a bundle of files for a worker host."""
        if worker is not None:
            folder = out or Path(f"deploykit-worker-{worker}")
            bundle = credentials.write_worker_bundle(
                options.find(name, state_dir), worker, folder, host
            )
            print(f"worker bundle for {bundle.worker}: {folder} (owner-only; copy the folder)")
            print(f"  broker {bundle.broker_url}, Redis {bundle.redis_url}")
            print(f"  projects {','.join(bundle.projects)}")
            print(
                "on the worker: deploykit up --role worker --worker-credentials "
                f"{folder.name} [--gpus ...]"
            )
            return
        access = credentials.client_access(options.find(name, state_dir), project)
        if as_json:
            print(json.dumps(access.to_json(), indent=2))
            return
        info = access.to_json()
        rows = [
            ("stack", access.stack),
            (
                "broker",
                f"{access.broker} (other machines: this host's address, port {access.port})",
            ),
            ("username", access.username),
            ("password file", f"{access.password_file} (owner-only; keep it off command lines)"),
            ("requests", f"{info['request_topic']} (JSON: sessionId, message, requestId, ...)"),
            ("replies", f"{info['reply_topic']}, or the request's replyTopic"),
            ("protocol", credentials.PROTOCOL_REFERENCE),
        ]
        for key, value in rows:
            print(f"{key + ':':<15}{value}")
        titles = {
            "mosquitto": "mosquitto_sub / mosquitto_pub (sh)",
            "python": "Python (paho-mqtt 2)",
            "javascript": "JavaScript (mqtt.js 5, Node 18+, as an .mjs file)",
        }
        for kind, text in access.snippets().items():
            print(f"\n# --- {titles[kind]} ---")
            print(text, end="")


class _NoReport:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_exc: object) -> None:
        return None


def _input_lines() -> Iterator[str]:
    if sys.stdin.isatty():
        while True:
            try:
                yield input("you> ")
            except EOFError:
                return
    else:
        yield from sys.stdin

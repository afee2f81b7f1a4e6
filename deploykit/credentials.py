"""``deploykit credentials``: how a client reaches one project of a stack.

The broker's address, the project's username (the project's name) and the path of its password
file, never the password itself; and ready-to-paste clients (``render.client_snippets``) that read
the password from that file or the environment, never from a command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit import names, render
from deploykit.errors import UsageError
from deploykit.secrets import SecretsFolder
from deploykit.stack import StackRecord

PROTOCOL_REFERENCE = "deploykit/bridge/README.md"


@dataclass(frozen=True)
class ClientAccess:
    """What a client of one project needs, without the password."""

    stack: str
    project: str
    host: str
    port: int
    password_file: Path

    @property
    def username(self) -> str:
        return self.project

    @property
    def broker(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def snippets(self) -> dict[str, str]:
        return render.client_snippets(
            host=self.host,
            port=self.port,
            project=self.project,
            password_file=str(self.password_file),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "project": self.project,
            "broker": self.broker,
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "password_file": str(self.password_file),
            "request_topic": names.request_topic(self.project),
            "reply_topic": names.default_reply_topic(self.project, "{sessionId}"),
            "protocol": PROTOCOL_REFERENCE,
            "snippets": self.snippets(),
        }


def chosen_project(record: StackRecord, project: str | None) -> str:
    """``project`` when the stack serves it, else its first project."""
    chosen = project or record.projects[0]
    if chosen not in record.projects:
        raise UsageError(
            f"the stack {record.name!r} serves projects {', '.join(record.projects)}, not {chosen!r}",
            f"pick one with --project, or add it: deploykit up --name {record.name} --projects "
            f"{','.join((*record.projects, chosen))} (with the stack's other options)",
        )
    return chosen


def client_access(
    record: StackRecord, project: str | None, host: str = "127.0.0.1"
) -> ClientAccess:
    """One project's access to a stack (its first project by default)."""
    serve = record.serve
    if serve is not None and not serve.local_broker:
        raise UsageError(
            f"the serve instance {record.name!r} uses the broker {serve.broker_url}, whose accounts "
            "are its owner's, not this kit's",
            "ask the broker's owner for a project account",
        )
    chosen = chosen_project(record, project)
    path = SecretsFolder(record.secrets_dir).client_password_file(chosen)
    if not path.is_file():
        raise UsageError(
            f"the password file of project {chosen!r} is missing: {path}",
            f"run `deploykit up --name {record.name}` again, which generates it",
        )
    return ClientAccess(record.name, chosen, host, record.mqtt_port, path)

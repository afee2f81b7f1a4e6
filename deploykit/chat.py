"""``deploykit chat``: a terminal client of a running stack, over MQTT like any other client.

It logs in with the project's account from the secrets folder, sends each line on
``{project}/user_input`` with a session id (so the bridge keeps the conversation's history) and
prints the reply (or the error the bridge returned, marked as an error).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from deploykit import mqttclient
from deploykit.errors import CheckFailed
from deploykit.stack import StackRecord

EXIT_WORDS = frozenset({"/quit", "/exit", ":q"})


@dataclass(frozen=True)
class ChatTurn:
    ok: bool
    text: str
    usage: dict[str, Any] | None = None


@dataclass
class ChatSession:
    """One conversation with one project of a stack."""

    record: StackRecord
    project: str
    session_id: str
    host: str = "127.0.0.1"
    timeout_s: float = 120.0
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        self.record.check_has_broker("chat")
        if self.project not in self.record.projects:
            raise CheckFailed(
                f"the stack {self.record.name!r} serves projects {', '.join(self.record.projects)}, "
                f"not {self.project!r}",
                f"pick one of them with --project, or `deploykit up --projects ...,{self.project}`",
            )
        self.credentials = self.record.client_credentials(self.project)
        self.address = self.record.broker_address(self.host)

    def send(self, message: str) -> ChatTurn:
        fields: dict[str, Any] = {}
        if self.max_tokens is not None:
            fields["maxTokens"] = self.max_tokens
        reply = mqttclient.request(
            self.address,
            self.project,
            message,
            credentials=self.credentials,
            session_id=self.session_id,
            timeout_s=self.timeout_s,
            fields=fields,
        )
        try:
            envelope = reply.json()
        except ValueError:
            return ChatTurn(True, reply.text)
        if not isinstance(envelope, dict):
            return ChatTurn(True, reply.text)
        if envelope.get("status") == "ok":
            return ChatTurn(True, str(envelope.get("text", "")), envelope.get("usage"))
        error = envelope.get("error") or {}
        if isinstance(error, dict):
            detail = f"{error.get('code', 'error')}: {error.get('message', '')}"
        else:
            detail = str(error)
        return ChatTurn(False, detail)


def new_session_id() -> str:
    return f"chat-{uuid.uuid4().hex[:10]}"


def repl(
    session: ChatSession,
    lines: Iterable[str],
    say: Callable[[ChatTurn], None],
) -> int:
    """Send each line until an exit word or the end of input; returns the number of turns."""
    turns = 0
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in EXIT_WORDS:
            break
        say(session.send(text))
        turns += 1
    return turns

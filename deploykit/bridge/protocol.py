"""The MQTT protocol: request parsing and validation, reply topics, reply payloads. Pure: bytes in,
objects out; no I/O.

Requests arrive on ``{project}/user_input`` as JSON (see docs/design.md). Replies go to the MQTT 5
Response Topic, else ``replyTopic``, else ``{project}/assistant_response/{sessionId}``: plain text
by default (legacy clients), or a JSON envelope when the request says ``"format": "json"``. Errors are
always sent as the JSON envelope (``status: "error"`` and an error code), so they can never be
mistaken for model text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from deploykit import names

MAX_TOPIC_LENGTH = names.MAX_TOPIC_LENGTH
MAX_ID_LENGTH = 128
STREAM_SUFFIX = names.STREAM_SUFFIX


class ErrorCode(StrEnum):
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    INVALID_REQUEST = "invalid_request"  # missing field or wrong type
    OUT_OF_RANGE = "out_of_range"
    INVALID_SESSION_ID = "invalid_session_id"
    INVALID_REPLY_TOPIC = "invalid_reply_topic"
    OVERRIDE_NOT_ALLOWED = "override_not_allowed"
    CONFLICT = "conflict"  # a requestId reused for a different request
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"  # the engine cannot take the request now
    MESSAGE_TOO_LONG = "message_too_long"
    NO_ANSWER = "no_answer"  # the model reasoned but gave no answer (maxTokens ran out)
    ENGINE_UNAVAILABLE = "engine_unavailable"
    ENGINE_ERROR = "engine_error"
    STATE_UNAVAILABLE = "state_unavailable"  # replicas: the shared session state did not answer
    TIMEOUT = "timeout"
    INTERNAL_ERROR = "internal_error"


#: Errors a client should retry later with the same requestId (with backoff); the others need a
#: different request.
RETRYABLE = frozenset(
    {
        ErrorCode.RATE_LIMITED,
        ErrorCode.OVERLOADED,
        ErrorCode.ENGINE_UNAVAILABLE,
        ErrorCode.STATE_UNAVAILABLE,
        ErrorCode.TIMEOUT,
        ErrorCode.INTERNAL_ERROR,
    }
)


class RequestFailed(Exception):
    """A valid request that cannot be answered; becomes an error reply with ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ChatRequest(BaseModel):
    """A validated request. Field names are the wire names (camelCase)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    sessionId: StrictStr
    message: StrictStr
    replyTopic: StrictStr | None = None
    clientId: StrictStr | None = None
    requestId: StrictStr | StrictInt | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    topP: float | None = Field(None, gt=0.0, le=1.0)
    maxTokens: StrictInt | None = Field(None, ge=1)
    systemPrompt: StrictStr | None = None
    format: Literal["text", "json"] = "text"
    stream: StrictBool = False
    probe: StrictBool = False

    @field_validator("temperature", "topP", mode="before")
    @classmethod
    def _number_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float | None):
            raise ValueError("must be a number")
        return value


@dataclass(frozen=True)
class Routing:
    """Where the reply to a message goes and how it is shaped; known as early as possible so that
    even a broken request can get an error reply."""

    reply_topic: str | None
    format: Literal["text", "json"] = "text"
    request_id: str | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class Rejection:
    code: ErrorCode
    message: str
    routing: Routing


@dataclass(frozen=True)
class Accepted:
    request: ChatRequest
    routing: Routing

    @property
    def request_id(self) -> str | None:
        return self.routing.request_id


def session_id_problem(session_id: str) -> str | None:
    """Why a sessionId is not usable (None when it is). It is one level of the default reply
    topic, so no ``/ + #`` either."""
    if not session_id:
        return "sessionId is empty"
    problem = names.client_string_problem(session_id, "sessionId", max_length=MAX_ID_LENGTH)
    if problem is not None:
        return problem
    for ch in "/+#":
        if ch in session_id:
            return f"sessionId must not contain {ch!r}"
    return None


def reply_topic_problem(project: str, topic: str) -> str | None:
    """Why a reply topic is refused (None when it is fine): it must be ``{project}/...`` of the
    request's own project, without wildcards, ``$``, empty levels or characters MQTT forbids, and
    short enough that its ``/stream`` sub-topic is too."""
    if not topic:
        return "the reply topic is empty"
    limit = MAX_TOPIC_LENGTH - len(STREAM_SUFFIX)
    problem = names.client_string_problem(topic, "the reply topic", max_length=limit)
    if problem is not None:
        return problem
    if "+" in topic or "#" in topic:
        return "the reply topic must not contain wildcards ('+', '#')"
    if "$" in topic:
        return "the reply topic must not contain '$'"
    levels = topic.split("/")
    if levels[0] != project or len(levels) < 2:
        return f"the reply topic must be inside the project: {project}/..."
    if any(level == "" for level in levels):
        return "the reply topic must not have empty levels"
    if topic == names.request_topic(project):
        return "the reply topic must not be the request topic"
    return None


def request_id_problem(request_id: str) -> str | None:
    return names.client_string_problem(request_id, "requestId", max_length=MAX_ID_LENGTH)


default_reply_topic = names.default_reply_topic


def _routing_hints(
    project: str, obj: Any, response_topic: str | None
) -> tuple[Routing, str | None, str | None]:
    """Best-effort routing from a possibly broken payload. Returns (routing, the topic the client
    wanted if it was refused, why)."""
    fields = obj if isinstance(obj, dict) else {}
    fmt: Literal["text", "json"] = "json" if fields.get("format") == "json" else "text"
    rid = fields.get("requestId")
    request_id = str(rid) if isinstance(rid, str | int) and not isinstance(rid, bool) else None
    if request_id is not None and request_id_problem(request_id) is not None:
        request_id = None  # never echoed, never in a property or a log line
    sid = fields.get("sessionId")
    session_id = sid if isinstance(sid, str) and session_id_problem(sid) is None else None
    default = default_reply_topic(project, session_id) if session_id is not None else None
    wanted = response_topic
    if wanted is None and isinstance(fields.get("replyTopic"), str):
        wanted = fields["replyTopic"]
    if wanted is None:
        return Routing(default, fmt, request_id, session_id), None, None
    problem = reply_topic_problem(project, wanted)
    if problem is None:
        return Routing(wanted, fmt, request_id, session_id), None, None
    return Routing(default, fmt, request_id, session_id), wanted, problem


def parse_request(
    project: str,
    payload: bytes,
    *,
    response_topic: str | None = None,
    max_payload_bytes: int = 65536,
    max_message_chars: int = 32000,
) -> Accepted | Rejection:
    """Validate one message from ``{project}/user_input``."""
    too_large = len(payload) > max_payload_bytes
    utf8_ok = True
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        utf8_ok = False
        text = payload.decode("utf-8", errors="replace")
    obj: Any = None
    json_ok = False
    if len(payload) <= 16 * max_payload_bytes:  # parse for routing only within reason
        try:
            obj = json.loads(text)
            json_ok = True
        except (ValueError, RecursionError):
            pass
    routing, refused_topic, topic_problem = _routing_hints(project, obj, response_topic)

    def reject(code: ErrorCode, message: str) -> Rejection:
        return Rejection(code, message, routing)

    if too_large:
        return reject(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the request is {len(payload)} bytes; the limit is {max_payload_bytes}",
        )
    if not utf8_ok:
        return reject(ErrorCode.INVALID_UTF8, "the request is not valid UTF-8")
    if not json_ok:
        return reject(ErrorCode.INVALID_JSON, "the request is not valid JSON")
    if not isinstance(obj, dict):
        return reject(ErrorCode.NOT_AN_OBJECT, "the request must be a JSON object")
    if topic_problem is not None:
        return reject(
            ErrorCode.INVALID_REPLY_TOPIC,
            f"refused reply topic {names.printable(refused_topic)}: {topic_problem}",
        )
    sid = obj.get("sessionId")
    if isinstance(sid, str):
        problem = session_id_problem(sid)
        if problem is not None:
            return reject(ErrorCode.INVALID_SESSION_ID, problem)
    try:
        request = ChatRequest.model_validate(obj)
    except ValidationError as err:
        return reject(*_describe_validation(err))
    field_problem = _field_problems(request, max_message_chars)
    if field_problem is not None:
        return reject(*field_problem)
    if not request.message.strip() and not request.probe:
        return reject(ErrorCode.INVALID_REQUEST, "message is empty")
    return Accepted(request, routing)


def _field_problems(request: ChatRequest, max_message_chars: int) -> tuple[ErrorCode, str] | None:
    """The client-string rule on every field that reaches a topic, a property, a log or the engine."""
    if request.requestId is not None:
        problem = request_id_problem(str(request.requestId))
        if problem is not None:
            return ErrorCode.INVALID_REQUEST, problem
    if request.clientId is not None:
        problem = names.client_string_problem(
            request.clientId, "clientId", max_length=MAX_ID_LENGTH
        )
        if problem is not None:
            return ErrorCode.INVALID_REQUEST, problem
    for field_name, value in (("message", request.message), ("systemPrompt", request.systemPrompt)):
        if value is None:
            continue
        if len(value) > max_message_chars:
            return (
                ErrorCode.MESSAGE_TOO_LONG,
                f"{field_name} is {len(value)} characters; the limit is {max_message_chars}",
            )
        problem = names.client_string_problem(
            value, field_name, max_length=max_message_chars, text=True
        )
        if problem is not None:
            return ErrorCode.INVALID_REQUEST, problem
    return None


def _describe_validation(err: ValidationError) -> tuple[ErrorCode, str]:
    range_types = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
    parts = []
    code = ErrorCode.INVALID_REQUEST
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"][:1]) or "request"
        if e["type"] == "missing":
            parts.append(f"{loc} is required")
        elif e["type"] in range_types:
            code = ErrorCode.OUT_OF_RANGE if code == ErrorCode.INVALID_REQUEST else code
            parts.append(f"{loc}: {e['msg'].lower()}")
        else:
            parts.append(f"{loc} has the wrong type or value ({e['msg'].lower()})")
    # A type error outranks a range error: report the first problem's kind.
    first = err.errors()[0]["type"]
    if first not in range_types:
        code = ErrorCode.INVALID_REQUEST
    return code, "; ".join(dict.fromkeys(parts))


def envelope(
    routing: Routing,
    *,
    text: str | None = None,
    error: tuple[str, str] | None = None,
    usage: dict[str, int] | None = None,
    model: str | None = None,
) -> bytes:
    """The JSON reply envelope. Never raises: the routing fields passed the client-string rule, and
    anything else that cannot be UTF-8 is escaped."""
    body: dict[str, Any] = {
        "requestId": routing.request_id,
        "sessionId": routing.session_id,
        "status": "error" if error else "ok",
        "text": None if error else (text or ""),
        "error": (
            {"code": error[0], "message": error[1], "retryable": error[0] in RETRYABLE}
            if error
            else None
        ),
        "usage": usage,
    }
    if model is not None:
        body["model"] = model
    return _json_bytes(body)


def ok_payload(
    routing: Routing, text: str, usage: dict[str, int] | None, model: str | None = None
) -> bytes:
    """A successful reply: plain text for legacy clients, the envelope for ``format: json``."""
    if routing.format == "json":
        return envelope(routing, text=text, usage=usage, model=model)
    return text.encode("utf-8")


def error_payload(routing: Routing, code: str, message: str) -> bytes:
    return envelope(routing, error=(code, message))


def stream_payload(routing: Routing, seq: int, delta: str) -> bytes:
    if routing.format == "json":
        return _json_bytes(
            {
                "requestId": routing.request_id,
                "sessionId": routing.session_id,
                "seq": seq,
                "delta": delta,
            }
        )
    return delta.encode("utf-8")


def _json_bytes(body: dict[str, Any]) -> bytes:
    """Every JSON reply's bytes: compact UTF-8 by orjson (a stream part is built once per part
    of every streamed answer, the hot path). What orjson refuses (a string that is not UTF-8: a
    lone surrogate) the stdlib writes with \\u escapes, always encodable."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        return json.dumps(body, separators=(",", ":")).encode("ascii")

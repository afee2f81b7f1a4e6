"""Names and client strings: the one rule for each, used by render, up, the broker files, the secrets
folder and the bridge. Pure; no I/O.

- **Project names** (``check_project_name``): a project is one MQTT topic level, an MQTT account (its
  username), a file name in the secrets folder and a line of Mosquitto's password file, so it is
  ASCII letters, digits, ``_``, ``-``, ``.``; it starts with a letter or digit; at most 64 characters.
  Names starting with ``deploykit`` (any case) are reserved: ``deploykit/...`` is the kit's own topic
  namespace (the bridges' retained status) and ``deploykit-...`` its own accounts.
- **Client strings** (``client_string_problem``): anything a client sends that ends up in a topic, an
  MQTT 5 user property, a log line, a file or an engine call. Mosquitto refuses a packet whose UTF-8
  strings hold U+0000, C0/C1 control characters, UTF-16 surrogates or Unicode non-characters
  (``mosquitto_validate_utf8`` in lib/utf8_mosq.c, 2.0) and drops the sender's connection; Python
  turns a JSON ``"\\ud800"`` escape into a lone surrogate that cannot even be encoded. One check
  refuses all of them, so such a string never reaches the broker, a log or the engine. Text (a chat
  message, a system prompt) may also hold tab, line feed and carriage return.
- **Topics**: the templates every part of the kit uses.
"""

from __future__ import annotations

import re

from deploykit.errors import UsageError

# --------------------------------------------------------------------------------- project names
PROJECT_NAME_MAX = 64
_PROJECT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESERVED_PREFIX = "deploykit"
PROJECT_NAME_RULE = (
    "a project name is 1-64 ASCII letters, digits, '_', '-' or '.', starting with a letter or "
    f"digit, and not starting with {RESERVED_PREFIX!r} (reserved for the kit's own topics and "
    "accounts)"
)


def project_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a project name (None when it can)."""
    if not isinstance(name, str) or not name:
        return "the project name is empty"
    if len(name) > PROJECT_NAME_MAX:
        return f"project name {name[:PROJECT_NAME_MAX]!r}... is longer than {PROJECT_NAME_MAX}"
    if not _PROJECT_NAME_RE.fullmatch(name):
        return f"project name {name!r} has a character outside [A-Za-z0-9_.-] or starts with one"
    if name.lower().startswith(RESERVED_PREFIX):
        return f"project name {name!r} is reserved: names starting with {RESERVED_PREFIX!r} are the kit's own"
    return None


def check_project_name(name: str) -> str:
    """Return ``name`` or raise ``UsageError`` saying what is wrong and what is allowed."""
    problem = project_name_problem(name)
    if problem is not None:
        raise UsageError(problem, PROJECT_NAME_RULE)
    return name


def check_project_names(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Every name valid, at least one, none twice."""
    if not names:
        raise UsageError("no project given", "pass at least one project, e.g. --projects general")
    for name in names:
        check_project_name(name)
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        raise UsageError(f"project names repeat: {', '.join(repeated)}", "name each project once")
    return tuple(names)


# --------------------------------------------------------------------------------- client strings
def _forbidden_class(*, allow_newlines: bool) -> re.Pattern[str]:
    ranges = [
        "\x00-\x08" if allow_newlines else "\x00-\x1f",
        *(["\x0b\x0c\x0e-\x1f"] if allow_newlines else []),
        "\x7f-\x9f",  # DEL and the C1 controls (U+0085 among them)
        "\ud800-\udfff",  # surrogates: never valid UTF-8
        "\ufdd0-\ufdef",  # non-characters
        "\ufffe\uffff",
    ]
    # the last two code points of every supplementary plane are non-characters too
    ranges += [chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(1, 17)]
    return re.compile("[" + "".join(ranges) + "]")


_FORBIDDEN_ID = _forbidden_class(allow_newlines=False)
_FORBIDDEN_TEXT = _forbidden_class(allow_newlines=True)


def client_string_problem(
    value: str, what: str, *, max_length: int, text: bool = False
) -> str | None:
    """Why a string from a client cannot be used (None when it can). ``text`` also allows tab, line
    feed and carriage return (message text); identifiers, topics and properties allow none."""
    if len(value) > max_length:
        return f"{what} is longer than {max_length} characters"
    bad = (_FORBIDDEN_TEXT if text else _FORBIDDEN_ID).search(value)
    if bad is not None:
        ch = bad.group()
        kind = (
            "a UTF-16 surrogate (not valid UTF-8)"
            if "\ud800" <= ch <= "\udfff"
            else "a character MQTT forbids"
        )
        return f"{what} contains {kind}: U+{ord(ch):04X} at position {bad.start()}"
    return None


def printable(value: object, limit: int = 80) -> str:
    """A value from a client made safe for a log line: escaped, quoted and cut to ``limit``."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------- topics
REQUEST_TOPIC = "{project}/user_input"
DEFAULT_REPLY_TOPIC = "{project}/assistant_response/{session_id}"
STREAM_SUFFIX = "/stream"
STATUS_TOPIC = "deploykit/bridge/{name}/status"
#: MQTT allows 65535 bytes; the kit keeps topics short enough for logs and for every broker.
MAX_TOPIC_LENGTH = 256


def request_topic(project: str) -> str:
    return REQUEST_TOPIC.format(project=project)


def default_reply_topic(project: str, session_id: str) -> str:
    return DEFAULT_REPLY_TOPIC.format(project=project, session_id=session_id)


def status_topic(name: str) -> str:
    return STATUS_TOPIC.format(name=name)

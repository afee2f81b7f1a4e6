"""The one project-name rule and the one client-string rule (deploykit/names.py)."""

from __future__ import annotations

import pytest

from deploykit import names
from deploykit.errors import UsageError


@pytest.mark.parametrize("name", ["general", "maze", "Team_A", "a", "x.y-z", "0robot", "a" * 64])
def test_project_names_accepted(name: str) -> None:
    assert names.check_project_name(name) == name


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "empty"),
        ("team:a", "character outside"),  # breaks Mosquitto's user:password file
        ("a/b", "character outside"),
        ("+", "character outside"),
        ("#", "character outside"),
        ("$SYS", "character outside"),
        ("has space", "character outside"),
        ("-lead", "character outside"),
        (".hidden", "character outside"),
        ("ü", "character outside"),
        ("a" * 65, "longer than 64"),
        ("deploykit", "reserved"),
        ("DeployKit", "reserved"),
        ("deploykit-bridge", "reserved"),
        ("deploykit_x", "reserved"),
    ],
)
def test_project_names_refused_with_the_rule(name: str, why: str) -> None:
    with pytest.raises(UsageError) as err:
        names.check_project_name(name)
    assert why in err.value.message
    assert err.value.hint == names.PROJECT_NAME_RULE


def test_project_name_lists() -> None:
    assert names.check_project_names(["general", "maze"]) == ("general", "maze")
    with pytest.raises(UsageError, match="no project"):
        names.check_project_names([])
    with pytest.raises(UsageError, match="repeat: maze"):
        names.check_project_names(["maze", "general", "maze"])


# Characters Mosquitto 2 refuses in a UTF-8 string (see the topic test against the real broker in
# tests/bridge/test_hostile.py), and their classes.
REFUSED = {
    "NUL": "\x00",
    "C0 tab": "\t",
    "C0 newline": "\n",
    "C0 escape": "\x1b",
    "DEL": "\x7f",
    "C1 NEL": "\x85",
    "C1 last": "\x9f",
    "lone high surrogate": "\ud800",
    "lone low surrogate": "\udfff",
    "non-character FDD0": "\ufdd0",
    "non-character FFFE": "\ufffe",
    "non-character FFFF": "\uffff",
    "non-character 1FFFE": "\U0001fffe",
    "non-character 10FFFF": "\U0010ffff",
}
ALLOWED = {
    "ascii": "player-7",
    "latin": "spieler-ü",
    "cjk": "玩家",
    "emoji": "🙂",
    "U+00A0": "a\xa0b",
    "U+FFFD": "\ufffd",
    "U+FDEF+1": "\ufdf0",
    "supplementary": "\U00010000",
}


@pytest.mark.parametrize("label", sorted(REFUSED))
def test_identifier_refuses(label: str) -> None:
    problem = names.client_string_problem(f"a{REFUSED[label]}b", "sessionId", max_length=128)
    assert problem is not None and problem.startswith("sessionId contains")
    assert f"U+{ord(REFUSED[label]):04X} at position 1" in problem


@pytest.mark.parametrize("label", sorted(ALLOWED))
def test_identifier_allows(label: str) -> None:
    assert names.client_string_problem(ALLOWED[label], "sessionId", max_length=128) is None


def test_text_allows_line_breaks_but_nothing_else_of_the_rule() -> None:
    assert (
        names.client_string_problem("line 1\nline 2\r\n\tend", "message", max_length=99, text=True)
        is None
    )
    for label, ch in REFUSED.items():
        if ch in "\t\n":
            continue
        assert names.client_string_problem(f"x{ch}", "message", max_length=99, text=True), label


def test_length() -> None:
    assert names.client_string_problem("a" * 128, "requestId", max_length=128) is None
    assert names.client_string_problem("a" * 129, "requestId", max_length=128) == (
        "requestId is longer than 128 characters"
    )


def test_surrogate_is_named_as_not_utf8() -> None:
    problem = names.client_string_problem("\ud800", "requestId", max_length=9)
    assert problem is not None and "surrogate" in problem


def test_printable_escapes_and_cuts() -> None:
    assert names.printable("a\x85\ud800\n") == "'a\\x85\\ud800\\n'"
    assert len(names.printable("x" * 500)) == 80


def test_topics() -> None:
    assert names.request_topic("maze") == "maze/user_input"
    assert names.default_reply_topic("maze", "s1") == "maze/assistant_response/s1"
    assert names.status_topic("bridge-1") == "deploykit/bridge/bridge-1/status"

"""The bridge against real parts: Mosquitto, the vLLM CPU server with a tiny model, the bridge as a
process, asserted through real MQTT clients."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from deploykit.mqttclient import Credentials, parse_broker_url, read_credentials, request

from .conftest import (
    MAX_MODEL_LEN,
    BridgeProcess,
    Broker,
    Client,
    Engine,
    free_port,
    new_session,
    wait_until,
)

pytestmark = pytest.mark.integration


def reply_topic(project: str, session: str) -> str:
    return f"{project}/assistant_response/{session}"


def ask(client: Client, project: str, fields: dict[str, Any], timeout: float = 60) -> Any:
    """Send a JSON-format request and return the parsed envelope from the default reply topic."""
    body = {"format": "json", "requestId": uuid.uuid4().hex, **fields}
    client.publish(f"{project}/user_input", body)
    rec = client.get(timeout, topic=reply_topic(project, body["sessionId"]))
    return rec.json()


# ------------------------------------------------------------------------------ protocol
def test_legacy_round_trip_plain_text(client: Client) -> None:
    session = new_session()
    client.publish("general/user_input", {"sessionId": session, "message": "hello there"})
    rec = client.get(60, topic=reply_topic("general", session))
    assert rec.user_properties.get("status") == "ok"
    assert rec.content_type and rec.content_type.startswith("text/plain")
    with pytest.raises(ValueError):  # plain text, not an envelope
        json.loads(rec.payload)


def test_json_envelope(client: Client) -> None:
    session = new_session()
    env = ask(client, "general", {"sessionId": session, "message": "hi", "requestId": "rq-1"})
    assert env["status"] == "ok"
    assert env["requestId"] == "rq-1"
    assert env["sessionId"] == session
    assert env["error"] is None
    assert isinstance(env["text"], str)
    assert env["usage"]["prompt_tokens"] > 0
    assert 1 <= env["usage"]["completion_tokens"] <= 16


def test_payload_reply_topic(client: Client) -> None:
    session = new_session()
    topic = f"general/custom/{session}"
    client.publish(
        "general/user_input", {"sessionId": session, "message": "hi", "replyTopic": topic}
    )
    assert client.get(60, topic=topic).user_properties["status"] == "ok"


def test_mqtt5_response_topic_and_correlation(client: Client) -> None:
    session = new_session()
    topic = f"general/rpc/{session}"
    client.publish(
        "general/user_input",
        {
            "sessionId": session,
            "message": "hi",
            "format": "json",
            "replyTopic": f"general/ignored/{session}",
        },
        response_topic=topic,
        correlation=b"\x00corr-42\xff",
    )
    rec = client.get(60, topic=topic)
    assert rec.correlation == b"\x00corr-42\xff"
    assert rec.json()["status"] == "ok"
    assert not any(r.topic == f"general/ignored/{session}" for r in client.all)


def test_streaming_partials_then_final(client: Client) -> None:
    session = new_session()
    topic = reply_topic("general", session)
    client.publish(
        "general/user_input",
        {
            "sessionId": session,
            "message": "tell",
            "format": "json",
            "stream": True,
            "maxTokens": 24,
            "temperature": 0,
        },
    )
    final = client.get(60, topic=topic).json()
    time.sleep(0.3)
    parts = [r.json() for r in client.all if r.topic == topic + "/stream"]
    assert final["status"] == "ok"
    assert parts, "no partial text was streamed"
    assert [p["seq"] for p in parts] == list(range(len(parts)))
    assert "".join(p["delta"] for p in parts) == final["text"]


def engine_connections(bridge: BridgeProcess) -> int:
    found = re.search(r"^deploykit_bridge_engine_connections_total (\d+)", bridge.metrics(), re.M)
    assert found, "the bridge has no engine connections metric"
    return int(found.group(1))


def test_streamed_answers_keep_their_engine_connection(
    client: Client, bridge: BridgeProcess
) -> None:
    """The bridge counts the connections it opens to the engine
    (deploykit_bridge_engine_connections_total): one session's streamed requests, one after
    another through the real vLLM server, use the kept-alive connection. At most one may open:
    the kept-alive one closes after 4 s idle (engine_keepalive_s). How a body that ends after
    ``[DONE]`` is read so its connection stays: tests/bridge/test_engine_client.py."""
    before = engine_connections(bridge)
    session = new_session()
    topic = reply_topic("general", session)
    for n in range(6):
        client.publish(
            "general/user_input",
            {"sessionId": session, "message": f"tell {n}", "format": "json", "stream": True,
             "maxTokens": 8, "temperature": 0, "requestId": f"keep-{n}"},
        )  # fmt: skip
        assert client.get(60, topic=topic).json()["status"] == "ok"
    assert engine_connections(bridge) - before <= 1


def test_shared_helper_request(bridge: BridgeProcess) -> None:
    reply = request(
        parse_broker_url(bridge.broker.url),
        "general",
        "ping",
        timeout_s=60,
        fields={"maxTokens": 4},
    )
    assert reply.json()["status"] == "ok"
    probe = request(
        parse_broker_url(bridge.broker.url), "general", "", timeout_s=60, fields={"probe": True}
    )
    assert probe.json()["status"] == "ok" and probe.json()["model"] == "tiny"


# ------------------------------------------------------------------------------ sessions
def test_in_order_within_a_session(client: Client) -> None:
    session = new_session()
    ids = [f"ord-{i}" for i in range(6)]
    for rid in ids:
        client.publish(
            "general/user_input",
            {
                "sessionId": session,
                "message": f"message {rid}",
                "requestId": rid,
                "format": "json",
                "maxTokens": 8,
            },
            wait=False,
        )
    got = client.collect(6, 90, topic_prefix=reply_topic("general", session))
    envs = [r.json() for r in got]
    assert [e["requestId"] for e in envs] == ids
    # each request saw the history of the ones before it
    prompts = [e["usage"]["prompt_tokens"] for e in envs]
    assert prompts == sorted(prompts) and prompts[0] < prompts[-1]


def test_32_concurrent_sessions(
    broker_factory: Callable[..., Broker],
    bridge_factory: Callable[..., BridgeProcess],
    client_factory: Callable[..., Client],
) -> None:
    """32 sessions at once: all answered correctly, and they run side by side in the engine. A
    bridge of its own, so its high-water mark of engine slots held at once
    (``deploykit_bridge_active_peak``) counts this test's requests only; sampling the
    ``deploykit_bridge_active`` gauge missed short peaks (7 seen of at least 8 once)."""
    b = broker_factory()
    bridge = bridge_factory(b, "par", "test-bridge-par")
    bridge.start()
    client = client_factory(b)
    client.subscribe("par/assistant_response/#")
    assert _metric(bridge.metrics(), "deploykit_bridge_active_peak") == 0
    sessions = [new_session() for _ in range(32)]
    for s in sessions:
        client.publish(
            "par/user_input",
            {"sessionId": s, "message": "hello", "format": "json", "requestId": s, "maxTokens": 64},
            wait=False,
        )
    got = client.collect(32, 120, topic_prefix="par/assistant_response/")
    by_topic = {r.topic: r.json() for r in got}
    for s in sessions:
        env = by_topic[reply_topic("par", s)]
        assert env["status"] == "ok" and env["sessionId"] == s and env["requestId"] == s
    peak = _metric(bridge.metrics(), "deploykit_bridge_active_peak")
    assert peak >= 8, f"at most {peak:.0f} requests ran at once"


def test_temperature_zero_is_greedy(client: Client) -> None:
    texts = [
        ask(
            client,
            "general",
            {
                "sessionId": new_session(),
                "message": "same prompt",
                "temperature": 0,
                "maxTokens": 24,
            },
        )["text"]
        for _ in range(3)
    ]
    assert texts[0] and texts[0] == texts[1] == texts[2]


def test_history_trimmed_by_tokens(client: Client) -> None:
    """maze: max_history_tokens 60. The prompt grows, then stays bounded."""
    session = new_session()
    prompts = []
    for i in range(14):
        env = ask(
            client,
            "maze",
            {
                "sessionId": session,
                "message": f"go north {i} please",
                "maxTokens": 8,
                "temperature": 0,
            },
        )
        assert env["status"] == "ok"
        prompts.append(env["usage"]["prompt_tokens"])
    # prompts[0] has no history: system prompt + template + the message. The history on top of
    # it never exceeds 60 tokens (+ 3 for the message length varying with i), although the
    # conversation is far longer (14 exchanges of ~20 tokens), and it is used.
    history = [p - prompts[0] for p in prompts]
    assert max(history) <= 60 + 3, prompts
    assert max(history) >= 30, prompts


def test_context_budget_and_too_long_message(client: Client) -> None:
    """tight: history unlimited by config, so max_model_len - maxTokens binds."""
    session = new_session()
    max_tokens = MAX_MODEL_LEN - 60
    prompts = []
    for i in range(8):
        env = ask(
            client,
            "tight",
            {
                "sessionId": session,
                "message": f"turn {i} " * 4,
                "maxTokens": max_tokens,
                "temperature": 0,
            },
        )
        assert env["status"] == "ok", env  # a fresh message alone is far below 60 tokens
        prompts.append(env["usage"]["prompt_tokens"])
    assert max(prompts) <= 60, prompts  # never past max_model_len - maxTokens
    assert max(prompts) > prompts[0] + 10, prompts  # the history was used up to the budget
    no_room = ask(client, "tight", {"sessionId": session, "message": "m", "maxTokens": 1024})
    assert no_room["error"]["code"] == "out_of_range", no_room
    long = ask(
        client, "tight", {"sessionId": session, "message": "word " * 200, "maxTokens": max_tokens}
    )
    assert long["status"] == "error"
    assert long["error"]["code"] == "message_too_long"
    # the error did not enter the history: the next request still works, same prompt range
    env = ask(client, "tight", {"sessionId": session, "message": "ok?", "maxTokens": max_tokens})
    assert env["status"] == "ok"


def test_errors_never_enter_history(client: Client) -> None:
    session = new_session()
    first = ask(
        client, "general", {"sessionId": session, "message": "a", "temperature": 0, "maxTokens": 4}
    )
    bad = ask(client, "general", {"sessionId": session, "message": "b", "topP": 7})
    assert bad["status"] == "error"
    second = ask(
        client, "general", {"sessionId": session, "message": "a", "temperature": 0, "maxTokens": 4}
    )
    # history = exactly one exchange: prompt grew by that exchange only
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]
    third_session = new_session()
    third = ask(
        client,
        "general",
        {"sessionId": third_session, "message": "a", "temperature": 0, "maxTokens": 4},
    )
    assert third["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]


def test_duplicate_request_id_answered_once(client: Client, bridge: BridgeProcess) -> None:
    session = new_session()
    body = {
        "sessionId": session,
        "message": "dup",
        "format": "json",
        "requestId": "dup-1",
        "maxTokens": 12,
    }
    before = _metric(bridge.metrics(), 'deploykit_bridge_tokens_total{kind="completion"}')
    client.publish("general/user_input", body)
    client.publish("general/user_input", body)  # while the first may still run
    got = client.collect(2, 60, topic_prefix=reply_topic("general", session))
    client.publish("general/user_input", body)  # after it finished
    got += client.collect(1, 60, topic_prefix=reply_topic("general", session))
    assert len({r.payload for r in got}) == 1
    after = _metric(bridge.metrics(), 'deploykit_bridge_tokens_total{kind="completion"}')
    assert after - before == got[0].json()["usage"]["completion_tokens"]  # generated once
    assert _metric(bridge.metrics(), "deploykit_bridge_duplicates_total") >= 2
    # the history holds the exchange once
    env = ask(client, "general", {"sessionId": session, "message": "x", "maxTokens": 2})
    assert env["status"] == "ok"


# ------------------------------------------------------------------------------ bad input
BAD_DEFAULT_TOPIC: list[tuple[str, dict[str, Any], str]] = [
    ("missing message", {}, "invalid_request"),
    ("message not a string", {"message": 42}, "invalid_request"),
    ("temperature wrong type", {"message": "m", "temperature": "hot"}, "invalid_request"),
    ("temperature too high", {"message": "m", "temperature": 5}, "out_of_range"),
    ("negative temperature", {"message": "m", "temperature": -0.1}, "out_of_range"),
    ("topP zero", {"message": "m", "topP": 0}, "out_of_range"),
    ("maxTokens zero", {"message": "m", "maxTokens": 0}, "out_of_range"),
    ("maxTokens over the project limit", {"message": "m", "maxTokens": 5000}, "out_of_range"),
    ("maxTokens not an int", {"message": "m", "maxTokens": 1.5}, "invalid_request"),
    ("stream not a bool", {"message": "m", "stream": "yes"}, "invalid_request"),
    (
        "reply topic of another project",
        {"message": "m", "replyTopic": "maze/x"},
        "invalid_reply_topic",
    ),
    (
        "reply topic with wildcard",
        {"message": "m", "replyTopic": "general/+/x"},
        "invalid_reply_topic",
    ),
    ("reply topic with $", {"message": "m", "replyTopic": "general/$SYS"}, "invalid_reply_topic"),
    (
        "reply topic with empty level",
        {"message": "m", "replyTopic": "general//x"},
        "invalid_reply_topic",
    ),
    (
        "reply topic too long",
        {"message": "m", "replyTopic": "general/" + "x" * 400},
        "invalid_reply_topic",
    ),
    (
        "reply topic is the request topic",
        {"message": "m", "replyTopic": "general/user_input"},
        "invalid_reply_topic",
    ),
]


@pytest.mark.parametrize(
    ("case", "fields", "code"), BAD_DEFAULT_TOPIC, ids=[c[0] for c in BAD_DEFAULT_TOPIC]
)
def test_bad_input_gets_error_on_default_topic(
    client: Client, case: str, fields: dict[str, Any], code: str
) -> None:
    session = new_session()
    body = {"sessionId": session, "format": "json", "requestId": "bad", **fields}
    client.publish("general/user_input", body)
    rec = client.get(30, topic=reply_topic("general", session))
    env = rec.json()
    assert env["status"] == "error", case
    assert env["error"]["code"] == code, env
    assert env["text"] is None and env["error"]["message"]
    assert rec.user_properties["errorCode"] == code


def test_error_is_an_envelope_even_for_legacy_clients(client: Client) -> None:
    session = new_session()
    client.publish("general/user_input", {"sessionId": session, "message": "m", "topP": 2})
    env = client.get(30, topic=reply_topic("general", session)).json()
    assert env["status"] == "error" and env["error"]["code"] == "out_of_range"


BAD_RAW: list[tuple[str, bytes, str]] = [
    ("not json", b"hello bridge", "invalid_json"),
    ("json array", b'[{"sessionId": "a", "message": "m"}]', "not_an_object"),
    ("json string", b'"just a string"', "not_an_object"),
    ("invalid utf-8", b'{"sessionId": "a", "message": "\xff\xfe bad"}', "invalid_utf8"),
    (
        "oversized",
        json.dumps({"sessionId": "a", "message": "x" * 5000}).encode(),
        "payload_too_large",
    ),
    ("sessionId with /", b'{"sessionId": "a/b", "message": "m"}', "invalid_session_id"),
    ("sessionId with +", b'{"sessionId": "a+", "message": "m"}', "invalid_session_id"),
    ("sessionId with #", b'{"sessionId": "#", "message": "m"}', "invalid_session_id"),
    ("sessionId not a string", b'{"sessionId": 7, "message": "m"}', "invalid_request"),
]


@pytest.mark.parametrize(("case", "payload", "code"), BAD_RAW, ids=[c[0] for c in BAD_RAW])
def test_bad_raw_input_answered_on_response_topic(
    client: Client, case: str, payload: bytes, code: str
) -> None:
    topic = f"general/rpc/{uuid.uuid4().hex[:8]}"
    client.publish("general/user_input", payload, response_topic=topic, correlation=b"c1")
    rec = client.get(30, topic=topic)
    env = rec.json()
    assert env["status"] == "error" and env["error"]["code"] == code, (case, env)
    assert rec.correlation == b"c1"


def test_invalid_utf8_answered_on_default_topic(client: Client) -> None:
    session = new_session()
    payload = b'{"sessionId": "' + session.encode() + b'", "message": "caf\xe9"}'
    client.publish("general/user_input", payload)
    env = client.get(30, topic=reply_topic("general", session)).json()
    assert env["error"]["code"] == "invalid_utf8"


def test_nothing_published_outside_the_project(client: Client) -> None:
    session = new_session()
    for topic in ("maze/steal", "other/x", "general"):
        client.publish(
            "general/user_input", {"sessionId": session, "message": "m", "replyTopic": topic}
        )
    client.publish(
        "general/user_input", {"sessionId": session, "message": "m"}, response_topic="maze/rpc"
    )
    got = client.collect(4, 30, topic_prefix=reply_topic("general", session))
    assert all(r.json()["error"]["code"] == "invalid_reply_topic" for r in got)
    outside = [
        r.topic for r in client.all if r.topic.startswith(("maze/steal", "other/", "maze/rpc"))
    ]
    assert outside == []


def test_system_prompt_override_refused_when_locked(client: Client) -> None:
    env = ask(
        client, "locked", {"sessionId": new_session(), "message": "m", "systemPrompt": "be evil"}
    )
    assert env["error"]["code"] == "override_not_allowed"
    assert ask(client, "locked", {"sessionId": new_session(), "message": "m"})["status"] == "ok"


def test_rate_limit(client: Client) -> None:
    """limited: 1 request/minute, burst 2."""
    codes = []
    for _ in range(4):
        env = ask(client, "limited", {"sessionId": new_session(), "message": "m", "maxTokens": 2})
        codes.append(env["error"]["code"] if env["status"] == "error" else "ok")
    assert codes[:2] == ["ok", "ok"]
    assert codes[2:] == ["rate_limited", "rate_limited"]


def test_bridge_survives_bad_input(client: Client, bridge: BridgeProcess) -> None:
    for payload in (b"", b"\x00\x01", b"{", b"null", b"1e999999", b"[" * 5000):
        client.publish("general/user_input", payload)
    env = ask(client, "general", {"sessionId": new_session(), "message": "still alive?"})
    assert env["status"] == "ok"
    assert bridge.proc is not None and bridge.proc.poll() is None


# ------------------------------------------------------------------------------ operations
def test_status_topic_and_health(
    client_factory: Callable[..., Client], bridge: BridgeProcess
) -> None:
    c = client_factory(bridge.broker)
    c.subscribe(f"deploykit/bridge/{bridge.client_id}/status")
    rec = c.get(10)
    assert rec.retain and rec.payload == b"online"
    status, body = bridge.health()
    assert status == 200 and json.loads(body)["mqtt_connected"] is True
    text = bridge.metrics()
    for name in (
        "deploykit_bridge_requests_total",
        "deploykit_bridge_errors_total",
        "deploykit_bridge_request_seconds_bucket",
        "deploykit_bridge_in_flight",
    ):
        assert name in text


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or (
            name.endswith("}") is False and line.startswith(name + "{")
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _envelopes(got: list[Any]) -> dict[str, Any]:
    out = {}
    for r in got:
        env = r.json()
        out.setdefault(env["requestId"], env)
    return out


def _send_batch(c: Client, project: str, ids: list[str], sessions: int) -> None:
    for i, rid in enumerate(ids):
        c.publish(
            f"{project}/user_input",
            {
                "sessionId": f"sess-{i % sessions}",
                "message": f"request {rid}",
                "requestId": rid,
                "format": "json",
                "maxTokens": 64,
            },
            wait=False,
        )


def _answered(c: Client) -> set[str]:
    with c._lock:
        return {
            json.loads(r.payload)["requestId"] for r in c.all if "/assistant_response/" in r.topic
        }


def _wait_all(c: Client, ids: list[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline and not set(ids) <= seen.keys():
        try:
            rec = c.get(max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        if "/assistant_response/" in rec.topic:
            env = rec.json()
            seen.setdefault(env["requestId"], env)
    missing = sorted(set(ids) - seen.keys())
    assert not missing, f"{len(missing)} requests lost: {missing[:10]}"
    return seen


def test_bridge_killed_and_restarted_loses_nothing(
    broker_factory: Callable[[], Any],
    bridge_factory: Callable[..., BridgeProcess],
    client_factory: Callable[..., Client],
) -> None:
    b = broker_factory()
    bridge = bridge_factory(b, "crash", "test-bridge-crash")
    bridge.start()
    c = client_factory(b, persistent=True)
    c.subscribe("crash/assistant_response/#")
    watcher = client_factory(b)
    watcher.subscribe("deploykit/bridge/test-bridge-crash/status")
    assert watcher.get(10).payload == b"online"
    ids = [f"k{i}" for i in range(70)]
    _send_batch(c, "crash", ids[:60], sessions=6)  # 10 deep per session: takes a while
    # kill it mid-run, once some replies came back
    wait_until(lambda: len(_answered(c)) >= 3, 60, "the first replies")
    bridge.kill()
    time.sleep(0.5)
    assert len(_answered(c)) < 60, "the bridge finished before it was killed"
    assert watcher.get(10).payload == b"offline"  # last will
    _send_batch(c, "crash", ids[60:], sessions=6)  # while it is down
    bridge.start()
    seen = _wait_all(c, ids, 180)
    assert all(env["status"] == "ok" for env in seen.values())


def test_broker_restarted_loses_nothing(
    broker_factory: Callable[[], Any],
    bridge_factory: Callable[..., BridgeProcess],
    client_factory: Callable[..., Client],
) -> None:
    b = broker_factory()
    bridge = bridge_factory(b, "brk", "test-bridge-brk")
    bridge.start()
    c = client_factory(b, persistent=True, client_id="test-brk-client")
    c.subscribe("brk/assistant_response/#")
    ids = [f"b{i}" for i in range(70)]
    _send_batch(c, "brk", ids[:60], sessions=6)
    wait_until(lambda: len(_answered(c)) >= 3, 60, "the first replies")
    b.restart()
    assert len(_answered(c)) < 60, "the bridge finished before the broker restarted"
    # paho reconnects both the bridge and the client; the client's session kept its subscription
    ready = threading.Event()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not ready.is_set():
        if bridge.health()[0] == 200 and c.mqtt.is_connected():
            ready.set()
        time.sleep(0.2)
    assert ready.is_set(), "bridge or client did not reconnect"
    _send_batch(c, "brk", ids[60:], sessions=6)
    seen = _wait_all(c, ids, 180)
    assert all(env["status"] == "ok" for env in seen.values())


def test_metrics_count_errors_by_code(bridge: BridgeProcess, client: Client) -> None:
    client.publish("general/user_input", b"nope", response_topic="general/rpc/m")
    client.get(30, topic="general/rpc/m")
    text = bridge.metrics()
    assert re.search(r'deploykit_bridge_errors_total\{code="invalid_json"\} [1-9]', text)


def test_in_flight_bounded(
    broker_factory: Callable[[], Any],
    bridge_factory: Callable[..., BridgeProcess],
    client_factory: Callable[..., Client],
) -> None:
    """max_in_flight 4: at most 4 requests reach the engine at once, the rest wait (unacked, so
    still safe in the broker). The bridge also sends it as its MQTT 5 Receive Maximum; Mosquitto
    2.0.11 overshoots that after PUBACKs, so the bridge's own bound is what this checks."""
    b = broker_factory()
    bridge = bridge_factory(b, "bp", "test-bridge-bp")
    cfg = yaml.safe_load(bridge.config.read_text())
    cfg["bridge"]["max_in_flight"] = 4
    bridge.config.write_text(yaml.safe_dump(cfg))
    bridge.start()
    c = client_factory(b)
    c.subscribe("bp/assistant_response/#")
    ids = [f"bp{i}" for i in range(24)]
    for i, rid in enumerate(ids):  # 24 sessions: without the bound all would run at once
        c.publish(
            "bp/user_input",
            {
                "sessionId": f"s{i}",
                "message": "m",
                "requestId": rid,
                "format": "json",
                "maxTokens": 48,
            },
            wait=False,
        )
    peak = 0.0
    deadline = time.monotonic() + 120
    while len(_answered(c)) < len(ids) and time.monotonic() < deadline:
        peak = max(peak, _metric(bridge.metrics(), "deploykit_bridge_active"))
        time.sleep(0.02)
    assert _answered(c) == set(ids)
    assert 2 <= peak <= 4


def test_logs_leave_out_user_text(client: Client, bridge: BridgeProcess) -> None:
    marker = f"secret-{uuid.uuid4().hex}"
    ask(client, "general", {"sessionId": new_session(), "message": f"my {marker}"})
    client.publish(
        "general/user_input", f"not json {marker}".encode(), response_topic="general/rpc/logs"
    )
    client.get(30, topic="general/rpc/logs")
    time.sleep(0.3)
    assert marker not in bridge.log.read_text()


def test_credentials_from_files(
    broker_factory: Callable[..., Any],
    bridge_factory: Callable[..., BridgeProcess],
    client_factory: Callable[..., Client],
    tmp_path: Any,
) -> None:
    """A broker without anonymous access: the bridge logs in with the username and password read
    from files (never argv), a client with its own account gets answers."""
    b = broker_factory({"deploykit-bridge": "bridge-pw", "auth": "client-pw"})
    bridge = bridge_factory(b, "auth", "test-bridge-auth")
    (tmp_path / "user").write_text("deploykit-bridge\n")
    (tmp_path / "pass").write_text("bridge-pw\n")
    bridge.username_file = tmp_path / "user"
    bridge.password_file = tmp_path / "pass"
    bridge.start()
    assert bridge.proc is not None
    assert "bridge-pw" not in " ".join(bridge.proc.args)  # type: ignore[arg-type]
    creds = read_credentials(tmp_path / "user", None)
    assert creds is not None
    reply = request(
        parse_broker_url(b.url),
        "auth",
        "hello",
        credentials=Credentials("auth", "client-pw"),
        timeout_s=60,
        fields={"maxTokens": 4},
    )
    assert reply.json()["status"] == "ok"


def test_unhealthy_while_engine_unreachable(
    broker: Any, bridge_factory: Callable[..., BridgeProcess]
) -> None:
    bridge = bridge_factory(broker, "noengine", "test-bridge-noengine")
    bridge.engine = Engine(
        f"http://127.0.0.1:{free_port()}",
        bridge.engine.model_dir,
        bridge.engine.proc,
        bridge.engine.log,
    )
    bridge.start(wait=False)
    wait_until(lambda: bridge.health()[0] != 0, 20, "the health endpoint")
    time.sleep(1.0)
    status, body = bridge.health()
    assert status == 503 and json.loads(body)["engine_ok"] is False
    assert bridge.proc is not None and bridge.proc.poll() is None  # waits, does not crash

"""Pure logic of the bridge, without a broker or an engine: protocol validation, reply topics,
token trimming, per-session ordering, expiry, rate limits, de-duplication, config and settings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from deploykit.bridge.config import load_config, settings_from
from deploykit.bridge.limits import DedupeCache, StoredReply, TokenBucket
from deploykit.bridge.metrics import Metrics
from deploykit.bridge.pacing import AUTO_FLOOR, EventPacer, FixedPacer, pacer_for
from deploykit.bridge.protocol import (
    Accepted,
    ErrorCode,
    Rejection,
    Routing,
    error_payload,
    ok_payload,
    parse_request,
    reply_topic_problem,
    session_id_problem,
    stream_payload,
)
from deploykit.bridge.scheduler import FairScheduler
from deploykit.bridge.sessions import PromptTooLong, SessionStore, Turn, trim_history
from deploykit.errors import UsageError
from deploykit.mqttclient import BrokerAddress, parse_broker_url, read_credentials
from deploykit.mqttloop import publish_properties


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def parse(payload: bytes | dict[str, object], **kw: object) -> Accepted | Rejection:
    raw = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    return parse_request("general", raw, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ protocol
def test_legacy_request_accepted_with_default_topic() -> None:
    result = parse({"sessionId": "s1", "message": "hi", "clientId": "game"})
    assert isinstance(result, Accepted)
    assert result.routing.reply_topic == "general/assistant_response/s1"
    assert result.routing.format == "text"
    assert result.request.temperature is None  # missing, not 0


def test_temperature_zero_kept() -> None:
    result = parse({"sessionId": "s1", "message": "hi", "temperature": 0})
    assert isinstance(result, Accepted) and result.request.temperature == 0.0


def test_response_topic_preferred_over_payload() -> None:
    result = parse(
        {"sessionId": "s1", "message": "hi", "replyTopic": "general/a"},
        response_topic="general/b",
    )
    assert isinstance(result, Accepted) and result.routing.reply_topic == "general/b"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"not json", ErrorCode.INVALID_JSON),
        (b"[1]", ErrorCode.NOT_AN_OBJECT),
        (b'{"sessionId": "s", "message": "\xff"}', ErrorCode.INVALID_UTF8),
        ({"sessionId": "s"}, ErrorCode.INVALID_REQUEST),
        ({"sessionId": "s", "message": 1}, ErrorCode.INVALID_REQUEST),
        ({"sessionId": "s", "message": "m", "temperature": True}, ErrorCode.INVALID_REQUEST),
        ({"sessionId": "s", "message": "m", "temperature": 2.5}, ErrorCode.OUT_OF_RANGE),
        ({"sessionId": "s", "message": "m", "topP": 0}, ErrorCode.OUT_OF_RANGE),
        ({"sessionId": "s", "message": "m", "maxTokens": 0}, ErrorCode.OUT_OF_RANGE),
        ({"sessionId": "s", "message": "m", "maxTokens": "5"}, ErrorCode.INVALID_REQUEST),
        ({"sessionId": "a/b", "message": "m"}, ErrorCode.INVALID_SESSION_ID),
        ({"sessionId": "", "message": "m"}, ErrorCode.INVALID_SESSION_ID),
        ({"sessionId": "s", "message": "   "}, ErrorCode.INVALID_REQUEST),
        (
            {"sessionId": "s", "message": "m", "replyTopic": "other/x"},
            ErrorCode.INVALID_REPLY_TOPIC,
        ),
        ({"sessionId": "s", "message": "x" * 5000}, ErrorCode.PAYLOAD_TOO_LARGE),
    ],
)
def test_rejections(payload: bytes | dict[str, object], code: ErrorCode) -> None:
    result = parse(payload, max_payload_bytes=4096)
    assert isinstance(result, Rejection)
    assert result.code == code, result.message


def test_rejection_routing_uses_default_topic_when_reply_topic_refused() -> None:
    result = parse(
        {"sessionId": "s", "message": "m", "replyTopic": "maze/x", "format": "json", "requestId": 7}
    )
    assert isinstance(result, Rejection)
    assert result.routing == Routing("general/assistant_response/s", "json", "7", "s")


def test_rejection_without_any_topic() -> None:
    result = parse(b"garbage")
    assert isinstance(result, Rejection) and result.routing.reply_topic is None


@pytest.mark.parametrize(
    "topic",
    [
        "maze/x",
        "general",
        "general/+",
        "general/#",
        "general/$x",
        "general//x",
        "general/x/",
        "/general/x",
        "general/user_input",
        "general/" + "x" * 300,
        "general/a\x00b",
        "",
    ],
)
def test_reply_topic_refused(topic: str) -> None:
    assert reply_topic_problem("general", topic) is not None


def test_reply_topic_accepted() -> None:
    assert reply_topic_problem("general", "general/assistant_response/s1") is None
    assert reply_topic_problem("general", "general/a/b/c") is None


@pytest.mark.parametrize("sid", ["a/b", "a+b", "a#", "", "x" * 200, "a\nb"])
def test_session_id_refused(sid: str) -> None:
    assert session_id_problem(sid) is not None


def test_payloads() -> None:
    routing = Routing("general/r", "text", "r1", "s1")
    assert ok_payload(routing, "héllo", None) == "héllo".encode()
    env = json.loads(ok_payload(Routing("general/r", "json", "r1", "s1"), "x", {"a": 1}))
    assert env == {
        "requestId": "r1",
        "sessionId": "s1",
        "status": "ok",
        "text": "x",
        "error": None,
        "usage": {"a": 1},
    }
    err = json.loads(error_payload(routing, "rate_limited", "slow down"))
    assert err["status"] == "error" and err["text"] is None
    assert err["error"] == {"code": "rate_limited", "message": "slow down", "retryable": True}
    err = json.loads(error_payload(routing, "invalid_request", "sessionId is required"))
    assert err["error"]["retryable"] is False


def test_stream_payloads() -> None:
    assert stream_payload(Routing("general/r", "text", "r1", "s1"), 3, "héllo") == "héllo".encode()
    part = stream_payload(Routing("general/r", "json", "r1", "s1"), 3, "héllo\n")
    assert json.loads(part) == {"requestId": "r1", "sessionId": "s1", "seq": 3, "delta": "héllo\n"}
    assert "héllo".encode() in part  # UTF-8, not \u escapes


def test_a_lone_surrogate_is_escaped_not_fatal() -> None:
    routing = Routing("general/r", "json", "r1", "s1")
    part = stream_payload(routing, 0, "a\ud800b")
    assert b"\\ud800" in part and json.loads(part)["delta"] == "a\ud800b"
    err = json.loads(error_payload(routing, "engine_error", "bad \udfff"))
    assert err["error"]["message"] == "bad \udfff"


def test_publish_properties_pack_once_and_again_after_a_change() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = publish_properties(correlation=b"id", response_topic="a/b")
    plain = Properties(PacketTypes.PUBLISH)
    plain.CorrelationData = b"id"
    plain.ResponseTopic = "a/b"
    assert props is not None
    assert props.pack() == plain.pack()
    assert props.pack() is props.pack()  # packed once
    props.UserProperty = ("k", "v")
    plain.UserProperty = ("k", "v")
    assert props.pack() == plain.pack()


# ------------------------------------------------------------------------------ trimming
def exchange(n: int, tokens: int = 10) -> list[Turn]:
    out = []
    for i in range(n):
        out += [Turn("user", f"u{i}", tokens), Turn("assistant", f"a{i}", tokens)]
    return out


def test_trim_keeps_newest_whole_exchanges_within_history_limit() -> None:
    history = exchange(5)  # each message 10 + 4 overhead = 14; exchange 28
    result = trim_history(
        history,
        new_tokens=5,
        system_tokens=None,
        base_overhead=3,
        per_message_overhead=4,
        max_history_tokens=60,
        budget=1000,
    )
    assert [t.content for t in result.history] == ["u3", "a3", "u4", "a4"]
    assert result.dropped == 6
    assert result.prompt_tokens == 3 + 5 + 4 + 56


def test_trim_bounded_by_model_budget() -> None:
    history = exchange(5)
    # fixed = 3 + (20+4) + (5+4) = 36; budget 70 leaves 34: one exchange (28)
    result = trim_history(
        history,
        new_tokens=5,
        system_tokens=20,
        base_overhead=3,
        per_message_overhead=4,
        max_history_tokens=10_000,
        budget=70,
    )
    assert [t.content for t in result.history] == ["u4", "a4"]
    assert result.prompt_tokens <= 70


def test_trim_zero_history() -> None:
    result = trim_history(
        exchange(3),
        new_tokens=5,
        system_tokens=None,
        base_overhead=0,
        per_message_overhead=0,
        max_history_tokens=0,
        budget=100,
    )
    assert result.history == []


def test_single_message_too_long() -> None:
    with pytest.raises(PromptTooLong) as err:
        trim_history(
            [],
            new_tokens=500,
            system_tokens=10,
            base_overhead=3,
            per_message_overhead=4,
            max_history_tokens=100,
            budget=400,
        )
    assert err.value.needed == 521 and err.value.budget == 400


# ------------------------------------------------------------------------------ scheduling, expiry
def _recorder(slots: int, caps: dict[str, int] | None = None):  # type: ignore[no-untyped-def]
    """A scheduler and a factory of jobs that log when they start and end."""
    scheduler = FairScheduler(slots, caps)
    log: list[str] = []
    running = {"now": 0, "peak": 0}

    def job(name: str, delay: float = 0.01):  # type: ignore[no-untyped-def]
        async def run(waited: float) -> None:
            assert waited >= 0
            running["now"] += 1
            running["peak"] = max(running["peak"], running["now"])
            log.append(f"start {name}")
            await asyncio.sleep(delay)
            log.append(f"end {name}")
            running["now"] -= 1

        return run

    return scheduler, log, running, job


def test_session_order_and_cross_session_concurrency() -> None:
    async def main() -> tuple[list[str], dict[str, int]]:
        scheduler, log, running, job = _recorder(slots=8)
        # the first job of session a is slow; a's later jobs must still wait for it
        scheduler.submit(("p", "a"), job("a1", 0.05))
        scheduler.submit(("p", "a"), job("a2", 0.0))
        scheduler.submit(("p", "b"), job("b1", 0.01))
        scheduler.submit(("p", "a"), job("a3", 0.0))
        await asyncio.sleep(0.2)
        assert scheduler.active == 0 and not scheduler.busy(("p", "a"))
        # the high-water mark the bridge exports (deploykit_bridge_active_peak) saw both at once
        assert scheduler.peak_active == 2
        return log, running

    log, running = asyncio.run(main())
    ends = [x for x in log if x.startswith("end a")]
    assert ends == ["end a1", "end a2", "end a3"]
    assert log.index("start a2") > log.index("end a1")  # one job of a session at a time
    assert log.index("end b1") < log.index("end a1")  # b did not wait for a
    assert running["peak"] == 2


def test_failing_job_does_not_stop_session() -> None:
    async def main() -> list[str]:
        scheduler = FairScheduler(4)
        log: list[str] = []

        async def boom(_waited: float) -> None:
            raise RuntimeError("x")

        async def ok(_waited: float) -> None:
            log.append("ok")

        scheduler.submit(("p", "a"), boom)
        scheduler.submit(("p", "a"), ok)
        await asyncio.sleep(0.05)
        assert scheduler.free == 4  # the failed job gave its slot back
        return log

    assert asyncio.run(main()) == ["ok"]


def test_a_flooding_project_does_not_starve_another() -> None:
    """Two slots; project flood queues 40 requests of 40 sessions, then maze sends one. The two
    running floods aside, at most one flood request (whose turn came first) starts before maze."""

    async def main() -> list[str]:
        scheduler, log, _, job = _recorder(slots=2)
        for i in range(40):
            scheduler.submit(("flood", f"s{i}"), job(f"flood{i}"))
        scheduler.submit(("maze", "m"), job("maze"))
        assert scheduler.queued("flood") == 38 and scheduler.queued("maze") == 1
        await asyncio.sleep(0.5)
        return log

    starts = [x for x in asyncio.run(main()) if x.startswith("start")]
    assert starts.index("start maze") <= 3, starts
    assert len(starts) == 41


def test_sessions_of_a_project_take_turns() -> None:
    """One slot; session a has 6 requests queued, then b sends one: b runs after a's second, not
    after its sixth."""

    async def main() -> list[str]:
        scheduler, log, _, job = _recorder(slots=1)
        for i in range(6):
            scheduler.submit(("p", "a"), job(f"a{i}"))
        scheduler.submit(("p", "b"), job("b"))
        await asyncio.sleep(0.3)
        return log

    starts = [x for x in asyncio.run(main()) if x.startswith("start")]
    assert starts.index("start b") == 1, starts
    assert [s for s in starts if s.startswith("start a")] == [f"start a{i}" for i in range(6)]


def test_project_cap_keeps_slots_for_others() -> None:
    async def main() -> tuple[list[str], int]:
        scheduler, log, running, job = _recorder(slots=3, caps={"flood": 1})
        for i in range(5):
            scheduler.submit(("flood", f"s{i}"), job(f"f{i}", 0.05))
        assert scheduler.running("flood") == 1 and scheduler.free == 2
        scheduler.submit(("maze", "m"), job("maze", 0.0))
        assert scheduler.running("maze") == 1  # started at once: a slot was free
        await asyncio.sleep(0.5)
        return log, running["peak"]

    log, peak = asyncio.run(main())
    assert log.index("start maze") < log.index("start f1")
    assert peak == 2


def test_waited_seconds_are_passed_to_the_job() -> None:
    async def main() -> list[float]:
        scheduler = FairScheduler(1)
        waits: list[float] = []

        async def slow(waited: float) -> None:
            waits.append(waited)
            await asyncio.sleep(0.1)

        scheduler.submit(("p", "a"), slow)
        scheduler.submit(("p", "b"), slow)
        await asyncio.sleep(0.3)
        return waits

    waits = asyncio.run(main())
    assert waits[0] < 0.05 and waits[1] >= 0.09


def test_idle_expiry_spares_busy_sessions() -> None:
    clock = Clock()
    busy_keys = {("p", "busy")}
    store = SessionStore(idle_s=10, clock=clock, busy=busy_keys.__contains__)
    store.get(("p", "idle"))
    busy = store.get(("p", "busy"))
    clock.now += 11
    assert store.expire() == 1
    assert store.peek(("p", "idle")) is None
    assert store.peek(("p", "busy")) is busy


def test_max_sessions_evicts_idle_lru() -> None:
    busy_keys = {("p", "1")}
    store = SessionStore(max_sessions=2, busy=busy_keys.__contains__)
    busy = store.get(("p", "1"))
    store.get(("p", "2"))
    store.get(("p", "3"))
    assert store.peek(("p", "1")) is busy
    assert store.peek(("p", "2")) is None
    assert len(store) == 2


# ------------------------------------------------------------------------------ limits
def test_token_bucket() -> None:
    clock = Clock()
    bucket = TokenBucket(60, burst=2, clock=clock)  # 1 per second
    assert bucket.allow() and bucket.allow()
    assert not bucket.allow()
    clock.now += 1.0
    assert bucket.allow()
    assert not bucket.allow()


def test_dedupe_cache_ttl_and_bound() -> None:
    async def main() -> None:
        clock = Clock()
        cache = DedupeCache(ttl_s=10, max_entries=2, clock=clock)
        assert cache.begin("a") is None
        entry = cache.begin("a")
        assert entry is not None and entry.reply is None  # pending repeat
        cache.finish("a", StoredReply("t", b"x"))
        assert await cache.wait(entry, 1) == StoredReply("t", b"x")
        cache.begin("b")
        cache.finish("b", StoredReply("t", b"y"))
        cache.begin("c")
        assert len(cache) <= 3
        cache.begin("d")
        assert cache.begin("a") is None  # evicted (bound), so it is new again
        clock.now += 11
        assert cache.begin("d") is None  # expired

    asyncio.run(main())


def test_dedupe_failure_forgets_key() -> None:
    cache = DedupeCache()
    cache.begin("a")
    cache.finish("a", None)
    assert cache.begin("a") is None


def test_metrics_render() -> None:
    m = Metrics()
    m.requests[("general", "ok")] += 2
    m.errors["invalid_json"] += 1
    m.observe_latency(0.02)
    text = m.render({"sessions": 3})
    assert 'deploykit_bridge_requests_total{project="general",status="ok"} 2' in text
    assert 'deploykit_bridge_errors_total{code="invalid_json"} 1' in text
    assert 'deploykit_bridge_request_seconds_bucket{le="0.025"} 1' in text
    assert "deploykit_bridge_sessions 3" in text


# ------------------------------------------------------------------------------ config, settings
def test_settings_from_env_and_overrides() -> None:
    env = {
        "DEPLOYKIT_BROKER": "mqtt://broker:1883",
        "DEPLOYKIT_ENGINE": "http://engine:8000",
        "DEPLOYKIT_PROJECTS": "general, maze",
        "DEPLOYKIT_CLIENT_ID": "deploykit-bridge-1",
        "DEPLOYKIT_HTTP_PORT": "9000",
        "DEPLOYKIT_MQTT_USERNAME_FILE": "/run/secrets/u",
    }
    s = settings_from(env)
    assert s.projects == ["general", "maze"] and s.http_port == 9000
    assert str(s.mqtt_username_file) == "/run/secrets/u"
    s2 = settings_from(env, {"projects": "x", "broker": None})
    assert s2.projects == ["x"] and s2.broker == "mqtt://broker:1883"
    with pytest.raises(UsageError):
        settings_from({"DEPLOYKIT_PROJECTS": "a/b"})


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "defaults:\n  max_history_tokens: 100\n"
        "projects:\n  maze:\n    system_prompt: Guide.\n    rate_limit_per_minute: 10\n"
        "bridge:\n  max_in_flight: 8\n"
    )
    cfg = load_config(path)
    assert cfg.project("maze").system_prompt == "Guide."
    assert cfg.project("maze").max_history_tokens == 100
    assert cfg.project("maze").rate_limit_per_minute == 10
    assert cfg.project("general").rate_limit_per_minute == 1200  # the documented default
    path.write_text("defaults:\n  rate_limit_per_minute: null\n")
    assert load_config(path).project("general").rate_limit_per_minute is None  # off
    path.write_text(
        "defaults:\n  max_history_tokens: 100\n"
        "projects:\n  maze:\n    system_prompt: Guide.\n    rate_limit_per_minute: 10\n"
        "bridge:\n  max_in_flight: 8\n"
    )
    cfg = load_config(path)
    assert cfg.bridge.max_in_flight == 8
    path.write_text("projects:\n  maze:\n    temprature: 1\n")
    with pytest.raises(UsageError, match="temprature"):
        load_config(path)
    assert load_config(None).project("any").default_max_tokens == 256


# ------------------------------------------------------------------------------ pacing
def test_pacer_asks_for_one_interval_of_tokens_once_it_has_seen_a_stream() -> None:
    pacer = EventPacer(0.1, floor=4)
    assert pacer.tokens_per_event() == 4  # nothing seen yet: the floor
    pacer.observe(140, 1.0)  # 140 tokens/s: 14 arrive in 0.1 s
    assert pacer.tokens_per_event() == 14
    pacer.observe(0, 1.0)  # a one-token answer says nothing about the rate
    pacer.observe(10, 0.0)
    assert pacer.tokens_per_event() == 14


def test_pacer_stays_within_floor_and_ceiling_and_follows_the_rate_smoothly() -> None:
    pacer = EventPacer(0.1, floor=4, ceiling=64)
    pacer.observe(20, 1.0)  # 2 tokens per interval: the floor bounds a slow engine's events
    assert pacer.tokens_per_event() == 4
    pacer.observe(300, 1.0)  # one fast stream moves the estimate a fifth of the way
    assert pacer.tokens_per_event() == 7  # 20 + 0.2 * (300 - 20) = 76 tokens/s
    for _ in range(50):
        pacer.observe(300, 1.0)
    assert pacer.tokens_per_event() == 29  # converging on 30 from below
    for _ in range(50):
        pacer.observe(10_000, 1.0)
    assert pacer.tokens_per_event() == 64
    with pytest.raises(ValueError, match="floor"):
        EventPacer(0.1, floor=0)


def test_fixed_pacer_and_the_setting() -> None:
    fixed = FixedPacer(8)
    fixed.observe(1000, 1.0)
    assert fixed.tokens_per_event() == 8
    assert pacer_for(8, 0.1).tokens_per_event() == 8
    assert pacer_for("auto", 0.1).tokens_per_event() == AUTO_FLOOR


@pytest.mark.parametrize("value", ["auto", 1, 64])
def test_engine_stream_tokens_accepted(tmp_path: Path, value: object) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(f"bridge:\n  engine_stream_tokens: {value}\n")
    assert load_config(path).bridge.engine_stream_tokens == value


@pytest.mark.parametrize("value", ["fast", 0, 65, 2.5, "true"])
def test_engine_stream_tokens_refused(tmp_path: Path, value: object) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(f"bridge:\n  engine_stream_tokens: {value}\n")
    with pytest.raises(UsageError, match=r"engine_stream_tokens.*'auto' or a whole number"):
        load_config(path)


# ------------------------------------------------------------------------------ mqttclient
def test_parse_broker_url() -> None:
    assert parse_broker_url("mqtt://broker:1884") == BrokerAddress("broker", 1884)
    assert parse_broker_url("localhost") == BrokerAddress("localhost", 1883)
    for bad in ("http://x", "mqtt://u:p@x", "mqtt://", "mqtt://x:notaport"):
        with pytest.raises(UsageError):
            parse_broker_url(bad)


def test_read_credentials(tmp_path: Path) -> None:
    assert read_credentials(None, None) is None
    (tmp_path / "u").write_text("bridge\n")
    (tmp_path / "p").write_text("s3cret\n")
    creds = read_credentials(tmp_path / "u", tmp_path / "p")
    assert creds is not None and creds.username == "bridge" and creds.password == "s3cret"
    assert "s3cret" not in repr(creds)
    with pytest.raises(UsageError):
        read_credentials(tmp_path / "missing", None)
    with pytest.raises(UsageError):
        read_credentials(None, tmp_path / "p")


# ------------------------------------------------------------------------------ CLI
def test_cli_bridge_help_and_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from deploykit.cli import main

    with pytest.raises(SystemExit) as exit_help:
        main(["bridge", "--help"])
    assert exit_help.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--broker", "--engine", "--projects", "--config", "--mqtt-username-file"):
        assert flag in out
    assert "--mqtt-password " not in out  # credentials only from files
    with pytest.raises(SystemExit) as exit_bad:
        main(["bridge", "--broker", "http://x", "--engine", "http://127.0.0.1:1"])
    assert exit_bad.value.code == 2
    assert "unsupported broker URL scheme" in capsys.readouterr().err


# ------------------------------------------------------------------------------ sampling
def test_sampling_params_temperature_zero_is_greedy() -> None:
    from deploykit.bridge.config import ProjectConfig
    from deploykit.bridge.prompts import sampling_params
    from deploykit.bridge.protocol import ChatRequest

    cfg = ProjectConfig.model_validate(
        {
            "default_temperature": 0.7,
            "default_max_tokens": 32,
            "engine_extra": {"ignore_eos": True, "temperature": 1.5},
        }
    )
    greedy = sampling_params(ChatRequest(sessionId="s", message="m", temperature=0), cfg)
    assert greedy["temperature"] == 0.0  # not the default, not engine_extra
    assert greedy["ignore_eos"] is True and greedy["max_tokens"] == 32
    default = sampling_params(ChatRequest(sessionId="s", message="m", maxTokens=5), cfg)
    assert default["temperature"] == 0.7 and default["max_tokens"] == 5

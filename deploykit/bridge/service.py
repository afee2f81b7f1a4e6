"""The bridge service: request handling on one asyncio loop: validation, rate limits,
de-duplication, per-session scheduling, generation through the engine, replies, acknowledgements,
health and metrics. The MQTT side (paho, persistent session, PUBACK futures) is ``transport``.

Delivery (DESIGN.md): requests arrive at QoS 1 with manual acknowledgement; a request is acknowledged
only after its reply's own PUBACK, so a crash before that makes the broker redeliver it (persistent
session). In-flight work is bounded twice: by the MQTT 5 Receive Maximum (the broker holds requests
back) and by ``max_in_flight`` engine slots in the bridge (Mosquitto 2.0.11 overshoots the former).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from deploykit.bridge.config import BridgeConfig, ProjectConfig, Settings
from deploykit.bridge.engine import Completion, EngineClient, EngineError
from deploykit.bridge.limits import DedupeCache, StoredReply, TokenBucket
from deploykit.bridge.metrics import HttpEndpoint, Metrics
from deploykit.bridge.prompts import PromptBuilder
from deploykit.bridge.protocol import (
    STREAM_SUFFIX,
    Accepted,
    ChatRequest,
    ErrorCode,
    Rejection,
    RequestFailed,
    Routing,
    envelope,
    error_payload,
    ok_payload,
    parse_request,
    stream_payload,
)
from deploykit.bridge.sessions import SessionKey, SessionStore, Turn
from deploykit.bridge.transport import MqttTransport
from deploykit.mqttclient import (
    STATUS_TOPIC,
    Credentials,
    parse_broker_url,
)

log = logging.getLogger("deploykit.bridge")


@dataclass
class Inbound:
    """A received MQTT message still to be acknowledged."""

    project: str
    mid: int
    qos: int
    received: float
    correlation: bytes | None


class Bridge:
    def __init__(
        self,
        settings: Settings,
        config: BridgeConfig,
        credentials: Credentials | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.tuning = config.bridge
        self.projects: dict[str, ProjectConfig] = {p: config.project(p) for p in settings.projects}
        self.credentials = credentials
        self.address = parse_broker_url(settings.broker)
        self.status_topic = STATUS_TOPIC.format(client_id=settings.client_id)
        self.metrics = Metrics()
        self.engine = EngineClient(
            settings.engine,
            max_connections=self.tuning.max_in_flight + 8,
            timeout_s=self.tuning.request_timeout_s,
        )
        self.sessions = SessionStore(
            idle_s=self.tuning.session_idle_s, max_sessions=self.tuning.max_sessions
        )
        self.dedupe = DedupeCache(
            ttl_s=self.tuning.dedupe_ttl_s, max_entries=self.tuning.dedupe_max_entries
        )
        self.buckets: dict[str, TokenBucket] = {
            name: TokenBucket(cfg.rate_limit_per_minute, cfg.rate_limit_burst)
            for name, cfg in self.projects.items()
            if cfg.rate_limit_per_minute
        }
        self.http = HttpEndpoint(self.health, self.render_metrics)
        self.prompts = PromptBuilder(self.engine)
        self.engine_ok = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.mqtt: MqttTransport | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._debug = log.isEnabledFor(logging.DEBUG)
        self.ready = asyncio.Event()
        # The Receive Maximum bounds what the broker sends, but Mosquitto 2.0.11 releases two
        # messages per PUBACK (seen in its -v log), so the bridge bounds engine work itself too.
        self._slots = asyncio.Semaphore(self.tuning.max_in_flight)
        self.active = 0

    # ---------------------------------------------------------------- lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set."""
        self._loop = asyncio.get_running_loop()
        if self.settings.http_port is not None:
            await self.http.start(self.settings.http_host, self.settings.http_port)
            log.info("health and metrics on http://%s:%s", self.settings.http_host, self.http.port)
        try:
            if not await self._wait_for_engine(stop):
                return
            self.mqtt = MqttTransport(
                self._loop,
                self.address,
                self.settings.client_id,
                credentials=self.credentials,
                subscriptions=[
                    f"$share/{self.tuning.share_group}/{project}/user_input"
                    for project in self.projects
                ],
                status_topic=self.status_topic,
                session_expiry_s=self.tuning.mqtt_session_expiry_s,
                receive_maximum=self.tuning.max_in_flight,
                on_message=self._handle_message,
            )
            self.mqtt.start()
            self._spawn(self._housekeeping(stop))
            self.ready.set()
            await stop.wait()
        finally:
            await self._shutdown()

    async def _wait_for_engine(self, stop: asyncio.Event) -> bool:
        delay = 1.0
        while not stop.is_set():
            try:
                model = await self.engine.discover()
                self.prompts.overhead = await self.engine.template_overhead()
                self.engine_ok = True
                log.info(
                    "engine %s serves %s (max_model_len %d, template overhead %s)",
                    self.settings.engine,
                    model.name,
                    model.max_model_len,
                    self.prompts.overhead,
                )
                for name, cfg in self.projects.items():
                    if cfg.default_max_tokens >= model.max_model_len:
                        log.warning(
                            "project %s: default_max_tokens %d leaves no room for a prompt "
                            "(max_model_len %d)",
                            name,
                            cfg.default_max_tokens,
                            model.max_model_len,
                        )
                return True
            except EngineError as err:
                log.warning("waiting for the engine at %s: %s", self.settings.engine, err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 15.0)
        return False

    async def _shutdown(self) -> None:
        if self.mqtt is not None:
            await self.mqtt.stop()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.sessions.aclose()
        await self.engine.aclose()
        await self.http.stop()
        log.info("bridge stopped")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)
            if stop.is_set():
                return
            expired = self.sessions.expire()
            if expired:
                log.info("expired %d idle sessions", expired)
            self.engine_ok = await self.engine.health()

    # ---------------------------------------------------------------- health / metrics
    @property
    def mqtt_connected(self) -> bool:
        return self.mqtt is not None and self.mqtt.connected

    def health(self) -> tuple[bool, dict[str, object]]:
        ok = self.mqtt_connected and self.engine_ok
        model = self.engine.model
        return ok, {
            "status": "ok" if ok else "unhealthy",
            "mqtt_connected": self.mqtt_connected,
            "engine_ok": self.engine_ok,
            "model": model.name if model else None,
            "client_id": self.settings.client_id,
        }

    def render_metrics(self) -> str:
        return self.metrics.render(
            {
                "sessions": len(self.sessions),
                "active": self.active,
                "mqtt_connected": float(self.mqtt_connected),
                "engine_up": float(self.engine_ok),
                "dedupe_entries": len(self.dedupe),
            }
        )

    # ---------------------------------------------------------------- replies and acks
    def _publish(
        self,
        topic: str,
        payload: bytes,
        *,
        correlation: bytes | None = None,
        content_type: str | None = None,
        user_properties: list[tuple[str, str]] | None = None,
        track: bool = True,
    ) -> asyncio.Future[None] | None:
        assert self.mqtt is not None
        return self.mqtt.publish(
            topic,
            payload,
            correlation=correlation,
            content_type=content_type,
            user_properties=user_properties,
            track=track,
        )

    def _ack_after(self, inbound: Inbound, future: asyncio.Future[None] | None) -> None:
        def done(_f: object = None) -> None:
            if self.mqtt is not None:
                self.mqtt.ack(inbound.mid, inbound.qos)
            self.metrics.in_flight -= 1

        if future is None:
            done()
        else:
            future.add_done_callback(done)

    def _send_reply(
        self,
        inbound: Inbound,
        routing: Routing,
        payload: bytes,
        *,
        is_error: bool,
        code: str | None = None,
    ) -> StoredReply | None:
        """Publish a reply (or drop it when no reply topic is known) and ack the request after it."""
        latency = time.monotonic() - inbound.received
        self.metrics.observe_latency(latency)
        status = "error" if is_error else "ok"
        self.metrics.requests[(inbound.project, status)] += 1
        if code:
            self.metrics.errors[code] += 1
        if routing.reply_topic is None:
            self.metrics.dropped += 1
            log.warning(
                "dropped a %s message on %s/user_input: %s, and no reply topic is known",
                inbound.project,
                inbound.project,
                code,
            )
            self._ack_after(inbound, None)
            return None
        users = [("status", status)]
        if routing.request_id is not None:
            users.append(("requestId", routing.request_id))
        if code:
            users.append(("errorCode", code))
        json_reply = is_error or routing.format == "json"
        ctype = "application/json" if json_reply else "text/plain; charset=utf-8"
        future = self._publish(
            routing.reply_topic,
            payload,
            correlation=inbound.correlation,
            content_type=ctype,
            user_properties=users,
        )
        self._ack_after(inbound, future)
        log.info(
            "%s %s/%s request=%s -> %s (%.0f ms)%s",
            status,
            inbound.project,
            routing.session_id,
            routing.request_id,
            routing.reply_topic,
            latency * 1000,
            f" [{code}]" if code else "",
        )
        return StoredReply(routing.reply_topic, payload, users)

    def _reject(self, inbound: Inbound, routing: Routing, code: ErrorCode, message: str) -> None:
        self._send_reply(
            inbound,
            routing,
            error_payload(routing, code.value, message),
            is_error=True,
            code=code.value,
        )

    def _handle_message(self, msg: mqtt.MQTTMessage) -> None:
        """A message from ``{project}/user_input`` (on the loop)."""
        project = msg.topic.split("/", 1)[0]
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        inbound = Inbound(project, msg.mid, msg.qos, time.monotonic(), correlation)
        self.metrics.in_flight += 1
        if project not in self.projects:
            log.warning("message on %s, which is not a served project; ignored", msg.topic)
            self.metrics.dropped += 1
            self._ack_after(inbound, None)
            return
        try:
            parsed = parse_request(
                project,
                bytes(msg.payload),
                response_topic=response_topic,
                max_payload_bytes=self.tuning.max_payload_bytes,
                max_message_chars=self.tuning.max_message_chars,
            )
            if isinstance(parsed, Rejection):
                self._reject(inbound, parsed.routing, parsed.code, parsed.message)
                return
            self._accept(inbound, parsed)
        except Exception:  # never let one message stop the bridge
            log.exception("failed to handle a message on %s", msg.topic)
            self._ack_after(inbound, None)

    def _accept(self, inbound: Inbound, parsed: Accepted) -> None:
        request, routing = parsed.request, parsed.routing
        cfg = self.projects[inbound.project]
        if self._debug:
            log.debug("request %s/%s: %r", inbound.project, request.sessionId, request.message)
        dedupe_key = (inbound.project, routing.request_id) if routing.request_id else None
        if dedupe_key is not None:
            entry = self.dedupe.begin(dedupe_key)
            if entry is not None:
                self.metrics.duplicates += 1
                self._spawn(self._answer_repeat(inbound, parsed, entry))
                return
        problem = self._check_limits(inbound.project, request, cfg)
        if problem is not None:
            if dedupe_key is not None:
                self.dedupe.finish(dedupe_key, None)
            self._reject(inbound, routing, *problem)
            return
        if request.probe:
            self._spawn(self._run_probe(inbound, parsed, dedupe_key))
            return
        key: SessionKey = (inbound.project, request.sessionId)
        self.sessions.submit(key, lambda: self._run_chat(inbound, parsed, key, dedupe_key))

    def _check_limits(
        self, project: str, request: ChatRequest, cfg: ProjectConfig
    ) -> tuple[ErrorCode, str] | None:
        if request.maxTokens is not None and request.maxTokens > cfg.max_max_tokens:
            return ErrorCode.OUT_OF_RANGE, f"maxTokens must be at most {cfg.max_max_tokens}"
        if request.systemPrompt is not None and not cfg.allow_system_prompt_override:
            return (
                ErrorCode.OVERRIDE_NOT_ALLOWED,
                f"project {project} does not allow clients to set systemPrompt",
            )
        bucket = self.buckets.get(project)
        if bucket is not None and not request.probe and not bucket.allow():
            return (
                ErrorCode.RATE_LIMITED,
                f"rate limit of project {project} exceeded "
                f"({cfg.rate_limit_per_minute:g} requests per minute); retry later",
            )
        return None

    async def _answer_repeat(self, inbound: Inbound, parsed: Accepted, entry: Any) -> None:
        stored = await self.dedupe.wait(entry, self.tuning.request_timeout_s)
        if stored is None:  # the first attempt failed or vanished: answer this one afresh
            self._accept(inbound, parsed)
            return
        log.info("repeat of request %s answered from the cache", parsed.routing.request_id)
        topic = parsed.routing.reply_topic or stored.topic
        future = self._publish(
            topic,
            stored.payload,
            correlation=inbound.correlation,
            user_properties=[*stored.user_properties, ("duplicate", "true")],
        )
        self._ack_after(inbound, future)

    # ---------------------------------------------------------------- generation
    async def _run_chat(
        self,
        inbound: Inbound,
        parsed: Accepted,
        key: SessionKey,
        dedupe_key: tuple[str, str] | None,
    ) -> None:
        """One request of a session, holding one of the ``max_in_flight`` engine slots from its
        first engine call (/tokenize) to its reply."""
        async with self._slots:
            self.active += 1
            try:
                await self._chat(inbound, parsed, key, dedupe_key)
            finally:
                self.active -= 1

    async def _chat(
        self,
        inbound: Inbound,
        parsed: Accepted,
        key: SessionKey,
        dedupe_key: tuple[str, str] | None,
    ) -> None:
        request, routing = parsed.request, parsed.routing
        cfg = self.projects[inbound.project]
        stored: StoredReply | None = None
        try:
            session = self.sessions.get(key)
            assert self.engine.model is not None
            prompt = await self.prompts.build(
                session.history, request, cfg, self.engine.model.max_model_len
            )
            completion = await asyncio.wait_for(
                self._generate(prompt.messages, prompt.params, request, routing, inbound),
                self.tuning.request_timeout_s,
            )
            self.engine_ok = True
            self.metrics.prompt_tokens += completion.prompt_tokens
            self.metrics.completion_tokens += completion.completion_tokens
            if completion.reasoned and not completion.text.strip():
                raise RequestFailed(
                    ErrorCode.NO_ANSWER,
                    f"the model spent its {completion.completion_tokens} tokens on reasoning and "
                    "gave no answer; allow more with maxTokens",
                )
            session.history = [
                *prompt.kept_history,
                Turn("user", request.message, prompt.new_tokens),
                Turn("assistant", completion.text, completion.completion_tokens),
            ]
            usage = {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
            }
            stored = self._send_reply(
                inbound, routing, ok_payload(routing, completion.text, usage), is_error=False
            )
        except RequestFailed as err:
            self._reject(inbound, routing, err.code, err.message)
        except EngineError as err:
            if err.unavailable:
                self.engine_ok = await self.engine.health()
                code = ErrorCode.ENGINE_UNAVAILABLE
            elif err.status == 400 and "context length" in str(err).lower():
                # the engine's own count disagreed with ours (vllm/renderers/params.py:
                # "This model's maximum context length is ..."): the message is too long
                code = ErrorCode.MESSAGE_TOO_LONG
            else:
                code = ErrorCode.ENGINE_ERROR
            self._reject(inbound, routing, code, str(err))
        except TimeoutError:
            self._reject(
                inbound,
                routing,
                ErrorCode.TIMEOUT,
                f"no answer from the engine within {self.tuning.request_timeout_s:g} s",
            )
        except Exception as err:
            log.exception("request failed")
            self._reject(inbound, routing, ErrorCode.INTERNAL_ERROR, f"internal error: {err}")
        finally:
            if dedupe_key is not None:
                self.dedupe.finish(dedupe_key, stored)

    async def _generate(
        self,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        request: ChatRequest,
        routing: Routing,
        inbound: Inbound,
    ) -> Completion:
        if not request.stream or routing.reply_topic is None:
            return await self.engine.chat(messages, params)
        topic = routing.reply_topic + STREAM_SUFFIX
        pending: list[str] = []
        seq = 0
        last = time.monotonic()
        final: Completion | None = None
        async for item in self.engine.chat_stream(messages, params):
            if isinstance(item, Completion):
                final = item
                break
            pending.append(item)
            now = time.monotonic()
            if now - last >= self.tuning.stream_interval_s:
                self._publish(
                    topic,
                    stream_payload(routing, seq, "".join(pending)),
                    correlation=inbound.correlation,
                    track=False,
                )
                seq += 1
                pending.clear()
                last = now
        if pending:
            self._publish(
                topic,
                stream_payload(routing, seq, "".join(pending)),
                correlation=inbound.correlation,
                track=False,
            )
        if final is None:
            raise EngineError("the engine's stream ended early", 502)
        return final

    async def _run_probe(
        self, inbound: Inbound, parsed: Accepted, dedupe_key: tuple[str, str] | None
    ) -> None:
        """A health probe: a 1-token completion, no history; always answered with the envelope."""
        routing = Routing(
            parsed.routing.reply_topic,
            "json",
            parsed.routing.request_id,
            parsed.routing.session_id,
        )
        stored = None
        try:
            completion = await asyncio.wait_for(
                self.engine.chat(
                    [{"role": "user", "content": parsed.request.message or "ping"}],
                    {"max_tokens": 1, "temperature": 0},
                ),
                30.0,
            )
            self.engine_ok = True
            usage = {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
            }
            payload = envelope(
                routing, text=completion.text, usage=usage, model=self.engine.model_name
            )
            stored = self._send_reply(inbound, routing, payload, is_error=False)
        except (EngineError, TimeoutError) as err:
            self.engine_ok = False
            self._reject(
                inbound, routing, ErrorCode.ENGINE_UNAVAILABLE, f"engine probe failed: {err}"
            )
        finally:
            if dedupe_key is not None:
                self.dedupe.finish(dedupe_key, stored)

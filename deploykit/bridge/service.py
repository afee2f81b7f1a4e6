"""The bridge service: request handling on one asyncio loop: validation, rate limits, queue bounds,
de-duplication, generation through the engine, health and metrics. The MQTT sessions are
``transport``'s, who gets the next engine slot is ``scheduler``'s, and replies, acknowledgements
and drops are ``replies``'.

Delivery (docs in README.md): requests arrive at QoS 1 with manual acknowledgement; a request is
acknowledged only after its reply's own PUBACK, so a crash before that makes the broker redeliver it
(persistent session). Every message is acknowledged in the end, whatever happens to it: answered,
answered with an error, or (when no reply topic can be used) counted in
``deploykit_bridge_dropped_total`` and logged. Nothing a client sends can make the bridge retry a
message forever or hold a slot: a message that cannot be handled is still acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from deploykit import names
from deploykit.bridge.config import BridgeConfig, ProjectConfig, Settings
from deploykit.bridge.engine import Completion, EngineClient, EngineError
from deploykit.bridge.limits import DedupeCache, StoredReply, TokenBucket
from deploykit.bridge.metrics import HttpEndpoint, Metrics
from deploykit.bridge.pacing import pacer_for
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
    ok_payload,
    parse_request,
    stream_payload,
)
from deploykit.bridge.replies import Inbound, Replies
from deploykit.bridge.scheduler import FairScheduler, SessionKey
from deploykit.bridge.sessions import Session, SessionStore, Turn
from deploykit.bridge.shared import SharedState, StateUnavailable
from deploykit.bridge.transport import ProjectSession, StatusSession
from deploykit.mqttclient import Credentials, parse_broker_url
from deploykit.mqttloop import publish_properties

log = logging.getLogger("deploykit.bridge")

DedupeKey = tuple[str, str, str]  # (project, sessionId, requestId)


@dataclass(frozen=True)
class Secrets:
    """What ``deploykit up`` generates for the bridge (read from files by the runner)."""

    client_id: str
    share_group: str | None = None
    engine_api_key: str | None = None
    redis_password: str | None = None


def fingerprint(request: ChatRequest) -> bytes:
    """What a repeat of a requestId must ask again to be the same request."""
    fields = [
        request.message,
        request.systemPrompt,
        request.maxTokens,
        request.temperature,
        request.topP,
        request.format,
        request.probe,
    ]
    return hashlib.blake2b(orjson.dumps(fields), digest_size=16).digest()


def _dedupe_key(inbound: Inbound, parsed: Accepted) -> DedupeKey | None:
    """The key a request is de-duplicated under, in one bridge and across replicas (None: the
    request has no requestId)."""
    request_id = parsed.routing.request_id
    return (inbound.project, parsed.request.sessionId, request_id) if request_id else None


class Bridge:
    def __init__(
        self,
        settings: Settings,
        config: BridgeConfig,
        credentials: Credentials | None = None,
        secrets: Secrets | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.tuning = config.bridge
        self.projects: dict[str, ProjectConfig] = {p: config.project(p) for p in settings.projects}
        self.credentials = credentials
        self.secrets = secrets or Secrets(client_id=settings.client_id)
        self.address = parse_broker_url(settings.broker)
        self.metrics = Metrics()
        self.engine = EngineClient(
            settings.engine,
            api_key=self.secrets.engine_api_key,
            max_connections=self.tuning.max_in_flight + 8,
            timeout_s=self.tuning.request_timeout_s,
            keepalive_s=self.tuning.engine_keepalive_s,
            retries=self.tuning.engine_retries,
        )
        self.pacer = pacer_for(self.tuning.engine_stream_tokens, self.tuning.stream_interval_s)
        self.scheduler = FairScheduler(
            self.tuning.max_in_flight,
            caps={
                name: cfg.max_engine_slots
                for name, cfg in self.projects.items()
                if cfg.max_engine_slots is not None
            },
        )
        self.sessions = SessionStore(
            idle_s=self.tuning.session_idle_s,
            max_sessions=self.tuning.max_sessions,
            busy=self.scheduler.busy,
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
        self.replies = Replies(self.metrics)
        self.prompts = PromptBuilder(self.engine)
        self.engine_ok = False
        #: Replicas: the session state they share (None: one bridge, all of it in memory).
        self.shared: SharedState | None = None
        if settings.redis is not None:
            self.shared = SharedState(
                settings.redis,
                self.secrets.redis_password,
                owner=settings.name,
                session_idle_s=self.tuning.session_idle_s,
                dedupe_ttl_s=self.tuning.dedupe_ttl_s,
                lease_s=self.tuning.shared_lease_s,
                order_window_s=self.tuning.order_window_s,
            )
        self.draining = False
        self.mqtt: dict[str, ProjectSession] = {}
        self.status: StatusSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._debug = log.isEnabledFor(logging.DEBUG)
        self.ready = asyncio.Event()

    # ---------------------------------------------------------------- lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set."""
        loop = asyncio.get_running_loop()
        if self.settings.http_port is not None:
            await self.http.start(self.settings.http_host, self.settings.http_port)
            log.info("health and metrics on http://%s:%s", self.settings.http_host, self.http.port)
        try:
            if not await self._wait_for_engine(stop):
                return
            if self.shared is not None and not await self._wait_for_shared_state(stop):
                return
            client_id = self.secrets.client_id
            if self.settings.replica:
                client_id = f"{client_id}-{self.settings.replica}"
            for project, cfg in self.projects.items():
                self.mqtt[project] = ProjectSession(
                    loop,
                    project,
                    self.address,
                    f"{client_id}-{project}",
                    credentials=self.credentials,
                    share_group=self.secrets.share_group,
                    session_expiry_s=self.tuning.mqtt_session_expiry_s,
                    receive_maximum=cfg.receive_maximum,
                    keepalive_s=self.tuning.mqtt_keepalive_s,
                    on_message=self._handle_message,
                )
            self.status = StatusSession(
                loop,
                self.address,
                f"{client_id}-status",
                self.settings.name,
                credentials=self.credentials,
                keepalive_s=self.tuning.mqtt_keepalive_s,
            )
            for session in self.mqtt.values():
                session.start()
            self.status.start()
            log.info(
                "serving %s as %s (%s subscriptions, session state %s)",
                ", ".join(self.projects),
                self.settings.name,
                "shared" if self.secrets.share_group else "plain",
                "shared in Redis" if self.shared is not None else "in memory",
            )
            if self.secrets.share_group and self.shared is None:
                log.warning(
                    "a share group without shared session state: with more than one replica, "
                    "history, order and de-duplication hold per replica only"
                )
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

    async def _wait_for_shared_state(self, stop: asyncio.Event) -> bool:
        assert self.shared is not None
        delay = 1.0
        while not stop.is_set():
            try:
                await self.shared.start()
                log.info("session state shared in Redis at %s", self.settings.redis)
                return True
            except StateUnavailable as err:
                log.warning("waiting for Redis at %s: %s", self.settings.redis, err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 15.0)
        return False

    async def _drain(self) -> None:
        """A replica that stops: take no new work (unsubscribe), answer what it holds and what the
        broker had queued for it, then end its MQTT sessions, so no session of it stays in the
        share group receiving requests. What is still held at ``drain_timeout_s`` stays in its
        session, for the broker to deliver when it comes back."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.tuning.drain_timeout_s
        for session in self.mqtt.values():
            session.leave_share_group()
        # done when nothing was held for a second: the broker sends what it queued for a session
        # as soon as the window allows, so a quiet second means its queue is empty too
        quiet_since = loop.time()
        while loop.time() < deadline:
            if self.metrics.in_flight:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= 1.0:
                break
            await asyncio.sleep(0.1)
        held = self.metrics.in_flight
        if held:
            log.warning(
                "drain: %d requests still held after %.0f s stay in the MQTT sessions",
                held,
                self.tuning.drain_timeout_s,
            )
        else:
            log.info("drained: every request answered; ending the MQTT sessions")
        for session in self.mqtt.values():
            await session.stop(end_session=held == 0)

    async def _shutdown(self) -> None:
        if self.secrets.share_group and self.mqtt:
            await self._drain()
        for session in self.mqtt.values():
            await session.stop()
        if self.status is not None:
            await self.status.stop()
        await self.scheduler.aclose()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.engine.aclose()
        if self.shared is not None:
            await self.shared.aclose()
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
            if self.shared is not None:
                self.shared_ok = await self.shared.ping()

    # ---------------------------------------------------------------- health / metrics
    @property
    def mqtt_connected(self) -> bool:
        return bool(self.mqtt) and all(s.connected for s in self.mqtt.values())

    shared_ok = True  # no shared state, or Redis answered its last ping

    def health(self) -> tuple[bool, dict[str, object]]:
        ok = self.mqtt_connected and self.engine_ok and self.shared_ok and not self.draining
        model = self.engine.model
        return ok, {
            "status": "ok" if ok else ("draining" if self.draining else "unhealthy"),
            "mqtt_connected": self.mqtt_connected,
            "shared_state": None if self.shared is None else self.shared_ok,
            "projects": {p: {"connected": s.connected} for p, s in self.mqtt.items()},
            "engine_ok": self.engine_ok,
            "model": model.name if model else None,
            "name": self.settings.name,
        }

    def render_metrics(self) -> str:
        return self.metrics.render(
            gauges={
                "sessions": len(self.sessions),
                "active": self.scheduler.active,
                "active_peak": self.scheduler.peak_active,
                "mqtt_connected": float(self.mqtt_connected),
                "engine_up": float(self.engine_ok),
                "dedupe_entries": len(self.dedupe),
            },
            counters={
                "engine_retries_total": self.engine.retried,
                "engine_connections_total": self.engine.connections,
                "tokenize_calls_total": self.prompts.counted,
                "redelivered_total": sum(s.redelivered for s in self.mqtt.values()),
            },
            per_project={
                "queued": {p: self.scheduler.queued(p) for p in self.projects},
                "running": {p: self.scheduler.running(p) for p in self.projects},
            },
        )

    def _handle_message(self, session: ProjectSession, msg: mqtt.MQTTMessage) -> None:
        """A message from ``{project}/user_input`` (on the loop). Whatever happens, it ends
        acknowledged: answered, answered with an error, or counted as dropped."""
        props = getattr(msg, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props else None
        inbound = Inbound(session, msg.mid, msg.qos, time.monotonic(), correlation)
        self.metrics.in_flight += 1
        try:
            response_topic = getattr(props, "ResponseTopic", None) if props else None
            parsed = parse_request(
                session.project,
                bytes(msg.payload),
                response_topic=response_topic,
                max_payload_bytes=self.tuning.max_payload_bytes,
                max_message_chars=self.tuning.max_message_chars,
            )
            if isinstance(parsed, Rejection):
                self.replies.reject(inbound, parsed.routing, parsed.code, parsed.message)
                return
            self._accept(inbound, parsed)
        except Exception as err:  # never let one message stop the bridge or hold its slot
            log.exception("failed to handle a message of project %s", session.project)
            self.replies.drop(inbound, ErrorCode.INTERNAL_ERROR.value, f"internal error: {err!r}")

    def _accept(self, inbound: Inbound, parsed: Accepted) -> None:
        request, routing = parsed.request, parsed.routing
        cfg = self.projects[inbound.project]
        if self._debug:
            log.debug(
                "request %s/%s: %s",
                inbound.project,
                request.sessionId,
                names.printable(request.message),
            )
        if self.shared is not None:
            self._spawn(self._accept_shared(inbound, parsed, self.shared))
            return
        dedupe_key = _dedupe_key(inbound, parsed)
        if dedupe_key is not None:
            print_ = fingerprint(request)
            entry = self.dedupe.begin(dedupe_key, print_)
            if entry is not None:
                if self.dedupe.conflicts(entry, print_):
                    self.replies.reject(
                        inbound,
                        routing,
                        ErrorCode.CONFLICT,
                        f"requestId {routing.request_id} was already used in this session for "
                        "another request; use a new requestId for a new request",
                    )
                    return
                self.metrics.duplicates += 1
                self._spawn(self._answer_repeat(inbound, parsed, entry))
                return
        problem = self._check_limits(inbound.project, request, cfg)
        if problem is not None:
            if dedupe_key is not None:
                self.dedupe.finish(dedupe_key, None)
            self.replies.reject(inbound, routing, *problem)
            return
        if request.probe:
            self._spawn(self._probe_local(inbound, parsed, dedupe_key))
            return
        key: SessionKey = (inbound.project, request.sessionId)

        async def job(waited: float) -> None:
            stored = None
            try:
                stored = await self._chat(inbound, parsed, self.sessions.get(key), waited)
            finally:
                if dedupe_key is not None:
                    self.dedupe.finish(dedupe_key, stored)

        self.scheduler.submit(key, job)

    async def _probe_local(
        self, inbound: Inbound, parsed: Accepted, dedupe_key: DedupeKey | None
    ) -> None:
        stored = None
        try:
            stored = await self._run_probe(inbound, parsed)
        finally:
            if dedupe_key is not None:
                self.dedupe.finish(dedupe_key, stored)

    # ---------------------------------------------------------------- replicas
    async def _accept_shared(self, inbound: Inbound, parsed: Accepted, shared: SharedState) -> None:
        """A request with the session state in Redis (deploykit.bridge.shared): de-duplication
        across replicas, then the session's turn (its earlier requests answered, on any replica),
        then an engine slot here; the history is read when the turn comes and written as it ends."""
        request, routing = parsed.request, parsed.routing
        dedupe_key = _dedupe_key(inbound, parsed)
        print_ = fingerprint(request) if dedupe_key is not None else b""
        claimed = False
        try:
            while dedupe_key is not None and not claimed:
                known = await shared.begin(dedupe_key, print_)
                if known is None:
                    claimed = True
                    break
                if known.fingerprint != print_:
                    self.replies.reject(
                        inbound,
                        routing,
                        ErrorCode.CONFLICT,
                        f"requestId {routing.request_id} was already used in this session for "
                        "another request; use a new requestId for a new request",
                    )
                    return
                self.metrics.duplicates += 1
                stored = known.reply or await shared.wait_answered(
                    dedupe_key, self.tuning.request_timeout_s
                )
                if stored is not None:
                    log.info("repeat of request %s answered from Redis", routing.request_id)
                    self.replies.repeat(inbound, routing, stored)
                    return
                # the other attempt was not answered (failed, or its replica died): answer it here
            problem = self._check_limits(inbound.project, request, self.projects[inbound.project])
            if problem is not None:
                self.replies.reject(inbound, routing, *problem)
                return
            if request.probe:
                stored = await self._run_probe(inbound, parsed)  # answered: no other reply
                if dedupe_key is not None:
                    claimed = False
                    with contextlib.suppress(StateUnavailable):
                        await shared.finish(dedupe_key, print_, stored)
                return
            key: SessionKey = (inbound.project, request.sessionId)
            received = time.time() - (
                time.monotonic() - inbound.received
            )  # comparable across replicas
            place = await shared.enqueue(key, received)
            if not await shared.wait_turn(key, place, received, self.tuning.queue_timeout_s):
                await shared.end_turn(key, place, None)
                raise RequestFailed(
                    ErrorCode.OVERLOADED,
                    f"waited {self.tuning.queue_timeout_s:g} s for this session's earlier "
                    "requests; retry later",
                )
            claimed = False  # the job finishes the de-duplication entry from here on
            dedupe = (dedupe_key, print_) if dedupe_key is not None else None
            self.scheduler.submit(
                key,
                lambda waited: self._chat_shared(
                    inbound, parsed, key, place, waited, shared, dedupe
                ),
            )
        except RequestFailed as err:
            self.replies.reject(inbound, routing, err.code, err.message)
        except StateUnavailable as err:
            self.replies.reject(
                inbound,
                routing,
                ErrorCode.STATE_UNAVAILABLE,
                f"the session state shared by the replicas is not reachable ({err}); retry later",
            )
        except Exception as err:
            log.exception("request failed")
            self.replies.drop(inbound, ErrorCode.INTERNAL_ERROR.value, f"internal error: {err!r}")
        finally:
            if claimed and dedupe_key is not None:
                with contextlib.suppress(StateUnavailable):
                    await shared.finish(dedupe_key, print_, None)

    async def _chat_shared(
        self,
        inbound: Inbound,
        parsed: Accepted,
        key: SessionKey,
        place: str,
        waited: float,
        shared: SharedState,
        dedupe: tuple[DedupeKey, bytes] | None,
    ) -> None:
        """One request holding the session's turn and an engine slot; ``dedupe``: its
        de-duplication key and fingerprint, claimed by the caller (None: no requestId)."""
        routing = parsed.routing
        stored: StoredReply | None = None
        history: list[Turn] | None = None
        session: Session | None = None
        recorded = False

        async def record(reply: StoredReply) -> None:
            # before the reply goes out, with the session's new history: if this replica dies
            # once it is published, the broker's redelivery of the request to another replica is
            # answered with it (not generated again) and the session's next turn sees this one.
            # (Without a requestId a redelivery is generated again, so the history waits for the
            # end of the turn: written before, it would hold the request twice.)
            nonlocal recorded
            assert dedupe is not None and session is not None
            try:
                await shared.answered(*dedupe, reply, session.history)
                recorded = True
            except StateUnavailable as err:
                log.warning("could not record request %s in Redis: %s", routing.request_id, err)

        try:
            try:
                before = await shared.load_history(key)
            except StateUnavailable as err:
                self.replies.reject(
                    inbound,
                    routing,
                    ErrorCode.STATE_UNAVAILABLE,
                    f"the session state shared by the replicas is not reachable ({err}); retry later",
                )
                return
            session = Session(key, before)
            stored = await self._chat(
                inbound, parsed, session, waited, record if dedupe is not None else None
            )
            if session.history is not before and not recorded:
                history = session.history
        finally:
            try:
                await shared.end_turn(key, place, history)
                if dedupe is not None and not recorded:
                    await shared.finish(*dedupe, stored)
            except StateUnavailable as err:
                log.warning("could not record request %s in Redis: %s", routing.request_id, err)

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
        if request.probe:
            return None
        bucket = self.buckets.get(project)
        if bucket is not None and not bucket.allow():
            return (
                ErrorCode.RATE_LIMITED,
                f"rate limit of project {project} exceeded "
                f"({cfg.rate_limit_per_minute:g} requests per minute); retry later",
            )
        if self.scheduler.queued(project) >= cfg.max_queued:
            return (
                ErrorCode.RATE_LIMITED,
                f"project {project} already has {cfg.max_queued} requests waiting for the "
                "engine; retry later",
            )
        return None

    async def _answer_repeat(self, inbound: Inbound, parsed: Accepted, entry: Any) -> None:
        try:
            stored = await self.dedupe.wait(entry, self.tuning.request_timeout_s)
            if stored is None:  # the first attempt failed or vanished: answer this one afresh
                self._accept(inbound, parsed)
                return
            log.info("repeat of request %s answered from the cache", parsed.routing.request_id)
            self.replies.repeat(inbound, parsed.routing, stored)
        except Exception as err:
            log.exception("failed to answer a repeated request")
            self.replies.drop(inbound, ErrorCode.INTERNAL_ERROR.value, f"internal error: {err!r}")

    # ---------------------------------------------------------------- generation
    async def _chat(
        self,
        inbound: Inbound,
        parsed: Accepted,
        session: Session,
        waited: float,
        record: Callable[[StoredReply], Awaitable[None]] | None = None,
    ) -> StoredReply | None:
        """One request of a session, holding one engine slot until its reply is published; its
        answer joins ``session.history`` (a new list). Returns the reply to store for repeats;
        ``record`` stores it before it is published."""
        request, routing = parsed.request, parsed.routing
        cfg = self.projects[inbound.project]
        stored: StoredReply | None = None
        try:
            if waited > self.tuning.queue_timeout_s:
                raise RequestFailed(
                    ErrorCode.OVERLOADED,
                    f"waited {waited:.0f} s for the engine (limit {self.tuning.queue_timeout_s:g} "
                    "s); retry later",
                )
            assert self.engine.model is not None
            prompt = await self.prompts.build(
                session.history, request, cfg, self.engine.model.max_model_len
            )
            completion = await asyncio.wait_for(
                self._generate(prompt.messages, prompt.params, request, routing, inbound),
                self.tuning.request_timeout_s,
            )
            self.engine_ok = True
            self.metrics.count_tokens(
                inbound.project, completion.prompt_tokens, completion.completion_tokens
            )
            if completion.reasoned and not completion.text.strip():
                raise RequestFailed(
                    ErrorCode.NO_ANSWER,
                    f"the model spent its {completion.completion_tokens} tokens on reasoning and "
                    "gave no answer; allow more with maxTokens",
                )
            user_tokens = self.prompts.user_tokens_from_usage(prompt, completion.prompt_tokens)
            session.history = [
                *prompt.kept_history,
                Turn("user", request.message, user_tokens),
                Turn("assistant", completion.text, completion.completion_tokens),
            ]
            usage = {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
            }
            payload = ok_payload(routing, completion.text, usage)
            if record is not None:
                ahead = self.replies.stored(routing, payload)
                if ahead is not None:
                    await record(ahead)
            stored = self.replies.send(inbound, routing, payload, is_error=False)
        except RequestFailed as err:
            self.replies.reject(inbound, routing, err.code, err.message)
        except EngineError as err:
            self.replies.reject(inbound, routing, *self._engine_error(err))
        except TimeoutError:
            self.replies.reject(
                inbound,
                routing,
                ErrorCode.TIMEOUT,
                f"no answer from the engine within {self.tuning.request_timeout_s:g} s",
            )
        except Exception as err:
            log.exception("request failed")
            self.replies.reject(
                inbound, routing, ErrorCode.INTERNAL_ERROR, f"internal error: {err!r}"
            )
        return stored

    def _engine_error(self, err: EngineError) -> tuple[ErrorCode, str]:
        if err.overloaded:
            return ErrorCode.OVERLOADED, f"the engine is overloaded: {err}; retry later"
        if err.status == 504:
            return ErrorCode.TIMEOUT, str(err)
        if err.unavailable:
            self.engine_ok = False
            return ErrorCode.ENGINE_UNAVAILABLE, str(err)
        if err.status == 400 and "context length" in str(err).lower():
            # the engine's own count disagreed with ours (vllm/renderers/params.py:
            # "This model's maximum context length is ..."): the message is too long
            return ErrorCode.MESSAGE_TOO_LONG, str(err)
        return ErrorCode.ENGINE_ERROR, str(err)

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
        props = publish_properties(correlation=inbound.correlation)
        pending: list[str] = []
        seq = 0
        last = float("-inf")  # the first text goes out at once (time to first token)
        final: Completion | None = None
        first: float | None = None
        async for item in self.engine.chat_stream(
            messages, params, tokens_per_event=self.pacer.tokens_per_event()
        ):
            if isinstance(item, Completion):
                final = item
                break
            pending.append(item)
            now = time.monotonic()
            if first is None:
                first = now
            if now - last >= self.tuning.stream_interval_s:
                payload = stream_payload(routing, seq, "".join(pending))
                inbound.session.publish_part(topic, payload, properties=props)
                seq += 1
                pending.clear()
                last = now
        if pending:
            payload = stream_payload(routing, seq, "".join(pending))
            inbound.session.publish_part(topic, payload, properties=props)
        if final is None:
            raise EngineError("the engine's stream ended early", 502)
        if first is not None:
            self.pacer.observe(final.completion_tokens - 1, time.monotonic() - first)
        return final

    async def _run_probe(self, inbound: Inbound, parsed: Accepted) -> StoredReply | None:
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
            stored = self.replies.send(inbound, routing, payload, is_error=False)
        except (EngineError, TimeoutError) as err:
            self.engine_ok = False
            self.replies.reject(
                inbound, routing, ErrorCode.ENGINE_UNAVAILABLE, f"engine probe failed: {err}"
            )
        except Exception as err:
            log.exception("probe failed")
            self.replies.reject(
                inbound, routing, ErrorCode.INTERNAL_ERROR, f"internal error: {err!r}"
            )
        return stored

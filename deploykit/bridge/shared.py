"""Session state the bridge's replicas share, in Redis: history, per-session order and
de-duplication by requestId. Used only with more than one replica: one bridge keeps all of it in
its own memory (``sessions``, ``scheduler``, ``limits``) and never talks to Redis.

A shared subscription hands each request of a session to any replica (the topic carries no
session), so what one bridge keeps in memory moves here:

- **Order: a queue per session**, by the time each replica received the request (``enqueue``).
  A request starts once it is the oldest in its session's queue and at least ``order_window_s``
  old (``wait_turn``; an earlier request that reached another replica first but Redis later
  still gets in front), and only then asks for an engine slot, so no slot is held while waiting.
  Leaving the queue (``end_turn``) writes the new history in the same atomic script. Every entry
  has a lease its replica renews; an entry whose lease is gone (its replica died) is dropped, so
  a dead replica holds a session up for one lease at most. Replicas on several hosts order by
  their clocks: keep them in sync (NTP), and the window above the clocks' difference.
- **History**: one JSON value per session, read when its turn comes and written when it ends
  (for a request with a requestId, together with its reply before that is published:
  ``answered``); it expires after ``session_idle_s`` without use, as in one bridge.
- **De-duplication**: one entry per (project, sessionId, requestId) with the request's
  fingerprint: pending (with a lease, so a retry is not held up by a replica that died answering
  it) and then done with the reply, kept for ``dedupe_ttl_s``. A repeat waits for a pending entry
  and gets the stored reply; another request under the same id is a conflict.

What is lost with Redis: if it restarts with its append-only file, the last second of writes; if
its data is gone, every session's history (conversations go on without their earlier turns) and
the de-duplication entries (a repeat of an answered request is generated again). While it is
unreachable, requests are answered with the retryable ``state_unavailable`` error; nothing is
lost for clients that retry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from deploykit.bridge.limits import StoredReply
from deploykit.bridge.sessions import SessionKey, Turn

log = logging.getLogger("deploykit.bridge")

DedupeKey = tuple[str, str, str]  # (project, sessionId, requestId)

# The session's queue: a sorted set of its requests by receipt time (epoch microseconds at the
# replica that received each), each with a lease its replica renews.
# _TAKE: KEYS[1] queue, KEYS[2] lease prefix; ARGV: score, member, lease ms, idle ms, owner.
_TAKE = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2] .. ARGV[2], ARGV[5], 'PX', ARGV[3])
return 1
"""

# _TURN: KEYS as _TAKE; ARGV[1] the caller's member. 1: first in the queue, 0: not yet, 2: the
# member is gone (Redis lost it: go ahead). Requests whose lease is gone (their replica died)
# leave the queue.
_TURN = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 2
end
while true do
  local first = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if first == ARGV[1] then
    return 1
  end
  if redis.call('EXISTS', KEYS[2] .. first) == 1 then
    return 0
  end
  redis.call('ZREM', KEYS[1], first)
end
"""

# _END: KEYS[1] queue, KEYS[2] lease prefix, KEYS[3] history; ARGV: member, history JSON ('' keeps
# it), idle ms. Writes the history and leaves the queue, in one step.
_END = """
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2] .. ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""


class StateUnavailable(Exception):
    """Redis did not answer (or answered with an error)."""


@dataclass(frozen=True)
class Known:
    """What the de-duplication store holds for a requestId: its fingerprint, and the reply once
    it was answered."""

    fingerprint: bytes
    reply: StoredReply | None


def _session_prefix(key: SessionKey) -> str:
    # project names and sessionIds never hold '/', so "project/session" names one session
    return f"dk:{{{key[0]}/{key[1]}}}"


def _encode_history(history: list[Turn]) -> bytes:
    return orjson.dumps([(t.role, t.content, t.tokens) for t in history])


def _encode_entry(fingerprint: bytes, reply: StoredReply | None) -> bytes:
    body: dict[str, Any] = {"fp": fingerprint.hex()}
    if reply is not None:
        body["reply"] = {
            "topic": reply.topic,
            "payload": base64.b64encode(reply.payload).decode(),
            "props": reply.user_properties,
        }
    return orjson.dumps(body)


def _decode_entry(raw: bytes) -> Known:
    body = orjson.loads(raw)
    reply = body.get("reply")
    stored = None
    if reply is not None:
        stored = StoredReply(
            reply["topic"],
            base64.b64decode(reply["payload"]),
            [(str(k), str(v)) for k, v in reply["props"]],
        )
    return Known(bytes.fromhex(body["fp"]), stored)


class SharedState:
    """The shared session state of one replica (``owner``), on one Redis."""

    def __init__(
        self,
        url: str,
        password: str | None,
        *,
        owner: str,
        session_idle_s: float,
        dedupe_ttl_s: float,
        lease_s: float = 15.0,
        order_window_s: float = 0.05,
    ) -> None:
        import redis.asyncio as aioredis  # only replicas need it
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self.owner = owner
        self.idle_ms = int(session_idle_s * 1000)
        self.ttl_ms = int(dedupe_ttl_s * 1000)
        self.lease_s = lease_s
        self.lease_ms = int(lease_s * 1000)
        self.order_window_s = order_window_s
        self._redis = aioredis.Redis.from_url(
            url,
            password=password,
            socket_timeout=5.0,
            socket_connect_timeout=5.0,
            health_check_interval=15,
            # a pooled connection that Redis closed (it restarted) is retried on a new one
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._take = self._redis.register_script(_TAKE)
        self._turn = self._redis.register_script(_TURN)
        self._end = self._redis.register_script(_END)
        #: leases this replica renews: its requests in session queues, its pending requestIds
        self._held: dict[str, int] = {}
        self._renewer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Check that Redis answers, and start renewing this replica's leases."""
        await self._call(self._redis.ping())
        self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self._redis.aclose()

    async def ping(self) -> bool:
        try:
            await self._call(self._redis.ping())
            return True
        except StateUnavailable:
            return False

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            if not self._held:
                continue
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for name, ms in list(self._held.items()):
                        pipe.pexpire(name, ms)
                    await pipe.execute()
            except Exception as err:  # Redis away for a moment: the next round tries again
                log.warning("could not renew %d leases in Redis: %s", len(self._held), err)

    async def _call(self, awaitable: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await awaitable
        except (RedisError, OSError) as err:
            raise StateUnavailable(str(err) or type(err).__name__) from err

    # ------------------------------------------------------------------ de-duplication
    def _dedupe_name(self, key: DedupeKey) -> str:
        return f"{_session_prefix((key[0], key[1]))}:req:{key[2]}"

    async def begin(self, key: DedupeKey, fingerprint: bytes) -> Known | None:
        """Claim a requestId for this replica (None), or what is known of it already."""
        name = self._dedupe_name(key)
        raw = await self._call(
            self._redis.set(
                name, _encode_entry(fingerprint, None), px=self.lease_ms, nx=True, get=True
            )
        )
        if raw is None:
            self._held[name] = self.lease_ms
            return None
        return _decode_entry(raw)

    async def finish(self, key: DedupeKey, fingerprint: bytes, reply: StoredReply | None) -> None:
        """Store the reply (None: forget the requestId: it was not answered)."""
        name = self._dedupe_name(key)
        self._held.pop(name, None)
        if reply is None:
            await self._call(self._redis.delete(name))
        else:
            await self._call(
                self._redis.set(name, _encode_entry(fingerprint, reply), px=self.ttl_ms)
            )

    async def answered(
        self, key: DedupeKey, fingerprint: bytes, reply: StoredReply, history: list[Turn]
    ) -> None:
        """Store the reply and the session's new history in one step, before the reply is
        published: a replica that dies once it went out leaves both, so the broker's redelivery
        of the request to another replica is answered with this reply (not generated again) and
        the session's next request sees this turn. The turn itself ends later (``end_turn``)."""
        name = self._dedupe_name(key)
        self._held.pop(name, None)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(name, _encode_entry(fingerprint, reply), px=self.ttl_ms)
            pipe.set(
                f"{_session_prefix((key[0], key[1]))}:history",
                _encode_history(history),
                px=self.idle_ms,
            )
            await self._call(pipe.execute())

    async def wait_answered(self, key: DedupeKey, timeout_s: float) -> StoredReply | None:
        """Wait for another attempt of this requestId to be answered: its reply, or None when it
        was not answered (its replica failed it, or died) or not within ``timeout_s``."""
        name = self._dedupe_name(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pause = 0.02
        while loop.time() < deadline:
            raw = await self._call(self._redis.get(name))
            if raw is None:
                return None
            known = _decode_entry(raw)
            if known.reply is not None:
                return known.reply
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)
        return None

    # ------------------------------------------------------------------ order and history
    async def enqueue(self, key: SessionKey, received: float) -> str:
        """Put a request received at ``received`` (epoch seconds, at this replica) in its
        session's queue; returns its place's name for ``wait_turn`` and ``end_turn``."""
        prefix = _session_prefix(key)
        member = f"{self.owner}:{uuid.uuid4().hex[:16]}"
        await self._call(
            self._take(
                keys=[f"{prefix}:queue", f"{prefix}:lease:"],
                args=[int(received * 1e6), member, self.lease_ms, self.idle_ms, self.owner],
            )
        )
        self._held[f"{prefix}:lease:{member}"] = self.lease_ms
        return member

    async def wait_turn(
        self, key: SessionKey, member: str, received: float, timeout_s: float
    ) -> bool:
        """Wait until the request is the session's oldest (its earlier requests answered, on any
        replica) and at least ``order_window_s`` old, so that an earlier request still on its
        way into the queue from another replica is not overtaken; False after ``timeout_s``."""
        prefix = _session_prefix(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pause = 0.01
        while True:
            state = int(
                await self._call(
                    self._turn(keys=[f"{prefix}:queue", f"{prefix}:lease:"], args=[member])
                )
            )
            if state == 2:
                return True
            if state == 1:
                settle = received + self.order_window_s - time.time()
                if settle <= 0:
                    return True
                await asyncio.sleep(settle)  # then look again: someone may have come in before
                continue
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    async def load_history(self, key: SessionKey) -> list[Turn]:
        raw = await self._call(self._redis.get(f"{_session_prefix(key)}:history"))
        if raw is None:
            return []
        return [Turn(role, content, tokens) for role, content, tokens in orjson.loads(raw)]

    async def end_turn(self, key: SessionKey, member: str, history: list[Turn] | None) -> None:
        """Leave the session's queue (its next request may start), with the new history (None:
        unchanged)."""
        prefix = _session_prefix(key)
        lease = f"{prefix}:lease:{member}"
        text = b"" if history is None else _encode_history(history)
        try:
            await self._call(
                self._end(
                    keys=[f"{prefix}:queue", f"{prefix}:lease:", f"{prefix}:history"],
                    args=[member, text, self.idle_ms],
                )
            )
        finally:
            self._held.pop(lease, None)  # unrenewed, its lease ends the turn even if this failed

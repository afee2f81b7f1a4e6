"""The session state replicas share (deploykit.bridge.shared) against a real redis-server: a
session's queue keeps the order of receipt across replicas, a dead replica's place is dropped once
its lease is gone, history round-trips, de-duplication claims, waits and conflicts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from deploykit.bridge.limits import StoredReply
from deploykit.bridge.sessions import Turn
from deploykit.bridge.shared import SharedState, StateUnavailable

from .conftest import Redis

KEY = ("general", "s-1")


def run(
    redis_server: Redis, body: Callable[..., Awaitable[Any]], replicas: int = 2, **kw: Any
) -> Any:
    async def main() -> Any:
        states = [
            SharedState(
                redis_server.url,
                redis_server.password,
                owner=f"bridge-{i + 1}",
                session_idle_s=60,
                dedupe_ttl_s=60,
                **kw,
            )
            for i in range(replicas)
        ]
        for s in states:
            await s.start()
        try:
            return await body(*states)
        finally:
            for s in states:
                await s.aclose()

    return asyncio.run(main())


def test_a_session_is_served_in_order_of_receipt_across_replicas(redis_server: Redis) -> None:
    async def body(a: SharedState, b: SharedState) -> list[int]:
        done: list[int] = []
        now = time.time()
        # received in the order 0..5, alternately at a and b, but queued in reverse order: the
        # time of receipt decides, not who reached Redis first
        places = {}
        for i in reversed(range(6)):
            state = a if i % 2 == 0 else b
            places[i] = (state, await state.enqueue(KEY, now + i * 0.001))

        async def one(i: int) -> None:
            state, place = places[i]
            assert await state.wait_turn(KEY, place, now + i * 0.001, 10)
            history = await state.load_history(KEY)
            assert len(history) == i  # every earlier turn was written before this one ran
            await asyncio.sleep(0.01)
            done.append(i)
            await state.end_turn(KEY, place, [*history, Turn("user", f"m{i}", 1)])

        await asyncio.gather(*(one(i) for i in reversed(range(6))))
        return done

    assert run(redis_server, body) == list(range(6))


def test_a_request_waits_the_order_window_for_earlier_ones(redis_server: Redis) -> None:
    """The oldest request still waits until it is order_window_s old: an earlier request that
    another replica received first but queues later gets in front of it."""

    async def body(a: SharedState, b: SharedState) -> list[str]:
        now = time.time()
        order: list[str] = []
        late = await a.enqueue(KEY, now + 0.010)  # received second, queued first

        async def first_received() -> None:
            await asyncio.sleep(0.1)  # b is slow to reach Redis
            place = await b.enqueue(KEY, now)
            assert await b.wait_turn(KEY, place, now, 10)
            order.append("first")
            await b.end_turn(KEY, place, None)

        async def second_received() -> None:
            assert await a.wait_turn(KEY, late, now + 0.010, 10)
            order.append("second")
            await a.end_turn(KEY, late, None)

        await asyncio.gather(first_received(), second_received())
        return order

    assert run(redis_server, body, order_window_s=0.5) == ["first", "second"]


def test_a_dead_replicas_request_leaves_the_queue_after_its_lease(redis_server: Redis) -> None:
    async def body(a: SharedState, b: SharedState) -> tuple[bool, bool, float]:
        now = time.time()
        await a.enqueue(KEY, now)
        second = await b.enqueue(KEY, now + 0.001)
        early = await b.wait_turn(KEY, second, now + 0.001, 0.3)  # a holds the turn, alive
        await a.aclose()  # a dies: it renews nothing any more
        loop = asyncio.get_running_loop()
        started = loop.time()
        late = await b.wait_turn(KEY, second, now + 0.001, 10)
        return early, late, loop.time() - started

    early, late, waited = run(redis_server, body, lease_s=1.0)
    assert not early
    assert late and waited <= 3.0, waited


def test_a_held_place_is_renewed_past_its_lease(redis_server: Redis) -> None:
    async def body(a: SharedState, b: SharedState) -> bool:
        now = time.time()
        await a.enqueue(KEY, now)
        second = await b.enqueue(KEY, now + 0.001)
        return await b.wait_turn(KEY, second, now + 0.001, 3.0)  # three leases: a renews its own

    assert run(redis_server, body, lease_s=1.0) is False


def test_history_round_trips_and_none_keeps_it(redis_server: Redis) -> None:
    async def body(a: SharedState, b: SharedState) -> list[Turn]:
        place = await a.enqueue(KEY, time.time())
        assert await a.wait_turn(KEY, place, 0, 5)
        turns = [Turn("user", "héllo\nthere", 3), Turn("assistant", "", 0)]
        await a.end_turn(KEY, place, turns)
        place = await b.enqueue(KEY, time.time())
        assert await b.wait_turn(KEY, place, 0, 5)
        await b.end_turn(KEY, place, None)  # a failed request leaves the history as it was
        return await b.load_history(KEY)

    assert run(redis_server, body) == [Turn("user", "héllo\nthere", 3), Turn("assistant", "", 0)]


def test_dedupe_claims_waits_and_conflicts(redis_server: Redis) -> None:
    key = ("general", "s-1", "r-1")
    reply = StoredReply("general/out", b'{"text": "x"}', [("status", "ok")])

    async def body(a: SharedState, b: SharedState) -> None:
        assert await a.begin(key, b"fp") is None  # a claims it
        known = await b.begin(key, b"fp")
        assert known is not None and known.reply is None and known.fingerprint == b"fp"
        waiting = asyncio.ensure_future(b.wait_answered(key, 5))
        await asyncio.sleep(0.1)
        await a.finish(key, b"fp", reply)
        assert await waiting == reply
        other = await b.begin(key, b"other")
        assert other is not None and other.fingerprint == b"fp"  # the caller calls it a conflict
        # an unanswered attempt is forgotten, so a retry answers it afresh
        key2 = ("general", "s-1", "r-2")
        assert await a.begin(key2, b"fp") is None
        waiting = asyncio.ensure_future(b.wait_answered(key2, 5))
        await a.finish(key2, b"fp", None)
        assert await waiting is None
        assert await b.begin(key2, b"fp") is None

    run(redis_server, body)


def test_answered_stores_the_reply_and_the_history_before_the_turn_ends(
    redis_server: Redis,
) -> None:
    """What a replica records before it publishes a reply: another replica finds both the reply
    (for the broker's redelivery) and the new history, while the turn is still held (the
    session's next request waits for ``end_turn``), and ``end_turn(None)`` keeps that history."""
    key = ("general", "s-1", "r-7")
    reply = StoredReply("general/out", b'{"text": "hi"}', [("status", "ok"), ("requestId", "r-7")])
    turns = [Turn("user", "hello", 2), Turn("assistant", "hi", 1)]

    async def body(a: SharedState, b: SharedState) -> None:
        assert await a.begin(key, b"fp") is None
        place = await a.enqueue(KEY, time.time())
        assert await a.wait_turn(KEY, place, 0, 5)
        await a.answered(key, b"fp", reply, turns)
        # as seen by another replica, had this one died right after publishing
        known = await b.begin(key, b"fp")
        assert known is not None and known.reply == reply
        assert await b.wait_answered(key, 1) == reply
        assert await b.load_history(KEY) == turns
        later = await b.enqueue(KEY, time.time())
        assert not await b.wait_turn(KEY, later, 0, 0.3)  # a's turn is not over yet
        await a.end_turn(KEY, place, None)
        assert await b.wait_turn(KEY, later, 0, 5)
        assert await b.load_history(KEY) == turns
        await b.end_turn(KEY, later, None)

    run(redis_server, body)


def test_a_dead_replicas_claim_expires(redis_server: Redis) -> None:
    key = ("general", "s-1", "r-9")

    async def body(a: SharedState, b: SharedState) -> Any:
        assert await a.begin(key, b"fp") is None
        await a.aclose()
        return await b.wait_answered(key, 5)  # None once the claim's lease ran out

    assert run(redis_server, body, lease_s=1.0) is None


def test_redis_away_is_state_unavailable(redis_server: Redis) -> None:
    async def body(a: SharedState) -> None:
        redis_server.stop()
        with pytest.raises(StateUnavailable):
            await a.enqueue(KEY, time.time())
        assert not await a.ping()
        redis_server.start()
        assert await a.ping()
        place = await a.enqueue(KEY, time.time())
        assert await a.wait_turn(KEY, place, 0, 5)

    run(redis_server, body, replicas=1)

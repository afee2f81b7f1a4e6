"""Rate limits per project (token bucket) and the de-duplication cache by requestId.

De-duplication keys on (project, sessionId, requestId): a requestId is the client's name for one
request of one session, so another session that happens to reuse it gets its own answer, never the
first session's. The entry also holds a fingerprint of what was asked; the same key with another
fingerprint is a ``conflict`` (a client bug), not a repeat."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class TokenBucket:
    """``rate_per_minute`` requests per minute on average, bursts up to ``burst``."""

    def __init__(
        self,
        rate_per_minute: float,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate_per_minute / 60.0
        self.capacity = float(burst if burst is not None else max(1, int(rate_per_minute)))
        self._tokens = self.capacity
        self._clock = clock
        self._last = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass
class StoredReply:
    """A reply that can be published again for a repeated requestId."""

    topic: str
    payload: bytes
    user_properties: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Entry:
    created: float
    fingerprint: bytes = b""
    reply: StoredReply | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class DedupeCache:
    """Bounded (entries) and time-limited (TTL) map (project, requestId) -> reply. A request that is
    still being answered is an entry without reply; a repeat waits for it (``wait``)."""

    def __init__(
        self,
        *,
        ttl_s: float = 600.0,
        max_entries: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Any, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _prune(self) -> None:
        """Drop expired entries, and the oldest answered ones beyond ``max_entries``. Entries are
        in creation order, so this looks only at the oldest few (no copy of the map per call)."""
        now = self._clock()
        skipped: list[Any] = []  # pending entries over the bound: kept until they expire
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            expired = now - entry.created > self.ttl_s
            over = len(self._entries) + len(skipped) > self.max_entries
            if not expired and not over:
                break
            self._entries.pop(key)
            if not expired and entry.reply is None:
                skipped.append((key, entry))
            if len(skipped) > 64:  # many pending entries: stop looking, keep them
                break
        for key, entry in reversed(skipped):  # back in front, in their order
            self._entries[key] = entry
            self._entries.move_to_end(key, last=False)

    def begin(self, key: Any, fingerprint: bytes = b"") -> _Entry | None:
        """Register a new request. Returns the existing entry when the key is known (a repeat, or
        a conflict when its ``fingerprint`` differs: see ``conflicts``)."""
        self._prune()
        entry = self._entries.get(key)
        if entry is not None and self._clock() - entry.created <= self.ttl_s:
            return entry
        self._entries[key] = _Entry(self._clock(), fingerprint)
        return None

    @staticmethod
    def conflicts(entry: _Entry, fingerprint: bytes) -> bool:
        return entry.fingerprint != fingerprint

    def finish(self, key: Any, reply: StoredReply | None) -> None:
        """Store the reply (None: forget the key, e.g. the request could not be answered)."""
        entry = self._entries.get(key)
        if entry is None:
            return
        if reply is None:
            del self._entries[key]
        else:
            entry.reply = reply
        entry.done.set()

    async def wait(self, entry: _Entry, timeout_s: float) -> StoredReply | None:
        try:
            await asyncio.wait_for(entry.done.wait(), timeout_s)
        except TimeoutError:
            return None
        return entry.reply

"""Conversation state per (project, sessionId): history trimmed by tokens, idle expiry that never
touches a session with work (the order of a session's requests is the scheduler's)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

SessionKey = tuple[str, str]  # (project, sessionId)


@dataclass(frozen=True)
class Turn:
    """One message of the history and its token count (content only, without template tokens)."""

    role: str
    content: str
    tokens: int


class PromptTooLong(Exception):
    """The new message (with the system prompt) does not fit the model's context."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(f"needs {needed} prompt tokens; at most {budget} fit")
        self.needed = needed
        self.budget = budget


@dataclass(frozen=True)
class TrimResult:
    history: list[Turn]
    prompt_tokens: int  # estimated prompt size of system + kept history + new message
    dropped: int  # number of history messages left out


def trim_history(
    history: list[Turn],
    *,
    new_tokens: int,
    system_tokens: int | None,
    base_overhead: int,
    per_message_overhead: int,
    max_history_tokens: int,
    budget: int,
) -> TrimResult:
    """Keep the newest whole exchanges of ``history`` such that

    - the history (content + template tokens per message) stays within ``max_history_tokens``, and
    - the whole prompt (template base + system prompt + history + new message) stays within
      ``budget`` (= max_model_len - max_tokens).

    Raises ``PromptTooLong`` when the system prompt and the new message alone exceed the budget.
    The history alternates user/assistant; it is cut only at the start of a user message, so the
    kept part always begins with a user message.
    """
    fixed = base_overhead + new_tokens + per_message_overhead
    if system_tokens is not None:
        fixed += system_tokens + per_message_overhead
    if fixed > budget:
        raise PromptTooLong(fixed, budget)
    room = min(max_history_tokens, budget - fixed)
    used = 0
    start = len(history)
    i = len(history)
    while i > 0:
        # the exchange that starts at the last user message before i
        j = i - 1
        while j > 0 and history[j].role != "user":
            j -= 1
        cost = sum(t.tokens + per_message_overhead for t in history[j:i])
        if used + cost > room:
            break
        used += cost
        start = j
        i = j
    kept = history[start:]
    return TrimResult(kept, fixed + used, start)


@dataclass
class Session:
    key: SessionKey
    history: list[Turn] = field(default_factory=list)
    last_active: float = field(default_factory=time.monotonic)


class SessionStore:
    """The history of each session. Sessions idle for ``idle_s`` expire; beyond ``max_sessions``
    the least recently used go first. A session the scheduler still has work for (``busy``) is
    never dropped."""

    def __init__(
        self,
        *,
        idle_s: float = 1800.0,
        max_sessions: int = 10000,
        busy: Callable[[SessionKey], bool] = lambda key: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions: OrderedDict[SessionKey, Session] = OrderedDict()
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self._busy = busy
        self._clock = clock

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: SessionKey) -> Session:
        session = self._sessions.get(key)
        if session is None:
            session = Session(key, last_active=self._clock())
            self._sessions[key] = session
            self._evict_over_limit()
        else:
            session.last_active = self._clock()
            self._sessions.move_to_end(key)
        return session

    def peek(self, key: SessionKey) -> Session | None:
        return self._sessions.get(key)

    def expire(self) -> int:
        """Drop sessions idle for longer than ``idle_s``. Returns how many went."""
        now = self._clock()
        stale = [
            k
            for k, s in self._sessions.items()
            if now - s.last_active > self.idle_s and not self._busy(k)
        ]
        for key in stale:
            del self._sessions[key]
        return len(stale)

    def _evict_over_limit(self) -> None:
        """Drop the least recently used sessions beyond ``max_sessions``, busy ones aside (they
        move to the back). Looks only at the oldest few, never copies the map."""
        busy_seen = 0
        while len(self._sessions) > self.max_sessions and busy_seen < len(self._sessions):
            key = next(iter(self._sessions))
            if self._busy(key):
                self._sessions.move_to_end(key)
                busy_seen += 1
            else:
                del self._sessions[key]

"""Conversation state per (project, sessionId): history trimmed by tokens, strict arrival order
within a session, concurrency across sessions, idle expiry that never touches a busy session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SessionKey = tuple[str, str]  # (project, sessionId)
Job = Callable[[], Awaitable[None]]


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
    queue: deque[Job] = field(default_factory=deque)
    busy: bool = False
    last_active: float = field(default_factory=time.monotonic)

    @property
    def idle(self) -> bool:
        return not self.busy and not self.queue


class SessionStore:
    """Sessions with a FIFO of jobs each. ``submit`` runs a session's jobs one after another in
    arrival order; different sessions run concurrently. Idle sessions expire after ``idle_s``;
    when more than ``max_sessions`` exist the least recently used idle ones go first. A session
    with queued or running work is never evicted."""

    def __init__(
        self,
        *,
        idle_s: float = 1800.0,
        max_sessions: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions: OrderedDict[SessionKey, Session] = OrderedDict()
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: SessionKey) -> Session:
        session = self._sessions.get(key)
        if session is None:
            session = Session(key, last_active=self._clock())
            self._sessions[key] = session
            self._evict_over_limit()
        else:
            self._sessions.move_to_end(key)
        return session

    def peek(self, key: SessionKey) -> Session | None:
        return self._sessions.get(key)

    def submit(self, key: SessionKey, job: Job) -> None:
        """Queue ``job`` for the session; start its worker when none runs. Call from the loop."""
        session = self.get(key)
        session.queue.append(job)
        if not session.busy:
            session.busy = True
            task = asyncio.get_running_loop().create_task(self._drain(session))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self, session: Session) -> None:
        try:
            while session.queue:
                job = session.queue.popleft()
                try:
                    await job()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a job reports its own errors; never stop the session
                    log.exception("session job failed")
        finally:
            session.busy = False
            session.last_active = self._clock()

    def expire(self) -> int:
        """Drop sessions idle for longer than ``idle_s``. Returns how many went."""
        now = self._clock()
        stale = [
            k for k, s in self._sessions.items() if s.idle and now - s.last_active > self.idle_s
        ]
        for key in stale:
            del self._sessions[key]
        return len(stale)

    def _evict_over_limit(self) -> None:
        if len(self._sessions) <= self.max_sessions:
            return
        for key in list(self._sessions):
            if len(self._sessions) <= self.max_sessions:
                break
            if self._sessions[key].idle:
                del self._sessions[key]

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

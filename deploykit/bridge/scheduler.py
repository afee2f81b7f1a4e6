"""Who gets the next engine slot: fair across projects, fair across the sessions of a project, in
order within a session.

- The engine slots (``slots``: how many requests the bridge keeps at the engine at once) are shared
  by all projects. When a slot frees, the projects with waiting work take turns (round robin), so
  a project that floods the bridge with requests cannot starve another: the other's next request
  gets one of the next few free slots, however many the flood has queued. A project may also be
  capped (``caps``) below the total, which keeps slots free for the others.
- Inside a project the sessions with waiting work take turns the same way.
- A session runs one job at a time, in arrival order (its answers depend on its history).

Pure scheduling on one asyncio loop: jobs are coroutine functions, called with the seconds they
waited for their slot (so a caller can refuse work that waited too long).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SessionKey = tuple[str, str]  # (project, sessionId)
Job = Callable[[float], Awaitable[None]]


@dataclass
class _Session:
    key: SessionKey
    jobs: deque[tuple[float, Job]] = field(default_factory=deque)
    running: bool = False


@dataclass
class _Project:
    name: str
    cap: int
    running: int = 0
    queued: int = 0
    ready: deque[_Session] = field(default_factory=deque)  # sessions whose next job may start


class FairScheduler:
    def __init__(
        self,
        slots: int,
        caps: dict[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = slots
        self.free = slots
        #: The most engine slots held at once since start (a gauge of what the engine batched).
        self.peak_active = 0
        self._caps = dict(caps or {})
        self._clock = clock
        self._projects: dict[str, _Project] = {}
        self._sessions: dict[SessionKey, _Session] = {}
        self._turns: deque[_Project] = deque()  # projects with a ready session
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ queries
    def queued(self, project: str) -> int:
        p = self._projects.get(project)
        return p.queued if p else 0

    def running(self, project: str) -> int:
        p = self._projects.get(project)
        return p.running if p else 0

    def busy(self, key: SessionKey) -> bool:
        """The session has a job running or waiting."""
        return key in self._sessions

    @property
    def active(self) -> int:
        return self.slots - self.free

    # ------------------------------------------------------------------ submitting
    def submit(self, key: SessionKey, job: Job) -> None:
        """Queue ``job`` for the session ``key`` (project, sessionId). Call on the loop."""
        project = self._project(key[0])
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session(key)
        session.jobs.append((self._clock(), job))
        project.queued += 1
        if not session.running and len(session.jobs) == 1:
            self._make_ready(project, session)
        self._dispatch()

    def _project(self, name: str) -> _Project:
        p = self._projects.get(name)
        if p is None:
            p = self._projects[name] = _Project(name, self._caps.get(name, self.slots))
        return p

    def _make_ready(self, project: _Project, session: _Session) -> None:
        project.ready.append(session)
        if len(project.ready) == 1 and project not in self._turns:
            self._turns.append(project)

    def _dispatch(self) -> None:
        skipped = 0  # projects at their cap, passed over in this round
        while self.free > 0 and self._turns and skipped < len(self._turns):
            project = self._turns.popleft()
            if project.running >= project.cap:
                self._turns.append(project)
                skipped += 1
                continue
            skipped = 0
            session = project.ready.popleft()
            if project.ready:
                self._turns.append(project)  # its next session waits for the project's next turn
            queued_at, job = session.jobs.popleft()
            session.running = True
            project.queued -= 1
            project.running += 1
            self.free -= 1
            self.peak_active = max(self.peak_active, self.active)
            task = asyncio.get_running_loop().create_task(
                self._run(project, session, job, self._clock() - queued_at)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, project: _Project, session: _Session, job: Job, waited: float) -> None:
        try:
            await job(waited)
        except asyncio.CancelledError:
            raise
        except Exception:  # a job reports its own errors; the scheduler goes on
            log.exception("a job of session %s/%s failed", *session.key)
        finally:
            self.free += 1
            project.running -= 1
            session.running = False
            if session.jobs:
                self._make_ready(project, session)
            else:
                del self._sessions[session.key]
            if project.ready and project not in self._turns:
                self._turns.append(project)
            self._dispatch()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

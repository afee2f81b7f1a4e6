"""A supervisor of child processes, each in its own process group (session), its output in a log
file: started in order, watched, and stopped in reverse order (SIGTERM to the group, SIGKILL after a
grace period). It signals only the groups it started; a child whose supervisor is killed gets
SIGTERM from the kernel (Linux)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from deploykit.errors import CheckFailed

LOG_MODE = 0o600
#: prctl(2) option: the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1
#: Signals that stop the supervisor (Ctrl-C, kill, a closed terminal).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        """The last lines of the child's log."""
        return tail(self.log, lines)


def tail(log: Path, lines: int = 30) -> str:
    """The last lines of a log file ("" when it cannot be read)."""
    try:
        text = log.read_bytes()[-20000:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Stopped(Exception):
    """A stop signal arrived while waiting."""


class ChildDied(CheckFailed):
    """A child ended while it should have been running."""

    def __init__(self, child: Child) -> None:
        code = child.proc.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        super().__init__(
            f"{child.name} {how}; the last lines of {child.log}:\n{child.tail()}",
            f"see {child.log}; serve stopped everything it had started",
        )
        self.child = child


class Supervisor:
    """Starts children, watches them, stops them. ``stop_requested`` is set by a stop signal once
    :meth:`handle_signals` installed the handlers."""

    def __init__(self, grace_s: float = 30.0, poll_s: float = 0.5) -> None:
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.children: list[Child] = []
        self.stop_requested = threading.Event()
        self.signal_received: int | None = None

    def handle_signals(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            self.signal_received = signum
            self.stop_requested.set()

        for sig in STOP_SIGNALS:
            signal.signal(sig, on_signal)

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path
    ) -> Child:
        """Start ``argv`` in a new session with ``env`` as its whole environment; its output (and
        stderr) goes to ``log`` (owner-only, appended)."""
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, LOG_MODE)
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=functools.partial(_term_with_parent, os.getpid()),
            )
        finally:
            os.close(fd)
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def dead(self) -> Child | None:
        """The first child that has ended, if any."""
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``ready`` until it holds; a child that ends raises :class:`ChildDied`, a stop
        signal :class:`Stopped`, the timeout ``CheckFailed`` naming ``what``."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.stop_requested.is_set():
                raise Stopped
            gone = self.dead()
            if gone is not None:
                raise ChildDied(gone)
            if ready():
                return
            if time.monotonic() >= deadline:
                raise CheckFailed(
                    f"{what} did not come up within {timeout_s:.0f} s",
                    "see the logs folder; allow longer with --timeout",
                )
            self.stop_requested.wait(self.poll_s)

    def watch(self) -> Child | None:
        """Block until a stop signal (None) or until a child ends (that child)."""
        while not self.stop_requested.is_set():
            gone = self.dead()
            if gone is not None:
                return gone
            self.stop_requested.wait(self.poll_s)
        return None

    def stop_all(self) -> None:
        """Stop every child's process group, last started first: SIGTERM, then SIGKILL to what is
        left of the group after the grace period."""
        for child in reversed(self.children):
            self._stop(child)

    def _stop(self, child: Child) -> None:
        pgid = child.pid  # each child leads its own session and process group
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if child.proc.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.2)
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(10)


def _term_with_parent(parent: int) -> None:
    """In the child before it runs its program: SIGTERM when the supervisor dies, even of SIGKILL
    (Linux's PR_SET_PDEATHSIG), so a killed serve leaves no server behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

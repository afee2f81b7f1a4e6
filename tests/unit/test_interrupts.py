"""deploykit.interrupts.held: SIGINT and SIGTERM wait for a step (creating a helper container or a
child process) and land when it ends, with the handlers from before. Real signals to this process."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import pytest

from deploykit import interrupts


@pytest.fixture(autouse=True)
def ctrl_c_raises() -> object:
    """SIGINT as in a terminal (a background job would inherit it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_the_step_lands_when_it_ends() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt), interrupts.held():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("after the signal")  # the step goes on
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nothing_is_raised_without_a_signal() -> None:
    with interrupts.held():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_goes_to_the_handler_from_before_once_the_step_ends() -> None:
    seen: list[str] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        seen.append(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with interrupts.held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []
        assert seen == ["SIGTERM"]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_the_step_runs_as_it_is() -> None:
    handlers: list[object] = []

    def step() -> None:
        with interrupts.held():
            handlers.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=step)
    thread.start()
    thread.join()
    assert handlers == [signal.default_int_handler]

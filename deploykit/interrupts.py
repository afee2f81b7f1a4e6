"""Ctrl-C (SIGINT) and SIGTERM that wait for a step to finish.

A step that creates something the command must clean up when it is interrupted (a helper container,
a child process) runs with the signals held, so an interrupt lands once the command holds the new
thing's handle, inside the code that cleans it up; before, an interrupt during the creation left a
helper container behind (seen once in CI: `bench` stopped with Ctrl-C while its helper was being
created). Outside such a step the signals act as before. Python runs signal handlers in the main
thread only, so elsewhere the step runs as it is.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Run the block with SIGINT and SIGTERM held; one that came meanwhile is raised again when
    the block ends, with the handlers from before (Ctrl-C: KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in HELD}
    for sig in HELD:
        signal.signal(sig, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])

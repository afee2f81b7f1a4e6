"""How many tokens the bridge asks the engine to put in each streamed event.

Every event the engine streams costs the bridge one wake-up (~160 µs of CPU on the machines
measured, benchmarks/RESULTS.md), whatever it carries, while stream parts go out to clients at most
once per ``stream_interval_s``. Events that come faster than that interval cost CPU and add nothing
a client sees. So the bridge paces them: from the token rate of the streams it has finished (tokens
per second of one request, after its first token) it asks for about as many tokens per event as
arrive in one publishing interval, never fewer than ``floor`` (which bounds the events of a request
when the engine is slow) nor more than ``ceiling``. Before the first finished stream it asks for
``floor``.

The engine gets the figure as the request's ``stream_interval`` (vllm/sampling_params.py: the
first and the final output are always sent at once, so time to first token does not change).
"""

from __future__ import annotations

import math

#: The weight of the newest finished stream in the rate estimate.
WEIGHT = 0.2


class EventPacer:
    def __init__(self, interval_s: float, floor: int, ceiling: int = 64) -> None:
        if not 1 <= floor <= ceiling:
            raise ValueError(f"need 1 <= floor <= ceiling, got {floor} and {ceiling}")
        self.interval_s = interval_s
        self.floor = floor
        self.ceiling = ceiling
        self.rate: float | None = None  # tokens per second of one stream, smoothed

    def tokens_per_event(self) -> int:
        if self.rate is None:
            return self.floor
        return max(self.floor, min(self.ceiling, math.floor(self.rate * self.interval_s)))

    def observe(self, tokens: int, seconds: float) -> None:
        """One finished stream: ``tokens`` generated after its first, in ``seconds``."""
        if tokens < 1 or seconds <= 0:
            return
        rate = tokens / seconds
        self.rate = rate if self.rate is None else self.rate + WEIGHT * (rate - self.rate)


class FixedPacer(EventPacer):
    """A fixed number of tokens per event (``engine_stream_tokens: N``)."""

    def __init__(self, tokens: int) -> None:
        super().__init__(0.0, tokens, tokens)

    def observe(self, tokens: int, seconds: float) -> None:
        return None


#: The fewest tokens per event that ``auto`` asks for.
AUTO_FLOOR = 4


def engine_floor(setting: int | str) -> int:
    """Tokens per event to ask of an engine that cannot be asked per request (vLLM before
    matrix.VLLM_REQUEST_STREAM_INTERVAL, through its server-wide ``--stream-interval``): what the
    setting asks at least."""
    return AUTO_FLOOR if setting == "auto" else int(setting)


def pacer_for(setting: int | str, interval_s: float) -> EventPacer:
    """The pacer the ``engine_stream_tokens`` setting names: ``auto`` or a fixed number."""
    if setting == "auto":
        return EventPacer(interval_s, AUTO_FLOOR)
    return FixedPacer(int(setting))

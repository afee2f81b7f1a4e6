"""Layered health checks of a running stack, from the broker to an answer through the bridge.

One class per check, run in order; when a layer fails, the layers above it are reported as not run
(they could not pass). ``wait_healthy`` repeats the checks until all pass or a deadline passes; its
clock is injectable, so timeouts are tested without sleeping.

The engine's port is on an internal network only, so engine checks run ``python3`` inside the
engine container (``docker exec``) against 127.0.0.1.
"""

from __future__ import annotations

from deploykit.health.base import (
    Check,
    CheckResult,
    Clock,
    StackTarget,
    SystemClock,
    failure,
    run_checks,
    wait_healthy,
)
from deploykit.health.checks import (
    BridgeProbeCheck,
    BridgeStatusCheck,
    BrokerCheck,
    EngineCompletionCheck,
    EngineContainerCheck,
    EngineHealthCheck,
    EngineModelsCheck,
    default_checks,
)

__all__ = [
    "BridgeProbeCheck",
    "BridgeStatusCheck",
    "BrokerCheck",
    "Check",
    "CheckResult",
    "Clock",
    "EngineCompletionCheck",
    "EngineContainerCheck",
    "EngineHealthCheck",
    "EngineModelsCheck",
    "StackTarget",
    "SystemClock",
    "default_checks",
    "failure",
    "run_checks",
    "wait_healthy",
]

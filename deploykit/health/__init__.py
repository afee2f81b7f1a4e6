"""Layered health checks of a running stack, from the broker to an answer through the bridge.

One class per check (``deploykit.checks``' vocabulary, shared with ``deploykit doctor``), run in
order; when a layer fails, the layers above it are reported as not run (they could not pass).
``wait_healthy`` repeats the checks until all pass or a deadline passes; its clock is injectable,
so timeouts are tested without sleeping.

The engine's port is on an internal network only, so engine checks run ``python3`` inside the
engine container (``docker exec``) against 127.0.0.1.
"""

from __future__ import annotations

from deploykit.checks import Check, CheckResult
from deploykit.health.base import (
    Clock,
    StackTarget,
    SystemClock,
    failure,
    report_json,
    run_layers,
    wait_healthy,
)
from deploykit.health.layers import (
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
    "report_json",
    "run_layers",
    "wait_healthy",
]

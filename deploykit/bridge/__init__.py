"""The MQTT bridge: answers chat requests that arrive over MQTT by calling the engine's
OpenAI-compatible HTTP API (vLLM). Run it with ``deploykit bridge`` or ``python -m deploykit.bridge``.

Modules: ``config`` (settings and the YAML config), ``protocol`` (request validation, reply topics and
payloads), ``sessions`` (history, token trimming, ordering, expiry), ``limits`` (rate limits,
de-duplication), ``prompts`` (sampling parameters, prompt with trimmed history),
``engine`` (HTTP client), ``metrics`` (/health, /metrics), ``transport`` (paho, MQTT 5),
``service`` (request handling),
``runner`` (process entry: logging, signals).
"""

from deploykit.bridge.config import (
    BridgeConfig,
    ProjectConfig,
    Settings,
    load_config,
    settings_from,
)
from deploykit.bridge.runner import run_bridge

__all__ = [
    "BridgeConfig",
    "ProjectConfig",
    "Settings",
    "load_config",
    "run_bridge",
    "settings_from",
]

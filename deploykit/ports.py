"""The ports of a stack: the one place each is written (code, templates and rendered files use these)."""

from __future__ import annotations

#: MQTT: the broker's listener for clients and the bridge; the host port ``up`` publishes by default.
MQTT_PORT = 1883
#: The broker's TLS listener inside its container (``up --mqtt-tls-cert``); the host port is chosen.
MQTT_TLS_PORT = 8883
#: The broker's anonymous health-check listener, on the container's loopback only.
BROKER_HEALTH_PORT = 1884
#: vLLM's OpenAI server inside the engine container (on the stack's internal network only).
ENGINE_PORT = 8000
#: The bridge's ``/health`` and ``/metrics``.
BRIDGE_HTTP_PORT = 9000
#: Redis, the session state replicas share (on the stack's internal network only).
REDIS_PORT = 6379

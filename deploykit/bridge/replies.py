"""Delivery: replies, acknowledgements and drops. Every message the bridge receives ends here:
answered (its reply's PUBACK then acknowledges it), answered with an error, or, when no reply topic
can be used, counted as dropped and acknowledged at once. Nothing is left unacknowledged, so the
broker never delivers a message again and again."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from deploykit.bridge.limits import StoredReply
from deploykit.bridge.metrics import Metrics
from deploykit.bridge.protocol import ErrorCode, Routing, error_payload
from deploykit.bridge.transport import ProjectSession
from deploykit.mqttloop import MqttPublishError, publish_properties

log = logging.getLogger("deploykit.bridge")


@dataclass
class Inbound:
    """A received MQTT message still to be acknowledged."""

    session: ProjectSession
    mid: int
    qos: int
    received: float
    correlation: bytes | None

    @property
    def project(self) -> str:
        return self.session.project


class Replies:
    """Publishes replies on the project's session and acknowledges each request after its reply's
    PUBACK; counts requests, errors, drops and latency in ``metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def ack_after(self, inbound: Inbound, future: asyncio.Future[int] | None) -> None:
        def done(_f: object = None) -> None:
            inbound.session.ack(inbound.mid, inbound.qos)
            self.metrics.in_flight -= 1

        if future is None:
            done()
        else:
            future.add_done_callback(done)

    def drop(self, inbound: Inbound, code: str, why: str) -> None:
        """Acknowledge a message that gets no reply, and count it."""
        self.metrics.dropped += 1
        self.metrics.errors[code] += 1
        log.warning("dropped a message of project %s: %s", inbound.project, why)
        self.ack_after(inbound, None)

    def send(
        self,
        inbound: Inbound,
        routing: Routing,
        payload: bytes,
        *,
        is_error: bool,
        code: str | None = None,
    ) -> StoredReply | None:
        """Publish a reply (or drop it when no reply topic is known) and ack the request after it."""
        latency = time.monotonic() - inbound.received
        self.metrics.observe_latency(latency, inbound.project)
        status = "error" if is_error else "ok"
        self.metrics.requests[(inbound.project, status)] += 1
        reply = self.stored(routing, payload, status, code)
        if reply is None:
            self.drop(inbound, code or "no_reply_topic", f"{code}, and no reply topic is known")
            return None
        if code:
            self.metrics.errors[code] += 1
        json_reply = is_error or routing.format == "json"
        ctype = "application/json" if json_reply else "text/plain; charset=utf-8"
        try:
            future = inbound.session.publish(
                reply.topic,
                payload,
                properties=publish_properties(
                    correlation=inbound.correlation,
                    content_type=ctype,
                    user_properties=reply.user_properties,
                ),
            )
        except (MqttPublishError, ValueError) as err:  # never a reason to keep the request
            self.drop(inbound, "unpublishable", f"its reply could not be published: {err}")
            return None
        self.ack_after(inbound, future)
        log.info(
            "%s %s/%s request=%s -> %s (%.0f ms)%s",
            status,
            inbound.project,
            routing.session_id,
            routing.request_id,
            routing.reply_topic,
            latency * 1000,
            f" [{code}]" if code else "",
        )
        return reply

    @staticmethod
    def stored(
        routing: Routing, payload: bytes, status: str = "ok", code: str | None = None
    ) -> StoredReply | None:
        """The reply ``send`` publishes, as stored for repeats (None: no reply topic); replicas
        record an ok reply before it is published (a repeat that reaches another replica after
        this one died must find it)."""
        if routing.reply_topic is None:
            return None
        return StoredReply(routing.reply_topic, payload, reply_properties(routing, status, code))

    def reject(self, inbound: Inbound, routing: Routing, code: ErrorCode, message: str) -> None:
        self.send(
            inbound,
            routing,
            error_payload(routing, code.value, message),
            is_error=True,
            code=code.value,
        )

    def repeat(self, inbound: Inbound, routing: Routing, stored: StoredReply) -> None:
        """A repeated requestId: the stored reply again, marked as a duplicate (to the reply topic
        the repeat asked for, else the first one's)."""
        future = inbound.session.publish(
            routing.reply_topic or stored.topic,
            stored.payload,
            properties=publish_properties(
                correlation=inbound.correlation,
                user_properties=[*stored.user_properties, ("duplicate", "true")],
            ),
        )
        self.ack_after(inbound, future)


def reply_properties(routing: Routing, status: str, code: str | None) -> list[tuple[str, str]]:
    """A reply's MQTT 5 user properties: status, requestId, errorCode."""
    users = [("status", status)]
    if routing.request_id is not None:
        users.append(("requestId", routing.request_id))
    if code:
        users.append(("errorCode", code))
    return users

"""MQTT transport of the bridge: one MQTT session per project, plus one for the status topic.

Each project has its own persistent session (client id ``<secret>-<project>``), its own
subscription and its own in-flight window (the MQTT 5 Receive Maximum the broker honours per
session), so a flood of one project's requests waits in the broker inside that project's session
and never holds back another project's. Replies go out on the session that received the request.

- Persistent sessions: ``clean_start=False`` and a ``SessionExpiryInterval`` (without it the
  broker keeps nothing); the broker keeps the subscription and queues requests while the bridge
  is away, also across a broker restart with persistence.
- ``manual_ack``: a request is acknowledged (``ack``) only after its reply's PUBACK.
- Redelivery: after a reconnect the broker sends unacknowledged requests again with the same packet
  id. One whose answer is still being made is not started twice (its own acknowledgement covers
  it); one whose acknowledgement was lost while disconnected is acknowledged at once.
- The status session (clean, with a retained ``offline`` will) publishes ``online`` on each connect.
Everything runs on the bridge's asyncio loop (deploykit.mqttloop): no network thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from deploykit import names
from deploykit.mqttclient import (
    BrokerAddress,
    Credentials,
    connect_properties,
    make_client,
    use_tls,
)
from deploykit.mqttloop import AsyncMqtt

log = logging.getLogger("deploykit.bridge")

#: What the bridge knows of a received packet id: still being answered, or answered while the
#: connection was down (its PUBACK never left).
WORKING, ANSWERED = "working", "answered"


class ProjectSession:
    """The MQTT session of one project."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        project: str,
        address: BrokerAddress,
        client_id: str,
        *,
        credentials: Credentials | None,
        share_group: str | None,
        session_expiry_s: int,
        receive_maximum: int,
        keepalive_s: int,
        on_message: Callable[[ProjectSession, mqtt.MQTTMessage], None],
    ) -> None:
        self.project = project
        self.client_id = client_id
        topic = names.request_topic(project)
        self.subscription = f"$share/{share_group}/{topic}" if share_group else topic
        #: A session that served in the other mode (one bridge <-> replicas) keeps that mode's
        #: subscription: dropped at connect, so the session holds one subscription only.
        self._other = topic if share_group else None
        self._on_message = on_message
        self._inbound: dict[int, str] = {}
        self.redelivered = 0
        client = make_client(client_id, credentials=credentials, manual_ack=True)
        use_tls(client, address)
        # paho holds replies beyond this window and sends them as PUBACKs come back
        client.max_inflight_messages_set(max(20, receive_maximum))
        client.max_queued_messages_set(0)  # replies are never dropped by paho
        self.mqtt = AsyncMqtt(
            loop,
            client,
            address.host,
            address.port,
            keepalive=keepalive_s,
            clean_start=False,
            connect_properties=connect_properties(
                session_expiry_s=session_expiry_s, receive_maximum=receive_maximum
            ),
            on_message=self._received,
            on_connect=self._connected,
            on_disconnect=lambda reason: log.warning(
                "project %s: disconnected from the broker: %s", project, reason
            ),
            name=f"project {project}",
        )

    @property
    def connected(self) -> bool:
        return self.mqtt.connected

    def start(self) -> None:
        self.mqtt.start()

    async def stop(self, *, end_session: bool = False) -> None:
        """Disconnect; ``end_session`` also makes the broker drop the session (a replica that
        drained: no session of it stays in the share group receiving requests)."""
        properties = None
        if end_session:
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0
        await self.mqtt.stop(properties=properties)

    def leave_share_group(self) -> None:
        """Take no new requests: unsubscribe (the broker still sends what it queued for us)."""
        if self.mqtt.connected:
            self.mqtt.client.unsubscribe(self.subscription)

    def _connected(self, session_present: bool) -> None:
        log.info(
            "project %s: connected to the broker (session present: %s)",
            self.project,
            session_present,
        )
        if not session_present:
            # The broker starts afresh: packet ids restart, so an id held from before names another
            # request now. Requests still being answered will not be acknowledged (their senders
            # retry; answers of repeated requestIds come from the de-duplication cache).
            self._inbound.clear()
        # Retained messages on the request topic are never handed over at subscribe time: a client
        # that published a request with the retain flag would otherwise replay it at every
        # reconnect of the bridge (MQTT 5 Retain Handling 2).
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        if session_present and self._other is not None:
            self.mqtt.client.unsubscribe(self._other)
        self.mqtt.client.subscribe([(self.subscription, options)])

    def _received(self, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            state = self._inbound.get(msg.mid)
            if state == WORKING:
                self.redelivered += 1
                return  # being answered; its acknowledgement will cover this copy
            if state == ANSWERED:
                self.redelivered += 1
                self._inbound.pop(msg.mid)
                self.mqtt.ack(msg.mid, msg.qos)  # the first PUBACK was lost with the connection
                return
            self._inbound[msg.mid] = WORKING
        self._on_message(self, msg)

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a request (after its reply's PUBACK)."""
        if qos == 0 or self._inbound.get(mid) != WORKING:
            return  # not ours to acknowledge (see _connected)
        if self.mqtt.ack(mid, qos):
            del self._inbound[mid]
        else:
            self._inbound[mid] = ANSWERED

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        properties: Properties | None = None,
    ) -> asyncio.Future[int] | None:
        """A reply, at QoS 1; the future resolves at the broker's PUBACK."""
        return self.mqtt.publish(topic, payload, properties=properties, track=True)

    def publish_part(
        self, topic: str, payload: bytes, *, properties: Properties | None = None
    ) -> None:
        """A stream part, at QoS 0: a preview of the reply, which follows at QoS 1 with the whole
        text. Half the packets of QoS 1 (no PUBACK), the bridge's main cost when streaming."""
        self.mqtt.publish(topic, payload, qos=0, properties=properties)


class StatusSession:
    """A clean session that keeps ``deploykit/bridge/<name>/status`` retained: ``online`` while
    connected, ``offline`` as its will and on a clean stop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        address: BrokerAddress,
        client_id: str,
        name: str,
        *,
        credentials: Credentials | None,
        keepalive_s: int,
    ) -> None:
        self.topic = names.status_topic(name)
        client = make_client(client_id, credentials=credentials)
        use_tls(client, address)
        client.will_set(self.topic, "offline", qos=1, retain=True)
        self.mqtt = AsyncMqtt(
            loop,
            client,
            address.host,
            address.port,
            keepalive=keepalive_s,
            clean_start=True,
            on_connect=self._online,
            name="status",
        )

    def _online(self, _session_present: bool) -> None:
        self.mqtt.publish(self.topic, b"online", retain=True)

    @property
    def connected(self) -> bool:
        return self.mqtt.connected

    def start(self) -> None:
        self.mqtt.start()

    async def stop(self) -> None:
        if self.mqtt.connected:
            done = self.mqtt.publish(self.topic, b"offline", retain=True, track=True)
            if done is not None:
                try:
                    await asyncio.wait_for(done, 3.0)
                except TimeoutError:
                    log.warning("the broker did not confirm the offline status")
        await self.mqtt.stop()
